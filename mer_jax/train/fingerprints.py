"""Run fingerprints: what determines each trained stage, checked before a workdir is reused.

Every stage of a run (the encoders, their cross-fitting folds, fusion) has a record: the settings
it reads (the config minus keys that cannot change how it trains), the identity of the data it
trains and is selected on (the train and dev entries of the shards' manifest, which hold every
shard file's sha256), and the fingerprints of the frozen stages it depends on. Its fingerprint is
the hash of the three. The record is kept as `fingerprint.json` in the stage's checkpoint folder.

Before a rerun trains anything, `check_workdir` compares the planned records with the stored
ones. A stage whose fingerprint changed (its own settings, its data, or a stage it depends on)
stops the run with the changed keys listed, or, with `train.on_change='retrain'`, has its
checkpoints removed so that it trains again; the other stages are kept. Evaluation-only settings
(the test split, `eval.*`) are recorded apart: a change re-evaluates without retraining.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
from typing import Any

from etils import epath

from mer_jax import console
from mer_jax import errors
from mer_jax import files
from mer_jax import models
from mer_jax import stages
from mer_jax.data import shards
from mer_jax.data import staging

RECORD_NAME = 'fingerprint.json'

# Keys that never change how any stage trains: logging, paths, caching, how programs compile (at
# most float rounding, as another XLA build would), what happens on a rerun, and evaluation-only
# settings (recorded apart). Where the data come from and how they are read
# are not what they are: that is the manifest's identity.
NEVER = (
    'train.stages', 'train.progress_bar', 'train.log_every_steps', 'train.checkpoint_keep',
    'train.checkpoint_every_steps', 'train.on_change', 'train.checkpoint_dir',
    'train.compilation_cache_dir', 'train.cpu_fast_compile', 'train.shared_stages_dir', 'eval',
    'data.source', 'data.shard_dir', 'data.synthetic', 'data.cache_dir', 'data.read_threads',
    'data.prefetch', 'data.cache_mib', 'data.verify_checksums', 'data.test_split', 'text', 'raw',
    'lipsync',
)
# Keys an encoder stage never reads: the fusion loss's own terms, and which modalities run.
FUSION_ONLY = (
    'data.modalities', 'loss.focal_gamma', 'loss.main_focal_share', 'loss.label_smoothing',
    'loss.use_uncertainty', 'loss.main_weight', 'loss.aux_weights', 'loss.contrastive',
    'loss.contrastive_weight', 'loss.contrastive_temperature', 'loss.contrastive_dim',
)
DISTILL_KEYS = ('loss.distill', 'loss.distill_temperature', 'loss.distill_alpha',
                'loss.distill_cached_teacher')
PER_MODALITY = ('data.dims', 'graph.k', 'graph.temporal_weight')


class SettingsChanged(errors.UserError):
  """A workdir's trained stages were trained with other settings or data."""


def _drop(tree: dict, dotted: str) -> None:
  *parents, leaf = dotted.split('.')
  for p in parents:
    tree = tree.get(p)
    if not isinstance(tree, dict):
      return
  tree.pop(leaf, None)


def stage_settings(config, stage: str, *, fold: int | None = None) -> dict[str, Any]:
  """The part of `config` that can change how `stage` (of cross-fitting fold `fold`) trains."""
  tree = config.to_dict()
  for key in NEVER:
    _drop(tree, key)
  for block in ('model', 'optim'):  # drop the other stages' blocks, keep shared keys
    for other in stages.STAGES:
      if other != stage:
        tree[block].pop(other, None)
  tree['stage'] = stage
  if stage in models.PARAMETER_LAYOUT:
    tree['parameter_layout'] = models.PARAMETER_LAYOUT[stage]
  if not stages.is_encoder(stage):
    return tree
  m = stages.MODALITY_OF_STAGE[stage]
  for key in FUSION_ONLY:
    _drop(tree, key)
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
  return tree


def _split_identity(manifest: shards.Manifest, splits) -> dict[str, Any]:
  entries = manifest.to_json()
  return {'format': entries['format'], 'modalities': entries['modalities'],
          'dims': entries['dims'], 'label_names': entries['label_names'],
          'splits': {s: entries['splits'].get(s) for s in splits}}


