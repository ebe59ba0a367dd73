"""Mixture of experts with top-k routing, computed densely over one stacked expert tensor."""

from flax import nnx
import jax
import jax.numpy as jnp

from mer_jax.models import graph as graph_lib


def top_k_combine_weights(router_logits: jax.Array, top_k: int) -> jax.Array:
  """f32[N, E]: softmax over each row's top-k router logits, zero elsewhere."""
  top_logits, top_index = jax.lax.top_k(router_logits, top_k)
  top_weights = jax.nn.softmax(top_logits, axis=-1)
  one_hot = jax.nn.one_hot(top_index, router_logits.shape[-1], dtype=top_weights.dtype)
  return jnp.einsum('nk,nke->ne', top_weights, one_hot)


class MixtureOfExperts(nnx.Module):
  """Experts Linear-LayerNorm-GELU-Dropout mixed by a top-k softmax router.

  All experts run on all rows (one einsum over the [E, in, out] kernel, no per-sample
  gathers); rows combine them with sparse weights. For a handful of experts this is
  cheaper on accelerators than dispatching, and the expert axis can be sharded.
  """

  def __init__(self, in_features: int, out_features: int, *, num_experts: int,
               top_k: int, dropout: float, rngs: nnx.Rngs):
    if not 1 <= top_k <= num_experts:
      raise ValueError(f'model.fusion.top_k must be in [1, num_experts={num_experts}], '
                       f'got {top_k}.')
    self.top_k = top_k
    hidden = max(in_features // 2, 1)
    self.router_hidden = graph_lib.linear(in_features, hidden, rngs=rngs)
    self.router_out = graph_lib.linear(hidden, num_experts, axes=('mlp', None), rngs=rngs)
    kernel_init = nnx.with_partitioning(
        nnx.initializers.lecun_normal(batch_axis=(0,)), ('expert', 'embed', 'mlp'))
    self.kernel = nnx.Param(
        kernel_init(rngs.params(), (num_experts, in_features, out_features)))
    per_expert = (num_experts, out_features)
    self.bias = nnx.Param(nnx.with_partitioning(
        nnx.initializers.zeros_init(), ('expert', 'mlp'))(rngs.params(), per_expert))
    self.norm_scale = nnx.Param(nnx.with_partitioning(
        nnx.initializers.ones_init(), ('expert', 'mlp'))(rngs.params(), per_expert))
    self.norm_bias = nnx.Param(nnx.with_partitioning(
        nnx.initializers.zeros_init(), ('expert', 'mlp'))(rngs.params(), per_expert))
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def router_logits(self, x: jax.Array) -> jax.Array:
    return self.router_out(jax.nn.gelu(self.router_hidden(x), approximate=False))

  def expert_outputs(self, x: jax.Array, *, train: bool) -> jax.Array:
    """f32[N, E, out]: every expert applied to every row."""
    h = jnp.einsum('ni,eio->neo', x, self.kernel[...]) + self.bias[...]
    mean = h.mean(axis=-1, keepdims=True)
    var = jnp.square(h - mean).mean(axis=-1, keepdims=True)
    h = (h - mean) * jax.lax.rsqrt(var + 1e-5) * self.norm_scale[...] + self.norm_bias[...]
    return self.dropout(jax.nn.gelu(h, approximate=False), deterministic=not train)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    combine = top_k_combine_weights(self.router_logits(x), self.top_k)
    return jnp.einsum('ne,neo->no', combine, self.expert_outputs(x, train=train))
