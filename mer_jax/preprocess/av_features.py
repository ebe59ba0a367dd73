"""Stage 3 (audio, visual): waveforms -> Wav2Vec2 and face tracks -> TimeSformer, mean-pooled.

Audio: each waveform is normalised to zero mean and unit variance (as Wav2Vec2's feature
extractor does with do_normalize), waveforms are sorted by length and padded to a length
bucket (a multiple of `bucket_seconds`) with as many rows as `seconds_per_batch` allows, so the
encoder compiles once per bucket; the feature is the last hidden states mean-pooled over each
waveform's valid frames (SPEC stage 3, 1024-d for wav2vec2-large).

Visual: `num_frames` frames taken evenly across the chosen face track, resized to the
encoder's image size, scaled to [0, 1] and normalised with `pixel_mean` / `pixel_std` (the
VideoMAE processor's 0.45 / 0.225 that TimeSformer checkpoints use); batches of a fixed
`clips_per_batch` (the last one padded), one compile; the feature is the mean of all tokens'
last hidden states (768-d for TimeSformer-base).

Without a checkpoint folder the encoders are initialised at random from the config's
`random` block (the offline demo: frozen random features).
"""

from __future__ import annotations

import math
from typing import Sequence

import cv2
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from mer_jax import console
from mer_jax.models import timesformer
from mer_jax.models import wav2vec2


def load_audio_encoder(enc_cfg, seed: int) -> wav2vec2.Wav2Vec2Encoder:
  if enc_cfg.checkpoint:
    _, model = wav2vec2.load_hf_checkpoint(enc_cfg.checkpoint, seed=seed)
    return model
  cfg = wav2vec2.Wav2Vec2Config.from_hf({'model_type': 'wav2vec2', **enc_cfg.random.to_dict()})
  return wav2vec2.Wav2Vec2Encoder(cfg, rngs=nnx.Rngs(seed))


def load_visual_encoder(enc_cfg, seed: int) -> timesformer.Timesformer:
  if enc_cfg.checkpoint:
    _, model = timesformer.load_hf_checkpoint(enc_cfg.checkpoint, seed=seed)
    return model
  cfg = timesformer.TimesformerConfig.from_hf({'model_type': 'timesformer', 'num_channels': 3,
                                               **enc_cfg.random.to_dict()})
  return timesformer.Timesformer(cfg, rngs=nnx.Rngs(seed))


def _jitted(model: nnx.Module, method: str, **kwargs):
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, *args):
    return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs)
  return lambda *args: run(state, *args)


def normalize_waveform(audio: np.ndarray) -> np.ndarray:
  audio = np.asarray(audio, np.float32)
  return (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)


class AudioFeaturizer:
  """Waveforms -> f32[N, hidden] utterance features (see the module docstring).

  Holds one jitted encoder, so repeated calls (chunks of a split) reuse its compilations.
  """

  def __init__(self, model: wav2vec2.Wav2Vec2Encoder, *, sample_rate: int,
               seconds_per_batch: float, bucket_seconds: float = 0.5, normalize: bool = True):
    self.hidden = model.config.hidden_size
    self.run = _jitted(model, 'utterance_features')
    self.step = max(int(bucket_seconds * sample_rate), model.config.receptive_field)
    self.budget = int(seconds_per_batch * sample_rate)
    self.normalize = normalize

  def batches(self, lengths: np.ndarray) -> list[tuple[list[int], int, int]]:
    """(members, rows, padded length) per batch: sorted by length, bucketed, row-budgeted."""
    order = np.argsort(lengths, kind='stable')
    out, i = [], 0
    while i < len(order):
      padded = int(math.ceil(lengths[order[i]] / self.step) * self.step)
      rows = max(1, self.budget // padded)
      members = [int(j) for j in order[i:i + rows] if lengths[j] <= padded]
      out.append((members, rows, padded))
      i += len(members)
    return out

  def __call__(self, waveforms: Sequence[np.ndarray], desc: str = 'audio features'
               ) -> np.ndarray:
    out = np.zeros((len(waveforms), self.hidden), np.float32)
    lengths = np.array([max(len(w), 1) for w in waveforms], np.int64)
    for members, rows, padded in console.progress(self.batches(lengths), desc=desc,
                                                  unit='batch'):
      x = np.zeros((rows, padded), np.float32)
      mask = np.zeros((rows, padded), np.int32)
      for r, j in enumerate(members):
        w = np.asarray(waveforms[j], np.float32)
        if len(w) == 0:
          continue
        w = normalize_waveform(w) if self.normalize else w
        x[r, :len(w)] = w
        mask[r, :len(w)] = 1
      mask[len(members):, :self.step] = 1  # padding rows: something valid, discarded below
      features = np.asarray(self.run(jnp.asarray(x), jnp.asarray(mask)))
      out[members] = features[:len(members)]
    return out


def sample_frames(track: np.ndarray, num_frames: int, size: int) -> np.ndarray:
  """uint8[num_frames, size, size, 3]: evenly spaced frames of a track, resized."""
  index = np.linspace(0, len(track) - 1, num_frames).round().astype(int)
  frames = track[index]
  if frames.shape[1] != size:
    frames = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA)
                       for f in frames])
  return frames


