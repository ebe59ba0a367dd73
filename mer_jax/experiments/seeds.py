"""One config over several seeds, each in its own workdir, and their summary.

  python -m mer_jax.experiments.seeds --config configs/default.py --workdir /tmp/exp --seeds 5
  python -m mer_jax.experiments.seeds --config configs/meld_text.py --workdir /tmp/meld \\
      --seeds 5 --parallel 2 --config.optim.teacher.lr=1e-4
  (installed: mer-jax-seeds [flags])

`--config` is read as mer_jax.main reads it, so a bad config or `--config.<key>=<value>` override
fails here, once; every run gets the same file and overrides. Seed s trains in
<workdir>/seed_<s>/ with `--config.seed=s` through `python -m mer_jax.main` (a finished seed is
skipped, an interrupted one resumes). Model selection is on dev inside each run; test is scored
once per stage after selection. The summary (summary.json, summary.md) gives per-seed and
mean +- sd test weighted F1, macro F1, accuracy and per-class F1 for every stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
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

FLAGS = flags.FLAGS

HEADLINE = ('weighted_f1', 'macro_f1', 'accuracy')
RUN_TIMES = 'run_times.json'  # in each run's workdir: one entry per attempt the runner made


@dataclasses.dataclass(frozen=True)
class Job:
  """One training run: a config spec (`path[:arg]`), its overrides, its seed and workdir."""
  config: str
  workdir: str
  seed: int
  overrides: tuple[str, ...] = ()

  def command(self) -> list[str]:
    return [sys.executable, '-m', 'mer_jax.main', '--config', self.config,
            '--workdir', self.workdir, f'--config.seed={self.seed}', *self.overrides]


def check_overrides(overrides) -> tuple[str, ...]:
  bad = [o for o in overrides if not (o.startswith('--config.') and '=' in o)]
  if bad:
    raise errors.UserError(f'unexpected arguments {bad}: only --config.<key>=<value> overrides '
                           'are passed on to the runs.')
  return tuple(overrides)


def with_default(overrides, key: str, value: str) -> tuple[str, ...]:
  """`overrides` plus --config.<key>=<value>, unless they already set that key."""
  if any(o.startswith(f'--config.{key}=') for o in overrides):
    return tuple(overrides)
  return tuple(overrides) + (f'--config.{key}={value}',)


def with_shared_cache(overrides, experiment_dir: str) -> tuple[str, ...]:
  """Adds data.cache_dir=<experiment>/data and train.compilation_cache_dir=<experiment>/jax_cache,
  so the runs generate or encode their data once and compile each distinct step once.

  Runs in parallel may share the compilation cache: an entry that another process has not
  finished writing fails to decompress, and JAX then warns and compiles the step itself.
  """
  root = os.path.abspath(experiment_dir)
  overrides = with_default(overrides, 'data.cache_dir', os.path.join(root, 'data'))
  return with_default(overrides, 'train.compilation_cache_dir', os.path.join(root, 'jax_cache'))


def run_jobs(jobs: list[Job], parallel: int = 1, env: dict | None = None,
             poll_seconds: float = 0.5) -> None:
  """Runs the unfinished jobs, at most `parallel` at a time; each attempt's wall and CPU
  seconds go to its workdir's run_times.json (`record_attempt`).

  Each job's output goes to <workdir>/run.log. A failed job does not stop the others; after all
  have ended, one error lists every failure with its log.
  """
  if parallel < 1:
    raise ValueError(f'parallel must be >= 1, got {parallel}.')
  pending = [i for i, job in enumerate(jobs) if not runs.is_finished(job.workdir)]
  running: dict[int, tuple[subprocess.Popen, float, object]] = {}
  failures = []
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  while pending or running:
    while pending and len(running) < parallel:
      i = pending.pop(0)
      os.makedirs(jobs[i].workdir, exist_ok=True)
      log = open(os.path.join(jobs[i].workdir, 'run.log'), 'a')
      print(f'[{time.strftime("%H:%M:%S")}] start {jobs[i].workdir}', flush=True)
      proc = subprocess.Popen(jobs[i].command(), cwd=root, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
      running[i] = (proc, time.time(), log)
    time.sleep(poll_seconds)
    for i, (proc, t0, log) in list(running.items()):
      usage = _reap(proc)
      if usage is None:
        continue
      del running[i]
      log.close()
      seconds = time.time() - t0
      record_attempt(jobs[i].workdir, seconds, usage.ru_utime + usage.ru_stime,
                     proc.returncode)
      status = 'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'
      print(f'[{time.strftime("%H:%M:%S")}] {status} {jobs[i].workdir} in {seconds:.0f} s',
            flush=True)
      if proc.returncode != 0:
        failures.append(f'{jobs[i].workdir} (exit {proc.returncode}; log '
                        f'{os.path.join(jobs[i].workdir, "run.log")})')
  if failures:
    raise RuntimeError(f'{len(failures)} of {len(jobs)} runs failed: ' + '; '.join(failures))


def _reap(proc: subprocess.Popen):
  """The ended child's resource usage (CPU seconds), its exit code set on `proc`; None while
  it runs."""
  pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
  if pid == 0:
    return None
  proc.returncode = os.waitstatus_to_exitcode(status)
  return usage


def record_attempt(workdir: str, wall_seconds: float, cpu_seconds: float,
                   returncode: int) -> None:
  """Appends one attempt at a run to its run_times.json (a resumed run has several)."""
  path = os.path.join(workdir, RUN_TIMES)
  attempts = load_attempts(workdir) or []
  attempts.append({'ended': time.strftime('%Y-%m-%dT%H:%M:%S'), 'returncode': returncode,
                   'wall_seconds': round(wall_seconds, 3), 'cpu_seconds': round(cpu_seconds, 3)})
  files.write_json(path, attempts, indent=1)


def load_attempts(workdir: str) -> list[dict] | None:
  path = os.path.join(workdir, RUN_TIMES)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise runs.RunError(f'{path} is not valid JSON ({e}).') from e


def run_time(workdir: str) -> dict:
  """One run's wall and CPU seconds summed over its recorded attempts; `untimed` is 1 when it has
  no record (trained outside the runner, or by a version before it kept one)."""
  attempts = load_attempts(workdir) or []
  return {'runs': 1, 'untimed': int(not attempts), 'attempts': len(attempts),
          'wall_seconds': sum(a['wall_seconds'] for a in attempts),
          'cpu_seconds': sum(a['cpu_seconds'] for a in attempts)}


def add_run_times(totals) -> dict:
  """The sum of several `run_time` (or `add_run_times`) results."""
  totals = list(totals)
  keys = ('runs', 'untimed', 'attempts', 'wall_seconds', 'cpu_seconds')
  return {k: sum(t[k] for t in totals) for k in keys}


def total_run_time(workdirs) -> dict:
  """Wall and CPU seconds summed over every recorded attempt of these runs."""
  return add_run_times(run_time(w) for w in workdirs)


def format_run_time(total: dict) -> str:
  if total['untimed'] == total['runs']:
    return (f'Run time: none of the {total["runs"]} runs has a timing record (trained outside the '
            f'runner, or before it kept one).')
  text = (f'Run time of the {total["runs"]} runs, summed over the runner\'s attempts: '
          f'{total["wall_seconds"]:.0f} s wall ({total["wall_seconds"] / 3600:.2f} h; '
          f'a paused run counts its pause), {total["cpu_seconds"]:.0f} s CPU.')
  if total['untimed']:
    text += f' {total["untimed"]} run(s) have no timing record and are not counted.'
  return text


def seed_jobs(config: str, experiment_dir: str, seeds, overrides=()) -> list[Job]:
  return [Job(config, runs.seed_workdir(experiment_dir, s), int(s), tuple(overrides))
          for s in seeds]


def mean_sd(values) -> dict:
  """Mean and sample sd (None for one value: a single seed says nothing of the spread)."""
  values = np.asarray(values, np.float64)
  sd = float(values.std(ddof=1)) if values.size > 1 else None
  return {'mean': float(values.mean()), 'sd': sd}


def summarize(experiment_dir: str) -> dict:
  """Per-stage, per-seed test metrics of a multi-seed directory, and their mean and sd."""
  workdirs = runs.seed_runs(experiment_dir)
  loaded = {workdir: runs.load_run(workdir) for workdir in workdirs}
  results = {workdir: run['stages'] for workdir, run in loaded.items()}
  stages = list(results[workdirs[0]])
  summary = {'runs': workdirs, 'headline_stage': stages[-1], 'stages': {},
             'run_time': total_run_time(workdirs)}
  for stage in stages:
    per_seed = []
    for workdir in workdirs:
      report = runs.load_report(workdir, stage)
      result = results[workdir][stage]
      per_seed.append({'run': workdir, 'dev_weighted_f1': result.get('dev_weighted_f1'),
                       'best_epoch': result.get('best_epoch'),
                       'seconds': result.get('seconds'),
                       **{k: report[k] for k in HEADLINE},
                       'per_class_f1': {c: v['f1'] for c, v in report['per_class'].items()},
                       'confusion': report['confusion'],
                       'history': result.get('history', []),
                       'git_commit': loaded[workdir]['git_commit']})
    classes = list(per_seed[0]['per_class_f1'])
    summary['stages'][stage] = {
        'per_seed': per_seed,
        **{k: mean_sd([r[k] for r in per_seed]) for k in HEADLINE},
        'per_class_f1': {c: mean_sd([r['per_class_f1'][c] for r in per_seed]) for c in classes},
        'confusion_sum': np.sum([r['confusion'] for r in per_seed], axis=0).tolist(),
        'label_names': classes,
    }
  return summary


def pct(stat: dict) -> str:
  if stat['sd'] is None:
    return f'{100 * stat["mean"]:.2f}'
  return f'{100 * stat["mean"]:.2f} ± {100 * stat["sd"]:.2f}'


def format_summary(summary: dict, title: str) -> str:
  """Markdown: mean +- sd per stage, then the per-seed rows and per-class F1 of each stage."""
  n = len(summary['runs'])
  lines = [f'# {title}', '', f'{n} seed(s); model selection on dev, test scored once per run.',
           '', format_run_time(summary['run_time']), '',
           '| stage | weighted F1 | macro F1 | accuracy |', '| --- | --- | --- | --- |']
  for stage, s in summary['stages'].items():
    lines.append(f'| {stage} | {pct(s["weighted_f1"])} | {pct(s["macro_f1"])} | '
                 f'{pct(s["accuracy"])} |')
  for stage, s in summary['stages'].items():
    classes = s['label_names']
    lines += ['', f'## {stage}', '', '| run | dev wF1 | test wF1 | macro F1 | accuracy | ' +
              ' | '.join(classes) + ' |', '| --- ' * (5 + len(classes)) + '|']
    for r in s['per_seed']:
      dev = '' if r['dev_weighted_f1'] is None else f'{100 * r["dev_weighted_f1"]:.2f}'
      lines.append(f'| {os.path.basename(r["run"])} | {dev} | {100 * r["weighted_f1"]:.2f} | '
                   f'{100 * r["macro_f1"]:.2f} | {100 * r["accuracy"]:.2f} | ' +
                   ' | '.join(f'{100 * r["per_class_f1"][c]:.2f}' for c in classes) + ' |')
    lines.append(f'| mean ± sd | | {pct(s["weighted_f1"])} | {pct(s["macro_f1"])} | '
                 f'{pct(s["accuracy"])} | ' +
                 ' | '.join(pct(s['per_class_f1'][c]) for c in classes) + ' |')
  return '\n'.join(lines) + '\n'


def write_summary(summary: dict, out_dir: str, title: str) -> None:
  with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(out_dir, 'summary.md'), 'w') as f:
    f.write(format_summary(summary, title))


def config_spec(spec: str) -> str:
  """`path[:arg]` with the path made absolute: the runs start in the repository root."""
  path, sep, arg = (spec, '', '') if os.path.isfile(spec) else spec.partition(':')
  return os.path.abspath(path) + sep + arg if os.path.isfile(path) else spec


def config_overrides(argv) -> tuple[str, ...]:
  """The --config.<key>=<value> arguments of `argv` as given, to pass on to every run (the config
  flag finds its overrides in sys.argv, --flagfile included, the same way)."""
  argv = FLAGS.read_flags_from_files(list(argv), force_gnu=False)
  return check_overrides([a for a in argv[1:]
                          if a.lstrip('-').startswith(('config.', 'noconfig.'))])


def define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'Config file[:arg] of every run, as for '
                                  'mer_jax.main.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Experiment folder (seed_<s>/ inside).')
  define_seed_flags(seeds=5, seeds_help='Number of seeds.')
  flags.mark_flags_as_required(['config', 'workdir'])


def define_seed_flags(seeds: int, seeds_help: str) -> None:
  """--seeds, --first_seed and --parallel, as every command that runs a config over seeds has."""
  flags.DEFINE_integer('seeds', seeds, seeds_help, lower_bound=1)
  flags.DEFINE_integer('first_seed', 0, 'The first seed; the others follow it.')
  flags.DEFINE_integer('parallel', 1, 'Runs at a time (processes).', lower_bound=1)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config_validation.validate_config(errors.loaded_config(FLAGS['config']))
  spec = config_flags.get_config_filename(FLAGS['config'])
  seeds = range(FLAGS.first_seed, FLAGS.first_seed + FLAGS.seeds)
  t0 = time.time()
  overrides = with_shared_cache(config_overrides(sys.argv), FLAGS.workdir)
  run_jobs(seed_jobs(config_spec(spec), FLAGS.workdir, seeds, overrides), FLAGS.parallel)
  summary = summarize(FLAGS.workdir)
  summary['wall_seconds'] = time.time() - t0
  write_summary(summary, FLAGS.workdir, f'{spec} over seeds {list(seeds)}')
  print(format_summary(summary, spec))
  print(f'summary: {os.path.join(FLAGS.workdir, "summary.md")}')


def run(argv=None) -> None:
  """The `mer-jax-seeds` console script."""
  cli.run_absl(main, doc=__doc__, define_flags=define_flags, argv=argv)


if __name__ == '__main__':
  run()
