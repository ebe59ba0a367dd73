"""Atomic file writes: a reader, or a run that crashed mid-write, never sees a half-written file.

Every file is written under a temporary name beside its destination (unique to the process, the
destination's extension kept, since writers such as np.savez and PyAV go by it) and renamed into
place only once it is complete. A failure removes the temporary file and leaves the destination
as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path to write; on success it replaces `path` (parents are created)."""
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  root, ext = os.path.splitext(path)
  tmp = f'{root}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}'
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def open_atomically(path: str, mode: str = 'w', **kwargs) -> Iterator[Any]:
  """`open(path, mode)` whose contents appear at `path` only when the block ends without error."""
  with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
    yield f


def write_json(path: str, obj: Any, **dump_kwargs) -> str:
  """json.dump(obj) to `path`, atomically; returns `path`."""
  with open_atomically(path, encoding='utf-8') as f:
    json.dump(obj, f, **dump_kwargs)
  return path


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
  """Yields a temporary folder to fill; on success it is renamed to `path`, which must not exist
  or be an empty folder. A failure removes it and leaves `path` as it was."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f'.{os.path.basename(os.path.abspath(path))}.tmp-{os.getpid()}-'
                     f'{uuid.uuid4().hex[:8]}')
  os.mkdir(tmp)
  try:
    yield tmp
    os.rename(tmp, path)  # POSIX replaces an empty folder; a non-empty one raises OSError
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
