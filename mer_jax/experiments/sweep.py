"""A sweep: every variant of a sweep definition over N seeds, compared with its reference.

  python -m mer_jax.experiments.sweep --sweep configs/sweeps/embedded_ablations.py \\
      --workdir /tmp/ablations --seeds 5 --parallel 2
  python -m mer_jax.experiments.sweep --sweep configs/sweeps/meld_text.py --workdir /tmp/meld
  (installed: mer-jax-sweep [arguments])

A sweep definition is a Python file whose `get_sweep()` returns a dict with `title`,
`reference` (a variant name), `seeds` (default number), `variants` ({name: config spec as for
mer_jax.main, `path[:arg]`}) and optionally `overrides` (--config.<key>=<value> for every run).
Variant v's seed s trains in <workdir>/<v>/seed_<s>/; finished runs are skipped, so an
interrupted sweep continues where it stopped. Encoder stages (and cross-fitting folds) whose
settings two runs share are trained once and linked into both (<workdir>/shared_stages/, see
mer_jax/train/shared_stages.py); --no_shared_stages trains everything in every run.

Each variant's final stage is compared with the reference's on the per-utterance test
predictions (paired bootstrap CI and p-value; approximate randomization), seeds averaged. The
results page is <workdir>/report/index.{md,html}; numbers are in <workdir>/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time

from mer_jax import cli
from mer_jax import errors
from mer_jax.experiments import compare as compare_lib
from mer_jax.experiments import report
from mer_jax.experiments import runs
from mer_jax.experiments import seeds as seeds_lib


def load_sweep(path: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'sweep definition {path} does not exist.')
  namespace = runpy.run_path(path)
  if 'get_sweep' not in namespace:
    raise ValueError(f'{path} defines no get_sweep().')
  sweep = dict(namespace['get_sweep']())
  missing = {'title', 'reference', 'variants'} - set(sweep)
  if missing:
    raise ValueError(f'{path}: get_sweep() lacks keys {sorted(missing)}.')
  if sweep['reference'] not in sweep['variants']:
    raise ValueError(f'{path}: reference {sweep["reference"]!r} is not one of the variants '
                     f'{list(sweep["variants"])}.')
  sweep.setdefault('seeds', 5)
  sweep['overrides'] = seeds_lib.check_overrides(sweep.get('overrides', ()))
  return sweep


def select_variants(sweep: dict, only: str) -> dict[str, str]:
  if not only:
    return dict(sweep['variants'])
  names = [n.strip() for n in only.split(',') if n.strip()]
  unknown = [n for n in names if n not in sweep['variants']]
  if unknown:
    raise ValueError(f'--only names unknown variants {unknown}; the sweep has '
                     f'{list(sweep["variants"])}.')
  if sweep['reference'] not in names:
    names.insert(0, sweep['reference'])  # every comparison needs it
  return {n: sweep['variants'][n] for n in names}


def with_shared_stages(overrides, experiment_dir: str) -> tuple[str, ...]:
  """Adds train.shared_stages_dir=<experiment>/shared_stages: variants that only change fusion
  (or drop modalities) link the encoder stages an earlier run of the same seed trained."""
  return seeds_lib.with_default(overrides, 'train.shared_stages_dir',
                                os.path.join(os.path.abspath(experiment_dir), 'shared_stages'))


def summarize_sweep(sweep: dict, variants: dict[str, str], experiment_dir: str, *,
                    bootstrap_samples: int, allow_missing: bool = False) -> dict:
  """Summaries of every variant and comparisons with the reference.

  With `allow_missing` (a report of a sweep still running), variants without a finished run are
  left out and listed under 'missing'; the reference must have one.
  """
  summaries, comparisons, missing = {}, {}, []
  for name in variants:
    variant_dir = os.path.join(experiment_dir, name)
    try:
      summaries[name] = seeds_lib.summarize(variant_dir)
    except runs.RunError:
      if not allow_missing or name == sweep['reference']:
        raise
      missing.append(name)
      continue
    seeds_lib.write_summary(summaries[name], variant_dir, f'{sweep["title"]}: {name}')
  reference_dir = os.path.join(experiment_dir, sweep['reference'])
  for name in summaries:
    if name != sweep['reference']:
      comparisons[name] = compare_lib.compare_paths(
          os.path.join(experiment_dir, name), reference_dir, samples=bootstrap_samples,
          metrics=('weighted_f1',))['weighted_f1']
  run_time = seeds_lib.add_run_times(s['run_time'] for s in summaries.values())
  return {'title': sweep['title'], 'reference': sweep['reference'], 'variants': variants,
          'summaries': summaries, 'comparisons': comparisons, 'missing': missing,
          'run_time': run_time}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog=cli.prog('mer_jax.experiments.sweep'), description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog='Any further --config.<key>=<value> goes to every run.')
  parser.add_argument('--sweep', required=True, help='sweep definition file (get_sweep())')
  parser.add_argument('--workdir', required=True, help='experiment folder')
  parser.add_argument('--seeds', type=int, default=0, help='seeds per variant (0: the sweep\'s)')
  parser.add_argument('--first_seed', type=int, default=0)
  parser.add_argument('--parallel', type=int, default=1, help='runs at a time (processes)')
  parser.add_argument('--only', default='', help='comma-separated variants (plus the reference)')
  parser.add_argument('--bootstrap_samples', type=int, default=1000)
  parser.add_argument('--report_only', action='store_true',
                      help='summarise the finished runs without training')
  parser.add_argument('--no_shared_stages', action='store_true',
                      help='train every encoder stage in every run (default: runs link the '
                      'finished encoder stages they share, train.shared_stages_dir)')
  args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  try:
    sweep = load_sweep(args.sweep)
    variants = select_variants(sweep, args.only)
    overrides = seeds_lib.with_shared_cache(
        sweep['overrides'] + seeds_lib.check_overrides(rest), args.workdir)
    if not args.no_shared_stages:
      overrides = with_shared_stages(overrides, args.workdir)
  except (ValueError, FileNotFoundError) as e:
    parser.error(str(e))
  n_seeds = args.seeds or int(sweep['seeds'])
  seed_list = list(range(args.first_seed, args.first_seed + n_seeds))
  t0 = time.time()
  if not args.report_only:
    # Seed-major order: an interrupted sweep has every variant at the same number of seeds.
    jobs = [seeds_lib.seed_jobs(spec, os.path.join(args.workdir, name), [seed], overrides)[0]
            for seed in seed_list for name, spec in variants.items()]
    seeds_lib.run_jobs(jobs, args.parallel)
  result = summarize_sweep(sweep, variants, args.workdir,
                           bootstrap_samples=args.bootstrap_samples,
                           allow_missing=args.report_only)
  result['wall_seconds'] = time.time() - t0
  result['seeds'] = seed_list
  with open(os.path.join(args.workdir, 'sweep.json'), 'w') as f:
    json.dump(result, f, indent=2)
  notes = [f'Sweep {args.sweep}; seeds {seed_list}; extra overrides {list(overrides) or "none"}.',
           'Every run selects its epoch on dev weighted F1; test is scored once per run. '
           f'Differences are variant minus {sweep["reference"]} on the final stage, with 95% '
           f'paired-bootstrap intervals over test utterances ({args.bootstrap_samples} '
           'resamples, seeds averaged) and approximate-randomization p-values.',
           seeds_lib.format_run_time(result['run_time']),
           f'Wall time of this command: {result["wall_seconds"]:.0f} s'
           f'{" (report only)" if args.report_only else ""}.']
  if result['missing']:
    notes.append(f'Not run yet (no finished seed): {", ".join(result["missing"])}.')
  paths = report.write_report(os.path.join(args.workdir, 'report'), sweep['title'],
                              sweep['reference'], result['summaries'], result['comparisons'],
                              notes)
  with open(paths['markdown']) as f:
    print(f.read())
  print(f'report: {paths["html"]}')


def run() -> None:
  """The `mer-jax-sweep` console script."""
  errors.cli_main(main)()


if __name__ == '__main__':
  run()
