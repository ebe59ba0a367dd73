"""Shards from the feature files ERC research circulates, and from any corpus laid out as tables.

  python -m mer_jax.ingest FORMAT --input PATH --out SHARD_DIR [options]

or, from Python, `ingest(FORMAT, PATH, SHARD_DIR, ...)`. FORMAT is

  dialoguernn  the DialogueRNN / DialogueGCN / MMGCN pickles (IEMOCAP_features.pkl,
               MELD_features_raw1.pkl): see dialoguernn.py;
  cosmic       COSMIC's RoBERTa pickles (iemocap_features_roberta.pkl,
               meld_features_roberta.pkl), optionally with a dialoguernn file's audio and
               visual: see cosmic.py;
  tables       an index CSV and a feature file per modality: see tables.py.

Pickles are read with a restricted unpickler (unpickle.py) that refuses anything but numpy arrays
and builtin containers. Every dialogue is read and checked before anything is written, and the
shard folder appears only once complete (shards.write_shards), so a refused run leaves nothing.
A source without a dev split gets one carved from train by whole dialogues (common.DevCarveOut).
The manifest records the label names in the source's order and each modality's width, which
configs/meld.py and configs/iemocap.py read (`--config configs/iemocap.py:shards=SHARD_DIR`).
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from mer_jax.data import shards
from mer_jax.ingest import common
from mer_jax.ingest import cosmic
from mer_jax.ingest import dialoguernn
from mer_jax.ingest import tables

Columns = tables.Columns
Corpus = common.Corpus
DevCarveOut = common.DevCarveOut
IngestError = common.IngestError
FORMATS = ('dialoguernn', 'cosmic', 'tables')


def read_corpus(fmt: str, input_path: str | os.PathLike[str], *,
                dataset: dialoguernn.Dataset = 'auto', text_layers: cosmic.TextLayers = 'mean',
                audio_visual_from: str | os.PathLike[str] | None = None,
                features: Mapping[str, str | os.PathLike[str]] | None = None,
                columns: tables.Columns = tables.Columns(),
                label_names: Sequence[str] | None = None,
                missing: tables.Missing = 'error') -> common.Corpus:
  """The dialogues of `input_path` in format `fmt`, checked (splits as the source has them)."""
  if fmt not in FORMATS:
    raise IngestError(f'unknown format {fmt!r}; one of {", ".join(FORMATS)}')
  if audio_visual_from and fmt != 'cosmic':
    raise IngestError('audio_visual_from applies to the cosmic format only')
  if features and fmt != 'tables':
    raise IngestError('feature files (--features) apply to the tables format only; the '
                      f'{fmt} format reads its features from the pickle')
  if fmt == 'dialoguernn':
    return dialoguernn.read(input_path, dataset)
  if fmt == 'cosmic':
    return cosmic.read(input_path, dataset, text_layers, audio_visual_from)
  return tables.read(input_path, features or {}, columns=columns, label_names=label_names,
                     missing=missing)


def ingest(fmt: str, input_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
           dev: common.DevCarveOut = common.DevCarveOut(), num_shards: int = 1,
           overwrite: bool = False, **options) -> shards.Manifest:
  """Reads `input_path` in format `fmt` and writes it as a shard folder at `out_dir`.

  Args:
    fmt: 'dialoguernn', 'cosmic' or 'tables'.
    input_path: the pickle (dialoguernn, cosmic) or the index CSV (tables).
    out_dir: the shard folder to create; it must not hold anything unless `overwrite`.
    dev: how to carve a dev split from train when the source has none.
    num_shards: ArrayRecord files per split.
    overwrite: replace what is at `out_dir`.
    **options: the format's options, see `read_corpus`.

  Returns:
    The manifest written.

  Raises:
    IngestError (and the unpickler's errors): the source is refused; nothing is written.
  """
  common.check_out_dir(out_dir, overwrite)
  corpus = common.with_dev(read_corpus(fmt, input_path, **options), dev)
  return common.write(corpus, out_dir, num_shards=num_shards, overwrite=overwrite)
