"""Tests for the TFDS dataset `mer_dialogues`: a shard folder read in place
(mer_jax/data/tfds_metadata.py) or prepared as a copy (mer_jax/data/tfds_builder.py)."""

import json
import os
import pathlib
import subprocess
import sys

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mer_jax.data import shards
from mer_jax.data import synthetic
from mer_jax.data import tfds_builder
from mer_jax.data import tfds_metadata

DIMS = {'t': 24, 'a': 20, 'v': 16}
ROOT = pathlib.Path(__file__).resolve().parent.parent


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


# ---------------------------------------------------------------------------
# A shard folder read in place: tfds.builder_from_directory(shard_dir).


def folder_state(folder):
  """name -> (inode, size, mtime) of every file: what a copy or a rewrite would change."""
  return {p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(pathlib.Path(folder).iterdir())}


@pytest.fixture(scope='module')
def in_place(tmp_path_factory):
  """A folder as write_shards leaves it; test has more files than dialogues (an empty file)."""
  root = tmp_path_factory.mktemp('in_place')
  shard_dir = root / 'Tiny-Corpus'
  manifest = synthetic.generate_corpus(shard_dir, seed=5, dims=DIMS,
                                       num_shards={'train': 2, 'test': 5},
                                       num_dialogues={'train': 9, 'test': 4})
  return shard_dir, manifest


def test_write_shards_adds_tfds_metadata_beside_the_manifest(in_place, tmp_path):
  shard_dir, manifest = in_place
  data_files = {f.name for info in manifest.splits.values() for f in info.files}
  assert set(os.listdir(shard_dir)) == (data_files | {shards.MANIFEST_NAME}
                                        | set(tfds_metadata.FILE_NAMES))
  # The manifest lists only the data files, its checksums hold, and every split opens verified.
  assert shards.load_manifest(shard_dir).checksum_ok is True
  for split in manifest.splits:
    shards.DialogueShardSource(shard_dir, split, verify_checksums=True)
  # features.json is what TFDS itself writes for the features it names.
  tfds_builder.DialogueFeatures(DIMS, synthetic.MELD_LABELS).save_config(os.fspath(tmp_path))
  assert (json.loads((shard_dir / 'features.json').read_text())
          == json.loads((tmp_path / 'features.json').read_text()))


def test_builder_from_directory_reads_the_shards_in_place(in_place):
  shard_dir, manifest = in_place
  before = folder_state(shard_dir)
  builder = tfds.builder_from_directory(shard_dir)
  assert (builder.name, builder.info.config_name) == ('mer_dialogues', 'tiny_corpus')
  assert isinstance(builder.info.features, tfds_builder.DialogueFeatures)
  assert builder.info.features['features']['a'].shape == (None, 20)
  assert builder.info.metadata['label_names'] == list(synthetic.MELD_LABELS)
  assert builder.info.metadata['dims'] == DIMS
  sources = builder.as_data_source()
  assert set(sources) == {'train', 'test'}
  for split, source in sources.items():
    # TFDS opens the folder's own files, by the names the manifest gives them.
    info = builder.info.splits[split]
    assert info.filepaths == [shard_dir / f.name for f in manifest.splits[split].files]
    assert info.shard_lengths == [f.num_records for f in manifest.splits[split].files]
    shard_source = shards.DialogueShardSource(shard_dir, split)
    order = tfds_builder.tfds_order(manifest, split)
    assert len(source) == len(shard_source) and sorted(order) == list(range(len(source)))
    for j in range(len(source)):
      assert_same(shard_source[order[j]], source[j])
  assert folder_state(shard_dir) == before  # nothing copied, written or rewritten
  assert os.listdir(shard_dir.parent) == ['Tiny-Corpus']
  assert 'tensorflow' not in sys.modules
  shards.DialogueShardSource(shard_dir, 'train', verify_checksums=True)


