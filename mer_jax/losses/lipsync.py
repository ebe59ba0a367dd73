"""The LipSyncNet triplet loss (SPEC stage 2): margin on distances plus a pull on positives."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def euclidean_distance(x: Array, y: Array) -> Array:
  """|x - y| over the last axis, with a finite (zero) gradient where x == y."""
  squared = jnp.sum(jnp.square(x - y), axis=-1)
  positive = squared > 0
  # Double where: sqrt's gradient at 0 is infinite and would turn into NaN through the mask.
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def _masked_mean(x: Array, mask: Array | None) -> Array:
  if mask is None:
    return jnp.mean(x)
  weight = mask.astype(x.dtype)
  return jnp.sum(x * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def sync_margin_loss(anchor: Array, positive: Array, negative: Array, margin: float,
                     alpha: float, mask: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """alpha * mean(max(0, margin - (d_neg - d_pos))) + (1 - alpha) * mean(d_pos).

  d_pos = |anchor - positive| and d_neg = |anchor - negative| are Euclidean distances between
  embeddings f32[B, D]. With `mask` (bool[B], the valid triplets of a padded batch) every mean
  runs over the valid triplets only; a batch with none gives 0.

  Returns:
    (loss, metrics): metrics holds the (masked) means 'd_pos', 'd_neg', 'hinge' and
    'triplet_accuracy', the fraction of triplets with d_pos < d_neg.
  """
  if margin <= 0:
    raise ValueError(f'lipsync margin must be > 0, got {margin}.')
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'lipsync alpha must be in [0, 1], got {alpha}.')
  if not anchor.shape == positive.shape == negative.shape:
    raise ValueError(f'anchor {anchor.shape}, positive {positive.shape} and negative '
                     f'{negative.shape} embeddings must have the same shape.')
  d_pos = euclidean_distance(anchor, positive)
  d_neg = euclidean_distance(anchor, negative)
  hinge = jnp.maximum(0.0, margin - (d_neg - d_pos))
  mean_hinge = _masked_mean(hinge, mask)
  mean_pos = _masked_mean(d_pos, mask)
  loss = alpha * mean_hinge + (1.0 - alpha) * mean_pos
  metrics = {
      'd_pos': mean_pos,
      'd_neg': _masked_mean(d_neg, mask),
      'hinge': mean_hinge,
      'triplet_accuracy': _masked_mean((d_pos < d_neg).astype(d_pos.dtype), mask),
  }
  return loss, metrics
