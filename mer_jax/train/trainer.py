"""Stage loops: teacher -> students (distilled from the frozen teacher) -> fusion.

`train_and_evaluate(config, workdir)` is the whole job. Each stage trains with early stopping on
dev weighted F1 and reduce-on-plateau, checkpoints every epoch (resumable), keeps its best
evaluation weights, and writes a test report. A finished stage is not trained again: rerunning a
workdir resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mer_jax import console
from flax import nnx
from tqdm import tqdm

from mer_jax import config_validation
from mer_jax import evaluate
from mer_jax import losses
from mer_jax import models
from mer_jax.data import pipeline
from mer_jax.data import sources
from mer_jax.train import checkpointing
from mer_jax.train import distributed
from mer_jax.train import optim
from mer_jax.train import preemption
from mer_jax.train import shared_stages
from mer_jax.train import sharding
from mer_jax.train import steps
from mer_jax.train import teacher_cache
from mer_jax.train.metrics_writer import MetricsWriter

STAGE_TO_MODALITY = steps.MODALITY_OF_STAGE
ENCODER_STAGES = ('teacher', 'audio', 'visual')


@dataclasses.dataclass
class FrozenModel:
  """A trained stage ready for inference: graphdef + (params, batch_stats, rng_state).

  `fingerprint` names it in `train.shared_stages_dir` (None when it is not shared).
  """
  graphdef: Any
  states: tuple[Any, Any, Any]
  fingerprint: str | None = None


@dataclasses.dataclass
class Context:
  config: Any
  workdir: str
  mesh: Any
  data: sources.SplitSources
  class_weights: jax.Array


# ------------------------------------------------------------------------------------------
# Model construction, sharded from the start.
# ------------------------------------------------------------------------------------------

def stage_in_dims(stage: str, config) -> dict[str, int]:
  dims = dict(config.data.dims)
  if stage in STAGE_TO_MODALITY:
    m = STAGE_TO_MODALITY[stage]
    return {m: dims[m]}
  if config.model.fusion.input == 'raw':
    return {m: dims[m] for m in config.data.modalities}
  return {m: models.representation_dim(steps.ENCODER_OF_MODALITY[m], config)
          for m in config.data.modalities}


def build_sharded_model(stage: str, config, mesh, seed: int):
  """(graphdef, params, batch_stats, rng_state), created directly in their sharded layout."""
  num_classes = len(config.label_names)
  in_dims = stage_in_dims(stage, config)

  def create():
    model = models.build_model(stage, config, in_dims=in_dims, num_classes=num_classes,
                               rngs=nnx.Rngs(seed))
    return nnx.split(model, nnx.Param, nnx.BatchStat, ...)

  graphdef, *abstract = nnx.eval_shape(create)
  shardings = [nnx.to_pure_dict(sharding.state_shardings(a, mesh, config.mesh.rules))
               for a in abstract]

  # Plain nested dicts of arrays, not nnx.State: every jitted call flattens its arguments, and
  # JAX flattens dicts in C++ but calls back into Python for each nnx Variable (the fusion
  # stage's train state, 927 arrays, took about 9 ms a step to flatten and rebuild on this CPU).
  # nnx.merge takes the dicts as they are.
  @functools.partial(jax.jit, out_shardings=tuple(shardings))
  def init():
    return tuple(nnx.to_pure_dict(s) for s in create()[1:])

  params, batch_stats, rng_state = init()
  return graphdef, params, batch_stats, rng_state


# ------------------------------------------------------------------------------------------
# Evaluation over a split.
# ------------------------------------------------------------------------------------------

def predict_split(source, config, budget, predict_fn, mesh, desc: str = 'eval',
                  progress: bool = False) -> dict[str, np.ndarray]:
  """Runs `predict_fn(batch) -> probs` over a split in order; returns per-utterance arrays."""
  ds = pipeline.make_dataset(source, config=config, budget=budget, train=False, epoch=0,
                             seed=config.seed)
  probs, labels, records, utterances = [], [], [], []
  batch_sh = None
  for batch in tqdm(ds, desc=desc, leave=False, disable=not progress):
    if batch_sh is None:
      batch_sh = sharding.batch_shardings(batch, mesh, budget)
    global_batch = sharding.put_batch(batch, batch_sh, budget)
    p = distributed.global_to_host(predict_fn(global_batch))
    nodes = batch.nodes
    if budget.groups > 1:  # this host has only its own groups' nodes: gather everyone's ids
      nodes = {k: distributed.global_to_host(global_batch.nodes[k])
               for k in ('mask', 'label', 'record', 'utterance')}
    mask = nodes['mask']
    probs.append(p[mask])
    labels.append(nodes['label'][mask])
    records.append(nodes['record'][mask])
    utterances.append(nodes['utterance'][mask])
  return {'probs': np.concatenate(probs), 'labels': np.concatenate(labels),
          'records': np.concatenate(records), 'utterances': np.concatenate(utterances)}


def per_record_outputs(pred: dict[str, np.ndarray], source, key: str = 'probs') -> list[np.ndarray]:
  """Regroups predict_split's per-utterance rows into one [n_utterances, ...] array per record."""
  out = [None] * len(source)
  lengths = np.asarray(source.dialogue_lengths)
  for r in range(len(source)):
    out[r] = np.zeros((int(lengths[r]),) + pred[key].shape[1:], pred[key].dtype)
  positions = {}
  for r in range(len(source)):
    for pos, uid in enumerate(source[r].utterance_ids.tolist()):
      positions[(r, uid)] = pos
  for row, r, u in zip(pred[key], pred['records'], pred['utterances']):
    out[int(r)][positions[(int(r), int(u))]] = row
  return out


