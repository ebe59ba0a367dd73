"""Trained encoder stages shared between runs whose settings for that stage are the same.

Most ablations change only the fusion stage (gates, cross-attention, MoE, fusion inputs, loss
terms), or only which encoders run (modality subsets); retraining identical teachers and students,
and their cross-fitting folds, for each of them is most of a sweep's time and disk. With
`train.shared_stages_dir` set, each encoder stage gets a fingerprint: the hash of every setting
that can change how it trains (the config minus the keys listed below as not affecting it; the
data's manifest, which holds the checksum of every shard file; the fingerprints of the frozen
stages it distils from; for a cross-fitting fold, its fold index; the hash of the mer_jax source,
so a stage trained by other code is never reused). Then:

  * a finished stage with that fingerprint in the shared folder is linked into the run's
    checkpoint folder (a symlink) and restored, not trained;
  * a stage the run trains is moved into the shared folder when finished and linked back;
  * while one run trains a fingerprint, others that need it wait for it (a lock file holding
    the trainer's host and pid; a lock whose process has died on this host is taken over).

Single-process runs only: the file operations are not coordinated between the processes of a
multi-host job, which therefore refuses the setting.

Keys are left out of the fingerprint only when they cannot change the stage's training (the
fusion model's and the other encoders' settings, logging, caching); anything new counts, so a
new key can cause a missed reuse but never a wrong one. tests/test_shared_stages.py checks that a
reused stage equals a retrained one, prediction for prediction, for ablations that reuse stages.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import shutil
import socket
import time
from typing import Any

from mer_jax import console
from mer_jax import stages

COMPLETE = 'COMPLETE'  # written into a shared stage folder once it holds a finished stage

# Keys that never change how an encoder stage trains (besides the other modalities' entries of
# per-modality settings, and the other stages' model/optim blocks, handled below).
IGNORED = (
    'train.stages', 'train.progress_bar', 'train.log_every_steps', 'train.checkpoint_keep',
    'train.checkpoint_every_steps', 'train.on_change', 'train.checkpoint_dir', 'train.compilation_cache_dir',
    'train.shared_stages_dir', 'eval',
    # Where the data comes from and how it is read; what it is, is the manifest's checksums.
    'data.source', 'data.shard_dir', 'data.synthetic', 'data.cache_dir', 'data.read_threads',
    'data.prefetch', 'data.cache_mib', 'data.verify_checksums', 'data.modalities', 'text', 'raw',
    'lipsync',
    # The fusion loss's own terms.
    'loss.focal_gamma', 'loss.main_focal_share', 'loss.label_smoothing', 'loss.use_uncertainty',
    'loss.main_weight', 'loss.aux_weights', 'loss.contrastive', 'loss.contrastive_weight',
    'loss.contrastive_temperature', 'loss.contrastive_dim',
)
DISTILL_KEYS = ('loss.distill', 'loss.distill_temperature', 'loss.distill_alpha',
                'loss.distill_cached_teacher')
PER_MODALITY = ('data.dims', 'graph.k', 'graph.temporal_weight')


def _drop(tree: dict, dotted: str) -> None:
  *parents, leaf = dotted.split('.')
  for p in parents:
    tree = tree.get(p)
    if not isinstance(tree, dict):
      return
  tree.pop(leaf, None)


def stage_settings(config, stage: str, *, fold: int | None = None) -> dict[str, Any]:
  """The part of `config` that can change how encoder `stage` (of fold `fold`) trains."""
  if not stages.is_encoder(stage):
    raise ValueError(f'only encoder stages {stages.ENCODER_STAGES} are shared, not {stage!r}')
  m = stages.MODALITY_OF_STAGE[stage]
  tree = config.to_dict()
  for key in IGNORED:
    _drop(tree, key)
  for block in ('model', 'optim'):  # drop the other stages' blocks, keep shared keys
    for other in stages.STAGES:
      if other != stage:
        tree[block].pop(other, None)
  if stage == 'teacher':
    for key in DISTILL_KEYS:
      _drop(tree, key)
  for key in PER_MODALITY:
    group, name = key.split('.')
    tree[group][name] = tree[group][name].get(m)
  # The augmentation settings the stage reads: its own modality's, and the text's too for a
  # student distilling from a teacher that reads augmented text.
  read = {m}
  if stage != 'teacher' and config.loss.distill and not config.augment.clean_frozen_inputs:
    read.add('t')
  tree['augment'] = {k: v for k, v in tree['augment'].items()
                     if k == 'enabled' or k.split('_')[0] in read
                     or (k == 'clean_frozen_inputs' and stage != 'teacher')}
  # Fold membership depends on the number of folds (and the seed, kept above).
  tree['fold'] = None if fold is None else [fold, config.model.fusion.stacking_folds]
  tree['stage'] = stage
  return tree


def data_identity(shard_dir: str, config) -> str:
  """Hash of the shards' manifest (every file's sha256) and the splits the run reads."""
  with open(os.path.join(shard_dir, 'manifest.json'), 'rb') as f:
    manifest = f.read()
  splits = [config.data.train_split, config.data.dev_split, config.data.test_split,
            config.data.on_bad_record]
  return hashlib.sha256(manifest + json.dumps(splits).encode()).hexdigest()


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
  payload = json.dumps({'settings': stage_settings(config, stage, fold=fold), 'data': data_id,
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
    me = f'{socket.gethostname()} {os.getpid()}'
    said = False
    while True:
      if self.is_complete(fp):
        return False
      try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        if _holder_is_dead(lock):
          console.say('shared stages: taking over %s from a process that ended', lock)
          _remove(lock)
          continue
        if not said:
          console.say('shared stages: waiting for another run to finish %s', fp)
          said = True
        time.sleep(self.poll_seconds)
        continue
      with os.fdopen(fd, 'w') as f:
        f.write(me)
      return True

  def release(self, fp: str) -> None:
    _remove(self.path(fp) + '.lock')

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


def _remove(path: str) -> None:
  try:
    os.unlink(path)
  except FileNotFoundError:
    pass


def _holder_is_dead(lock: str) -> bool:
  """True when the lock's process ran on this host and no longer exists."""
  try:
    with open(lock) as f:
      host, pid = f.read().split()
  except (FileNotFoundError, ValueError):
    return False  # being written, or just removed: look again
  if host != socket.gethostname():
    return False
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    return False
  return False
