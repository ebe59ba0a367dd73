"""Lock files held by one process: `host pid` in a file created exclusively.

A lock whose process has ended on this host (killed, crashed) is stale: it is cleared with a
message and taken. A lock held on another host cannot be checked from here and is respected.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator

from mer_jax import console
from mer_jax import errors


class LockHeld(errors.UserError):
  """Another live process holds the lock."""


def holder(path: str) -> tuple[str, int] | None:
  """(host, pid) written in the lock file, or None while it is absent or being written."""
  try:
    with open(path) as f:
      host, pid = f.read().split()
    return host, int(pid)
  except (FileNotFoundError, ValueError):
    return None


def holder_is_dead(path: str) -> bool:
  """True when the lock's process ran on this host and no longer exists."""
  held = holder(path)
  if held is None or held[0] != socket.gethostname():
    return False
  try:
    os.kill(held[1], 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # alive, owned by another user
    return False
  return False


def try_acquire(path: str, what: str = '') -> bool:
  """Takes the lock if it is free or stale (saying so); False if a live process holds it."""
  while True:
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except (PermissionError, NotADirectoryError, IsADirectoryError) as e:
      raise errors.UserError(f'{what or path}: cannot create the lock file {path} ({e})') from e
    except FileExistsError:
      if not holder_is_dead(path):
        return False
      host, pid = holder(path)
      console.say('%sclearing a stale lock %s (process %d on %s has ended)',
                  f'{what}: ' if what else '', path, pid, host)
      release(path)
      continue
    with os.fdopen(fd, 'w') as f:
      f.write(f'{socket.gethostname()} {os.getpid()}')
    return True


def release(path: str) -> None:
  try:
    os.unlink(path)
  except FileNotFoundError:
    pass


@contextlib.contextmanager
def held(path: str, what: str) -> Iterator[None]:
  """Holds the lock at `path` for the block (released on any exit); raises LockHeld, naming the
  holder's pid and host, if a live process has it."""
  try:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  except OSError as e:
    raise errors.UserError(f'{what}: cannot be written ({e})') from e
  if not try_acquire(path, what):
    held_by = holder(path)
    by = f'process {held_by[1]} on host {held_by[0]}' if held_by else 'another process'
    raise LockHeld(f'{what} is in use by {by} (lock file {path}); wait for it to end, or remove '
                   'the lock file if that process is gone')
  try:
    yield
  finally:
    release(path)
