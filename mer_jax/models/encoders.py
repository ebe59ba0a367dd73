"""Graph teacher (text) and students (audio, visual) over utterance graphs.

Each encoder: unscaled feature dropout (training) -> masked batch norm -> kNN + structural
edges built on the normalised input -> residual graph blocks (conv, ReLU, dropout, +
residual, LayerNorm) -> dropout -> linear classifier. `__call__` returns
(logits f32[N, C], representation f32[N, H]); the representation is the last block's output,
what the authors' `extract_features` returns.
"""

from collections.abc import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import jraph

from mer_jax.models import graph as graph_lib
from mer_jax.models import sequence


class FeatureDrop(nnx.Module):
  """Zeroes each input feature with probability `rate` in training, without rescaling."""

  def __init__(self, rate: float, *, rngs: nnx.Rngs):
    if not 0.0 <= rate < 1.0:
      raise ValueError(f'input_dropout must be in [0, 1), got {rate}.')
    self.rate = rate
    self.rngs = rngs['dropout'].fork()

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    keep = jax.random.bernoulli(self.rngs(), 1.0 - self.rate, x.shape)
    return jnp.where(keep, x, 0.0)


class MaskedBatchNorm(nnx.Module):
  """nnx.BatchNorm whose batch statistics come only from masked-in nodes.

  A batch with no masked-in node (e.g. a modality missing for every utterance) would give
  NaN statistics: then the running averages are left unchanged.
  """

  def __init__(self, num_features: int, *, momentum: float, rngs: nnx.Rngs):
    self.norm = nnx.BatchNorm(num_features, momentum=momentum, epsilon=1e-5, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    if not train:
      return self.norm(x, use_running_average=True)
    any_valid = jnp.any(mask)
    old_mean, old_var = self.norm.mean[...], self.norm.var[...]
    stats_mask = (mask | ~any_valid)[:, None]
    out = self.norm(x, use_running_average=False, mask=stats_mask)
    self.norm.mean[...] = jnp.where(any_valid, self.norm.mean[...], old_mean)
    self.norm.var[...] = jnp.where(any_valid, self.norm.var[...], old_var)
    return out


class GraphInput(nnx.Module):
  """Feature dropout, masked batch norm and the modality's edges.

  The edges are a DenseGraph with message_passing='dense' (matrix products: fastest at our
  node budgets, on CPU and on matrix units) or GraphEdges with 'segment' (gathers and
  segment sums, the jraph form).
  """

  def __init__(self, in_features: int, *, modality: str, edge_spec: graph_lib.EdgeSpec,
               input_dropout: float, batchnorm_momentum: float, self_loops: bool,
               message_passing: str = 'dense', batch_norm: bool = True, rngs: nnx.Rngs):
    if message_passing not in graph_lib.MESSAGE_PASSING_MODES:
      raise ValueError(f'message_passing must be one of {graph_lib.MESSAGE_PASSING_MODES}, '
                       f'got {message_passing!r}.')
    self.modality = modality
    self.in_features = in_features
    self.message_passing = message_passing
    self.edge_spec = edge_spec
    self.self_loops = self_loops
    self.feature_drop = FeatureDrop(input_dropout, rngs=rngs)
    self.batch_norm = (MaskedBatchNorm(in_features, momentum=batchnorm_momentum, rngs=rngs)
                       if batch_norm else None)

  def __call__(self, x: jax.Array, graph: jraph.GraphsTuple, *, train: bool
               ) -> tuple[jax.Array, graph_lib.GraphEdges | graph_lib.DenseGraph]:
    candidate = graph.nodes['mask'] & graph.nodes['present'][self.modality]
    x = self.feature_drop(x, train=train)
    if self.batch_norm is not None:
      x = self.batch_norm(x, candidate, train=train)
    spec = self.edge_spec
    build = (graph_lib.build_modality_adjacency if self.message_passing == 'dense'
             else graph_lib.build_modality_edges)
    # The graph is data, as in the authors' code: no gradient through its construction.
    edges = build(
        jax.lax.stop_gradient(x), graph, k=spec.k, temporal_weight=spec.temporal_weight,
        speaker_weight=spec.speaker_weight, speaker_edges=spec.speaker_edges,
        candidate_mask=candidate, self_loops=self.self_loops)
    return x, edges


class ResidualGraphBlock(nnx.Module):
  """LayerNorm(dropout(relu(conv(x))) + residual(x)).

  The residual is a linear projection when asked or when the width changes, else identity.
  """

  def __init__(self, conv: graph_lib.GraphAttention | graph_lib.GraphConvolution,
               in_features: int, *, project_residual: bool, dropout: float,
               rngs: nnx.Rngs):
    width = conv.output_width
    self.conv = conv
    self.residual = (graph_lib.linear(in_features, width, rngs=rngs)
                     if project_residual or in_features != width else None)
    self.norm = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array, edges: graph_lib.GraphEdges | graph_lib.DenseGraph, *,
               train: bool) -> jax.Array:
    residual = x if self.residual is None else self.residual(x)
    h = jax.nn.relu(self.conv(x, edges, train=train))
    return self.norm(self.dropout(h, deterministic=not train) + residual)


