"""SIGTERM mid-epoch: the run checkpoints at the current step, exits with status 143, and the
rerun resumes to exactly the uninterrupted run's results."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from mer_jax.experiments import runs
from mer_jax.train import preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Teacher only, on enough dialogues for 20 steps an epoch, checkpointing every 3 steps.
OVERRIDES = ('--config.train.epochs=2', "--config.train.stages=('teacher',)",
             '--config.data.synthetic.num_dialogues.train=160',
             '--config.train.checkpoint_every_steps=3', '--config.train.progress_bar=False')


def command(workdir, cache):
  return [sys.executable, '-m', 'mer_jax.main', '--config', 'configs/default.py:tiny',
          '--workdir', str(workdir), *OVERRIDES, f'--config.train.compilation_cache_dir={cache}']


def env(cache):
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', OMP_NUM_THREADS='1',
              JAX_COMPILATION_CACHE_DIR=str(cache))


def saved_steps(workdir):
  latest = os.path.join(workdir, 'checkpoints', 'teacher', 'latest')
  if not os.path.isdir(latest):
    return []
  return sorted(int(d) for d in os.listdir(latest) if d.isdigit())


def test_sigterm_checkpoints_and_the_rerun_matches_an_uninterrupted_run(tmp_path):
  cache = tmp_path / 'cache'
  reference = tmp_path / 'reference'
  proc = subprocess.run(command(reference, cache), cwd=ROOT, env=env(cache),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]

  workdir = tmp_path / 'preempted'
  proc = subprocess.Popen(command(workdir, cache), cwd=ROOT, env=env(cache),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not saved_steps(str(workdir)) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  assert proc.poll() is None, 'the run ended before it could be terminated'
  first_saved = saved_steps(str(workdir))[-1]
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == preemption.PREEMPTED_EXIT_CODE, stderr[-3000:]
  assert 'terminated at step' in stderr
  stopped_at = int(stderr.split('terminated at step ')[1].split()[0])
  assert stopped_at >= first_saved
  assert saved_steps(str(workdir))[-1] == stopped_at  # saved where it stopped, not at a period
  assert not runs.is_finished(str(workdir))

  proc = subprocess.run(command(workdir, cache), cwd=ROOT, env=env(cache),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'resuming at epoch' in proc.stdout + proc.stderr
  expected = json.loads((reference / 'results.json').read_text())['teacher']
  resumed = json.loads((workdir / 'results.json').read_text())['teacher']
  for key in ('test_weighted_f1', 'test_macro_f1', 'test_accuracy', 'dev_weighted_f1'):
    assert resumed[key] == expected[key], key
  a = runs.load_test_predictions(str(reference), 'teacher')
  b = runs.load_test_predictions(str(workdir), 'teacher')
  np.testing.assert_array_equal(a['probs'], b['probs'])
