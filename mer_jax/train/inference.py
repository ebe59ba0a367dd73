"""Trained stages at inference: models built in their sharded layout, frozen stages, and
predictions over a split (dev and test evaluation, the cached teacher, stacking, `predict`)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from mer_jax import evaluate
from mer_jax import models
from mer_jax import stages
from mer_jax.data import pipeline
from mer_jax.train import compile_timing
from mer_jax.train import distributed
from mer_jax.train import sharding
from mer_jax.train import steps


@dataclasses.dataclass
class FrozenModel:
  """A trained stage ready for inference: graphdef + (params, batch_stats, rng_state).

  `fingerprint` names it in `train.shared_stages_dir` (None when it is not shared).
  """
  graphdef: Any
  states: tuple[Any, Any, Any]
  fingerprint: str | None = None


def batch_dims(stage: str, config) -> dict[str, int]:
  """Feature width per modality of a stage's batches: the stored features, or for stacked fusion
  the encoders' log-probabilities (one per class)."""
  if stage == 'fusion' and config.model.fusion.input == 'stacked':
    return {m: len(config.label_names) for m in config.data.modalities}
  return {m: int(config.data.dims[m]) for m in config.data.modalities}


def stage_in_dims(stage: str, config) -> dict[str, int]:
  """Input width per modality of a stage's model."""
  if stages.is_encoder(stage):
    m = stages.MODALITY_OF_STAGE[stage]
    return {m: int(config.data.dims[m])}
  if config.model.fusion.input == 'graph':
    return {m: models.representation_dim(stages.ENCODER_OF_MODALITY[m], config)
            for m in config.data.modalities}
  return batch_dims(stage, config)


def build_sharded_model(stage: str, config, mesh, seed: int):
  """(graphdef, params, batch_stats, rng_state), created directly in their sharded layout."""
  return build_sharded_model_timed(stage, config, mesh, seed)[:4]


def build_sharded_model_timed(stage: str, config, mesh, seed: int):
  """build_sharded_model's four, then the seconds this call spent lowering and compiling the
  initializer (0.0 where a model of the same structure and seed had compiled it)."""
  graphdef, init = _initializer(stage, ml_collections.FrozenConfigDict(config), mesh, seed)
  compiles = init.seconds is None
  params, batch_stats, rng_state = init()
  return graphdef, params, batch_stats, rng_state, init.seconds if compiles else 0.0


def model_graphdef(stage: str, config, mesh):
  """The graphdef of a run's stage model (its structure; no parameters are made)."""
  return _initializer(stage, ml_collections.FrozenConfigDict(config), mesh,
                      stages.seed_of(stage, config.seed))[0]


def check_model_shardings(config, mesh) -> None:
  """Builds the abstract model and parameter shardings of every stage of the run (kept for the
  stages' runners), so that a parameter the mesh cannot split stops the run before any stage
  trains (sharding.state_shardings raises errors.UserError)."""
  for stage in config.train.stages:
    model_graphdef(stage, config, mesh)


@functools.lru_cache(maxsize=32)
def _initializer(stage: str, config: ml_collections.FrozenConfigDict, mesh, seed: int):
  """The graphdef and the jitted initializer of a stage's model. Cached, so that models of the
  same structure and seed (a stage and its cross-fitting folds) run one compiled program."""
  num_classes = len(config.label_names)
  in_dims = stage_in_dims(stage, config)

  def create():
    model = models.build_model(stage, config, in_dims=in_dims, num_classes=num_classes,
                               rngs=nnx.Rngs(seed))
    return nnx.split(model, nnx.Param, nnx.BatchStat, ...)

  graphdef, *abstract = nnx.eval_shape(create)
  shardings = [nnx.to_pure_dict(sharding.state_shardings(a, mesh, config.mesh.rules))
               for a in abstract]

  # Plain nested dicts of arrays, not nnx.State: JAX flattens dicts in C++ but calls back into
  # Python for each nnx Variable on every jitted call. nnx.merge takes the dicts as they are.
  def init():
    return tuple(nnx.to_pure_dict(s) for s in create()[1:])

  return graphdef, compile_timing.TimedCompile(
      jax.jit(init, out_shardings=tuple(shardings)), is_step=False,
      fast_compile=config.train.get('cpu_fast_compile', False))


def predict_split(source, config, budget, predict_fn, mesh, *,
                  dims=None) -> dict[str, np.ndarray]:
  """Runs `predict_fn(batch) -> probs` over a split in order; returns per-utterance arrays.

  `dims`: the batches' feature widths (default: config.data.dims).
  """
  ds = pipeline.make_dataset(source, config=config, budget=budget, train=False, epoch=0,
                             seed=config.seed, dims=dims)
  probs, labels, records, utterances = [], [], [], []
  batch_sh = None
  for batch in ds:
    if batch_sh is None:
      batch_sh = sharding.batch_shardings(batch, mesh, budget)
    global_batch = sharding.put_batch(batch, batch_sh, budget)
    p = distributed.global_to_host(predict_fn(global_batch))
    nodes = batch.nodes
    if budget.groups > 1:  # this host has only its own groups' nodes: gather everyone's ids
      nodes = {k: distributed.global_to_host(global_batch.nodes[k])
               for k in ('mask', 'label', 'record', 'utterance')}
    mask = nodes['mask']
    probs.append(p[mask])
    labels.append(nodes['label'][mask])
    records.append(nodes['record'][mask])
    utterances.append(nodes['utterance'][mask])
  return {'probs': np.concatenate(probs), 'labels': np.concatenate(labels),
          'records': np.concatenate(records), 'utterances': np.concatenate(utterances)}


