"""Interrupted training ends where an uninterrupted run ends.

- SIGTERM mid-epoch: the run checkpoints at the current step, exits with status 143, and the
  rerun resumes to exactly the uninterrupted run's results.
- SIGKILL at several random steps (each after a periodic checkpoint, so the work since that
  checkpoint is lost), resuming each time: the same final results.
- A save that died half-way (Orbax's temporary folder left behind) is ignored on resume.

One uninterrupted reference run (teacher only, tiny models, 20 steps an epoch, a checkpoint
every 3 steps) is shared by the tests.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mer_jax.experiments import runs
from mer_jax.train import checkpointing
from mer_jax.train import preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS, STEPS_PER_EPOCH, EVERY = 2, 20, 3
OVERRIDES = (f'--config.train.epochs={EPOCHS}', "--config.train.stages=('teacher',)",
             f'--config.data.synthetic.num_dialogues.train={8 * STEPS_PER_EPOCH}',
             f'--config.train.checkpoint_every_steps={EVERY}', '--config.train.progress_bar=False')
METRICS = ('test_weighted_f1', 'test_macro_f1', 'test_accuracy', 'dev_weighted_f1')


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


def start(workdir, cache):
  return subprocess.Popen(command(workdir, cache), cwd=ROOT, env=env(cache),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc, workdir, at_least: int):
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline:
    steps = saved_steps(str(workdir))
    if steps and steps[-1] >= at_least:
      return steps[-1]
    time.sleep(0.02)
  raise AssertionError(f'no checkpoint at step >= {at_least} while the run was alive')


def finish(workdir, cache):
  proc = subprocess.run(command(workdir, cache), cwd=ROOT, env=env(cache), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def assert_same_results(reference, workdir):
  expected = runs.load_results(str(reference))['teacher']
  got = runs.load_results(str(workdir))['teacher']
  for key in METRICS:
    assert got[key] == expected[key], key
  np.testing.assert_array_equal(runs.load_test_predictions(str(reference), 'teacher')['probs'],
                                runs.load_test_predictions(str(workdir), 'teacher')['probs'])


@pytest.fixture(scope='module', name='reference')
def fixture_reference(tmp_path_factory):
  base = tmp_path_factory.mktemp('preemption')
  finish(base / 'reference', base / 'cache')
  return base


def test_sigterm_checkpoints_and_the_rerun_matches_an_uninterrupted_run(reference):
  cache, workdir = reference / 'cache', reference / 'terminated'
  proc = start(workdir, cache)
  first_saved = wait_for_checkpoint(proc, workdir, EVERY)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == preemption.PREEMPTED_EXIT_CODE, stderr[-3000:]
  stopped_at = int(stderr.split('terminated at step ')[1].split()[0])
  assert first_saved <= stopped_at < EPOCHS * STEPS_PER_EPOCH
  assert saved_steps(str(workdir))[-1] == stopped_at  # saved where it stopped, not at a period
  assert not runs.is_finished(str(workdir))
  resumed = finish(workdir, cache)
  assert 'resuming at epoch' in resumed.stdout + resumed.stderr
  assert_same_results(reference / 'reference', workdir)


def test_sigkill_at_random_steps_then_resume_matches(reference):
  cache, workdir = reference / 'cache', reference / 'killed'
  rng = np.random.default_rng(0)
  periods = np.arange(EVERY, EPOCHS * STEPS_PER_EPOCH // 2, EVERY)
  kill_after = sorted(rng.choice(periods, size=3, replace=False).tolist())
  resumed_from = []
  for target in kill_after:
    proc = start(workdir, cache)
    # A new checkpoint of this attempt, not the one the previous attempt left.
    reached = wait_for_checkpoint(proc, workdir, max([target] + [r + 1 for r in resumed_from]))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed_from.append(reached)
  assert resumed_from == sorted(resumed_from) and len(set(resumed_from)) == 3
  finish(workdir, cache)
  assert_same_results(reference / 'reference', workdir)


def test_a_half_written_save_is_ignored(reference):
  """An Orbax temporary folder (what a crash during a save leaves) never becomes the latest."""
  workdir = reference / 'reference'
  ckpt = checkpointing.StageCheckpoints(str(workdir), 'teacher', read_only=True)
  last = ckpt.latest_step()
  ckpt.close()
  partial = workdir / 'checkpoints' / 'teacher' / 'latest' / f'{last + 50}.orbax-checkpoint-tmp-1'
  partial.mkdir()
  (partial / 'state').mkdir()
  (partial / 'state' / 'garbage').write_bytes(b'\x00' * 10)
  ckpt = checkpointing.StageCheckpoints(str(workdir), 'teacher', read_only=True)
  assert ckpt.latest_step() == last
  assert ckpt.latest_meta()['finished'] is True
  ckpt.close()
