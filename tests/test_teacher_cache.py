"""The frozen teacher's cached distillation targets (train/teacher_cache.py): a student step on
a batch carrying them equals a step that runs the teacher, and the cache is used only where it
cannot differ."""

import dataclasses

import jax
import numpy as np
import pytest

from configs import default
from mer_jax.run import job
from mer_jax.train import stage as stage_lib
from mer_jax.train import inference
from mer_jax.data import pipeline
from mer_jax.train import sharding
from mer_jax.train import teacher_cache

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  config = default.get_config('tiny')
  ctx = job.prepare(config, str(tmp_path_factory.mktemp('cache_workdir')))
  teacher = stage_lib.StageRunner('teacher', ctx, {})
  # A teacher whose predictions differ between utterances: its initial weights, one step on.
  batch = pipeline.make_dataset(ctx.data.train, config=config, budget=teacher.budget, train=True,
                                epoch=0, seed=config.seed)[0]
  sh = sharding.batch_shardings(batch, ctx.mesh, teacher.budget)
  state, _ = teacher.timed_train_step(sh)(teacher.state, sharding.put_batch(batch, sh, teacher.budget),
                                          *teacher.step_inputs)
  frozen = {'teacher': inference.FrozenModel(teacher.graphdef,
                                           (state.params, state.model_state, teacher.rng_state))}
  return config, ctx, frozen


def student_step(ctx, frozen, config, stage):
  """(loss, updated parameters) of the first train step of a fresh `stage` runner."""
  run = stage_lib.StageRunner(stage, _with_config(ctx, config), frozen)
  batch = run.train_dataset(1)[0]
  sh = sharding.batch_shardings(batch, ctx.mesh, run.budget)
  state, metrics = run.timed_train_step(sh)(run.state, sharding.put_batch(batch, sh, run.budget),
                                            *run.step_inputs)
  return run, batch, float(metrics['loss']), jax.device_get(state.params)


def _with_config(ctx, config):
  return dataclasses.replace(ctx, config=config)


@pytest.mark.parametrize('stage', ['audio', 'visual'])
def test_cached_targets_give_the_step_of_the_teacher_run_in_it(setup, stage):
  config, ctx, frozen = setup
  in_step = config.copy_and_resolve_references()
  in_step.loss.distill_cached_teacher = False
  run_c, batch_c, loss_c, params_c = student_step(ctx, frozen, config, stage)
  run_s, batch_s, loss_s, params_s = student_step(ctx, frozen, in_step, stage)
  assert run_c.statics.teacher_in_batch and not run_s.statics.teacher_in_batch
  assert 'teacher' not in run_c.frozen_states and 'teacher' in run_s.frozen_states
  # Same dialogues, same augmentation of the student's modality.
  m = {'audio': 'a', 'visual': 'v'}[stage]
  # A student's batches carry only what it reads: its own modality, and the text for a teacher
  # run in the step or the teacher's targets (and where it read text) for a cached one.
  assert set(batch_c.nodes['features']) == {m}
  assert set(batch_s.nodes['features']) == {'t', m}
  assert 'teacher_log_probs' not in batch_s.nodes
  np.testing.assert_array_equal(batch_c.nodes['features'][m], batch_s.nodes['features'][m])
  np.testing.assert_array_equal(batch_c.nodes['teacher_mask'], batch_s.nodes['present']['t'])
  num_classes = len(config.label_names)
  assert batch_c.nodes['teacher_log_probs'].shape[-1] == num_classes
  # Log-probabilities: each real utterance's row exponentiates to a distribution.
  rows = batch_c.nodes['teacher_log_probs'][batch_c.nodes['mask']]
  np.testing.assert_allclose(np.exp(rows).sum(-1), 1.0, rtol=1e-5)
  assert np.ptp(rows, axis=0).max() > 1e-3  # not one prediction for every utterance
  np.testing.assert_allclose(loss_c, loss_s, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params_c), jax.tree.leaves(params_s)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_the_cache_applies_only_where_the_teacher_cannot_differ():
  config = default.get_config('tiny')
  assert teacher_cache.applies(config)
  for key, value in [('loss.distill_cached_teacher', False), ('loss.distill', False),
                     ('augment.clean_frozen_inputs', False), ('graph.scope', 'batch')]:
    c = config.copy_and_resolve_references()
    group, name = key.split('.')
    c[group][name] = value
    assert not teacher_cache.applies(c), key


def test_the_teacher_stage_and_fusion_never_read_cached_targets(setup):
  config, ctx, _ = setup
  teacher = stage_lib.StageRunner('teacher', ctx, {})
  assert not teacher.statics.teacher_in_batch
  assert teacher.modalities == ('t',)
  assert 'teacher_log_probs' not in teacher.train_dataset(0)[0].nodes
  graph = config.copy_and_resolve_references()
  graph.model.fusion.input = 'graph'
  encoders = {}  # fusion on graph inputs runs every frozen encoder in its step
  for stage in ('teacher', 'audio', 'visual'):
    run = stage_lib.StageRunner(stage, _with_config(ctx, graph), encoders)
    encoders[stage] = inference.FrozenModel(run.graphdef, (run.state.params, run.state.model_state,
                                                         run.rng_state))
  fusion = stage_lib.StageRunner('fusion', _with_config(ctx, graph), encoders)
  assert not fusion.statics.teacher_in_batch
  assert fusion.modalities == tuple(graph.data.modalities)
  assert 'teacher_log_probs' not in fusion.train_dataset(0)[0].nodes
  assert set(fusion.frozen_states) == {'teacher', 'audio', 'visual'}
