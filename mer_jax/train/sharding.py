"""Device mesh and shardings: built from the config, used by every stage.

Model code names only logical axes ('expert', 'mlp', ...); `config.mesh.rules` maps them to mesh
axes. Batches are split over 'data' along their node/edge axis; graph-level arrays are replicated.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jraph
import numpy as np

from mer_jax import batch_contract
from mer_jax import errors
from mer_jax import models
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def make_mesh(config, devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = dict(config.mesh.shape)
  names = tuple(shape)
  sizes = [int(v) for v in shape.values()]
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh.shape: at most one axis may be -1, got {shape}')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'config.mesh.shape={shape}: {len(devices)} devices are not divisible by {known}')
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f'config.mesh.shape={shape} needs {int(np.prod(sizes))} devices; '
                     f'{len(devices)} are available')
  # Auto axes: XLA propagates shardings through the model from the annotated inputs/params.
  axis_types = (AxisType.Auto,) * len(names)
  if len({d.process_index for d in devices}) > 1:
    # Several hosts: each process's devices must be one contiguous block of the data axis, so
    # that it builds the sub-batch they hold from its own dialogues (batch_budget). A
    # topology-ordered mesh can interleave hosts (a v5e-16 host is a 2x2 block of its 4x4
    # chips); whole-axis collectives (the gradient all-reduce) do not depend on the order.
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(ordered).reshape(sizes), names, axis_types=axis_types)
  return jax.make_mesh(tuple(sizes), names, axis_types=axis_types, devices=devices)


def data_axis_size(mesh: Mesh) -> int:
  return mesh.shape.get('data', 1)


def state_shardings(abstract_state: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for an nnx.State from its logical annotations and the config's rules.
  Raises errors.UserError naming the first parameter whose shape the mesh cannot split."""
  shardings = models.logical_sharding(abstract_state, mesh, [tuple(r) for r in rules])
  is_variable = lambda x: isinstance(x, nnx.Variable)
  for (path, variable), sharding in zip(
      jax.tree_util.tree_flatten_with_path(abstract_state, is_leaf=is_variable)[0],
      jax.tree.leaves(shardings, is_leaf=is_variable)):
    spec = sharding.get_value().spec if is_variable(sharding) else sharding.spec
    problem = indivisible_axis(variable.shape, spec, dict(mesh.shape))
    if problem:
      raise errors.UserError(
          f'parameter {"/".join(models.path_names(path))} of shape {tuple(variable.shape)} '
          f'cannot be split over the device mesh {dict(mesh.shape)}: {problem}; change '
          'config.mesh.shape or config.mesh.rules')
  return shardings


def indivisible_axis(shape, spec: P, mesh_shape: dict[str, int]) -> str:
  """'' when every dimension of `shape` divides evenly over the mesh axes `spec` gives it, else
  what does not."""
  for dim, (size, axes) in enumerate(zip(shape, tuple(spec))):
    if axes is None:
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    parts = int(np.prod([mesh_shape[a] for a in names]))
    if size % parts:
      return (f'its dimension {dim} ({size}) is split over mesh axis {"x".join(names)} of '
              f'{parts} devices')
  return ''


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_groups(config) -> int:
  """Sub-batches per step: config.batch.groups, or one per JAX process when it is 0."""
  groups = int(config.batch.groups) or jax.process_count()
  if groups % jax.process_count():
    raise ValueError(f'batch.groups={groups} must be a multiple of the {jax.process_count()} '
                     'JAX processes (each process builds whole sub-batches)')
  return groups


def _local_rows(mesh: Mesh, rows: int) -> tuple[int, int]:
  """The contiguous block [start, stop) of a P('data')-split axis of length `rows` that this
  process's devices hold."""
  index_map = NamedSharding(mesh, P('data')).addressable_devices_indices_map((rows,))
  slices = sorted({(ix[0].start or 0, rows if ix[0].stop is None else ix[0].stop)
                   for ix in index_map.values()})
  start, stop = slices[0][0], slices[0][0]
  for a, b in slices:
    if a != stop:
      raise ValueError(f'process {jax.process_index()} holds rows {slices} of the data axis, '
                       'not one contiguous block; build the mesh so that each process\'s '
                       'devices are adjacent along "data"')
    stop = b
  return start, stop


def batch_budget(config, mesh: Mesh):
  """The input pipeline's budget on `mesh`: config.batch per sub-batch, `batch_groups` of them
  per step, this process building the groups its devices hold (so it reads only those)."""
  groups = batch_groups(config)
  if groups == 1:
    return batch_contract.budget_from_config(config)
  budget = batch_contract.budget_from_config(config, groups)
  local = None
  for per_group in (budget.max_nodes, budget.max_graphs):
    start, stop = _local_rows(mesh, groups * per_group)
    if start % per_group or stop % per_group:
      raise ValueError(
          f'process {jax.process_index()} holds rows [{start}, {stop}) of {groups} sub-batches '
          f'of {per_group} slots: not whole sub-batches. Use a data axis size that divides '
          f'batch.groups * batch.max_nodes and batch.groups * batch.max_graphs per process.')
    groups_here = tuple(range(start // per_group, stop // per_group))
    if local is not None and groups_here != local:
      raise ValueError(f'process {jax.process_index()}: node rows give sub-batches {local} but '
                       f'graph rows give {groups_here}; make batch.max_graphs divisible by the '
                       'data axis size per sub-batch')
    local = groups_here
  return batch_contract.budget_from_config(config, groups, local)


def batch_shardings(batch: jraph.GraphsTuple, mesh: Mesh, budget) -> jraph.GraphsTuple:
  """Node- and edge-level arrays split over 'data'. Per-graph arrays are replicated for one
  sub-batch per step, and split over 'data' with the nodes when there are several (each process
  then only has its own)."""
  split = NamedSharding(mesh, P('data'))
  per_graph = replicated(mesh) if budget.groups == 1 else split
  return batch._replace(
      nodes=jax.tree.map(lambda _: split, batch.nodes),
      edges=jax.tree.map(lambda _: split, batch.edges),
      senders=split, receivers=split,
      n_node=per_graph, n_edge=per_graph,
      globals=jax.tree.map(lambda _: per_graph, batch.globals))


def put_batch(batch: jraph.GraphsTuple, shardings: jraph.GraphsTuple, budget) -> jraph.GraphsTuple:
  """Host numpy batch (this process's groups, end to end; with one group, the whole batch) ->
  global arrays."""
  scale = budget.groups // len(budget.local_groups)
  if scale == 1 and jax.process_count() == 1:
    # The batch is the whole global batch: one transfer call for all of its arrays.
    return jax.device_put(batch, shardings)
  return jax.tree.map(
      lambda x, sh: jax.make_array_from_process_local_data(
          sh, x, (x.shape[0] * scale,) + x.shape[1:]), batch, shardings)
