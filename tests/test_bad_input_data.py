"""Hostile shard folders: an edited manifest, records that contradict it, and splits a run
cannot use. Each fails with one message naming the file, split, field or record, before any
training, and leaves the folder as it was."""

import hashlib
import json
import os

import numpy as np
import pytest
from array_record.python import array_record_module

from configs import default
from mer_jax import errors
from mer_jax.data import shards
from mer_jax.data import sources
from mer_jax.data import synthetic
from tests.test_bad_input import shards_config

SPLITS = {'train': 6, 'dev': 3, 'test': 3}


def tiny():
  return default.get_config('tiny')


@pytest.fixture(scope='module')
def records():
  config = tiny()
  return synthetic.generate_records(seed=3, num_dialogues=SPLITS,
                                    dims=config.data.dims.to_dict(),
                                    label_names=tuple(config.label_names))


def write(out, splits, num_shards=2):
  config = tiny()
  shards.write_shards(out, splits, label_names=tuple(config.label_names),
                      dims=config.data.dims.to_dict(), num_shards=num_shards)
  return out


@pytest.fixture
def folder(records, tmp_path):
  return write(tmp_path / 'shards', records)


def edit_manifest(folder, edit, reseal=False):
  """Edits manifest.json by hand (reseal: as a tool that keeps its checksum)."""
  path = folder / 'manifest.json'
  raw = json.loads(path.read_text())
  edit(raw)
  if reseal:
    raw[shards.CHECKSUM_KEY] = shards.content_checksum(raw)
  path.write_text(json.dumps(raw))
  return raw


def snapshot(folder):
  return {p: (folder / p).read_bytes() for p in sorted(os.listdir(folder))}


def open_error(folder, split='train', **kwargs) -> str:
  before = snapshot(folder)
  with pytest.raises(shards.ShardError) as e:
    shards.DialogueShardSource(folder, split, **kwargs)
  assert isinstance(e.value, errors.UserError)
  assert snapshot(folder) == before  # a refused read changes nothing
  return str(e.value)


def test_written_manifests_carry_a_matching_checksum(folder):
  raw = json.loads((folder / 'manifest.json').read_text())
  assert raw[shards.CHECKSUM_KEY] == shards.content_checksum(raw)
  assert shards.load_manifest(folder).checksum_ok is True
  assert len(shards.DialogueShardSource(folder, 'train')) == SPLITS['train']


def test_edited_class_counts_name_the_split_and_field(folder):
  raw = edit_manifest(folder, lambda m: m['splits']['train']['class_counts'].__setitem__(0, 999))
  message = open_error(folder, 'dev')  # any split of an edited manifest is checked
  counts = raw['splits']['train']['class_counts']
  assert message.startswith(f"{folder / 'manifest.json'}: split 'train' class_counts: the "
                            f'manifest says {counts}, its records hold ')
  assert message.endswith('(the manifest was edited after it was written: its content_sha256 '
                          'does not match)')


def test_edited_dialogue_length_names_the_dialogue(folder, records):
  def shorten(m):
    m['splits']['dev']['dialogue_lengths'][1] -= 1
  edit_manifest(folder, shorten)
  held = records['dev'][1].num_utterances
  assert open_error(folder, 'dev').startswith(
      f"{folder / 'manifest.json'}: split 'dev' dialogue_lengths[1] (dialogue_id "
      f"{records['dev'][1].dialogue_id!r}): the manifest says {held - 1}, the record holds "
      f'{held} utterances')


def test_swapped_label_names_are_an_edit_even_when_the_counts_match(folder):
  def swap(m):
    m['label_names'][0], m['label_names'][1] = m['label_names'][1], m['label_names'][0]
  edit_manifest(folder, swap)
  assert 'edited after it was written (content_sha256 does not match its content); the ' \
         'splits still match their records, so label_names, dims or file entries changed' \
         in open_error(folder)


def test_edited_missing_counts_name_the_field(folder):
  edit_manifest(folder, lambda m: m['splits']['test']['missing'].__setitem__('a', 12345))
  assert "split 'test' missing: the manifest says" in open_error(folder, 'test')


def test_manifest_without_checksum_is_verified_against_its_records(folder):
  edit_manifest(folder, lambda m: m.pop(shards.CHECKSUM_KEY))
  assert shards.load_manifest(folder).checksum_ok is None
  assert len(shards.DialogueShardSource(folder, 'train')) == SPLITS['train']  # consistent: fine

  edit_manifest(folder, lambda m: m['splits']['train'].__setitem__('num_utterances', 1))
  assert "split 'train' num_utterances: the manifest says 1, its records hold" in open_error(
      folder)