def _hash(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def data_identity(shard_dir: str, config, manifest: shards.Manifest | None = None) -> str:
  """Hash of what the stages train and are selected on: the manifest's train and dev entries
  (every shard file's sha256) and how bad records are treated."""
  manifest = manifest or shards.load_manifest(shard_dir)
  splits = (config.data.train_split, config.data.dev_split)
  return _hash([_split_identity(manifest, splits), list(splits), config.data.on_bad_record])


def evaluation_settings(shard_dir: str, config,
                        manifest: shards.Manifest | None = None) -> dict[str, Any]:
  """What only the test scores depend on: the test split (name and content) and `eval.*`."""
  manifest = manifest or shards.load_manifest(shard_dir)
  test = config.data.test_split
  return {'data.test_split': test,
          'test data': _hash(_split_identity(manifest, (test,)))[:16],
          **{f'eval.{k}': v for k, v in config.eval.to_dict().items()}}


@dataclasses.dataclass(frozen=True)
class StageRecord:
  """What determines one trained stage (`name` is its checkpoint folder, e.g. 'fold0/teacher')."""
  name: str
  stage: str
  fold: int | None
  settings: dict[str, Any]
  data: str
  frozen: dict[str, str]  # the checkpoint names of the stages it depends on -> their fingerprint
  evaluation: dict[str, Any]

  @property
  def fingerprint(self) -> str:
    return _hash({'settings': self.settings, 'data': self.data, 'frozen': self.frozen})[:32]

  def to_json(self) -> dict[str, Any]:
    return {'fingerprint': self.fingerprint, **dataclasses.asdict(self)}


def fold_name(stage: str, fold: int) -> str:
  return os.path.join(f'fold{fold}', stage)


def plan(config, shard_dir: str) -> dict[str, StageRecord]:
  """Every stage the run trains, in training order, with its record: the encoders of
  train.stages, and for stacked fusion each fold's encoders, then fusion."""
  manifest = shards.load_manifest(shard_dir)
  data = data_identity(shard_dir, config, manifest)
  evaluation = evaluation_settings(shard_dir, config, manifest)
  run = tuple(config.train.stages)
  encoders = [s for s in run if stages.is_encoder(s)]
  fusion_input = config.model.fusion.input
  records: dict[str, StageRecord] = {}

  def add(name, stage, fold, deps):
    records[name] = StageRecord(
        name=name, stage=stage, fold=fold, data=data, evaluation=evaluation,
        settings=json.loads(json.dumps(stage_settings(config, stage, fold=fold), default=str)),
        frozen={d: records[d].fingerprint for d in deps})

  def encoder_deps(stage):
    return [d for d in stages.prerequisites(stage, distill=config.loss.distill,
                                            fusion_input=fusion_input,
                                            modalities=config.data.modalities) if d in run]

  for s in encoders:
    add(s, s, None, encoder_deps(s))
  if 'fusion' in run:
    deps = [] if fusion_input == 'raw' else list(encoders)
    if fusion_input == 'stacked':
      for k in range(config.model.fusion.stacking_folds):
        for s in encoders:
          add(fold_name(s, k), s, k, [fold_name(d, k) for d in encoder_deps(s)])
          deps.append(fold_name(s, k))
    add('fusion', 'fusion', None, deps)
  return records


def _path(directory: str, name: str) -> epath.Path:
  return epath.Path(directory) / name / RECORD_NAME


def read_record(directory: str, name: str) -> dict[str, Any] | None:
  path = _path(directory, name)
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, OSError) as e:
    raise SettingsChanged(f'{path}: unreadable stage record ({e}); remove the stage folder '
                          f'{path.parent} to train it again') from e


def write_record(directory: str, record: StageRecord) -> None:
  path = _path(directory, record.name)
  if staging.is_remote(str(path)):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record.to_json(), indent=1, default=str))
  else:
    files.write_json(os.fspath(path), record.to_json(), indent=1, default=str)


def _flat(tree: Any, prefix: str = '') -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f'{prefix}.{k}' if prefix else str(k)))
  return out


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """dotted key -> (stored value, new value) for every key that differs ('<absent>' if none)."""
  a, b = _flat(old), _flat(new)
  return {k: (a.get(k, '<absent>'), b.get(k, '<absent>'))
          for k in sorted(set(a) | set(b)) if a.get(k, '<absent>') != b.get(k, '<absent>')}


