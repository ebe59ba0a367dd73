"""COSMIC's RoBERTa feature pickles, alone or with a DialogueRNN-lineage file's audio and visual.

Each file holds one list whose items are, in order, as COSMIC's loaders unpack it
(declare-lab/conv-emotion COSMIC/erc-training/dataloader.py, IEMOCAPRobertaCometDataset and
MELDRobertaCometDataset; written by COSMIC/feature-extraction/roberta_feature_extract_*.py):

  iemocap_features_roberta.pkl, 10 items: speakers, labels, roberta1, roberta2, roberta3,
    roberta4, sentences, trainIds, testIds, validIds. Speakers 'M'/'F'; labels in the
    DialogueRNN order {'hap': 0, 'sad': 1, 'neu': 2, 'ang': 3, 'exc': 4, 'fru': 5}.
  meld_features_roberta.pkl, 11 items: speakers, emotion_labels, sentiment_labels, roberta1,
    roberta2, roberta3, roberta4, sentences, trainIds, testIds, validIds. Speakers are one-hot
    vectors; emotion labels in MELD's order (neutral, surprise, fear, sadness, joy, disgust,
    anger); sentiment labels are not read.

roberta1..roberta4 hold, per utterance, the <s> vector of the fine-tuned RoBERTa's last,
second-last, third-last and fourth-last layer (1024-d for roberta-large). `text_layers` picks the
text feature: 'mean' of the four (COSMIC's default, --mode1 2), 'concat' of the four (--mode1 0),
or one of them by name. validIds is the dev split, so none is carved.

With `audio_visual_from`, the audio (videoAudio) and visual (videoVisual) features of a
dialoguernn file of the same dataset join each dialogue, matched by dialogue id; the two files
must agree on every dialogue's length and labels.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

import numpy as np

from mer_jax.ingest import common
from mer_jax.ingest import dialoguernn
from mer_jax.ingest import unpickle

TextLayers = Literal['mean', 'concat', 'roberta1', 'roberta2', 'roberta3', 'roberta4']

ROBERTA = ('roberta1', 'roberta2', 'roberta3', 'roberta4')
FIELDS = {
    'iemocap': ('speakers', 'labels') + ROBERTA + ('sentences', 'trainIds', 'testIds',
                                                   'validIds'),
    'meld': ('speakers', 'emotion_labels', 'sentiment_labels') + ROBERTA + (
        'sentences', 'trainIds', 'testIds', 'validIds'),
}
LABEL_FIELD = {'iemocap': 'labels', 'meld': 'emotion_labels'}
SPLIT_FIELDS = {'train': 'trainIds', 'dev': 'validIds', 'test': 'testIds'}
TEXT_LAYERS = ('mean', 'concat') + ROBERTA


def text_features(fields: dict[str, Any], dialogue_id: Any, n: int, layers: TextLayers,
                  widths: common.Widths, path: str) -> np.ndarray:
  names = ROBERTA if layers in ('mean', 'concat') else (layers,)
  rows = [dialoguernn.modality_rows(fields, f, dialogue_id, n, widths, path) for f in names]
  if layers == 'mean':
    return np.mean(rows, axis=0, dtype=np.float32)
  return np.concatenate(rows, axis=1)


class _AudioVisual:
  """Audio and visual features of a dialoguernn file, looked up by a COSMIC dialogue's id."""

  def __init__(self, path: str, dataset: str):
    self.path = path
    _, self.fields = dialoguernn.load(path, dataset)
    labels = self.fields['videoLabels']
    if not isinstance(labels, dict):
      raise common.IngestError(f'{path}: videoLabels is a {type(labels).__name__}, expected a '
                               'dict keyed by dialogue id')
    self.keys = {str(k): k for k in labels}
    self.widths = common.Widths()
    self.label_names = dialoguernn.LABEL_NAMES[dataset]

  def features(self, record, where: str) -> dict[str, np.ndarray]:
    key = self.keys.get(record.dialogue_id)
    if key is None:
      raise common.IngestError(f'{where}: not in {self.path} (--audio_visual_from has no '
                               'dialogue with this id)')
    there = f'{self.path}: dialogue {key!r}'
    theirs = [common.label_index(l, there, f'videoLabels utterance {i}', self.label_names)
              for i, l in enumerate(common.as_sequence(self.fields['videoLabels'][key], there,
                                                       'videoLabels'))]
    ours = record.labels.tolist()
    if len(theirs) != len(ours):
      raise common.IngestError(f'{where}: {len(ours)} utterances, {len(theirs)} in {self.path}: '
                               'the two files do not hold the same dialogues')
    if theirs != ours:
      first = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
      raise common.IngestError(f'{where}: labels differ from {self.path} at utterance {first}: '
                               'the two files do not hold the same dialogues')
    n = record.num_utterances
    return {m: dialoguernn.modality_rows(self.fields, f, key, n, self.widths, self.path)
            for m, f in (('a', 'videoAudio'), ('v', 'videoVisual'))}


def read(path: str | os.PathLike[str], dataset: dialoguernn.Dataset = 'auto',
         text_layers: TextLayers = 'mean',
         audio_visual_from: str | os.PathLike[str] | None = None) -> common.Corpus:
  """The train, dev and test dialogues of a COSMIC RoBERTa pickle (text only, or with the audio
  and visual of `audio_visual_from`)."""
  path = os.fspath(path)
  if text_layers not in TEXT_LAYERS:
    raise common.IngestError(f'text_layers must be one of {", ".join(TEXT_LAYERS)}; got '
                             f'{text_layers!r}')
  dataset, fields = dialoguernn.unpack(unpickle.load(path), path, FIELDS, dataset, 'cosmic')
  extra = _AudioVisual(os.fspath(audio_visual_from), dataset) if audio_visual_from else None
  label_names = dialoguernn.LABEL_NAMES[dataset]
  widths = common.Widths()
  splits = {}
  for split, ids in dialoguernn.split_ids(fields, path, SPLIT_FIELDS).items():
    records = []
    for dialogue_id in ids:
      record = dialoguernn.dialogue_record(
          fields, dialogue_id, label_names, {}, widths, path, speakers='speakers',
          labels=LABEL_FIELD[dataset], sentences='sentences')
      n = record.num_utterances
      features = {'t': text_features(fields, dialogue_id, n, text_layers, widths, path)}
      if extra:
        features.update(extra.features(record, common.dialogue_where(path, dialogue_id)))
      records.append(dataclasses.replace(
          record, features=features, present={m: np.ones(n, bool) for m in features}))
    splits[split] = records
  dims = {'t': next(r.features['t'].shape[1] for r in splits['train'])}
  if extra:
    dims.update(a=extra.widths['videoAudio'], v=extra.widths['videoVisual'])
  return common.Corpus(splits=splits, label_names=label_names, dims=dims)
