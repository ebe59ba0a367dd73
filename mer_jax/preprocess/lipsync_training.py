"""LipSyncNet: self-supervised training on in-memory clips, and active-speaker selection.

Data: `SyncClip`s, each K face tracks of F frames (fixed-size crops) and the log-mel of the
same span (4 mel frames per video frame, see mer_jax/models/lipsync.py).

Triplets (`TripletSampler`) are always (anchor audio, positive face, negative face): the
anchor is a window of a clip's log-mel, the positive the speaking face over the same frames,
and the negative a face window that does not go with that audio, one of
  'shifted'          the same face, a window starting >= min_shift_frames frames away (the
                     face out of sync with the audio, i.e. the face with time-shifted audio);
  'other_utterance'  a face window of another clip (the face with another utterance's audio);
  'other_face'       with use_mined_pairs, in a clip with >= 2 tracks and a known speaker,
                     another (silent) face over the same frames.
Each triplet draws its negative kind uniformly among the kinds available to it. Positives
are self-supervised: the one face of a single-track clip is taken as its speaker; with
use_mined_pairs, clips whose speaker track is known add (speaker face, audio) positives.
Clips shorter than one window, and multi-track clips without a usable speaker, give no
anchors; they are counted and reported (`TripletSampler.report`), never dropped silently.
Batches have a fixed size; batch `step` is a pure function of (seed, step), so a resumed run
sees the batches it would have seen.

Training (`train_lipsync`): one device; `train_step` is one jitted, pure function of (state,
batch) with the graphdef and a hashable `StepStatics` as static arguments (split once, merge
inside), donating the state; every eval_every steps the loop fetches metrics, evaluates fixed
validation triplets and checkpoints through checkpointing.StageCheckpoints under
workdir/checkpoints/lipsync/ (latest: state + step + history, for resuming; best: weights by
validation loss, for `restore_lipsync`). Rerunning a workdir resumes, or returns at once when
cfg.steps are done.

Speaker selection (`score_tracks`, `select_speaker`): every track and the audio are cut into
windows (hop score_hop_frames; the last window is aligned with the clip's end so the whole
clip is covered), all windows of all tracks are embedded in one jitted call, and a track's
score is its mean distance to the audio windows; the speaker is the argmin. A clip shorter
than one window is padded by repeating its last video frame (and its last 4 mel frames'
worth of log-mel rows) up to the window length.

Config (`cfg`, the `config.lipsync` ConfigDict) keys read here and in the model:
  window_frames      T, video frames per window (32 in the paper).
  crop_size          side of the square face crops.
  channels           channels of the face crops (1 grey, 3 RGB).
  embed_dim          size of the shared embedding (256).
  video_widths       3-D conv block widths of the video branch.
  audio_widths       2-D conv block widths of the audio branch (>= 2 blocks).
  batchnorm_momentum running-average momentum of the batch norms (0.9).
  margin             triplet margin on Euclidean distances (1.5).
  alpha              weight of the margin term; 1 - alpha weighs mean d_pos (0.7).
  lr, weight_decay   AdamW.
  grad_clip_norm     global-norm gradient clipping (0 disables it).
  batch_size         triplets per step (also the window chunk when scoring, x2).
  steps              optimizer steps.
  eval_every         steps between validation passes and checkpoints.
  min_shift_frames   least offset of a 'shifted' negative, in video frames.
  use_mined_pairs    use known speakers of multi-track clips (positives and 'other_face').
  flip_prob          probability of mirroring each face window in training (augmentation).
  score_hop_frames   hop between scoring windows, in video frames.
  seed               model init, batches, step rng and the random-face baseline.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mer_jax import console
from mer_jax.losses import lipsync as lipsync_loss
from mer_jax.models import lipsync as lipsync_model
from mer_jax.train import checkpointing

NEGATIVE_KINDS = ('shifted', 'other_utterance', 'other_face')
STAGE = 'lipsync'  # checkpoint folder: workdir/checkpoints/lipsync/{latest,best}
# What the jitted steps read of a batch (the rest is bookkeeping for tests and debugging).
STEP_KEYS = ('audio', 'positive', 'negative', 'mask')
MEL = lipsync_model.MEL_FRAMES_PER_VIDEO_FRAME
MODEL_KEYS = ('window_frames', 'crop_size', 'channels', 'embed_dim', 'video_widths',
              'audio_widths', 'batchnorm_momentum', 'seed')
CONFIG_KEYS = ('window_frames', 'crop_size', 'channels', 'embed_dim', 'video_widths',
               'audio_widths', 'batchnorm_momentum', 'margin', 'alpha', 'lr', 'weight_decay',
               'grad_clip_norm', 'batch_size', 'steps', 'eval_every', 'min_shift_frames',
               'use_mined_pairs', 'flip_prob', 'score_hop_frames', 'seed')


def check_lipsync_config(cfg) -> None:
  """Raises ValueError listing every missing or unusable config.lipsync key."""
  missing = [k for k in CONFIG_KEYS if k not in cfg]
  if missing:
    raise ValueError(f'config.lipsync is missing keys {missing}.')
  errors = []
  for key in ('batch_size', 'steps', 'eval_every', 'min_shift_frames', 'score_hop_frames'):
    if cfg[key] < 1:
      errors.append(f'{key} must be >= 1, got {cfg[key]}')
  if cfg.margin <= 0:
    errors.append(f'margin must be > 0, got {cfg.margin}')
  if not 0.0 <= cfg.alpha <= 1.0:
    errors.append(f'alpha must be in [0, 1], got {cfg.alpha}')
  if not 0.0 <= cfg.flip_prob <= 1.0:
    errors.append(f'flip_prob must be in [0, 1], got {cfg.flip_prob}')
  if cfg.lr <= 0 or cfg.weight_decay < 0 or cfg.grad_clip_norm < 0:
    errors.append('lr must be > 0, weight_decay and grad_clip_norm >= 0')
  if errors:
    raise ValueError('config.lipsync: ' + '; '.join(errors) + '.')
  lipsync_model.check_lipsync_model_config(cfg)


# ------------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SyncClip:
  """One utterance: its face tracks and its audio over the same F video frames."""
  tracks: np.ndarray  # uint8[K, F, S, S, C]
  logmel: np.ndarray  # f32[4F, 64]
  speaker: int = -1  # index of the speaking track if known, else -1
  clip_id: str = ''
  areas: np.ndarray | None = None  # f32[K] mean face-box area per track (largest-face baseline)

  def __post_init__(self):
    if self.tracks.ndim != 5 or self.tracks.dtype != np.uint8:
      raise ValueError(f'SyncClip {self.clip_id!r}: tracks must be uint8[K, F, S, S, C], got '
                       f'{self.tracks.dtype}{list(self.tracks.shape)}.')
    k, f = self.tracks.shape[:2]
    want = (MEL * f, lipsync_model.MEL_BANDS)
    if tuple(self.logmel.shape) != want:
      raise ValueError(f'SyncClip {self.clip_id!r}: logmel must be f32{list(want)} (4 mel '
                       f'frames per video frame), got {list(self.logmel.shape)}.')
    if k < 1 or not -1 <= self.speaker < k:
      raise ValueError(f'SyncClip {self.clip_id!r}: speaker {self.speaker} with {k} tracks.')
    if self.areas is not None and np.shape(self.areas) != (k,):
      raise ValueError(f'SyncClip {self.clip_id!r}: areas must be f32[{k}].')

  @property
  def num_tracks(self) -> int:
    return self.tracks.shape[0]

  @property
  def num_frames(self) -> int:
    return self.tracks.shape[1]


def _check_crops(clips: Sequence[SyncClip], cfg) -> None:
  want = (cfg.crop_size, cfg.crop_size, cfg.channels)
  for clip in clips:
    if tuple(clip.tracks.shape[2:]) != want:
      raise ValueError(f'SyncClip {clip.clip_id!r}: crops {list(clip.tracks.shape[2:])}, but '
                       f'config.lipsync wants {list(want)} (crop_size, crop_size, channels).')


class TripletSampler:
  """Seeded (anchor audio, positive face, negative face) batches; see the module docstring."""

  def __init__(self, clips: Sequence[SyncClip], cfg, seed: int):
    _check_crops(clips, cfg)
    self.clips = list(clips)
    self.window = int(cfg.window_frames)
    self.min_shift = int(cfg.min_shift_frames)
    self.batch_size = int(cfg.batch_size)
    self.use_mined = bool(cfg.use_mined_pairs)
    self.seed = int(seed)
    self.long_enough = [i for i, c in enumerate(self.clips) if c.num_frames >= self.window]
    self.too_short = [c.clip_id for c in self.clips if c.num_frames < self.window]
    # (clip index, speaker track) of every clip that provides positives.
    self.anchors: list[tuple[int, int]] = []
    self.no_speaker: list[str] = []
    for i in self.long_enough:
      clip = self.clips[i]
      if clip.num_tracks == 1:
        self.anchors.append((i, 0))
      elif self.use_mined and clip.speaker >= 0:
        self.anchors.append((i, clip.speaker))
      else:
        self.no_speaker.append(clip.clip_id)
    for i, _ in self.anchors:
      if not (self._static_kinds(i) or all(self._shift_starts(i, s).size
                                             for s in range(self._num_starts(i)))):
        raise ValueError(
            f'SyncClip {self.clips[i].clip_id!r}: no negative for some windows (one clip only, '
            f'no second track, and {self.clips[i].num_frames} frames are too few for a shift '
            f'of {self.min_shift} on both sides); add clips or lower min_shift_frames.')

  def report(self) -> dict[str, Any]:
    """How many clips provide anchors, and which give none (and why)."""
    return {'clips': len(self.clips), 'anchor_clips': len(self.anchors),
            'too_short': len(self.too_short), 'too_short_ids': list(self.too_short),
            'no_known_speaker': len(self.no_speaker)}

  def _num_starts(self, i: int) -> int:
    return self.clips[i].num_frames - self.window + 1

  def _shift_starts(self, i: int, start: int) -> np.ndarray:
    starts = np.arange(self._num_starts(i))
    return starts[np.abs(starts - start) >= self.min_shift]

  def _static_kinds(self, i: int) -> list[int]:
    """Negative kinds available to clip i at every start."""
    kinds = []
    if len(self.long_enough) >= 2:
      kinds.append(NEGATIVE_KINDS.index('other_utterance'))
    clip = self.clips[i]
    if self.use_mined and clip.num_tracks >= 2 and clip.speaker >= 0:
      kinds.append(NEGATIVE_KINDS.index('other_face'))
    return kinds

  def _triplet(self, rng: np.random.Generator, i: int, track: int) -> dict[str, Any]:
    start = int(rng.integers(self._num_starts(i)))
    shifts = self._shift_starts(i, start)
    kinds = self._static_kinds(i) + ([NEGATIVE_KINDS.index('shifted')] if shifts.size else [])
    kind = int(rng.choice(sorted(kinds)))
    name = NEGATIVE_KINDS[kind]
    if name == 'shifted':
      neg_clip, neg_track, neg_start = i, track, int(rng.choice(shifts))
    elif name == 'other_utterance':
      others = [j for j in self.long_enough if j != i]
      neg_clip = int(others[rng.integers(len(others))])
      neg_track = int(rng.integers(self.clips[neg_clip].num_tracks))
      neg_start = int(rng.integers(self._num_starts(neg_clip)))
    else:
      silent = [k for k in range(self.clips[i].num_tracks) if k != track]
      neg_clip, neg_track, neg_start = i, int(silent[rng.integers(len(silent))]), start
    return {'clip': i, 'track': track, 'start': start, 'neg_clip': neg_clip,
            'neg_track': neg_track, 'neg_start': neg_start, 'neg_kind': kind}

  def _assemble(self, triplets: list[dict[str, Any]], valid: np.ndarray) -> dict[str, np.ndarray]:
    t = self.window
    batch = {key: np.asarray([tr[key] for tr in triplets], np.int32) for key in triplets[0]}
    batch['audio'] = np.stack([
        self.clips[tr['clip']].logmel[MEL * tr['start']:MEL * (tr['start'] + t)]
        for tr in triplets]).astype(np.float32)
    batch['positive'] = np.stack([
        self.clips[tr['clip']].tracks[tr['track'], tr['start']:tr['start'] + t]
        for tr in triplets])
    batch['negative'] = np.stack([
        self.clips[tr['neg_clip']].tracks[tr['neg_track'], tr['neg_start']:tr['neg_start'] + t]
        for tr in triplets])
    batch['mask'] = np.asarray(valid, bool)
    return batch

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """Training batch `step`: batch_size triplets with uniformly drawn anchors."""
    if not self.anchors:
      raise ValueError('TripletSampler: no clip provides positives '
                       f'({self.report()}); need single-track clips, or known speakers with '
                       'use_mined_pairs.')
    rng = np.random.default_rng((self.seed, 0, step))
    picks = rng.integers(len(self.anchors), size=self.batch_size)
    triplets = [self._triplet(rng, *self.anchors[p]) for p in picks]
    return self._assemble(triplets, np.ones(self.batch_size, bool))

  def eval_batches(self) -> list[dict[str, np.ndarray]]:
    """One fixed triplet per anchor clip, in batches of batch_size; the last is padded
    (repeating the first triplet, mask False)."""
    rng = np.random.default_rng((self.seed, 1))
    triplets = [self._triplet(rng, i, track) for i, track in self.anchors]
    batches = []
    for lo in range(0, len(triplets), self.batch_size):
      chunk = triplets[lo:lo + self.batch_size]
      valid = np.arange(self.batch_size) < len(chunk)
      chunk = chunk + [chunk[0]] * (self.batch_size - len(chunk))
      batches.append(self._assemble(chunk, valid))
    return batches


# ------------------------------------------------------------------------------------------
# Model, optimizer and the jitted steps.
# ------------------------------------------------------------------------------------------

# Random streams use XLA's RngBitGenerator ('rbg'): the jitted init compiles several times
# faster than with threefry's per-element hashing (docs/performance.md). Splits and
# fold-ins stay threefry hashes, so streams are still pure functions of (cfg.seed, step).
RNG_IMPL = 'rbg'


@flax.struct.dataclass
class LipSyncState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw key data (RNG_IMPL) of the base key; each step folds in its number


@dataclasses.dataclass(frozen=True)
class StepStatics:
  """The config values the steps are traced with (hashable: a static argument of the jit).

  Loop-only keys (steps, eval_every, sampling, scoring) are left out, so runs that differ only
  in them (e.g. a resumed run with more steps) share one compiled step per process.
  """
  margin: float
  alpha: float
  flip_prob: float
  lr: float
  weight_decay: float
  grad_clip_norm: float

  @classmethod
  def from_config(cls, cfg) -> 'StepStatics':
    return cls(margin=float(cfg.margin), alpha=float(cfg.alpha), flip_prob=float(cfg.flip_prob),
               lr=float(cfg.lr), weight_decay=float(cfg.weight_decay),
               grad_clip_norm=float(cfg.grad_clip_norm))


def make_optimizer(cfg) -> optax.GradientTransformation:
  """AdamW after global-norm clipping; `cfg` is config.lipsync or a StepStatics."""
  tx = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)
  if cfg.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx


def _model_states(cfg) -> tuple[Any, Any, Any]:
  """(graphdef, params, batch_stats) of a new LipSyncNet (traced under eval_shape or jit)."""
  model = lipsync_model.LipSyncNet(cfg, rngs=nnx.Rngs(jax.random.key(cfg.seed, impl=RNG_IMPL)))
  # Param and BatchStat cover the whole model: nnx.split raises if anything is left over.
  return nnx.split(model, nnx.Param, nnx.BatchStat)


def _model_config(cfg) -> ml_collections.FrozenConfigDict:
  """The keys that define the initial weights, hashable (a static argument of the init)."""
  return ml_collections.FrozenConfigDict({k: cfg[k] for k in MODEL_KEYS})


def _new_state(model_cfg, statics: StepStatics) -> LipSyncState:
  _, params, batch_stats = _model_states(model_cfg)
  return LipSyncState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=make_optimizer(statics).init(params),
                      rng=jax.random.key_data(jax.random.key(model_cfg.seed, impl=RNG_IMPL)))


# Jitted with hashable static arguments: runs with the same model and optimizer share one
# compiled init per process.
_init_state = jax.jit(_new_state, static_argnums=(0, 1))


def init_lipsync(cfg) -> tuple[Any, Any, Any]:
  """(graphdef, params, batch_stats) of a freshly initialised LipSyncNet."""
  model_cfg = _model_config(cfg)
  graphdef, _, _ = nnx.eval_shape(lambda: _model_states(model_cfg))
  state = _init_state(model_cfg, StepStatics.from_config(cfg))
  return graphdef, state.params, state.batch_stats


def _faces(x: jax.Array) -> jax.Array:
  """uint8 crops -> f32 in [0, 1] (sent as uint8: a quarter of the host-to-device bytes)."""
  return x.astype(jnp.float32) / 255.0


def _random_flip(faces: jax.Array, key: jax.Array, prob: float) -> jax.Array:
  flip = jax.random.bernoulli(key, prob, (faces.shape[0],))
  return jnp.where(flip[:, None, None, None, None], faces[:, :, :, ::-1], faces)


def _triplet_loss(model, batch, positive, negative, statics: StepStatics, *, train: bool):
  # Positive and negative faces go through the video branch as one batch: one call, and
  # shared batch-norm statistics in training.
  faces = model.embed_video(jnp.concatenate([positive, negative]), train=train)
  pos, neg = jnp.split(faces, 2)
  audio = model.embed_audio(batch['audio'], train=train)
  return lipsync_loss.sync_margin_loss(audio, pos, neg, statics.margin, statics.alpha,
                                       batch['mask'])


@functools.partial(jax.jit, static_argnames=('graphdef', 'statics'), donate_argnames=('state',))
def train_step(state: LipSyncState, batch: dict[str, jax.Array], *, graphdef,
               statics: StepStatics) -> tuple[LipSyncState, dict[str, jax.Array]]:
  """One AdamW step on a batch of triplets; batch norm statistics updated. Pure."""
  positive, negative = _faces(batch['positive']), _faces(batch['negative'])
  if statics.flip_prob > 0:
    key = jax.random.wrap_key_data(state.rng, impl=RNG_IMPL)
    pos_key, neg_key = jax.random.split(jax.random.fold_in(key, state.step))
    positive = _random_flip(positive, pos_key, statics.flip_prob)
    negative = _random_flip(negative, neg_key, statics.flip_prob)

  model = nnx.merge(graphdef, state.params, state.batch_stats)

  def loss_fn(model):
    return _triplet_loss(model, batch, positive, negative, statics, train=True)

  # nnx.value_and_grad (not jax's): batch norm updates its running statistics in place while
  # tracing; the gradients come back as a State shaped like the params.
  (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  batch_stats = nnx.state(model, nnx.BatchStat)
  # optax transformations are pure functions of their arguments: built here from the statics,
  # the same optimizer as the one whose state `_new_state` initialised.
  updates, opt_state = make_optimizer(statics).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                 update_norm=optax.tree.norm(updates), param_norm=optax.tree.norm(params))
  return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                       opt_state=opt_state), metrics


@functools.partial(jax.jit, static_argnames=('graphdef', 'statics'))
def eval_step(params, batch_stats, batch: dict[str, jax.Array], *, graphdef,
              statics: StepStatics) -> dict[str, jax.Array]:
  """Masked-mean triplet metrics of a batch in eval mode, and its valid count."""
  model = nnx.merge(graphdef, params, batch_stats)
  loss, metrics = _triplet_loss(model, batch, _faces(batch['positive']),
                                _faces(batch['negative']), statics, train=False)
  return dict(metrics, loss=loss, count=jnp.sum(batch['mask']))


def make_train_step(cfg, graphdef):
  """(state, batch) -> (state, metrics): `train_step` with its statics bound; donates state."""
  return functools.partial(train_step, graphdef=graphdef, statics=StepStatics.from_config(cfg))


def make_eval_step(cfg, graphdef):
  """(params, batch_stats, batch) -> metrics: `eval_step` with its statics bound."""
  return functools.partial(eval_step, graphdef=graphdef, statics=StepStatics.from_config(cfg))


def _step_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: batch[k] for k in STEP_KEYS}


def evaluate_triplets(eval_fn, params, batch_stats,
                      batches: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
  """Means over all valid triplets of `batches` (batch means weighted by their counts)."""
  outs = jax.device_get([eval_fn(params, batch_stats, _step_batch(b)) for b in batches])
  counts = np.asarray([o['count'] for o in outs], np.float64)
  total = max(counts.sum(), 1.0)
  return {k: float(np.sum(np.asarray([o[k] for o in outs]) * counts) / total)
          for k in outs[0] if k != 'count'}


def _mean_train_metrics(pending: list[dict], step: int) -> dict[str, float]:
  fetched = jax.device_get(pending)
  losses = np.asarray([m['loss'] for m in fetched])
  if not np.all(np.isfinite(losses)):
    bad = step - len(fetched) + int(np.flatnonzero(~np.isfinite(losses))[0]) + 1
    raise FloatingPointError(f'lipsync: non-finite loss at step {bad}; stopping. Lower '
                             'config.lipsync.lr or check the clips.')
  return {f'train/{k}': float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


# ------------------------------------------------------------------------------------------
# Training loop and checkpoints.
# ------------------------------------------------------------------------------------------

def train_lipsync(cfg, train_clips: Sequence[SyncClip], val_clips: Sequence[SyncClip],
                  workdir: str) -> tuple[lipsync_model.LipSyncNet, dict[str, Any]]:
  """Trains for cfg.steps steps (resuming from workdir), returns (best model, history).

  Every eval_every steps (and at the last step): the mean training metrics since the last
  pass, validation triplet metrics, a latest checkpoint (state, step, history) and, when the
  validation loss improves (or without validation clips, always), the best weights.
  history: {'data': sampler reports, 'evals': [per-pass metrics], 'best_step': int}.
  """
  check_lipsync_config(cfg)
  sampler = TripletSampler(train_clips, cfg, seed=cfg.seed)
  val_sampler = TripletSampler(val_clips, cfg, seed=cfg.seed + 1) if val_clips else None
  val_batches = val_sampler.eval_batches() if val_sampler is not None else []
  data = {'train': sampler.report(),
          'val': val_sampler.report() if val_sampler is not None else None}
  for split, report in data.items():
    if report and (report['too_short'] or report['no_known_speaker']):
      console.say('lipsync %s: %d of %d clips give no anchor (%d shorter than %d frames, %d '
                  'without a usable speaker)', split, report['clips'] - report['anchor_clips'],
                  report['clips'], report['too_short'], cfg.window_frames,
                  report['no_known_speaker'])

  model_cfg, statics = _model_config(cfg), StepStatics.from_config(cfg)
  graphdef, _, _ = nnx.eval_shape(lambda: _model_states(model_cfg))
  ckpt = checkpointing.StageCheckpoints(workdir, STAGE)
  history = {'data': data, 'evals': [], 'best_step': -1}
  best_loss = float('inf')
  # One device, stated explicitly: a fresh and a restored state then have the same (committed)
  # placement, so both reach the same compiled step.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if ckpt.latest_step() is not None:
    # Restored onto abstract arrays: a resumed (or finished) run never initialises the model.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            jax.eval_shape(functools.partial(_new_state, model_cfg, statics)))
    state, _, meta = ckpt.restore_latest(abstract)
    history.update(evals=meta['evals'], best_step=meta['best_step'])
    best_loss = meta['best_val_loss']
    console.say('lipsync: resuming at step %d of %d', int(state.step), cfg.steps)
  else:
    state = jax.device_put(_init_state(model_cfg, statics), device)

  run_train_step = make_train_step(cfg, graphdef)
  run_eval_step = make_eval_step(cfg, graphdef)
  step = int(state.step)  # tracked on the host: the loop never waits on the device
  pending = []
  while step < cfg.steps:
    state, metrics = run_train_step(state, _step_batch(sampler.batch(step)))
    step += 1
    pending.append(metrics)
    if step % cfg.eval_every and step != cfg.steps:
      continue
    record = {'step': step, **_mean_train_metrics(pending, step)}
    pending = []
    if val_batches:
      record.update({f'val/{k}': v for k, v in evaluate_triplets(
          run_eval_step, state.params, state.batch_stats, val_batches).items()})
    val_loss = record.get('val/loss', -float(step))  # no validation: the latest is the best
    if val_loss < best_loss:
      best_loss = val_loss
      history['best_step'] = step
      ckpt.save_best(step, state.params, state.batch_stats,
                     {'stage': STAGE, 'step': step, 'config': cfg.to_dict()})
    history['evals'].append(record)
    console.say('lipsync step %d: %s', step,
                ', '.join(f'{k} {v:.4f}' for k, v in record.items() if k != 'step'))
    ckpt.save_latest(step, state, {'step': step},
                     {'evals': history['evals'], 'best_step': history['best_step'],
                      'best_val_loss': best_loss})
  params, batch_stats, _ = ckpt.restore_best(state.params, state.batch_stats)
  ckpt.close()
  return nnx.merge(graphdef, params, batch_stats), history


def restore_lipsync(cfg, workdir: str) -> lipsync_model.LipSyncNet:
  """The best LipSyncNet weights saved by `train_lipsync` under workdir."""
  check_lipsync_config(cfg)

  def create():
    return nnx.split(lipsync_model.LipSyncNet(cfg, rngs=nnx.Rngs(0)), nnx.Param, nnx.BatchStat)

  graphdef, like_params, like_stats = nnx.eval_shape(create)
  if not os.path.isdir(os.path.join(workdir, 'checkpoints', STAGE, 'best')):
    raise FileNotFoundError(f'no lipsync checkpoint under {workdir}; run train_lipsync first')
  ckpt = checkpointing.StageCheckpoints(workdir, STAGE, read_only=True)
  params, batch_stats, _ = ckpt.restore_best(like_params, like_stats)
  ckpt.close()
  return nnx.merge(graphdef, params, batch_stats)


# ------------------------------------------------------------------------------------------
# Active-speaker selection.
# ------------------------------------------------------------------------------------------

def _next_power_of_two(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def window_starts(num_frames: int, window: int, hop: int) -> np.ndarray:
  """Starts of the scoring windows: every `hop` frames, plus one aligned with the clip's end."""
  if num_frames <= window:
    return np.zeros((1,), np.int64)
  starts = np.arange(0, num_frames - window + 1, hop)
  if starts[-1] != num_frames - window:
    starts = np.append(starts, num_frames - window)
  return starts


