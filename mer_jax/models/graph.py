"""Utterance graphs: vectorised edge construction and message passing on padded batches.

A batch is a padded `jraph.GraphsTuple` (see the batch contract in the project README):
one graph per dialogue (or per minibatch in the authors' batch scope), with structural
temporal / same-speaker edges from the input pipeline. Each modality encoder adds
cosine k-nearest-neighbour edges between utterances of the same graph. Every array has a
static shape, so a step compiles once: invalid edges stay in the arrays, masked.
"""

from collections.abc import Sequence
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import jraph

TEMPORAL_EDGE = 0
SPEAKER_EDGE = 1
GAT_EDGE_WEIGHT_MODES = ('bias', 'none')

# Softmax logit of masked edges / keys: finite, so a segment with no valid entry yields
# finite (then zeroed) weights instead of NaN.
MASKED_LOGIT = -1e9


class GraphEdges(NamedTuple):
  """Message-passing edges of one modality; messages flow sender -> receiver.

  Masked edges point at the last node slot (always jraph padding) with weight 0, and are
  also excluded explicitly from every softmax and sum.
  """
  senders: jax.Array  # int32[E]
  receivers: jax.Array  # int32[E]
  weights: jax.Array  # f32[E]
  mask: jax.Array  # bool[E]


class EdgeSpec(NamedTuple):
  """How one modality builds its edges (from config graph.*)."""
  k: int
  temporal_weight: float
  speaker_weight: float = 1.0
  speaker_edges: bool = False


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs,
           use_bias: bool = True,
           axes: tuple[str | None, str | None] = ('embed', 'mlp')) -> nnx.Linear:
  """A dense layer whose kernel and bias carry logical axis names for sharding."""
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias,
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), axes[-1:]),
      rngs=rngs)


def num_node_slots(graph: jraph.GraphsTuple) -> int:
  return graph.nodes['mask'].shape[0]


def node_graph_ids(graph: jraph.GraphsTuple) -> jax.Array:
  """int32[N]: the graph slot each node slot belongs to."""
  num_graphs = graph.n_node.shape[0]
  return jnp.repeat(jnp.arange(num_graphs, dtype=jnp.int32), graph.n_node,
                    total_repeat_length=num_node_slots(graph))


def _knn_edges(x: jax.Array, allowed: jax.Array, k: int):
  """Top-k cosine neighbours (senders) of every node (receiver) among allowed pairs."""
  unit = x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)
  similarity = unit @ unit.T
  top_similarity, senders = jax.lax.top_k(
      jnp.where(allowed, similarity, -jnp.inf), k)
  mask = jnp.take_along_axis(allowed, senders, axis=1)
  receivers = jnp.broadcast_to(
      jnp.arange(x.shape[0], dtype=senders.dtype)[:, None], senders.shape)
  return senders, receivers, jnp.where(mask, top_similarity, 0.0), mask


