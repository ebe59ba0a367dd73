"""Linear probes of shard features (mer_jax/experiments/probe.py)."""

import numpy as np
import pytest

pytest.importorskip('sklearn')

from mer_jax.data import shards  # pylint: disable=g-import-not-at-top
from mer_jax.experiments import probe  # pylint: disable=g-import-not-at-top

LABELS = ('neutral', 'joy', 'anger')


def _records(n_dialogues, seed):
  rng = np.random.default_rng(seed)
  out = []
  for d in range(n_dialogues):
    labels = rng.integers(0, 3, size=4).astype(np.int32)
    informative = np.eye(3, dtype=np.float32)[labels] * 5 + 0.1 * rng.normal(size=(4, 3))
    noise = rng.normal(size=(4, 3)).astype(np.float32)
    present = {'t': np.ones(4, bool), 'v': np.array([True, True, True, False])}
    out.append(shards.DialogueRecord(
        dialogue_id=f'd{d}', utterance_ids=np.arange(4, dtype=np.int32),
        speakers=['A', 'B', 'A', 'B'], speaker_ids=shards.speaker_ranks(['A', 'B', 'A', 'B']),
        labels=labels, transcripts=['x'] * 4,
        features={'t': informative.astype(np.float32), 'v': noise}, present=present))
  return out


def test_an_informative_modality_scores_high_and_absent_utterances_are_counted(tmp_path):
  folder = str(tmp_path / 'shards')
  shards.write_shards(folder, {'train': _records(30, 0), 'test': _records(10, 1)},
                      label_names=LABELS, dims={'t': 3, 'v': 3}, num_shards=1)
  t = probe.probe(folder, 't')
  v = probe.probe(folder, 'v')
  assert t['weighted_f1'] == pytest.approx(100.0)
  assert t['absent'] == 0 and t['test_utterances'] == 40
  assert v['absent'] == 40 and v['test_utterances'] == 30  # one utterance in four absent
  assert v['weighted_f1'] < 70.0  # pure noise