def _exists(directory: str, name: str) -> bool:
  return (epath.Path(directory) / name).exists()


def _remove_stage(directory: str, name: str) -> None:
  """Removes a stage's checkpoints: renamed aside first, so a crash never leaves half a stage."""
  path = epath.Path(directory) / name
  if not staging.is_remote(str(path)) and os.path.islink(path):
    os.unlink(path)  # a shared stage: the shared copy stays for the runs that use it
    return
  aside = path.parent / f'{path.name}.replaced'
  if aside.exists():
    aside.rmtree()
  if staging.is_remote(str(path)):
    path.rmtree()
    return
  os.replace(path, aside)
  shutil.rmtree(aside)


def check_workdir(records: dict[str, StageRecord], directory: str, on_change: str, *,
                  write: bool = True) -> list[str]:
  """Compares the planned records with the stored ones before any work; returns the stages
  retrained because they changed.

  A changed stage raises SettingsChanged (listing the changed keys and every invalidated stage),
  or, with on_change='retrain', has its checkpoints removed. A stage folder without a record
  (trained by an earlier mer_jax) is kept and given the planned record. Evaluation-only changes
  are reported and recorded. `write=False` (the non-main processes of a multi-process run)
  checks without touching the folder.
  """
  changed: dict[str, dict[str, tuple[Any, Any] | None]] = {}  # key -> (old, new), or None
  for name, record in records.items():
    if not _exists(directory, name):
      continue
    stored = read_record(directory, name)
    if stored is None:
      console.say('stage %s: %s has no stage record (trained by an earlier mer_jax); keeping '
                  'it and recording the current settings', name, epath.Path(directory) / name)
      if write:
        write_record(directory, record)
      continue
    if stored.get('fingerprint') == record.fingerprint:
      evaluation = changed_keys(stored.get('evaluation', {}), record.evaluation)
      if evaluation:
        console.say('stage %s: evaluation settings changed (%s); re-evaluating without '
                    'retraining', name, _describe(evaluation))
        if write:
          write_record(directory, record)
      continue
    diff = changed_keys(stored.get('settings', {}), record.settings)
    if stored.get('data') != record.data:
      diff['training/dev data (manifest)'] = (stored.get('data', '?')[:12], record.data[:12])
    moved = [d for d, fp in record.frozen.items() if stored.get('frozen', {}).get(d) != fp]
    if moved:
      diff[f'frozen stages it depends on changed: {", ".join(moved)}'] = None
    changed[name] = diff
  if not changed:
    return []
  if on_change != 'retrain':
    every = {k: v for d in changed.values() for k, v in d.items()}
    own = {k: v for k, v in every.items() if v is not None} or every
    raise SettingsChanged(
        f'{directory} holds stages trained with other settings: {_describe(own)}. Invalidated '
        f'stages: {", ".join(changed)}. Nothing was changed. Rerun with '
        '--config.train.on_change=retrain to retrain exactly these (the others are kept), or '
        'use a new --workdir.')
  for name, diff in changed.items():
    console.say('stage %s: settings changed (%s); retraining it', name, _describe(diff))
    if write:
      _remove_stage(directory, name)
  return list(changed)


def provenance() -> dict[str, str | None]:
  """The mer_jax version, and the git commit of its source when it runs from a checkout."""
  try:
    version = importlib.metadata.version('mer_jax')
  except importlib.metadata.PackageNotFoundError:
    version = None
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    top, commit = subprocess.run(
        ['git', '-C', root, 'rev-parse', '--show-toplevel', 'HEAD'], capture_output=True,
        text=True, timeout=10, check=True).stdout.splitlines()
  except (OSError, subprocess.SubprocessError, ValueError):
    top, commit = '', None
  # Only a checkout whose top holds the package: an installed one may sit inside some other
  # repository (a virtual environment in a project folder).
  if os.path.realpath(top) != os.path.realpath(root):
    commit = None
  return {'mer_jax_version': version, 'git_commit': commit}


def _describe(diff: dict[str, tuple[Any, Any] | None], limit: int = 12) -> str:
  items = [k if v is None else f'{k} {v[0]!r} -> {v[1]!r}' for k, v in diff.items()]
  more = f' and {len(items) - limit} more' if len(items) > limit else ''
  return '; '.join(items[:limit]) + more
