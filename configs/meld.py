"""MELD with the authors' hyperparameters (their MELD/Dataset/config.json), from feature shards.

  python -m mer_jax.main --config configs/meld.py --config.data.shard_dir=/path/to/meld_shards \
      --workdir /tmp/mer_meld

The shard folder holds train/dev/test splits with text 1024-d, audio 1024-d and visual 768-d
utterance features (see mer_jax/data/shards.py for the format).
"""

from configs import default


def get_config(arg=None):
  c = default.base_config()
  c.data.source = 'shards'
  c.data.shard_dir = ''  # required: --config.data.shard_dir=...
  # The authors' batch is 16 shuffled utterances. Ours packs whole dialogues; MELD's longest test
  # dialogue has 33 utterances, so 40 node slots hold it (batch fill: docs/performance.md).
  c.batch.max_nodes = 40
  c.batch.max_graphs = 8
  if arg == 'authors_batch_scope':  # The authors' graphs over shuffled 16-utterance batches.
    c.graph.scope = 'batch'
    c.model.fusion.alignment_scope = 'batch'
    c.batch.max_nodes = 24
  return c
