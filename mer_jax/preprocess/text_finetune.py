"""Fine-tuning the text encoder for ERC on token sequences (SPEC stage 3, the authors' recipe).

Encoder + projection + classifier (mer_jax/models/text_classifier.py), cross-entropy, AdamW with
linear warm-up and decay, gradient clipping, on length-bucketed batches of context prompts. It
runs on the machinery of the graph stages: one pure jitted step with the state donated and
NamedShardings over the config's mesh (rows of a batch split over 'data'), Orbax latest/best
checkpoints under `workdir/checkpoints/text_finetune/`, and resumption mid-epoch (the batch plan
of an epoch is a pure function of the seed and the epoch, so the iterator state is just
(epoch, batch)). Selection is on dev weighted F1; test is never looked at here.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import time
from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax

from mer_jax import console
from mer_jax import evaluate
from mer_jax import losses
from mer_jax.losses import classification
from mer_jax.data import prompts as prompts_lib
from mer_jax.data import text_batching
from mer_jax.models import text_classifier
from mer_jax.train import checkpointing
from mer_jax.train import cpu_backend
from mer_jax.train import distributed
from mer_jax.train import optim
from mer_jax.train import preemption
from mer_jax.train import sharding
from mer_jax.train import steps
from mer_jax.train.metrics_writer import MetricsWriter

CHECKPOINT_NAME = 'text_finetune'
BATCH_KEYS = ('input_ids', 'attention_mask', 'last_index', 'target_mask', 'labels')

# The jitted (train step, predict) of recent fine-tuners, by what determines their programs:
# fine-tuners built in one process with the same model and optimizer (a resumed run, folds, a
# sweep's variants that differ after fine-tuning) reuse the compiled programs of each batch shape
# instead of tracing and compiling them again (as stage._TRAIN_STEPS does for the stages).
_STEPS: collections.OrderedDict = collections.OrderedDict()
_STEPS_KEPT = 4


def _shared_steps(key, build):
  """The (train step, predict) jitted for `key`, made by `build` if no recent fine-tuner has it."""
  jitted = _STEPS.pop(key, None)
  if jitted is None:
    jitted = build()
  _STEPS[key] = jitted
  while len(_STEPS) > _STEPS_KEPT:
    _STEPS.popitem(last=False)
  return jitted


@dataclasses.dataclass
class TokenSplit:
  """The token sequences of one split and their labels (-1: unlabeled)."""
  sequences: list[prompts_lib.Prompt]
  labels: np.ndarray

  @property
  def lengths(self) -> list[int]:
    return [len(s) for s in self.sequences]


def batch_arrays(batch: text_batching.TokenBatch) -> dict[str, np.ndarray]:
  return {k: getattr(batch, k) for k in BATCH_KEYS}


def loss_and_logits(model, batch: dict[str, jax.Array], class_weights: jax.Array, *, train: bool):
  logits, _, _ = model(batch['input_ids'], batch['attention_mask'], batch['last_index'],
                       batch['target_mask'], train=train)
  labels = batch['labels']
  valid = labels >= 0
  log_p = classification.true_class_log_prob(logits, jnp.where(valid, labels, 0))
  weights = class_weights[jnp.where(valid, labels, 0)] * valid
  loss = -jnp.sum(weights * log_p) / jnp.maximum(jnp.sum(weights), 1e-9)
  return loss, logits


def train_step(state: steps.TrainState, batch, class_weights, schedule_steps, *, graphdef,
               rng_state, tx):
  """One update; pure (jit it with the state donated). `schedule_steps`: optim.schedule_steps."""
  rng_state = steps.reseed_rng_state(rng_state, jax.random.fold_in(state.rng, state.step))
  model = nnx.merge(graphdef, state.params, rng_state)

  def compute(model):
    return loss_and_logits(model, batch, class_weights, train=True)

  (loss, logits), grads = nnx.value_and_grad(compute, has_aux=True)(model)
  updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                 schedule_steps=schedule_steps)
  updates = jax.tree.map(lambda u: u * state.lr_scale, updates)
  params = optax.apply_updates(state.params, updates)
  valid = batch['labels'] >= 0
  correct = jnp.sum((jnp.argmax(logits, -1) == batch['labels']) & valid)
  metrics = {'loss': loss, 'accuracy': correct / jnp.maximum(jnp.sum(valid), 1),
             'grad_norm': optax.tree.norm(grads), 'update_norm': optax.tree.norm(updates),
             'tokens': jnp.sum(batch['attention_mask'] * valid[:, None])}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def predict_step(params, rng_state, batch, *, graphdef):
  model = nnx.merge(graphdef, params, rng_state)
  logits, _, pooled = model(batch['input_ids'], batch['attention_mask'], batch['last_index'],
                            batch['target_mask'], train=False)
  return jax.nn.softmax(logits, -1), pooled


class TextFinetuner:
  """Builds the sharded classifier around `encoder`, trains it (`fit`) and returns the encoder."""

  def __init__(self, config, workdir: str, mesh, encoder: nnx.Module, train: TokenSplit,
               dev: TokenSplit, pad_id: int):
    self.config, self.workdir, self.mesh = config, workdir, mesh
    self.ft = ft = config.text.finetune
    self.train_split, self.dev_split, self.pad_id = train, dev, pad_id
    self.buckets = text_batching.bucket_lengths(
        config.text.max_length, config.text.smallest_bucket, config.text.bucket_growth)
    self.rows = sharding.data_axis_size(mesh)
    model = build_classifier(config, encoder)
    self.graphdef, params, self.rng_state = nnx.split(model, nnx.Param, ...)
    param_shardings = sharding.state_shardings(params, mesh, config.mesh.rules)
    params = jax.device_put(params, param_shardings)
    self.plan_sizes = [len(self.epoch_plan(e)) for e in range(ft.epochs)]
    self.tx = optim.make_optimizer(ft.optim, params)
    self.rep = sharding.replicated(mesh)
    self._host_schedule_steps = optim.schedule_steps(ft.optim, max(1, sum(self.plan_sizes)))
    self.schedule_steps = jax.device_put(self._host_schedule_steps, self.rep)

    def init_state(params):
      return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=None,
                              opt_state=self.tx.init(params), ema_params=None,
                              lr_scale=jnp.ones((), jnp.float32),
                              rng=jax.random.PRNGKey(config.seed + 7))

    self.state = jax.jit(init_state)(params)
    self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
    self.batch_sharding = NamedSharding(mesh, P('data'))
    counts = np.bincount(train.labels[train.labels >= 0], minlength=len(config.label_names))
    weights = losses.class_weights_for(ft.class_weights, counts)
    self.class_weights = jax.device_put(jnp.asarray(weights, jnp.float32), self.rep)
    self._predict_rng_state = jax.device_put(self.rng_state, self.rep)
    self._train_step, self._predict = _shared_steps(self._program_key(), self._jit_steps)

  def _jit_steps(self):
    options = cpu_backend.compiler_options(self.config.train.cpu_fast_compile)
    train = jax.jit(
        functools.partial(train_step, graphdef=self.graphdef, rng_state=self.rng_state,
                          tx=self.tx),
        in_shardings=(self.state_shardings, self.batch_sharding, self.rep, self.rep),
        out_shardings=(self.state_shardings, self.rep), donate_argnums=(0,),
        compiler_options=options)
    predict = jax.jit(functools.partial(predict_step, graphdef=self.graphdef),
                      compiler_options=options)
    return train, predict

  def _program_key(self) -> tuple:
    """What the steps' programs depend on besides their arguments: the classifier (its graphdef
    holds the encoder's and head's structure, pooling and dropout rate), the optimizer settings
    (`tx` is built from them alone) and the mesh and shardings. The rng streams' values are not
    part of it: the train step reseeds them from the state and predict takes them as an argument."""
    shardings, layout = jax.tree.flatten(self.state_shardings)
    optimizer = json.dumps(self.ft.optim.to_dict(), sort_keys=True, default=str)
    return (self.graphdef, jax.tree.structure(self.rng_state), optimizer, self.mesh, layout,
            tuple(shardings), self.batch_sharding, self.rep, self.config.train.cpu_fast_compile)

  def epoch_plan(self, epoch: int) -> text_batching.BatchPlan:
    rng = np.random.default_rng([self.config.seed, epoch])
    return text_batching.plan_batches(self.train_split.lengths, self.buckets,
                                      self.ft.tokens_per_batch, row_multiple=self.rows, rng=rng)

  def put(self, batch: text_batching.TokenBatch) -> dict[str, jax.Array]:
    return {k: distributed.host_to_global(v, self.batch_sharding)
            for k, v in batch_arrays(batch).items()}

  def predict(self, params, split: TokenSplit) -> np.ndarray:
    """Class probabilities per sequence of `split`."""
    plan = text_batching.plan_batches(split.lengths, self.buckets, self.ft.tokens_per_batch,
                                      row_multiple=self.rows)
    probs = np.zeros((len(split.sequences), len(self.config.label_names)), np.float32)
    for batch in text_batching.iterate_batches(split.sequences, plan, self.pad_id, split.labels):
      p, _ = self._predict(params, self._predict_rng_state, self.put(batch))
      keep = batch.index >= 0
      probs[batch.index[keep]] = distributed.global_to_host(p)[keep]
    return probs

  def evaluate(self, params, split: TokenSplit) -> dict:
    probs = self.predict(params, split)
    keep = split.labels >= 0
    return evaluate.classification_metrics(split.labels[keep], probs[keep].argmax(-1),
                                           self.config.label_names)

  def encoder_from(self, params) -> nnx.Module:
    return nnx.merge(self.graphdef, params, self.rng_state).encoder

  def fit(self) -> nnx.Module:
    """Trains (resuming from the workdir) and returns the encoder of the best dev F1."""
    ft, config = self.ft, self.config
    ckpt = checkpointing.StageCheckpoints(
        self.workdir, CHECKPOINT_NAME, keep=config.train.checkpoint_keep,
        directory=checkpointing.checkpoint_dir(config, self.workdir))
    state = self.state
    meta = ckpt.latest_meta()
    if meta is not None and meta.get('finished'):
      console.say('text fine-tuning: already finished in %s; restoring its best weights',
                  ckpt.root)
      params, _, _ = ckpt.restore_best(state.params, {})
      ckpt.close()
      return self.encoder_from(params)
    loop = {'best_f1': -1.0, 'best_epoch': -1, 'bad_epochs': 0, 'history': []}
    data_state = {'epoch': 0, 'batch': 0}
    if meta is not None:
      state, data_state, meta = ckpt.restore_latest(state)
      loop = meta['loop']
      console.say('text fine-tuning: resuming at epoch %d, batch %d', data_state['epoch'] + 1,
                  data_state['batch'])
    writer = MetricsWriter(os.path.join(self.workdir, 'tensorboard', CHECKPOINT_NAME))
    epoch, stop = data_state['epoch'], False
    host_step = int(state.step)
    while epoch < ft.epochs and not stop:
      plan = self.epoch_plan(epoch)
      first = data_state['batch'] if data_state['epoch'] == epoch else 0
      remaining = text_batching.BatchPlan(plan.batches[first:])
      pending, tokens, t0 = [], 0, time.perf_counter()
      bar = console.progress(
          text_batching.iterate_batches(self.train_split.sequences, remaining, self.pad_id,
                                        self.train_split.labels),
          total=len(remaining), desc=f'text fine-tuning epoch {epoch + 1}/{ft.epochs}',
          unit='batch', enabled=config.train.progress_bar)
      for i, batch in enumerate(bar, start=first):
        state, metrics = self._train_step(state, self.put(batch), self.class_weights,
                                          self.schedule_steps)
        host_step += 1
        tokens += batch.num_real_tokens
        pending.append(metrics)
        if len(pending) >= config.train.log_every_steps:
          self._log(pending, host_step, writer, bar)
          pending = []
        every = config.train.checkpoint_every_steps
        preempted = preemption.should_stop(host_step)
        if preempted or (every and host_step % every == 0):
          ckpt.save_latest(host_step, state, {'epoch': epoch, 'batch': i + 1},
                           {'loop': loop, 'finished': False})
        if preempted:
          writer.close()
          ckpt.close()
          raise preemption.Preempted.at('text fine-tuning', host_step, epoch, ckpt.root)
      if pending:
        self._log(pending, host_step, writer, None)
      jax.block_until_ready(state.params)
      seconds = time.perf_counter() - t0
      dev = self.evaluate(state.params, self.dev_split)
      f1 = float(dev['weighted_f1'])
      writer.scalars(host_step, {'dev/weighted_f1': f1, 'dev/macro_f1': float(dev['macro_f1']),
                                 'train/tokens_per_second': tokens / max(seconds, 1e-9)})
      if f1 > loop['best_f1'] + config.train.early_stopping_min_delta:
        loop.update(best_f1=f1, best_epoch=epoch, bad_epochs=0)
        ckpt.save_best(host_step, state.params, {},
                       {'stage': CHECKPOINT_NAME, 'epoch': epoch, 'dev_weighted_f1': f1,
                        'label_names': list(config.label_names), 'config': config.to_dict()})
      else:
        loop['bad_epochs'] += 1
        stop = loop['bad_epochs'] >= ft.optim.early_stopping_patience
      loop['history'].append({'epoch': epoch, 'dev_weighted_f1': f1, 'seconds': seconds,
                              'train_tokens_per_second': tokens / max(seconds, 1e-9)})
      console.say('text fine-tuning epoch %d: dev weighted F1 %.2f (best %.2f at epoch %d); '
                  '%.0f train tokens/s%s', epoch + 1, 100 * f1, 100 * loop['best_f1'],
                  loop['best_epoch'] + 1, tokens / max(seconds, 1e-9),
                  ' - early stop' if stop else '')
      epoch += 1
      ckpt.save_latest(host_step, state, {'epoch': epoch, 'batch': 0},
                       {'loop': loop, 'finished': stop or epoch >= ft.epochs})
    writer.close()
    self.state = state
    params, _, _ = ckpt.restore_best(state.params, {})
    ckpt.close()
    return self.encoder_from(params)

  def _log(self, pending: Sequence[dict], step: int, writer: MetricsWriter, bar) -> None:
    fetched = jax.device_get(list(pending))
    loss = np.array([m['loss'] for m in fetched])
    if not np.all(np.isfinite(loss)):
      bad = int(np.flatnonzero(~np.isfinite(loss))[0])
      raise FloatingPointError(f'text fine-tuning: non-finite loss at step '
                               f'{step - len(fetched) + bad + 1}; lower text.finetune.optim.lr')
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0] if k != 'tokens'}
    # lr_scale stays 1 here: text fine-tuning has no reduce-on-plateau.
    lrs = optim.learning_rates(self.ft.optim, step, self._host_schedule_steps,
                               1.0, grouped=False)
    writer.scalars(step, {**{f'train/{k}': v for k, v in mean.items()},
                          **{f'train/lr/{group}': lr for group, lr in lrs.items()}})
    if bar is not None and hasattr(bar, 'set_postfix'):
      bar.set_postfix(loss=f'{mean["loss"]:.4f}', acc=f'{mean["accuracy"]:.3f}')


def build_classifier(config, encoder: nnx.Module) -> text_classifier.TextClassifier:
  ft = config.text.finetune
  return text_classifier.TextClassifier(
      encoder, encoder.config.hidden_size, ft.projection_dim, len(config.label_names),
      pooling=config.text.pooling, dropout=ft.dropout, rngs=nnx.Rngs(config.seed))


def restore_finetuned_encoder(config, workdir: str, encoder: nnx.Module) -> nnx.Module:
  """`encoder` (the pretrained one, resized) with the best fine-tuned weights of `workdir`."""
  graphdef, params, rest = nnx.split(build_classifier(config, encoder), nnx.Param, ...)
  ckpt = checkpointing.StageCheckpoints(workdir, CHECKPOINT_NAME, read_only=True,
                                        directory=checkpointing.checkpoint_dir(config, workdir))
  try:
    params, _, _ = ckpt.restore_best(params, {})
  finally:
    ckpt.close()
  return nnx.merge(graphdef, params, rest).encoder


def finetune_encoder(config, workdir: str, tok: prompts_lib.PromptTokenizer, encoder: nnx.Module,
                     splits: dict[str, TokenSplit], mesh=None) -> nnx.Module:
  """Fine-tunes `encoder` on the train split with dev selection; returns the best encoder."""
  mesh = mesh if mesh is not None else sharding.make_mesh(config)
  tuner = TextFinetuner(config, workdir, mesh, encoder, splits[config.data.train_split],
                        splits[config.data.dev_split], tok.pad_id)
  return tuner.fit()