def test_examples_read_in_place_equal_a_prepared_copys(in_place, tmp_path):
  shard_dir, manifest = in_place
  prepared = tfds_builder.prepare(shard_dir, tmp_path / 'data').as_data_source()['test']
  in_place_source = tfds.builder_from_directory(shard_dir).as_data_source()['test']
  order = tfds_builder.tfds_order(manifest, 'test')
  for j in range(len(in_place_source)):
    got, want = in_place_source[j], prepared[int(order[j])]
    assert list(got) == list(want)
    for key in ('dialogue_id', 'speakers', 'transcripts'):
      assert got[key] == want[key]  # bytes, as TFDS decodes text
    for key in ('utterance_ids', 'speaker_ids', 'labels'):
      assert got[key].dtype == want[key].dtype
      np.testing.assert_array_equal(got[key], want[key])
    for field in ('features', 'present'):
      assert list(got[field]) == list(want[field])
      for m in DIMS:
        assert got[field][m].dtype == want[field][m].dtype
        np.testing.assert_array_equal(got[field][m], want[field][m])


def test_a_fresh_process_reads_in_place_with_tfds_alone(in_place):
  """TFDS imports the features' class by the name in features.json; TensorFlow is not needed."""
  shard_dir, _ = in_place
  code = ('import sys, tensorflow_datasets as tfds\n'
          f'source = tfds.builder_from_directory({os.fspath(shard_dir)!r}).as_data_source()\n'
          "print(len(source['train']), source['train'][1]['dialogue_id'].decode(), "
          "'tensorflow' in sys.modules)")
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  # Record 1 of TFDS is the second of file 0: the writer's record 2 (round-robin over 2 files).
  assert proc.stdout.split() == ['9', 'train_00002', 'False']


def test_bad_records_read_in_place_name_the_dialogue():
  features = tfds_builder.DialogueFeatures({'t': 2}, ['a', 'b'])
  record = shards.DialogueRecord(
      dialogue_id='d7', utterance_ids=np.arange(2, dtype=np.int32), speakers=['x', 'y'],
      speaker_ids=np.array([0, 1], np.int32), labels=np.array([0, 5], np.int32),
      transcripts=['', ''], features={'t': np.zeros((2, 2), np.float32)},
      present={'t': np.ones(2, bool)})
  with pytest.raises(shards.BadRecordError, match=r"dialogue_id='d7'.*label out of range"):
    features.deserialize_example_np(shards.encode_record(record))
  with pytest.raises(shards.BadRecordError, match='undecodable record'):
    features.deserialize_example_np(b'not msgpack')


def test_the_command_adds_metadata_to_an_older_folder(tmp_path):
  shard_dir = tmp_path / 'old'
  synthetic.generate_corpus(shard_dir, seed=3, dims=DIMS, num_shards=2,
                            num_dialogues={'train': 3})
  for name in tfds_metadata.FILE_NAMES:  # as written before write_shards added them
    (shard_dir / name).unlink()
  with pytest.raises(Exception):
    tfds.builder_from_directory(shard_dir)
  before = folder_state(shard_dir)
  proc = subprocess.run([sys.executable, '-m', 'mer_jax.data.tfds_builder', '--shard_dir',
                         os.fspath(shard_dir), '--name', 'older'], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'TFDS metadata written (train 3 dialogues)' in proc.stderr
  after = folder_state(shard_dir)
  assert {n: after[n] for n in before} == before  # manifest and data files untouched
  assert set(after) - set(before) == set(tfds_metadata.FILE_NAMES)
  builder = tfds.builder_from_directory(shard_dir)
  assert builder.info.config_name == 'older'
  source = shards.DialogueShardSource(shard_dir, 'train', verify_checksums=True)
  assert_same(source[2], builder.as_data_source()['train'][1])


def test_the_command_refuses_a_broken_folder(tmp_path):
  shard_dir = tmp_path / 'broken'
  synthetic.generate_corpus(shard_dir, seed=3, dims=DIMS, num_dialogues={'train': 2})
  (shard_dir / 'train-00000-of-00001.array_record').unlink()
  with pytest.raises(shards.ShardError, match='shard file missing'):
    tfds_builder.add_metadata(shard_dir)
  with pytest.raises(shards.ShardError, match='shard folder not found'):
    tfds_builder.add_metadata(tmp_path / 'missing')
