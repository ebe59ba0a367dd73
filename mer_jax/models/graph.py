"""Utterance graphs: vectorised edge construction and message passing on padded batches.

A batch is a padded `jraph.GraphsTuple` (see mer_jax/batch_contract.py):
one graph per dialogue (or per minibatch in the authors' batch scope), with structural
temporal / same-speaker edges from the input pipeline. Each modality encoder adds
cosine k-nearest-neighbour edges between utterances of the same graph. Every array has a
static shape, so a step compiles once: invalid edges stay in the arrays, masked.

Edges come in two equivalent forms: an edge list (`GraphEdges`: gathers and segment sums,
the jraph form) or [N, N] matrices (`DenseGraph`: matrix products, no gather or scatter),
which are faster at our small node budgets on CPU and suit matrix units.
"""

from collections.abc import Sequence
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import jraph

from mer_jax.batch_contract import SPEAKER_EDGE
from mer_jax.batch_contract import TEMPORAL_EDGE

GAT_EDGE_WEIGHT_MODES = ('bias', 'none')
# 'dense': DenseGraph and matrix products; 'segment': GraphEdges, gathers and segment sums.
MESSAGE_PASSING_MODES = ('dense', 'segment')

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


class DenseGraph(NamedTuple):
  """The same edges as [receiver, sender] matrices over the N node slots.

  Message passing then is matrix products, with no gather or scatter: the form for small
  static node budgets and for matrix units. An edge list with several valid edges joining
  one ordered pair becomes one edge with their summed weight.
  """
  weights: jax.Array  # f32[N, N]; 0 where there is no edge
  mask: jax.Array  # bool[N, N]


class EdgeSpec(NamedTuple):
  """How one modality builds its edges (from config graph.*)."""
  k: int
  temporal_weight: float
  speaker_weight: float = 1.0
  speaker_edges: bool = False


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs,
           use_bias: bool = True,
           axes: tuple[str | None, str | None] = ('embed', 'mlp'),
           kernel_init=nnx.initializers.lecun_normal()) -> nnx.Linear:
  """A dense layer whose kernel and bias carry logical axis names for sharding."""
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias,
      kernel_init=nnx.with_partitioning(kernel_init, axes),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), axes[-1:]),
      rngs=rngs)


def zero_linear(in_features: int, out_features: int, *, rngs: nnx.Rngs) -> nnx.Linear:
  """A bias-free [in, classes] map that starts at zero (the linear skips to the logits)."""
  return linear(in_features, out_features, use_bias=False, axes=('embed', None),
                kernel_init=nnx.initializers.zeros_init(), rngs=rngs)


def num_node_slots(graph: jraph.GraphsTuple) -> int:
  return graph.nodes['mask'].shape[0]


def node_graph_ids(graph: jraph.GraphsTuple) -> jax.Array:
  """int32[N]: the graph slot each node slot belongs to."""
  num_graphs = graph.n_node.shape[0]
  return jnp.repeat(jnp.arange(num_graphs, dtype=jnp.int32), graph.n_node,
                    total_repeat_length=num_node_slots(graph))


def _check_edge_budget(num_nodes: int, k: int, caller: str) -> None:
  if num_nodes < 2:
    raise ValueError(f'{caller}: need >= 2 node slots (one for padding), got {num_nodes}.')
  if k < 1:
    raise ValueError(f'{caller}: k must be >= 1, got {k}.')


