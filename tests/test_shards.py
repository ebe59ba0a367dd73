"""Tests for the dialogue shard format (mer_jax/data/shards.py)."""

import hashlib
import json
import os
import pickle
import re
import time

from array_record.python import array_record_module
import grain
import numpy as np
import pytest

from mer_jax.data import shards

DIMS = {'t': 8, 'a': 6, 'v': 4}
LABELS = ('neutral', 'joy', 'anger')


def make_record(dialogue_id, speakers, labels, seed=0, absent=None):
  """A valid record; `absent` maps modality -> utterance indices not present."""
  rng = np.random.default_rng(seed)
  n = len(speakers)
  present = {m: np.ones(n, bool) for m in DIMS}
  for m, rows in (absent or {}).items():
    present[m][rows] = False
  return shards.DialogueRecord(
      dialogue_id=dialogue_id,
      utterance_ids=np.arange(n, dtype=np.int32),
      speakers=list(speakers),
      speaker_ids=shards.speaker_ranks(speakers),
      labels=np.asarray(labels, np.int32),
      transcripts=[f'line {i} of {dialogue_id}' for i in range(n)],
      features={m: rng.normal(size=(n, d)).astype(np.float32) + 1.0
                for m, d in DIMS.items()},
      present=present)


def assert_records_equal(a, b):
  assert a.dialogue_id == b.dialogue_id
  assert a.speakers == b.speakers and a.transcripts == b.transcripts
  for key in ('utterance_ids', 'speaker_ids', 'labels'):
    np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert getattr(b, key).dtype == np.int32
  assert list(a.features) == list(b.features)
  for m in a.features:
    np.testing.assert_array_equal(a.features[m], b.features[m])
    np.testing.assert_array_equal(a.present[m], b.present[m])


def corpus():
  """Train: 7 dialogues (lengths 1..7), dev: 2; hand-checkable labels."""
  train = []
  for i in range(7):
    n = i + 1
    speakers = ['Ann', 'Bob', 'Ann', 'Cy', 'Bob', 'Ann', 'Dee'][:n]
    labels = [(i + j) % 4 - 1 for j in range(n)]  # -1 (unlabeled), 0, 1, 2
    absent = {'a': [0]} if i == 2 else ({'v': [0, n - 1]} if i == 5 else {})
    train.append(make_record(f'd{i}', speakers, labels, seed=i,
                             absent=absent))
  dev = [make_record('x0', ['P', 'Q'], [0, 0], seed=10),
         make_record('x1', ['Q'], [2], seed=11)]
  return {'train': train, 'dev': dev}


def write(tmp_path, splits=None, name='shards', **kwargs):
  kwargs.setdefault('num_shards', {'train': 3, 'dev': 1})
  return shards.write_shards(tmp_path / name, splits or corpus(),
                             label_names=LABELS, dims=DIMS, **kwargs)


def rewrite_manifest(shard_dir, edit):
  """Edits the manifest as a tool that keeps it consistent would: its checksum resealed."""
  path = shard_dir / 'manifest.json'
  raw = json.loads(path.read_text())
  edit(raw)
  raw[shards.CHECKSUM_KEY] = shards.content_checksum(raw)
  path.write_text(json.dumps(raw))


def test_speaker_ranks():
  np.testing.assert_array_equal(
      shards.speaker_ranks(['Bob', 'Ann', 'Bob', 'Cy', 'Ann']), [0, 1, 0, 2, 1])
  assert shards.speaker_ranks([]).dtype == np.int32


def test_round_trip_keeps_order_and_zeroes_absent_features(tmp_path):
  records = corpus()
  write(tmp_path)
  for split, expected in records.items():
    source = shards.DialogueShardSource(tmp_path / 'shards', split)
    assert len(source) == len(expected)
    for i, want in enumerate(expected):
      want.features = {m: np.where(want.present[m][:, None], x, 0.0)
                       for m, x in want.features.items()}
      assert_records_equal(want, source[i])
  # The absent rows were non-zero on input.
  assert np.all(records['train'][2].features['a'][0] == 0.0)
  assert source[-1].dialogue_id == 'x1'