def build_modality_edges(
    x: jax.Array,
    graph: jraph.GraphsTuple,
    *,
    k: int,
    temporal_weight: float,
    speaker_weight: float,
    candidate_mask: jax.Array,
    speaker_edges: bool = True,
    self_loops: bool = False,
) -> GraphEdges:
  """kNN + structural (+ self-loop) edges of one modality, all with static counts.

  Layout: N*k' kNN edges (k' = min(k, N-1), receiver-major), then the batch's E
  structural edges in their slots, then N self loops if requested.

  kNN: for every candidate receiver, its k most cosine-similar candidates of the same
  graph (self excluded); fewer are available in small graphs, the rest are masked. Weight:
  the similarity, plus the weight of every structural edge joining the same ordered pair.
  Structural edges (temporal: `temporal_weight`, same-speaker: `speaker_weight`, the latter
  only with `speaker_edges`) are kept only where the pair is not already a kNN edge and only
  once per pair (weight: the sum over the pair's structural edges), and only from a
  candidate sender: a node without this modality has nothing to send. Self loops (weight 1,
  a unit vector's self-similarity) cover every real node.

  Args:
    x: f32[N, d] node features (the batch-normalised encoder input).
    graph: the padded batch; uses nodes['mask'], n_node, senders, receivers, edges['kind'].
    k: neighbours per receiver.
    temporal_weight: weight of a temporal edge (added to a coinciding kNN edge).
    speaker_weight: weight of a same-speaker edge (likewise).
    candidate_mask: bool[N], nodes allowed in kNN edges (real and modality present).
    speaker_edges: whether same-speaker structural edges are used.
    self_loops: append one self loop per real node (graph attention).

  Returns:
    GraphEdges with E_total = N*k' + E (+ N) entries.
  """
  num_nodes = x.shape[0]
  if num_nodes < 2:
    raise ValueError(f'build_modality_edges: need >= 2 node slots (one for padding), '
                     f'got {num_nodes}.')
  if k < 1:
    raise ValueError(f'build_modality_edges: k must be >= 1, got {k}.')
  node_mask = graph.nodes['mask']
  candidate = candidate_mask & node_mask
  graph_ids = node_graph_ids(graph)
  allowed = (candidate[:, None] & candidate[None, :]
             & (graph_ids[:, None] == graph_ids[None, :])
             & ~jnp.eye(num_nodes, dtype=bool))
  knn_senders, knn_receivers, knn_weights, knn_mask = _knn_edges(
      x, allowed, min(k, num_nodes - 1))

  senders = graph.senders.astype(jnp.int32)
  receivers = graph.receivers.astype(jnp.int32)
  kind = graph.edges['kind']
  use_kind = kind == TEMPORAL_EDGE
  if speaker_edges:
    use_kind = use_kind | (kind == SPEAKER_EDGE)
  valid = use_kind & candidate[senders] & node_mask[receivers]
  kind_weight = jnp.where(kind == TEMPORAL_EDGE, temporal_weight, speaker_weight)
  kind_weight = jnp.where(valid, kind_weight, 0.0).astype(x.dtype)
  # Dense [receiver, sender] tables; invalid edges scatter to row N and are dropped.
  rows = jnp.where(valid, receivers, num_nodes)
  pair_weight = jnp.zeros((num_nodes, num_nodes), x.dtype).at[rows, senders].add(
      kind_weight, mode='drop')
  num_edges = senders.shape[0]
  edge_index = jnp.arange(num_edges, dtype=jnp.int32)
  first_edge = jnp.full((num_nodes, num_nodes), num_edges, jnp.int32).at[
      rows, senders].min(edge_index, mode='drop')

  knn_weights = knn_weights + jnp.where(
      knn_mask, pair_weight[knn_receivers, knn_senders], 0.0)
  is_knn = jnp.any((knn_senders[receivers] == senders[:, None]) & knn_mask[receivers],
                   axis=1)
  keep = valid & ~is_knn & (first_edge[receivers, senders] == edge_index)

  parts = [
      (knn_senders.reshape(-1), knn_receivers.reshape(-1), knn_weights.reshape(-1),
       knn_mask.reshape(-1)),
      (senders, receivers, pair_weight[receivers, senders], keep),
  ]
  if self_loops:
    nodes = jnp.arange(num_nodes, dtype=jnp.int32)
    parts.append((nodes, nodes, jnp.ones((num_nodes,), x.dtype), node_mask))
  all_senders, all_receivers, weights, mask = (
      jnp.concatenate(column) for column in zip(*parts))
  dump = num_nodes - 1
  return GraphEdges(
      senders=jnp.where(mask, all_senders, dump),
      receivers=jnp.where(mask, all_receivers, dump),
      weights=jnp.where(mask, weights, 0.0),
      mask=mask)


