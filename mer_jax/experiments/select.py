"""Trains the text path's variants over seeds and keeps the one with the best mean dev score.

  python -m mer_jax.experiments.select --config configs/meld_text.py \\
      --config.text.csv.dir=/data/my_corpus --workdir /tmp/select [--seeds 3]
  (installed: mer-jax-select [flags])

Which text variant suits a corpus is found on that corpus: a default chosen on MELD dev lost to
`:last_layer` on a held-out one (docs/experiments.md). Each name in --variants (default
DEFAULT_VARIANTS: `layers_gru`, the default: layers 1-6 with the dialogue GRU; `utterance`, the
same without the GRU; `last_layer`) trains as `<config>:<name>` with the same --config.<key>=<value>
overrides, so --config is a file whose get_config takes those names (configs/meld_text.py,
configs/iemocap_text.py or one built on them), given without `:arg`. Seed s of variant v trains
in <workdir>/<v>/seed_<s>/ through the sweep runner: the runs share the text features, the data
and compilation caches and identical encoder stages, and a rerun skips finished runs.

Selection reads dev only. The variant with the highest mean, over the seeds, of its runs' best dev
weighted F1 (final stage) wins; a tie (means within TIE_TOLERANCE) goes to the variant listed
first, so the default wins ties. Of the winner's seeds, the run with the best dev weighted F1 is
kept (a tie: the lowest seed). Test scores are shown for information and choose nothing. Written:
<workdir>/select.md and select.json (the table), <workdir>/chosen (a symlink to the kept run,
ready for `python -m mer_jax.predict --workdir <workdir>/chosen`).
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from mer_jax import cli
from mer_jax import config_validation
from mer_jax import errors
from mer_jax import files
from mer_jax.experiments import runs
from mer_jax.experiments import seeds as seeds_lib
from mer_jax.experiments import sweep as sweep_lib

FLAGS = flags.FLAGS

# The text-path variants documented in configs/meld_text.py, the default first (it wins ties).
DEFAULT_VARIANTS = ('layers_gru', 'utterance', 'last_layer')
# Means this close are equal: float sums of the same scores in another order differ by ~1e-16.
TIE_TOLERANCE = 1e-9
CHOSEN_LINK = 'chosen'
# The experiment folder's own entries (seeds_lib.with_shared_cache, sweep's shared stages).
RESERVED_NAMES = ('.', '..', CHOSEN_LINK, 'data', 'jax_cache', 'shared_stages')


def variant_specs(config_file: str, names) -> dict[str, str]:
  """{name: `<config_file>:<name>`}; names must be unique and usable as folder names."""
  names = [n.strip() for n in names if n.strip()]
  if not names:
    raise errors.UserError('--variants: give at least one variant name.')
  bad = [n for n in names if os.sep in n or n in RESERVED_NAMES]
  if bad or len(set(names)) < len(names):
    raise errors.UserError(f'--variants: {names} must be distinct names (each becomes a folder '
                           f'of --workdir), not {bad or "repeated"}.')
  return {n: f'{config_file}:{n}' for n in names}


def check_variant(spec: str, overrides) -> None:
  """Loads `spec` with the overrides as mer_jax.main would and validates it, so that a variant
  the config file lacks fails before any run starts."""
  argv = ['select', f'--config={spec}', *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  try:
    flag_values(argv)
    config_validation.validate_config(errors.loaded_config(flag_values['config']))
  except flags.Error as e:  # get_config raised: its message is the last line
    raise errors.UserError(f'variant {spec}: {str(e).strip().splitlines()[-1].strip()}') from e
  except errors.UserError as e:
    raise errors.UserError(f'variant {spec}: ' + ' '.join(str(e).split())) from e


def best_index(values, tolerance: float = TIE_TOLERANCE) -> int:
  """The index of the largest value; the first of those within `tolerance` of it."""
  values = np.asarray(values, np.float64)
  return int(np.flatnonzero(values >= values.max() - tolerance)[0])


def choose(dev_f1: dict[str, list[float]]) -> tuple[str, int]:
  """(variant, index of its kept seed) from per-variant, per-seed dev scores, in listing order:
  the highest mean (ties: listed first), then its highest seed score (ties: listed first)."""
  names = list(dev_f1)
  name = names[best_index([np.mean(dev_f1[n]) for n in names])]
  return name, best_index(dev_f1[name])


def variant_rows(experiment_dir: str, names, seed_list) -> dict[str, list[dict]]:
  """{variant: per seed, its run, final stage, best dev and test weighted F1 (results.json)}."""
  rows = {}
  for name in names:
    rows[name] = []
    for seed in seed_list:
      workdir = runs.seed_workdir(os.path.join(experiment_dir, name), seed)
      stage = runs.headline_stage(workdir)
      result = runs.load_results(workdir)[stage]
      rows[name].append({'seed': seed, 'run': os.path.abspath(workdir), 'stage': stage,
                         'dev_weighted_f1': result['dev_weighted_f1'],
                         'test_weighted_f1': result['test_weighted_f1']})
  return rows


def selection(rows: dict[str, list[dict]]) -> dict:
  """The table (mean +- sd of dev and test weighted F1 per variant) and the choice."""
  dev = {n: [r['dev_weighted_f1'] for r in per_seed] for n, per_seed in rows.items()}
  name, index = choose(dev)
  table = {n: {'dev_weighted_f1': seeds_lib.mean_sd(dev[n]),
               'test_weighted_f1': seeds_lib.mean_sd([r['test_weighted_f1'] for r in per_seed]),
               'per_seed': per_seed} for n, per_seed in rows.items()}
  return {'variants': table, 'chosen': {'variant': name, **rows[name][index]},
          'tie_break': 'variant listed first; then lowest seed'}


def link_chosen(experiment_dir: str, run_dir: str) -> str:
  """Points <experiment>/chosen at the kept run (a relative link), replacing an earlier choice
  in one rename."""
  link = os.path.join(experiment_dir, CHOSEN_LINK)
  target = os.path.relpath(os.path.abspath(run_dir), os.path.abspath(experiment_dir))
  temporary = link + '.new'
  if os.path.lexists(temporary):
    os.unlink(temporary)
  os.symlink(target, temporary)
  os.replace(temporary, link)
  return link


def predict_command(experiment_dir: str) -> str:
  return (f'python -m mer_jax.predict --workdir {os.path.join(experiment_dir, CHOSEN_LINK)} '
          '--input dialogues.jsonl --output predictions.jsonl')


def format_selection(result: dict, title: str) -> str:
  chosen = result['chosen']
  lines = [f'# {title}', '',
           f'Seeds {result["seeds"]}; each run selects its epoch on dev. Variants are ranked by '
           f'the mean over seeds of the best dev weighted F1 of their final stage '
           f'({chosen["stage"]}); test is for information and chooses nothing.', '',
           '| variant | dev weighted F1 | dev per seed | test weighted F1 |',
           '| --- | --- | --- | --- |']
  for name, row in result['variants'].items():
    label = f'**{name}** (chosen)' if name == chosen['variant'] else name
    per_seed = ', '.join(f'{100 * r["dev_weighted_f1"]:.2f}' for r in row['per_seed'])
    lines.append(f'| {label} | {seeds_lib.pct(row["dev_weighted_f1"])} | {per_seed} | '
                 f'{seeds_lib.pct(row["test_weighted_f1"])} |')
  lines += ['', f'Chosen: {chosen["variant"]} (highest mean dev weighted F1; ties go to the '
            f'variant listed first), its seed {chosen["seed"]} (best dev of its seeds; ties: the '
            f'lowest seed): {chosen["run"]}, linked as {result["link"]}.',
            '', seeds_lib.format_run_time(result['run_time']), '',
            f'Predict with: `{result["predict_command"]}`']
  return '\n'.join(lines) + '\n'


def define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'Config file whose get_config takes the '
                                  'variant names (e.g. configs/meld_text.py), without :arg.',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Experiment folder (<variant>/seed_<s>/ inside).')
  flags.DEFINE_list('variants', list(DEFAULT_VARIANTS), 'Variants (`:arg` of --config) to '
                    'compare, in tie-breaking order.')
  seeds_lib.define_seed_flags(seeds=3, seeds_help='Seeds per variant.')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  spec = config_flags.get_config_filename(FLAGS['config'])
  path, _, arg = (spec, '', '') if os.path.isfile(spec) else spec.partition(':')
  if arg:
    raise errors.UserError(f'--config {spec}: give the file without :{arg}; select trains the '
                           f'variants named by --variants ({",".join(FLAGS.variants)}).')
  specs = variant_specs(seeds_lib.config_spec(path), FLAGS.variants)
  given = seeds_lib.config_overrides(sys.argv)
  for variant_spec in specs.values():
    check_variant(variant_spec, given)
  workdir = os.path.abspath(FLAGS.workdir)
  overrides = sweep_lib.with_shared_stages(seeds_lib.with_shared_cache(given, workdir), workdir)
  seed_list = list(range(FLAGS.first_seed, FLAGS.first_seed + FLAGS.seeds))
  t0 = time.time()
  # Seed-major, as a sweep: an interrupted selection has every variant at the same seeds.
  jobs = [seeds_lib.seed_jobs(s, os.path.join(workdir, name), [seed], overrides)[0]
          for seed in seed_list for name, s in specs.items()]
  seeds_lib.run_jobs(jobs, FLAGS.parallel)
  result = selection(variant_rows(workdir, specs, seed_list))
  result.update(config=path, variant_specs=specs, seeds=seed_list, overrides=list(given),
                link=link_chosen(workdir, result['chosen']['run']),
                predict_command=predict_command(workdir),
                run_time=seeds_lib.total_run_time([job.workdir for job in jobs]),
                wall_seconds=time.time() - t0)
  files.write_json(os.path.join(workdir, 'select.json'), result, indent=2)
  text = format_selection(result, f'Text variant selection: {path}')
  with files.open_atomically(os.path.join(workdir, 'select.md')) as f:
    f.write(text)
  print(text)
  print(f'table: {os.path.join(workdir, "select.md")}')


def run(argv=None) -> None:
  """The `mer-jax-select` console script."""
  cli.run_absl(main, doc=__doc__, define_flags=define_flags, argv=argv)


if __name__ == '__main__':
  run()
