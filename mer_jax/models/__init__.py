"""Flax NNX models: graph teacher/students per modality and the hierarchical fusion.

Parameters carry logical axis names ('embed', 'mlp', 'expert') as metadata only: eager
sharding is switched off here, for every thread of the process (Flax's config, not its
thread-local context), so models build without a mesh; `logical_sharding` (or
`nnx.logical_axis_rules` + `nnx.get_named_sharding`) maps the names onto a mesh later.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax
from flax import nnx
import jax
from jax.sharding import NamedSharding, PartitionSpec
import ml_collections

from mer_jax import stages
from mer_jax.models import encoders
from mer_jax.models import fusion
from mer_jax.models import graph
from mer_jax.models import moe

flax.config.update('flax_always_shard_variable', False)


param_group = fusion.param_group
PARAM_GROUPS = fusion.PARAM_GROUPS
# Version of a stage's parameter tree, where it has changed since the first release (fusion 2:
# per-modality blocks stacked on a modality axis). Stage fingerprints record it, so a workdir
# trained with another layout is refused (or retrained) before anything restores.
PARAMETER_LAYOUT = {'fusion': 2}


def _check_stage(stage: str) -> None:
  if stage not in stages.STAGES:
    raise ValueError(f'Unknown model stage {stage!r}; expected one of {stages.STAGES}.')


def _per_modality(table: ml_collections.ConfigDict, modality: str, key: str) -> Any:
  if modality not in table:
    raise ValueError(f'Config key {key}.{modality} is missing.')
  return table[modality]


def edge_spec(config: ml_collections.ConfigDict, modality: str) -> graph.EdgeSpec:
  """The modality's edge construction from config.graph."""
  return graph.EdgeSpec(
      k=int(_per_modality(config.graph.k, modality, 'graph.k')),
      temporal_weight=float(_per_modality(
          config.graph.temporal_weight, modality, 'graph.temporal_weight')),
      speaker_weight=float(config.graph.speaker_weight),
      speaker_edges=bool(config.graph.speaker_edges))


def representation_dim(stage: str, config: ml_collections.ConfigDict) -> int:
  """Width of the representation a stage's model returns (the fusion's `fused`)."""
  _check_stage(stage)
  if stage == 'teacher':
    return int(config.model.teacher.hidden)
  if stage == 'audio':
    return int(config.model.audio.hidden)
  if stage == 'visual':
    return graph.stack_widths(config.model.visual.layers)[-1]
  return int(config.model.fusion.dim)


def build_model(stage: str, config: ml_collections.ConfigDict, *,
                in_dims: Mapping[str, int], num_classes: int, rngs: nnx.Rngs) -> nnx.Module:
  """The model of one training stage.

  Args:
    stage: 'teacher' (text), 'audio', 'visual' or 'fusion'.
    config: the full experiment config (reads graph.*, model.*, data.modalities,
      loss.contrastive*).
    in_dims: input width per modality: raw feature dims for the graph encoders; for
      fusion, raw dims or the encoders' representation dims (model.fusion.input).
    num_classes: number of emotion classes.
    rngs: parameter and dropout streams (the dropout stream is stored in the model).
  """
  _check_stage(stage)
  momentum = float(config.model.batchnorm_momentum)
  if stages.is_encoder(stage):
    modality = stages.MODALITY_OF_STAGE[stage]
    if modality not in in_dims:
      raise ValueError(f'build_model({stage!r}): in_dims has no entry for {modality!r}.')
    common = dict(edge_spec=edge_spec(config, modality), modality=modality,
                  batchnorm_momentum=momentum, rngs=rngs)
  if stage == 'teacher':
    c = config.model.teacher
    return encoders.TextGraphTeacher(
        in_dims['t'], num_classes, hidden=c.hidden, heads=c.heads, dropout=c.dropout,
        input_dropout=c.input_dropout, gat_edge_weights=config.graph.gat_edge_weights,
        linear_skip=c.linear_skip, context_gru=c.context_gru,
        context_projection=c.context_projection,
        input_batchnorm=c.input_batchnorm, **common)
  if stage == 'audio':
    c = config.model.audio
    return encoders.AudioGraphStudent(
        in_dims['a'], num_classes, hidden=c.hidden, layers=c.layers, dropout=c.dropout,
        input_dropout=c.input_dropout, **common)
  if stage == 'visual':
    c = config.model.visual
    return encoders.VisualGraphStudent(
        in_dims['v'], num_classes, layers=c.layers, dropout=c.dropout,
        input_dropout=c.input_dropout, gat_edge_weights=config.graph.gat_edge_weights,
        **common)
  c = config.model.fusion
  modalities = tuple(config.data.modalities)
  missing = [m for m in modalities if m not in in_dims]
  if missing:
    raise ValueError(f"build_model('fusion'): in_dims has no entry for {missing}.")
  return fusion.HierarchicalFusion(
      {m: int(in_dims[m]) for m in modalities}, num_classes, modalities=modalities,
      dim=c.dim, layers=c.layers, heads=c.heads, dropout=c.dropout, use_moe=c.use_moe,
      num_experts=c.num_experts, top_k=c.top_k, alignment=c.alignment,
      alignment_mix=c.alignment_mix, alignment_scope=c.alignment_scope, gates=c.gates,
      gate_residual=c.gate_residual, cross_attention=c.cross_attention,
      cross_residual=c.cross_residual, pool_queries=c.pool_queries,
      classifier_heads=c.classifier_heads, contrastive=bool(config.loss.contrastive),
      contrastive_dim=config.loss.contrastive_dim, linear_skip=c.linear_skip, rngs=rngs)


def mesh_partition_spec(logical_axes: Sequence[str | None] | None,
                        rules: Sequence[tuple[str, Any]]) -> PartitionSpec:
  """Logical axis names -> PartitionSpec; each mesh axis is used once (first wins).

  Names without a rule are replicated. With the default rules ('expert' and 'mlp' both on
  'model') a [expert, embed, mlp] kernel is split over experts only.
  """
  if not logical_axes:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  axes = []
  for name in logical_axes:
    mesh_axis = table.get(name) if name is not None else None
    flat = mesh_axis if isinstance(mesh_axis, tuple) else (mesh_axis,)
    if mesh_axis is None or any(a in used for a in flat):
      axes.append(None)
    else:
      used.update(flat)
      axes.append(mesh_axis)
  return PartitionSpec(*axes)


def logical_sharding(state: Any, mesh: jax.sharding.Mesh,
                     rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedSharding per variable of an nnx state (same tree, variables hold shardings)."""
  def sharding_of(x):
    if isinstance(x, nnx.Variable):
      spec = mesh_partition_spec(x.get_metadata().get('out_sharding'), rules)
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
  """A pytree path as plain names ('blocks', '0', 'kernel'), whether its keys are dict keys,
  attributes or sequence indices (a parameter's name in an nnx.State, a plain dict or on disk)."""
  return tuple(jax.tree_util.keystr((k,), simple=True) for k in path)


__all__ = [
    'PARAM_GROUPS', 'build_model', 'edge_spec', 'encoders', 'fusion', 'graph',
    'logical_sharding', 'mesh_partition_spec', 'moe', 'param_group', 'path_names',
    'representation_dim',
]
