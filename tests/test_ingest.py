"""python -m mer_jax.ingest: the lineage's pickles (Python 3 and Python 2 variants), COSMIC's,
tables, the dev carve-out, every structural error, the restricted unpickler, and training input."""

import collections
import csv
import io
import os
import pickle
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

from configs import iemocap as iemocap_config
from configs import meld as meld_config
from mer_jax import batch_contract
from mer_jax import errors
from mer_jax import ingest
from mer_jax.config_validation import validate_config
from mer_jax.data import pipeline
from mer_jax.data import shards
from mer_jax.ingest import unpickle
from mer_jax.run import corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIMS = {'t': 5, 'a': 4, 'v': 3}
IEMOCAP_LABELS = ('happiness', 'sadness', 'neutral', 'anger', 'excited', 'frustration')
MELD_LABELS = ('neutral', 'surprise', 'fear', 'sadness', 'joy', 'disgust', 'anger')


# ---------------------------------------------------------------------------
# Source files with the real layouts, small and random.


def dialogue_lengths(rng, count):
  return [int(n) for n in rng.integers(1, 7, size=count)]


def features_of(rng, n, d, style):
  """One dialogue's features in one of the shapes the real files use."""
  rows = rng.normal(size=(n, d)).astype(np.float32)
  if style == 'array':
    return rows
  if style == 'vectors':
    return [r for r in rows]
  return [[float(x) for x in r] for r in rows]


def iemocap_items(seed=0, num_dialogues=8, sets=False):
  """The 9 items of IEMOCAP_features.pkl (DialogueRNN lineage)."""
  rng = np.random.default_rng(seed)
  ids = [f'Ses0{k // 2 + 1}{"FM"[k % 2]}_impro0{k}' for k in range(num_dialogues)]
  lengths = dict(zip(ids, dialogue_lengths(rng, num_dialogues)))
  video_ids = {v: [f'{v}_{i:03d}' for i in range(n)] for v, n in lengths.items()}
  speakers = {v: [str(rng.choice(['M', 'F'])) for _ in range(n)] for v, n in lengths.items()}
  labels = {v: [int(x) for x in rng.integers(0, 6, size=n)] for v, n in lengths.items()}
  text = {v: features_of(rng, n, DIMS['t'], 'vectors') for v, n in lengths.items()}
  audio = {v: features_of(rng, n, DIMS['a'], 'array') for v, n in lengths.items()}
  visual = {v: features_of(rng, n, DIMS['v'], 'lists') for v, n in lengths.items()}
  sentences = {v: [f'utterance {i} of {v}, café' for i in range(n)] for v, n in lengths.items()}
  train, test = ids[:6], ids[6:]
  if sets:
    train, test = set(train), set(test)
  return [video_ids, speakers, labels, text, audio, visual, sentences, train, test]


def meld_items(seed=1, num_dialogues=7):
  """The 10 items of MELD_features_raw1.pkl (MMGCN): one-hot speakers, int dialogue ids."""
  rng = np.random.default_rng(seed)
  ids = list(range(num_dialogues))
  lengths = dict(zip(ids, dialogue_lengths(rng, num_dialogues)))
  one_hot = lambda k: [1.0 if j == k else 0.0 for j in range(9)]
  items = [
      {v: [f'utt{i}' for i in range(n)] for v, n in lengths.items()},
      {v: [one_hot(int(rng.integers(9))) for _ in range(n)] for v, n in lengths.items()},
      {v: [int(x) for x in rng.integers(0, 7, size=n)] for v, n in lengths.items()},
      {v: features_of(rng, n, DIMS['t'], 'vectors') for v, n in lengths.items()},
      {v: features_of(rng, n, DIMS['a'], 'vectors') for v, n in lengths.items()},
      {v: features_of(rng, n, DIMS['v'], 'array') for v, n in lengths.items()},
      {v: [f'line {i}' for i in range(n)] for v, n in lengths.items()},
      ids[:5], ids[5:],
      {v: [0] * n for v, n in lengths.items()},
  ]
  return items


