"""The stage sequence of a run: teacher -> students (distilled from the frozen teacher) -> fusion.

`train_stages(ctx)` trains every stage of config.train.stages in order (a finished stage is
restored, an interrupted one resumed), scores each once on test after its training, and writes
the reports, the test predictions and results.json. Model selection uses dev only.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mer_jax import console
from mer_jax import evaluate
from mer_jax import files
from mer_jax import losses
from mer_jax.data import sources
from mer_jax.train import checkpointing
from mer_jax.train import compile_ahead
from mer_jax.train import distributed
from mer_jax.train import fingerprints
from mer_jax.train import inference
from mer_jax.train import sharding
from mer_jax.train import stacking
from mer_jax.train.stage import Context
from mer_jax.train.stage import StageRunner
from mer_jax.train.stage import jsonable


def make_context(config, workdir: str, data: sources.SplitSources, mesh) -> Context:
  """The run's shared context: the opened splits, and the class weights of the training split."""
  class_weights = losses.class_weights_for(config.loss.class_weights, data.class_counts,
                                           config.loss.class_weight_power)
  class_weights = jax.device_put(jnp.asarray(class_weights, jnp.float32), sharding.replicated(mesh))
  return Context(config=config, workdir=workdir, mesh=mesh, data=data,
                 class_weights=class_weights,
                 records=fingerprints.plan(config, os.fspath(data.shard_dir)))


def check_workdir(ctx: Context) -> None:
  """Before any training: stops if the workdir's stages were trained with other settings or
  data (or, with train.on_change='retrain', removes exactly those stages)."""
  fingerprints.check_workdir(ctx.records, checkpointing.checkpoint_dir(ctx.config, ctx.workdir),
                             ctx.config.train.on_change, write=distributed.is_main_process())
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('fingerprints checked')


def save_test_predictions(pred: dict[str, np.ndarray], workdir: str, stage: str) -> str:
  """Per-utterance test outputs of a stage (for significance tests across runs), written
  atomically to workdir/predictions/<stage>_test.npz."""
  path = os.path.join(workdir, 'predictions', f'{stage}_test.npz')
  with files.atomic_path(path) as tmp:
    np.savez(tmp, **pred)
  return path


def save_results(results: dict, workdir: str, config) -> None:
  """results.json marks a finished run (the experiment tools skip such runs): written last and
  atomically. It holds the mer_jax version, the git commit of its source (None outside a
  checkout), the config, and per stage (`stages`) the test metrics, the best epoch and the dev
  history (epochs numbered from 1), seconds, compile seconds and what determined the stage.
  experiments.runs.load_results reads it (and the files before `stages`, per stage at the top)."""
  run = {**fingerprints.provenance(), 'config': config.to_dict(), 'stages': results}
  files.write_json(os.path.join(workdir, 'results.json'), jsonable(run), indent=2)


def train_stage(ctx: Context, stage: str, trained: dict[str, inference.FrozenModel],
                ahead: dict[str, Any]) -> dict[str, Any]:
  """Trains (or restores) one stage, adds it to `trained`, scores it on test, writes its report
  and test predictions, and returns its entry of results.json. `ahead`: the programs being
  compiled ahead (compile_ahead.start); the stage waits for its own once its inputs are ready."""
  config, workdir = ctx.config, ctx.workdir
  started = time.time()
  stage_ctx = ctx
  if stage == 'fusion' and config.model.fusion.input == 'stacked':
    stage_ctx = stacking.stacked_context(ctx, trained)
  compiled_ahead = compile_ahead.seconds(ahead, stage)
  if compiled_ahead:
    stage_ctx = dataclasses.replace(stage_ctx, compiled_ahead=compiled_ahead)
  runner = StageRunner(stage, stage_ctx, trained)
  trained[stage] = runner.fit()
  pred = inference.predict_stage(stage_ctx.data.test, stage, trained[stage], config, ctx.mesh,
                                 trained)
  test = inference.split_metrics(pred, config.label_names)
  if distributed.is_main_process():
    save_test_predictions(pred, workdir, stage)
    evaluate.write_report(test, os.path.join(workdir, 'reports'), f'{stage}_test',
                          png=config.eval.confusion_png)
    print(evaluate.format_report(test, title=f'{stage} - test ({ctx.data.test_name})'))
    if not runner.was_finished:  # a rerun of a finished workdir writes no event files
      runner.log_test(test)
  result = {'test_weighted_f1': test['weighted_f1'], 'test_macro_f1': test['macro_f1'],
            'test_accuracy': test['accuracy'], 'dev_weighted_f1': runner.loop.best_f1,
            'best_epoch': runner.loop.best_epoch, 'history': runner.loop.history,
            'seconds': time.time() - started, 'compile_seconds': runner.compile_seconds}
  record = ctx.records.get(stage)
  if record is not None:
    result.update(fingerprint=record.fingerprint, settings=record.settings,
                  evaluation=record.evaluation)
  return result


def train_stages(ctx: Context) -> dict[str, Any]:
  """Trains every stage in config.train.stages, then reports test metrics of each."""
  config, workdir = ctx.config, ctx.workdir
  budget = sharding.batch_budget(config, ctx.mesh)
  if budget.groups > 1:
    console.say('batch: %d sub-batches of %d nodes / %d graphs per step; process %d reads and '
                'builds sub-batch(es) %s', budget.groups, budget.max_nodes, budget.max_graphs,
                jax.process_index(), list(budget.local_groups))
  inference.check_model_shardings(config, ctx.mesh)
  check_workdir(ctx)
  ahead = compile_ahead.start(ctx)
  trained: dict[str, inference.FrozenModel] = {}
  results = {}
  try:
    for stage in config.train.stages:
      results[stage] = train_stage(ctx, stage, trained, ahead)
  finally:
    compile_ahead.cancel(ahead)
  if distributed.is_main_process():
    save_results(results, workdir, config)
    summary = ', '.join(f'{s} {100 * r["test_weighted_f1"]:.2f}' for s, r in results.items())
    print(f'test weighted F1 - {summary}')
  return results
