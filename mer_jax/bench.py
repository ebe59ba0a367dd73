"""Throughput of every stage's train step and of the input pipeline, at the authors' MELD sizes.

  python -m mer_jax.bench [--config configs/default.py] [--steps 30] [--moe both]

Prints, per stage: examples (utterances) per second, model FLOPs per step from XLA's cost
analysis, achieved FLOP/s next to the fp32 matmul peak measured in the same run, the time of the
step's parameter update alone (optimizer and EMA: a pass over every parameter, the same at any
batch size) and what the rest of the step achieves, and the input pipeline's batches per second
against the step's. Then projects a full MELD run (9,989 training
utterances, 30 epochs, every stage, no early stopping), for the authors' stages and for our
default (which adds the cross-fitted encoders of stacked fusion).
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/default.py', 'Base config.')
_STEPS = flags.DEFINE_integer('steps', 30, 'Timed steps per stage (after warm-up).')
_MOE = flags.DEFINE_enum('moe', 'both', ['off', 'on', 'both'], 'Fusion MoE setting(s) to time.')
_DIALOGUES = flags.DEFINE_integer('dialogues', 120, 'Synthetic training dialogues to sample from.')

MELD_TRAIN_UTTERANCES = 9989
MELD_EPOCHS = 30


def measure_matmul_peak(n: int = 1024, repeats: int = 20) -> float:
  """fp32 FLOP/s of a large square matmul, median over repeats."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / statistics.median(times)


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get('flops', float('nan')))


def bench_stage(stage: str, ctx, trained, steps: int, label: str | None = None) -> dict:
  """Times the jitted train step of `stage` on real batches from the pipeline."""
  from mer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mer_jax.train import sharding
  from mer_jax.train import trainer
  config = ctx.config
  budget = sharding.batch_budget(config, ctx.mesh)
  run = trainer.StageRunner(stage, ctx, trained)
  train_source, batch_config = run.training_data()
  ds = pipeline.make_dataset(train_source, config=batch_config, budget=budget, train=True,
                             epoch=0, seed=config.seed, augmented=run.augmented)
  # Input pipeline alone: batches per second, host side, after one pass has filled the record
  # cache (config.data.cache_mib), as in every epoch but the first.
  for i in range(len(ds)):
    ds[i]
  t0 = time.perf_counter()
  host_batches = [ds[i % len(ds)] for i in range(steps)]
  pipeline_time = (time.perf_counter() - t0) / steps

  batch_sh = sharding.batch_shardings(host_batches[0], ctx.mesh, budget)
  device_batches = [sharding.put_batch(b, batch_sh, budget) for b in host_batches]
  step_fn = run.jitted_train_step(batch_sh)
  compiled = step_fn.lower(run.state, device_batches[0], run.frozen_states,
                           ctx.class_weights).compile()
  flops = _flops(compiled)
  state = run.state
  for b in device_batches[:3]:  # warm-up
    state, m = compiled(state, b, run.frozen_states, ctx.class_weights)
  jax.block_until_ready(state)
  times = []
  for b in device_batches:
    t0 = time.perf_counter()
    state, m = compiled(state, b, run.frozen_states, ctx.class_weights)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  step_time = statistics.median(times)
  update_time = time_parameter_update(run, state)
  utts = statistics.mean(int(b.nodes['mask'].sum()) for b in host_batches)
  # A trained stage for the next ones (fusion reads the teacher and students).
  trained[stage] = trainer.FrozenModel(run.graphdef, (state.params, state.model_state,
                                                      run.rng_state))
  return {'stage': label or stage, 'step_ms': 1e3 * step_time, 'utterances_per_step': utts,
          'examples_per_s': utts / step_time, 'flops_per_step': flops,
          'flops_per_s': flops / step_time, 'update_ms': 1e3 * update_time,
          'params': sum(x.size for x in jax.tree.leaves(state.params)),
          'pipeline_ms': 1e3 * pipeline_time, 'pipeline_vs_step': step_time / pipeline_time}


