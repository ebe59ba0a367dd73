"""LipSyncNet: face-track and log-mel encoders into one L2-normalised space (SPEC stage 2).

The active speaker of an utterance is the face track whose embedding lies closest to the
embedding of the utterance's audio over the same time span (see mer_jax/preprocess/lipsync_training.py).

Inputs of one window of T video frames (25 fps; 100 log-mel frames/s, i.e. a 160-sample hop
at 16 kHz, so 4 mel frames per video frame):
  video f32[B, T, S, S, C]   a face track, fixed square crops of side S, values in [0, 1];
  audio f32[B, 4T, 64]       the 64-band log-mel spectrogram of the same span.

Video branch: per width in `video_widths`, a 3-D convolution (3x3x3 over time and space),
batch norm, ReLU and a 1x2x2 max pool (space only). Audio branch: per width in `audio_widths`,
a 2-D convolution (3x3 over time and mel bands), batch norm, ReLU and a max pool that halves the
mel axis and, in the first two blocks, the time axis (4T -> T). Then each branch pools globally
over space (video) or mel bands (audio) but keeps its T time steps: both branches end as
f32[B, T, width], flattened into a two-layer MLP and L2-normalised. Keeping time is what lets
an embedding say *when* the mouth opens or the energy rises, which is what synchrony is; it
also makes the video embedding depend on frame order.

Config (`cfg`, the `config.lipsync` ConfigDict) keys read here:
  window_frames  T, video frames per window.
  crop_size      S, side of the square face crops (divisible by 2**len(video_widths)).
  channels       C, channels of the face crops (1 grey, 3 RGB).
  embed_dim      size of the shared embedding (256 in the paper).
  video_widths   output channels of the video blocks, e.g. (32, 64, 128, 256).
  audio_widths   output channels of the audio blocks (at least 2 blocks), e.g. (32, 64, 128, 256).
  batchnorm_momentum  running-average momentum of every batch norm (0.9).
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from mer_jax.models import graph as graph_lib

MEL_BANDS = 64
MEL_FRAMES_PER_VIDEO_FRAME = 4  # 100 mel frames/s (160-sample hop at 16 kHz) / 25 fps
# Audio blocks that also halve the time axis: 2 halvings take 4T mel frames to T steps.
_AUDIO_TIME_HALVINGS = 2


def check_lipsync_model_config(cfg) -> None:
  """Raises ValueError naming the first config.lipsync model key that cannot work."""
  widths_ok = len(cfg.video_widths) >= 1 and len(cfg.audio_widths) >= _AUDIO_TIME_HALVINGS
  if not widths_ok:
    raise ValueError('config.lipsync: need >= 1 video_widths and >= 2 audio_widths (the first '
                     f'two audio blocks halve time); got {cfg.video_widths}, {cfg.audio_widths}.')
  scale = 2 ** len(cfg.video_widths)
  if cfg.crop_size % scale:
    raise ValueError(f'config.lipsync.crop_size ({cfg.crop_size}) must be divisible by '
                     f'2**len(video_widths) = {scale}.')
  for key in ('window_frames', 'channels', 'embed_dim'):
    if cfg[key] < 1:
      raise ValueError(f'config.lipsync.{key} must be >= 1, got {cfg[key]}.')


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def max_pool(x: jax.Array, pool: tuple[int, ...]) -> jax.Array:
  """Non-overlapping max pool of [B, *spatial, C] by `pool` (which divides each axis).

  A reshape and a max: the same result as a VALID max pool with stride == window, and its
  gradient compiles and runs faster on CPU than XLA's select-and-scatter.
  """
  spatial = x.shape[1:-1]
  if len(pool) != len(spatial) or any(n % p for n, p in zip(spatial, pool)):
    raise ValueError(f'max_pool: pool {pool} must divide the axes {spatial}.')
  split = [x.shape[0]]
  for n, p in zip(spatial, pool):
    split += [n // p, p]
  reduce_axes = tuple(range(2, 2 * len(spatial) + 1, 2))
  return x.reshape(split + [x.shape[-1]]).max(axis=reduce_axes)


class TimeStackedConv3D(nnx.Module):
  """A 3-D convolution (kernel kt x 3 x 3, SAME padding, no bias) over [B, T, H, W, C].

  Computed as one 2-D convolution over (H, W) of the kt time-shifted copies of each frame
  stacked on the channel axis, with the time axis folded into the batch: the same numbers as
  a native 3-D convolution, but XLA's CPU backend differentiates native 3-D convolutions about
  10x more slowly, and on accelerators this is a plain 2-D convolution. The kernel keeps the
  3-D layout f32[kt, 3, 3, C_in, C_out].
  """

  def __init__(self, in_features: int, out_features: int, *, time_kernel: int = 3,
               rngs: nnx.Rngs):
    if time_kernel % 2 != 1:
      raise ValueError(f'time_kernel must be odd (SAME padding), got {time_kernel}.')
    self.time_kernel = time_kernel
    init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2, 3), out_axis=4)
    self.kernel = nnx.Param(init(rngs.params(), (time_kernel, 3, 3, in_features, out_features)))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, h, w, c = x.shape
    half = self.time_kernel // 2
    padded = jnp.pad(x, [(0, 0), (half, half), (0, 0), (0, 0), (0, 0)])
    stacked = jnp.concatenate([padded[:, dt:dt + t] for dt in range(self.time_kernel)], axis=-1)
    kernel = self.kernel[...]
    kt, kh, kw, c_in, c_out = kernel.shape
    # Channel index of the stack is dt * C_in + c: put kt next to C_in in the same order.
    kernel = kernel.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * c_in, c_out)
    out = jax.lax.conv_general_dilated(
        stacked.reshape(b * t, h, w, kt * c), kernel, window_strides=(1, 1), padding='SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return out.reshape(b, t, h, w, c_out)


class ConvBlock(nnx.Module):
  """Convolution (SAME padding, no bias: batch norm follows), batch norm, ReLU, max pool.

  `dims` 3: a 3x3x3 convolution over (time, height, width) of [B, T, H, W, C];
  `dims` 2: a 3x3 convolution over (time, mel) of [B, T, M, C].
  """

  def __init__(self, in_features: int, out_features: int, dims: int, *, momentum: float,
               rngs: nnx.Rngs):
    if dims == 3:
      self.conv = TimeStackedConv3D(in_features, out_features, rngs=rngs)
    else:
      self.conv = nnx.Conv(in_features, out_features, kernel_size=(3, 3), padding='SAME',
                           use_bias=False, rngs=rngs)
    self.norm = nnx.BatchNorm(out_features, momentum=momentum, epsilon=1e-5, rngs=rngs)

  def __call__(self, x: jax.Array, pool: tuple[int, ...], *, train: bool) -> jax.Array:
    x = self.norm(self.conv(x), use_running_average=not train)
    x = jax.nn.relu(x)
    return max_pool(x, pool)


class EmbeddingHead(nnx.Module):
  """Flattened [T, width] features -> Linear, ReLU, Linear -> unit vector."""

  def __init__(self, in_features: int, embed_dim: int, *, rngs: nnx.Rngs):
    self.hidden = graph_lib.linear(in_features, embed_dim, rngs=rngs, axes=('embed', 'mlp'))
    self.out = graph_lib.linear(embed_dim, embed_dim, rngs=rngs, axes=('mlp', 'embed'))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    return l2_normalize(self.out(jax.nn.relu(self.hidden(x))))


class LipSyncNet(nnx.Module):
  """Two encoders (face track, log-mel) into one unit-norm space; see the module docstring."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    check_lipsync_model_config(cfg)
    self.window_frames = int(cfg.window_frames)
    self.crop_size = int(cfg.crop_size)
    self.channels = int(cfg.channels)
    self.embed_dim = int(cfg.embed_dim)
    momentum = float(cfg.batchnorm_momentum)
    video_in = (self.channels,) + tuple(cfg.video_widths[:-1])
    self.video_blocks = nnx.List([
        ConvBlock(i, o, 3, momentum=momentum, rngs=rngs)
        for i, o in zip(video_in, cfg.video_widths)])
    audio_in = (1,) + tuple(cfg.audio_widths[:-1])
    self.audio_blocks = nnx.List([
        ConvBlock(i, o, 2, momentum=momentum, rngs=rngs)
        for i, o in zip(audio_in, cfg.audio_widths)])
    self.video_head = EmbeddingHead(self.window_frames * cfg.video_widths[-1], self.embed_dim,
                                    rngs=rngs)
    self.audio_head = EmbeddingHead(self.window_frames * cfg.audio_widths[-1], self.embed_dim,
                                    rngs=rngs)

  def _check(self, name: str, x: jax.Array, expected: tuple[int, ...]) -> None:
    if tuple(x.shape[1:]) != expected:
      raise ValueError(f'LipSyncNet.{name}: expected [B, {", ".join(map(str, expected))}], '
                       f'got {tuple(x.shape)}.')

  def embed_video(self, video: jax.Array, *, train: bool = False) -> jax.Array:
    """f32[B, T, S, S, C] face windows in [0, 1] -> f32[B, embed_dim] unit vectors."""
    self._check('embed_video', video,
                (self.window_frames, self.crop_size, self.crop_size, self.channels))
    x = video.astype(jnp.float32)
    for block in self.video_blocks:
      x = block(x, (1, 2, 2), train=train)
    return self.video_head(x.mean(axis=(2, 3)))  # [B, T, width]: pooled over space

  def embed_audio(self, audio: jax.Array, *, train: bool = False) -> jax.Array:
    """f32[B, 4T, 64] log-mel windows -> f32[B, embed_dim] unit vectors."""
    self._check('embed_audio', audio,
                (MEL_FRAMES_PER_VIDEO_FRAME * self.window_frames, MEL_BANDS))
    x = audio.astype(jnp.float32)[..., None]
    for i, block in enumerate(self.audio_blocks):
      time_pool = 2 if i < _AUDIO_TIME_HALVINGS else 1
      mel_pool = 2 if x.shape[2] >= 2 else 1
      x = block(x, (time_pool, mel_pool), train=train)
    return self.audio_head(x.mean(axis=2))  # [B, T, width]: pooled over mel bands

  def __call__(self, video: jax.Array, audio: jax.Array,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    """(video embeddings f32[B, D], audio embeddings f32[B', D])."""
    return self.embed_video(video, train=train), self.embed_audio(audio, train=train)