def clip_windows(clip: SyncClip, window: int, hop: int) -> tuple[np.ndarray, np.ndarray]:
  """(video uint8[K, W, T, S, S, C], audio f32[W, 4T, 64]) scoring windows of a clip.

  A clip shorter than T frames is first padded by repeating its last frame (video) and its
  last 4 log-mel rows (audio).
  """
  tracks, logmel = clip.tracks, clip.logmel
  short = window - clip.num_frames
  if short > 0:
    tracks = np.concatenate([tracks, np.repeat(tracks[:, -1:], short, axis=1)], axis=1)
    logmel = np.concatenate([logmel, np.tile(logmel[-MEL:], (short, 1))], axis=0)
  starts = window_starts(tracks.shape[1], window, hop)
  frames = starts[:, None] + np.arange(window)  # [W, T]
  mel_rows = MEL * starts[:, None] + np.arange(MEL * window)  # [W, 4T]
  return tracks[:, frames], logmel[mel_rows].astype(np.float32)


def _map_in_chunks(fn, x: jax.Array, chunk: int) -> jax.Array:
  """fn over the leading axis of x, `chunk` rows at a time (zero-padded to whole chunks).

  One compiled loop (lax.map) whose activation memory is bounded by the chunk, not by the
  number of windows.
  """
  n = x.shape[0]
  size = min(chunk, n)
  pad = (-n) % size
  x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  out = jax.lax.map(fn, x.reshape((-1, size) + x.shape[1:]))
  return out.reshape((-1,) + out.shape[2:])[:n]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _track_distances(graphdef, chunk: int, params, batch_stats, video: jax.Array,
                     audio: jax.Array, window_mask: jax.Array) -> jax.Array:
  """f32[K'] mean over valid windows of |video_emb - audio_emb|, for padded
  video uint8[K', W', T, S, S, C], audio f32[W', 4T, 64] and window_mask bool[W']."""
  model = nnx.merge(graphdef, params, batch_stats)
  num_tracks, num_windows = video.shape[:2]
  flat = video.reshape((num_tracks * num_windows,) + video.shape[2:])
  video_emb = _map_in_chunks(lambda v: model.embed_video(_faces(v)), flat, chunk)
  audio_emb = _map_in_chunks(model.embed_audio, audio, chunk)
  distances = lipsync_loss.euclidean_distance(
      video_emb.reshape(num_tracks, num_windows, -1), audio_emb[None])
  weight = window_mask.astype(distances.dtype)
  return jnp.sum(distances * weight, axis=1) / jnp.maximum(jnp.sum(weight), 1.0)