class VisualFeaturizer:
  """Face tracks uint8[F, S, S, 3] -> f32[N, hidden] (see the module docstring)."""

  def __init__(self, model: timesformer.Timesformer, *, clips_per_batch: int,
               pixel_mean: float = 0.45, pixel_std: float = 0.225):
    self.cfg = model.config
    self.run = _jitted(model, 'utterance_features', channels_last=True)
    self.clips_per_batch = clips_per_batch
    self.pixel_mean, self.pixel_std = pixel_mean, pixel_std

  def __call__(self, tracks: Sequence[np.ndarray], desc: str = 'visual features') -> np.ndarray:
    cfg, n = self.cfg, self.clips_per_batch
    out = np.zeros((len(tracks), cfg.hidden_size), np.float32)
    for start in console.progress(range(0, len(tracks), n), desc=desc, unit='batch'):
      chunk = tracks[start:start + n]
      x = np.zeros((n, cfg.num_frames, cfg.image_size, cfg.image_size, 3), np.float32)
      for r, track in enumerate(chunk):
        frames = sample_frames(track, cfg.num_frames, cfg.image_size) / 255.0
        x[r] = (frames - self.pixel_mean) / self.pixel_std
      features = np.asarray(self.run(jnp.asarray(x)))
      out[start:start + len(chunk)] = features[:len(chunk)]
    return out


def _with_checkpoint(enc_cfg, checkpoint: str | None):
  if checkpoint is None:
    return enc_cfg
  located = enc_cfg.copy_and_resolve_references()
  located.checkpoint = checkpoint
  return located


def audio_featurizer(raw_cfg, checkpoint: str | None = None) -> AudioFeaturizer:
  """The config's audio featurizer (config.raw); `checkpoint` reads the encoder from another
  folder than raw.audio_encoder.checkpoint (e.g. a model bundle's copy of it)."""
  enc = raw_cfg.audio_encoder
  return AudioFeaturizer(
      load_audio_encoder(_with_checkpoint(enc, checkpoint), int(raw_cfg.encoder_seed)),
      sample_rate=int(raw_cfg.sample_rate), seconds_per_batch=float(enc.seconds_per_batch),
      bucket_seconds=float(enc.bucket_seconds), normalize=bool(enc.normalize))


def visual_featurizer(raw_cfg, checkpoint: str | None = None) -> VisualFeaturizer:
  """The config's visual featurizer (config.raw); `checkpoint` as in `audio_featurizer`."""
  enc = raw_cfg.visual_encoder
  return VisualFeaturizer(
      load_visual_encoder(_with_checkpoint(enc, checkpoint), int(raw_cfg.encoder_seed)),
      clips_per_batch=int(enc.clips_per_batch), pixel_mean=float(enc.pixel_mean),
      pixel_std=float(enc.pixel_std))