def test_manifest_fields(tmp_path):
  manifest = write(tmp_path)
  shard_dir = tmp_path / 'shards'
  assert sorted(os.listdir(shard_dir)) == [  # TFDS's metadata too: tests/test_tfds_builder.py
      'dataset_info.json', 'dev-00000-of-00001.array_record', 'features.json', 'manifest.json',
      'metadata.json', 'train-00000-of-00003.array_record', 'train-00001-of-00003.array_record',
      'train-00002-of-00003.array_record']
  assert manifest.format == 'mer_jax.dialogue_shards/v1'
  assert manifest.modalities == ('t', 'a', 'v')
  assert manifest.dims == DIMS and manifest.label_names == LABELS
  train = manifest.splits['train']
  assert train.num_dialogues == 7 and train.num_utterances == 28
  assert train.dialogue_lengths == (1, 2, 3, 4, 5, 6, 7)
  assert train.max_dialogue_len == 7
  # Labels per dialogue: [-1] [0 1] [1 2 -1] [2 -1 0 1] [-1 0 1 2 -1]
  # [0 1 2 -1 0 1] [1 2 -1 0 1 2 -1]: 6 zeros, 8 ones, 6 twos (8 unlabeled).
  assert train.class_counts == (6, 8, 6)
  assert train.missing == {'t': 0, 'a': 1, 'v': 2}
  assert [f.num_records for f in train.files] == [3, 2, 2]
  for entry in train.files:
    data = (shard_dir / entry.name).read_bytes()
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert entry.size == len(data)
  dev = manifest.splits['dev']
  assert dev.class_counts == (2, 0, 1) and dev.dialogue_lengths == (2, 1)
  assert shards.load_manifest(shard_dir) == manifest
  np.testing.assert_array_equal(shards.class_counts(manifest, 'dev'), [2, 0, 1])


def test_crash_while_writing_leaves_nothing(tmp_path):

  def records():
    yield from corpus()['train'][:2]
    raise RuntimeError('feature extractor died')

  with pytest.raises(RuntimeError, match='feature extractor died'):
    write(tmp_path, {'train': records()})
  assert os.listdir(tmp_path) == []


def test_refuses_to_overwrite_unless_asked(tmp_path):
  write(tmp_path)
  with pytest.raises(shards.ShardError, match='overwrite=True'):
    write(tmp_path)
  manifest = write(tmp_path, {'dev': corpus()['dev']}, overwrite=True)
  assert list(manifest.splits) == ['dev']
  assert sorted(os.listdir(tmp_path)) == ['shards']
  assert shards.load_manifest(tmp_path / 'shards').splits.keys() == {'dev'}


def _bad(edit):
  record = make_record('bad', ['Ann', 'Bob'], [0, 1], seed=3)
  edit(record)
  return record


@pytest.mark.parametrize('edit, message', [
    (lambda r: r.features['a'].__setitem__((1, 2), np.nan),
     r"features\['a'\] has NaN/Inf \(utterance 1\)"),
    (lambda r: r.features['v'].__setitem__((0, 0), np.inf),
     r"features\['v'\] has NaN/Inf"),
    (lambda r: setattr(r, 'labels', np.array([0, 3])),
     r'label out of range \[-1, 3\): 3'),
    (lambda r: setattr(r, 'labels', np.array([-2, 0])), 'label out of range'),
    (lambda r: r.features.__setitem__('t', np.zeros((2, 5), np.float32)),
     r"features\['t'\] must be float32\[2, 8\], got float32\[2, 5\]"),
    (lambda r: r.present.__setitem__('t', np.ones(3, bool)),
     r"present\['t'\] must be bool\[2\]"),
    (lambda r: r.present.__setitem__('t', np.ones(2, np.int32)),
     r"present\['t'\] has dtype int32"),
    (lambda r: setattr(r, 'speaker_ids', np.array([0, 0])),
     'speaker_ids do not match'),
    (lambda r: r.transcripts.pop(), 'transcripts must be 2 strings'),
    (lambda r: r.features.pop('v'), "modality 'v' missing"),
    (lambda r: setattr(r, 'labels', np.array([0.0, 1.0])),
     'labels has dtype float64'),
])
def test_write_rejects_bad_record_naming_file_and_record(tmp_path, edit,
                                                         message):
  records = [make_record('ok0', ['A'], [0]), _bad(edit)]
  with pytest.raises(shards.BadRecordError) as info:
    write(tmp_path, {'train': records}, num_shards=1)
  text = str(info.value)
  assert 'train-00000-of-00001.array_record: record 1' in text
  assert "dialogue_id='bad'" in text
  assert re.search(message, text), text
  assert os.listdir(tmp_path) == []


