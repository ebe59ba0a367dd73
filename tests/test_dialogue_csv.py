"""Dialogue CSV ingestion: MELD's real files, text repair, schemas and every bad-row path."""

import collections
import csv
import os

import numpy as np
import pytest

from mer_jax.data import dialogue_csv

MELD_DIR = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'meld')
HEADER = ['Sr No.', 'Utterance', 'Speaker', 'Emotion', 'Dialogue_ID', 'Utterance_ID']


def write_csv(path, rows, header=HEADER, encoding='utf-8'):
  with open(path, 'w', newline='', encoding=encoding) as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def test_clean_text_repairs_mis_decoded_punctuation():
  assert dialogue_csv.clean_text('itâ€™s') == "it's"
  assert dialogue_csv.clean_text('it\x92s') == "it's"
  assert dialogue_csv.clean_text('\x93hi\x94') == '"hi"'
  assert dialogue_csv.clean_text('wait\u2026  what \u2014 no') == 'wait... what - no'
  assert dialogue_csv.clean_text('caf\u00e9') == 'caf\u00e9'  # real accents survive
  assert dialogue_csv.clean_text('itâ€™s', ascii_punctuation=False) == 'it\u2019s'


@pytest.mark.skipif(not os.path.isdir(MELD_DIR), reason='../shared/data/meld not present')
def test_reads_real_meld_splits():
  expected = {'train': (9989, 1038, 4710), 'dev': (1109, 114, 470), 'test': (2610, 280, 1256)}
  for split, (utterances, dialogues, neutral) in expected.items():
    path = os.path.join(MELD_DIR, f'{split}_sent_emo.csv')
    got, report = dialogue_csv.read_dialogue_csv(path, dialogue_csv.MELD_SCHEMA)
    assert report.kept == report.rows == utterances
    assert report.dialogues == len(got) == dialogues
    assert not report.skipped
    labels = np.concatenate([d.labels for d in got])
    assert int(np.sum(labels == 0)) == neutral
    assert max(len(d) for d in got) <= 33
    for d in got:
      assert np.all(np.diff(d.utterance_ids) > 0)
  dev, _ = dialogue_csv.read_dialogue_csv(os.path.join(MELD_DIR, 'dev_sent_emo.csv'),
                                          dialogue_csv.MELD_SCHEMA)
  assert dev[0].dialogue_id == '0'
  assert dev[0].speakers == ['Phoebe', 'Monica']
  assert dev[0].transcripts[0] == "Oh my God, he's lost it. He's totally lost it."
  assert list(dev[0].labels) == [3, 1]  # sadness, surprise


def test_orders_utterances_and_groups_dialogues(tmp_path):
  rows = [[1, 'third', 'B', 'joy', 7, 2], [2, 'first', 'A', 'neutral', 7, 0],
          [3, 'other', 'C', 'anger', 3, 0], [4, 'second', 'A', 'fear', 7, 1]]
  got, report = dialogue_csv.read_dialogue_csv(write_csv(tmp_path / 'a.csv', rows),
                                               dialogue_csv.MELD_SCHEMA)
  assert [d.dialogue_id for d in got] == ['7', '3']
  assert got[0].transcripts == ['first', 'second', 'third']
  assert got[0].speakers == ['A', 'A', 'B']
  assert list(got[0].labels) == [0, 2, 4]
  assert list(got[0].utterance_ids) == [0, 1, 2]
  assert report.kept == 4 and report.dialogues == 2


def test_iemocap_schema_and_aliases(tmp_path):
  header = ['Dialogue_ID', 'Utterance_ID', 'Utterance', 'Speaker', 'Emotion']
  rows = [['Ses01F_impro01', 0, 'hi', 'F', 'neu'], ['Ses01F_impro01', 1, 'ugh', 'M', 'Frustration'],
          ['Ses01F_impro01', 2, 'yay', 'F', 'happy']]
  got, _ = dialogue_csv.read_dialogue_csv(write_csv(tmp_path / 'i.csv', rows, header),
                                          dialogue_csv.IEMOCAP_SCHEMA)
  assert list(got[0].labels) == [0, 1, 5]


def test_custom_schema_from_config(tmp_path):
  import ml_collections
  cfg = ml_collections.ConfigDict({
      'preset': 'custom', 'dialogue_column': 'conv', 'utterance_column': 'turn',
      'text_column': 'text', 'speaker_column': 'who', 'label_column': 'y',
      'label_names': ('calm', 'upset'), 'label_aliases': {}})
  schema = dialogue_csv.schema_from_config(cfg)
  path = write_csv(tmp_path / 'c.csv', [['c1', 0, 'ok', 'x', 'calm'], ['c1', 1, 'no!', 'y', 'UPSET']],
                   ['conv', 'turn', 'text', 'who', 'y'])
  got, _ = dialogue_csv.read_dialogue_csv(path, schema)
  assert list(got[0].labels) == [0, 1]
  cfg.label_names = ()
  with pytest.raises(ValueError, match='label_names'):
    dialogue_csv.schema_from_config(cfg)