def time_parameter_update(run, state, repeats: int = 30) -> float:
  """Median seconds of the step's parameter side alone (optimizer, lr scale, EMA), which does
  the same work whatever the batch: what is left of a step is the model's forward and backward."""
  from mer_jax.train import steps  # pylint: disable=g-import-not-at-top
  update = jax.jit(functools.partial(steps.apply_gradients, tx=run.tx,
                                     ema_decay=run.statics.ema_decay), donate_argnums=(0,))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)
  state = jax.tree.map(jnp.copy, state)  # the caller keeps its state; this one is donated
  for _ in range(3):
    state = update(state, grads)
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state = update(state, grads)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def stacked_context(ctx, trained):
  """The fusion stage's context under stacking, from the benchmark's (briefly trained) encoders."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from mer_jax.data import sources
  from mer_jax.train import stacking
  config = ctx.config
  train = sources.InMemorySource(stacking.stacked_records(
      ctx.data.train, stacking.encoder_log_probs(ctx.data.train, trained, config, ctx.mesh)))
  data = dataclasses.replace(ctx.data, train=train, dev=train, test=train)
  return dataclasses.replace(ctx, config=stacking.fusion_config(config), data=data)


def main(argv):
  del argv
  from mer_jax.train import cpu_threefry  # pylint: disable=g-import-not-at-top
  from mer_jax.train import host_memory
  from mer_jax.train import trainer
  host_memory.keep_freed_blocks_in_heap()  # as mer_jax.main does
  cpu_threefry.unroll_threefry_on_cpu()
  base = _CONFIG.value
  peak = measure_matmul_peak()
  print(f'devices: {jax.devices()}')
  print(f'fp32 matmul peak (1024^3, median of 20): {peak / 1e9:.1f} GFLOP/s')
  settings = {'off': [False], 'on': [True], 'both': [False, True]}[_MOE.value]
  rows, projected = [], {}
  with tempfile.TemporaryDirectory() as workdir:
    for use_moe in settings:
      config = base.copy_and_resolve_references()
      config.unlock()
      config.data.synthetic.num_dialogues.train = _DIALOGUES.value
      config.data.synthetic.num_dialogues.dev = 4
      config.data.synthetic.num_dialogues.test = 4
      config.model.fusion.use_moe = use_moe
      config.train.progress_bar = False
      config.model.fusion.input = 'graph'
      ctx = trainer.prepare(config, workdir)
      trained = {}
      timed = [bench_stage(stage, ctx, trained, _STEPS.value) for stage in trainer.ENCODER_STAGES]
      # Fusion as it trains by default (stacked: inputs are the encoders' log-probabilities) and
      # with the frozen encoders run inside every step (input 'graph').
      stacked_ctx = stacked_context(ctx, trained)
      timed.append(bench_stage('fusion', stacked_ctx, {}, _STEPS.value, 'fusion'))
      timed.append(bench_stage('fusion', ctx, trained, _STEPS.value, 'fusion(graph)'))
      # A full MELD run: 30 epochs of every stage at this batch fill. Our default (stacked
      # fusion) adds the cross-fitted encoders ((K - 1) / K of the data, K times); the authors'
      # stage set has none and fuses the encoders' graph representations.
      folds = config.model.fusion.stacking_folds
      steps_per_epoch = {r['stage']: MELD_TRAIN_UTTERANCES / r['utterances_per_step']
                         for r in timed}
      seconds = {r['stage']: MELD_EPOCHS * steps_per_epoch[r['stage']] * r['step_ms'] / 1e3
                 for r in timed}
      encoders = sum(seconds[s] for s in trainer.ENCODER_STAGES)
      projected[use_moe] = {'default': folds * encoders + seconds['fusion'],
                            'authors': encoders + seconds['fusion(graph)']}
      for r in timed:
        r['moe'] = use_moe
        rows.append(r)
  print()
  # 'update ms': the parameter side of the step alone (apply_gradients); 'model % peak': the
  # step's FLOPs over the rest of its time.
  print(f'{"stage":13} {"moe":5} {"step ms":>7} {"utt/step":>8} {"utt/s":>6} {"GFLOP/step":>10} '
        f'{"GFLOP/s":>7} {"% peak":>6} {"params M":>8} {"update ms":>9} {"model % peak":>12} '
        f'{"input ms":>8} {"input x":>7}')
  for r in rows:
    model_s = (r['step_ms'] - r['update_ms']) / 1e3
    print(f'{r["stage"]:13} {str(r["moe"]):5} {r["step_ms"]:7.2f} {r["utterances_per_step"]:8.1f} '
          f'{r["examples_per_s"]:6.0f} {r["flops_per_step"] / 1e9:10.3f} '
          f'{r["flops_per_s"] / 1e9:7.1f} {100 * r["flops_per_s"] / peak:6.1f} '
          f'{r["params"] / 1e6:8.2f} {r["update_ms"]:9.2f} '
          f'{100 * r["flops_per_step"] / model_s / peak:12.1f} '
          f'{r["pipeline_ms"]:8.2f} {r["pipeline_vs_step"]:7.1f}')
  for use_moe, totals in projected.items():
    print(f'projected full MELD run, {MELD_EPOCHS} epochs, moe={use_moe}, train steps only: '
          f'{totals["authors"] / 60:.1f} min for the authors\' stages (teacher, students, fusion '
          f'on graph representations); {totals["default"] / 60:.1f} min for our default '
          f'(stacked fusion, + {folds} cross-fitted encoder sets on {folds - 1}/{folds} of the '
          'data)')


if __name__ == '__main__':
  app.run(main)
