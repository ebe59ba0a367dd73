"""Sources of dialogue records: the train/dev/test splits of a shard folder, records held in
memory, and subsets of a source (cross-fitting folds)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import logging

from mer_jax.data import shards


@dataclasses.dataclass
class SplitSources:
  train: shards.DialogueShardSource
  dev: shards.DialogueShardSource
  test: shards.DialogueShardSource
  shard_dir: str
  test_name: str

  @property
  def class_counts(self) -> np.ndarray:
    """Train class counts of the records actually used (skipped records excluded)."""
    return np.asarray(shards.class_counts(self.train, self.train.split), np.int64)


def check_manifest_matches_config(manifest: shards.Manifest, config, shard_dir: str) -> None:
  where = os.path.join(shard_dir, 'manifest.json')
  if tuple(manifest.label_names) != tuple(config.label_names):
    raise shards.ShardError(f'{where}: label_names {list(manifest.label_names)} differ from '
                            f'config.label_names {list(config.label_names)}')
  for m in config.data.modalities:
    if m not in manifest.dims:
      raise shards.ShardError(f'{where}: has no modality {m!r} (has {list(manifest.dims)}); '
                              'set config.data.modalities accordingly')
    if int(manifest.dims[m]) != int(config.data.dims[m]):
      raise shards.ShardError(f'{where}: modality {m!r} has dim {manifest.dims[m]}, '
                              f'config.data.dims.{m} is {config.data.dims[m]}')
  for split in (config.data.train_split, config.data.dev_split, config.data.test_split):
    if split not in manifest.splits:
      raise shards.ShardError(f'{where}: no split {split!r} (has {sorted(manifest.splits)})')


def open_source(shard_dir: str, split: str, config) -> shards.DialogueShardSource:
  return shards.DialogueShardSource(
      shard_dir, split, modalities=tuple(config.data.modalities),
      verify_checksums=config.data.verify_checksums, on_bad_record=config.data.on_bad_record,
      cache_max_bytes=int(config.data.cache_mib) * 2**20)


def open_shard_splits(shard_dir: str, config) -> SplitSources:
  """The train/dev/test splits config.data names, from a local shard folder, checked against the
  config (labels, modalities, dims, splits) and the batch budget."""
  manifest = shards.load_manifest(shard_dir)
  check_manifest_matches_config(manifest, config, shard_dir)
  opened = {}
  for role in ('train', 'dev', 'test'):
    split = config.data[f'{role}_split']
    src = open_source(shard_dir, split, config)
    if getattr(src, 'num_skipped', 0):
      logging.warning('%s/%s: skipped %d bad records (see the log above)', shard_dir, split,
                      src.num_skipped)
    check_split_is_usable(src, f'{shard_dir}/{split}', role, config)
    opened[role] = src
  return SplitSources(train=opened['train'], dev=opened['dev'], test=opened['test'],
                      shard_dir=shard_dir, test_name=config.data.test_split)


def check_split_is_usable(src, where: str, role: str, config) -> None:
  """Refuses at start-up, naming the split, what would otherwise fail after training: no
  dialogues (all skipped, say), no labelled utterance, a dialogue longer than the batch budget."""
  if not len(src):
    skipped = getattr(src, 'num_skipped', 0)
    raise shards.ShardError(f'{where}: the {role} split has no dialogues'
                            + (f' ({skipped} bad records skipped)' if skipped else ''))
  if not np.asarray(src.class_counts).sum():
    raise shards.ShardError(f'{where}: the {role} split has no labelled utterance (every label '
                            'is -1), so it cannot be trained on or scored')
  lengths = np.asarray(src.dialogue_lengths)
  fits = config.batch.max_nodes - 1
  if config.graph.scope == 'dialogue' and lengths.max() > fits:
    raise shards.ShardError(
        f'{where}: dialogue record {int(np.argmax(lengths))} has {int(lengths.max())} '
        f'utterances but config.batch.max_nodes={config.batch.max_nodes} fits {fits}; raise '
        '--config.batch.max_nodes')


@dataclasses.dataclass
class InMemorySource:
  """Random access over records held in memory (the pipeline's source protocol)."""
  records: list

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int):
    return self.records[i]

  @property
  def dialogue_lengths(self) -> np.ndarray:
    return np.asarray([len(r.labels) for r in self.records], np.int32)


@dataclasses.dataclass
class SubsetSource:
  """The records `indices` of a source, renumbered 0..n-1 (a cross-fitting fold)."""
  base: object
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int):
    return self.base[int(self.indices[i])]

  @property
  def dialogue_lengths(self) -> np.ndarray:
    return np.asarray(self.base.dialogue_lengths)[self.indices]


def fold_indices(num_records: int, num_folds: int, seed: int) -> list[np.ndarray]:
  """Dialogue indices of each fold: a seeded permutation cut into near-equal parts."""
  order = np.random.default_rng([seed, 991]).permutation(num_records)
  return [np.sort(part) for part in np.array_split(order, num_folds)]
