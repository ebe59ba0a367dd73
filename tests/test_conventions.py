"""The ecosystem's conventions: console scripts, `--help` of every command, `--config` with
overrides, results.json's provenance and epoch numbering, TensorBoard's learning rates, text and
hparams. The end-to-end run's results.json and event files: tests/test_end_to_end.py."""

import ast
import importlib
import json
import pathlib
import subprocess
import sys
import tomllib

from absl import flags
import ml_collections
import pytest

from configs import default
from mer_jax import errors
from mer_jax.experiments import runs
from mer_jax.experiments import seeds
from mer_jax.train import fingerprints
from mer_jax.train import metrics_writer
from mer_jax.train import optim
from mer_jax.train import stage as stage_lib
from mer_jax.train import trainer
from tests import _tensorboard_events as tb

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['scripts']
TARGETS = {script: target.split(':') for script, target in SCRIPTS.items()}


def modules_with_a_main_block() -> set[str]:
  found = set()
  for path in (ROOT / 'mer_jax').rglob('*.py'):
    tree = ast.parse(path.read_text(), str(path))
    if any(isinstance(node, ast.If) and "__name__ == '__main__'" in ast.unparse(node.test)
           for node in tree.body):
      found.add('.'.join(path.relative_to(ROOT).with_suffix('').parts))
  return found


def test_every_console_script_runs_a_callable_of_its_module():
  assert {'mer-jax-train', 'mer-jax-predict', 'mer-jax-bench', 'mer-jax-preprocess'} <= set(SCRIPTS)
  for script, (module, attr) in TARGETS.items():
    assert callable(getattr(importlib.import_module(module), attr)), script


def test_every_module_with_a_main_block_is_a_console_script():
  """A module runs as a command (`python -m`) exactly when a console script runs it too; library
  modules (experiments.report, .runs, .significance) have no `__main__` block."""
  commands, scripted = modules_with_a_main_block(), {module for module, _ in TARGETS.values()}
  assert not commands - scripted, (f'{sorted(commands - scripted)} run as commands: give each a '
                                   'run() (mer_jax/cli.py) and a [project.scripts] entry')
  assert not scripted - commands, f'{sorted(scripted - commands)}: no __main__ block'
  for module in ('mer_jax.experiments.report', 'mer_jax.experiments.runs',
                 'mer_jax.experiments.significance'):
    assert module not in modules_with_a_main_block()


def run_command(module, argv, monkeypatch):
  """(exit status, stdout + stderr) of module.run() with argv; absl's config flag reads its
  overrides from sys.argv."""
  monkeypatch.setattr(sys, 'argv', list(argv))
  with pytest.raises(SystemExit) as exit_info:
    if hasattr(module, 'define_flags'):  # absl
      module.run(list(argv))
    else:
      module.main(list(argv[1:]))
  return exit_info.value.code


@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_every_command_answers_help_with_its_docstring(script, clean_flags, monkeypatch, capsys):
  module = importlib.import_module(TARGETS[script][0])
  assert run_command(module, [script, '--help'], monkeypatch) in (0, None)
  out = capsys.readouterr().out
  first_line = module.__doc__.strip().splitlines()[0]
  assert first_line in ' '.join(out.split()), out
  if hasattr(module, 'define_flags'):
    assert f'{script}:\n  --' in out, out  # the command's own flags, under the script's name


def test_help_through_python_m_and_a_console_script_exits_0():
  """The real entry points, in fresh processes: `python -m` and a console script's `run()`."""
  commands = {
      'python -m mer_jax.main': [sys.executable, '-m', 'mer_jax.main', '--help'],
      'mer-jax-seeds': [sys.executable, '-c', 'import sys; sys.argv[0] = "mer-jax-seeds"; '
                        'from mer_jax.experiments import seeds; seeds.run()', '--help'],
      'python -m mer_jax.experiments.probe': [sys.executable, '-m', 'mer_jax.experiments.probe',
                                              '-h']}
  procs = {name: subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for name, args in commands.items()}
  outputs = {}
  for name, proc in procs.items():
    outputs[name], err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (name, err[-2000:])
    assert len(outputs[name].splitlines()) > 5, (name, outputs[name])
  # absl lists the command's flags under the module's path, or the console script's name.
  assert 'mer_jax/main.py:\n  --config' in outputs['python -m mer_jax.main']
  assert 'mer-jax-seeds:\n  --config' in outputs['mer-jax-seeds']


def test_bench_takes_a_config_file_with_overrides(monkeypatch):
  from mer_jax import bench  # pylint: disable=g-import-not-at-top
  argv = ['mer-jax-bench', '--config', 'configs/default.py:tiny', '--config.train.epochs=1',
          '--steps', '2']
  monkeypatch.setattr(sys, 'argv', argv)
  flag_values = flags.FlagValues()
  bench.define_flags(flag_values)
  flag_values(argv)
  config = errors.loaded_config(flag_values['config'])
  assert config.train.epochs == 1 and flag_values.steps == 2
  assert config.batch.max_nodes == default.get_config('tiny').batch.max_nodes


def test_seeds_checks_the_config_once_and_passes_its_file_and_overrides_on(
    tmp_path, clean_flags, monkeypatch, capsys):
  argv = ['mer-jax-seeds', '--config', 'configs/default.py:tiny', '--config.train.epochs=0',
          '--workdir', str(tmp_path / 'exp'), '--seeds', '2']
  assert run_command(seeds, argv, monkeypatch) == errors.EXIT_USER_ERROR
  assert 'train.epochs: must be >= 1, got 0' in capsys.readouterr().err
  assert not (tmp_path / 'exp').exists()  # no run started
  assert seeds.config_overrides(['s', '--config', 'c.py', '--config.train.epochs=1',
                                 '--workdir', 'w']) == ('--config.train.epochs=1',)
  with pytest.raises(errors.UserError, match='only --config'):
    seeds.config_overrides(['s', '--config', 'c.py', '--config.train.epochs', '1'])
  assert seeds.config_spec('configs/default.py:tiny') == f'{ROOT}/configs/default.py:tiny'
  assert seeds.config_spec('no/such.py:tiny') == 'no/such.py:tiny'