def graph_input_width(in_features: int, context: sequence.DialogueBiGRU | None) -> int:
  return in_features + (context.output_width if context is not None else 0)


class GraphEncoder(nnx.Module):
  """Input stage, residual graph blocks, dropout and a linear classifier.

  With `linear_skip` (ours), the normalised input also reaches the logits through a linear map
  that starts at zero: a linear probe trained jointly with the graph network. With `context`
  (ours), a bidirectional GRU reads each dialogue's turns in order and its states join the
  normalised input of the graph blocks (and of the linear skip).
  """

  def __init__(self, input_stage: GraphInput, blocks: Sequence[ResidualGraphBlock],
               width: int, num_classes: int, *, dropout: float, rngs: nnx.Rngs,
               linear_skip: bool = False, context: sequence.DialogueBiGRU | None = None):
    self.input_stage = input_stage
    self.context = context
    self.blocks = nnx.List(blocks)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.classifier = graph_lib.linear(width, num_classes, axes=('embed', None), rngs=rngs)
    self.representation_width = width
    self.skip = (graph_lib.zero_linear(graph_input_width(input_stage.in_features, context),
                                       num_classes, rngs=rngs)
                 if linear_skip else None)

  def __call__(self, x: jax.Array, graph: jraph.GraphsTuple, *,
               train: bool) -> tuple[jax.Array, jax.Array]:
    x, edges = self.input_stage(x, graph, train=train)
    if self.context is not None:
      # The edges stay those of the features alone; the blocks also read the turns in order.
      x = jnp.concatenate(
          [x, self.dropout(self.context(x, graph), deterministic=not train)], axis=-1)
    h = x
    for block in self.blocks:
      h = block(h, edges, train=train)
    logits = self.classifier(self.dropout(h, deterministic=not train))
    if self.skip is not None:
      logits = logits + self.skip(x)
    return logits, h


def _attention_blocks(in_features: int, layers: Sequence[tuple[int, int, bool]], *,
                      project_all_residuals: bool, edge_weights: str,
                      dropout: float, rngs: nnx.Rngs) -> list[ResidualGraphBlock]:
  """The first block always projects its residual: raw input and hidden spaces differ."""
  blocks = []
  width = in_features
  for index, (out_features, heads, concat) in enumerate(layers):
    conv = graph_lib.GraphAttention(width, out_features, heads, concat=concat,
                                    edge_weights=edge_weights, rngs=rngs)
    blocks.append(ResidualGraphBlock(
        conv, width, project_residual=project_all_residuals or index == 0,
        dropout=dropout, rngs=rngs))
    width = conv.output_width
  return blocks


