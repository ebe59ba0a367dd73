"""Device mesh and shardings: built from the config, used by every stage.

Model code names only logical axes ('expert', 'mlp', ...); `config.mesh.rules` maps them to mesh
axes. Batches are split over 'data' along their node/edge axis; graph-level arrays are replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import jraph
import numpy as np

from mer_jax import models
from mer_jax.train import distributed
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
  return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


def data_axis_size(mesh: Mesh) -> int:
  return mesh.shape.get('data', 1)


def state_shardings(abstract_state: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for an nnx.State from its logical annotations and the config's rules."""
  return models.logical_sharding(abstract_state, mesh, [tuple(r) for r in rules])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_shardings(batch: jraph.GraphsTuple, mesh: Mesh) -> jraph.GraphsTuple:
  """Node- and edge-level arrays split over 'data'; per-graph arrays replicated."""
  split = NamedSharding(mesh, P('data'))
  rep = replicated(mesh)
  return batch._replace(
      nodes=jax.tree.map(lambda _: split, batch.nodes),
      edges=jax.tree.map(lambda _: split, batch.edges),
      senders=split, receivers=split,
      n_node=rep, n_edge=rep,
      globals=jax.tree.map(lambda _: rep, batch.globals))


def put_batch(batch: jraph.GraphsTuple, shardings: jraph.GraphsTuple) -> jraph.GraphsTuple:
  """Host numpy batch (the whole global batch, identical on every process) -> global arrays."""
  return jax.tree.map(distributed.host_to_global, batch, shardings)