def cosmic_items(lineage, dataset):
  """COSMIC's RoBERTa pickle for the dialogues of a lineage file (same ids, labels, speakers)."""
  rng = np.random.default_rng(7)
  _, speakers, labels, _, _, _, sentences, train, test = lineage[:9]
  train = sorted(train, key=str)
  lengths = {v: len(labels[v]) for v in labels}
  layers = [{v: features_of(rng, n, 6, 'vectors') for v, n in lengths.items()} for _ in range(4)]
  dev, train = train[:2], train[2:]
  if dataset == 'iemocap':
    return [speakers, labels, *layers, sentences, train, sorted(test, key=str), dev]
  sentiment = {v: [1] * n for v, n in lengths.items()}
  return [speakers, labels, sentiment, *layers, sentences, train, sorted(test, key=str), dev]


class Python2Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Writes bytes as Python 2 `str` opcodes, as pickles made by Python 2 hold them."""

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def save_py2_str(self, obj):
    if len(obj) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
    else:
      self.write(pickle.BINSTRING + struct.pack('<i', len(obj)) + obj)
    self.memoize(obj)

  dispatch[bytes] = save_py2_str


def as_python2(obj):
  """Strings as UTF-8 bytes (Python 2 `str`), containers rebuilt."""
  if isinstance(obj, str):
    return obj.encode('utf-8')
  if isinstance(obj, dict):
    return {as_python2(k): as_python2(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple, set)):
    return type(obj)(as_python2(v) for v in obj)
  return obj


def write_pickle(path, items, variant='py3'):
  """`items` pickled as Python 3 does (protocol 4), or as a Python 2 pickle (protocol 2, str
  as bytes, numpy 1's module names)."""
  if variant == 'py3':
    data = pickle.dumps(items, protocol=4)
  else:
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(as_python2(items))
    data = buffer.getvalue().replace(b'numpy._core.multiarray\n', b'numpy.core.multiarray\n')
    assert b'cnumpy.core.multiarray\n_reconstruct\n' in data and pickle.SHORT_BINSTRING in data
  with open(path, 'wb') as f:
    f.write(data)
  return str(path)


def read_back(out):
  """dialogue id -> (split, record) of a shard folder."""
  manifest = shards.load_manifest(out)
  found = {}
  for split in manifest.splits:
    source = shards.DialogueShardSource(out, split)
    for i in range(len(source)):
      record = source[i]
      assert record.dialogue_id not in found
      found[record.dialogue_id] = (split, record)
  return manifest, found


def assert_lineage_round_trip(items, out, label_names, fields_of_modality):
  manifest, found = read_back(out)
  assert manifest.label_names == label_names
  assert manifest.dims == DIMS
  video_ids, speakers, labels, *_ = items
  sentences, train, test = items[6], items[7], items[8]
  assert {d for d, (s, _) in found.items() if s == 'test'} == {str(v) for v in test}
  assert {d for d, (s, _) in found.items() if s in ('train', 'dev')} == {str(v) for v in train}
  assert set(manifest.splits) == {'train', 'dev', 'test'}
  for vid in video_ids:
    _, record = found[str(vid)]
    np.testing.assert_array_equal(record.labels, labels[vid])
    assert record.transcripts == sentences[vid]
    for m, k in fields_of_modality.items():
      np.testing.assert_allclose(record.features[m], np.asarray(items[k][vid], np.float32))
      assert record.present[m].all()
    expected = [s if isinstance(s, str) else f'speaker{int(np.argmax(s))}'
                for s in speakers[vid]]
    assert record.speakers == expected
    np.testing.assert_array_equal(record.speaker_ids, shards.speaker_ranks(expected))


# ---------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize('variant', ['py3', 'py2'])
def test_dialoguernn_iemocap_round_trip(tmp_path, variant):
  items = iemocap_items(sets=variant == 'py2')
  src = write_pickle(tmp_path / 'IEMOCAP_features.pkl', items, variant)
  manifest = ingest.ingest('dialoguernn', src, tmp_path / 'out')
  assert manifest.splits['dev'].num_dialogues == 1  # round(0.1 * 6), at least one
  assert_lineage_round_trip(items, tmp_path / 'out', IEMOCAP_LABELS, {'t': 3, 'a': 4, 'v': 5})
  _, found = read_back(tmp_path / 'out')
  assert 'café' in found['Ses01F_impro00'][1].transcripts[0]  # UTF-8 of a Python 2 str repaired


@pytest.mark.parametrize('variant', ['py3', 'py2'])
def test_dialoguernn_meld_round_trip(tmp_path, variant):
  items = meld_items()
  src = write_pickle(tmp_path / 'MELD_features_raw1.pkl', items, variant)
  ingest.ingest('dialoguernn', src, tmp_path / 'out', dataset='meld')
  assert_lineage_round_trip(items, tmp_path / 'out', MELD_LABELS, {'t': 3, 'a': 4, 'v': 5})


@pytest.mark.parametrize('dataset,lineage', [('iemocap', iemocap_items), ('meld', meld_items)])
@pytest.mark.parametrize('layers', ['mean', 'concat', 'roberta2'])
def test_cosmic_alone_and_merged(tmp_path, dataset, lineage, layers):
  base = lineage()
  items = cosmic_items(base, dataset)
  src = write_pickle(tmp_path / f'{dataset}_features_roberta.pkl', items, 'py2')
  rnn = write_pickle(tmp_path / 'lineage.pkl', base)
  ingest.ingest('cosmic', src, tmp_path / 'alone', text_layers=layers)
  ingest.ingest('cosmic', src, tmp_path / 'merged', audio_visual_from=rnn)
  first_layer = 2 if dataset == 'iemocap' else 3  # MELD's sentiment labels come first
  layer_items = items[first_layer:first_layer + 4]
  manifest, found = read_back(tmp_path / 'alone')
  assert manifest.modalities == ('t',)
  assert manifest.dims == {'t': {'mean': 6, 'concat': 24, 'roberta2': 6}[layers]}
  splits = dict(zip(('train', 'test', 'dev'), items[-3:]))
  for split, ids in splits.items():
    assert [found[str(v)][0] for v in ids] == [split] * len(ids)
    for vid in ids:
      record = found[str(vid)][1]
      np.testing.assert_array_equal(record.labels, items[1][vid])
      stacked = [np.asarray(layer[vid], np.float32) for layer in layer_items]
      want = {'mean': np.mean(stacked, axis=0), 'concat': np.concatenate(stacked, axis=1),
              'roberta2': stacked[1]}[layers]
      np.testing.assert_allclose(record.features['t'], want, rtol=1e-6)
  manifest, merged = read_back(tmp_path / 'merged')
  assert manifest.dims == {'t': 6, 'a': DIMS['a'], 'v': DIMS['v']}
  for vid in base[2]:
    np.testing.assert_allclose(merged[str(vid)][1].features['a'],
                               np.asarray(base[4][vid], np.float32))
    np.testing.assert_allclose(merged[str(vid)][1].features['v'],
                               np.asarray(base[5][vid], np.float32))


def test_cosmic_merge_refuses_a_file_of_other_dialogues(tmp_path):
  base = iemocap_items()
  src = write_pickle(tmp_path / 'cosmic.pkl', cosmic_items(base, 'iemocap'))
  other = iemocap_items()
  vid = other[7][0]
  other[2][vid] = [(x + 1) % 6 for x in other[2][vid]]
  rnn = write_pickle(tmp_path / 'other.pkl', other)
  with pytest.raises(ingest.IngestError, match=rf"dialogue '{vid}': labels differ from"):
    ingest.ingest('cosmic', src, tmp_path / 'out', audio_visual_from=rnn)
  del other[2][vid]
  rnn = write_pickle(tmp_path / 'other.pkl', other)
  with pytest.raises(ingest.IngestError, match=rf"dialogue '{vid}': not in .*other.pkl"):
    ingest.ingest('cosmic', src, tmp_path / 'out', audio_visual_from=rnn)
  assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------------------
# Tables.


def write_index(path, rows, header=('dialogue', 'utterance', 'speaker', 'label', 'split', 'text',
                                    'uid')):
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def table_rows(num_dialogues=6, seed=3, dev=True):
  """Index rows (shuffled, utterances out of order) and per-row features."""
  rng = np.random.default_rng(seed)
  rows = []
  for d in range(num_dialogues):
    split = 'test' if d >= num_dialogues - 2 else ('valid' if dev and d == 0 else 'train')
    for u in range(int(rng.integers(1, 5))):
      rows.append([f'ep{d}', u, f'p{int(rng.integers(3))}', str(rng.choice(['joy', 'calm', ''])),
                   split, f'text {d}.{u}', f'id-{d}-{u}'])
  order = rng.permutation(len(rows))
  rows = [rows[i] for i in order]
  feats = {m: rng.normal(size=(len(rows), d)).astype(np.float32) for m, d in DIMS.items()}
  return rows, feats


def check_tables(out, rows, feats, label_names):
  manifest, found = read_back(out)
  assert manifest.label_names == label_names
  for i, row in enumerate(rows):
    dialogue, utterance, speaker, label, split, text, _ = row
    want_split = {'valid': 'dev'}.get(split, split)
    got_split, record = found[dialogue]
    if want_split != 'train':
      assert got_split == want_split
    at = list(record.utterance_ids).index(utterance)
    assert record.speakers[at] == speaker and record.transcripts[at] == text
    assert record.labels[at] == (label_names.index(label) if label else -1)
    for m in feats:
      np.testing.assert_array_equal(record.features[m][at], feats[m][i])
    assert list(record.utterance_ids) == sorted(record.utterance_ids)


def test_tables_aligned_npy_csv_and_npz(tmp_path):
  rows, feats = table_rows()
  index = write_index(tmp_path / 'index.csv', rows)
  np.save(tmp_path / 't.npy', feats['t'])
  np.savez(tmp_path / 'a.npz', feats['a'])
  with open(tmp_path / 'v.csv', 'w', newline='') as f:
    csv.writer(f).writerows([['v0', 'v1', 'v2']] + feats['v'].tolist())
  ingest.ingest('tables', index, tmp_path / 'out', features={
      't': tmp_path / 't.npy', 'a': tmp_path / 'a.npz', 'v': tmp_path / 'v.csv'})
  check_tables(tmp_path / 'out', rows, feats, ('calm', 'joy'))


def test_tables_keyed_rows_and_columns_by_flag(tmp_path):
  rows, feats = table_rows(dev=False)
  header = ('Season', 'Utt', 'Who', 'Emotion', 'Part', 'Line', 'uid')
  rows = [[r[0][:2], r[0][2:]] + r[1:] for r in rows]  # the dialogue is two columns
  index = write_index(tmp_path / 'index.csv', rows, ('Show', 'Season') + header[1:])
  order = np.random.default_rng(0).permutation(len(rows))  # keyed files in their own order
  ids = [rows[i][-1] for i in order]
  np.savez(tmp_path / 't.npz', ids=np.asarray(ids), features=feats['t'][order])
  np.savez(tmp_path / 'a.npz', **{rows[i][-1]: feats['a'][i] for i in order})
  with open(tmp_path / 'v.csv', 'w', newline='') as f:
    csv.writer(f).writerows([['x0', 'uid', 'x1', 'x2']] + [
        [feats['v'][i][0], rows[i][-1], *feats['v'][i][1:]] for i in order])
  columns = ingest.Columns(dialogue=('Show', 'Season'), utterance='Utt', speaker='Who',
                           label='Emotion', split='Part', text='Line', id='uid')
  manifest = ingest.ingest(
      'tables', index, tmp_path / 'out', columns=columns, label_names=('joy', 'calm', 'anger'),
      features={'t': tmp_path / 't.npz', 'a': tmp_path / 'a.npz', 'v': tmp_path / 'v.csv'})
  assert manifest.splits['dev'].num_dialogues == 1  # carved: the index has no dev rows
  flat = [[r[0] + '/' + r[1]] + r[2:] for r in rows]
  check_tables(tmp_path / 'out', flat, feats, ('joy', 'calm', 'anger'))


def test_tables_missing_rows_marked_absent(tmp_path):
  rows, feats = table_rows()
  index = write_index(tmp_path / 'index.csv', rows)
  keep = list(range(1, len(rows)))
  np.savez(tmp_path / 'a.npz', ids=np.asarray([rows[i][-1] for i in keep]),
           features=feats['a'][keep])
  text = feats['t'].copy()
  text[2] = np.nan
  np.save(tmp_path / 't.npy', text)
  files = {'t': tmp_path / 't.npy', 'a': tmp_path / 'a.npz'}
  with pytest.raises(ingest.IngestError, match=rf"dialogue '{rows[0][0]}' utterance "
                     rf"{rows[0][1]} .*a features: id '{rows[0][-1]}' is not in"):
    ingest.ingest('tables', index, tmp_path / 'out', features=files,
                  columns=ingest.Columns(id='uid'))
  ingest.ingest('tables', index, tmp_path / 'out', features=files,
                columns=ingest.Columns(id='uid'), missing='absent')
  _, found = read_back(tmp_path / 'out')
  for i, m in ((0, 'a'), (2, 't')):
    record = found[rows[i][0]][1]
    at = list(record.utterance_ids).index(rows[i][1])
    assert not record.present[m][at] and not record.features[m][at].any()
  assert sum(int((~r.present['a']).sum()) for _, r in found.values()) == 1


# ---------------------------------------------------------------------------
# The dev carve-out.


def test_dev_carve_out_is_seeded_by_dialogue_and_documented_head(tmp_path):
  items = iemocap_items(num_dialogues=24)
  every = list(items[2])
  items[7], items[8] = every[:20], every[20:]
  src = write_pickle(tmp_path / 'f.pkl', items)

  def dev_ids(name, **how):
    ingest.ingest('dialoguernn', src, tmp_path / name, dev=ingest.DevCarveOut(**how))
    _, found = read_back(tmp_path / name)
    return [d for d, (s, _) in found.items() if s == 'dev']

  first = dev_ids('a', fraction=0.25, seed=5)
  assert len(first) == 5 and set(first) <= set(items[7])
  assert dev_ids('b', fraction=0.25, seed=5) == first
  assert dev_ids('c', fraction=0.25, seed=6) != first
  assert dev_ids('d', fraction=0.25, pick='head') == items[7][:5]  # MMGCN's first 10% style
  _, found = read_back(tmp_path / 'a')
  for d in first:  # whole dialogues move
    assert found[d][1].num_utterances == len(items[2][d])
  with pytest.raises(ingest.IngestError, match='dev_fraction must be in'):
    ingest.ingest('dialoguernn', src, tmp_path / 'e', dev=ingest.DevCarveOut(fraction=1.0))


# ---------------------------------------------------------------------------
# Structural errors: each names the file, the dialogue and the field; nothing is written.

VID = 'Ses02F_impro02'


def drop_last_audio_row(items):
  items[4][VID] = items[4][VID][:-1]


def nan_in_text(items):
  items[3][VID][0] = np.full(DIMS['t'], np.nan, np.float32)


def unknown_label(items):
  items[2][VID][0] = 6


def wider_audio(items):
  items[4][VID] = np.zeros((len(items[2][VID]), DIMS['a'] + 1), np.float32)


def one_sentence_short(items):
  items[6][VID] = items[6][VID][:-1] if len(items[6][VID]) > 1 else []


def in_train_and_test(items):
  items[8] = list(items[8]) + [VID]


def missing_visual(items):
  del items[5][VID]


def ghost_in_test(items):
  items[8] = list(items[8]) + ['Ses09_ghost']


def non_numeric_text(items):
  items[3][VID] = [f'x{i}' for i in range(len(items[2][VID]))]


STRUCTURAL = [
    (drop_last_audio_row, VID, r'videoAudio has \d+ rows for \d+ utterances'),
    (nan_in_text, VID, 'videoText utterance 0 has NaN or Inf'),
    (unknown_label, VID, r'videoLabels utterance 0 6 is not a class index 0\.\.5 \(happiness'),
    (wider_audio, VID, 'videoAudio has 5 features per utterance, .* has 4'),
    (one_sentence_short, VID, r'videoSentence has \d+ items, videoLabels has \d+'),
    (in_train_and_test, VID, "listed in split 'test' and in 'train'"),
    (missing_visual, VID, 'missing from videoVisual'),
    (ghost_in_test, 'Ses09_ghost', 'missing from videoLabels'),
    (non_numeric_text, VID, 'videoText utterance 0 is not a vector of numbers'),
]


@pytest.mark.parametrize('mutate,dialogue,message', STRUCTURAL,
                         ids=[m[0].__name__ for m in STRUCTURAL])
def test_structural_errors_name_dialogue_and_field(tmp_path, mutate, dialogue, message):
  items = iemocap_items()
  assert VID in items[2]
  mutate(items)
  src = write_pickle(tmp_path / 'IEMOCAP_features.pkl', items)
  with pytest.raises(ingest.IngestError) as e:
    ingest.ingest('dialoguernn', src, tmp_path / 'out')
  text = str(e.value)
  assert '\n' not in text and text.startswith(src)
  assert f'dialogue {dialogue!r}' in text
  assert re.search(message, text), text
  assert not (tmp_path / 'out').exists()
  assert os.listdir(tmp_path) == ['IEMOCAP_features.pkl']  # no temporary folder left either


def test_wrong_tuple_lengths_and_types(tmp_path):
  items = iemocap_items()
  src = write_pickle(tmp_path / 'f.pkl', items[:8])
  with pytest.raises(ingest.IngestError, match=r'holds 8 items; a dialoguernn file holds '
                     r'iemocap: 9; meld: 10'):
    ingest.ingest('dialoguernn', src, tmp_path / 'out')
  src = write_pickle(tmp_path / 'f.pkl', items)
  with pytest.raises(ingest.IngestError, match=r'holds 9 items; a dialoguernn meld file holds 10 '
                     r'\(videoIDs, videoSpeakers'):
    ingest.ingest('dialoguernn', src, tmp_path / 'out', dataset='meld')
  with pytest.raises(ingest.IngestError, match=r'holds 9 items; a cosmic file holds iemocap: 10'):
    ingest.ingest('cosmic', src, tmp_path / 'out')
  items[4] = list(items[4].values())
  src = write_pickle(tmp_path / 'f.pkl', items)
  with pytest.raises(ingest.IngestError, match='videoAudio is a list, expected a dict keyed by '
                     'dialogue id'):
    ingest.ingest('dialoguernn', src, tmp_path / 'out')
  src = write_pickle(tmp_path / 'f.pkl', {'not': 'a list'})
  with pytest.raises(ingest.IngestError, match='holds a dict, expected the list'):
    ingest.ingest('dialoguernn', src, tmp_path / 'out')
  assert not (tmp_path / 'out').exists()


def test_meld_speakers_must_be_one_hot(tmp_path):
  items = meld_items()
  items[1][3][0] = [0.0] * 9
  src = write_pickle(tmp_path / 'm.pkl', items)
  with pytest.raises(ingest.IngestError, match=r"dialogue 3: videoSpeakers utterance 0 .* is "
                     'neither a name nor a one-hot vector'):
    ingest.ingest('dialoguernn', src, tmp_path / 'out')


def test_tables_errors_name_dialogue_and_field(tmp_path):
  rows, feats = table_rows()
  np.save(tmp_path / 't.npy', feats['t'])
  files = {'t': tmp_path / 't.npy'}

  def refused(rows, match, **options):
    index = write_index(tmp_path / 'index.csv', rows)
    with pytest.raises(ingest.IngestError, match=match):
      ingest.ingest('tables', index, tmp_path / 'out', features=files, **options)
    assert not (tmp_path / 'out').exists()

  d = rows[0][0]
  refused(rows, rf"dialogue '{d}' utterance {rows[0][1]} \(line 2\): label '.*' is not one of "
          r"\['anger'\]", label_names=('anger',))
  long = next(r[0] for r in rows if sum(x[0] == r[0] for x in rows) > 1)
  moved = [list(r) for r in rows]
  last = max(i for i, r in enumerate(rows) if r[0] == long)
  moved[last][4] = 'test' if moved[last][4] != 'test' else 'train'
  refused(moved, rf"dialogue '{long}': split has several values")
  twice = [list(r) for r in rows] + [list(rows[0])]
  np.save(tmp_path / 't.npy', np.concatenate([feats['t'], feats['t'][:1]]))
  refused(twice, rf"dialogue '{d}': utterance {rows[0][1]} appears twice")
  np.save(tmp_path / 't.npy', feats['t'][:-1])
  refused(rows, rf't.npy: {len(rows) - 1} rows, .*index.csv has {len(rows)}')
  nan = feats['t'].copy()
  nan[0, 1] = np.nan
  np.save(tmp_path / 't.npy', nan)
  refused(rows, rf"dialogue '{d}' utterance {rows[0][1]} \(line 2\): t features .* have NaN")
  np.save(tmp_path / 't.npy', feats['t'])
  bad_split = [list(r) for r in rows]
  bad_split[0][4] = 'holdout'
  refused(bad_split, rf"line 2 \(dialogue '{d}'\): split 'holdout' is not train, dev")
  refused(rows, "no column 'episode' \\(dialogue_column\\)", columns=ingest.Columns(
      dialogue=('episode',)))


def test_out_dir_with_content_is_refused_before_reading(tmp_path):
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'keep.txt').write_text('x')
  with pytest.raises(ingest.IngestError, match='already exists and is not empty'):
    ingest.ingest('dialoguernn', tmp_path / 'no_such.pkl', tmp_path / 'out')
  assert os.listdir(tmp_path / 'out') == ['keep.txt']


