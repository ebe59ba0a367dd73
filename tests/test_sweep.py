"""A real sweep through its command line: two variants x two seeds in parallel processes, the
comparison and results page it writes, resumption, and determinism of a rerun seed.

Runs are the tiny config, one epoch, teacher only, without confusion-matrix images (the runs'
reports still hold the matrices the page sums), so the module stays under a minute; they
share the test worker's persistent compilation cache (tests/conftest.py), so runs of the same
programs in other tests of the worker save them compiles, and the reruns here compile nothing.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mer_jax.experiments import compare
from mer_jax.experiments import runs

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ('--config.train.epochs=1', "--config.train.stages=('teacher',)",
             '--config.train.progress_bar=False', '--config.eval.confusion_png=False')
SWEEP = '''
def get_sweep():
  return {{'title': 'tiny sweep', 'reference': 'full', 'seeds': 2,
           'overrides': {overrides!r},
           'variants': {{'full': 'configs/ablations.py:full,tiny',
                         'loss_ce': 'configs/ablations.py:loss_ce,tiny'}}}}
'''


def env(cache):
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', OMP_NUM_THREADS='1',
              JAX_COMPILATION_CACHE_DIR=str(cache))


@pytest.fixture(scope='module', name='sweep_dir')
def fixture_sweep_dir(tmp_path_factory, shared_compilation_cache):
  base = tmp_path_factory.mktemp('sweep')
  cache = shared_compilation_cache
  overrides = OVERRIDES + (f'--config.train.compilation_cache_dir={cache}',)
  (base / 'tiny_sweep.py').write_text(SWEEP.format(overrides=overrides))
  args = [sys.executable, '-m', 'mer_jax.experiments.sweep', '--sweep',
          str(base / 'tiny_sweep.py'), '--workdir', str(base / 'exp'), '--parallel', '2',
          '--bootstrap_samples', '200']
  proc = subprocess.run(args, cwd=ROOT, env=env(cache), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return base, args, proc.stdout, cache


def test_sweep_runs_every_variant_and_seed(sweep_dir):
  base, _, stdout, _ = sweep_dir
  exp = base / 'exp'
  for variant in ('full', 'loss_ce'):
    assert [os.path.basename(r) for r in runs.seed_runs(str(exp / variant))] == ['seed_0',
                                                                                 'seed_1']
    assert (exp / variant / 'summary.md').is_file()
  # The corpus was generated once, in the experiment's shared data folder.
  assert [d for d in os.listdir(exp / 'data') if d.startswith('synthetic-')]
  assert not (exp / 'full' / 'seed_0' / 'data').exists()
  assert stdout.count('start ') == 4
  # Each run's teacher was shared (no two runs here train the same one: loss_ce changes it).
  shared = sorted(os.listdir(exp / 'shared_stages'))
  assert len(shared) == 4 and all(s.startswith('teacher-') for s in shared)
  for variant in ('full', 'loss_ce'):
    teacher = exp / variant / 'seed_0' / 'checkpoints' / 'teacher'
    assert teacher.is_symlink() and os.path.dirname(os.path.realpath(teacher)) == os.path.realpath(
        exp / 'shared_stages')


def test_sweep_comparison_and_page(sweep_dir):
  base, _, stdout, _ = sweep_dir
  exp = base / 'exp'
  result = json.loads((exp / 'sweep.json').read_text())
  summary = result['summaries']['loss_ce']
  assert summary['headline_stage'] == 'teacher'
  seeds_f1 = [r['weighted_f1'] for r in summary['stages']['teacher']['per_seed']]
  assert summary['stages']['teacher']['weighted_f1']['mean'] == pytest.approx(np.mean(seeds_f1))
  recomputed = compare.compare_paths(str(exp / 'loss_ce'), str(exp / 'full'), samples=200,
                                     metrics=('weighted_f1',))['weighted_f1']
  stored = result['comparisons']['loss_ce']
  for key in ('difference', 'ci_low', 'ci_high', 'p_value', 'p_randomization'):
    assert stored[key] == pytest.approx(recomputed[key]), key
  page = (exp / 'report' / 'index.html').read_text()
  assert f'{100 * stored["difference"]:+.2f}' in page
  assert (exp / 'report' / 'curves_loss_ce.png').is_file()
  assert 'Main results' in stdout
  # Every run's one attempt is timed, and the page gives the sums.
  total = result['run_time']
  assert (total['runs'], total['attempts'], total['untimed']) == (4, 4, 0)
  assert 0 < total['cpu_seconds'] and 0 < total['wall_seconds'] < result['wall_seconds'] * 4
  assert f'{total["cpu_seconds"]:.0f} s CPU' in page


def test_rerunning_a_sweep_skips_finished_runs(sweep_dir):
  _, args, _, cache = sweep_dir
  proc = subprocess.run(args, cwd=ROOT, env=env(cache), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'start ' not in proc.stdout


def test_same_seed_reproduces_the_run_exactly(sweep_dir):
  base, _, _, cache = sweep_dir
  first = base / 'exp' / 'full' / 'seed_1'
  again = base / 'again'
  args = [sys.executable, '-m', 'mer_jax.main', '--config', 'configs/ablations.py:full,tiny',
          '--workdir', str(again), '--config.seed=1', *OVERRIDES,
          f'--config.train.compilation_cache_dir={cache}']
  proc = subprocess.run(args, cwd=ROOT, env=env(cache), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for stage in ('teacher',):
    a = runs.load_test_predictions(str(first), stage)
    b = runs.load_test_predictions(str(again), stage)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f'{stage} {key}')
  results_a = runs.load_results(str(first))
  results_b = runs.load_results(str(again))
  for stage in results_a:
    for key in ('test_weighted_f1', 'test_macro_f1', 'test_accuracy', 'dev_weighted_f1'):
      assert results_a[stage][key] == results_b[stage][key]
