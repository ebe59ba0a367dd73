"""The whole job: `train_and_evaluate(config, workdir)` prepares the corpus, then trains and
evaluates every stage (mer_jax/train/trainer.py). Rerunning a workdir resumes it."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import jax

from mer_jax import config_validation
from mer_jax import console
from mer_jax import locks
from mer_jax.data import staging
from mer_jax.run import corpus
from mer_jax.train import cpu_backend
from mer_jax.train import distributed
from mer_jax.train import preemption
from mer_jax.train import sharding
from mer_jax.train import trainer
from mer_jax.train.stage import Context

LOCK_NAME = 'run.lock'


def enable_compilation_cache(config, workdir: str) -> None:
  """Persistent XLA cache: fold encoders, resumed runs and reruns reuse compiled steps. Unset
  (''), it is the environment's JAX_COMPILATION_CACHE_DIR (one cache for all of a user's runs),
  else workdir/jax_cache."""
  cache = (config.train.compilation_cache_dir or os.environ.get('JAX_COMPILATION_CACHE_DIR')
           or os.path.join(workdir, 'jax_cache'))
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def prepare(config, workdir: str, mesh=None) -> Context:
  """The run's context: compilation cache, mesh, the corpus's opened splits, class weights."""
  os.makedirs(workdir, exist_ok=True)
  if config.train.shared_stages_dir and jax.process_count() > 1:
    raise config_validation.ConfigError(
        'train.shared_stages_dir is for single-process runs (sweeps on one machine); this job '
        f'has {jax.process_count()} processes')
  if config.train.compilation_cache_dir != 'off':
    enable_compilation_cache(config, workdir)
  mesh = mesh if mesh is not None else sharding.make_mesh(config)
  config_validation.check_mesh_fits_batch(config, sharding.data_axis_size(mesh),
                                          sharding.batch_groups(config))
  data = corpus.open_splits(config, workdir)
  return trainer.make_context(config, workdir, data, mesh)


def workdir_lock(workdir: str):
  """One run per workdir: process 0 holds workdir/run.lock while the job runs (a second run
  stops at once, naming the holder; a lock left by a killed run is cleared)."""
  if jax.process_index() != 0 or staging.is_remote(workdir):
    return contextlib.nullcontext()
  return locks.held(os.path.join(workdir, LOCK_NAME), f'workdir {workdir}')


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains every stage in config.train.stages on the config's corpus, then reports test metrics
  of each (model selection on dev only; test scored once per stage, after its training)."""
  with workdir_lock(workdir):
    ctx = prepare(config, workdir)
    console.say('mesh %s; train %d dialogues, dev %d, test %d', dict(ctx.mesh.shape),
                len(ctx.data.train), len(ctx.data.dev), len(ctx.data.test))
    return trainer.train_stages(ctx)


def run(config, workdir: str, *, coordinator_address: str = '', num_processes: int = 0,
        process_id: int = -1, multihost: bool = False) -> dict[str, Any] | None:
  """`python -m mer_jax.main`: starts JAX's distributed runtime when asked, applies the CPU
  backend's settings, and runs `train_and_evaluate`, stopping cleanly on preemption."""
  distributed.initialize(coordinator_address, num_processes, process_id, auto=multihost)
  cpu_backend.tune_for_cpu_backend()
  return preemption.run_preemptible(train_and_evaluate, config, workdir)
