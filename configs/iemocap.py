"""IEMOCAP (6-class setup) from feature shards.

  python -m mer_jax.main --config configs/iemocap.py --config.data.shard_dir=/path/to/iemocap_shards \
      --workdir /tmp/mer_iemocap

The authors ship no separate IEMOCAP hyperparameter file; their IEMOCAP scripts read a config.json
of the same shape as MELD's, so the MELD values are the starting point here. IEMOCAP dialogues are
long (over 100 utterances), hence the larger node budget.
"""

from configs import default


def get_config(arg=None):
  del arg
  c = default.base_config()
  c.label_names = ('neutral', 'frustration', 'sadness', 'anger', 'excited', 'happiness')
  c.data.source = 'shards'
  c.data.shard_dir = ''  # required: --config.data.shard_dir=...
  c.batch.max_nodes = 128
  c.batch.max_graphs = 4
  return c
