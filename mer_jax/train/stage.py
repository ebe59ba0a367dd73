"""One training stage: its sharded model, optimizer and jitted steps, and the epoch loop.

Each stage trains with early stopping on dev weighted F1 and reduce-on-plateau, checkpoints every
epoch (and every `train.checkpoint_every_steps` steps, with the data iterator), keeps its best
evaluation weights, and is not trained again once finished: rerunning a workdir resumes it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import threading
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from mer_jax import console
from mer_jax import errors
from mer_jax import models
from mer_jax import stages
from mer_jax.data import pipeline
from mer_jax.data import sources
from mer_jax.train import checkpointing
from mer_jax.train import compile_timing
from mer_jax.train import distributed
from mer_jax.train import fingerprints
from mer_jax.train import inference
from mer_jax.train import optim
from mer_jax.train import preemption
from mer_jax.train import shared_stages
from mer_jax.train import sharding
from mer_jax.train import steps
from mer_jax.train import teacher_cache
from mer_jax.train.inference import FrozenModel
from mer_jax.train.metrics_writer import MetricsWriter


# Train steps compiled in this process, by everything that determines their program. A stage's
# cross-fitting folds have the stage's config, model, mesh and batch layout (their data and
# schedule length are runtime arguments), so they run the stage's compiled step.
_TRAIN_STEPS: collections.OrderedDict = collections.OrderedDict()
_TRAIN_STEPS_KEPT = 8
_TRAIN_STEPS_LOCK = threading.Lock()  # StageRunner.compile_programs may run in another thread


def _shared_train_step(key, build) -> tuple[compile_timing.TimedCompile, bool]:
  """(the step for `key`, whether `build` made it now); `build` makes an uncompiled one."""
  with _TRAIN_STEPS_LOCK:
    step = _TRAIN_STEPS.pop(key, None)
    built = step is None
    if built:
      step = build()
    _TRAIN_STEPS[key] = step
    while len(_TRAIN_STEPS) > _TRAIN_STEPS_KEPT:
      _TRAIN_STEPS.popitem(last=False)
  return step, built


class NonFiniteLoss(errors.UserError, FloatingPointError):
  """Training diverged: the message names the stage, step and batch."""


@dataclasses.dataclass
class Context:
  """What every stage of a run shares: its config, workdir, mesh, splits and class weights."""
  config: Any
  workdir: str
  mesh: Any
  data: sources.SplitSources
  class_weights: jax.Array
  # What determines each stage (fingerprints.plan), recorded beside its checkpoints; empty in
  # the benchmark, which trains throwaway stages.
  records: dict[str, fingerprints.StageRecord] = dataclasses.field(default_factory=dict)
  # Lower + compile seconds of the programs of the stage this context is for, where they were
  # compiled ahead of its runner (StageRunner.compile_programs, by train/compile_ahead.py).
  compiled_ahead: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class LoopState:
  """The epoch loop's counters, saved with every checkpoint (as the dict `asdict` gives). Epochs
  are numbered from 1 (epoch 1 is the first), in `best_epoch` and `history` as in results.json."""
  epoch: int = 0  # epochs completed
  best_f1: float = -1.0
  best_epoch: int = 0  # 0 before the first evaluation
  bad_epochs: int = 0  # since the best (early stopping)
  plateau_epochs: int = 0  # since the best or the last lr reduction (reduce-on-plateau)
  history: list = dataclasses.field(default_factory=list)
  first_epoch: int = 1  # how `best_epoch` and `history` number epochs (checkpoints before: 0)

  @classmethod
  def from_meta(cls, loop: dict) -> 'LoopState':
    if 'first_epoch' not in loop:  # saved when epochs were numbered from 0
      loop = dict(loop, first_epoch=1, best_epoch=loop['best_epoch'] + 1,
                  history=[dict(h, epoch=h['epoch'] + 1) for h in loop['history']])
    return cls(**loop)


def jsonable(x):
  """`x` with numpy values as lists and other non-JSON values as strings."""
  return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, 'tolist') else str(o)))


def augmented_modalities(stage: str, config) -> tuple[str, ...]:
  """The modalities a stage's training batches augment.

  An encoder stage with `augment.clean_frozen_inputs` augments only its own modality, so the
  frozen teacher's distillation targets are its predictions on the stored text; otherwise (the
  authors') every loaded modality is augmented, the teacher's text included. Fusion augments every
  modality, except stacked fusion: its inputs are log-probabilities, not features.
  """
  if config.augment.clean_frozen_inputs and stages.is_encoder(stage):
    return (stages.MODALITY_OF_STAGE[stage],)
  if stage == 'fusion' and config.model.fusion.input == 'stacked':
    return ()
  return tuple(config.data.modalities)


def batch_modalities(stage: str, statics: steps.StageStatics, config) -> tuple[str, ...]:
  """The modalities a stage's training step reads: an encoder's own, and the text for a student
  whose teacher runs in the step; fusion, all."""
  if not stages.is_encoder(stage):
    return tuple(config.data.modalities)
  read = {stages.MODALITY_OF_STAGE[stage]}
  if statics.distill and not statics.teacher_in_batch:
    read.add('t')
  return tuple(m for m in config.data.modalities if m in read)


def finished(ctx: Context, name: str, directory: str = '') -> bool:
  """Whether stage `name` (its checkpoint folder) has finished training in this run's
  checkpoints (`directory`, default checkpointing.checkpoint_dir)."""
  directory = directory or checkpointing.checkpoint_dir(ctx.config, ctx.workdir)
  ckpt = checkpointing.StageCheckpoints(ctx.workdir, name, read_only=True, directory=directory)
  try:
    meta = ckpt.latest_meta() if os.path.isdir(os.path.join(ckpt.root, 'latest')) else None
  finally:
    ckpt.close()
  return bool(meta and meta.get('finished'))


class StageRunner:
  """One stage: its sharded model, optimizer and jitted steps, and the epoch loop (`fit`)."""

  def __init__(self, stage: str, ctx: Context, frozen: dict[str, FrozenModel],
               name: str | None = None, fold: int | None = None):
    """`name` is the checkpoint folder (default: the stage); `fold` is the cross-fitting fold
    whose held-out dialogues ctx.data.train lacks (None: all of them)."""
    config = ctx.config
    self.stage, self.ctx, self.config = stage, ctx, config
    self.name = name or stage
    self.scfg = scfg = config.optim[stage]
    self.budget = sharding.batch_budget(config, ctx.mesh)
    self.seed = stages.seed_of(stage, config.seed)
    self.graphdef, params, batch_stats, self.rng_state, self._init_seconds = (
        inference.build_sharded_model_timed(stage, config, ctx.mesh, self.seed))
    distill = stages.distills(stage, config.loss.distill) and 'teacher' in frozen
    self.statics = steps.StageStatics(
        stage=stage, modalities=tuple(config.data.modalities),
        fusion_input=config.model.fusion.input, loss=config.loss, distill=distill,
        ema_decay=float(scfg.ema_decay),
        teacher_in_batch=distill and teacher_cache.applies(config))
    self.augmented = augmented_modalities(stage, config)
    self.modalities = batch_modalities(stage, self.statics, config)
    self.dims = inference.batch_dims(stage, config)
    in_step = stages.frozen_in_step(stage, distill=distill, fusion_input=self.statics.fusion_input,
                                    modalities=self.statics.modalities,
                                    teacher_in_batch=self.statics.teacher_in_batch)
    # The frozen models this runner uses: those its steps run, and the teacher whose targets it
    # caches. (Stacked fusion's encoders have already made its inputs.)
    needed = in_step + (('teacher',) if self.statics.teacher_in_batch else ())
    missing = [n for n in needed if n not in frozen]
    if missing:
      raise ValueError(f'stage {stage!r} needs the trained {missing} stage(s); add them to '
                       f'config.train.stages before {stage!r}')
    self.frozen_states = {n: frozen[n].states for n in in_step}
    self.frozen_graphdefs = {n: frozen[n].graphdef for n in in_step}
    self._teacher = frozen['teacher'] if self.statics.teacher_in_batch else None
    # The frozen teacher's log-probabilities per training record (with its targets in the
    # batch): predicted on the first train_dataset call unless set before.
    self.teacher_targets = None
    self.fingerprint = None
    deps = {n: frozen[n].fingerprint for n in needed}
    if (config.train.shared_stages_dir and stages.is_encoder(stage)
        and None not in deps.values()):
      self.fingerprint = shared_stages.fingerprint(
          config, stage, fingerprints.data_identity(ctx.data.shard_dir, config), deps, fold=fold)

    self.plan_lengths = [
        len(pipeline.make_dataset(ctx.data.train, config=config, budget=self.budget, train=True,
                                  epoch=e, seed=config.seed))
        for e in range(config.train.epochs)]
    total_updates = max(1, sum(self.plan_lengths) // max(1, scfg.grad_accum_steps))
    group_of = models.param_group if stage == 'fusion' else None
    self.tx = optim.make_optimizer(scfg, params, group_of=group_of)
    self._grouped = group_of is not None
    self._host_schedule_steps = optim.schedule_steps(scfg, total_updates)
    # A runtime argument of the step (not a constant in it), so folds share the stage's program.
    self.schedule_steps = jax.device_put(self._host_schedule_steps,
                                         sharding.replicated(ctx.mesh))

    def init_state(params, batch_stats):
      return steps.TrainState(
          step=jnp.zeros((), jnp.int32), params=params, model_state=batch_stats,
          opt_state=self.tx.init(params),
          ema_params=jax.tree.map(jnp.copy, params) if scfg.ema_decay > 0 else None,
          lr_scale=jnp.ones((), jnp.float32), rng=jax.random.PRNGKey(self.seed))

    self.state = jax.jit(init_state)(params, batch_stats)
    self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
    # The eval step is the program that predicts with the trained stage later (shared with it).
    static, self.eval_frozen_states = inference.predict_program_args(
        stage, self.graphdef, config, frozen)
    self.predict_fn = inference.timed_predict_program(static, config)
    self.loop = LoopState()
    self.logdir = os.path.join(ctx.workdir, 'tensorboard', self.name)
    self.best_step = None  # of the best checkpoint, once fit has restored it
    # (step, params, batch statistics) of the best checkpoint this process saved: fit returns
    # them instead of reading them back.
    self._best_saved = None
    self.was_finished = False  # fit found the stage finished by an earlier run
    self._train_step = self._batch_sh = self._train_step_seconds = None

  @property
  def compile_seconds(self) -> dict[str, float | None]:
    """Lowering + compilation seconds of the model initializer and the train and eval steps
    (0.0: this process had compiled them for a model of the same structure, e.g. a stacking
    fold's; None: not run here, e.g. the steps of a finished stage restored). Programs compiled
    ahead for this stage (`Context.compiled_ahead`) add the seconds they took there."""
    own = {'initializer': self._init_seconds, 'train_step': self._train_step_seconds,
           'eval_step': self.predict_fn.seconds}
    return {k: v if v is None else v + self.ctx.compiled_ahead.get(k, 0.0)
            for k, v in own.items()}

  def compile_programs(self) -> dict[str, float]:
    """Compiles this stage's train step and eval program (the initializer compiled when the
    runner was built) for its first training and dev batches, without running them, and returns
    their lower + compile seconds. A runner of the same structure built later in this process
    (same config, mesh and batch layout; its data may differ) then finds them compiled."""
    batch = self.train_dataset(0)[0]
    self._use_train_step(batch)
    self._train_step.compile(self.state, sharding.put_batch(batch, self._batch_sh, self.budget),
                             *self.step_inputs)
    dev = pipeline.make_dataset(self.ctx.data.dev, config=self.config, budget=self.budget,
                                train=False, epoch=0, seed=self.config.seed, dims=self.dims)[0]
    self.predict_fn.compile(
        self.state.params, self.state.model_state, self.rng_state,
        sharding.put_batch(dev, sharding.batch_shardings(dev, self.ctx.mesh, self.budget),
                           self.budget), self.eval_frozen_states)
    return {'initializer': self._init_seconds, 'train_step': self._train_step.seconds,
            'eval_step': self.predict_fn.seconds}

  def _use_train_step(self, batch) -> bool:
    """Takes the process's train step for batches laid out as `batch` (`_shared_train_step`);
    returns whether it was made now."""
    self._batch_sh = sharding.batch_shardings(batch, self.ctx.mesh, self.budget)
    self._train_step, built = _shared_train_step(
        self._program_key(batch),
        lambda: self.timed_train_step(self._batch_sh))
    return built

  def timed_train_step(self, batch_shardings) -> compile_timing.TimedCompile:
    """The train step as training compiles and runs it: `jitted_train_step`, compiled on its
    first call with the stage's compiler options (train.cpu_fast_compile)."""
    return compile_timing.TimedCompile(self.jitted_train_step(batch_shardings),
                                       fast_compile=self.config.train.cpu_fast_compile)

  @property
  def step_inputs(self) -> tuple:
    """The train step's arguments after (state, batch): frozen states, class weights, schedule."""
    return self.frozen_states, self.ctx.class_weights, self.schedule_steps

  def jitted_train_step(self, batch_shardings):
    rep = sharding.replicated(self.ctx.mesh)
    fn = functools.partial(
        steps.train_step, graphdef=self.graphdef, rng_state=self.rng_state,
        frozen_graphdefs=self.frozen_graphdefs, tx=self.tx, statics=self.statics)
    frozen_sh = jax.tree.map(lambda x: x.sharding, self.frozen_states)
    return jax.jit(fn, in_shardings=(self.state_shardings, batch_shardings, frozen_sh, rep, rep),
                   out_shardings=(self.state_shardings, rep), donate_argnums=(0,))

  def _program_key(self, batch) -> tuple:
    """What determines the train step's program besides the runtime arguments: the settings the
    stage trains with (fingerprints.stage_settings, which names the stage; not paths, logging or
    other stages' models), the frozen models, the mesh, the batch's layout and shapes. Runs in one process
    that differ elsewhere (a sweep's variants' encoders) share the step."""
    leaves, layout = jax.tree.flatten(batch)
    shapes = tuple((np.shape(x), np.asarray(x).dtype.str) for x in leaves)
    settings = json.dumps(fingerprints.stage_settings(self.config, self.stage), sort_keys=True,
                          default=str)
    return (settings, self.config.train.cpu_fast_compile, self.ctx.mesh, layout,
            shapes, tuple(jax.tree.leaves(self._batch_sh)), self.statics.distill,
            self.statics.teacher_in_batch, tuple(sorted(self.frozen_graphdefs.items())))

  def learning_rates(self, micro_steps: int, lr_scale: float) -> dict[str, float]:
    """The absolute learning rate of each parameter group after `micro_steps` train steps."""
    return optim.learning_rates(self.scfg, micro_steps, self._host_schedule_steps, lr_scale,
                                grouped=self._grouped)

  def log_test(self, metrics: dict) -> None:
    """The test metrics of the stage's best weights, at the best checkpoint's step."""
    writer = MetricsWriter(self.logdir)
    try:
      writer.scalars(self.best_step or 0, {f'test/{k}': metrics[k]
                                           for k in ('weighted_f1', 'macro_f1', 'accuracy')})
    finally:
      writer.close()

  def train_dataset(self, epoch: int) -> grain.MapDataset:
    """The training batches of `epoch`: only the modalities the step reads, and, with the
    teacher's targets cached, those targets (the frozen teacher predicts them on the first call).
    """
    if self.statics.teacher_in_batch and self.teacher_targets is None:
      console.say('stage %s: the frozen teacher predicts its %d training dialogues once',
                  self.name, len(self.ctx.data.train))
      self.teacher_targets = teacher_cache.teacher_log_probs(
          self.ctx.data.train, self._teacher, self.config, self.ctx.mesh)
    return pipeline.make_dataset(
        self.ctx.data.train, config=self.config, budget=self.budget, train=True, epoch=epoch,
        seed=self.config.seed, modalities=self.modalities, dims=self.dims,
        augmented=self.augmented, teacher_log_probs=self.teacher_targets)

  def evaluate(self, source, params, batch_stats) -> dict:
    first = self.predict_fn.seconds is None
    pred = inference.predict_split(
        source, self.config, self.budget,
        lambda b: self.predict_fn(params, batch_stats, self.rng_state, b, self.eval_frozen_states),
        self.ctx.mesh,
        dims=self.dims)
    if first:
      console.say('stage %s: eval step lowered and compiled in %.1f s', self.name,
                  self.compile_seconds['eval_step'])
    return inference.split_metrics(pred, self.config.label_names)

  def fit(self) -> FrozenModel:
    """Trains (or resumes, or skips if finished) and returns the best evaluation weights.

    With `train.shared_stages_dir`, a stage another run has finished with the same fingerprint
    is linked in instead of trained, and a stage trained here is shared when finished.
    """
    directory = checkpointing.checkpoint_dir(self.config, self.ctx.workdir)
    if self.fingerprint is None or finished(self.ctx, self.name, directory):
      return self._fit(directory)
    store = shared_stages.SharedStages(self.config.train.shared_stages_dir)
    stage_dir = os.path.join(directory, self.name)
    if not store.acquire(self.fingerprint):
      console.say('stage %s: reusing %s', self.name, store.path(self.fingerprint))
      store.link(self.fingerprint, stage_dir)
      return self._fit(directory)
    try:
      model = self._fit(directory)
      store.publish(self.fingerprint, stage_dir)
    finally:
      store.release(self.fingerprint)
    return model

  def _fit(self, directory: str) -> FrozenModel:
    record = self.ctx.records.get(self.name)
    if record is not None and distributed.is_main_process():
      if fingerprints.read_record(directory, self.name) != record.to_json():
        fingerprints.write_record(directory, record)
    ckpt = checkpointing.StageCheckpoints(
        self.ctx.workdir, self.name, keep=self.config.train.checkpoint_keep, directory=directory,
        async_saves=True)
    try:
      meta = ckpt.latest_meta()
      if meta is not None and meta.get('finished'):
        console.say('stage %s: already finished in %s; restoring its best weights', self.name,
                    ckpt.root)
        self.loop = LoopState.from_meta(meta['loop'])
        self.was_finished = True
      else:
        self._train(ckpt, meta)
      if self._best_saved is not None:
        self.best_step, params, batch_stats = self._best_saved
      else:
        params, batch_stats, _ = ckpt.restore_best(self.state.params, self.state.model_state)
        self.best_step = ckpt.best_step()
    finally:
      ckpt.close()
    return FrozenModel(self.graphdef, (params, batch_stats, self.rng_state), self.fingerprint)

  def _train(self, ckpt: checkpointing.StageCheckpoints, meta: dict | None) -> None:
    """The epoch loop, from the start or from the latest checkpoint (`meta` not None)."""
    state, loop = self.state, LoopState()
    data_state = {'epoch': 0, 'iterator': None}
    if meta is not None:
      state, data_state, meta = ckpt.restore_latest(state)
      loop = LoopState.from_meta(meta['loop'])
      console.say('stage %s: resuming at epoch %d, step %d', self.stage, data_state['epoch'] + 1,
                  int(state.step))
    writer = MetricsWriter(self.logdir)
    try:
      writer.text(int(state.step), 'config', str(self.config))
      writer.hparams(int(state.step), _flat(fingerprints.stage_settings(self.config, self.stage)))
      epoch, stop = data_state['epoch'], False
      while epoch < self.config.train.epochs and not stop:
        started = time.time()
        iterator = data_state['iterator'] if data_state['epoch'] == epoch else None
        state = self._train_epoch(state, epoch, iterator, loop, ckpt, writer)
        state, stop = self._end_epoch(state, epoch, loop, ckpt, writer, started)
        epoch += 1
    finally:
      writer.close()
    self.state, self.loop = state, loop

  def _train_epoch(self, state, epoch: int, iterator_state, loop: LoopState,
                   ckpt: checkpointing.StageCheckpoints, writer: MetricsWriter):
    """One epoch of train steps (resumed at `iterator_state` when given); checkpoints every
    `train.checkpoint_every_steps` steps and on preemption."""
    config = self.config
    ds = self.train_dataset(epoch)
    it = iter(ds.to_iter_dataset(grain.ReadOptions(
        num_threads=config.data.read_threads, prefetch_buffer_size=config.data.prefetch)))
    if iterator_state is not None:
      it.set_state(iterator_state)
    pending: list[dict] = []
    host_step = int(state.step)  # tracked on the host so the loop never waits on the device
    epoch_first_step = sum(self.plan_lengths[:epoch])
    bar = tqdm(total=len(ds), desc=f'{self.name} epoch {epoch + 1}/{config.train.epochs}',
               disable=not config.train.progress_bar, leave=False)
    bar.update(host_step - epoch_first_step)
    try:
      for batch in it:
        first = self._train_step is None
        if first:  # one compiled step for every epoch (and for the stage's folds)
          built = self._use_train_step(batch)
        state, metrics = self._train_step(
            state, sharding.put_batch(batch, self._batch_sh, self.budget), *self.step_inputs)
        if first:
          self._train_step_seconds = self._train_step.seconds if built else 0.0
          seconds = self.compile_seconds
          console.say('stage %s: train step lowered and compiled in %.1f s (model initializer: '
                      '%.1f s)%s', self.name, seconds['train_step'], seconds['initializer'],
                      ', ahead of the stage' if self.ctx.compiled_ahead else '')
        host_step += 1
        pending.append(metrics)
        bar.update(1)
        if len(pending) >= config.train.log_every_steps:
          _log_train(pending, host_step, self.stage, writer, bar, epoch, epoch_first_step,
                     self.learning_rates)
          pending = []
        every = config.train.checkpoint_every_steps
        preempted = preemption.should_stop(host_step)
        if preempted or (every and host_step % every == 0):
          ckpt.save_latest(host_step, state, {'epoch': epoch, 'iterator': it.get_state()},
                           jsonable({'loop': dataclasses.asdict(loop), 'finished': False,
                                     'stage': self.stage}))
        if preempted:
          raise preemption.Preempted.at(f'stage {self.name}', host_step, epoch, ckpt.root)
    finally:
      bar.close()
    if pending:
      _log_train(pending, host_step, self.stage, writer, None, epoch, epoch_first_step,
                 self.learning_rates)
    return state

  def _end_epoch(self, state, epoch: int, loop: LoopState, ckpt: checkpointing.StageCheckpoints,
                 writer: MetricsWriter, started: float):
    """Dev evaluation, best checkpoint, reduce-on-plateau, early stopping and the epoch's
    checkpoint; returns (state, whether to stop)."""
    config, scfg = self.config, self.scfg
    host_step = int(state.step)
    eval_params = state.ema_params if state.ema_params is not None else state.params
    dev = self.evaluate(self.ctx.data.dev, eval_params, state.model_state)
    f1 = float(dev['weighted_f1'])
    writer.scalars(host_step, {'dev/weighted_f1': f1, 'dev/macro_f1': dev['macro_f1'],
                               'dev/accuracy': dev['accuracy'],
                               'train/param_norm': float(_tree_norm(state.params))})
    stop = False
    if f1 > loop.best_f1 + config.train.early_stopping_min_delta:
      loop.best_f1, loop.best_epoch, loop.bad_epochs, loop.plateau_epochs = f1, epoch + 1, 0, 0
      ckpt.save_best(host_step, eval_params, state.model_state,
                     jsonable({'stage': self.stage, 'epoch': epoch + 1, 'dev': dev,
                               'label_names': list(config.label_names),
                               'config': config.to_dict()}))
      # Copies: the next train step donates the state's buffers.
      self._best_saved = (host_step, *_copy_tree((eval_params, state.model_state)))
    else:
      loop.bad_epochs += 1
      loop.plateau_epochs += 1
      if loop.plateau_epochs >= scfg.lr_reduce_patience:
        loop.plateau_epochs = 0
        state = state.replace(lr_scale=state.lr_scale * scfg.lr_reduce_factor)
        console.say('stage %s: dev F1 plateaued; lr scale -> %.4g', self.stage,
                    float(state.lr_scale))
      stop = loop.bad_epochs >= scfg.early_stopping_patience
    loop.history.append({'epoch': epoch + 1, 'dev_weighted_f1': f1,
                         'seconds': time.time() - started})
    console.say('stage %s epoch %d: dev weighted F1 %.2f (best %.2f at epoch %d)%s', self.name,
                epoch + 1, 100 * f1, 100 * loop.best_f1, loop.best_epoch,
                ' - early stop' if stop else '')
    loop.epoch = epoch + 1
    ckpt.save_latest(host_step, state, {'epoch': epoch + 1, 'iterator': None},
                     jsonable({'loop': dataclasses.asdict(loop),
                               'finished': stop or epoch + 1 >= config.train.epochs,
                               'stage': self.stage}))
    return state, stop


