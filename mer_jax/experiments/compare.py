"""Significance of the difference between any two runs (or two multi-seed systems).

  python -m mer_jax.experiments.compare /tmp/run_a /tmp/run_b
  python -m mer_jax.experiments.compare /tmp/abl/no_gates /tmp/abl/full --stage fusion
  (installed: mer-jax-compare A B [--stage S])

A path is a workdir of mer_jax.main or a folder of seed_<s>/ workdirs (their scores are
averaged over seeds). Prints A - B with a paired-bootstrap confidence interval and p-value and
an approximate-randomization p-value, for weighted F1, macro F1 and accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys

from mer_jax import cli
from mer_jax import errors
from mer_jax.experiments import runs
from mer_jax.experiments import significance


def compare_paths(path_a: str, path_b: str, *, stage: str = '', samples: int = 1000,
                  confidence: float = 0.95, seed: int = 0,
                  metrics=significance.METRICS) -> dict[str, dict]:
  """{metric: A - B with its CI and p-values}; each system's stage defaults to its last."""
  runs_a, runs_b = runs.seed_runs(path_a), runs.seed_runs(path_b)
  stage_a = stage or runs.headline_stage(runs_a[0])
  stage_b = stage or runs.headline_stage(runs_b[0])
  labels, preds_a = runs.aligned_predictions(runs_a, stage_a)
  labels_b, preds_b = runs.aligned_predictions(runs_b, stage_b)
  if labels.shape != labels_b.shape or (labels != labels_b).any():
    raise runs.RunError(f'{path_a} and {path_b} were tested on different utterances or labels.')
  num_classes = len(runs.load_report(runs_a[0], stage_a)['label_names'])
  out = {}
  for metric in metrics:
    result = significance.paired_bootstrap(labels, preds_a, preds_b, num_classes, metric=metric,
                                           samples=samples, confidence=confidence,
                                           seed=seed).as_dict()
    result['p_randomization'] = (
        significance.approximate_randomization(labels, preds_a, preds_b, num_classes,
                                               metric=metric, samples=samples, seed=seed)
        if preds_a.shape == preds_b.shape else None)
    result['stages'] = (stage_a, stage_b)
    result['runs'] = (len(runs_a), len(runs_b))
    out[metric] = result
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog=cli.prog('mer_jax.experiments.compare'),
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('a', help='system A: a workdir or a folder of seed_<s>/ workdirs')
  parser.add_argument('b', help='system B, likewise')
  parser.add_argument('--stage', default='', help='stage of both (default: each run\'s last)')
  parser.add_argument('--samples', type=int, default=1000, help='bootstrap and randomization '
                      'resamples')
  parser.add_argument('--confidence', type=float, default=0.95, help='of the bootstrap interval')
  parser.add_argument('--json', default='', help='also write the results to this file')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    result = compare_paths(args.a, args.b, stage=args.stage, samples=args.samples,
                           confidence=args.confidence)
  except runs.RunError as e:
    parser.exit(2, f'error: {e}\n')
  first = result['weighted_f1']
  print(f'A = {args.a} ({first["runs"][0]} run(s), stage {first["stages"][0]})')
  print(f'B = {args.b} ({first["runs"][1]} run(s), stage {first["stages"][1]})')
  for metric, r in result.items():
    ar = 'n/a' if r['p_randomization'] is None else f'{r["p_randomization"]:.4f}'
    print(f'{metric:>12}: A {100 * r["score_a"]:.2f}  B {100 * r["score_b"]:.2f}  '
          f'A-B {100 * r["difference"]:+.2f} [{100 * r["ci_low"]:+.2f}, {100 * r["ci_high"]:+.2f}] '
          f'({100 * r["confidence"]:.0f}% CI)  p bootstrap {r["p_value"]:.4f}  '
          f'p randomization {ar}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)


def run() -> None:
  """The `mer-jax-compare` console script."""
  errors.cli_main(main)()


if __name__ == '__main__':
  run()