# ---------------------------------------------------------------------------
# Untrusted pickles.


class RunsCode:
  """Unpickling this calls os.system: the payload a malicious feature file would carry."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


class CallsEval:

  def __reduce__(self):
    return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_malicious_pickle_is_refused_without_running_its_payload(tmp_path, protocol):
  marker = tmp_path / 'pwned'
  items = iemocap_items()
  items[3]['Ses01F_impro00'] = RunsCode(marker)  # hidden inside an allowed container
  src = tmp_path / 'IEMOCAP_features.pkl'
  src.write_bytes(pickle.dumps(items, protocol=protocol))
  with pytest.raises(unpickle.PickleRefusedError) as e:
    ingest.ingest('dialoguernn', src, tmp_path / 'out')
  assert not marker.exists()
  message = str(e.value)
  assert message.startswith(f'{src}: refused to load the global ') and '\n' not in message
  assert f'{os.system.__module__}.system' in message
  assert isinstance(e.value, errors.UserError)
  assert not (tmp_path / 'out').exists()
  src.write_bytes(pickle.dumps([CallsEval()], protocol=protocol))
  with pytest.raises(unpickle.PickleRefusedError, match=r'(__builtin__|builtins)\.eval'):
    unpickle.load(src)


def test_unpickler_loads_numpy_and_containers_only(tmp_path):
  value = [np.arange(6, dtype=np.float32).reshape(2, 3), np.float64(2.5), np.int64(3), {1, 2},
           collections.OrderedDict(a=1), collections.defaultdict(list, b=[1]), b'raw', (1, 'x')]
  for protocol in (2, 4, 5):
    path = tmp_path / f'ok{protocol}.pkl'
    path.write_bytes(pickle.dumps(value, protocol=protocol))
    loaded = unpickle.load(path)
    np.testing.assert_array_equal(loaded[0], value[0])
    assert loaded[1:] == value[1:]
  path = tmp_path / 'codec.pkl'
  path.write_bytes(b'\x80\x02c_codecs\nencode\nq\x00X\x01\x00\x00\x00aX\x04\x00\x00\x00zlib'
                   b'\x86R.')
  with pytest.raises(unpickle.BadPickleError, match="refused _codecs.encode with encoding 'zlib'"):
    unpickle.load(path)
  path.write_bytes(b'not a pickle at all')
  with pytest.raises(unpickle.BadPickleError, match='not a readable pickle'):
    unpickle.load(path)


# ---------------------------------------------------------------------------
# The command line, and training input.


def run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'mer_jax.ingest', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120, check=False)


def test_cli_help_success_and_one_line_errors(tmp_path):
  shown = run_cli('--help')
  assert shown.returncode == 0 and 'dialoguernn' in shown.stdout and '--dev_fraction' in (
      shown.stdout)
  src = write_pickle(tmp_path / 'IEMOCAP_features.pkl', iemocap_items())
  done = run_cli('dialoguernn', '--input', src, '--out', str(tmp_path / 'out'), '--dev_seed=3')
  assert done.returncode == 0, done.stderr
  assert 'configs/iemocap.py:shards=' in done.stdout
  assert shards.load_manifest(tmp_path / 'out').label_names == IEMOCAP_LABELS
  marker = tmp_path / 'pwned'
  (tmp_path / 'evil.pkl').write_bytes(pickle.dumps([RunsCode(marker)]))
  for args, expected in (
      (['dialoguernn', '--input', str(tmp_path / 'evil.pkl'), '--out', str(tmp_path / 'o2')],
       'refused to load the global'),
      (['dialoguernn', '--input', src, '--out', str(tmp_path / 'out')], 'already exists'),
      (['--input', src, '--out', str(tmp_path / 'o3')], 'give one FORMAT'),
      (['pkl', '--input', src, '--out', str(tmp_path / 'o3')], "unknown format 'pkl'"),
      (['tables', '--input', src, '--out', str(tmp_path / 'o3'), '--features', 'x'],
       "--features 'x': expected MODALITY=PATH"),
      (['dialoguernn', '--input', src, '--out', str(tmp_path / 'o3'), '--dev_pick=middle'],
       'dev_pick'),
  ):
    failed = run_cli(*args)
    assert failed.returncode == errors.EXIT_USER_ERROR, (args, failed.stderr)
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and expected in lines[0], lines
  assert not marker.exists() and not (tmp_path / 'o2').exists()


def test_ingested_shards_open_and_batch_with_the_dataset_configs(tmp_path):
  items = iemocap_items()
  items[2][VID] = list(range(6)) * 25  # a 150-utterance dialogue: over the config's 128 slots
  for k in (0, 1, 6):
    items[k][VID] = (items[k][VID] * 150)[:150]
  for k, d in ((3, 't'), (4, 'a'), (5, 'v')):
    items[k][VID] = np.random.default_rng(k).normal(size=(150, DIMS[d])).astype(np.float32)
  src = write_pickle(tmp_path / 'IEMOCAP_features.pkl', items)
  ingest.ingest('dialoguernn', src, tmp_path / 'shards')
  config = iemocap_config.get_config(f'shards={tmp_path / "shards"}')
  assert config.label_names == IEMOCAP_LABELS
  assert dict(config.data.dims) == DIMS and config.batch.max_nodes == 152
  validate_config(config)
  data = corpus.open_splits(config, str(tmp_path / 'work'))
  assert len(data.train) + len(data.dev) == 6 and len(data.test) == 2
  budget = batch_contract.budget_from_config(config)
  batch = pipeline.make_dataset(data.train, config=config, budget=budget, train=True, epoch=0,
                                seed=0)[0]
  for m, d in DIMS.items():
    assert np.shape(batch.nodes['features'][m]) == (config.batch.max_nodes, d)
  real = np.asarray(batch.nodes['mask'])
  assert real.any() and (np.asarray(batch.nodes['label'])[real] >= 0).all()

  cosmic_src = write_pickle(tmp_path / 'cosmic.pkl', cosmic_items(meld_items(), 'meld'))
  ingest.ingest('cosmic', cosmic_src, tmp_path / 'text_only')
  text_only = meld_config.get_config(f'authors_batch_scope,shards={tmp_path / "text_only"}')
  assert text_only.graph.scope == 'batch' and text_only.data.modalities == ('t',)
  assert tuple(text_only.train.stages) == ('teacher',) and text_only.label_names == MELD_LABELS
  validate_config(text_only)
  assert len(corpus.open_splits(text_only, str(tmp_path / 'work2')).dev) == 2
