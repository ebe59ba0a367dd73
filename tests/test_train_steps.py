"""Jitted train/predict steps: compile once per stage; schedules, lr groups, accumulation,
reduce-on-plateau scale and EMA against hand-computed numbers."""

import collections
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import default
from mer_jax import batch_contract
from mer_jax.run import job
from mer_jax.train import stage as stage_lib
from mer_jax.train import inference
from mer_jax import models
from mer_jax.data import pipeline
from mer_jax.train import optim
from mer_jax.train import sharding
from mer_jax.train import steps
from tests._compiles import CompileRequests

pytestmark = pytest.mark.slow

STAGES = ('teacher', 'audio', 'visual')  # fusion's loop is counted in test_end_to_end.py
EMA_DECAY = 0.9


def fresh_copy(tree, shardings):
  """New device buffers (the jitted train step donates its state)."""
  return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), tree, shardings)


def shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.fixture(scope='module')
def runners(tmp_path_factory):
  """StageRunners of the tiny config, with trace counters on their train steps.

  The teacher accumulates 2 micro-batches and the audio student does not; both keep an EMA
  (constant lr), so each code path of the step runs on a real model. Frozen models are the
  untrained initial weights: the steps' mechanics do not depend on what they learned.
  """
  config = default.get_config('tiny')
  config.optim.teacher.update(grad_accum_steps=2, ema_decay=EMA_DECAY, schedule='constant')
  config.optim.audio.update(ema_decay=EMA_DECAY)
  # Every stage steps on the same batches, so the student runs the frozen teacher in its step
  # (tests/test_teacher_cache.py covers the cached targets).
  config.loss.distill_cached_teacher = False
  ctx = job.prepare(config, str(tmp_path_factory.mktemp('steps_workdir')))
  budget = batch_contract.budget_from_config(config)
  traces = {'train': collections.Counter()}
  original_train = steps.train_step

  def counted_train(*args, **kwargs):
    traces['train'][kwargs['statics'].stage] += 1
    return original_train(*args, **kwargs)

  def batches(epoch, count):
    ds = pipeline.make_dataset(ctx.data.train, config=config, budget=budget, train=True,
                               epoch=epoch, seed=config.seed)
    assert len(ds) >= count
    return [ds[i] for i in range(count)]

  host_batches = batches(0, 3) + batches(1, 2)
  batch_sh = sharding.batch_shardings(host_batches[0], ctx.mesh, budget)
  out, frozen = {}, {}
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(steps, 'train_step', counted_train)
    for stage in STAGES:
      runner = stage_lib.StageRunner(stage, ctx, frozen)
      runner.step_fn = runner.timed_train_step(batch_sh)
      runner.initial_state = fresh_copy(runner.state, runner.state_shardings)
      out[stage] = runner
      params, batch_stats = runner.initial_state.params, runner.initial_state.model_state
      frozen[stage] = inference.FrozenModel(runner.graphdef, (
          fresh_copy(params, shardings_of(params)),
          fresh_copy(batch_stats, shardings_of(batch_stats)), runner.rng_state))
  return {'config': config, 'ctx': ctx, 'runners': out, 'traces': traces, 'frozen': frozen,
          'batches': [sharding.put_batch(b, batch_sh, budget) for b in host_batches],
          'host_batches': host_batches}


def run_steps(runner, state, batches):
  states, metrics = [], []
  for batch in batches:
    state, m = runner.step_fn(state, batch, *runner.step_inputs)
    states.append(host(state))
    metrics.append(host(m))
  return state, states, metrics


