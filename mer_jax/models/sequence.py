"""A bidirectional GRU over each dialogue's utterances, run on a packed graph batch.

The graph layers see a dialogue as a set joined by weighted edges: the order of the turns only
enters through the temporal edges' weights. This module reads the turns in order. A batch packs
its dialogues one after another along the node axis (padding nodes last, in their own graph), so
one scan over the node axis, with the carry reset wherever a new dialogue starts, runs every
dialogue's forward pass at once; the backward pass is the same scan over the reversed axis,
reset where a dialogue ends. Both directions share one scan: their carries are stacked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jraph
from flax import nnx

from mer_jax.models import graph as graph_lib


def dialogue_starts_and_ends(graph: jraph.GraphsTuple) -> tuple[jax.Array, jax.Array]:
  """bool[N] pairs: whether a node slot is the first / the last of its graph slot."""
  ids = graph_lib.node_graph_ids(graph)
  changes = ids[1:] != ids[:-1]
  edge = jnp.ones((1,), bool)
  return jnp.concatenate([edge, changes]), jnp.concatenate([changes, edge])


class DialogueBiGRU(nnx.Module):
  """out_i = [forward GRU state at i, backward GRU state at i], each `hidden` wide.

  The gates follow torch.nn.GRU (reset applied to the recurrent term inside the candidate):
    r = sigmoid(W_r x + U_r h + b), z = sigmoid(W_z x + U_z h + b),
    n = tanh(W_n x + b_n + r * (U_n h + c_n)), h' = (1 - z) * n + z * h.
  """

  def __init__(self, in_features: int, hidden: int, *, projection: int = 0, rngs: nnx.Rngs):
    """`projection` > 0: the GRU reads relu(linear(x)) of that width instead of x."""
    if hidden < 1:
      raise ValueError(f'DialogueBiGRU needs hidden >= 1, got {hidden}.')
    if projection < 0:
      raise ValueError(f'DialogueBiGRU needs projection >= 0, got {projection}.')
    self.hidden = hidden
    self.projection = (graph_lib.linear(in_features, projection, rngs=rngs)
                       if projection else None)
    in_features = projection or in_features
    init = nnx.initializers.glorot_uniform()
    orthogonal = nnx.initializers.orthogonal()
    # [direction, ...]: both directions' input and recurrent weights, gates r|z|n side by side.
    self.input_kernel = nnx.Param(
        jnp.stack([init(rngs.params(), (in_features, 3 * hidden)) for _ in range(2)]))
    self.input_bias = nnx.Param(jnp.zeros((2, 3 * hidden)))
    self.recurrent_kernel = nnx.Param(jnp.stack([
        jnp.concatenate([orthogonal(rngs.params(), (hidden, hidden)) for _ in range(3)], axis=1)
        for _ in range(2)]))
    self.recurrent_bias = nnx.Param(jnp.zeros((2, 3 * hidden)))

  @property
  def output_width(self) -> int:
    return 2 * self.hidden

  def __call__(self, x: jax.Array, graph: jraph.GraphsTuple) -> jax.Array:
    """f32[N, d] node features -> f32[N, 2 * hidden]."""
    starts, ends = dialogue_starts_and_ends(graph)
    if self.projection is not None:
      x = jax.nn.relu(self.projection(x))
    # Input terms of every step at once: [N, direction, 3h]; the backward direction's reversed.
    gates_x = jnp.einsum('nd,kdg->nkg', x, self.input_kernel[...]) + self.input_bias[...]
    gates_x = jnp.stack([gates_x[:, 0], gates_x[::-1, 1]], axis=1)
    resets = jnp.stack([starts, ends[::-1]], axis=1)  # [N, direction]
    recurrent_kernel = self.recurrent_kernel[...]
    recurrent_bias = self.recurrent_bias[...]
    h = self.hidden

    def step(carry, inputs):
      gx, reset = inputs  # [direction, 3h], [direction]
      carry = jnp.where(reset[:, None], 0.0, carry)
      gh = jnp.einsum('kh,khg->kg', carry, recurrent_kernel) + recurrent_bias
      r = jax.nn.sigmoid(gx[:, :h] + gh[:, :h])
      z = jax.nn.sigmoid(gx[:, h:2 * h] + gh[:, h:2 * h])
      n = jnp.tanh(gx[:, 2 * h:] + r * gh[:, 2 * h:])
      carry = (1.0 - z) * n + z * carry
      return carry, carry

    initial = jnp.zeros((2, h), gates_x.dtype)
    _, states = jax.lax.scan(step, initial, (gates_x, resets))  # [N, direction, h]
    return jnp.concatenate([states[:, 0], states[::-1, 1]], axis=-1)
