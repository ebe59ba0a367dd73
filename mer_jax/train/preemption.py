"""Preemption: SIGTERM asks the training loop to checkpoint and exit instead of dying mid-step.

Cloud TPU and most schedulers send SIGTERM some seconds before they kill a job. The handler only
sets a flag; the loop checks it after every step (`should_stop`), saves the latest checkpoint with
the data-iterator state, and raises `Preempted`, which `mer_jax.main` turns into exit status
PREEMPTED_EXIT_CODE. Rerunning the same command resumes from that step.

With several processes, each host may see the signal at a different step; JAX's coordination
service (started by `jax.distributed.initialize`) picks one step at which every process stops
(`multihost_utils.reached_preemption_sync_point`), so they all save the same step.
"""

from __future__ import annotations

import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a scheduler expects of a terminated job


class Preempted(Exception):
  """Training stopped at a checkpoint because the process was asked to terminate."""

  @classmethod
  def at(cls, what: str, step: int, epoch: int, checkpoint_dir: str) -> 'Preempted':
    return cls(f'{what}: terminated at step {step} (epoch {epoch + 1}); the checkpoint is saved '
               f'in {checkpoint_dir}. Rerun the same command to resume.')


_requested = threading.Event()


def request_stop(signum=None, frame=None) -> None:  # pylint: disable=unused-argument
  _requested.set()


def stop_requested() -> bool:
  return _requested.is_set()


class PreemptionGuard:
  """Installs the SIGTERM handler for the duration of a `with` block (main thread only)."""

  def __enter__(self):
    _requested.clear()
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, request_stop)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


def should_stop(step: int) -> bool:
  """True when this step is where training must checkpoint and exit (same step on every host)."""
  if jax.process_count() > 1:
    return bool(multihost_utils.reached_preemption_sync_point(step))
  return stop_requested()


def run_preemptible(fn, *args, **kwargs):
  """Runs `fn` with the SIGTERM handler installed; a preemption exits with PREEMPTED_EXIT_CODE."""
  with PreemptionGuard():
    try:
      return fn(*args, **kwargs)
    except Preempted as e:
      print(e, file=sys.stderr, flush=True)
      sys.exit(PREEMPTED_EXIT_CODE)
