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


class FeatureGate(nnx.Module):
  """x * sigmoid(MLP(x)): per-feature selection within one modality."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.down = graph_lib.linear(dim, dim // 2, rngs=rngs)
    self.norm = nnx.LayerNorm(dim // 2, epsilon=1e-5, rngs=rngs)
    self.up = graph_lib.linear(dim // 2, dim, axes=('mlp', 'embed'), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(self.up(jax.nn.relu(self.norm(self.down(x)))))


class SoftAlignment(nnx.Module):
  """Soft transport plan K_ij = exp(-||S x_i - T y_j|| / tau), rows normalised over allowed j.

  The temperature is learned through its logarithm (initial tau = 1), so it stays positive.
  """

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.source = graph_lib.linear(dim, dim, rngs=rngs)
    self.target = graph_lib.linear(dim, dim, rngs=rngs)
    self.log_temperature = nnx.Param(jnp.zeros(()))

  def plan(self, source: jax.Array, target: jax.Array, allowed: jax.Array) -> jax.Array:
    """f32[N, N] row-stochastic over allowed targets; all-zero rows with none allowed."""
    s, t = self.source(source), self.target(target)
    squared = (jnp.sum(s * s, -1)[:, None] + jnp.sum(t * t, -1)[None, :] - 2.0 * s @ t.T)
    distance = jnp.sqrt(jnp.maximum(squared, 1e-12))
    logits = jnp.where(allowed, -distance / jnp.exp(self.log_temperature[...]),
                       graph_lib.MASKED_LOGIT)
    return jnp.where(allowed, jax.nn.softmax(logits, axis=-1), 0.0)

  def __call__(self, source: jax.Array, target: jax.Array, allowed: jax.Array) -> jax.Array:
    """Each source row's plan-weighted mean of the (unprojected) target rows."""
    return self.plan(source, target, allowed) @ target


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
  """Scales a modality vector by one sigmoid gate computed from it and the context."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.hidden = graph_lib.linear(2 * dim, dim, rngs=rngs)
    self.norm = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
    self.out = graph_lib.linear(dim, 1, axes=('mlp', None), rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    h = _gelu(self.norm(self.hidden(jnp.concatenate([x, context], axis=-1))))
    return x * jax.nn.sigmoid(self.out(h))


class ContextGate(nnx.Module):
  """x * sigmoid(MLP([x, context])) + residual * x, per feature."""

  def __init__(self, dim: int, *, residual: float, dropout: float, rngs: nnx.Rngs):
    self.residual = residual
    self.hidden = graph_lib.linear(2 * dim, dim, rngs=rngs)
    self.norm = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.out = graph_lib.linear(dim, dim, axes=('mlp', 'embed'), rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array, *, train: bool) -> jax.Array:
    h = _gelu(self.norm(self.hidden(jnp.concatenate([x, context], axis=-1))))
    gate = jax.nn.sigmoid(self.out(self.dropout(h, deterministic=not train)))
    return x * gate + self.residual * x


class MultiHeadAttention(nnx.Module):
  """Batched multi-head attention with a key mask and dropout on the attention weights.

  A query with no valid key gets a zero output (not the mean of masked values).
  """

  def __init__(self, dim: int, heads: int, *, dropout: float, rngs: nnx.Rngs):
    if dim % heads:
      raise ValueError(f'model.fusion.dim={dim} must be divisible by heads={heads}.')
    self.heads = heads
    self.query = graph_lib.linear(dim, dim, rngs=rngs)
    self.key = graph_lib.linear(dim, dim, rngs=rngs)
    self.value = graph_lib.linear(dim, dim, rngs=rngs)
    self.out = graph_lib.linear(dim, dim, axes=('mlp', 'embed'), rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, queries: jax.Array, keys: jax.Array, key_mask: jax.Array, *,
               train: bool) -> jax.Array:
    """queries f32[N, Q, d], keys f32[N, K, d], key_mask bool[N, K] -> f32[N, Q, d]."""
    def split_heads(x):
      return x.reshape(*x.shape[:-1], self.heads, x.shape[-1] // self.heads)

    q = split_heads(self.query(queries))
    k = split_heads(self.key(keys))
    v = split_heads(self.value(keys))
    logits = jnp.einsum('nqhc,nkhc->nhqk', q, k) / math.sqrt(q.shape[-1])
    mask = key_mask[:, None, None, :]
    weights = jnp.where(mask, jax.nn.softmax(
        jnp.where(mask, logits, graph_lib.MASKED_LOGIT), axis=-1), 0.0)
    weights = self.dropout(weights, deterministic=not train)
    out = jnp.einsum('nhqk,nkhc->nqhc', weights, v)
    return self.out(out.reshape(*queries.shape)) * jnp.any(key_mask, -1)[:, None, None]


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
  """Linear(dim, dim/2) -> GELU -> Dropout(half rate) -> Linear(dim/2, classes)."""

  def __init__(self, dim: int, num_classes: int, *, dropout: float, rngs: nnx.Rngs):
    self.hidden = graph_lib.linear(dim, dim // 2, rngs=rngs)
    self.dropout = nnx.Dropout(dropout * 0.5, rngs=rngs)
    self.out = graph_lib.linear(dim // 2, num_classes, axes=('mlp', None), rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
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

    self.projections = nnx.Dict({m: projection(m) for m in modalities})
    self.feature_gates = nnx.Dict({m: FeatureGate(dim, rngs=rngs) for m in modalities})
    if self.use_alignment:
      self.aligners = nnx.Dict({
          m1 + m2: SoftAlignment(dim, rngs=rngs)
          for i, m1 in enumerate(modalities) for m2 in modalities[i + 1:]})
    self.fusion_gate = AdaptiveFusionGate(dim, num_modalities, dropout=dropout, rngs=rngs)
    self.information_gates = nnx.Dict(
        {m: InformationGate(dim, rngs=rngs) for m in modalities})
    if gates:
      self.context_gates = nnx.Dict({
          m: ContextGate(dim, residual=gate_residual, dropout=dropout, rngs=rngs)
          for m in modalities})
    if cross_attention and num_modalities > 1:
      self.cross_attention = nnx.Dict({
          m: MultiHeadAttention(dim, heads, dropout=dropout, rngs=rngs)
          for m in modalities})
    self.transformer = nnx.List([
        TransformerLayer(dim, heads, dropout=dropout, rngs=rngs) for _ in range(layers)])
    self.pool_queries = nnx.Param(
        nnx.initializers.normal(1.0)(rngs.params(), (pool_queries, dim)))
    self.pool = MultiHeadAttention(dim, heads, dropout=dropout, rngs=rngs)
    self.integrator = Integrator(pool_queries * dim, dim, dropout=dropout, rngs=rngs)
    self.classifiers = nnx.List([
        graph_lib.linear(dim, num_classes, axes=('embed', None), rngs=rngs)
        for _ in range(classifier_heads)])
    self.aux_classifiers = nnx.Dict({
        m: AuxiliaryClassifier(dim, num_classes, dropout=dropout, rngs=rngs)
        for m in modalities})
    self.contrastive_head = (ContrastiveHead(dim, contrastive_dim, rngs=rngs)
                             if contrastive else None)
    self.skip = (nnx.Dict({m: graph_lib.zero_linear(in_dims[m], num_classes, rngs=rngs)
                           for m in modalities}) if linear_skip else None)
    # Uncertainty weights of the loss (main task, then one per modality): parameters of the
    # model so that the optimizer trains them.
    self.loss_log_vars = nnx.Param(jnp.zeros((1 + num_modalities,)))

  def _align(self, tokens: dict[str, jax.Array], token_mask: dict[str, jax.Array],
             graph_ids: jax.Array) -> dict[str, jax.Array]:
    """Mixes each modality with its soft alignment to every later modality, in order."""
    if self.alignment_scope == 'dialogue':
      same_scope = graph_ids[:, None] == graph_ids[None, :]
    else:
      same_scope = jnp.ones((graph_ids.shape[0],) * 2, bool)
    aligned = {}
    for i, m1 in enumerate(self.modalities):
      mixed = tokens[m1]
      for m2 in self.modalities[i + 1:]:
        allowed = same_scope & token_mask[m2][None, :]
        target_mean = self.aligners[m1 + m2](tokens[m1], tokens[m2], allowed)
        update = token_mask[m1] & jnp.any(allowed, axis=-1)
        mixed = jnp.where(update[:, None],
                          (1.0 - self.alignment_mix) * mixed
                          + self.alignment_mix * target_mean, mixed)
      aligned[m1] = mixed
    return aligned

  def _cross_attend(self, gated: dict[str, jax.Array],
                    token_mask: dict[str, jax.Array], *, train: bool) -> jax.Array:
    """f32[N, M, dim]: each modality token after attending to the other modalities."""
    if len(self.modalities) == 1:
      return gated[self.modalities[0]][:, None]
    if not self.use_cross_attention:
      return (1.0 + self.cross_residual) * jnp.stack(
          [gated[m] for m in self.modalities], axis=1)
    out = []
    for m in self.modalities:
      others = [o for o in self.modalities if o != m]
      query = gated[m][:, None]
      attended = self.cross_attention[m](
          query, jnp.stack([gated[o] for o in others], axis=1),
          jnp.stack([token_mask[o] for o in others], axis=1), train=train)
      out.append((attended + self.cross_residual * query)[:, 0])
    return jnp.stack(out, axis=1)

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
    token_mask = {m: present[m] & node_mask for m in self.modalities}

    def zero_absent(m, x):
      return jnp.where(token_mask[m][:, None], x, 0.0)

    tokens = {m: zero_absent(m, self.feature_gates[m](
        self.projections[m](inputs[m], train=train))) for m in self.modalities}
    if self.use_alignment:
      tokens = self._align(tokens, token_mask, graph_ids)

    mask_matrix = jnp.stack([token_mask[m] for m in self.modalities], axis=1)
    context, modality_weights = self.fusion_gate(
        jnp.stack([tokens[m] for m in self.modalities], axis=1), mask_matrix, train=train)
    gated = {}
    for m in self.modalities:
      x = self.information_gates[m](tokens[m], context)
      if self.use_gates:
        x = self.context_gates[m](x, context, train=train)
      gated[m] = x

    sequence = self._cross_attend(gated, token_mask, train=train)
    sequence = jnp.where(mask_matrix[..., None], sequence, 0.0)
    for layer in self.transformer:
      sequence = layer(sequence, mask_matrix, train=train)
    pool_queries = self.pool_queries[...]
    queries = jnp.broadcast_to(pool_queries, (sequence.shape[0],) + pool_queries.shape)
    pooled = self.pool(queries, sequence, mask_matrix, train=train)
    fused = self.integrator(pooled.reshape(pooled.shape[0], -1), train=train)

    logits = jnp.mean(jnp.stack([head(fused) for head in self.classifiers]), axis=0)
    if self.skip is not None:
      logits = logits + sum(zero_absent(m, self.skip[m](inputs[m])) for m in self.modalities)
    aux_logits = {m: self.aux_classifiers[m](gated[m], train=train)
                  for m in self.modalities}
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
