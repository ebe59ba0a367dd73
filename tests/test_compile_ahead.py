"""Programs compiled ahead (compile_ahead.start, from the start of a run, on placeholder values)
are the ones the stage's runner later runs on the real data."""

import dataclasses

import numpy as np
import pytest

from configs import default
from mer_jax import stages
from mer_jax.data import sources
from mer_jax.run import job
from mer_jax.train import compile_ahead
from mer_jax.train import inference
from mer_jax.train import stacking
from mer_jax.train import stage as stage_lib
from tests._compiles import CompileRequests


@pytest.mark.parametrize('overrides, expected', [
    ({}, ['audio', 'visual', 'fusion']),
    # The teacher runs inside the students' steps: its trained weights are an input of them.
    ({'loss.distill_cached_teacher': False}, ['fusion']),
    ({'loss.distill': False, 'model.fusion.input': 'graph'}, ['audio', 'visual']),
    ({'train.stages': ('teacher', 'visual')}, ['visual']),
])
def test_stages_compiled_ahead_are_those_whose_shapes_are_known(tmp_path, overrides, expected):
  config = default.get_config('tiny')
  config.update_from_flattened_dict(overrides)
  ctx = stage_lib.Context(config=config, workdir=str(tmp_path), mesh=None, data=None,
                          class_weights=None)
  assert compile_ahead.stages_to_compile(ctx) == expected


@pytest.mark.parametrize('stage', ['audio', 'fusion'])
def test_programs_compiled_ahead_are_what_the_runner_runs(tmp_path, stage):
  """A student (its teacher's targets in the batch) and stacked fusion: compiled ahead for the
  dev split with placeholder values, then the stage's runner, on the real data, trains and
  evaluates without compiling its train step or eval program again, and counts the seconds they
  took."""
  config = default.get_config('tiny')
  config.train.epochs = 1
  # Only the stage under test compiles ahead: the teacher inside the students' steps keeps them
  # out (fusion's case); a run of teacher and audio has no other (audio's).
  if stage == 'fusion':
    config.loss.distill_cached_teacher = False
  else:
    config.train.stages = ('teacher', 'audio')
  ctx = job.prepare(config, str(tmp_path))
  ahead = compile_ahead.start(ctx)
  assert list(ahead) == [stage]
  frozen = {}  # untrained encoders: only their outputs' shapes matter here
  for encoder in stages.ENCODER_STAGES:
    graphdef, *states = inference.build_sharded_model(encoder, config, ctx.mesh, seed=0)
    frozen[encoder] = inference.FrozenModel(graphdef, tuple(states))
  data = ctx.data
  if stage == 'fusion':
    def stacked(source):
      return sources.InMemorySource(stacking.stacked_records(
          source, stacking.encoder_log_probs(source, frozen, config, ctx.mesh)))

    dev = stacked(ctx.data.dev)
    data = dataclasses.replace(ctx.data, train=stacked(ctx.data.train), dev=dev, test=dev)
  seconds = compile_ahead.seconds(ahead, stage)
  # (0.0 where an earlier test in this process compiled the same program)
  assert set(seconds) == {'initializer', 'train_step', 'eval_step'}
  assert all(s >= 0 for s in seconds.values()), seconds
  runner = stage_lib.StageRunner(stage, dataclasses.replace(ctx, data=data,
                                                            compiled_ahead=seconds),
                                 {'teacher': frozen['teacher']})
  runner.train_dataset(0)  # a student's teacher predicts its targets (its own program)
  if stage == 'audio':
    assert runner.statics.teacher_in_batch
    assert all(np.isfinite(t).all() and t.any() for t in runner.teacher_targets)
  with CompileRequests() as compiles:
    runner.fit()
  assert not {name for name in compiles.by_name if 'train_step' in name
              or 'predict_program' in name}, compiles.by_name
  own = runner.compile_seconds
  assert own['train_step'] == seconds['train_step'], (own, seconds)
  assert own['initializer'] == seconds['initializer'], (own, seconds)
  assert own['eval_step'] >= seconds['eval_step'], (own, seconds)
