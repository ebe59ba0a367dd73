"""Interrupted training ends where an uninterrupted run ends.

- SIGTERM mid-epoch: the run checkpoints at the current step, exits with status 143, and the
  rerun resumes to exactly the uninterrupted run's results.
- SIGKILL at a random periodic checkpoint of each epoch (the work since that checkpoint is lost),
  resuming each time: the same final results and the same final train state, leaf for leaf.
- A crash after an epoch's best checkpoint but before its latest one: the rerun redoes the epoch.
- A save that died half-way (Orbax's temporary folder left behind) is ignored on resume.

One uninterrupted reference run is shared by the tests: teacher only, tiny models, 3 epochs of
about 16 steps, a checkpoint every few steps (a period that lands on an epoch's last step,
which the end of the epoch saves again). Its optimizer state has every kind of part to
restore: 2 micro-batches accumulated per update, an EMA, and a learning rate cut on plateau
after epochs 2 and 3 (no epoch after the first improves by early_stopping_min_delta=1.0).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import default
from mer_jax import batch_contract
from mer_jax.data import pipeline
from mer_jax.experiments import runs
from mer_jax.run import corpus
from mer_jax.train import checkpointing
from mer_jax.train import preemption
from tests._checkpoints import latest_checkpoint
from tests._checkpoints import latest_steps
from tests._checkpoints import without_seconds

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 3
LR_REDUCE_FACTOR = 0.5
OVERRIDES = {'train.epochs': EPOCHS, 'train.stages': ('teacher',),
             'data.synthetic.num_dialogues.train': 60, 'train.progress_bar': False,
             'train.early_stopping_min_delta': 1.0, 'optim.teacher.lr_reduce_patience': 1,
             'optim.teacher.lr_reduce_factor': LR_REDUCE_FACTOR,
             'optim.teacher.grad_accum_steps': 2, 'optim.teacher.ema_decay': 0.9}
METRICS = ('test_weighted_f1', 'test_macro_f1', 'test_accuracy', 'dev_weighted_f1')


def command(workdir, *extra):
  """The run; it compiles into the session's cache (JAX_COMPILATION_CACHE_DIR, conftest.py)."""
  return [sys.executable, '-m', 'mer_jax.main', '--config', 'configs/default.py:tiny',
          '--workdir', str(workdir), *[f'--config.{k}={v}' for k, v in OVERRIDES.items()],
          *extra]


def env():
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', OMP_NUM_THREADS='1')


def start(workdir, *extra):
  return subprocess.Popen(command(workdir, *extra), cwd=ROOT, env=env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc, workdir, at_least: int):
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline:
    steps = latest_steps(workdir, 'teacher')
    if steps and steps[-1] >= at_least:
      return steps[-1]
    time.sleep(0.02)
  raise AssertionError(f'no checkpoint at step >= {at_least} while the run was alive')


def finish(workdir, *extra):
  proc = subprocess.run(command(workdir, *extra), cwd=ROOT, env=env(), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def assert_same_results(reference, workdir):
  """Same metrics, test probabilities, loop bookkeeping and final train state (parameters, Adam
  moments, accumulated gradients, EMA, lr scale), leaf for leaf."""
  expected = runs.load_results(str(reference))['teacher']
  got = runs.load_results(str(workdir))['teacher']
  for key in METRICS:
    assert got[key] == expected[key], key
  np.testing.assert_array_equal(runs.load_test_predictions(str(reference), 'teacher')['probs'],
                                runs.load_test_predictions(str(workdir), 'teacher')['probs'])
  want_state, want_meta = latest_checkpoint(str(reference), 'teacher')
  got_state, got_meta = latest_checkpoint(str(workdir), 'teacher')
  assert without_seconds(got_meta['loop']) == without_seconds(want_meta['loop'])
  want_leaves = jax.tree_util.tree_leaves_with_path(want_state)
  got_leaves = jax.tree_util.tree_leaves_with_path(got_state)
  assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
  for (path, want), (_, got) in zip(want_leaves, got_leaves):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want),
                                  err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module', name='plan')
def fixture_plan(tmp_path_factory):
  """The teacher's epoch ends (in steps; how many dialogues a batch packs varies by epoch) and a
  checkpoint period that lands on one of them, so that step is saved twice (see the reference
  test)."""
  config = default.get_config('tiny')
  config.update_from_flattened_dict(OVERRIDES)
  train = corpus.open_splits(config, str(tmp_path_factory.mktemp('plan'))).train
  budget = batch_contract.budget_from_config(config)
  ends = np.cumsum([len(pipeline.make_dataset(train, config=config, budget=budget, train=True,
                                              epoch=e, seed=config.seed))
                    for e in range(EPOCHS)]).tolist()
  # Odd, so that some checkpoints fall between the two micro-batches of an update.
  every = next(k for k in range(3, 10, 2) if any(end % k == 0 for end in ends))
  return {'ends': ends, 'every': every, 'flag': f'--config.train.checkpoint_every_steps={every}'}


