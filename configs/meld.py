"""MELD with the authors' hyperparameters (their MELD/Dataset/config.json), from feature shards.

  python -m mer_jax.main --config configs/meld.py --config.data.shard_dir=/path/to/meld_shards \
      --workdir /tmp/mer_meld
  python -m mer_jax.main --config configs/meld.py:shards=/path/to/meld_shards \
      --workdir /tmp/mer_meld

The shard folder holds train/dev/test splits with text 1024-d, audio 1024-d and visual 768-d
utterance features (see mer_jax/data/shards.py for the format). With `:shards=PATH` (e.g. shards
written by `python -m mer_jax.ingest`, whose widths differ) the modalities, feature widths,
label names and node budget come from the folder's manifest (`apply_manifest`); combine with a
variant as `:authors_batch_scope,shards=PATH`.
"""

import math

import ml_collections

from configs import default
from mer_jax import stages
from mer_jax.data import shards

SHARDS_PREFIX = 'shards='


def split_arg(arg):
  """(variant, shard folder) of a config argument 'VARIANT', 'shards=PATH' or
  'VARIANT,shards=PATH' (the path is everything after 'shards=')."""
  if not arg:
    return '', ''
  head, sep, path = arg.partition(SHARDS_PREFIX)
  if not sep:
    return arg, ''
  if head and not head.endswith(','):
    raise ValueError(f'config argument {arg!r}: write VARIANT,shards=PATH')
  if not path:
    raise ValueError(f'config argument {arg!r}: shards= needs a shard folder')
  return head.rstrip(','), path


def apply_manifest(c: ml_collections.ConfigDict, shard_dir: str) -> None:
  """Points `c` at `shard_dir` and takes from its manifest what it fixes: the modalities (those of
  t, a, v it has), their widths, the label names in its order, a node budget that fits its
  longest dialogue, and the stages of those modalities (the text teacher alone for text-only
  shards; no distillation without text). The run checks the shards against the config again."""
  manifest = shards.load_manifest(shard_dir)
  modalities = tuple(m for m in stages.MODALITIES if m in manifest.dims)
  if not modalities:
    raise ValueError(f'{shard_dir}: the manifest has none of the modalities '
                     f'{stages.MODALITIES} (it has {list(manifest.modalities)})')
  c.data.source = 'shards'
  c.data.shard_dir = shard_dir
  c.data.modalities = modalities
  c.data.dims = ml_collections.ConfigDict({m: int(manifest.dims[m]) for m in modalities})
  c.label_names = tuple(manifest.label_names)
  longest = max(split.max_dialogue_len for split in manifest.splits.values())
  if longest + 1 > c.batch.max_nodes:  # one node slot is kept for padding
    c.batch.max_nodes = 8 * math.ceil((longest + 1) / 8)
  c.train.stages = ('teacher',) if modalities == ('t',) else stages.stages_for(modalities)
  if 't' not in modalities:
    c.loss.distill = False


def get_config(arg=None):
  variant, shard_dir = split_arg(arg)
  c = default.base_config()
  c.data.source = 'shards'
  c.data.shard_dir = ''  # required: --config.data.shard_dir=... (or :shards=...)
  # The authors' batch is 16 shuffled utterances. Ours packs whole dialogues; MELD's longest test
  # dialogue has 33 utterances, so 40 node slots hold it (batch fill: docs/performance.md).
  c.batch.max_nodes = 40
  c.batch.max_graphs = 8
  if variant == 'authors_batch_scope':  # The authors' graphs over shuffled 16-utterance batches.
    c.graph.scope = 'batch'
    c.model.fusion.alignment_scope = 'batch'
    c.batch.max_nodes = 24
  if shard_dir:
    apply_manifest(c, shard_dir)
  return c