_tree_norm = jax.jit(optax.tree.norm)
# One program per tree structure (eager copies would compile one per array shape).
_copy_tree = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def _flat(tree: dict, prefix: str = '') -> dict[str, Any]:
  """A nested dict as {'a.b.c': leaf}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _log_train(pending: list[dict], step: int, stage: str, writer: MetricsWriter, bar,
               epoch: int, epoch_first_step: int, learning_rates) -> None:
  """Fetches the metrics of the last steps (one host sync) and stops on NaN/Inf; logs them with
  the learning rate of each parameter group (`learning_rates(step, lr_scale)`).

  `epoch_first_step` is the global step count before the epoch began, so the message can name the
  batch within the epoch (with the epoch's seeded order, that batch can be rebuilt).
  """
  fetched = jax.device_get(pending)
  mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
  losses_seen = np.array([m['loss'] for m in fetched])
  if not np.all(np.isfinite(losses_seen)):
    first = int(np.flatnonzero(~np.isfinite(losses_seen))[0])
    bad_step = step - len(fetched) + first + 1
    raise NonFiniteLoss(
        f'stage {stage}: non-finite loss at step {bad_step} (epoch {epoch + 1}, batch '
        f'{bad_step - epoch_first_step} of the epoch; grad norm {fetched[first]["grad_norm"]}); '
        f'stopping. Lower the learning rate or check the input features.')
  lrs = learning_rates(step, mean['lr_scale'])
  writer.scalars(step, {**{f'train/{k}': v for k, v in mean.items()},
                        **{f'train/lr/{group}': lr for group, lr in lrs.items()}})
  if bar is not None:
    bar.set_postfix(loss=f'{mean["loss"]:.4f}', acc=f'{mean["accuracy"]:.3f}')
