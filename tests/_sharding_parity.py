"""Run as a subprocess by test_sharding.py: one train step of each stage on a 1-device mesh and
on a 4x2 (data x model) mesh of 8 fake CPU devices; prints both results as JSON."""

import os
import sys

from tests import _xla_flags

os.environ['XLA_FLAGS'] = _xla_flags.with_host_devices(8)

import json  # pylint: disable=g-import-not-at-top

import jax
import numpy as np

from configs import default
from mer_jax import batch_contract
from mer_jax.run import job
from mer_jax.train import stage as stage_lib
from mer_jax.train import inference
from mer_jax.train import sharding


def run(workdir: str, devices, shape) -> dict:
  config = default.get_config('tiny')
  config.model.fusion.use_moe = True  # experts split over 'model' on the 8-device mesh
  config.model.fusion.input = 'graph'  # frozen encoders inside the fusion step, sharded too
  config.optim.fusion.grad_accum_steps = 1
  # The visual student repeats the teacher's layer type (graph attention) and the audio
  # student's distillation: text and audio cover every kind of layer at a third less compiling.
  config.data.modalities = ('t', 'a')
  config.train.stages = ('teacher', 'audio', 'fusion')
  config.mesh.shape = shape
  mesh = sharding.make_mesh(config, devices)
  ctx = job.prepare(config, workdir, mesh=mesh)
  budget = batch_contract.budget_from_config(config)
  trained, out = {}, {}
  for stage in config.train.stages:
    runner = stage_lib.StageRunner(stage, ctx, trained)
    batch = runner.train_dataset(0)[0]
    batch_sh = sharding.batch_shardings(batch, mesh, budget)
    step = runner.timed_train_step(batch_sh)
    state, metrics = step(runner.state, sharding.put_batch(batch, batch_sh, budget),
                          *runner.step_inputs)
    params = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(state.params))])
    shardings = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
    out[stage] = {'loss': float(metrics['loss']), 'grad_norm': float(metrics['grad_norm']),
                  'params': params[:: max(1, len(params) // 4000)].tolist(),
                  'specs': sorted(shardings)}
    trained[stage] = inference.FrozenModel(runner.graphdef,
                                         (state.params, state.model_state, runner.rng_state))
  return out


if __name__ == '__main__':
  workdir = sys.argv[1]
  devices = jax.devices()
  assert len(devices) == 8, devices
  one = run(os.path.join(workdir, 'one'), devices[:1], {'data': 1, 'model': 1})
  eight = run(os.path.join(workdir, 'eight'), devices, {'data': 4, 'model': 2})
  print('RESULT ' + json.dumps({'one': one, 'eight': eight}))
