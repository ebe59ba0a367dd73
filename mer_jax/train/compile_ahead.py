"""Later stages' programs, compiled in a background thread while earlier stages train.

A stage's train step and eval program depend on the shapes of its batches, not on their values,
and for some stages those shapes are known when the run starts: a student whose teacher's
targets arrive in its batches (teacher_cache) or who does not distil, and stacked fusion (its
inputs are log-probabilities, one per class). For each such stage, `start` builds a runner on the
dev split, with all-zero placeholders where trained stages' outputs will be, and compiles its
programs (StageRunner.compile_programs), one stage after another in training order, in one thread.
The stage's real runner then finds them compiled: the process's train steps, JAX's cache for the
eval program, the initializer cache. XLA compiles outside Python's lock, on a core that the
running stage's small steps leave partly idle.

Not with several processes: every process must launch its computations on the global mesh in the
same order, which a second thread's launches would not keep.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses

import jax

from mer_jax import console
from mer_jax import stages
from mer_jax.train import inference
from mer_jax.train import stacking
from mer_jax.train import stage as stage_lib
from mer_jax.train import teacher_cache


def _distils(stage: str, config) -> bool:
  """Whether `stage` distils from a teacher the run trains before it (as train_stages passes)."""
  run = list(config.train.stages)
  return (stages.distills(stage, config.loss.distill)
          and 'teacher' in run[:run.index(stage)])


def stages_to_compile(ctx: stage_lib.Context) -> list[str]:
  """The run's stages, after its first, whose programs can compile before it trains, less those
  finished in this workdir."""
  config = ctx.config
  out = []
  for stage in list(config.train.stages)[1:]:
    if stage in stages.STUDENT_STAGES:
      known = not _distils(stage, config) or teacher_cache.applies(config)
    else:
      known = stage == 'fusion' and config.model.fusion.input == 'stacked'
    if known and not stage_lib.finished(ctx, stage):
      out.append(stage)
  return out


def start(ctx: stage_lib.Context) -> dict[str, concurrent.futures.Future]:
  """stage -> the future of its compile's seconds (StageRunner.compile_programs), for every stage
  of stages_to_compile; none with several processes."""
  todo = stages_to_compile(ctx) if jax.process_count() == 1 else []
  if not todo:
    return {}
  executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='compile-ahead')
  try:
    return {stage: executor.submit(compile_stage, ctx, stage) for stage in todo}
  finally:
    executor.shutdown(wait=False)


def compile_stage(ctx: stage_lib.Context, stage: str) -> dict[str, float]:
  """Compiles `stage`'s programs for the run's shapes (see the module's docstring); returns
  their lower + compile seconds."""
  config = ctx.config
  dev = (stacking.placeholder_stacked(ctx.data.dev, config) if stage == 'fusion'
         else ctx.data.dev)
  data = dataclasses.replace(ctx.data, train=dev, dev=dev, test=dev)
  ahead = dataclasses.replace(ctx, data=data, records={})
  frozen = {}
  if stage in stages.STUDENT_STAGES and _distils(stage, config):
    # The teacher is not in the student's programs (its targets are in the batch): its
    # structure stands in for the trained one.
    frozen['teacher'] = inference.FrozenModel(
        inference.model_graphdef('teacher', config, ctx.mesh), states=None)
  runner = stage_lib.StageRunner(stage, ahead, frozen)
  if runner.statics.teacher_in_batch:
    runner.teacher_targets = stacking.zero_log_probs(dev, config)
  return runner.compile_programs()


def seconds(futures: dict[str, concurrent.futures.Future], stage: str) -> dict[str, float]:
  """The seconds `stage`'s programs took to compile ahead, waiting for them; {} where they were
  not compiled ahead or failed (said in one line: the stage then compiles when it trains)."""
  future = futures.get(stage)
  if future is None:
    return {}
  try:
    return future.result()
  except Exception as e:  # pylint: disable=broad-except
    console.say('stage %s: compiling ahead failed (%s: %s); it compiles when it trains', stage,
                type(e).__name__, e)
    return {}


def cancel(futures: dict[str, concurrent.futures.Future]) -> None:
  """Drops the compiles not started yet (the run is over, or stopped early); one in progress
  finishes (XLA cannot be interrupted) before the process exits."""
  for future in futures.values():
    future.cancel()
