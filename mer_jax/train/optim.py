"""Optax optimizers: AdamW with per-group lr multipliers, clipping, accumulation, schedules.

Reduce-on-plateau is not an optax transformation here: the step multiplies the final update by
`lr_scale`, a scalar carried in the train state. With AdamW that is exactly a scaled learning
rate (the decoupled weight decay is scaled by the lr too).

The schedule's length is an argument of every update (`tx.update(..., schedule_steps=...)`), not
a constant of the optimizer: a stage and its cross-fitting folds train for different numbers of
steps on the same shapes, and with the length a runtime value they share one compiled step.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mer_jax import models

SCHEDULES = ('constant', 'warmup_cosine', 'warmup_linear')


def schedule_steps(stage_cfg, total_updates: int) -> np.ndarray:
  """(warm-up updates, total updates) of a run of `total_updates` optimizer updates: the int32[2]
  every update takes as `schedule_steps=`. Computed here, in Python, so the warm-up length is
  exactly optax's `int(fraction * total)`."""
  total = max(int(total_updates), 1)
  warmup = max(int(stage_cfg.get('warmup_fraction', 0.0) * total), 1)
  return np.asarray([warmup, total], np.int32)


def scheduled_lr(stage_cfg, count, steps):
  """The learning rate of optimizer update `count` (0-based, after gradient accumulation);
  `steps` is `schedule_steps`'s pair. Both may be traced; the values are optax's
  (warmup_cosine_decay_schedule; join_schedules of two linear_schedule) for the same integers."""
  _check_schedule(stage_cfg)
  lr = stage_cfg.lr
  if stage_cfg.schedule == 'constant':
    return jnp.full(jnp.shape(count), lr, jnp.float32)
  warmup, total = steps[0], steps[1]
  if stage_cfg.schedule == 'warmup_cosine':
    decay = jnp.maximum(total, warmup + 1) - warmup
    cosine = 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(count - warmup, decay).astype(jnp.float32)
                                / decay.astype(jnp.float32)))
    return jnp.where(count < warmup, _linear(count, 0.0, lr, warmup), lr * cosine)
  # warmup_linear: linear warm-up, then linear decay to 0
  return jnp.where(count < warmup, _linear(count, 0.0, lr, warmup),
                   _linear(count - warmup, lr, 0.0, jnp.maximum(total - warmup, 1)))


def learning_rates(stage_cfg, micro_steps: int, steps, lr_scale: float,
                   grouped: bool) -> dict[str, float]:
  """The absolute learning rate of each parameter group in the update of the last of
  `micro_steps` train steps: the schedule at that update, times reduce-on-plateau's `lr_scale`
  and the group's multiplier. One group, 'all', for an optimizer built without groups
  (make_optimizer's `group_of`) or without multipliers. Computed on the host from the step
  count, so the train step returns nothing more for it."""
  update = max(int(micro_steps) - 1, 0) // max(int(stage_cfg.get('grad_accum_steps', 1)), 1)
  _check_schedule(stage_cfg)
  with jax.default_device(_host_device()):
    lr = _host_scheduled_lr(stage_cfg.schedule, float(stage_cfg.lr))(
        np.int32(update), np.asarray(steps, np.int32))
  lr = float(lr) * float(lr_scale)
  multipliers = dict(stage_cfg.get('lr_multipliers', {})) if grouped else {}
  return {group: lr * float(m) for group, m in multipliers.items()} or {'all': lr}


@functools.lru_cache(maxsize=64)
def _host_scheduled_lr(schedule: str, lr: float):
  """scheduled_lr of one schedule and peak lr as one jitted program: run op by op, its first
  call compiled each operation on its own (about 0.6 s a process)."""
  settings = types.SimpleNamespace(schedule=schedule, lr=lr)
  return jax.jit(lambda count, steps: scheduled_lr(settings, count, steps))


def _host_device():
  """The CPU device, where JAX has one (None: the default device)."""
  try:
    return jax.local_devices(backend='cpu')[0]
  except RuntimeError:
    return None


def _linear(count, start: float, end: float, steps):
  """optax.linear_schedule(start, end, steps) at `count`, for a positive, maybe traced, `steps`."""
  count = jnp.clip(count, 0, steps)
  frac = 1 - count / steps
  return (start - end) * frac ** 1 + end


def make_schedule(stage_cfg, total_updates: int) -> optax.Schedule:
  """`count -> learning rate` of a run of `total_updates` optimizer updates."""
  _check_schedule(stage_cfg)
  steps = schedule_steps(stage_cfg, total_updates)
  return lambda count: scheduled_lr(stage_cfg, count, steps)