class TrackScorer:
  """Scores clips with one model: split once, one jitted call per clip.

  Track and window counts are padded to powers of two, so clips of similar size share one
  compiled function; padded windows are masked out, padded tracks dropped.
  """

  def __init__(self, model: lipsync_model.LipSyncNet, cfg):
    self.graphdef, self.params, self.batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    self.cfg = cfg
    self.chunk = 2 * int(cfg.batch_size)

  def __call__(self, clip: SyncClip) -> np.ndarray:
    _check_crops([clip], self.cfg)
    video, audio = clip_windows(clip, int(self.cfg.window_frames), int(self.cfg.score_hop_frames))
    num_tracks, num_windows = video.shape[:2]
    pad_k = _next_power_of_two(num_tracks) - num_tracks
    pad_w = _next_power_of_two(num_windows) - num_windows
    video = np.pad(video, [(0, pad_k), (0, pad_w)] + [(0, 0)] * (video.ndim - 2))
    audio = np.pad(audio, [(0, pad_w), (0, 0), (0, 0)])
    mask = np.arange(num_windows + pad_w) < num_windows
    out = _track_distances(self.graphdef, self.chunk, self.params, self.batch_stats, video,
                           audio, mask)
    return np.asarray(out)[:num_tracks]


def score_tracks(model: lipsync_model.LipSyncNet, clip: SyncClip, cfg) -> np.ndarray:
  """f32[K]: each track's mean embedding distance to the clip's audio (lower: in sync)."""
  return TrackScorer(model, cfg)(clip)


