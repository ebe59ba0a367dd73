"""Hierarchical fusion of per-utterance modality vectors (paper stage 5).

Per utterance: project each modality to `dim` (MLP or mixture of experts), gate its
features, softly align it to the other modalities' vectors of the same dialogue, weigh the
modalities into a context vector, gate each modality on that context, let each modality
attend to the others, run a small pre-norm transformer over the modality tokens, pool with
learned queries, integrate, and classify (averaged heads + one auxiliary head per modality).
With `linear_skip`, each modality's input also reaches the logits through a linear map that
starts at zero (ours, not the authors').

Absent modalities (present[m] False) are zero tokens, get zero fusion weight, and are
masked as attention keys, so their input features cannot reach any output.
"""

from collections.abc import Mapping, Sequence
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from mer_jax.models import graph as graph_lib
from mer_jax.models import moe as moe_lib

ALIGNMENT_SCOPES = ('dialogue', 'batch')
# Attribute of HierarchicalFusion -> the authors' optimizer group of its parameters.
PARAM_GROUP_OF_ATTRIBUTE = {
    'projections': 'proj', 'transformer': 'transformer', 'classifiers': 'classifiers'}
PARAM_GROUPS = ('proj', 'transformer', 'classifiers', 'other')


def _gelu(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=False)


class ProjectionMLP(nnx.Module):
  """Linear -> LayerNorm -> GELU -> Dropout."""

  def __init__(self, in_features: int, dim: int, *, dropout: float, rngs: nnx.Rngs):
    self.linear = graph_lib.linear(in_features, dim, rngs=rngs)
    self.norm = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return self.dropout(_gelu(self.norm(self.linear(x))), deterministic=not train)


