"""Linear probes of shard features: how much each modality says about the emotion on its own.

  python -m mer_jax.experiments.probe DIR [DIR ...] [--train train --test test --C 0.1]
  (installed: mer-jax-probe DIR [DIR ...])

For each shard folder and modality: standardise the train split's per-utterance features, fit a
multinomial logistic regression (utterances whose modality is absent are left out of both
splits, and counted), and print test weighted F1. Deterministic, seconds per folder, so it
separates what a front-end setting changes in the features (e.g. raw.visual_face) from the
seed-to-seed noise of training the graph stages on a small corpus. Needs scikit-learn (in the
[test] extra).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from mer_jax import cli
from mer_jax import errors
from mer_jax.data import shards


def split_arrays(shard_dir: str, split: str, modality: str) -> tuple[np.ndarray, np.ndarray, int]:
  """(features of utterances where `modality` is present, their labels, utterances left out)."""
  source = shards.DialogueShardSource(shard_dir, split, modalities=(modality,))
  xs, ys, absent = [], [], 0
  for i in range(len(source)):
    record = source[i]
    keep = record.present[modality] & (record.labels >= 0)
    absent += int((~keep).sum())
    xs.append(record.features[modality][keep])
    ys.append(record.labels[keep])
  return np.concatenate(xs), np.concatenate(ys), absent


def probe(shard_dir: str, modality: str, *, train: str = 'train', test: str = 'test',
          c: float = 0.1) -> dict[str, float]:
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.metrics import f1_score  # pylint: disable=g-import-not-at-top
  x_train, y_train, absent_train = split_arrays(shard_dir, train, modality)
  x_test, y_test, absent_test = split_arrays(shard_dir, test, modality)
  mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
  model = LogisticRegression(C=c, max_iter=2000).fit((x_train - mean) / std, y_train)
  predicted = model.predict((x_test - mean) / std)
  return {'weighted_f1': 100.0 * f1_score(y_test, predicted, average='weighted'),
          'test_utterances': int(len(y_test)), 'absent': absent_train + absent_test}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog=cli.prog('mer_jax.experiments.probe'), description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('shard_dirs', nargs='+', metavar='DIR',
                      help='shard folder (manifest.json and the split shards)')
  parser.add_argument('--train', default='train', help='split the probe is fitted on')
  parser.add_argument('--test', default='test', help='split it is scored on')
  parser.add_argument('--C', type=float, default=0.1, help='inverse L2 strength')
  args = parser.parse_args(argv)
  for shard_dir in args.shard_dirs:
    manifest = shards.load_manifest(shard_dir)
    parts = []
    for m in manifest.dims:
      r = probe(shard_dir, m, train=args.train, test=args.test, c=args.C)
      parts.append(f"{m} {r['weighted_f1']:.2f} ({r['test_utterances']} utt., "
                   f"{r['absent']} absent)")
    print(f'{shard_dir}: test weighted F1 of a linear probe: ' + '; '.join(parts))
  return 0


def run() -> None:
  """The `mer-jax-probe` console script."""
  sys.exit(errors.cli_main(main)())


if __name__ == '__main__':
  run()
