"""Host allocator settings for training processes.

By default glibc serves every allocation above a threshold (128 KiB, raised as large blocks are
freed) with a fresh mmap and returns it on free, so each XLA CPU step that allocates a few MiB
of temporaries pays page faults again. On this machine's 2 cores the graph teacher's step took
32.0 ms in a fresh process and 18.5 ms with the thresholds fixed (medians of 30 steps,
python -m mer_jax.bench --moe on, one run each).

The threshold cannot go above 32 MiB, and the teacher's step also allocates a block larger than
that: with the threshold alone, a process either happened to serve it from the heap or mmapped
it on every step, about 10,000 page faults and 29 ms a step instead of 18-19 (both seen on the
same commit, in different processes). So mmap is switched off for ordinary allocations
(M_MMAP_MAX = 0): large blocks come from the heap and are reused after a free. glibc still
mmaps where the heap cannot grow (a thread arena's request over 64 MiB). Accelerator runs keep
their arrays in device memory; there this only affects the host-side input pipeline.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# glibc caps the mmap threshold at 32 MiB on 64-bit hosts; larger blocks are mmapped regardless.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20  # free heap kept by the process before it is returned to the OS


def _libc():
  name = ctypes.util.find_library('c')
  try:
    libc = ctypes.CDLL(name)
  except OSError:
    return None
  return libc if hasattr(libc, 'mallopt') else None


def keep_freed_blocks_in_heap() -> bool:
  """Sets glibc's mmap and trim thresholds and turns off mmap for ordinary allocations; False
  (and no change) where malloc is not glibc's."""
  libc = _libc()
  if libc is None:
    return False
  return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
              and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
              and libc.mallopt(_M_MMAP_MAX, 0))
