"""The frozen teacher's distillation targets, computed once before a student stage trains.

A distilling student needs the frozen teacher's prediction for every training utterance. Run
inside each student step, the teacher's forward pass is most of that step's arithmetic (the
teacher is the largest encoder). Its predictions do not depend on the batch when the teacher reads
the stored text (`augment.clean_frozen_inputs`) and every dialogue is its own graph
(`graph.scope='dialogue'`): eval mode, no dropout, edges within the dialogue only. Then they are
the same in every epoch, so one pass over the training dialogues computes them, and they travel in
the batch's text slot, which a student never reads. With augmented text or batch-scope graphs
(the authors' settings) the teacher runs inside the step as before.

Log-probabilities are stored, not logits: they distil identically (softmax(x / T) ignores a shift
of each row) and are what the predict path computes stably.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def applies(config) -> bool:
  """Whether a distilling student of `config` reads the teacher's targets from its batches."""
  return bool(config.loss.distill and config.loss.distill_cached_teacher
              and config.augment.clean_frozen_inputs and config.graph.scope == 'dialogue'
              and 't' in config.data.modalities)


@dataclasses.dataclass
class TeacherLogProbsSource:
  """The records of `base` with their text features replaced by the teacher's log-probabilities."""
  base: object
  log_probs: list  # per record, float32[n_utterances, num_classes]

  def __len__(self) -> int:
    return len(self.base)

  def __getitem__(self, i: int):
    record = self.base[i]
    return dataclasses.replace(record, features={**record.features, 't': self.log_probs[i]})

  @property
  def dialogue_lengths(self) -> np.ndarray:
    return np.asarray(self.base.dialogue_lengths)


def teacher_source(source, teacher, config, mesh) -> TeacherLogProbsSource:
  """`source` with the frozen `teacher`'s log-probabilities (one eval pass) in its text slot."""
  from mer_jax.train import trainer  # pylint: disable=g-import-not-at-top
  log_probs = trainer.record_predictions(source, 'teacher', teacher, config, mesh, log_probs=True)
  return TeacherLogProbsSource(source, [lp.astype(np.float32) for lp in log_probs])
