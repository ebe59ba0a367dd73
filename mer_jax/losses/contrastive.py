"""Supervised contrastive loss (Khosla et al., 2020) over the valid nodes of a batch."""

import jax
import jax.numpy as jnp

from mer_jax.losses import classification

Array = jax.Array

# Stands in for -inf in masked similarity logits: finite, so no Inf - Inf or 0 * Inf appears.
_MASKED_LOGIT = -1e9
_NORM_EPS = 1e-12


def l2_normalize(x: Array) -> Array:
  """x / ||x|| per row, with a finite gradient at x = 0 (padding rows are zeros)."""
  squared_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared_norm, _NORM_EPS))


def supervised_contrastive_loss(embeddings: Array, labels: Array, mask: Array, *,
                                temperature: float) -> Array:
  """SupCon "L_out": for each anchor, mean over its positives of -log softmax similarity.

  Embeddings are L2-normalised here. For anchor i, positives are the other valid nodes with the
  same label, and the softmax runs over all valid nodes except i itself. That self-exclusion is
  the standard form; the authors' module keeps self in the denominator, which adds a constant
  exp(1 / T) term that dominates at T = 0.07. Anchors without a positive contribute 0, and the
  result is the mean over valid nodes (mask and labeled), 0 when there are none.

  Args:
    embeddings: [N, D].
    labels: int [N]; negative = unlabeled.
    mask: bool [N] of valid nodes.
    temperature: softmax temperature (> 0).

  Returns:
    Scalar loss.
  """
  if embeddings.ndim != 2:
    raise ValueError(f'embeddings must be [N, D], got shape {embeddings.shape}.')
  n = embeddings.shape[0]
  if labels.shape != (n,) or mask.shape != (n,):
    raise ValueError(f'labels and mask must be [{n}] to match embeddings {embeddings.shape}, '
                     f'got labels {labels.shape} and mask {mask.shape}.')
  if temperature <= 0:
    raise ValueError(f'loss.contrastive_temperature must be > 0, got {temperature}.')
  valid = classification.valid_nodes(labels, mask)
  z = l2_normalize(jnp.where(valid[:, None], embeddings.astype(jnp.float32), 0.0))
  similarity = (z @ z.T) / temperature
  not_self = ~jnp.eye(n, dtype=bool)
  candidates = valid[:, None] & valid[None, :] & not_self
  positives = candidates & (labels[:, None] == labels[None, :])
  log_denominator = jax.nn.logsumexp(
      jnp.where(candidates, similarity, _MASKED_LOGIT), axis=-1, keepdims=True)
  log_prob = jnp.where(positives, similarity - log_denominator, 0.0)
  num_positives = jnp.sum(positives, axis=-1)
  per_anchor = -jnp.sum(log_prob, axis=-1) / jnp.maximum(num_positives, 1)
  per_anchor = jnp.where(num_positives > 0, per_anchor, 0.0)
  return classification.masked_mean(per_anchor, valid)