def test_train_and_predict_steps_trace_once_per_stage(runners):
  ctx, traces = runners['ctx'], runners['traces']
  host_batches = runners['host_batches']
  # Different epochs pack different dialogues: the batches really differ, the shapes do not.
  assert not np.array_equal(host_batches[0].nodes['label'], host_batches[3].nodes['label'])
  shapes = [jax.tree.map(np.shape, b) for b in host_batches]
  assert all(s == shapes[0] for s in shapes)
  frozen = {}
  for stage, runner in runners['runners'].items():
    state = fresh_copy(runner.initial_state, runner.state_shardings)
    state, _, metrics = run_steps(runner, state, runners['batches'])
    assert traces['train'][stage] == 1, (stage, traces['train'])
    assert all(np.isfinite(m['loss']) for m in metrics), stage
    assert int(state.step) == len(runners['batches'])
    eval_params = state.ema_params if state.ema_params is not None else state.params
    runner.evaluate(ctx.data.dev, runner.initial_state.params, state.model_state)
    trained = inference.FrozenModel(runner.graphdef,
                                    (eval_params, state.model_state, runner.rng_state))
    # After the stage's first evaluation compiled its eval program, evaluating other weights
    # and splits, and the later predictions with the trained stage (the test split, stacking),
    # run that program: no compilation at all.
    with CompileRequests() as compiles:
      for source in (ctx.data.dev, ctx.data.test):
        report = runner.evaluate(source, eval_params, state.model_state)
        assert 0.0 <= report['accuracy'] <= 1.0
      pred = inference.predict_stage(ctx.data.test, stage, trained, ctx.config, ctx.mesh, frozen)
    assert not compiles.by_name, (stage, compiles.by_name)
    assert pred['probs'].shape[-1] == len(ctx.config.label_names)
    frozen[stage] = runners['frozen'][stage]


# --- learning-rate schedules and parameter groups -----------------------------------------

def stage_cfg(**overrides) -> ml_collections.ConfigDict:
  values = default.base_config().optim.fusion.to_dict()
  values.update(lr=1e-3, weight_decay=0.0, grad_clip_norm=0.0, grad_accum_steps=1,
                schedule='constant', lr_multipliers={})
  values.update(overrides)  # replaces lr_multipliers as a whole (ConfigDict.update merges)
  return ml_collections.ConfigDict(values)


def test_constant_schedule():
  schedule = optim.make_schedule(stage_cfg(lr=3e-4), total_updates=50)
  for step in (0, 1, 17, 49, 500):
    np.testing.assert_allclose(float(schedule(step)), 3e-4, rtol=1e-7)


def test_warmup_cosine_schedule_numbers():
  peak, total = 1e-3, 100  # warm-up: 20% of 100 = 20 steps, then cosine to 0 over 80 steps.
  schedule = optim.make_schedule(
      stage_cfg(lr=peak, schedule='warmup_cosine', warmup_fraction=0.2), total_updates=total)
  expected = {
      0: 0.0,
      10: 0.5 * peak,  # halfway up the linear warm-up
      20: peak,  # peak at the end of warm-up
      40: 0.5 * peak * (1 + math.cos(math.pi * 20 / 80)),
      60: 0.5 * peak,  # half way down the cosine
      100: 0.0,  # end
  }
  for step, lr in expected.items():
    np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6, atol=1e-12, err_msg=step)
  with pytest.raises(ValueError, match='linear'):
    optim.make_schedule(stage_cfg(schedule='linear'), total_updates=10)


def test_warmup_linear_schedule_numbers():
  peak, total = 2e-3, 50  # warm-up: 10% of 50 = 5 steps, then linear decay to 0 over 45 steps.
  schedule = optim.make_schedule(
      stage_cfg(lr=peak, schedule='warmup_linear', warmup_fraction=0.1), total_updates=total)
  expected = {0: 0.0, 2: 0.4 * peak, 5: peak, 14: peak * 36 / 45, 27.5: 0.5 * peak, 50: 0.0,
              60: 0.0}
  for step, lr in expected.items():
    np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6, atol=1e-12, err_msg=step)


def optax_schedule(cfg, total: int):
  """The schedules as optax builds them, with the run length a Python constant."""
  if cfg.schedule == 'warmup_cosine':
    warmup = int(cfg.warmup_fraction * total)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(warmup, 1),
                                              max(total, warmup + 1), 0.0)
  warmup = max(int(cfg.warmup_fraction * total), 1)
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup),
                               optax.linear_schedule(cfg.lr, 0.0, max(total - warmup, 1))],
                              [warmup])


