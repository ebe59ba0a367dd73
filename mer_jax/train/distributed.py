"""Several JAX processes (hosts) training one model.

`initialize` starts JAX's distributed runtime: with no arguments on Cloud TPU pod slices (JAX
finds the other hosts itself), or with an explicit coordinator for GPU clusters and for the
localhost CPU test (CPU collectives then go through gloo). Every process runs the same program:
the same batch plan from the same seed, each putting its own devices' share of every global batch
on them (`host_to_global`), and fetching outputs back with `global_to_host`. Files (reports,
results, predictions) are written by process 0 only; Orbax coordinates checkpoint writes itself.
"""

from __future__ import annotations

import jax
from jax.experimental import multihost_utils
import numpy as np


def initialize(coordinator_address: str = '', num_processes: int = 0, process_id: int = -1,
               auto: bool = False) -> None:
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f'--coordinator_address needs --num_processes >= 1 and 0 <= '
                       f'--process_id < num_processes, got {num_processes} and {process_id}.')
    # Collectives between CPU processes (no effect on accelerator backends).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif auto:
    jax.distributed.initialize()


def is_main_process() -> bool:
  return jax.process_index() == 0


def host_to_global(x, sharding) -> jax.Array:
  """A host array holding the whole global value -> a global array; each process places only
  the shards of its own devices."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def global_to_host(x: jax.Array) -> np.ndarray:
  """The whole value of a (possibly multi-process) global array on every host."""
  if getattr(x, 'is_fully_addressable', True) or getattr(x, 'is_fully_replicated', False):
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