def test_write_rejects_duplicate_dialogue_ids_and_empty_split(tmp_path):
  records = [make_record('same', ['A'], [0]), make_record('same', ['B'], [1])]
  with pytest.raises(shards.BadRecordError,
                     match=r"record 1 .*dialogue_id='same'.*duplicate"):
    write(tmp_path, {'train': records}, num_shards=1)
  with pytest.raises(shards.ShardError, match="split 'dev' has no records"):
    write(tmp_path, {'dev': []}, num_shards=1)
  with pytest.raises(shards.ShardError, match="num_shards for split 'dev'"):
    write(tmp_path, {'dev': corpus()['dev']}, num_shards={'train': 2})
  assert os.listdir(tmp_path) == []


def test_validate_record_wants_zeros_where_absent_and_sane_arguments(
    tmp_path):
  record = make_record('r', ['A', 'B'], [0, 1], absent={'v': [1]})
  with pytest.raises(ValueError,
                     match=r"features\['v'\] are non-zero where not present"):
    shards.validate_record(record, DIMS, num_classes=3)
  with pytest.raises(shards.ShardError, match='dims must map modalities'):
    shards.write_shards(tmp_path / 'x', {'train': [record]}, label_names=LABELS,
                        dims={'t': 0}, num_shards=1)
  with pytest.raises(shards.ShardError, match='label_names must be unique'):
    shards.write_shards(tmp_path / 'x', {'train': [record]},
                        label_names=('a', 'a'), dims=DIMS, num_shards=1)


def test_load_manifest_errors_name_path_and_key(tmp_path):
  with pytest.raises(shards.ShardError, match='shard folder not found: .*nope'):
    shards.load_manifest(tmp_path / 'nope')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(shards.ShardError, match='manifest not found: .*empty'):
    shards.DialogueShardSource(tmp_path / 'empty', 'train')
  write(tmp_path)
  shard_dir = tmp_path / 'shards'
  manifest_path = shard_dir / 'manifest.json'
  good = manifest_path.read_text()

  manifest_path.write_text(good[:-10])
  with pytest.raises(shards.ShardError, match='manifest.json: invalid JSON'):
    shards.load_manifest(shard_dir)

  manifest_path.write_text(good)
  rewrite_manifest(shard_dir, lambda m: m.update(format='other/v9'))
  with pytest.raises(shards.ShardError, match="unsupported format 'other/v9'"):
    shards.load_manifest(shard_dir)

  manifest_path.write_text(good)
  rewrite_manifest(shard_dir,
                   lambda m: m['splits']['train'].pop('class_counts'))
  with pytest.raises(shards.ShardError,
                     match="manifest.json: missing key splits.train.'class_"):
    shards.load_manifest(shard_dir)

  manifest_path.write_text(good)
  rewrite_manifest(shard_dir,
                   lambda m: m['splits']['dev']['files'][0].pop('sha256'))
  with pytest.raises(shards.ShardError,
                     match=r"missing key splits.dev.files\[0\].'sha256'"):
    shards.load_manifest(shard_dir)

  manifest_path.write_text(good)
  rewrite_manifest(shard_dir, lambda m: m['dims'].pop('v'))
  with pytest.raises(shards.ShardError, match="missing key dims.'v'"):
    shards.load_manifest(shard_dir)


