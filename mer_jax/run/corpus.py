"""A run's corpus: the shard folder config.data.source names, made ready, and its splits opened.

'synthetic' generates the embedded corpus, 'text_csv' encodes dialogue CSVs with the text front
end, 'raw' runs the clips front end (faces, LipSyncNet, encoders), and 'shards' reads an existing
folder (a gs:// one is first copied, verified, into the data cache). Everything generated goes to
the data cache (data.cache_dir, else workdir/data), one folder per setting, built once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from mer_jax import console
from mer_jax.data import cache
from mer_jax.data import sources
from mer_jax.data import staging
from mer_jax.data import synthetic
from mer_jax.train import cpu_backend
from mer_jax.train import preemption


def synthetic_dir(config, workdir: str) -> str:
  """A folder per generator setting, so changing the corpus config never reuses stale shards."""
  s = config.data.synthetic
  key = json.dumps({'seed': s.seed, 'n': s.num_dialogues.to_dict(),
                    'dims': config.data.dims.to_dict(), 'labels': list(config.label_names),
                    'story': dataclasses.asdict(synthetic.story_from_config(config))},
                   sort_keys=True, default=str)
  digest = hashlib.sha1(key.encode()).hexdigest()[:10]
  return os.path.join(cache.data_root(config, workdir), 'synthetic-' + digest)


def ensure_synthetic(config, workdir: str) -> str:
  out = synthetic_dir(config, workdir)
  s = config.data.synthetic

  def build(folder):
    console.say('generating the synthetic corpus into %s', out)
    synthetic.generate_corpus(folder, seed=s.seed, num_dialogues=s.num_dialogues.to_dict(),
                              num_shards=s.num_shards.to_dict(), dims=config.data.dims.to_dict(),
                              label_names=tuple(config.label_names),
                              story=synthetic.story_from_config(config))
  return cache.build_once(out, build)


def _front_ends():
  """The raw-clip and text front ends, imported when a run needs one: with their media, text
  and fine-tuning libraries they add about 1.5 s to the start of every process that imports
  them."""
  from mer_jax.preprocess import raw  # pylint: disable=g-import-not-at-top
  from mer_jax.preprocess import text_features  # pylint: disable=g-import-not-at-top
  return raw, text_features


def prepare_shards(config, workdir: str) -> str:
  """The local shard folder of the run's corpus, built or copied first where needed."""
  source = config.data.source
  if source == 'synthetic':
    return ensure_synthetic(config, workdir)
  if source == 'text_csv':
    _, text_features = _front_ends()
    return text_features.ensure_text_shards(config, workdir)
  if source == 'raw':
    raw, _ = _front_ends()
    return raw.ensure_raw_shards(config, workdir)
  return staging.stage_shards(config.data.shard_dir, cache.data_root(config, workdir))


def open_splits(config, workdir: str) -> sources.SplitSources:
  """The run's train/dev/test splits, its corpus prepared first."""
  return sources.open_shard_splits(prepare_shards(config, workdir), config)


def extract_features(config, workdir: str | None, out: str | None = None) -> str:
  """The front end alone (data.source 'text_csv' or 'raw'): its shards, in the data cache of
  `workdir` or in `out` (overwritten); returns the folder. Resumable like a run."""
  cpu_backend.tune_for_cpu_backend()  # fine-tuning (LipSyncNet, text encoder) trains
  raw, text_features = _front_ends()
  if config.data.source == 'raw':
    if out:
      stats = preemption.run_preemptible(raw.build_raw_shards, config, out,
                                         workdir=workdir or out + '.work')
      raw.report_stats(stats)
      return out
    return preemption.run_preemptible(raw.ensure_raw_shards, config, workdir)
  if out:
    preemption.run_preemptible(text_features.build_text_shards, config, out)
    return out
  return preemption.run_preemptible(text_features.ensure_text_shards, config, workdir)
