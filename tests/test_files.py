"""Atomic writes (mer_jax/files.py): the destination holds the old contents or the new, never a
part, and a failed write leaves no temporary file behind."""

import json
import os

import numpy as np
import pytest

from mer_jax import files


def test_write_json_replaces_the_file_whole(tmp_path):
  path = str(tmp_path / 'sub' / 'results.json')
  files.write_json(path, {'a': 1})
  files.write_json(path, {'b': [1, 2]}, indent=1)
  with open(path) as f:
    assert json.load(f) == {'b': [1, 2]}
  assert os.listdir(tmp_path / 'sub') == ['results.json']


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = str(tmp_path / 'out.txt')
  with files.open_atomically(path) as f:
    f.write('old')
  with pytest.raises(RuntimeError, match='disk full'):
    with files.open_atomically(path) as f:
      f.write('half of the new')
      raise RuntimeError('disk full')
  with open(path) as f:
    assert f.read() == 'old'
  assert os.listdir(tmp_path) == ['out.txt']


def test_the_temporary_name_keeps_the_extension(tmp_path):
  path = str(tmp_path / 'arrays.npz')
  with files.atomic_path(path) as tmp:
    assert tmp.endswith('.npz') and os.path.dirname(tmp) == str(tmp_path)
    np.savez(tmp, x=np.arange(3))  # np.savez would append '.npz' to any other name
  np.testing.assert_array_equal(np.load(path)['x'], [0, 1, 2])
  assert os.listdir(tmp_path) == ['arrays.npz']
