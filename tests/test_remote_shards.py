"""gs:// shard folders: read through etils/epath, copied into the data cache with every file's
size and sha256 checked, then trained from like local shards.

There is no network here, so gs:// is served by a stand-in fsspec file system over a temporary
folder (what gcsfs does for a real bucket); everything above fsspec is the real code path.
"""

import os

import numpy as np
import pytest
from etils.epath import backend as epath_backend
import fsspec
from fsspec.implementations.local import LocalFileSystem

from configs import default
from mer_jax.run import corpus
from mer_jax import config_validation
from mer_jax.data import shards
from mer_jax.data import staging
from mer_jax.data import synthetic


class FolderAsGcs(LocalFileSystem):
  """gs://bucket/key -> <root>/bucket/key on the local disk."""

  protocol = ('gs', 'gcs')
  root = ''

  def __init__(self, *args, finalize_on_close=False, **kwargs):
    del finalize_on_close  # a gcsfs option
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for prefix in ('gs://', 'gcs://'):
      if path.startswith(prefix):
        return os.path.join(cls.root, path[len(prefix):]).rstrip('/')
    return super()._strip_protocol(path)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """A gs://bucket/shards folder holding a small synthetic corpus; returns (url, local path)."""
  monkeypatch.setattr(FolderAsGcs, 'root', str(tmp_path / 'gcs'))
  fsspec.register_implementation('gcs', FolderAsGcs, clobber=True)
  fsspec.register_implementation('gs', FolderAsGcs, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  yield 'gs://bucket/shards', tmp_path / 'gcs' / 'bucket' / 'shards'
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def small_corpus_config():
  c = default.get_config('tiny')
  c.data.synthetic.num_dialogues.train = 6
  c.data.synthetic.num_dialogues.dev = 3
  c.data.synthetic.num_dialogues.test = 3
  return c


def write_corpus(folder) -> None:
  c = small_corpus_config()
  synthetic.generate_corpus(str(folder), seed=1, num_dialogues=c.data.synthetic.num_dialogues.to_dict(),
                            num_shards={'train': 2, 'dev': 1, 'test': 1},
                            dims=c.data.dims.to_dict(), label_names=tuple(c.label_names))


def records(shard_dir, split):
  src = shards.DialogueShardSource(shard_dir, split)
  return [src[i] for i in range(len(src))]


def test_gs_shards_are_staged_verified_and_read_like_the_originals(bucket, tmp_path, monkeypatch):
  url, remote_path = bucket
  write_corpus(remote_path)
  cache = tmp_path / 'cache'
  local = staging.stage_shards(url, str(cache))
  assert local == staging.staged_dir(url, str(cache)) and os.path.isdir(local)
  manifest = shards.load_manifest(local)
  for split in manifest.splits:
    for a, b in zip(records(local, split), records(str(remote_path), split)):
      assert a.dialogue_id == b.dialogue_id
      np.testing.assert_array_equal(a.labels, b.labels)
      for m in a.features:
        np.testing.assert_array_equal(a.features[m], b.features[m])

  # A second run (or another process) copies nothing.
  def no_copy(*args):
    raise AssertionError(f'copied again: {args}')
  monkeypatch.setattr(staging, '_copy_verified', no_copy)
  assert staging.stage_shards(url, str(cache)) == local

  # Local folders are used where they are.
  assert staging.stage_shards(str(remote_path), str(cache)) == str(remote_path)


def test_a_corrupt_remote_file_is_named_and_nothing_half_copied_is_left(bucket, tmp_path):
  url, remote_path = bucket
  write_corpus(remote_path)
  name = shards.load_manifest(str(remote_path)).splits['train'].files[0].name
  target = remote_path / name
  data = bytearray(target.read_bytes())
  data[len(data) // 2] ^= 0xFF  # same size, different bytes
  target.write_bytes(bytes(data))
  cache = tmp_path / 'cache'
  with pytest.raises(shards.ShardError, match=f'gs://bucket/shards/{name}: sha256'):
    staging.stage_shards(url, str(cache))
  local = staging.staged_dir(url, str(cache))
  assert not os.path.exists(os.path.join(local, shards.MANIFEST_NAME))
  assert not os.path.exists(os.path.join(local, name))
  assert not [f for f in os.listdir(local) if f.endswith('.tmp')]

  # A truncated remote file is named too.
  target.write_bytes(bytes(data[:100]))
  with pytest.raises(shards.ShardError, match='truncated or replaced'):
    staging.stage_shards(url, str(cache))


def test_a_missing_remote_folder_fails_at_start_up_naming_the_key(bucket):
  config = small_corpus_config()
  config.data.source = 'shards'
  config.data.shard_dir = 'gs://bucket/nothing-here'
  with pytest.raises(config_validation.ConfigError, match='data.shard_dir'):
    config_validation.validate_config(config)


def test_training_sources_open_from_a_gs_folder(bucket, tmp_path):
  url, remote_path = bucket
  write_corpus(remote_path)
  config = small_corpus_config()
  config.data.source = 'shards'
  config.data.shard_dir = url
  config_validation.validate_config(config)  # finds gs://.../manifest.json through epath
  workdir = tmp_path / 'work'
  splits = corpus.open_splits(config, str(workdir))
  assert (len(splits.train), len(splits.dev), len(splits.test)) == (6, 3, 3)
  assert splits.shard_dir == staging.staged_dir(url, str(workdir / 'data'))