class GraphAttention(nnx.Module):
  """Multi-head graph attention (Velickovic et al.) over masked, weighted edges.

  alpha_ij = softmax_j(LeakyReLU(a_s . W x_j + a_d . W x_i) [+ beta_h * w_ji]) over the
  valid edges into i; out_i = sum_j alpha_ij W x_j, heads concatenated or averaged, plus
  a bias. With edge_weights='bias' the learned per-head beta (initialised to 1) lets edge
  weights shape attention; 'none' ignores them, as PyG's GATConv did for the authors.
  """

  def __init__(self, in_features: int, out_features: int, heads: int, *,
               concat: bool, edge_weights: str = 'bias', attention_dropout: float = 0.0,
               rngs: nnx.Rngs):
    if edge_weights not in GAT_EDGE_WEIGHT_MODES:
      raise ValueError(f'graph.gat_edge_weights must be one of {GAT_EDGE_WEIGHT_MODES}, '
                       f'got {edge_weights!r}.')
    self.heads = heads
    self.out_features = out_features
    self.concat = concat
    self.edge_weights = edge_weights
    glorot = nnx.initializers.glorot_uniform()
    self.projection = nnx.Linear(
        in_features, heads * out_features, use_bias=False,
        kernel_init=nnx.with_partitioning(glorot, ('embed', 'mlp')), rngs=rngs)
    self.attend_sender = nnx.Param(glorot(rngs.params(), (heads, out_features)))
    self.attend_receiver = nnx.Param(glorot(rngs.params(), (heads, out_features)))
    if edge_weights == 'bias':
      self.edge_scale = nnx.Param(jnp.ones((heads,)))
    self.bias = nnx.Param(jnp.zeros((heads * out_features if concat else out_features,)))
    self.attention_dropout = nnx.Dropout(attention_dropout, rngs=rngs)

  @property
  def output_width(self) -> int:
    return self.heads * self.out_features if self.concat else self.out_features

  def __call__(self, x: jax.Array, edges: GraphEdges, *, train: bool = False) -> jax.Array:
    num_nodes = x.shape[0]
    h = self.projection(x).reshape(num_nodes, self.heads, self.out_features)
    score_sender = jnp.sum(h * self.attend_sender[...], axis=-1)  # [N, H]
    score_receiver = jnp.sum(h * self.attend_receiver[...], axis=-1)
    logits = jax.nn.leaky_relu(
        score_sender[edges.senders] + score_receiver[edges.receivers], 0.2)
    if self.edge_weights == 'bias':
      logits = logits + edges.weights[:, None] * self.edge_scale[...]
    edge_mask = edges.mask[:, None]
    logits = jnp.where(edge_mask, logits, MASKED_LOGIT)
    alpha = jraph.segment_softmax(logits, edges.receivers, num_nodes)
    alpha = jnp.where(edge_mask, alpha, 0.0)
    alpha = self.attention_dropout(alpha, deterministic=not train)
    messages = alpha[..., None] * h[edges.senders]  # [E, H, F]
    out = jax.ops.segment_sum(messages, edges.receivers, num_nodes)
    if self.concat:
      out = out.reshape(num_nodes, self.heads * self.out_features)
    else:
      out = out.mean(axis=1)
    return out + self.bias[...]


class GraphConvolution(nnx.Module):
  """out_i = W_root x_i + W_nbr sum_j w_ji x_j + b over valid edges (PyG GraphConv, add)."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.out_features = out_features
    self.root = linear(in_features, out_features, use_bias=False, rngs=rngs)
    # Projecting before the weighted sum is the same map (it is linear) on fewer columns.
    self.neighbour = linear(in_features, out_features, use_bias=False, rngs=rngs)
    self.bias = nnx.Param(jnp.zeros((out_features,)))

  @property
  def output_width(self) -> int:
    return self.out_features

  def __call__(self, x: jax.Array, edges: GraphEdges, *, train: bool = False) -> jax.Array:
    """`train` is accepted for the common layer interface; the layer has no dropout."""
    del train
    projected = self.neighbour(x)
    messages = jnp.where(edges.mask[:, None],
                         edges.weights[:, None] * projected[edges.senders], 0.0)
    aggregated = jax.ops.segment_sum(messages, edges.receivers, x.shape[0])
    return self.root(x) + aggregated + self.bias[...]


def stack_widths(layers: Sequence[tuple[int, int, bool]]) -> list[int]:
  """Output width of each (width per head, heads, concat) graph-attention layer."""
  return [width * heads if concat else width for width, heads, concat in layers]
