"""Optax optimizers: AdamW with per-group lr multipliers, clipping, accumulation, schedules.

Reduce-on-plateau is not an optax transformation here: the step multiplies the final update by
`lr_scale`, a scalar carried in the train state. With AdamW that is exactly a scaled learning
rate (the decoupled weight decay is scaled by the lr too).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from mer_jax import models


def make_schedule(stage_cfg, total_steps: int) -> optax.Schedule:
  """Learning rate per optimizer step (after gradient accumulation)."""
  if stage_cfg.schedule == 'constant':
    return optax.constant_schedule(stage_cfg.lr)
  if stage_cfg.schedule == 'warmup_cosine':
    warmup = int(stage_cfg.warmup_fraction * total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=stage_cfg.lr, warmup_steps=max(warmup, 1),
        decay_steps=max(total_steps, warmup + 1), end_value=0.0)
  if stage_cfg.schedule == 'warmup_linear':  # linear warm-up, then linear decay to 0
    warmup = max(int(stage_cfg.warmup_fraction * total_steps), 1)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, stage_cfg.lr, warmup),
         optax.linear_schedule(stage_cfg.lr, 0.0, max(total_steps - warmup, 1))], [warmup])
  raise ValueError(f'unknown schedule {stage_cfg.schedule!r} '
                   '(constant | warmup_cosine | warmup_linear)')


def param_labels(params: Any, group_of: Callable[[tuple[str, ...]], str]) -> Any:
  """A tree like `params` holding each leaf's group name."""

  def label(path, _):
    return group_of(models.path_names(path))

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(stage_cfg, params: Any, total_steps: int,
                   group_of: Callable[[tuple[str, ...]], str] | None = None
                   ) -> optax.GradientTransformation:
  schedule = make_schedule(stage_cfg, total_steps)

  tx = optax.adamw(schedule, b1=stage_cfg.b1, b2=stage_cfg.b2, eps=stage_cfg.eps,
                   weight_decay=stage_cfg.weight_decay)
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
    tx = optax.MultiSteps(tx, every_k_schedule=stage_cfg.grad_accum_steps)
  return tx
