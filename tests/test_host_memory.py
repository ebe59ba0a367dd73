"""The training process's allocator settings (glibc hosts)."""

import subprocess
import sys

import pytest

from mer_jax.train import cpu_backend

# Counts glibc's mmapped blocks while a 1 MiB or a 48 MiB array is alive, before and after
# the call.
_PROBE = """
import ctypes, numpy as np
from mer_jax.train import cpu_backend
libc = ctypes.CDLL('libc.so.6')
class Info(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd',
                                             'usmblks', 'fsmblks', 'uordblks', 'fordblks',
                                             'keepcost')]
libc.mallinfo2.restype = Info
def mmapped_with_live_array(mib):
  base = libc.mallinfo2().hblks
  a = np.ones(mib << 18, np.float32)
  return libc.mallinfo2().hblks - base
before = [mmapped_with_live_array(1), mmapped_with_live_array(48)]
assert cpu_backend.keep_freed_blocks_in_heap()
print(*before, mmapped_with_live_array(1), mmapped_with_live_array(48))
"""


@pytest.mark.skipif(not hasattr(cpu_backend._libc(), 'mallinfo2'), reason='glibc >= 2.33 only')
def test_large_temporaries_come_from_the_heap_after_the_call():
  """1 MiB and 48 MiB arrays (the latter above the largest mmap threshold glibc accepts) are
  mmapped before the call and served from the heap after it."""
  out = subprocess.run([sys.executable, '-c', _PROBE], capture_output=True, text=True, check=True)
  assert list(map(int, out.stdout.split())) == [1, 1, 0, 0]
