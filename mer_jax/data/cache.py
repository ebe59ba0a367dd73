"""The data cache: where generated corpora and extracted features live, and how a folder in it is
built once, even by runs that share the cache."""

from __future__ import annotations

import os
import shutil


def data_root(config, workdir: str) -> str:
  """Where generated corpora and extracted features live: data.cache_dir, else workdir/data."""
  return config.data.cache_dir or os.path.join(workdir, 'data')


def build_once(out: str, build, marker: str = 'manifest.json') -> str:
  """Runs `build(folder)` unless `out` is complete (has `marker`); builds beside it and renames.

  Runs that share a cache (parallel seeds of a sweep) may build the same folder at once: each
  writes its own partial folder, the first rename wins and the others discard theirs. A crash
  leaves only a partial folder, never a half-written `out`.
  """
  if os.path.exists(os.path.join(out, marker)):
    return out
  partial = f'{out}.partial-{os.getpid()}'
  shutil.rmtree(partial, ignore_errors=True)
  build(partial)
  os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
  try:
    os.rename(partial, out)
  except OSError:
    if not os.path.exists(os.path.join(out, marker)):
      raise
    shutil.rmtree(partial, ignore_errors=True)  # another run finished it first
  return out