def _check_schedule(stage_cfg) -> None:
  if stage_cfg.schedule not in SCHEDULES:
    raise ValueError(f'unknown schedule {stage_cfg.schedule!r} ({" | ".join(SCHEDULES)})')


def scale_by_scheduled_lr(stage_cfg) -> optax.GradientTransformationExtraArgs:
  """optax.scale_by_learning_rate with our schedule, its length given to each update."""

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, *, schedule_steps, **unused):
    del params, unused
    step_size = -scheduled_lr(stage_cfg, state.count, schedule_steps)
    updates = jax.tree.map(lambda g: jnp.array(step_size, dtype=g.dtype) * g, updates)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init, update)


def param_labels(params: Any, group_of: Callable[[tuple[str, ...]], str]) -> Any:
  """A tree like `params` holding each leaf's group name."""

  def label(path, _):
    return group_of(models.path_names(path))

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(stage_cfg, params: Any,
                   group_of: Callable[[tuple[str, ...]], str] | None = None
                   ) -> optax.GradientTransformationExtraArgs:
  """optax.adamw with our schedule (every update takes `schedule_steps=`), then per-group lr
  multipliers, global-norm clipping and gradient accumulation as `stage_cfg` asks."""
  _check_schedule(stage_cfg)
  tx = optax.chain(
      optax.scale_by_adam(b1=stage_cfg.b1, b2=stage_cfg.b2, eps=stage_cfg.eps),
      optax.add_decayed_weights(stage_cfg.weight_decay),
      scale_by_scheduled_lr(stage_cfg))
  multipliers = dict(stage_cfg.lr_multipliers)
  if group_of is not None and multipliers:
    labels = param_labels(params, group_of)
    used = set(jax.tree.leaves(labels))
    unknown = used - set(multipliers)
    if unknown:
      raise ValueError(f'parameter groups {sorted(unknown)} have no entry in lr_multipliers '
                       f'{sorted(multipliers)}')
    # AdamW's update is -lr * (direction + decay * param), so scaling a leaf's update by its
    # group's multiplier is that group's AdamW at lr * multiplier. One AdamW over the whole tree
    # with a per-leaf constant fuses into each leaf's update, where a masked AdamW per group
    # (optax.multi_transform) makes one pass per group (docs/performance.md).
    factors = jax.tree.map(lambda group: float(multipliers[group]), labels)
    tx = optax.chain(tx, optax.stateless(
        lambda updates, _: jax.tree.map(lambda u, f: u * f, updates, factors)))
  if stage_cfg.grad_clip_norm and stage_cfg.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(stage_cfg.grad_clip_norm), tx)
  if stage_cfg.grad_accum_steps > 1:
    tx = accumulate_gradients(tx, stage_cfg.grad_accum_steps)
  return tx


def accumulate_gradients(inner: optax.GradientTransformation,
                         every: int) -> optax.GradientTransformationExtraArgs:
  """optax.MultiSteps(inner, every): the mean gradient of `every` micro-steps goes to one update
  of `inner`, and micro-steps in between return zero updates. Same state (optax.MultiStepsState)
  and arithmetic, without MultiSteps' lax.cond (its "skip this update" branch, never taken
  here): the branch kept XLA from fusing the update with the rest of the step and made compiling
  a fusion step several seconds longer on CPU (docs/performance.md)."""
  inner = optax.with_extra_args_support(inner)

  def init(params):
    return optax.MultiStepsState(
        mini_step=jnp.zeros([], jnp.int32), gradient_step=jnp.zeros([], jnp.int32),
        inner_opt_state=inner.init(params),
        acc_grads=optax.tree.zeros_like(params, dtype=jnp.float32), skip_state=())

  def update(updates, state, params=None, **extra_args):
    acc = jax.tree.map(lambda g, a: a + (g - a) / (state.mini_step + 1), updates,
                       state.acc_grads)
    final, new_inner = inner.update(optax.tree.cast_like(acc, updates), state.inner_opt_state,
                                    params, **extra_args)
    emit = state.mini_step == every - 1
    new_state = optax.MultiStepsState(
        mini_step=optax.safe_increment(state.mini_step) % every,
        gradient_step=(emit * optax.safe_increment(state.gradient_step)
                       + (1 - emit) * state.gradient_step),
        inner_opt_state=jax.tree.map(lambda old, new: jnp.where(emit, new, old).astype(old.dtype),
                                     state.inner_opt_state, new_inner),
        acc_grads=jax.tree.map(lambda a: ((1 - emit) * a).astype(jnp.float32), acc),
        skip_state=())
    return jax.tree.map(lambda u: emit * u, final), new_state

  return optax.GradientTransformationExtraArgs(init, update)
