"""Opens the train/dev/test splits a config names, generating the synthetic corpus if asked."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import numpy as np
from absl import logging

from mer_jax import console

from mer_jax.data import shards
from mer_jax.data import staging
from mer_jax.data import synthetic


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


def synthetic_dir(config, workdir: str) -> str:
  """A folder per generator setting, so changing the corpus config never reuses stale shards."""
  s = config.data.synthetic
  key = json.dumps({'seed': s.seed, 'n': s.num_dialogues.to_dict(), 'dims': config.data.dims.to_dict(),
                    'labels': list(config.label_names),
                    'story': dataclasses.asdict(corpus_story(config))},
                   sort_keys=True, default=str)
  return os.path.join(data_root(config, workdir), 'synthetic-' + hashlib.sha1(key.encode()).hexdigest()[:10])


def corpus_story(config) -> synthetic.CorpusStory:
  """The embedded corpus's generative story: data.synthetic.story (CorpusStory's fields)."""
  return synthetic.story_from_dict(config.data.synthetic.story.to_dict())


def data_root(config, workdir: str) -> str:
  """Where generated corpora and extracted features live: data.cache_dir, else workdir/data."""
  return config.data.cache_dir or os.path.join(workdir, 'data')


def build_once(out: str, build, marker: str = 'manifest.json') -> str:
  """Runs `build(folder)` unless `out` is complete (has `marker`); builds beside it and renames.

  Runs that share a cache (parallel seeds of a sweep) may build the same folder at once: each
  writes its own partial folder, the first rename wins and the others discard theirs. A crash
  leaves only a partial folder, never a half-written `out`.
  """
  if os.path.exists(os.path.join(out, marker)):
    return out
  partial = f'{out}.partial-{os.getpid()}'
  shutil.rmtree(partial, ignore_errors=True)
  build(partial)
  os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
  try:
    os.rename(partial, out)
  except OSError:
    if not os.path.exists(os.path.join(out, marker)):
      raise
    shutil.rmtree(partial, ignore_errors=True)  # another run finished it first
  return out


def ensure_synthetic(config, workdir: str) -> str:
  out = synthetic_dir(config, workdir)
  s = config.data.synthetic

  def build(folder):
    console.say('generating the synthetic corpus into %s', out)
    synthetic.generate_corpus(folder, seed=s.seed, num_dialogues=s.num_dialogues.to_dict(),
                              num_shards=s.num_shards.to_dict(), dims=config.data.dims.to_dict(),
                              label_names=tuple(config.label_names), story=corpus_story(config))
  return build_once(out, build)


def text_shard_dir(config, workdir: str) -> str:
  from mer_jax.preprocess import text_features  # pylint: disable=g-import-not-at-top
  return os.path.join(data_root(config, workdir), 'text-' + text_features.text_shard_key(config))


def ensure_text_shards(config, workdir: str) -> str:
  """Encodes the config's dialogue CSVs into text-feature shards unless already done."""
  out = text_shard_dir(config, workdir)

  def build(folder):
    from mer_jax.preprocess import text_features  # pylint: disable=g-import-not-at-top
    console.say('encoding %s transcripts with %s into %s', config.text.csv.dir,
                config.text.encoder, out)
    text_features.build_text_shards(config, folder, workdir=workdir)
  return build_once(out, build)


def check_manifest_matches_config(manifest: shards.Manifest, config, shard_dir: str) -> None:
  where = os.path.join(shard_dir, 'manifest.json')
  if tuple(manifest.label_names) != tuple(config.label_names):
    raise ValueError(f'{where}: label_names {list(manifest.label_names)} differ from '
                     f'config.label_names {list(config.label_names)}')
  for m in config.data.modalities:
    if m not in manifest.dims:
      raise ValueError(f'{where}: has no modality {m!r} (has {list(manifest.dims)}); '
                       f'set config.data.modalities accordingly')
    if int(manifest.dims[m]) != int(config.data.dims[m]):
      raise ValueError(f'{where}: modality {m!r} has dim {manifest.dims[m]}, config.data.dims.{m} '
                       f'is {config.data.dims[m]}')
  for split in (config.data.train_split, config.data.dev_split, config.data.test_split):
    if split not in manifest.splits:
      raise ValueError(f'{where}: no split {split!r} (has {sorted(manifest.splits)})')


def open_source(shard_dir: str, split: str, config) -> shards.DialogueShardSource:
  return shards.DialogueShardSource(
      shard_dir, split, modalities=tuple(config.data.modalities),
      verify_checksums=config.data.verify_checksums, on_bad_record=config.data.on_bad_record,
      cache_max_bytes=int(config.data.cache_mib) * 2**20)


def open_splits(config, workdir: str) -> SplitSources:
  if config.data.source == 'synthetic':
    shard_dir = ensure_synthetic(config, workdir)
  elif config.data.source == 'text_csv':
    shard_dir = ensure_text_shards(config, workdir)
  elif config.data.source == 'raw':
    from mer_jax.preprocess import raw  # pylint: disable=g-import-not-at-top
    shard_dir = raw.ensure_raw_shards(config, workdir)
  else:
    # gs:// folders are copied (verified) into the data cache: ArrayRecord reads local files.
    shard_dir = staging.stage_shards(config.data.shard_dir, data_root(config, workdir))
  manifest = shards.load_manifest(shard_dir)
  check_manifest_matches_config(manifest, config, shard_dir)
  opened = {}
  for role in ('train', 'dev', 'test'):
    split = config.data[f'{role}_split']
    src = open_source(shard_dir, split, config)
    if getattr(src, 'num_skipped', 0):
      logging.warning('%s/%s: skipped %d bad records (see the log above)', shard_dir, split,
                      src.num_skipped)
    longest = int(np.max(src.dialogue_lengths)) if len(src) else 0
    if config.graph.scope == 'dialogue' and longest > config.batch.max_nodes - 1:
      raise ValueError(
          f'{shard_dir}/{split}: the longest dialogue has {longest} utterances but '
          f'config.batch.max_nodes={config.batch.max_nodes} fits {config.batch.max_nodes - 1}; '
          f'raise --config.batch.max_nodes')
    opened[role] = src
  return SplitSources(train=opened['train'], dev=opened['dev'], test=opened['test'],
                      shard_dir=shard_dir, test_name=config.data.test_split)


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