class StackedLinear(nnx.Module):
  """`copies` independent dense layers, one per slice of the leading axis (one per modality or
  modality pair): kernel [copies, in, out], bias [copies, out], each slice initialised like
  graph_lib.linear's. One batched matmul instead of one per copy: fewer, larger kernels for XLA
  to compile and run."""

  def __init__(self, copies: int, in_features: int, out_features: int, *, rngs: nnx.Rngs,
               axes: tuple[str | None, str | None] = ('embed', 'mlp')):
    kernel_init = nnx.with_partitioning(nnx.initializers.lecun_normal(batch_axis=(0,)),
                                        (None,) + axes)
    self.kernel = nnx.Param(kernel_init(rngs.params(), (copies, in_features, out_features)))
    self.bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(), (None,) + axes[-1:])(
        rngs.params(), (copies, out_features)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x f32[copies, ..., in] -> f32[copies, ..., out]."""
    bias = self.bias[...].reshape(self.bias.shape[:1] + (1,) * (x.ndim - 2) + self.bias.shape[1:])
    return jnp.einsum('m...i,mio->m...o', x, self.kernel[...]) + bias


class StackedLayerNorm(nnx.Module):
  """`copies` LayerNorms over the last axis (nnx.LayerNorm's arithmetic), scale and bias
  [copies, features]."""

  def __init__(self, copies: int, features: int, *, epsilon: float = 1e-5):
    self.epsilon = epsilon
    self.scale = nnx.Param(jnp.ones((copies, features)))
    self.bias = nnx.Param(jnp.zeros((copies, features)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x f32[copies, ..., features]."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.maximum(jnp.mean(x * x, axis=-1, keepdims=True) - mean * mean, 0.0)
    shape = self.scale.shape[:1] + (1,) * (x.ndim - 2) + self.scale.shape[1:]
    return ((x - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale[...].reshape(shape)
            + self.bias[...].reshape(shape))


class FeatureGate(nnx.Module):
  """x * sigmoid(MLP(x)): per-feature selection within each modality (one copy per modality)."""

  def __init__(self, copies: int, dim: int, *, rngs: nnx.Rngs):
    self.down = StackedLinear(copies, dim, dim // 2, rngs=rngs)
    self.norm = StackedLayerNorm(copies, dim // 2)
    self.up = StackedLinear(copies, dim // 2, dim, axes=('mlp', 'embed'), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x f32[copies, N, dim]."""
    return x * jax.nn.sigmoid(self.up(jax.nn.relu(self.norm(self.down(x)))))


class SoftAlignment(nnx.Module):
  """Per modality pair (one copy each), the soft transport plan
  K_ij = exp(-||S x_i - T y_j|| / tau), rows normalised over allowed j.

  The temperature is learned through its logarithm (initial tau = 1), so it stays positive.
  """

  def __init__(self, copies: int, dim: int, *, rngs: nnx.Rngs):
    self.source = StackedLinear(copies, dim, dim, rngs=rngs)
    self.target = StackedLinear(copies, dim, dim, rngs=rngs)
    self.log_temperature = nnx.Param(jnp.zeros((copies,)))

  def plan(self, source: jax.Array, target: jax.Array, allowed: jax.Array) -> jax.Array:
    """source, target f32[P, N, dim], allowed bool[P, N, N] -> f32[P, N, N], row-stochastic
    over allowed targets; all-zero rows with none allowed."""
    s, t = self.source(source), self.target(target)
    squared = (jnp.sum(s * s, -1)[:, :, None] + jnp.sum(t * t, -1)[:, None, :]
               - 2.0 * jnp.einsum('pid,pjd->pij', s, t))
    distance = jnp.sqrt(jnp.maximum(squared, 1e-12))
    temperature = jnp.exp(self.log_temperature[...])[:, None, None]
    logits = jnp.where(allowed, -distance / temperature, graph_lib.MASKED_LOGIT)
    return jnp.where(allowed, jax.nn.softmax(logits, axis=-1), 0.0)

  def __call__(self, source: jax.Array, target: jax.Array, allowed: jax.Array) -> jax.Array:
    """Each source row's plan-weighted mean of the (unprojected) target rows: f32[P, N, dim]."""
    return jnp.einsum('pij,pjd->pid', self.plan(source, target, allowed), target)


class AdaptiveFusionGate(nnx.Module):
  """Softmax weights over present modalities from all tokens; returns the weighted sum."""

  def __init__(self, dim: int, num_modalities: int, *, dropout: float, rngs: nnx.Rngs):
    self.context = graph_lib.linear(dim * num_modalities, dim, rngs=rngs)
    self.norm = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.hidden = graph_lib.linear(dim, dim // 2, axes=('embed', 'mlp'), rngs=rngs)
    self.out = graph_lib.linear(dim // 2, num_modalities, axes=('mlp', None), rngs=rngs)

  def __call__(self, tokens: jax.Array, token_mask: jax.Array, *,
               train: bool) -> tuple[jax.Array, jax.Array]:
    num_nodes, num_modalities, dim = tokens.shape
    h = _gelu(self.norm(self.context(tokens.reshape(num_nodes, num_modalities * dim))))
    logits = self.out(_gelu(self.hidden(self.dropout(h, deterministic=not train))))
    logits = jnp.where(token_mask, logits, graph_lib.MASKED_LOGIT)
    weights = jnp.where(token_mask, jax.nn.softmax(logits, axis=-1), 0.0)
    return jnp.einsum('nm,nmd->nd', weights, tokens), weights


class InformationGate(nnx.Module):
  """Scales each modality vector by one sigmoid gate computed from it and the context."""

  def __init__(self, copies: int, dim: int, *, rngs: nnx.Rngs):
    self.hidden = StackedLinear(copies, 2 * dim, dim, rngs=rngs)
    self.norm = StackedLayerNorm(copies, dim)
    self.out = StackedLinear(copies, dim, 1, axes=('mlp', None), rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    """x f32[copies, N, dim], context f32[N, dim]."""
    context = jnp.broadcast_to(context, x.shape)
    h = _gelu(self.norm(self.hidden(jnp.concatenate([x, context], axis=-1))))
    return x * jax.nn.sigmoid(self.out(h))


class ContextGate(nnx.Module):
  """x * sigmoid(MLP([x, context])) + residual * x, per feature of each modality."""

  def __init__(self, copies: int, dim: int, *, residual: float, dropout: float,
               rngs: nnx.Rngs):
    self.residual = residual
    self.hidden = StackedLinear(copies, 2 * dim, dim, rngs=rngs)
    self.norm = StackedLayerNorm(copies, dim)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.out = StackedLinear(copies, dim, dim, axes=('mlp', 'embed'), rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array, *, train: bool) -> jax.Array:
    """x f32[copies, N, dim], context f32[N, dim]."""
    context = jnp.broadcast_to(context, x.shape)
    h = _gelu(self.norm(self.hidden(jnp.concatenate([x, context], axis=-1))))
    gate = jax.nn.sigmoid(self.out(self.dropout(h, deterministic=not train)))
    return x * gate + self.residual * x


class MultiHeadAttention(nnx.Module):
  """Batched multi-head attention with a key mask and dropout on the attention weights.

  A query with no valid key gets a zero output (not the mean of masked values). With `copies`,
  independent attentions (one per modality), each over its slice of a leading axis.
  """

  def __init__(self, dim: int, heads: int, *, dropout: float, rngs: nnx.Rngs,
               copies: int | None = None):
    if dim % heads:
      raise ValueError(f'model.fusion.dim={dim} must be divisible by heads={heads}.')
    self.heads = heads

    def projection(axes=('embed', 'mlp')):
      if copies is None:
        return graph_lib.linear(dim, dim, axes=axes, rngs=rngs)
      return StackedLinear(copies, dim, dim, axes=axes, rngs=rngs)

    self.query = projection()
    self.key = projection()
    self.value = projection()
    self.out = projection(('mlp', 'embed'))
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, queries: jax.Array, keys: jax.Array, key_mask: jax.Array, *,
               train: bool) -> jax.Array:
    """queries f32[..., N, Q, d], keys f32[..., N, K, d], key_mask bool[..., N, K] ->
    f32[..., N, Q, d] (the leading axis is the copies', where the attention has them)."""
    def split_heads(x):
      return x.reshape(*x.shape[:-1], self.heads, x.shape[-1] // self.heads)

    q = split_heads(self.query(queries))
    k = split_heads(self.key(keys))
    v = split_heads(self.value(keys))
    logits = jnp.einsum('...qhc,...khc->...hqk', q, k) / math.sqrt(q.shape[-1])
    mask = key_mask[..., None, None, :]
    weights = jnp.where(mask, jax.nn.softmax(
        jnp.where(mask, logits, graph_lib.MASKED_LOGIT), axis=-1), 0.0)
    weights = self.dropout(weights, deterministic=not train)
    out = jnp.einsum('...hqk,...khc->...qhc', weights, v)
    return self.out(out.reshape(*queries.shape)) * jnp.any(key_mask, -1)[..., None, None]


class TransformerLayer(nnx.Module):
  """Pre-norm encoder layer: x + SA(LN(x)), then x + FF(LN(x)), FF = 4*dim with GELU."""

  def __init__(self, dim: int, heads: int, *, dropout: float, rngs: nnx.Rngs):
    self.attention_norm = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
    self.attention = MultiHeadAttention(dim, heads, dropout=dropout, rngs=rngs)
    self.feedforward_norm = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
    self.feedforward_in = graph_lib.linear(dim, 4 * dim, rngs=rngs)
    self.feedforward_out = graph_lib.linear(4 * dim, dim, axes=('mlp', 'embed'), rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, tokens: jax.Array, token_mask: jax.Array, *, train: bool) -> jax.Array:
    deterministic = not train
    h = self.attention_norm(tokens)
    h = self.attention(h, h, token_mask, train=train)
    tokens = tokens + self.dropout(h, deterministic=deterministic)
    h = _gelu(self.feedforward_in(self.feedforward_norm(tokens)))
    h = self.feedforward_out(self.dropout(h, deterministic=deterministic))
    return tokens + self.dropout(h, deterministic=deterministic)


class Integrator(nnx.Module):
  """Pooled tokens -> fused vector: Linear-LN-GELU-Dropout-Linear-LN-Dropout(half rate)."""

  def __init__(self, in_features: int, dim: int, *, dropout: float, rngs: nnx.Rngs):
    self.hidden = graph_lib.linear(in_features, 2 * dim, rngs=rngs)
    self.hidden_norm = nnx.LayerNorm(2 * dim, epsilon=1e-5, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.out = graph_lib.linear(2 * dim, dim, axes=('mlp', 'embed'), rngs=rngs)
    self.out_norm = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
    self.out_dropout = nnx.Dropout(dropout * 0.5, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    h = _gelu(self.hidden_norm(self.hidden(x)))
    h = self.out_norm(self.out(self.dropout(h, deterministic=not train)))
    return self.out_dropout(h, deterministic=not train)


class AuxiliaryClassifier(nnx.Module):
  """Per modality: Linear(dim, dim/2) -> GELU -> Dropout(half rate) -> Linear(dim/2, classes)."""

  def __init__(self, copies: int, dim: int, num_classes: int, *, dropout: float,
               rngs: nnx.Rngs):
    self.hidden = StackedLinear(copies, dim, dim // 2, rngs=rngs)
    self.dropout = nnx.Dropout(dropout * 0.5, rngs=rngs)
    self.out = StackedLinear(copies, dim // 2, num_classes, axes=('mlp', None), rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """x f32[copies, N, dim] -> f32[copies, N, classes]."""
    return self.out(self.dropout(_gelu(self.hidden(x)), deterministic=not train))


class ContrastiveHead(nnx.Module):
  """L2-normalised projection Linear-ReLU-Linear for the supervised contrastive loss."""

  def __init__(self, dim: int, out_features: int, *, rngs: nnx.Rngs):
    self.hidden = graph_lib.linear(dim, dim, rngs=rngs)
    self.out = graph_lib.linear(dim, out_features, axes=('mlp', None), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    z = self.out(jax.nn.relu(self.hidden(x)))
    # rsqrt of a clamped squared norm: finite gradients even for a zero vector.
    return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), 1e-24))


class HierarchicalFusion(nnx.Module):
  """All fusion blocks of the authors' HierarchicalAttentionFusion, vectorised over nodes.

  Switches (off = the block is the identity, as in the authors' ablations): use_moe
  (projection is a mixture of experts), alignment, gates (context gates; the feature and
  information gates always run, as in the authors' code), cross_attention (off: each token
  becomes (1 + cross_residual) * token, what the authors' IdentityAttention yields).
  """

  def __init__(self, in_dims: Mapping[str, int], num_classes: int, *,
               modalities: Sequence[str], dim: int = 256, layers: int = 3, heads: int = 8,
               dropout: float = 0.1, use_moe: bool = False, num_experts: int = 4,
               top_k: int = 2, alignment: bool = True, alignment_mix: float = 0.3,
               alignment_scope: str = 'dialogue', gates: bool = True,
               gate_residual: float = 0.1, cross_attention: bool = True,
               cross_residual: float = 0.2, pool_queries: int = 3,
               classifier_heads: int = 3, contrastive: bool = False,
               contrastive_dim: int = 128, linear_skip: bool = False, rngs: nnx.Rngs):
    modalities = tuple(modalities)
    if not modalities or len(set(modalities)) != len(modalities):
      raise ValueError(f'data.modalities must be non-empty and distinct, got {modalities}.')
    missing = [m for m in modalities if m not in in_dims]
    if missing:
      raise ValueError(f'HierarchicalFusion: in_dims has no entry for modalities {missing}.')
    if alignment_scope not in ALIGNMENT_SCOPES:
      raise ValueError(f'model.fusion.alignment_scope must be one of {ALIGNMENT_SCOPES}, '
                       f'got {alignment_scope!r}.')
    if pool_queries < 1 or classifier_heads < 1 or layers < 0:
      raise ValueError('model.fusion: pool_queries and classifier_heads must be >= 1 and '
                       f'layers >= 0, got {pool_queries}, {classifier_heads}, {layers}.')
    self.modalities = modalities
    self.dim = dim
    self.alignment_mix = alignment_mix
    self.alignment_scope = alignment_scope
    self.cross_residual = cross_residual
    self.use_alignment = alignment and len(modalities) > 1
    self.use_gates = gates
    self.use_cross_attention = cross_attention
    num_modalities = len(modalities)

    def projection(m):
      if use_moe:
        return moe_lib.MixtureOfExperts(in_dims[m], dim, num_experts=num_experts,
                                        top_k=top_k, dropout=dropout, rngs=rngs)
      return ProjectionMLP(in_dims[m], dim, dropout=dropout, rngs=rngs)

    # Blocks with one copy per modality (or modality pair) hold their copies' parameters
    # stacked on a leading axis, in the order of `modalities` (`pairs`), and run on [M, N, ...]
    # tensors. Projections stay one module per modality: their input widths may differ.
    self.projections = nnx.Dict({m: projection(m) for m in modalities})
    self.feature_gates = FeatureGate(num_modalities, dim, rngs=rngs)
    self.pairs = tuple((i, j) for i in range(num_modalities) for j in range(i + 1, num_modalities))
    if self.use_alignment:
      self.aligners = SoftAlignment(len(self.pairs), dim, rngs=rngs)
    self.fusion_gate = AdaptiveFusionGate(dim, num_modalities, dropout=dropout, rngs=rngs)
    self.information_gates = InformationGate(num_modalities, dim, rngs=rngs)
    if gates:
      self.context_gates = ContextGate(num_modalities, dim, residual=gate_residual,
                                       dropout=dropout, rngs=rngs)
    if cross_attention and num_modalities > 1:
      self.cross_attention = MultiHeadAttention(dim, heads, dropout=dropout, rngs=rngs,
                                                copies=num_modalities)
    self.transformer = nnx.List([
        TransformerLayer(dim, heads, dropout=dropout, rngs=rngs) for _ in range(layers)])
    self.pool_queries = nnx.Param(
        nnx.initializers.normal(1.0)(rngs.params(), (pool_queries, dim)))
    self.pool = MultiHeadAttention(dim, heads, dropout=dropout, rngs=rngs)
    self.integrator = Integrator(pool_queries * dim, dim, dropout=dropout, rngs=rngs)
    self.classifiers = nnx.List([
        graph_lib.linear(dim, num_classes, axes=('embed', None), rngs=rngs)
        for _ in range(classifier_heads)])
    self.aux_classifiers = AuxiliaryClassifier(num_modalities, dim, num_classes,
                                               dropout=dropout, rngs=rngs)
    self.contrastive_head = (ContrastiveHead(dim, contrastive_dim, rngs=rngs)
                             if contrastive else None)
    self.skip = (nnx.Dict({m: graph_lib.zero_linear(in_dims[m], num_classes, rngs=rngs)
                           for m in modalities}) if linear_skip else None)
    # Uncertainty weights of the loss (main task, then one per modality): parameters of the
    # model so that the optimizer trains them.
    self.loss_log_vars = nnx.Param(jnp.zeros((1 + num_modalities,)))

  def _align(self, tokens: jax.Array, token_mask: jax.Array,
             graph_ids: jax.Array) -> jax.Array:
    """Mixes each modality with its soft alignment to every later modality, in order.
    tokens f32[M, N, dim], token_mask bool[M, N]."""
    if self.alignment_scope == 'dialogue':
      same_scope = graph_ids[:, None] == graph_ids[None, :]
    else:
      same_scope = jnp.ones((graph_ids.shape[0],) * 2, bool)
    sources, targets = (jnp.asarray([pair[k] for pair in self.pairs]) for k in (0, 1))
    allowed = same_scope[None] & token_mask[targets][:, None, :]  # [P, N, N]
    target_means = self.aligners(tokens[sources], tokens[targets], allowed)
    updates = token_mask[sources] & jnp.any(allowed, axis=-1)  # [P, N]
    aligned = []
    for i in range(len(self.modalities)):
      mixed = tokens[i]
      for p, (source, _) in enumerate(self.pairs):
        if source == i:
          mixed = jnp.where(updates[p][:, None],
                            (1.0 - self.alignment_mix) * mixed
                            + self.alignment_mix * target_means[p], mixed)
      aligned.append(mixed)
    return jnp.stack(aligned)

  def _cross_attend(self, gated: jax.Array, token_mask: jax.Array, *, train: bool) -> jax.Array:
    """f32[M, N, dim]: each modality token (gated f32[M, N, dim]) after attending to the other
    modalities."""
    num_modalities = len(self.modalities)
    if num_modalities == 1:
      return gated
    if not self.use_cross_attention:
      return (1.0 + self.cross_residual) * gated
    others = jnp.asarray([[o for o in range(num_modalities) if o != m]
                          for m in range(num_modalities)])  # [M, M-1]
    queries = gated[:, :, None]  # [M, N, 1, dim]
    keys = jnp.moveaxis(gated[others], 1, 2)  # [M, N, M-1, dim]
    key_mask = jnp.moveaxis(token_mask[others], 1, 2)  # [M, N, M-1]
    attended = self.cross_attention(queries, keys, key_mask, train=train)
    return (attended + self.cross_residual * queries)[:, :, 0]

  def __call__(self, inputs: Mapping[str, jax.Array], present: Mapping[str, jax.Array],
               graph_ids: jax.Array, node_mask: jax.Array, *,
               train: bool) -> dict[str, Any]:
    """Fuses per-node modality vectors.

    Args:
      inputs: modality -> f32[N, d_m].
      present: modality -> bool[N], the modality was observed for the utterance.
      graph_ids: int32[N], the graph (dialogue) of each node slot.
      node_mask: bool[N], real utterances.
      train: dropout on and training behaviour.

    Returns:
      dict(logits f32[N, C], aux_logits {m: f32[N, C]}, fused f32[N, dim],
      contrastive f32[N, contrastive_dim] or None, modality_weights f32[N, M]).
    """
    for name, mapping in (('inputs', inputs), ('present', present)):
      missing = [m for m in self.modalities if m not in mapping]
      if missing:
        raise ValueError(f'HierarchicalFusion: {name} has no entry for modalities {missing}.')
    token_mask = jnp.stack([present[m] & node_mask for m in self.modalities])  # [M, N]

    def zero_absent(x):
      return jnp.where(token_mask[..., None], x, 0.0)

    tokens = zero_absent(self.feature_gates(jnp.stack(
        [self.projections[m](inputs[m], train=train) for m in self.modalities])))
    if self.use_alignment:
      tokens = self._align(tokens, token_mask, graph_ids)

    mask_matrix = token_mask.T  # [N, M]
    context, modality_weights = self.fusion_gate(
        jnp.moveaxis(tokens, 0, 1), mask_matrix, train=train)
    gated = self.information_gates(tokens, context)
    if self.use_gates:
      gated = self.context_gates(gated, context, train=train)

    sequence = jnp.moveaxis(self._cross_attend(gated, token_mask, train=train), 0, 1)
    sequence = jnp.where(mask_matrix[..., None], sequence, 0.0)
    for layer in self.transformer:
      sequence = layer(sequence, mask_matrix, train=train)
    pool_queries = self.pool_queries[...]
    queries = jnp.broadcast_to(pool_queries, (sequence.shape[0],) + pool_queries.shape)
    pooled = self.pool(queries, sequence, mask_matrix, train=train)
    fused = self.integrator(pooled.reshape(pooled.shape[0], -1), train=train)

    logits = jnp.mean(jnp.stack([head(fused) for head in self.classifiers]), axis=0)
    if self.skip is not None:
      logits = logits + sum(jnp.where(token_mask[i][:, None], self.skip[m](inputs[m]), 0.0)
                            for i, m in enumerate(self.modalities))
    aux = self.aux_classifiers(gated, train=train)
    aux_logits = {m: aux[i] for i, m in enumerate(self.modalities)}
    contrastive = (None if self.contrastive_head is None
                   else self.contrastive_head(fused))
    return dict(logits=logits, aux_logits=aux_logits, fused=fused,
                contrastive=contrastive, modality_weights=modality_weights)


def _path_entry_name(entry: Any) -> str:
  for attribute in ('key', 'name', 'idx'):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)


def param_group(path: Sequence[Any] | str) -> str:
  """The optimizer group ('proj', 'transformer', 'classifiers', 'other') of a fusion param.

  `path` is an nnx state path (('projections', 't', 'linear', 'kernel')), a jax key path
  (DictKey / GetAttrKey entries) or a '/'- or '.'-joined string. The first entry naming a
  grouped attribute decides, so paths under a wrapper (e.g. ('model', ...)) work too.
  """
  if isinstance(path, str):
    entries = path.replace('.', '/').split('/')
  else:
    entries = [_path_entry_name(entry) for entry in path]
  for entry in entries:
    if entry in PARAM_GROUP_OF_ATTRIBUTE:
      return PARAM_GROUP_OF_ATTRIBUTE[entry]
  return 'other'
