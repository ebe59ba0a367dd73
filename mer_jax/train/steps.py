"""Pure train/eval steps for every stage: teacher, students (distilled), fusion.

A stage's model is split once into (graphdef, params, model_state); the jitted functions here take
those trees, merge inside, and return new trees. Frozen models (the teacher for the students; the
teacher and students for fusion) arrive as a separate tree that is never differentiated or donated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import jraph
import optax
from flax import nnx

from mer_jax import losses
from mer_jax.models import graph as graph_lib
from mer_jax.stages import ENCODER_OF_MODALITY
from mer_jax.stages import MODALITY_OF_STAGE


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # micro-steps taken (a step with gradient accumulation counts each micro-batch)
  params: Any
  model_state: Any  # batch-norm statistics
  opt_state: Any
  ema_params: Any  # None when the stage has no EMA
  lr_scale: jax.Array  # reduce-on-plateau multiplier
  rng: jax.Array  # base key; each step folds in its step number


@dataclasses.dataclass(frozen=True)
class StageStatics:
  """Everything about a stage that is fixed at trace time (hashable, closed over)."""
  stage: str
  modalities: tuple[str, ...]
  fusion_input: str
  loss: Any  # config.loss (a frozen ConfigDict)
  distill: bool
  ema_decay: float
  # The batch carries the frozen teacher's log-probabilities ('teacher_log_probs', computed once
  # before the stage: train/teacher_cache.py) instead of text for the teacher to run every step.
  teacher_in_batch: bool = False


def frozen_outputs(frozen: Mapping[str, tuple[Any, Any]], batch: jraph.GraphsTuple,
                   names: tuple[str, ...]) -> dict[str, tuple[jax.Array, jax.Array]]:
  """(logits, representation) of frozen encoders in eval mode."""
  out = {}
  for name in names:
    graphdef, states = frozen[name]  # states: (params, batch_stats, rng_state)
    model = nnx.merge(graphdef, *states)
    m = MODALITY_OF_STAGE[name]
    out[name] = model(batch.nodes['features'][m], batch, train=False)
  return jax.tree.map(jax.lax.stop_gradient, out)


def fusion_inputs(statics: StageStatics, batch, frozen) -> dict[str, jax.Array]:
  """Per modality, what fusion reads: the batch's features ('raw'; for 'stacked', the encoders'
  cross-fitted log-probabilities, precomputed into the batch) or the frozen encoders'
  representations ('graph')."""
  if statics.fusion_input in ('raw', 'stacked'):
    return {m: batch.nodes['features'][m] for m in statics.modalities}
  reps = frozen_outputs(frozen, batch, tuple(ENCODER_OF_MODALITY[m] for m in statics.modalities))
  return {m: reps[ENCODER_OF_MODALITY[m]][1] for m in statics.modalities}


def forward(statics: StageStatics, model, batch: jraph.GraphsTuple, frozen, *, train: bool):
  """Returns (main logits [N, C], everything the loss needs)."""
  nodes = batch.nodes
  if statics.stage == 'fusion':
    out = model(fusion_inputs(statics, batch, frozen), nodes['present'],
                graph_lib.node_graph_ids(batch), nodes['mask'], train=train)
    return out['logits'], out
  m = MODALITY_OF_STAGE[statics.stage]
  logits, rep = model(nodes['features'][m], batch, train=train)
  return logits, {'logits': logits, 'representation': rep}


def loss_fn(statics: StageStatics, model, batch, frozen, class_weights):
  """Scalar training loss of one batch and its parts."""
  cfg = statics.loss
  nodes = batch.nodes
  labels = nodes['label']
  valid = nodes['mask'] & (labels >= 0)
  logits, out = forward(statics, model, batch, frozen, train=True)
  if statics.stage == 'fusion':
    total, parts = losses.fusion_loss(
        logits, out['aux_logits'], labels, valid, model.loss_log_vars[...],
        modalities=statics.modalities, class_weights=class_weights, poly_alpha=cfg.poly_alpha,
        poly_gamma=cfg.poly_gamma, focal_gamma=cfg.focal_gamma,
        main_focal_share=cfg.main_focal_share, label_smoothing=cfg.label_smoothing,
        use_uncertainty=cfg.use_uncertainty, main_weight=cfg.main_weight,
        aux_weights={m: cfg.aux_weights[m] for m in statics.modalities},
        aux_masks={m: valid & nodes['present'][m] for m in statics.modalities})
    if cfg.contrastive:
      con = losses.supervised_contrastive_loss(out['contrastive'], labels, valid,
                                               temperature=cfg.contrastive_temperature)
      total = total + cfg.contrastive_weight * con
      parts = dict(parts, contrastive=con)
    return total, (logits, parts)
  m = MODALITY_OF_STAGE[statics.stage]
  valid = valid & nodes['present'][m]
  poly = dict(class_weights=class_weights, poly_alpha=cfg.poly_alpha, poly_gamma=cfg.poly_gamma)
  if statics.stage != 'teacher' and statics.distill:
    # Log-probabilities distil exactly like logits: softmax(x / T) ignores a per-row shift.
    if statics.teacher_in_batch:
      teacher_logits, has_text = nodes['teacher_log_probs'], nodes['teacher_mask']
    else:
      teacher_logits = frozen_outputs(frozen, batch, ('teacher',))['teacher'][0]
      has_text = nodes['present']['t']
    # Distil only where the teacher saw text; elsewhere the student learns from labels alone.
    kd = losses.distillation_loss(logits, teacher_logits, labels, valid & has_text,
                                  temperature=cfg.distill_temperature, alpha=cfg.distill_alpha,
                                  **poly)
    n_kd = jnp.sum(valid & has_text)
    n_ce = jnp.sum(valid & ~has_text)
    ce = losses.poly_focal_loss(logits, labels, valid & ~has_text, **poly)
    total = (kd * n_kd + ce * n_ce) / jnp.maximum(n_kd + n_ce, 1)
    return total, (logits, {'distill': kd})
  total = losses.poly_focal_loss(logits, labels, valid, **poly)
  return total, (logits, {'poly_focal': total})


def _ema_update(ema, params, step, decay: float):
  # Debiased warm-up (as tf.train.ExponentialMovingAverage with num_updates): early averages
  # are not dominated by the random initialisation.
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def _with_graphdefs(frozen_states, frozen_graphdefs):
  return {k: (frozen_graphdefs[k], frozen_states[k]) for k in frozen_states}


def reseed_rng_state(rng_state, raw_key: jax.Array):
  """Fresh nnx rng streams derived from one key (functional, so no mutation under tracing)."""
  key = jax.random.wrap_key_data(raw_key)
  leaves, treedef = jax.tree.flatten(rng_state)
  # Stream i gets fold_in(key, i); one vectorised hash for all streams (the same bits as one
  # fold_in each, in fewer ops).
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(len(leaves)))
  fresh = [keys[i] if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) else jnp.zeros_like(leaf)
           for i, leaf in enumerate(leaves)]
  return jax.tree.unflatten(treedef, fresh)


def train_step(state: TrainState, batch, frozen_states, class_weights, schedule_steps, *, graphdef,
               rng_state, frozen_graphdefs, tx, statics: StageStatics):
  """One micro-step: gradients, (accumulated) AdamW update, EMA. Pure; jit with donation.
  `schedule_steps` is the lr schedule's (warm-up, total) updates (`optim.schedule_steps`).

  `rng_state` holds the model's nnx rng streams; they are reseeded from `state.rng` and the step
  number here, so they need no checkpointing.
  """
  frozen = _with_graphdefs(frozen_states, frozen_graphdefs)
  rng_state = reseed_rng_state(rng_state, jax.random.fold_in(state.rng, state.step))

  model = nnx.merge(graphdef, state.params, state.model_state, rng_state)

  def compute_loss(model):
    loss, (logits, parts) = loss_fn(statics, model, batch, frozen, class_weights)
    return loss, (logits, parts)

  # nnx.value_and_grad (not jax's) so the model's rng streams and batch statistics may be
  # updated in place while tracing; the gradients come back as a State shaped like the params.
  (loss, (logits, parts)), grads = nnx.value_and_grad(compute_loss, has_aux=True)(model)
  grads = nnx.to_pure_dict(grads)  # the train state holds plain dicts (inference.build_sharded_model)
  new_state = apply_gradients(state, grads, schedule_steps, tx=tx,
                              ema_decay=statics.ema_decay).replace(
      model_state=nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
  labels = batch.nodes['label']
  valid = batch.nodes['mask'] & (labels >= 0)
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) & valid)
  metrics = {
      'loss': loss,
      'accuracy': correct / jnp.maximum(jnp.sum(valid), 1),
      # The parameter norm is logged once per epoch (train/stage.py): norms of the parameters or of the
      # updates here cost a quarter of a teacher step on CPU, because they stop XLA from fusing
      # the AdamW update into one pass over each parameter.
      'grad_norm': optax.tree.norm(grads),
      'lr_scale': state.lr_scale,
      **{f'loss/{k}': v for k, v in parts.items() if jnp.ndim(v) == 0},
  }
  return new_state, metrics


def apply_gradients(state: TrainState, grads, schedule_steps, *, tx,
                    ema_decay: float) -> TrainState:
  """The parameter side of a step: (accumulated) AdamW update, lr scale, EMA, step count.

  One pass over every parameter and its optimizer and EMA slots, whatever the batch size: at the
  authors' batch of 16 utterances this memory traffic is a fixed share of a step on CPU.
  """
  updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                 schedule_steps=schedule_steps)
  updates = jax.tree.map(lambda u: u * state.lr_scale, updates)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    if isinstance(opt_state, optax.MultiStepsState):  # gradient accumulation
      # Only move the average when the accumulated update was actually applied.
      applied = opt_state.mini_step == 0
      # gradient_step already counts this update; the warm-up uses the count before it.
      new_ema = _ema_update(ema, params, opt_state.gradient_step - 1, ema_decay)
      ema = jax.tree.map(lambda n, o: jnp.where(applied, n, o), new_ema, ema)
    else:
      ema = _ema_update(ema, params, state.step, ema_decay)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)


def predict_step(params, model_state, batch, frozen_states, *, graphdef, rng_state,
                 frozen_graphdefs, statics: StageStatics, log_probs: bool = False):
  """Class probabilities [N, C] in eval mode (their logarithms with `log_probs`)."""
  model = nnx.merge(graphdef, params, model_state, rng_state)
  frozen = _with_graphdefs(frozen_states, frozen_graphdefs)
  logits, _ = forward(statics, model, batch, frozen, train=False)
  return (jax.nn.log_softmax if log_probs else jax.nn.softmax)(logits, axis=-1)