def select_speaker(model: lipsync_model.LipSyncNet, clip: SyncClip,
                   cfg) -> tuple[int, np.ndarray]:
  """(index of the track closest to the audio, distances f32[K])."""
  distances = score_tracks(model, clip, cfg)
  return int(np.argmin(distances)), distances


def largest_face(clip: SyncClip) -> int:
  """Baseline: the track with the largest mean face-box area."""
  if clip.areas is None:
    raise ValueError(f'SyncClip {clip.clip_id!r} has no areas for the largest-face baseline.')
  return int(np.argmax(clip.areas))


def random_face(clip: SyncClip, rng: np.random.Generator) -> int:
  """Baseline: a uniformly random track."""
  return int(rng.integers(clip.num_tracks))


def speaker_accuracy(model: lipsync_model.LipSyncNet, clips: Sequence[SyncClip],
                     cfg) -> dict[str, Any]:
  """Active-speaker accuracy on clips with >= 2 tracks and a known speaker, with baselines.

  Returns {'lipsync', 'random_face' (seeded with cfg.seed), 'largest_face' (None unless every
  evaluated clip has areas), 'num_clips' (evaluated), 'skipped' (single-track or unknown
  speaker)}.
  """
  evaluated = [c for c in clips if c.num_tracks >= 2 and c.speaker >= 0]
  result: dict[str, Any] = {'num_clips': len(evaluated), 'skipped': len(clips) - len(evaluated),
                            'lipsync': None, 'random_face': None, 'largest_face': None}
  if not evaluated:
    return result
  scorer = TrackScorer(model, cfg)
  speakers = np.asarray([c.speaker for c in evaluated])
  chosen = np.asarray([int(np.argmin(scorer(c))) for c in evaluated])
  rng = np.random.default_rng(cfg.seed)
  guessed = np.asarray([random_face(c, rng) for c in evaluated])
  result['lipsync'] = float(np.mean(chosen == speakers))
  result['random_face'] = float(np.mean(guessed == speakers))
  if all(c.areas is not None for c in evaluated):
    result['largest_face'] = float(np.mean(
        np.asarray([largest_face(c) for c in evaluated]) == speakers))
  return result
