"""IEMOCAP (6-class setup) from feature shards.

  python -m mer_jax.main --config configs/iemocap.py --config.data.shard_dir=/path/to/iemocap_shards \
      --workdir /tmp/mer_iemocap
  python -m mer_jax.main --config configs/iemocap.py:shards=/path/to/iemocap_shards \
      --workdir /tmp/mer_iemocap

The authors ship no separate IEMOCAP hyperparameter file; their IEMOCAP scripts read a config.json
of the same shape as MELD's, so the MELD values are the starting point here. IEMOCAP dialogues are
long (over 100 utterances), hence the larger node budget. With `:shards=PATH` (e.g. shards written
by `python -m mer_jax.ingest` from IEMOCAP_features.pkl, whose labels keep that file's order) the
modalities, feature widths, label names and node budget come from the folder's manifest
(configs/meld.py: apply_manifest).
"""

from configs import default
from configs import meld


def get_config(arg=None):
  _, shard_dir = meld.split_arg(arg)
  c = default.base_config()
  c.label_names = ('neutral', 'frustration', 'sadness', 'anger', 'excited', 'happiness')
  c.data.source = 'shards'
  c.data.shard_dir = ''  # required: --config.data.shard_dir=... (or :shards=...)
  c.batch.max_nodes = 128
  c.batch.max_graphs = 4
  if shard_dir:
    meld.apply_manifest(c, shard_dir)
  return c
