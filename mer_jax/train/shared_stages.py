"""Trained encoder stages shared between runs whose settings for that stage are the same.

Most ablations change only the fusion stage (gates, cross-attention, MoE, fusion inputs, loss
terms), or only which encoders run (modality subsets); retraining identical teachers and students,
and their cross-fitting folds, for each of them is most of a sweep's time and disk. With
`train.shared_stages_dir` set, each encoder stage gets a fingerprint: the hash of every setting
that can change how it trains (mer_jax/train/fingerprints.py: the config minus the keys that
cannot affect it; the manifest's train and dev entries, which hold the checksum of every shard
file; the fingerprints of the frozen stages it distils from; for a cross-fitting fold, its fold
index), and of the mer_jax source, so a stage trained by other code is never reused. Then:

  * a finished stage with that fingerprint in the shared folder is linked into the run's
    checkpoint folder (a symlink) and restored, not trained;
  * a stage the run trains is moved into the shared folder when finished and linked back;
  * while one run trains a fingerprint, others that need it wait for it (a lock file holding
    the trainer's host and pid; a lock whose process has died on this host is taken over).

Single-process runs only: the file operations are not coordinated between the processes of a
multi-host job, which therefore refuses the setting.

A new config key counts unless fingerprints.py lists it, so it can cause a missed reuse but never
a wrong one. tests/test_shared_stages.py checks that a
reused stage equals a retrained one, prediction for prediction, for ablations that reuse stages.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import shutil
import time

from mer_jax import console
from mer_jax import locks
from mer_jax import stages
from mer_jax.train import fingerprints

COMPLETE = 'COMPLETE'  # written into a shared stage folder once it holds a finished stage


@functools.lru_cache(maxsize=1)
def code_identity() -> str:
  """Hash of every Python file of the mer_jax package (path and contents)."""
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  h = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(package, '**', '*.py'), recursive=True)):
    h.update(os.path.relpath(path, package).encode())
    with open(path, 'rb') as f:
      h.update(hashlib.sha256(f.read()).digest())
  return h.hexdigest()


def fingerprint(config, stage: str, data_id: str, dependencies: dict[str, str], *,
                fold: int | None = None) -> str:
  """The shared-folder name of a stage: `<stage>-<hash>`."""
  if not stages.is_encoder(stage):
    raise ValueError(f'only encoder stages {stages.ENCODER_STAGES} are shared, not {stage!r}')
  payload = json.dumps({'settings': fingerprints.stage_settings(config, stage, fold=fold),
                        'data': data_id,
                        'frozen': dependencies, 'code': code_identity()},
                       sort_keys=True, default=str)
  return f'{stage}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}'


class SharedStages:
  """The shared folder: finished stages under `<fingerprint>/`, locks as `<fingerprint>.lock`."""

  def __init__(self, root: str, poll_seconds: float = 2.0):
    self.root = os.path.abspath(root)
    self.poll_seconds = poll_seconds
    os.makedirs(self.root, exist_ok=True)

  def path(self, fp: str) -> str:
    return os.path.join(self.root, fp)

  def is_complete(self, fp: str) -> bool:
    return os.path.isfile(os.path.join(self.path(fp), COMPLETE))

  def link(self, fp: str, stage_dir: str) -> None:
    """Points the run's `stage_dir` at the shared copy (the run has no checkpoints there)."""
    if os.path.islink(stage_dir):
      os.unlink(stage_dir)
    elif os.path.exists(stage_dir):
      shutil.rmtree(stage_dir)
    os.makedirs(os.path.dirname(stage_dir), exist_ok=True)
    os.symlink(self.path(fp), stage_dir)

  def acquire(self, fp: str) -> bool:
    """Waits until `fp` is shared (False) or this process may train it (True, lock held)."""
    lock = self.path(fp) + '.lock'
    said = False
    while True:
      if self.is_complete(fp):
        return False
      if locks.try_acquire(lock, 'shared stages'):
        return True
      if not said:
        console.say('shared stages: waiting for another run to finish %s', fp)
        said = True
      time.sleep(self.poll_seconds)

  def release(self, fp: str) -> None:
    locks.release(self.path(fp) + '.lock')

  def publish(self, fp: str, stage_dir: str) -> None:
    """Moves a finished stage from the run into the shared folder and links it back."""
    target = self.path(fp)
    if os.path.islink(stage_dir) or self.is_complete(fp):
      return
    if os.path.exists(target):  # left over from a publisher that died mid-way
      shutil.rmtree(target)
    shutil.move(stage_dir, target)  # a rename on one file system; COMPLETE marks it whole
    with open(os.path.join(target, COMPLETE), 'w') as f:
      f.write(stage_dir)
    os.symlink(target, stage_dir)