@pytest.mark.parametrize('name', ['warmup_cosine', 'warmup_linear'])
def test_one_compiled_schedule_equals_optax_for_every_run_length(name):
  """The run length is an argument (folds of different lengths share one step program), and the
  values are optax's to the bit."""
  lr_at = jax.jit(jax.vmap(optim.scheduled_lr, in_axes=(None, 0, None)), static_argnums=0)
  counts = jnp.arange(1240)  # past the end of every run below
  for fraction in (0.0, 0.06, 0.1, 0.29):
    cfg = stage_cfg(lr=2e-4, schedule=name, warmup_fraction=fraction)
    for total in (2, 3, 7, 37, 100, 1234):
      ours = lr_at(ml_collections.FrozenConfigDict(cfg), counts, optim.schedule_steps(cfg, total))
      reference = jax.jit(jax.vmap(optax_schedule(cfg, total)))(counts)  # compiled, as in a step
      np.testing.assert_array_equal(ours, reference,
                                    err_msg=f'{fraction} {total}')
  assert lr_at._cache_size() == 4  # one program per config, whatever the length


def two_group_params():
  w = jnp.asarray([1.0, -2.0, 3.0, 0.5], jnp.float32)
  return {'slow': {'w': w}, 'fast': {'w': w}, 'other': {'w': w}}


def first_adam_update(lr, g, eps=1e-8):
  # Bias-corrected first Adam step: m_hat = g, v_hat = g^2.
  g = np.asarray(g, np.float64)
  return -lr * g / (np.abs(g) + eps)


def test_lr_multipliers_scale_each_groups_update():
  params = two_group_params()
  g = jnp.asarray([0.5, -0.25, 2.0, -1e-3], jnp.float32)
  grads = jax.tree.map(lambda _: g, params)
  cfg = stage_cfg(lr=0.1, lr_multipliers={'slow': 1.0, 'fast': 2.0, 'other': 0.5})
  tx = optim.make_optimizer(cfg, params, group_of=lambda path: path[0])
  updates, _ = tx.update(grads, tx.init(params), params,
                         schedule_steps=optim.schedule_steps(cfg, 10))
  # float32 bias corrections (1 - 0.999 is not exact in float32) give ~1e-5 relative error.
  np.testing.assert_allclose(updates['slow']['w'], first_adam_update(0.1, g), rtol=2e-5)
  np.testing.assert_allclose(updates['fast']['w'], 2.0 * np.asarray(updates['slow']['w']),
                             rtol=1e-7)
  np.testing.assert_allclose(updates['other']['w'], 0.5 * np.asarray(updates['slow']['w']),
                             rtol=1e-7)


def test_lr_multipliers_match_a_separate_adamw_per_group_with_weight_decay():
  """Three steps with decoupled weight decay and a schedule: each group's parameters follow
  optax.adamw at lr * multiplier, as if it had its own optimizer."""
  params = two_group_params()
  multipliers = {'slow': 1.0, 'fast': 2.0, 'other': 0.5}
  cfg = stage_cfg(lr=0.05, weight_decay=0.1, schedule='warmup_cosine', warmup_fraction=0.2,
                  lr_multipliers=multipliers)
  tx = optim.make_optimizer(cfg, params, group_of=lambda path: path[0])
  schedule = optim.make_schedule(cfg, total_updates=10)
  state, p = tx.init(params), params
  refs = {g: optax.adamw(lambda step, m=m: schedule(step) * m, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                         weight_decay=0.1) for g, m in multipliers.items()}
  ref_states = {g: refs[g].init(params[g]) for g in multipliers}
  ref_p = dict(params)
  for i in range(3):
    grads = jax.tree.map(lambda w: jnp.sin(w * (i + 1)), p)
    updates, state = tx.update(grads, state, p, schedule_steps=optim.schedule_steps(cfg, 10))
    p = optax.apply_updates(p, updates)
    for g in multipliers:
      u, ref_states[g] = refs[g].update(jax.tree.map(lambda w: jnp.sin(w * (i + 1)), ref_p[g]),
                                        ref_states[g], ref_p[g])
      ref_p[g] = optax.apply_updates(ref_p[g], u)
  for g in multipliers:
    np.testing.assert_allclose(p[g]['w'], ref_p[g]['w'], rtol=1e-6, atol=1e-7)
  assert not np.allclose(p['fast']['w'], p['slow']['w'])