def test_missing_column_names_file_and_column(tmp_path):
  path = write_csv(tmp_path / 'm.csv', [[1, 'hi', 'A', 0, 0]],
                   ['Sr No.', 'Utterance', 'Speaker', 'Dialogue_ID', 'Utterance_ID'])
  with pytest.raises(dialogue_csv.CsvFormatError, match=r"m\.csv: missing column\(s\) \['Emotion'\]"):
    dialogue_csv.read_dialogue_csv(path, dialogue_csv.MELD_SCHEMA)


@pytest.mark.parametrize('row,reason,message', [
    ([2, 'hi', 'A', 'bored', 0, 1], 'unknown label', "line 3: unknown label 'bored'"),
    ([2, '   ', 'A', 'joy', 0, 1], 'empty utterance', "line 3: empty 'Utterance'"),
    ([2, 'hi', '', 'joy', 0, 1], 'empty speaker', "line 3: empty 'Speaker'"),
    ([2, 'hi', 'A', 'joy', 0, 'x1'], 'non-integer utterance id',
     "line 3: column 'Utterance_ID' must be an integer"),
])
def test_bad_rows_error_or_are_counted(tmp_path, row, reason, message):
  good = [1, 'hello', 'A', 'neutral', 0, 0]
  path = write_csv(tmp_path / 'b.csv', [good, row, [3, 'bye', 'B', 'joy', 0, 2]])
  with pytest.raises(dialogue_csv.CsvFormatError, match=message):
    dialogue_csv.read_dialogue_csv(path, dialogue_csv.MELD_SCHEMA)
  got, report = dialogue_csv.read_dialogue_csv(path, dialogue_csv.MELD_SCHEMA, on_bad_row='skip')
  assert report.rows == 3 and report.kept == 2
  assert report.skipped == collections.Counter({reason: 1})
  assert 'line 3' in report.summary() and reason in report.summary()
  assert got[0].transcripts == ['hello', 'bye']


def test_duplicate_ids_always_error(tmp_path):
  path = write_csv(tmp_path / 'd.csv', [[1, 'a', 'A', 'joy', 4, 0], [2, 'b', 'B', 'joy', 4, 0]])
  for mode in ('error', 'skip'):
    with pytest.raises(dialogue_csv.CsvFormatError, match='line 3: duplicate utterance .*first on line 2'):
      dialogue_csv.read_dialogue_csv(path, dialogue_csv.MELD_SCHEMA, on_bad_row=mode)


def test_non_utf8_file_names_the_line(tmp_path):
  path = tmp_path / 'latin.csv'
  write_csv(path, [[1, 'fine', 'A', 'joy', 0, 0], [2, 'caf\u00e9', 'A', 'joy', 0, 1]],
            encoding='latin-1')
  with pytest.raises(dialogue_csv.CsvFormatError, match=r'latin\.csv: line 3 is not valid UTF-8'):
    dialogue_csv.read_dialogue_csv(path, dialogue_csv.MELD_SCHEMA)


def test_ragged_rows_and_empty_files(tmp_path):
  path = tmp_path / 'r.csv'
  path.write_text(','.join(HEADER) + '\n1,hi,A,joy,0,0,EXTRA\n')
  with pytest.raises(dialogue_csv.CsvFormatError, match='line 2: 7 cells for 6 columns'):
    dialogue_csv.read_dialogue_csv(path, dialogue_csv.MELD_SCHEMA)
  path.write_text(','.join(HEADER) + '\n')
  with pytest.raises(dialogue_csv.CsvFormatError, match='no usable rows'):
    dialogue_csv.read_dialogue_csv(path, dialogue_csv.MELD_SCHEMA)
  with pytest.raises(FileNotFoundError, match='nowhere.csv'):
    dialogue_csv.read_dialogue_csv(tmp_path / 'nowhere.csv', dialogue_csv.MELD_SCHEMA)


def test_unlabeled_rows_for_prediction(tmp_path):
  path = write_csv(tmp_path / 'u.csv', [[1, 'hi', 'A', '', 0, 0]])
  got, _ = dialogue_csv.read_dialogue_csv(path, dialogue_csv.MELD_SCHEMA, allow_unlabeled=True)
  assert list(got[0].labels) == [-1]


def test_to_record_is_a_valid_shard_record(tmp_path):
  rows = [[1, 'a', 'Ross', 'joy', 0, 0], [2, 'b', 'Rachel', 'anger', 0, 1],
          [3, 'c', 'Ross', 'fear', 0, 2]]
  (d,), _ = dialogue_csv.read_dialogue_csv(write_csv(tmp_path / 'x.csv', rows),
                                           dialogue_csv.MELD_SCHEMA)
  from mer_jax.data import shards
  record = dialogue_csv.to_record(d, {'t': np.ones((3, 4), np.float32)},
                                  {'t': np.ones(3, bool)})
  shards.validate_record(record, {'t': 4}, num_classes=7)
  assert list(record.speaker_ids) == [0, 1, 0]