class TextGraphTeacher(GraphEncoder):
  """Four graph-attention layers: heads concatenated, concatenated, averaged, averaged.

  Residuals are projected into layer 1 and where the width changes (layer 3), as the
  authors'; layers 2 and 4 add their input unchanged.
  """

  def __init__(self, in_features: int, num_classes: int, *, edge_spec: graph_lib.EdgeSpec,
               hidden: int = 256, heads: int = 4, dropout: float = 0.15,
               input_dropout: float = 0.1, gat_edge_weights: str = 'bias',
               batchnorm_momentum: float = 0.9, modality: str = 't',
               message_passing: str = 'dense', linear_skip: bool = False,
               context_gru: int = 0, context_projection: int = 0,
               input_batchnorm: bool = True, rngs: nnx.Rngs):
    layers = ((hidden, heads, True), (hidden, heads, True),
              (hidden, heads, False), (hidden, heads, False))
    input_stage = GraphInput(in_features, modality=modality, edge_spec=edge_spec,
                             input_dropout=input_dropout,
                             batchnorm_momentum=batchnorm_momentum, self_loops=True,
                             message_passing=message_passing, batch_norm=input_batchnorm,
                             rngs=rngs)
    context = (sequence.DialogueBiGRU(in_features, context_gru, projection=context_projection,
                                       rngs=rngs)
               if context_gru else None)
    blocks = _attention_blocks(graph_input_width(in_features, context), layers,
                               project_all_residuals=False, edge_weights=gat_edge_weights,
                               dropout=dropout, rngs=rngs)
    super().__init__(input_stage, blocks, hidden, num_classes, dropout=dropout, rngs=rngs,
                     linear_skip=linear_skip, context=context)


class VisualGraphStudent(GraphEncoder):
  """Graph-attention layers given as (width per head, heads, concat), residuals projected."""

  def __init__(self, in_features: int, num_classes: int, *, edge_spec: graph_lib.EdgeSpec,
               layers: Sequence[tuple[int, int, bool]] = (
                   (128, 4, True), (256, 2, True), (256, 1, False)),
               dropout: float = 0.15, input_dropout: float = 0.05,
               gat_edge_weights: str = 'bias', batchnorm_momentum: float = 0.9,
               modality: str = 'v', message_passing: str = 'dense', rngs: nnx.Rngs):
    layers = tuple(tuple(layer) for layer in layers)
    if not layers:
      raise ValueError('model.visual.layers must name at least one layer.')
    input_stage = GraphInput(in_features, modality=modality, edge_spec=edge_spec,
                             input_dropout=input_dropout,
                             batchnorm_momentum=batchnorm_momentum, self_loops=True,
                             message_passing=message_passing, rngs=rngs)
    blocks = _attention_blocks(in_features, layers, project_all_residuals=True,
                               edge_weights=gat_edge_weights, dropout=dropout, rngs=rngs)
    width = graph_lib.stack_widths(layers)[-1]
    super().__init__(input_stage, blocks, width, num_classes, dropout=dropout, rngs=rngs)


class AudioGraphStudent(GraphEncoder):
  """Weighted graph convolutions (`layers` of width `hidden`) with residuals.

  Only the first residual is projected, as the authors'.
  """

  def __init__(self, in_features: int, num_classes: int, *, edge_spec: graph_lib.EdgeSpec,
               hidden: int = 256, layers: int = 3, dropout: float = 0.11,
               input_dropout: float = 0.05, batchnorm_momentum: float = 0.9,
               modality: str = 'a', message_passing: str = 'dense', rngs: nnx.Rngs):
    if layers < 1:
      raise ValueError(f'model.audio.layers must be >= 1, got {layers}.')
    input_stage = GraphInput(in_features, modality=modality, edge_spec=edge_spec,
                             input_dropout=input_dropout,
                             batchnorm_momentum=batchnorm_momentum, self_loops=False,
                             message_passing=message_passing, rngs=rngs)
    blocks = []
    width = in_features
    for index in range(layers):
      conv = graph_lib.GraphConvolution(width, hidden, rngs=rngs)
      blocks.append(ResidualGraphBlock(conv, width, project_residual=index == 0,
                                       dropout=dropout, rngs=rngs))
      width = hidden
    super().__init__(input_stage, blocks, hidden, num_classes, dropout=dropout, rngs=rngs)
