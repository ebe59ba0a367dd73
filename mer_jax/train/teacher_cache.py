"""The frozen teacher's distillation targets, computed once before a student stage trains.

A distilling student needs the frozen teacher's prediction for every training utterance. Run
inside each student step, the teacher's forward pass is most of that step's arithmetic (the
teacher is the largest encoder). Its predictions do not depend on the batch when the teacher reads
the stored text (`augment.clean_frozen_inputs`) and every dialogue is its own graph
(`graph.scope='dialogue'`): eval mode, no dropout, edges within the dialogue only. Then they are
the same in every epoch, so one pass over the training dialogues computes them, and they travel in
the batch's 'teacher_log_probs' field. With augmented text or batch-scope graphs (the authors'
settings) the teacher runs inside the step as before.

Log-probabilities are stored, not logits: they distil identically (softmax(x / T) ignores a shift
of each row) and are what the predict path computes stably.
"""

from __future__ import annotations

import numpy as np

from mer_jax.train import inference


def applies(config) -> bool:
  """Whether a distilling student of `config` reads the teacher's targets from its batches."""
  return bool(config.loss.distill and config.loss.distill_cached_teacher
              and config.augment.clean_frozen_inputs and config.graph.scope == 'dialogue'
              and 't' in config.data.modalities)


def teacher_log_probs(source, teacher: inference.FrozenModel, config, mesh) -> list[np.ndarray]:
  """Per record of `source`, the frozen teacher's float32 [n, C] log-probabilities (one eval
  pass)."""
  log_probs = inference.record_predictions(source, 'teacher', teacher, config, mesh,
                                           log_probs=True)
  return [lp.astype(np.float32) for lp in log_probs]