def record_predictions(source, stage: str, model: FrozenModel, config, mesh,
                       frozen: dict[str, FrozenModel] | None = None,
                       log_probs: bool = False) -> list[np.ndarray]:
  """A frozen stage's class probabilities (or log-probabilities), one [n, C] array per record of
  `source`, in eval mode."""
  fn = stage_predict_fn(stage, model, config, frozen or {}, log_probs=log_probs)
  pred = predict_split(source, config, sharding.batch_budget(config, mesh), fn, mesh)
  return per_record_outputs(pred, source, 'probs')


def split_metrics(pred: dict[str, np.ndarray], label_names) -> dict:
  return evaluate.classification_metrics(pred['labels'], pred['probs'].argmax(-1), label_names)


# ------------------------------------------------------------------------------------------
# One stage.
# ------------------------------------------------------------------------------------------

def _jsonable(x):
  return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, 'tolist') else str(o)))


class StageRunner:
  """One stage: its sharded model, optimizer and jitted steps, and the epoch loop (`fit`)."""

  def __init__(self, stage: str, ctx: Context, frozen: dict[str, FrozenModel],
               name: str | None = None, meta_config=None, fold: int | None = None):
    """`name` is the checkpoint folder (default: the stage); `meta_config` is saved with the best
    checkpoint for prediction (default: ctx.config); `fold` is the cross-fitting fold whose
    held-out dialogues ctx.data.train lacks (None: all of them)."""
    config = ctx.config
    self.stage, self.ctx, self.config = stage, ctx, config
    self.name = name or stage
    self.meta_config = meta_config if meta_config is not None else config
    self.scfg = scfg = config.optim[stage]
    self.budget = sharding.batch_budget(config, ctx.mesh)
    self.seed = config.seed + {'teacher': 0, 'audio': 1, 'visual': 2, 'fusion': 3}[stage]
    self.graphdef, params, batch_stats, self.rng_state = build_sharded_model(
        stage, config, ctx.mesh, self.seed)
    distill = bool(config.loss.distill) and 'teacher' in frozen and stage in ('audio', 'visual')
    self.statics = steps.StageStatics(
        stage=stage, modalities=tuple(config.data.modalities),
        fusion_input=config.model.fusion.input, loss=config.loss, distill=distill,
        ema_decay=float(scfg.ema_decay),
        teacher_in_batch=distill and teacher_cache.applies(config))
    self.augmented = augmented_modalities(stage, config)
    needed = _frozen_needed(stage, self.statics, config)
    missing = [n for n in needed if n not in frozen]
    if missing:
      raise ValueError(f'stage {stage!r} needs the trained {missing} stage(s); add them to '
                       f'config.train.stages before {stage!r}')
    # The frozen models the step runs (the cached teacher's targets come with the batch).
    in_step = [n for n in needed if not (n == 'teacher' and self.statics.teacher_in_batch)]
    self.frozen_states = {n: frozen[n].states for n in in_step}
    self.frozen_graphdefs = {n: frozen[n].graphdef for n in in_step}
    self._teacher = frozen['teacher'] if self.statics.teacher_in_batch else None
    self._training_data = None
    self.fingerprint = None
    deps = {n: frozen[n].fingerprint for n in needed}
    if (config.train.shared_stages_dir and stage in shared_stages.ENCODER_MODALITY
        and None not in deps.values()):
      self.fingerprint = shared_stages.fingerprint(
          config, stage, shared_stages.data_identity(ctx.data.shard_dir, config), deps, fold=fold)

    self.plan_lengths = [
        len(pipeline.make_dataset(ctx.data.train, config=config, budget=self.budget, train=True,
                                  epoch=e, seed=config.seed))
        for e in range(config.train.epochs)]
    total_updates = max(1, sum(self.plan_lengths) // max(1, scfg.grad_accum_steps))
    self.tx = optim.make_optimizer(scfg, params, total_updates,
                                   group_of=models.param_group if stage == 'fusion' else None)

    def init_state(params, batch_stats):
      return steps.TrainState(
          step=jnp.zeros((), jnp.int32), params=params, model_state=batch_stats,
          opt_state=self.tx.init(params),
          ema_params=jax.tree.map(jnp.copy, params) if scfg.ema_decay > 0 else None,
          lr_scale=jnp.ones((), jnp.float32), rng=jax.random.PRNGKey(self.seed))

    self.state = jax.jit(init_state)(params, batch_stats)
    self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
    self.predict_fn = jax.jit(functools.partial(
        steps.predict_step, graphdef=self.graphdef, rng_state=self.rng_state,
        frozen_graphdefs=self.frozen_graphdefs, statics=self.statics))

  def jitted_train_step(self, batch_shardings):
    rep = sharding.replicated(self.ctx.mesh)
    fn = functools.partial(
        steps.train_step, graphdef=self.graphdef, rng_state=self.rng_state,
        frozen_graphdefs=self.frozen_graphdefs, tx=self.tx, statics=self.statics)
    frozen_sh = jax.tree.map(lambda x: x.sharding, self.frozen_states)
    return jax.jit(fn, in_shardings=(self.state_shardings, batch_shardings, frozen_sh, rep),
                   out_shardings=(self.state_shardings, rep), donate_argnums=(0,))

  def training_data(self):
    """(source, config) the training batches are built from (computed on the first call).

    The batches carry only the modalities the step reads (`batch_modalities`). With the teacher's
    targets cached (train/teacher_cache.py), the source is the training split carrying them in
    its text slot, of num_classes dims.
    """
    if self._training_data is None:
      source = self.ctx.data.train
      batch_config = ml_collections.ConfigDict(self.config.to_dict())
      batch_config.data.modalities = batch_modalities(self.stage, self.statics, self.config)
      if self.statics.teacher_in_batch:
        console.say('stage %s: the frozen teacher predicts its %d training dialogues once',
                    self.name, len(source))
        source = teacher_cache.teacher_source(source, self._teacher, self.config, self.ctx.mesh)
        batch_config.data.dims.t = len(self.config.label_names)
      self._training_data = (source, batch_config)
    return self._training_data

  def evaluate(self, source, params, batch_stats) -> dict:
    pred = predict_split(source, self.config, self.budget,
                         lambda b: self.predict_fn(params, batch_stats, b, self.frozen_states),
                         self.ctx.mesh)
    return split_metrics(pred, self.config.label_names)

  def fit(self) -> FrozenModel:
    """Trains (or resumes, or skips if finished) and returns the best evaluation weights.

    With `train.shared_stages_dir`, a stage another run has finished with the same fingerprint
    is linked in instead of trained, and a stage trained here is shared when finished.
    """
    directory = checkpointing.checkpoint_dir(self.config, self.ctx.workdir)
    if self.fingerprint is None or self._finished(directory):
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

  def _finished(self, directory: str) -> bool:
    ckpt = checkpointing.StageCheckpoints(self.ctx.workdir, self.name, read_only=True,
                                          directory=directory)
    try:
      meta = ckpt.latest_meta() if os.path.isdir(os.path.join(ckpt.root, 'latest')) else None
    finally:
      ckpt.close()
    return bool(meta and meta.get('finished'))

  def _fit(self, directory: str) -> FrozenModel:
    stage, config, scfg = self.stage, self.config, self.scfg
    ckpt = checkpointing.StageCheckpoints(
        self.ctx.workdir, self.name, keep=config.train.checkpoint_keep, directory=directory)
    state = self.state
    meta = ckpt.latest_meta()
    if meta is not None and meta.get('finished'):
      console.say('stage %s: already finished in %s; restoring its best weights', stage,
                   ckpt.root)
      self.loop = meta['loop']
      params, batch_stats, _ = ckpt.restore_best(state.params, state.model_state)
      ckpt.close()
      return FrozenModel(self.graphdef, (params, batch_stats, self.rng_state), self.fingerprint)
    loop = {'epoch': 0, 'best_f1': -1.0, 'best_epoch': -1, 'bad_epochs': 0,
            'plateau_epochs': 0, 'history': []}
    data_state = {'epoch': 0, 'iterator': None}
    if meta is not None:
      state, data_state, meta = ckpt.restore_latest(state)
      loop = meta['loop']
      console.say('stage %s: resuming at epoch %d, step %d', stage, data_state['epoch'] + 1,
                   int(state.step))

    writer = MetricsWriter(os.path.join(self.ctx.workdir, 'tensorboard', self.name))
    train_step = None
    epochs = config.train.epochs
    epoch = data_state['epoch']
    stop = False
    train_source, batch_config = self.training_data()
    while epoch < epochs and not stop:
      ds = pipeline.make_dataset(train_source, config=batch_config, budget=self.budget,
                                 train=True, epoch=epoch, seed=config.seed,
                                 augmented=self.augmented)
      it = iter(ds.to_iter_dataset(grain.ReadOptions(
          num_threads=config.data.read_threads, prefetch_buffer_size=config.data.prefetch)))
      if data_state.get('iterator') is not None and data_state['epoch'] == epoch:
        it.set_state(data_state['iterator'])
      pending: list[dict] = []
      t0 = time.time()
      host_step = int(state.step)  # tracked on the host so the loop never waits on the device
      bar = tqdm(total=len(ds), desc=f'{self.name} epoch {epoch + 1}/{epochs}',
                 disable=not config.train.progress_bar, leave=False)
      epoch_first_step = sum(self.plan_lengths[:epoch])
      bar.update(host_step - epoch_first_step)
      for batch in it:
        if train_step is None:
          batch_sh = sharding.batch_shardings(batch, self.ctx.mesh, self.budget)
          train_step = self.jitted_train_step(batch_sh)
        state, metrics = train_step(state, sharding.put_batch(batch, batch_sh, self.budget),
                                    self.frozen_states, self.ctx.class_weights)
        host_step += 1
        pending.append(metrics)
        bar.update(1)
        if len(pending) >= config.train.log_every_steps:
          _log_train(pending, host_step, stage, writer, bar, epoch, epoch_first_step)
          pending = []
        every = config.train.checkpoint_every_steps
        preempted = preemption.should_stop(host_step)
        if preempted or (every and host_step % every == 0):
          ckpt.save_latest(host_step, state, {'epoch': epoch, 'iterator': it.get_state()},
                           _jsonable({'loop': loop, 'finished': False, 'stage': stage}))
        if preempted:
          bar.close()
          writer.close()
          ckpt.close()
          raise preemption.Preempted.at(f'stage {self.name}', host_step, epoch, ckpt.root)
      bar.close()
      if pending:
        _log_train(pending, host_step, stage, writer, None, epoch, epoch_first_step)

      eval_params = state.ema_params if state.ema_params is not None else state.params
      dev = self.evaluate(self.ctx.data.dev, eval_params, state.model_state)
      f1 = float(dev['weighted_f1'])
      writer.scalars(host_step, {'dev/weighted_f1': f1, 'dev/macro_f1': dev['macro_f1'],
                                 'dev/accuracy': dev['accuracy'],
                                 'train/param_norm': float(_tree_norm(state.params))})
      if f1 > loop['best_f1'] + config.train.early_stopping_min_delta:
        loop.update(best_f1=f1, best_epoch=epoch, bad_epochs=0, plateau_epochs=0)
        ckpt.save_best(host_step, eval_params, state.model_state,
                       _jsonable({'stage': stage, 'epoch': epoch, 'dev': dev,
                                  'label_names': list(config.label_names),
                                  'config': self.meta_config.to_dict()}))
      else:
        loop['bad_epochs'] += 1
        loop['plateau_epochs'] += 1
        if loop['plateau_epochs'] >= scfg.lr_reduce_patience:
          loop['plateau_epochs'] = 0
          state = state.replace(lr_scale=state.lr_scale * scfg.lr_reduce_factor)
          console.say('stage %s: dev F1 plateaued; lr scale -> %.4g', stage,
                       float(state.lr_scale))
        stop = loop['bad_epochs'] >= scfg.early_stopping_patience
      loop['history'].append({'epoch': epoch, 'dev_weighted_f1': f1,
                              'seconds': time.time() - t0})
      console.say('stage %s epoch %d: dev weighted F1 %.2f (best %.2f at epoch %d)%s', self.name,
                   epoch + 1, 100 * f1, 100 * loop['best_f1'], loop['best_epoch'] + 1,
                   ' - early stop' if stop else '')
      epoch += 1
      loop['epoch'] = epoch
      ckpt.save_latest(host_step, state, {'epoch': epoch, 'iterator': None},
                       _jsonable({'loop': loop, 'finished': stop or epoch >= epochs,
                                  'stage': stage}))
    writer.close()
    self.state = state
    self.loop = loop
    params, batch_stats, _ = ckpt.restore_best(state.params, state.model_state)
    ckpt.close()
    return FrozenModel(self.graphdef, (params, batch_stats, self.rng_state), self.fingerprint)


_tree_norm = jax.jit(optax.tree.norm)


def augmented_modalities(stage: str, config) -> tuple[str, ...]:
  """The modalities a stage's training batches augment.

  An encoder stage with `augment.clean_frozen_inputs` augments only its own modality, so the
  frozen teacher's distillation targets are its predictions on the stored text; otherwise (the
  authors') every loaded modality is augmented, the teacher's text included. Fusion trains on
  every modality and augments them all.
  """
  if config.augment.clean_frozen_inputs and stage in steps.MODALITY_OF_STAGE:
    return (steps.MODALITY_OF_STAGE[stage],)
  return tuple(config.data.modalities)


def batch_modalities(stage: str, statics: steps.StageStatics, config) -> tuple[str, ...]:
  """The modalities a stage's training step reads: an encoder's own, and the text (the teacher's
  input or its cached targets, and where it is present) for a distilling student; fusion, all."""
  if stage not in steps.MODALITY_OF_STAGE:
    return tuple(config.data.modalities)
  read = {steps.MODALITY_OF_STAGE[stage]} | ({'t'} if statics.distill else set())
  return tuple(m for m in config.data.modalities if m in read)


def _frozen_needed(stage: str, statics: steps.StageStatics, config) -> tuple[str, ...]:
  if stage == 'teacher':
    return ()
  if stage in ('audio', 'visual'):
    return ('teacher',) if statics.distill else ()
  if config.model.fusion.input == 'raw':
    return ()
  return tuple(steps.ENCODER_OF_MODALITY[m] for m in config.data.modalities)


def _log_train(pending: list[dict], step: int, stage: str, writer: MetricsWriter, bar,
               epoch: int, epoch_first_step: int) -> None:
  """Fetches the metrics of the last steps (one host sync) and stops on NaN/Inf.

  `epoch_first_step` is the global step count before the epoch began, so the message can name the
  batch within the epoch (with the epoch's seeded order, that batch can be rebuilt).
  """
  fetched = jax.device_get(pending)
  mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
  losses_seen = np.array([m['loss'] for m in fetched])
  if not np.all(np.isfinite(losses_seen)):
    first = int(np.flatnonzero(~np.isfinite(losses_seen))[0])
    bad_step = step - len(fetched) + first + 1
    raise FloatingPointError(
        f'stage {stage}: non-finite loss at step {bad_step} (epoch {epoch + 1}, batch '
        f'{bad_step - epoch_first_step} of the epoch; grad norm {fetched[first]["grad_norm"]}); '
        f'stopping. Lower the learning rate or check the input features.')
  writer.scalars(step, {f'train/{k}': v for k, v in mean.items()})
  if bar is not None:
    bar.set_postfix(loss=f'{mean["loss"]:.4f}', acc=f'{mean["accuracy"]:.3f}')


# ------------------------------------------------------------------------------------------
# The whole job.
# ------------------------------------------------------------------------------------------

def enable_compilation_cache(config, workdir: str) -> None:
  """Persistent XLA cache: fold encoders, resumed runs and reruns reuse compiled steps."""
  cache = config.train.compilation_cache_dir or os.path.join(workdir, 'jax_cache')
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def prepare(config, workdir: str, mesh=None) -> Context:
  os.makedirs(workdir, exist_ok=True)
  if config.train.shared_stages_dir and jax.process_count() > 1:
    raise ValueError('train.shared_stages_dir is for single-process runs (sweeps on one '
                     f'machine); this job has {jax.process_count()} processes')
  if config.train.compilation_cache_dir != 'off':
    enable_compilation_cache(config, workdir)
  mesh = mesh if mesh is not None else sharding.make_mesh(config)
  config_validation.check_mesh_fits_batch(config, sharding.data_axis_size(mesh),
                                          sharding.batch_groups(config))
  data = sources.open_splits(config, workdir)
  class_weights = losses.class_weights_for(config.loss.class_weights, data.class_counts,
                                           config.loss.class_weight_power)
  class_weights = jax.device_put(jnp.asarray(class_weights, jnp.float32), sharding.replicated(mesh))
  return Context(config=config, workdir=workdir, mesh=mesh, data=data,
                 class_weights=class_weights)


def stage_predict_fn(stage: str, model: FrozenModel, config, frozen: dict[str, FrozenModel],
                     log_probs: bool = False):
  statics = steps.StageStatics(stage=stage, modalities=tuple(config.data.modalities),
                               fusion_input=config.model.fusion.input, loss=config.loss,
                               distill=False, ema_decay=0.0)
  needed = _frozen_needed(stage, statics, config)
  fn = jax.jit(functools.partial(
      steps.predict_step, graphdef=model.graphdef, rng_state=model.states[2],
      frozen_graphdefs={n: frozen[n].graphdef for n in needed}, statics=statics,
      log_probs=log_probs))
  frozen_states = {n: frozen[n].states for n in needed}
  return lambda batch: fn(model.states[0], model.states[1], batch, frozen_states)


def _write_atomically(path: str, write) -> str:
  """`write(tmp_path)`, then a rename: a crash never leaves a half-written file at `path`."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  root, ext = os.path.splitext(path)
  tmp = f'{root}.tmp{ext}'  # same extension: np.savez would append '.npz' otherwise
  write(tmp)
  os.replace(tmp, path)
  return path


def save_test_predictions(pred: dict[str, np.ndarray], workdir: str, stage: str) -> str:
  """Per-utterance test outputs of a stage (for significance tests across runs), written
  atomically to workdir/predictions/<stage>_test.npz."""
  return _write_atomically(os.path.join(workdir, 'predictions', f'{stage}_test.npz'),
                           lambda tmp: np.savez(tmp, **pred))


def _save_results(results: dict, workdir: str) -> None:
  """results.json marks a finished run (the experiment tools skip such runs): written last and
  atomically."""
  def write(tmp):
    with open(tmp, 'w') as f:
      json.dump(_jsonable(results), f, indent=2)
  _write_atomically(os.path.join(workdir, 'results.json'), write)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains every stage in config.train.stages, then reports test metrics of each.

  Model selection uses dev only; test is scored once per stage, after training.
  """
  ctx = prepare(config, workdir)
  console.say('mesh %s; train %d dialogues, dev %d, test %d', dict(ctx.mesh.shape),
               len(ctx.data.train), len(ctx.data.dev), len(ctx.data.test))
  budget = sharding.batch_budget(config, ctx.mesh)
  if budget.groups > 1:
    console.say('batch: %d sub-batches of %d nodes / %d graphs per step; process %d reads and '
                'builds sub-batch(es) %s', budget.groups, budget.max_nodes, budget.max_graphs,
                jax.process_index(), list(budget.local_groups))
  trained: dict[str, FrozenModel] = {}
  results = {}
  for stage in config.train.stages:
    t0 = time.time()
    if stage == 'fusion' and config.model.fusion.input == 'stacked':
      stage_ctx, stage_config = stacked_fusion_context(ctx, trained)
      runner = StageRunner(stage, stage_ctx, trained, meta_config=config)
    else:
      stage_ctx, stage_config = ctx, config
      runner = StageRunner(stage, ctx, trained)
    trained[stage] = runner.fit()
    pred = predict_split(stage_ctx.data.test, stage_config,
                         sharding.batch_budget(stage_config, ctx.mesh),
                         stage_predict_fn(stage, trained[stage], stage_config, trained), ctx.mesh)
    test = split_metrics(pred, config.label_names)
    if distributed.is_main_process():
      save_test_predictions(pred, workdir, stage)
      evaluate.write_report(test, os.path.join(workdir, 'reports'), f'{stage}_test',
                            png=config.eval.confusion_png)
      print(evaluate.format_report(test, title=f'{stage} - test ({ctx.data.test_name})'))
    results[stage] = {'test_weighted_f1': test['weighted_f1'], 'test_macro_f1': test['macro_f1'],
                      'test_accuracy': test['accuracy'],
                      'dev_weighted_f1': runner.loop['best_f1'],
                      'best_epoch': runner.loop['best_epoch'] + 1,
                      'history': runner.loop['history'], 'seconds': time.time() - t0}
  if distributed.is_main_process():
    _save_results(results, workdir)
    summary = ', '.join(f'{s} {100 * r["test_weighted_f1"]:.2f}' for s, r in results.items())
    print(f'test weighted F1 - {summary}')
  return results


def stacked_fusion_context(ctx: Context, trained: dict[str, FrozenModel]):
  """The fusion stage's context and config when it trains on cross-fitted log-probabilities."""
  from mer_jax.train import stacking  # pylint: disable=g-import-not-at-top
  train, dev, test = stacking.stacked_splits(ctx, trained)
  config = stacking.fusion_config(ctx.config)
  data = dataclasses.replace(ctx.data, train=train, dev=dev, test=test)
  return dataclasses.replace(ctx, config=config, data=data), config
