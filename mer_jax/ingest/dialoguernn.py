"""The feature pickles of the DialogueRNN / DialogueGCN / MMGCN lineage.

Each file holds one list (or tuple) whose items are, in order, as the lineage's loaders unpack it:

  IEMOCAP_features.pkl, 9 items: videoIDs, videoSpeakers, videoLabels, videoText, videoAudio,
    videoVisual, videoSentence, trainVid, testVid (declare-lab/conv-emotion
    DialogueRNN/dataloader.py and DialogueGCN/dataloader.py, class IEMOCAPDataset;
    hujingwen6666/MMGCN dataloader.py). Speakers are 'M' or 'F' per utterance. Labels follow the
    mapping those classes document, {'hap': 0, 'sad': 1, 'neu': 2, 'ang': 3, 'exc': 4, 'fru': 5}.
  MELD_features_raw1.pkl, 10 items: videoIDs, videoSpeakers, videoLabels, videoText, videoAudio,
    videoVisual, videoSentence, trainVid, testVid and a tenth that MMGCN's loader discards
    (hujingwen6666/MMGCN dataloader.py, class MELDDataset; its train.py reads
    MELD_features/MELD_features_raw1.pkl). Speakers are one-hot vectors (MMGCN: 9 speakers), kept
    as `speaker{k}`. Labels: {'neutral': 0, 'surprise': 1, 'fear': 2, 'sadness': 3, 'joy': 4,
    'disgust': 5, 'anger': 6} (the MELDDataset docstring of DialogueGCN/dataloader.py, and MELD's
    own README).

Per-dialogue items are dicts keyed by dialogue id, with one entry per utterance (features: one
vector per utterance or a 2-D array); trainVid and testVid list (or hold, as sets, then sorted)
the dialogue ids. The lineage has no dev split (MMGCN validates on the first 10% of trainVid), so
one is carved from train by dialogue (common.DevCarveOut). Utterance ids are positions in the
dialogue; the ids of videoIDs are only checked for count.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Mapping, Sequence

from mer_jax.ingest import common
from mer_jax.ingest import unpickle

Dataset = Literal['auto', 'iemocap', 'meld']

FIELDS = {
    'iemocap': ('videoIDs', 'videoSpeakers', 'videoLabels', 'videoText', 'videoAudio',
                'videoVisual', 'videoSentence', 'trainVid', 'testVid'),
    'meld': ('videoIDs', 'videoSpeakers', 'videoLabels', 'videoText', 'videoAudio',
             'videoVisual', 'videoSentence', 'trainVid', 'testVid', 'unused'),
}
LABEL_NAMES = {
    'iemocap': ('happiness', 'sadness', 'neutral', 'anger', 'excited', 'frustration'),
    'meld': ('neutral', 'surprise', 'fear', 'sadness', 'joy', 'disgust', 'anger'),
}
MODALITY_FIELDS = {'t': 'videoText', 'a': 'videoAudio', 'v': 'videoVisual'}
SPLIT_FIELDS = {'train': 'trainVid', 'test': 'testVid'}


def unpack(items: Any, path: str, layouts: Mapping[str, Sequence[str]], dataset: str,
           kind: str) -> tuple[str, dict[str, Any]]:
  """(dataset, field name -> item) of a pickled list whose layout is told by its length."""
  if not isinstance(items, (list, tuple)):
    raise common.IngestError(f'{path}: holds a {type(items).__name__}, expected the list of a '
                             f'{kind} feature file')
  by_length = {len(fields): name for name, fields in layouts.items()}
  if dataset == 'auto':
    if len(items) not in by_length:
      described = '; '.join(f'{name}: {len(f)}' for name, f in layouts.items())
      raise common.IngestError(f'{path}: holds {len(items)} items; a {kind} file holds '
                               f'{described}')
    dataset = by_length[len(items)]
  if dataset not in layouts:
    raise common.IngestError(f'dataset must be one of auto, {", ".join(layouts)}; got '
                             f'{dataset!r}')
  fields = layouts[dataset]
  if len(items) != len(fields):
    raise common.IngestError(f'{path}: holds {len(items)} items; a {kind} {dataset} file holds '
                             f'{len(fields)} ({", ".join(fields)})')
  return dataset, dict(zip(fields, items))


def split_ids(fields: Mapping[str, Any], path: str, split_fields: Mapping[str, str]
              ) -> dict[str, list[Any]]:
  """split -> its dialogue ids (sets sorted, lists in their order), checked to be disjoint."""
  out = {}
  for split, field in split_fields.items():
    ids = fields[field]
    if isinstance(ids, (set, frozenset)):
      ids = sorted(ids, key=lambda i: (type(i).__name__, str(i)))
    elif not isinstance(ids, (list, tuple)):
      raise common.IngestError(f'{path}: {field} is a {type(ids).__name__}, expected a list of '
                               'dialogue ids')
    if not ids:
      raise common.IngestError(f'{path}: {field} lists no dialogues')
    out[split] = list(ids)
  common.check_disjoint(out, path)
  return out


def entry(fields: Mapping[str, Any], field: str, dialogue_id: Any, path: str) -> Any:
  """The item `field` holds for `dialogue_id`."""
  table = fields[field]
  if not isinstance(table, dict):
    raise common.IngestError(f'{path}: {field} is a {type(table).__name__}, expected a dict '
                             'keyed by dialogue id')
  if dialogue_id not in table:
    raise common.IngestError(f'{common.dialogue_where(path, dialogue_id)}: missing from {field}')
  return table[dialogue_id]


def modality_rows(fields: Mapping[str, Any], field: str, dialogue_id: Any, num_utterances: int,
                  widths: common.Widths, path: str):
  """float32[n, d] features of one dialogue, the width shared by every dialogue."""
  where = common.dialogue_where(path, dialogue_id)
  rows = common.feature_rows(entry(fields, field, dialogue_id, path), where, field,
                             num_utterances)
  widths.check(field, rows.shape[1], where)
  return rows


def dialogue_record(fields: Mapping[str, Any], dialogue_id: Any, label_names: Sequence[str],
                    modality_fields: Mapping[str, str], widths: common.Widths, path: str, *,
                    speakers: str, labels: str, sentences: str, utterance_ids: str | None = None):
  """One dialogue's record; `speakers`, `labels`, ... name the fields that hold them."""
  where = common.dialogue_where(path, dialogue_id)
  label_list = common.as_sequence(entry(fields, labels, dialogue_id, path), where, labels)
  n = len(label_list)
  if not n:
    raise common.IngestError(f'{where}: {labels} is empty (a dialogue needs an utterance)')
  per_utterance = {}
  for field in (speakers, sentences) + ((utterance_ids,) if utterance_ids else ()):
    values = common.as_sequence(entry(fields, field, dialogue_id, path), where, field)
    if len(values) != n:
      raise common.IngestError(f'{where}: {field} has {len(values)} items, {labels} has {n}')
    per_utterance[field] = values
  return common.make_record(
      dialogue_id=str(dialogue_id),
      speakers=[common.speaker_of(s, where, f'{speakers} utterance {i}')
                for i, s in enumerate(per_utterance[speakers])],
      labels=[common.label_index(l, where, f'{labels} utterance {i}', label_names)
              for i, l in enumerate(label_list)],
      transcripts=[common.text_of(s, where, f'{sentences} utterance {i}')
                   for i, s in enumerate(per_utterance[sentences])],
      features={m: modality_rows(fields, f, dialogue_id, n, widths, path)
                for m, f in modality_fields.items()})


def load(path: str | os.PathLike[str], dataset: Dataset = 'auto') -> tuple[str, dict[str, Any]]:
  """(dataset, field -> item) of a lineage pickle, read with the restricted unpickler."""
  path = os.fspath(path)
  return unpack(unpickle.load(path), path, FIELDS, dataset, 'dialoguernn')


def read(path: str | os.PathLike[str], dataset: Dataset = 'auto') -> common.Corpus:
  """The train and test dialogues of a lineage pickle (no dev: see common.with_dev)."""
  path = os.fspath(path)
  dataset, fields = load(path, dataset)
  widths = common.Widths()
  splits = {}
  for split, ids in split_ids(fields, path, SPLIT_FIELDS).items():
    splits[split] = [
        dialogue_record(fields, i, LABEL_NAMES[dataset], MODALITY_FIELDS, widths, path,
                        speakers='videoSpeakers', labels='videoLabels',
                        sentences='videoSentence', utterance_ids='videoIDs')
        for i in ids]
  dims = {m: widths[f] for m, f in MODALITY_FIELDS.items()}
  return common.Corpus(splits=splits, label_names=LABEL_NAMES[dataset], dims=dims)
