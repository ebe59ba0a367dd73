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

import concurrent.futures
import dataclasses
import os

import jax
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


def placeholder_stacked(source, config) -> sources.InMemorySource:
  """`source`'s records with all-zero stacked features: the shapes its stacked records will have
  (one [n, C] array per modality), known before any encoder has trained."""
  num_classes = len(config.label_names)
  zeros = [np.zeros((len(source[i].labels), num_classes), np.float32) for i in range(len(source))]
  return sources.InMemorySource(stacked_records(source, {m: zeros for m in config.data.modalities}))


def compile_fusion_ahead(ctx: stage_lib.Context, dev) -> concurrent.futures.Future:
  """Starts compiling the fusion stage's programs in a background thread; the future gives
  their seconds (StageRunner.compile_programs). Their shapes do not depend on the stacked
  features' values, so a runner on the stacked dev split (`dev`, as its training data too; a
  placeholder_stacked one will do) compiles the programs fusion's runner will use. XLA compiles
  outside Python's lock, on a core that the encoders' small steps leave partly idle."""
  data = dataclasses.replace(ctx.data, train=dev, dev=dev, test=dev)
  ahead = dataclasses.replace(ctx, data=data, records={})
  executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='compile-ahead')
  try:
    return executor.submit(lambda: stage_lib.StageRunner('fusion', ahead, {}).compile_programs())
  finally:
    executor.shutdown(wait=False)


def start_fusion_compile(ctx: stage_lib.Context) -> concurrent.futures.Future | None:
  """At the start of a run: compile_fusion_ahead on the placeholder-stacked dev split, so that
  fusion's programs compile while the encoders and their folds train. None (fusion compiles when
  it trains) where the run has no stacked fusion stage, fusion has finished in this workdir, or
  the run has several processes: every process must launch its computations on the global mesh
  in the same order, which a second thread's launches would not keep."""
  config = ctx.config
  if ('fusion' not in config.train.stages or config.model.fusion.input != 'stacked'
      or jax.process_count() > 1 or stage_lib.finished(ctx, 'fusion')):
    return None
  return compile_fusion_ahead(ctx, placeholder_stacked(ctx.data.dev, config))


def stacked_context(ctx: stage_lib.Context, full_models: dict,
                    ahead: concurrent.futures.Future | None = None) -> stage_lib.Context:
  """The fusion stage's context: training features are out-of-fold log-probabilities, dev and
  test ones those of the encoders trained on all of the training data. `ahead`: fusion's
  programs being compiled (start_fusion_compile); their seconds go into the context."""
  def stacked(source):
    return sources.InMemorySource(stacked_records(
        source, encoder_log_probs(source, full_models, ctx.config, ctx.mesh)))

  dev, test = stacked(ctx.data.dev), stacked(ctx.data.test)
  train = out_of_fold_train(ctx)
  compiled_ahead = {}
  if ahead is not None:
    try:
      compiled_ahead = ahead.result()
    except Exception as e:  # pylint: disable=broad-except
      console.say('stacking: compiling fusion ahead failed (%s: %s); it compiles when it trains',
                  type(e).__name__, e)
  return dataclasses.replace(ctx, data=dataclasses.replace(ctx.data, train=train, dev=dev,
                                                           test=test),
                             compiled_ahead=compiled_ahead)