def test_record_longer_than_its_manifest_entry_names_file_record_and_dialogue(folder, records):
  # A consistent-looking manifest (checksum resealed) that understates one dialogue.
  def shorten(m):
    m['splits']['train']['dialogue_lengths'][3] -= 1
  edit_manifest(folder, shorten, reseal=True)
  source = shards.DialogueShardSource(folder, 'train')
  with pytest.raises(shards.BadRecordError) as e:
    source[3]
  held = records['train'][3].num_utterances
  assert str(e.value) == (
      f"{folder / 'train-00001-of-00002.array_record'}: record 1 (dialogue_id="
      f"{records['train'][3].dialogue_id!r}): holds {held} utterances, the manifest says "
      f"{held - 1} (dialogue_lengths[3] of split 'train')")


@pytest.mark.parametrize('field, value, what', [
    ('class_counts', ['3', 1, 0, 0, 0, 0, 0], 'class_counts must hold ints >= 0'),
    ('class_counts', [-1, 1, 0, 0, 0, 0, 0], 'class_counts must hold ints >= 0'),
    ('dialogue_lengths', [0, 1, 1, 1, 1, 1], 'dialogue_lengths must hold ints >= 1'),
    ('dialogue_lengths', [1.5, 1, 1, 1, 1, 1], 'dialogue_lengths must hold ints >= 1'),
], ids=['count-string', 'count-negative', 'length-zero', 'length-float'])
def test_manifest_values_of_the_wrong_kind(folder, field, value, what):
  edit_manifest(folder, lambda m: m['splits']['train'].__setitem__(field, value), reseal=True)
  message = open_error(folder)
  assert message == f"{folder / 'manifest.json'}: split 'train' is inconsistent: {what}"


def unlabeled(recs):
  return [shards.DialogueRecord(**{**vars(r), 'labels': np.full_like(r.labels, -1)})
          for r in recs]


@pytest.mark.parametrize('role', ['train', 'dev', 'test'])
def test_split_without_labels_is_refused_at_start_up(records, tmp_path, role):
  splits = dict(records)
  splits[role] = unlabeled(records[role])
  folder = write(tmp_path / 'shards', splits)
  with pytest.raises(shards.ShardError) as e:
    sources.open_shard_splits(str(folder), shards_config(folder))
  assert str(e.value) == (f'{folder}/{role}: the {role} split has no labelled utterance '
                          '(every label is -1), so it cannot be trained on or scored')


def test_split_whose_records_are_all_skipped_is_refused_at_start_up(records, tmp_path):
  folder = write(tmp_path / 'shards', records, num_shards=1)
  # Every dev record replaced by bytes that do not decode; the manifest resealed to match.
  path = folder / 'dev-00000-of-00001.array_record'
  writer = array_record_module.ArrayRecordWriter(str(path), 'group_size:1')
  for _ in range(SPLITS['dev']):
    writer.write(b'\xc1 not msgpack')
  writer.close()

  def fix(m):
    entry = m['splits']['dev']['files'][0]
    entry['size'] = path.stat().st_size
    entry['sha256'] = hashlib.sha256(path.read_bytes()).hexdigest()
  edit_manifest(folder, fix, reseal=True)
  with pytest.raises(shards.ShardError) as e:
    sources.open_shard_splits(str(folder), shards_config(folder, on_bad_record='skip'))
  assert str(e.value) == (f'{folder}/dev: the dev split has no dialogues ({SPLITS["dev"]} bad '
                          'records skipped)')


def test_split_named_by_the_config_but_absent(folder):
  with pytest.raises(shards.ShardError) as e:
    sources.open_shard_splits(str(folder), shards_config(folder, test_split='heldout'))
  assert str(e.value) == (f"{os.path.join(str(folder), 'manifest.json')}: no split 'heldout' "
                          "(has ['dev', 'test', 'train'])")


def test_label_names_differing_from_the_config(folder):
  config = shards_config(folder)
  config.label_names = tuple(reversed(config.label_names))
  with pytest.raises(shards.ShardError, match=r'manifest.json: label_names \[.*\] differ from '
                                              r'config.label_names'):
    sources.open_shard_splits(str(folder), config)