def _candidate_pairs(graph: jraph.GraphsTuple,
                     candidate_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """bool[N] kNN candidates and bool[N, N] pairs allowed as kNN edges (same graph, no self)."""
  num_nodes = num_node_slots(graph)
  candidate = candidate_mask & graph.nodes['mask']
  graph_ids = node_graph_ids(graph)
  allowed = (candidate[:, None] & candidate[None, :]
             & (graph_ids[:, None] == graph_ids[None, :])
             & ~jnp.eye(num_nodes, dtype=bool))
  return candidate, allowed


def _knn_senders(x: jax.Array, allowed: jax.Array,
                 k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Cosine similarity f32[N, N] and the k most similar allowed senders of every receiver.

  Returns (similarity, senders int32[N, k'], valid bool[N, k']), k' = min(k, N - 1); rows
  with fewer than k' allowed senders are padded with masked entries.
  """
  unit = x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)
  similarity = unit @ unit.T
  _, senders = jax.lax.top_k(jnp.where(allowed, similarity, -jnp.inf),
                             min(k, x.shape[0] - 1))
  return similarity, senders, jnp.take_along_axis(allowed, senders, axis=1)


class _StructuralEdges(NamedTuple):
  senders: jax.Array  # int32[E]
  receivers: jax.Array  # int32[E]
  valid: jax.Array  # bool[E]: used by this modality
  rows: jax.Array  # int32[E]: the receiver, or N (out of range) where not valid
  pair_weight: jax.Array  # f32[N, N] [receiver, sender]: summed weights of valid edges


def _structural_edges(graph: jraph.GraphsTuple, candidate: jax.Array, *,
                      temporal_weight: float, speaker_weight: float, speaker_edges: bool,
                      dtype: jnp.dtype) -> _StructuralEdges:
  """The batch's structural edges this modality uses, and their dense summed weights."""
  num_nodes = num_node_slots(graph)
  senders = graph.senders.astype(jnp.int32)
  receivers = graph.receivers.astype(jnp.int32)
  kind = graph.edges['kind']
  use_kind = kind == TEMPORAL_EDGE
  if speaker_edges:
    use_kind = use_kind | (kind == SPEAKER_EDGE)
  valid = use_kind & candidate[senders] & graph.nodes['mask'][receivers]
  kind_weight = jnp.where(kind == TEMPORAL_EDGE, temporal_weight, speaker_weight)
  kind_weight = jnp.where(valid, kind_weight, 0.0).astype(dtype)
  # Invalid edges scatter to row N and are dropped.
  rows = jnp.where(valid, receivers, num_nodes)
  pair_weight = jnp.zeros((num_nodes, num_nodes), dtype).at[rows, senders].add(
      kind_weight, mode='drop')
  return _StructuralEdges(senders, receivers, valid, rows, pair_weight)


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
  _check_edge_budget(num_nodes, k, 'build_modality_edges')
  node_mask = graph.nodes['mask']
  candidate, allowed = _candidate_pairs(graph, candidate_mask)
  similarity, knn_senders, knn_mask = _knn_senders(x, allowed, k)
  knn_receivers = jnp.broadcast_to(
      jnp.arange(num_nodes, dtype=knn_senders.dtype)[:, None], knn_senders.shape)
  structural = _structural_edges(
      graph, candidate, temporal_weight=temporal_weight, speaker_weight=speaker_weight,
      speaker_edges=speaker_edges, dtype=x.dtype)
  senders, receivers = structural.senders, structural.receivers
  num_edges = senders.shape[0]
  edge_index = jnp.arange(num_edges, dtype=jnp.int32)
  first_edge = jnp.full((num_nodes, num_nodes), num_edges, jnp.int32).at[
      structural.rows, senders].min(edge_index, mode='drop')

  knn_weights = jnp.where(
      knn_mask,
      jnp.take_along_axis(similarity + structural.pair_weight, knn_senders, axis=1), 0.0)
  is_knn = jnp.any((knn_senders[receivers] == senders[:, None]) & knn_mask[receivers],
                   axis=1)
  keep = (structural.valid & ~is_knn
          & (first_edge[receivers, senders] == edge_index))

  parts = [
      (knn_senders.reshape(-1), knn_receivers.reshape(-1), knn_weights.reshape(-1),
       knn_mask.reshape(-1)),
      (senders, receivers, structural.pair_weight[receivers, senders], keep),
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


def build_modality_adjacency(
    x: jax.Array,
    graph: jraph.GraphsTuple,
    *,
    k: int,
    temporal_weight: float,
    speaker_weight: float,
    candidate_mask: jax.Array,
    speaker_edges: bool = True,
    self_loops: bool = False,
) -> DenseGraph:
  """The edges of `build_modality_edges` (same arguments) as a DenseGraph.

  That edge list joins each ordered pair at most once (structural edges join distinct
  utterances), so this holds exactly its edges and weights; built without the list.
  """
  num_nodes = x.shape[0]
  _check_edge_budget(num_nodes, k, 'build_modality_adjacency')
  candidate, allowed = _candidate_pairs(graph, candidate_mask)
  similarity, knn_senders, _ = _knn_senders(x, allowed, k)
  node_ids = jnp.arange(num_nodes, dtype=knn_senders.dtype)
  # Top-k indices are distinct per row; entries past the allowed ones are not allowed.
  is_knn = jnp.any(knn_senders[:, :, None] == node_ids, axis=1) & allowed
  structural = _structural_edges(
      graph, candidate, temporal_weight=temporal_weight, speaker_weight=speaker_weight,
      speaker_edges=speaker_edges, dtype=x.dtype)
  is_structural = jnp.zeros((num_nodes, num_nodes), bool).at[
      structural.rows, structural.senders].set(True, mode='drop')
  mask = is_knn | is_structural
  weights = jnp.where(is_knn, similarity, 0.0) + structural.pair_weight
  if self_loops:
    is_loop = jnp.eye(num_nodes, dtype=bool) & graph.nodes['mask'][:, None]
    mask = mask | is_loop
    weights = weights + is_loop.astype(x.dtype)
  return DenseGraph(weights=jnp.where(mask, weights, 0.0), mask=mask)


def dense_adjacency(edges: GraphEdges, num_nodes: int) -> DenseGraph:
  """The DenseGraph of an edge list: a pair's weight is the sum over its valid edges."""
  rows = jnp.where(edges.mask, edges.receivers, num_nodes)
  weights = jnp.zeros((num_nodes, num_nodes), edges.weights.dtype).at[
      rows, edges.senders].add(edges.weights, mode='drop')
  mask = jnp.zeros((num_nodes, num_nodes), bool).at[rows, edges.senders].set(
      True, mode='drop')
  return DenseGraph(weights=weights, mask=mask)


class GraphAttention(nnx.Module):
  """Multi-head graph attention (Velickovic et al.) over masked, weighted edges.

  alpha_ij = softmax_j(LeakyReLU(a_s . W x_j + a_d . W x_i) [+ beta_h * w_ji]) over the
  valid edges into i; out_i = sum_j alpha_ij W x_j, heads concatenated or averaged, plus
  a bias. With edge_weights='bias' the learned per-head beta (initialised to 1) lets edge
  weights shape attention; 'none' ignores them, as PyG's GATConv did for the authors.
  Edges come as a DenseGraph (attention as [heads, N, N] matrices) or as GraphEdges
  (per-edge gathers and segment softmax); both give the same result for the same edges.
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

  def __call__(self, x: jax.Array, edges: GraphEdges | DenseGraph, *,
               train: bool = False) -> jax.Array:
    num_nodes = x.shape[0]
    h = self.projection(x).reshape(num_nodes, self.heads, self.out_features)
    score_sender = jnp.einsum('nhf,hf->nh', h, self.attend_sender[...])
    score_receiver = jnp.einsum('nhf,hf->nh', h, self.attend_receiver[...])
    if isinstance(edges, DenseGraph):
      out = self._attend_dense(h, score_sender, score_receiver, edges, train=train)
    else:
      out = self._attend_segment(h, score_sender, score_receiver, edges, train=train)
    if self.concat:
      out = out.reshape(num_nodes, self.heads * self.out_features)
    else:
      out = out.mean(axis=1)
    return out + self.bias[...]

  def _attend_dense(self, h: jax.Array, score_sender: jax.Array, score_receiver: jax.Array,
                    adjacency: DenseGraph, *, train: bool) -> jax.Array:
    """f32[N, H, F] from logits f32[H, receiver, sender]."""
    logits = jax.nn.leaky_relu(score_receiver.T[:, :, None] + score_sender.T[:, None, :], 0.2)
    if self.edge_weights == 'bias':
      logits = logits + self.edge_scale[...][:, None, None] * adjacency.weights
    mask = adjacency.mask[None]
    alpha = jax.nn.softmax(jnp.where(mask, logits, MASKED_LOGIT), axis=-1)
    alpha = jnp.where(mask, alpha, 0.0)
    alpha = self.attention_dropout(alpha, deterministic=not train)
    return jnp.einsum('hrs,shf->rhf', alpha, h)

  def _attend_segment(self, h: jax.Array, score_sender: jax.Array, score_receiver: jax.Array,
                      edges: GraphEdges, *, train: bool) -> jax.Array:
    """f32[N, H, F] from logits f32[E, H]."""
    num_nodes = h.shape[0]
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
    return jax.ops.segment_sum(messages, edges.receivers, num_nodes)


class GraphConvolution(nnx.Module):
  """out_i = W_root x_i + W_nbr sum_j w_ji x_j + b over valid edges (PyG GraphConv, add).

  Edges come as a DenseGraph (one [N, N] matrix product) or as GraphEdges (gather and
  segment sum).
  """

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.out_features = out_features
    self.root = linear(in_features, out_features, use_bias=False, rngs=rngs)
    # Projecting before the weighted sum is the same map (it is linear) on fewer columns.
    self.neighbour = linear(in_features, out_features, use_bias=False, rngs=rngs)
    self.bias = nnx.Param(jnp.zeros((out_features,)))

  @property
  def output_width(self) -> int:
    return self.out_features

  def __call__(self, x: jax.Array, edges: GraphEdges | DenseGraph, *,
               train: bool = False) -> jax.Array:
    """`train` is accepted for the common layer interface; the layer has no dropout."""
    del train
    projected = self.neighbour(x)
    if isinstance(edges, DenseGraph):
      aggregated = jnp.where(edges.mask, edges.weights, 0.0) @ projected
    else:
      messages = jnp.where(edges.mask[:, None],
                           edges.weights[:, None] * projected[edges.senders], 0.0)
      aggregated = jax.ops.segment_sum(messages, edges.receivers, x.shape[0])
    return self.root(x) + aggregated + self.bias[...]


def stack_widths(layers: Sequence[tuple[int, int, bool]]) -> list[int]:
  """Output width of each (width per head, heads, concat) graph-attention layer."""
  return [width * heads if concat else width for width, heads, concat in layers]
