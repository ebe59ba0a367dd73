"""The fine-tuning head on a text encoder (the authors' recipe for their RoBERTa features).

encoder hidden states -> pooled vector (the last position by default: the mask token closing a
context prompt) -> linear projection (768-d in the paper) -> linear classifier. Feature
extraction after fine-tuning keeps the fine-tuned encoder's pooled hidden state (the authors
keep the projection; the head is trained for classification only, and the pooled state keeps
the features' dimension independent of the head).
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

POOLINGS = ('mean', 'cls', 'last', 'target_mean')


def pool(hidden: jax.Array, attention_mask: jax.Array, last_index: jax.Array,
         target_mask: jax.Array, pooling: str) -> jax.Array:
  """One vector per row of `hidden` [B, L, H].

  'mean' averages the real tokens (what sentence-transformers models are trained for), 'cls'
  takes the first position, 'last' the last real one (the mask token closing a context prompt:
  the authors' representation), 'target_mean' averages the target utterance's tokens only.
  """
  if pooling == 'cls':
    return hidden[:, 0]
  if pooling == 'last':
    return jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)[:, 0]
  if pooling == 'mean':
    weights = attention_mask.astype(hidden.dtype)
  elif pooling == 'target_mean':
    # A target cut to nothing (cannot happen with max_length > prompt overhead) falls back to all.
    has_target = jnp.any(target_mask, axis=1, keepdims=True)
    weights = jnp.where(has_target, target_mask, attention_mask > 0).astype(hidden.dtype)
  else:
    raise ValueError(f'pooling must be one of {POOLINGS}, got {pooling!r}')
  total = jnp.einsum('bl,blh->bh', weights, hidden)
  return total / jnp.maximum(weights.sum(axis=1, keepdims=True), 1.0)


class TextClassifier(nnx.Module):
  """`encoder` plus projection and classifier; `__call__` returns (logits, projected, pooled)."""

  def __init__(self, encoder: nnx.Module, hidden_size: int, projection_dim: int,
               num_classes: int, *, pooling: str, dropout: float, rngs: nnx.Rngs):
    if pooling not in POOLINGS:
      raise ValueError(f'pooling must be one of {POOLINGS}, got {pooling!r}')
    self.encoder = encoder
    self.pooling = pooling
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.projection = nnx.Linear(
        hidden_size, projection_dim, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ('embed', 'mlp')),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ('mlp',)))
    self.classifier = nnx.Linear(
        projection_dim, num_classes, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ('mlp', None)))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, last_index: jax.Array,
               target_mask: jax.Array, *, train: bool
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    hidden = self.encoder(input_ids, attention_mask, train=train)
    pooled = pool(hidden, attention_mask, last_index, target_mask, self.pooling)
    projected = self.projection(self.dropout(pooled, deterministic=not train))
    logits = self.classifier(projected)
    return logits.astype(jnp.float32), projected, pooled