def test_lr_multiplier_for_unknown_group_is_an_error():
  cfg = stage_cfg(lr_multipliers={'slow': 1.0})
  with pytest.raises(ValueError, match=r"\['fast', 'other'\]"):
    optim.make_optimizer(cfg, two_group_params(), group_of=lambda path: path[0])


def test_fusion_param_groups_all_have_multipliers():
  config = default.get_config('tiny')
  in_dims = inference.stage_in_dims('fusion', config)
  model = nnx.eval_shape(lambda: models.build_model(
      'fusion', config, in_dims=in_dims, num_classes=len(config.label_names), rngs=nnx.Rngs(0)))
  labels = optim.param_labels(nnx.state(model, nnx.Param), models.param_group)
  groups = set(jax.tree.leaves(labels))
  assert groups <= set(config.optim.fusion.lr_multipliers), groups
  assert {'proj', 'transformer', 'classifiers'} <= groups, groups


def test_gradient_accumulation_applies_every_second_step():
  params = {'w': jnp.asarray([1.0, -1.0, 2.0], jnp.float32)}
  cfg = stage_cfg(lr=0.1, grad_accum_steps=2)
  tx = optim.make_optimizer(cfg, params)
  opt_state = tx.init(params)
  grads = [jnp.asarray(x, jnp.float32) for x in
           ([1.0, 2.0, -3.0], [3.0, -4.0, -1.0], [0.5, 0.5, 0.5], [-0.5, -0.5, 2.5])]
  history = [params]
  for g in grads:
    updates, opt_state = tx.update({'w': g}, opt_state, history[-1],
                                   schedule_steps=optim.schedule_steps(cfg, 10))
    history.append(optax.apply_updates(history[-1], updates))
  w = [np.asarray(p['w']) for p in history]
  np.testing.assert_array_equal(w[1], w[0])  # micro-step 1: only accumulated
  np.testing.assert_allclose(w[2] - w[0], first_adam_update(0.1, (grads[0] + grads[1]) / 2),
                             rtol=2e-5)
  np.testing.assert_array_equal(w[3], w[2])
  assert not np.allclose(w[4], w[3])


@pytest.mark.parametrize('every', [2, 3])
def test_accumulation_equals_optax_multisteps_to_the_bit(every):
  """Our accumulation (no lax.cond) against optax.MultiSteps around the same inner AdamW: the
  same updates and the same state, micro-step by micro-step, compiled."""
  params = two_group_params()
  cfg = stage_cfg(lr=0.05, weight_decay=0.1, schedule='warmup_cosine', warmup_fraction=0.2,
                  grad_clip_norm=1.0)
  inner = optim.make_optimizer(cfg, params)
  ours, theirs = optim.accumulate_gradients(inner, every), optax.MultiSteps(inner, every)
  steps_arg = optim.schedule_steps(cfg, 4)

  def run(tx):
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, schedule_steps=steps_arg))
    state, p, out = tx.init(params), params, []
    for i in range(2 * every + 1):
      grads = jax.tree.map(lambda w: jnp.cos(w * (i + 1)) * (i + 1), p)
      updates, state = update(grads, state, p)
      p = optax.apply_updates(p, updates)
      out.append((updates, state))
    return out

  for (u_ours, s_ours), (u_ref, s_ref) in zip(run(ours), run(theirs)):
    jax.tree.map(np.testing.assert_array_equal, u_ours, u_ref)
    jax.tree.map(np.testing.assert_array_equal, s_ours, s_ref)


# --- the real train step: accumulation, lr_scale and EMA -----------------------------------

def test_step_with_accumulation_updates_every_second_micro_batch(runners):
  runner = runners['runners']['teacher']
  assert isinstance(runner.state.opt_state, optax.MultiStepsState)
  state = fresh_copy(runner.initial_state, runner.state_shardings)
  _, states, _ = run_steps(runner, state, runners['batches'][:4])
  p = [leaves(runner.initial_state.params)] + [leaves(s.params) for s in states]
  moved = [any(not np.array_equal(a, b) for a, b in zip(p[i], p[i + 1])) for i in range(4)]
  assert moved == [False, True, False, True]