def per_record_outputs(pred: dict[str, np.ndarray], source, key: str = 'probs') -> list[np.ndarray]:
  """Regroups predict_split's per-utterance rows into one [n_utterances, ...] array per record."""
  lengths = np.asarray(source.dialogue_lengths)
  out = [np.zeros((int(lengths[r]),) + pred[key].shape[1:], pred[key].dtype)
         for r in range(len(source))]
  positions = {}
  for r in range(len(source)):
    for pos, uid in enumerate(source[r].utterance_ids.tolist()):
      positions[(r, uid)] = pos
  for row, r, u in zip(pred[key], pred['records'], pred['utterances']):
    out[int(r)][positions[(int(r), int(u))]] = row
  return out


@functools.partial(jax.jit, static_argnames=('graphdef', 'frozen_graphdefs', 'statics',
                                             'log_probs'))
def predict_program(params, model_state, rng_state, batch, frozen_states, *, graphdef,
                    frozen_graphdefs, statics, log_probs):
  """The one jitted eval-mode forward of every stage. Models of the same structure (a stage and
  its cross-fitting folds; the splits they predict; evaluation during training and after it)
  pass equal static arguments, so they share its compiled program instead of compiling their
  own. Static arguments and frozen states: `predict_program_args`."""
  return steps.predict_step(params, model_state, batch, frozen_states, graphdef=graphdef,
                            rng_state=rng_state, frozen_graphdefs=dict(frozen_graphdefs),
                            statics=statics, log_probs=log_probs)


def predict_program_args(stage: str, graphdef, config, frozen: dict[str, FrozenModel],
                         log_probs: bool = False) -> tuple[dict, dict]:
  """(static keyword arguments of predict_program, the frozen states it reads) for `stage`."""
  statics = steps.StageStatics(stage=stage, modalities=tuple(config.data.modalities),
                               fusion_input=config.model.fusion.input,
                               loss=ml_collections.FrozenConfigDict(config.loss),
                               distill=False, ema_decay=0.0)
  needed = stages.frozen_in_step(stage, distill=False, fusion_input=statics.fusion_input,
                                 modalities=statics.modalities)
  static = {'graphdef': graphdef, 'statics': statics, 'log_probs': log_probs,
            'frozen_graphdefs': tuple((n, frozen[n].graphdef) for n in needed)}
  return static, {n: frozen[n].states for n in needed}


def timed_predict_program(static: dict, config) -> compile_timing.TimedCompile:
  """predict_program for one batch layout, compiled on its first call with the run's compiler
  options. Every prediction of a run goes through this, so the stage's evaluation during training
  and its later predictions (test split, stacking, the cached teacher) lower to the same program
  with the same options, and JAX's in-process cache compiles it once."""
  return compile_timing.TimedCompile(
      predict_program, fast_compile=config.train.get('cpu_fast_compile', False), **static)


def stage_predict_fn(stage: str, model: FrozenModel, config, frozen: dict[str, FrozenModel],
                     log_probs: bool = False):
  """`batch -> class probabilities` (or log-probabilities) of a trained stage, in eval mode.
  Its batches must share one layout (one batch budget)."""
  static, frozen_states = predict_program_args(stage, model.graphdef, config, frozen, log_probs)
  program = timed_predict_program(static, config)
  params, model_state, rng_state = model.states
  return lambda batch: program(params, model_state, rng_state, batch, frozen_states)


def predict_stage(source, stage: str, model: FrozenModel, config, mesh,
                  frozen: dict[str, FrozenModel] | None = None,
                  log_probs: bool = False) -> dict[str, np.ndarray]:
  """A trained stage's per-utterance predictions over `source` (predict_split's arrays)."""
  fn = stage_predict_fn(stage, model, config, frozen or {}, log_probs=log_probs)
  return predict_split(source, config, sharding.batch_budget(config, mesh), fn, mesh,
                       dims=batch_dims(stage, config))


def record_predictions(source, stage: str, model: FrozenModel, config, mesh,
                       frozen: dict[str, FrozenModel] | None = None,
                       log_probs: bool = False) -> list[np.ndarray]:
  """A frozen stage's class probabilities (or log-probabilities), one [n, C] array per record of
  `source`, in eval mode."""
  pred = predict_stage(source, stage, model, config, mesh, frozen, log_probs)
  return per_record_outputs(pred, source, 'probs')


def split_metrics(pred: dict[str, np.ndarray], label_names) -> dict:
  return evaluate.classification_metrics(pred['labels'], pred['probs'].argmax(-1), label_names)