@pytest.fixture(scope='module', name='reference')
def fixture_reference(tmp_path_factory, plan):
  base = tmp_path_factory.mktemp('preemption')
  finish(base / 'reference', plan['flag'])
  return base


def test_reference_cut_the_lr_twice_and_saved_a_step_twice(reference, plan):
  workdir = str(reference / 'reference')
  state, meta = latest_checkpoint(workdir, 'teacher')
  assert meta['finished'] and meta['loop']['epoch'] == EPOCHS
  np.testing.assert_allclose(float(state['lr_scale']), LR_REDUCE_FACTOR ** 2, rtol=1e-6)
  # The period landed on an epoch's last step, which the end of the epoch saved again
  # (overwriting the periodic save, where Orbax would refuse a second save of the step).
  assert any(end % plan['every'] == 0 for end in plan['ends'])
  assert latest_steps(workdir, 'teacher')[-1] == plan['ends'][-1]


def test_sigterm_checkpoints_and_the_rerun_matches_an_uninterrupted_run(reference, plan):
  workdir = reference / 'terminated'
  proc = start(workdir, plan['flag'])
  first_saved = wait_for_checkpoint(proc, workdir, plan['every'])
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == preemption.PREEMPTED_EXIT_CODE, stderr[-3000:]
  stopped_at = int(stderr.split('terminated at step ')[1].split()[0])
  assert first_saved <= stopped_at < plan['ends'][-1]
  # Saved where it stopped, not at a period.
  assert latest_steps(workdir, 'teacher')[-1] == stopped_at
  assert not runs.is_finished(str(workdir))
  resumed = finish(workdir, plan['flag'])
  assert 'resuming at epoch' in resumed.stdout + resumed.stderr
  assert_same_results(reference / 'reference', workdir)


def test_sigkill_in_every_epoch_then_resume_matches(reference, plan):
  """Killed after a random periodic checkpoint of each epoch, each one between two micro-batches
  of an accumulated update (an odd step); the last one after the lr was cut. The rerun after each
  kill resumes from the newest checkpoint, losing the work since."""
  workdir, every = reference / 'killed', plan['every']
  rng = np.random.default_rng(0)
  starts = [0] + plan['ends'][:-1]
  # Two periods before the epoch's end at the latest, so the run cannot pass the end before the
  # kill lands.
  targets = [int(rng.choice([s for s in range(lo + 1, hi - 2 * every + 1)
                              if s % every == 0 and s % 2]))
             for lo, hi in zip(starts, plan['ends'])]
  resumed_from, outputs = [], []
  for target in targets:
    proc = start(workdir, plan['flag'])
    # A new checkpoint of this attempt, not the one the previous attempt left.
    reached = wait_for_checkpoint(proc, workdir, max([target] + [r + 1 for r in resumed_from]))
    proc.send_signal(signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed_from.append(reached)
    outputs.append(stdout + stderr)
  assert resumed_from == sorted(resumed_from) and len(set(resumed_from)) == EPOCHS
  final = finish(workdir, plan['flag'])
  outputs.append(final.stdout + final.stderr)
  for output, step in zip(outputs[1:], resumed_from):
    at = [int(s) for s in re.findall(r'resuming at epoch \d+, step (\d+)', output)]
    assert at and at[0] >= step, (at, step)
  assert plan['ends'][-2] < resumed_from[-1] < plan['ends'][-1]
  assert_same_results(reference / 'reference', workdir)


def test_resume_after_a_crash_between_the_best_and_the_latest_save(reference, plan):
  """A crash after an epoch's best checkpoint is written but before its latest one (simulated by
  deleting that latest checkpoint and the results): the rerun resumes from the checkpoint before,
  redoes the end of the epoch, saves best at the same step again, and ends as the run did."""
  first, workdir = reference / 'one_epoch', reference / 'crashed'
  one_epoch = (plan['flag'], '--config.train.epochs=1')
  finish(first, *one_epoch)
  shutil.copytree(first, workdir)
  (workdir / 'results.json').unlink()
  end = plan['ends'][0]
  assert (workdir / 'checkpoints' / 'teacher' / 'best' / str(end)).is_dir()
  shutil.rmtree(workdir / 'checkpoints' / 'teacher' / 'latest' / str(end))
  before = latest_steps(workdir, 'teacher')[-1]
  assert 0 < before < end
  proc = finish(workdir, *one_epoch)
  assert f'resuming at epoch 1, step {before}' in proc.stdout + proc.stderr
  assert_same_results(first, workdir)


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
