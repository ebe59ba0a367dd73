"""IEMOCAP-format dialogue CSVs (6 classes) -> text features -> graph text teacher.

  python -m mer_jax.main --config configs/iemocap_text.py \
      --config.text.csv.dir=/path/to/csvs --workdir /tmp/mer_iemocap_text

The folder holds `{split}.csv` with columns Dialogue_ID, Utterance_ID, Utterance, Speaker,
Emotion (labels neutral, frustration, sadness, anger, excited, happiness; the short forms
neu/fru/sad/ang/exc/hap are accepted). Files named otherwise, e.g. `train_iemo.csv`:
--config.text.csv.pattern='{split}_iemo.csv'; every key: docs/dialogue_csv.md. Same variants as
configs/meld_text.py.
"""

from configs import iemocap
from configs import meld_text


def get_config(arg=None):
  c = meld_text.get_config(arg)
  base = iemocap.get_config()
  c.label_names = base.label_names
  c.batch.max_nodes = base.batch.max_nodes
  c.batch.max_graphs = base.batch.max_graphs
  c.text.csv = meld_text.text_frontend('iemocap', '', '{split}.csv').csv
  c.text.csv.dir = ''  # required: --config.text.csv.dir=...
  return c