def stage_cfg(**kwargs):
  cfg = default.stage_optim(1e-3, 0.0, kwargs.pop('schedule', 'constant'))
  cfg.update(kwargs)
  return cfg


def test_learning_rates_per_group_are_the_schedule_scaled():
  cfg = stage_cfg(schedule='warmup_cosine', grad_accum_steps=2)
  cfg.lr_multipliers = ml_collections.ConfigDict({'proj': 0.5, 'classifiers': 2.0})
  steps = optim.schedule_steps(cfg, 10)
  schedule = optim.make_schedule(cfg, 10)
  for micro_steps, update in ((1, 0), (2, 0), (3, 1), (8, 3), (20, 9)):
    lrs = optim.learning_rates(cfg, micro_steps, steps, 0.25, grouped=True)
    expected = float(schedule(update)) * 0.25
    assert lrs == pytest.approx({'proj': 0.5 * expected, 'classifiers': 2.0 * expected})
  assert optim.learning_rates(cfg, 3, steps, 1.0, grouped=False) == pytest.approx(
      {'all': float(schedule(1))})
  constant = stage_cfg()
  assert optim.learning_rates(constant, 5, optim.schedule_steps(constant, 9), 0.5,
                              grouped=True) == {'all': pytest.approx(5e-4)}


def test_writer_records_scalars_text_and_hparams(tmp_path):
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  writer.scalars(3, {'train/lr/all': 0.5})
  writer.text(0, 'config', 'seed: 1\ntrain:\n  epochs: 2')
  writer.hparams(0, {'optim.lr': 0.1, 'model.gru': True, 'name': 'x', 'sizes': [1, 2],
                     'none': None})
  writer.close()
  assert tb.scalars(str(tmp_path)) == {'train/lr/all': [(3, 0.5)]}
  [text] = tb.texts(str(tmp_path))['config/text_summary']
  assert text == '    seed: 1\n    train:\n      epochs: 2\n'  # a Markdown code block
  assert tb.hparams(str(tmp_path)) == [{'optim.lr': 0.1, 'model.gru': True, 'name': 'x',
                                        'sizes': '[1, 2]', 'none': 'None'}]


def test_results_json_carries_provenance_config_and_stages(tmp_path):
  config = ml_collections.ConfigDict({'seed': 3, 'train': {'epochs': 2}})
  stages = {'teacher': {'test_weighted_f1': 0.5, 'best_epoch': 2,
                        'history': [{'epoch': 1, 'dev_weighted_f1': 0.4},
                                    {'epoch': 2, 'dev_weighted_f1': 0.5}]}}
  trainer.save_results(stages, str(tmp_path), config)
  run = runs.load_run(str(tmp_path))
  assert run['mer_jax_version'] == '0.1.0'
  assert run['git_commit'] == fingerprints.provenance()['git_commit']
  assert run['config'] == {'seed': 3, 'train': {'epochs': 2}}
  assert runs.load_results(str(tmp_path)) == stages
  assert runs.headline_stage(str(tmp_path)) == 'teacher'


def test_results_json_of_an_older_version_still_reads(tmp_path):
  """Before provenance and `stages`: the stages at the top, history numbered from 0."""
  old = {'teacher': {'test_weighted_f1': 0.5, 'best_epoch': 2,
                     'history': [{'epoch': 0, 'dev_weighted_f1': 0.4},
                                 {'epoch': 1, 'dev_weighted_f1': 0.5}]},
         'fusion': {'test_weighted_f1': 0.6, 'best_epoch': 1}}
  (tmp_path / 'results.json').write_text(json.dumps(old))
  run = runs.load_run(str(tmp_path))
  assert (run['mer_jax_version'], run['git_commit'], run['config']) == (None, None, None)
  assert [h['epoch'] for h in run['stages']['teacher']['history']] == [1, 2]
  assert run['stages']['fusion'] == old['fusion']
  assert runs.headline_stage(str(tmp_path)) == 'fusion'


def test_git_commit_is_none_outside_a_checkout_of_the_package(monkeypatch):
  def elsewhere(*args, **kwargs):
    return subprocess.CompletedProcess(args, 0, stdout='/some/other/repo\nabc123\n')

  monkeypatch.setattr(subprocess, 'run', elsewhere)
  assert fingerprints.provenance()['git_commit'] is None

  def no_git(*args, **kwargs):
    raise FileNotFoundError('git')

  monkeypatch.setattr(subprocess, 'run', no_git)
  assert fingerprints.provenance() == {'mer_jax_version': '0.1.0', 'git_commit': None}


def test_a_loop_saved_with_epochs_from_0_is_renumbered_from_1():
  old = {'epoch': 3, 'best_f1': 0.5, 'best_epoch': 1, 'bad_epochs': 1, 'plateau_epochs': 1,
         'history': [{'epoch': e, 'dev_weighted_f1': 0.4} for e in range(3)]}
  loop = stage_lib.LoopState.from_meta(old)
  assert loop.best_epoch == 2 and [h['epoch'] for h in loop.history] == [1, 2, 3]
  assert loop.epoch == 3 and loop.first_epoch == 1
  saved = {**old, 'best_epoch': 2, 'history': loop.history, 'first_epoch': 1}
  assert stage_lib.LoopState.from_meta(saved) == loop
  assert stage_lib.LoopState().best_epoch == 0  # no evaluation yet
