"""Tests for the TFDS dataset `mer_dialogues` (mer_jax/data/tfds_builder.py)."""

import os
import sys

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mer_jax.data import shards
from mer_jax.data import synthetic
from mer_jax.data import tfds_builder

DIMS = {'t': 24, 'a': 20, 'v': 16}


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds')
  shard_dir = root / 'Tiny-Corpus'
  synthetic.generate_corpus(shard_dir, seed=5, dims=DIMS, num_shards=2,
                            num_dialogues={'train': 9, 'test': 4})
  builder = tfds_builder.prepare(shard_dir, root / 'data')
  return shard_dir, root / 'data', builder


def assert_same(record, example):
  got = tfds_builder.record_from_example(example)
  assert got.dialogue_id == record.dialogue_id
  assert got.speakers == record.speakers
  assert got.transcripts == record.transcripts
  for key in ('utterance_ids', 'speaker_ids', 'labels'):
    np.testing.assert_array_equal(getattr(got, key), getattr(record, key))
  for m in DIMS:
    assert got.features[m].dtype == np.float32
    np.testing.assert_array_equal(got.features[m], record.features[m])
    np.testing.assert_array_equal(got.present[m], record.present[m])


def test_examples_equal_the_shard_source(prepared):
  shard_dir, _, builder = prepared
  assert builder.name == 'mer_dialogues'
  assert builder.builder_config.name == 'tiny_corpus'
  sources = builder.as_data_source()
  assert set(sources) == {'train', 'test'}
  for split, source in sources.items():
    shard_source = shards.DialogueShardSource(shard_dir, split)
    assert len(source) == len(shard_source)
    for i in range(len(source)):  # same order: shuffling is disabled
      assert_same(shard_source[i], source[i])


def test_feature_spec_and_metadata(prepared):
  _, _, builder = prepared
  features = builder.info.features
  assert features['features']['a'].shape == (None, 20)
  assert features['features']['a'].np_dtype == np.float32  # .dtype needs TF
  assert features['labels'].shape == (None,)
  assert builder.info.splits['train'].num_examples == 9
  metadata = tfds.builder_from_directory(builder.data_dir).info.metadata
  assert metadata['label_names'] == list(synthetic.MELD_LABELS)
  assert metadata['dims'] == DIMS and metadata['modalities'] == ['t', 'a', 'v']


def test_readable_without_the_builder_code_and_without_tensorflow(prepared):
  shard_dir, data_dir, _ = prepared
  source = tfds.data_source('mer_dialogues/tiny_corpus', data_dir=data_dir)
  assert_same(shards.DialogueShardSource(shard_dir, 'test')[3],
              source['test'][3])
  dataset = grain.MapDataset.source(source['train']).map(
      tfds_builder.record_from_example)
  assert [r.dialogue_id for r in dataset][:2] == ['train_00000', 'train_00001']
  assert 'tensorflow' not in sys.modules


def test_reuses_a_prepared_copy_and_refuses_a_stale_one(tmp_path):
  shard_dir = tmp_path / 'c'
  kwargs = dict(dims=DIMS, num_dialogues={'train': 3})
  synthetic.generate_corpus(shard_dir, seed=1, **kwargs)
  first = tfds_builder.prepare(shard_dir, tmp_path / 'data', name='c')
  data_file = next(first.data_path.glob('*.array_record*'))
  written = os.stat(data_file).st_mtime_ns
  tfds_builder.prepare(shard_dir, tmp_path / 'data', name='c')
  assert os.stat(data_file).st_mtime_ns == written

  synthetic.generate_corpus(shard_dir, seed=2, overwrite=True, **kwargs)
  with pytest.raises(shards.ShardError,
                     match='prepared from a different manifest'):
    tfds_builder.prepare(shard_dir, tmp_path / 'data', name='c')
  again = tfds_builder.prepare(shard_dir, tmp_path / 'data', name='c',
                               overwrite=True)
  assert_same(shards.DialogueShardSource(shard_dir, 'train')[2],
              again.as_data_source()['train'][2])


def test_builder_needs_a_shard_folder(tmp_path):
  with pytest.raises(ValueError, match='needs a ShardFolderConfig'):
    tfds_builder.MerDialogues(data_dir=tmp_path)
  with pytest.raises(shards.ShardError, match='shard folder not found'):
    tfds_builder.prepare(tmp_path / 'missing', tmp_path / 'data')