def test_lr_scale_scales_the_update(runners):
  """AdamW's first step from one state and batch, with lr_scale 1 and 0.5."""
  runner = runners['runners']['audio']
  batch = runners['batches'][0]
  full = fresh_copy(runner.initial_state, runner.state_shardings)
  half = fresh_copy(runner.initial_state.replace(lr_scale=jnp.asarray(0.5, jnp.float32)),
                    runner.state_shardings)
  new_full, m_full = runner.step_fn(full, batch, *runner.step_inputs)
  new_half, m_half = runner.step_fn(half, batch, *runner.step_inputs)
  assert float(m_half['loss']) == float(m_full['loss'])
  assert any(not np.array_equal(a, h) for a, h in zip(leaves(runner.initial_state.params),
                                                       leaves(new_half.params)))
  p0 = leaves(runner.initial_state.params)
  for a, f, h in zip(p0, leaves(new_full.params), leaves(new_half.params)):
    a, f, h = (x.astype(np.float64) for x in (a, f, h))
    np.testing.assert_allclose(h - a, 0.5 * (f - a), atol=1e-6 * max(1.0, np.abs(a).max()))
  # Adam's moments see the gradients only: the scale is applied after the optimizer.
  for f, h in zip(leaves(new_full.opt_state), leaves(new_half.opt_state)):
    np.testing.assert_array_equal(f, h)


def expected_ema(old, new, updates_before: int, decay: float):
  d = min(decay, (1.0 + updates_before) / (10.0 + updates_before))
  return [d * o.astype(np.float64) + (1.0 - d) * n.astype(np.float64) for o, n in zip(old, new)]


def test_ema_after_each_update_without_accumulation(runners):
  runner = runners['runners']['audio']
  state = fresh_copy(runner.initial_state, runner.state_shardings)
  _, states, _ = run_steps(runner, state, runners['batches'][:3])
  old_ema = leaves(runner.initial_state.ema_params)
  for t, s in enumerate(states):
    want = expected_ema(old_ema, leaves(s.params), t, EMA_DECAY)
    for w, got in zip(want, leaves(s.ema_params)):
      np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7, err_msg=f'update {t}')
    old_ema = leaves(s.ema_params)


def test_ema_with_accumulation_counts_applied_updates(runners):
  """With accumulation the EMA moves only when an update is applied, by the same rule: the
  first applied update uses t = 0 updates before it, exactly as without accumulation."""
  runner = runners['runners']['teacher']
  state = fresh_copy(runner.initial_state, runner.state_shardings)
  _, states, _ = run_steps(runner, state, runners['batches'][:4])
  ema = [leaves(runner.initial_state.ema_params)] + [leaves(s.ema_params) for s in states]
  for a, b in zip(ema[0], ema[1]):  # micro-step 1: nothing applied, the average stays
    np.testing.assert_array_equal(a, b)
  for applied, (micro, updates_before) in enumerate(((2, 0), (4, 1))):
    want = expected_ema(ema[micro - 1], leaves(states[micro - 1].params), updates_before,
                        EMA_DECAY)
    for w, got in zip(want, ema[micro]):
      np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7,
                                 err_msg=f'applied update {applied} (micro-step {micro})')


def test_reseeded_streams_are_fold_in_of_their_position():
  """Stream i of the rng state gets fold_in(key, i) (one vectorised hash for all); counters and
  other non-key leaves become zeros."""
  raw = jax.random.key_data(jax.random.key(7))
  key = jax.random.wrap_key_data(raw)
  rng_state = {'a': {'count': jnp.asarray(5, jnp.uint32), 'key': jax.random.key(1)},
               'b': {'count': jnp.asarray(2, jnp.uint32), 'key': jax.random.key(2)}}
  fresh = jax.jit(steps.reseed_rng_state)(rng_state, raw)
  # Flattened order: a.count, a.key, b.count, b.key -> the keys are streams 1 and 3.
  for name, i in (('a', 1), ('b', 3)):
    np.testing.assert_array_equal(jax.random.key_data(fresh[name]['key']),
                                  jax.random.key_data(jax.random.fold_in(key, i)))
    assert int(fresh[name]['count']) == 0
  assert not np.array_equal(jax.random.key_data(fresh['a']['key']),
                            jax.random.key_data(fresh['b']['key']))
