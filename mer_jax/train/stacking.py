"""Cross-fitted inputs for the fusion stage (model.fusion.input = 'stacked').

Feeding fusion the frozen encoders' outputs on their own training utterances leaks: the students
memorise those utterances, so fusion learns to trust modalities that are only reliable on data
they have seen. Stacking fixes it the textbook way: the encoders are also trained on K-1 of K
folds of the training dialogues, fusion trains on each dialogue's out-of-fold log-probabilities,
and dev/test/prediction use the encoders trained on all of the training data. Log-probabilities
(not hidden representations) are stacked because they live in the same space for every model,
whatever its initialisation.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from mer_jax import console
from mer_jax import stages
from mer_jax.data import sources
from mer_jax.train import inference
from mer_jax.train import stage as stage_lib

LOG_PROB_FLOOR = 1e-6


def encoder_log_probs(source, trained: dict, config, mesh) -> dict[str, list[np.ndarray]]:
  """Per modality, per record: [n, C] log-probabilities of that modality's frozen encoder."""
  out = {}
  for m in config.data.modalities:
    stage = stages.ENCODER_OF_MODALITY[m]
    probs = inference.record_predictions(source, stage, trained[stage], config, mesh, trained)
    out[m] = [np.log(np.maximum(p, LOG_PROB_FLOOR)).astype(np.float32) for p in probs]
  return out


def stacked_records(source, log_probs: dict[str, list[np.ndarray]], indices=None) -> list:
  """Records of `source` whose features are the given per-modality log-probabilities."""
  indices = range(len(source)) if indices is None else indices
  records = []
  for j, i in enumerate(indices):
    record = source[int(i)]
    feats = {m: np.where(record.present[m][:, None], lp[j], 0.0).astype(np.float32)
             for m, lp in log_probs.items()}
    records.append(dataclasses.replace(record, features=feats))
  return records


def train_fold_encoders(ctx: stage_lib.Context, fold: int, indices: np.ndarray) -> dict:
  """Teacher and students trained on every training dialogue except `indices`."""
  keep = np.setdiff1d(np.arange(len(ctx.data.train)), indices)
  data = dataclasses.replace(ctx.data, train=sources.SubsetSource(ctx.data.train, keep))
  fold_ctx = dataclasses.replace(ctx, data=data)
  trained = {}
  for stage in stages.ENCODER_STAGES:
    if stage in ctx.config.train.stages:
      trained[stage] = stage_lib.StageRunner(stage, fold_ctx, trained, fold=fold,
                                             name=os.path.join(f'fold{fold}', stage)).fit()
  return trained


def out_of_fold_train(ctx: stage_lib.Context) -> sources.InMemorySource:
  """The training split with each dialogue's features replaced by the log-probabilities of the
  encoders trained on the folds that do not hold it."""
  config = ctx.config
  folds = sources.fold_indices(len(ctx.data.train), config.model.fusion.stacking_folds,
                               config.seed)
  train_records: list = [None] * len(ctx.data.train)
  for k, idx in enumerate(folds):
    console.say('stacking: fold %d/%d (%d held-out dialogues)', k + 1, len(folds), len(idx))
    fold_models = train_fold_encoders(ctx, k, idx)
    held_out = sources.SubsetSource(ctx.data.train, idx)
    for i, record in zip(idx, stacked_records(
        held_out, encoder_log_probs(held_out, fold_models, config, ctx.mesh))):
      train_records[int(i)] = record
  return sources.InMemorySource(train_records)


def zero_log_probs(source, config) -> list[np.ndarray]:
  """Per record of `source`, all-zero float32 [n, C]: a stand-in of the shape a model's
  log-probabilities for it have, before the model has trained."""
  num_classes = len(config.label_names)
  return [np.zeros((len(source[i].labels), num_classes), np.float32) for i in range(len(source))]


def placeholder_stacked(source, config) -> sources.InMemorySource:
  """`source`'s records with all-zero stacked features: the shapes its stacked records will have
  (one [n, C] array per modality), known before any encoder has trained."""
  zeros = zero_log_probs(source, config)
  return sources.InMemorySource(stacked_records(source, {m: zeros for m in config.data.modalities}))


def stacked_context(ctx: stage_lib.Context, full_models: dict) -> stage_lib.Context:
  """The fusion stage's context: training features are out-of-fold log-probabilities, dev and
  test ones those of the encoders trained on all of the training data."""
  def stacked(source):
    return sources.InMemorySource(stacked_records(
        source, encoder_log_probs(source, full_models, ctx.config, ctx.mesh)))

  data = dataclasses.replace(ctx.data, dev=stacked(ctx.data.dev), test=stacked(ctx.data.test),
                             train=out_of_fold_train(ctx))
  return dataclasses.replace(ctx, data=data)
