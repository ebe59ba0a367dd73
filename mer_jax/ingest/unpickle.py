"""Loads untrusted pickles: numpy arrays, numpy scalars and builtin containers, nothing else.

A pickle can name any importable callable and have the loader call it (`os.system`, say), so
`pickle.load` on a downloaded feature file runs whatever its author chose. `load` admits only the
globals that numpy arrays, dtypes and scalars and Python's containers pickle to, under their
Python 2 and Python 3 names, and refuses every other one before anything is called.
"""

from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
from typing import Any, Callable

import numpy as np

from mer_jax import errors


class PickleRefusedError(errors.UserError):
  """A pickle names a global that is not a numpy array, dtype or scalar, or a builtin container."""


class BadPickleError(errors.UserError):
  """A file is not a pickle this loader can read (truncated, not a pickle, a torch zip file)."""


def _latin1_encode(text: str, encoding: str = 'latin1') -> bytes:
  """`_codecs.encode`, which Python 3 writes for bytes at protocol 2, limited to latin-1."""
  if codecs.lookup(encoding).name != 'iso8859-1':
    raise pickle.UnpicklingError(f'refused _codecs.encode with encoding {encoding!r}')
  return text.encode('latin1')


def _numpy_globals() -> dict[tuple[str, str], Any]:
  # The functions numpy reduces arrays and scalars to, taken from numpy itself, so that both
  # `numpy.core` (numpy 1) and `numpy._core` (numpy 2) spellings resolve without importing either.
  reconstruct = np.zeros(1).__reduce__()[0]
  scalar = np.float32(0).__reduce__()[0]
  frombuffer = np.zeros(1).__reduce_ex__(5)[0]
  found = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype}
  for core in ('numpy.core', 'numpy._core'):
    found[(f'{core}.multiarray', '_reconstruct')] = reconstruct
    found[(f'{core}.multiarray', 'scalar')] = scalar
    found[(f'{core}.numeric', '_frombuffer')] = frombuffer
  return found


def _builtin_globals() -> dict[tuple[str, str], Any]:
  found: dict[tuple[str, str], Any] = {
      ('collections', 'OrderedDict'): collections.OrderedDict,
      ('collections', 'defaultdict'): collections.defaultdict,
      ('_codecs', 'encode'): _latin1_encode,
  }
  for module in ('builtins', '__builtin__'):  # Python 3 and Python 2 names
    for value in (set, frozenset, list, dict, tuple, int, float, str):
      found[(module, value.__name__)] = value
  return found


ALLOWED: dict[tuple[str, str], Any] = {**_numpy_globals(), **_builtin_globals()}


class RestrictedUnpickler(pickle.Unpickler):
  """An Unpickler whose `find_class` resolves only the globals in `ALLOWED`."""

  def __init__(self, file: io.BufferedIOBase, path: str):
    super().__init__(file, encoding='latin1')  # Python 2 str -> str, as the field loads them
    self._path = path

  def find_class(self, module: str, name: str) -> Callable[..., Any]:
    value = ALLOWED.get((module, name))
    if value is None:
      raise PickleRefusedError(
          f'{self._path}: refused to load the global {module}.{name} (a pickle may only hold '
          'numpy arrays, dtypes and scalars and builtin containers; it may run code otherwise)')
    return value

  def persistent_load(self, pid: Any) -> Any:
    raise PickleRefusedError(f'{self._path}: refused a persistent id {str(pid)[:40]!r} (not a '
                             'plain pickle of numpy arrays)')


def load(path: str | os.PathLike[str]) -> Any:
  """The object pickled in `path`, read with `RestrictedUnpickler`.

  Raises:
    PickleRefusedError: the pickle names a global outside `ALLOWED` (nothing it names is called).
    BadPickleError: the file is missing or is not a readable pickle.
  """
  path = os.fspath(path)
  try:
    with open(path, 'rb') as f:
      return RestrictedUnpickler(f, path).load()
  except errors.UserError:
    raise
  except FileNotFoundError as e:
    raise BadPickleError(f'{path}: no such file') from e
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
          KeyError, MemoryError, OSError, UnicodeError) as e:
    reason = ' '.join(str(e).split())[:200] or type(e).__name__
    raise BadPickleError(f'{path}: not a readable pickle of numpy arrays ({reason})') from e