def test_source_errors_name_the_file(tmp_path):
  write(tmp_path)
  shard_dir = tmp_path / 'shards'
  with pytest.raises(shards.ShardError, match=(
      r"unknown split 'test'; available: \['dev', 'train'\]")):
    shards.DialogueShardSource(shard_dir, 'test')
  with pytest.raises(shards.ShardError, match=r"unknown modalities \['x'\]"):
    shards.DialogueShardSource(shard_dir, 'dev', modalities=('t', 'x'))

  target = shard_dir / 'train-00001-of-00003.array_record'
  data = target.read_bytes()

  corrupted = bytearray(data)
  corrupted[len(data) // 3] ^= 0xFF
  target.write_bytes(bytes(corrupted))
  with pytest.raises(shards.ShardError,
                     match=f'{target}: sha256 checksum mismatch'):
    shards.DialogueShardSource(shard_dir, 'train')

  target.write_bytes(data[:len(data) // 2])
  with pytest.raises(shards.ShardError, match=f'{target}: size .* differs'):
    shards.DialogueShardSource(shard_dir, 'train', verify_checksums=False)

  # Same size as the manifest says, but the end of the file is gone.
  target.write_bytes(data[:len(data) // 2].ljust(len(data), b'\0'))
  with pytest.raises(shards.ShardError,
                     match=f'{target}: unreadable ArrayRecord file'):
    shards.DialogueShardSource(shard_dir, 'train', verify_checksums=False)

  target.unlink()
  with pytest.raises(shards.ShardError, match=f'shard file missing: {target}'):
    shards.DialogueShardSource(shard_dir, 'train')


def write_raw_file(shard_dir, split, name, payloads):
  """Rewrites a shard file with raw payloads and fixes size/sha256."""
  path = shard_dir / name
  writer = array_record_module.ArrayRecordWriter(str(path), 'group_size:1')
  for payload in payloads:
    writer.write(payload)
  writer.close()

  def fix(manifest):
    for entry in manifest['splits'][split]['files']:
      if entry['name'] == name:
        entry['size'] = path.stat().st_size
        entry['sha256'] = hashlib.sha256(path.read_bytes()).hexdigest()

  rewrite_manifest(shard_dir, fix)


def test_bad_record_at_read_time_and_skip_mode(tmp_path, caplog):
  write(tmp_path)
  shard_dir = tmp_path / 'shards'
  written = shards.DialogueShardSource(shard_dir, 'train')
  records = [written[i] for i in range(7)]
  # File 1 of 3 holds global records 1 and 4; spoil d4 (position 1) with NaN.
  nan_record = make_record('d4', ['Ann', 'Bob', 'Ann', 'Cy', 'Bob'],
                           [0, 1, 2, 0, 1], seed=4)
  nan_record.features['t'][3, 0] = np.nan
  write_raw_file(shard_dir, 'train', 'train-00001-of-00003.array_record',
                 [shards.encode_record(records[1]),
                  shards.encode_record(nan_record)])
  # File 2 holds records 2 and 5; replace d2 with bytes that are not msgpack.
  write_raw_file(shard_dir, 'train', 'train-00002-of-00003.array_record',
                 [b'\xc1garbage', shards.encode_record(records[5])])

  source = shards.DialogueShardSource(shard_dir, 'train')
  assert source[1].dialogue_id == 'd1'
  with pytest.raises(shards.BadRecordError) as info:
    source[4]
  assert str(info.value).startswith(
      f"{shard_dir / 'train-00001-of-00003.array_record'}: record 1 "
      "(dialogue_id='d4'): features['t'] has NaN/Inf (utterance 3)")
  with pytest.raises(shards.BadRecordError,
                     match=r"00002-of-00003.array_record: record 0 \(dialogue_"
                     r"id=None\): undecodable record"):
    source[2]

  with caplog.at_level('WARNING'):
    skipping = shards.DialogueShardSource(shard_dir, 'train',
                                          on_bad_record='skip')
  assert skipping.num_skipped == 2 and len(skipping) == 5
  assert [(s.file, s.index, s.dialogue_id) for s in skipping.skipped] == [
      ('train-00002-of-00003.array_record', 0, None),
      ('train-00001-of-00003.array_record', 1, 'd4')]
  assert 'NaN/Inf' in skipping.skipped[1].reason
  assert 'skipped 2 of 7 bad records' in caplog.text
  assert [skipping[i].dialogue_id for i in range(5)] == [
      'd0', 'd1', 'd3', 'd5', 'd6']
  np.testing.assert_array_equal(skipping.dialogue_lengths, [1, 2, 4, 6, 7])
  assert skipping.dialogue_lengths.dtype == np.int32
  good_labels = np.concatenate([records[i].labels for i in (0, 1, 3, 5, 6)])
  np.testing.assert_array_equal(
      shards.class_counts(skipping),
      np.bincount(good_labels[good_labels >= 0], minlength=3))
  assert 'num_skipped=2' in repr(skipping)


def test_modality_subset_pickle_and_grain(tmp_path):
  records = corpus()['train']
  write(tmp_path)
  source = shards.DialogueShardSource(tmp_path / 'shards', 'train',
                                      modalities=('v', 't'))
  record = source[3]
  assert list(record.features) == ['v', 't'] == list(record.present)
  np.testing.assert_array_equal(record.features['t'], records[3].features['t'])
  assert repr(source).startswith('DialogueShardSource(shard_dir=')
  assert "split='train', num_records=7" in repr(source)

  clone = pickle.loads(pickle.dumps(source))
  assert all(r is None for r in clone._readers)  # reopened lazily
  assert_records_equal(clone[6], source[6])

  dataset = grain.MapDataset.source(source)
  assert len(dataset) == 7
  assert dataset[5].dialogue_id == 'd5'
  lengths = list(dataset.map(lambda r: r.num_utterances))
  assert lengths == [1, 2, 3, 4, 5, 6, 7]
  np.testing.assert_array_equal(source.dialogue_lengths, lengths)


def test_decoding_a_meld_sized_dialogue_is_fast(tmp_path):
  rng = np.random.default_rng(0)
  n, dims = 10, {'t': 1024, 'a': 1024, 'v': 768}
  speakers = ['A', 'B'] * 5
  record = shards.DialogueRecord(
      dialogue_id='meld', utterance_ids=np.arange(n, dtype=np.int32),
      speakers=speakers, speaker_ids=shards.speaker_ranks(speakers),
      labels=np.zeros(n, np.int32), transcripts=['hi'] * n,
      features={m: rng.normal(size=(n, d)).astype(np.float32)
                for m, d in dims.items()},
      present={m: np.ones(n, bool) for m in dims})
  data = shards.encode_record(record)
  timings = []
  for _ in range(30):
    start = time.perf_counter()
    decoded = shards.decode_record(data)
    shards.validate_record(decoded, dims, 7)
    timings.append(time.perf_counter() - start)
  assert np.median(timings) < 1e-3
  assert_records_equal(record, decoded)
  assert not decoded.features['t'].flags.writeable  # zero-copy view

  shards.write_shards(tmp_path / 'meld', {'train': [record]},
                      label_names=[str(i) for i in range(7)], dims=dims,
                      num_shards=1)
  source = shards.DialogueShardSource(tmp_path / 'meld', 'train')
  start = time.perf_counter()
  for _ in range(20):
    source[0]
  assert (time.perf_counter() - start) / 20 < 5e-3


def test_record_cache_serves_validated_records_from_memory(tmp_path):
  write(tmp_path)
  shard_dir = tmp_path / 'shards'
  split_bytes = 4 * sum(range(1, 8)) * sum(DIMS.values())  # train: 28 utterances
  uncached = shards.DialogueShardSource(shard_dir, 'train')
  too_small = shards.DialogueShardSource(shard_dir, 'train', cache_max_bytes=split_bytes - 1)
  cached = shards.DialogueShardSource(shard_dir, 'train', cache_max_bytes=split_bytes)
  assert not uncached.caches_records and not too_small.caches_records
  assert cached.caches_records
  assert uncached[3] is not uncached[3]
  first = cached[3]
  assert cached[3] is first  # decoded once
  assert_records_equal(first, uncached[3])
  assert not first.features['t'].flags.writeable
  with pytest.raises(ValueError, match='read-only'):
    first.features['a'][0, 0] = 0.0
  clone = pickle.loads(pickle.dumps(cached))
  assert clone.caches_records and clone[3] is not first
  assert_records_equal(clone[3], first)

  # A bad record is never cached: every read raises, naming the file and record.
  records = [uncached[i] for i in range(7)]
  nan_record = make_record('d4', ['Ann', 'Bob', 'Ann', 'Cy', 'Bob'], [0, 1, 2, 0, 1], seed=4)
  nan_record.features['v'][1, 2] = np.inf
  write_raw_file(shard_dir, 'train', 'train-00001-of-00003.array_record',
                 [shards.encode_record(records[1]), shards.encode_record(nan_record)])
  cached = shards.DialogueShardSource(shard_dir, 'train', cache_max_bytes=split_bytes)
  for _ in range(2):
    with pytest.raises(shards.BadRecordError, match=r'00001-of-00003.array_record: record 1 '
                       r"\(dialogue_id='d4'\)"):
      cached[4]
  skipping = shards.DialogueShardSource(shard_dir, 'train', on_bad_record='skip',
                                        cache_max_bytes=split_bytes)
  assert skipping.num_skipped == 1
  assert [skipping[i].dialogue_id for i in range(6)] == ['d0', 'd1', 'd2', 'd3', 'd5', 'd6']
  assert skipping[3] is skipping[3]
