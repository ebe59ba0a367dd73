"""The TimeSformer video encoder in Flax NNX, loading Hugging Face checkpoints.

`load_hf_checkpoint(folder)` reads `config.json` and `model.safetensors` of a
`transformers.TimesformerModel` (or of a `TimesformerForVideoClassification`, whose weights sit
under a `timesformer.` prefix; its classifier is listed, not loaded) into a `Timesformer`;
`transformers` is used for nothing here. It computes what the transformers model computes:

* Embeddings. Each frame is cut into P x P patches by a Conv2d (kernel = stride = P), giving N
  patch tokens per frame. A cls token is prepended, spatial position embeddings [1 + N, D] are
  added (the same to every frame), then temporal embeddings [T, D] (the same to every patch).
  The token order is cls, then patch-major and frame-minor: token 1 + n * T + t is patch n of
  frame t. Dropout follows each addition.
* Layers, pre-LayerNorm. With 'divided_space_time' (every released checkpoint): temporal
  attention among the T tokens of each patch (LayerNorm -> attention -> a further temporal
  dense projection -> residual); then spatial attention among the N patches of each frame
  (LayerNorm -> attention -> residual) with the cls token copied into every frame and its
  per-frame outputs averaged back into one; then the GELU MLP (LayerNorm -> MLP -> residual).
  The cls token skips the temporal step; the spatial residual adds to the temporally updated
  patches.
  With 'joint_space_time' one attention runs over all 1 + T * N tokens; with 'space_only' the
  frames are encoded independently, each with its own cls token and no temporal embeddings.
* A final LayerNorm. `__call__` returns it, f32[B, 1 + T * N, D] (for 'space_only' the
  transformers output [B * T, 1 + N, D] reshaped to [B, T * (1 + N), D], frame-major);
  `all_hidden_states=True` gives transformers' `hidden_states`, which stop before that norm,
  plus the normed output last. `utterance_features` mean-pools the output over all tokens: the
  paper's visual feature.

Inputs are pixel values f32[B, T, C, H, W] like transformers' (already normalised by an image
processor), or f32[B, T, H, W, C] with `channels_last=True` (see also `to_channels_last`).
The loader builds the module abstractly and fills it from the checkpoint: no random
initialisation is computed only to be overwritten.

A patch grid other than the config's (image_size // patch_size squared) is handled like
transformers: the patch position embeddings are resized by nearest-neighbour interpolation
(only when the number of patches differs, as there). A number of frames other than the config's
`num_frames` is handled the same way (nearest-neighbour temporal embeddings) for
'joint_space_time' and 'space_only'; for 'divided_space_time' it is a ValueError, because the
transformers layers group tokens by the config's frame count whatever the input's, which mixes
patches and frames instead of attending over time.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from mer_jax.models import hf_checkpoint
from mer_jax.models.hf_checkpoint import Transform
from mer_jax.models.text_transformer import ACTIVATIONS
from mer_jax.models.text_transformer import dense
from mer_jax.models.text_transformer import layer_norm

ATTENTION_TYPES = ('divided_space_time', 'joint_space_time', 'space_only')
# Checkpoint entries that belong to heads we do not build; they are listed, not loaded.
_IGNORED_PREFIXES = ('classifier.',)


@dataclasses.dataclass(frozen=True)
class TimesformerConfig:
  image_size: int
  patch_size: int
  num_channels: int
  num_frames: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  hidden_act: str = 'gelu'
  hidden_dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path_rate: float = 0.0
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True
  attention_type: str = 'divided_space_time'

  def __post_init__(self):
    if self.attention_type not in ATTENTION_TYPES:
      raise ValueError(f'attention_type {self.attention_type!r} is not supported; expected one '
                       f'of {ATTENTION_TYPES}')
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f'hidden_act {self.hidden_act!r} is not supported; expected one of '
                       f'{sorted(ACTIVATIONS)}')
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not divisible by num_heads '
                       f'{self.num_heads}')
    if not 0 < self.patch_size <= self.image_size:
      raise ValueError(f'patch_size {self.patch_size} must be in [1, image_size '
                       f'{self.image_size}]')
    if self.num_frames < 1 or self.num_channels < 1:
      raise ValueError(f'num_frames {self.num_frames} and num_channels {self.num_channels} '
                       'must be positive')

  @property
  def grid(self) -> int:
    """Patches along each side of a config-sized frame."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid ** 2

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any] | Any) -> 'TimesformerConfig':
    """From a transformers config object or the dict of a config.json."""
    get = hf_checkpoint.config_getter(hf, ('timesformer',))
    sizes = {}
    for key in ('image_size', 'patch_size'):
      value = get(key)
      if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
      if isinstance(value, bool) or not isinstance(value, int):
        # transformers' layers compute `image_size // patch_size`, so only square ints work.
        raise ValueError(f'{key} {value!r} is not supported (a single int: square frames and '
                         'patches)')
      sizes[key] = value
    return cls(
        image_size=sizes['image_size'], patch_size=sizes['patch_size'],
        num_channels=int(get('num_channels', 3)), num_frames=int(get('num_frames', 8)),
        hidden_size=int(get('hidden_size')), num_layers=int(get('num_hidden_layers')),
        num_heads=int(get('num_attention_heads')),
        intermediate_size=int(get('intermediate_size')),
        hidden_act=str(get('hidden_act', 'gelu')),
        hidden_dropout=float(get('hidden_dropout_prob', 0.0) or 0.0),
        attention_dropout=float(get('attention_probs_dropout_prob', 0.0) or 0.0),
        drop_path_rate=float(get('drop_path_rate', 0.0) or 0.0),
        layer_norm_eps=float(get('layer_norm_eps', 1e-6)),
        qkv_bias=bool(get('qkv_bias', True)),
        attention_type=str(get('attention_type', 'divided_space_time')))


def _param(shape: tuple[int, ...], axes: tuple[str | None, ...], rngs: nnx.Rngs,
           init=nnx.initializers.truncated_normal(0.02)) -> nnx.Param:
  return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape))


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
  """Source index of each output position of torch's `interpolate(mode='nearest')`.

  floor(i * in / out) with the scale in float32, as torch computes it.
  """
  scale = np.float32(size_in) / np.float32(size_out)
  index = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(index, size_in - 1)


def to_channels_last(pixel_values: jax.Array) -> jax.Array:
  """[B, T, C, H, W] (transformers' layout) -> [B, T, H, W, C]."""
  return jnp.moveaxis(pixel_values, 2, -1)


class Embeddings(nnx.Module):

  def __init__(self, cfg: TimesformerConfig, *, rngs: nnx.Rngs, dtype):
    p, d = cfg.patch_size, cfg.hidden_size
    self.config = cfg
    self.dtype = dtype
    self.patch = nnx.Conv(
        cfg.num_channels, d, (p, p), (p, p), padding='VALID', dtype=dtype, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02),
                                          (None, None, None, 'embed')),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ('embed',)))
    self.cls_token = _param((d,), ('embed',), rngs)
    self.position = _param((cfg.num_patches + 1, d), (None, 'embed'), rngs)
    if cfg.attention_type != 'space_only':
      self.time = _param((cfg.num_frames, d), (None, 'embed'), rngs,
                         nnx.initializers.zeros_init())
    self.position_dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)
    self.time_dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)

  def patch_positions(self, rows: int, cols: int) -> jax.Array:
    """Position embeddings of a rows x cols patch grid, [rows * cols, D]."""
    table = self.position[...][1:]
    if rows * cols == self.config.num_patches:  # transformers resizes only on a count change
      return table
    g = self.config.grid
    table = table.reshape(g, g, -1)[nearest_indices(g, rows)][:, nearest_indices(g, cols)]
    return table.reshape(rows * cols, -1)

  def __call__(self, pixel_values: jax.Array, *, train: bool) -> jax.Array:
    """[B, T, H, W, C] -> tokens [B, 1 + N * T, D] ([B * T, 1 + N, D] for 'space_only')."""
    cfg = self.config
    b, t, height, width, c = pixel_values.shape
    patches = self.patch(pixel_values.reshape(b * t, height, width, c).astype(self.dtype))
    rows, cols = patches.shape[1:3]
    n = rows * cols
    patches = patches.reshape(b, t, n, -1) + self.patch_positions(rows, cols).astype(self.dtype)
    cls = jnp.broadcast_to((self.cls_token[...] + self.position[...][0]).astype(self.dtype),
                           (b, 1, patches.shape[-1]))
    if cfg.attention_type == 'space_only':
      cls = jnp.broadcast_to(cls[:, None], (b, t, 1, patches.shape[-1]))
      x = jnp.concatenate([cls, patches], axis=2).reshape(b * t, 1 + n, -1)
      return self.position_dropout(x, deterministic=not train)
    patches = self.position_dropout(patches, deterministic=not train)
    cls = self.position_dropout(cls, deterministic=not train)
    time = self.time[...]
    if t != cfg.num_frames:  # only reached for joint_space_time (checked by the caller)
      time = time[nearest_indices(cfg.num_frames, t)]
    patches = self.time_dropout(patches + time[:, None].astype(self.dtype),
                                deterministic=not train)
    tokens = patches.transpose(0, 2, 1, 3).reshape(b, n * t, -1)  # patch-major, frame-minor
    return jnp.concatenate([cls, tokens], axis=1)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection and an output projection."""

  def __init__(self, cfg: TimesformerConfig, *, rngs: nnx.Rngs, dtype):
    h = cfg.hidden_size
    self.num_heads = cfg.num_heads
    self.qkv = nnx.LinearGeneral(
        h, (3, h), use_bias=cfg.qkv_bias, dtype=dtype, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02),
                                          ('embed', None, 'heads')),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None, 'heads')))
    self.output = dense(h, h, ('heads', 'embed'), rngs, dtype)
    self.attention_dropout = nnx.Dropout(cfg.attention_dropout, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)

  def __call__(self, x, *, train: bool):
    b, length, h = x.shape
    head_dim = h // self.num_heads
    qkv = self.qkv(x).reshape(b, length, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * head_dim ** -0.5
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    weights = self.attention_dropout(weights, deterministic=not train)
    context = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, length, h)
    return self.dropout(self.output(context), deterministic=not train)


class Layer(nnx.Module):

  def __init__(self, cfg: TimesformerConfig, drop_path: float, *, rngs: nnx.Rngs, dtype):
    h = cfg.hidden_size
    self.divided = cfg.attention_type == 'divided_space_time'
    if self.divided:
      self.temporal_norm = layer_norm(h, cfg.layer_norm_eps, rngs)
      self.temporal_attention = Attention(cfg, rngs=rngs, dtype=dtype)
      self.temporal_dense = dense(h, h, (None, 'embed'), rngs, dtype)
    self.attention_norm = layer_norm(h, cfg.layer_norm_eps, rngs)
    self.attention = Attention(cfg, rngs=rngs, dtype=dtype)
    self.mlp_norm = layer_norm(h, cfg.layer_norm_eps, rngs)
    self.intermediate = dense(h, cfg.intermediate_size, ('embed', 'mlp'), rngs, dtype)
    self.output = dense(cfg.intermediate_size, h, ('mlp', 'embed'), rngs, dtype)
    self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)
    # Stochastic depth: drops whole rows of the tensor it is applied to, as transformers does
    # (rows are (clip, patch) in the temporal step and (clip, frame) in the spatial one).
    self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2), rngs=rngs)
    self.act = cfg.hidden_act

  def mlp(self, x, *, train: bool):
    hidden = self.dropout(ACTIVATIONS[self.act](self.intermediate(self.mlp_norm(x))),
                          deterministic=not train)
    return self.dropout(self.output(hidden), deterministic=not train)

  def __call__(self, x, num_frames: int, *, train: bool):
    det = not train
    if not self.divided:
      x = x + self.drop_path(self.attention(self.attention_norm(x), train=train), deterministic=det)
      return x + self.drop_path(self.mlp(x, train=train), deterministic=det)
    b, length, h = x.shape
    t = num_frames
    n = (length - 1) // t
    cls, tokens = x[:, :1], x[:, 1:]
    # Temporal: the T frames of each patch attend to each other.
    temporal = self.temporal_attention(self.temporal_norm(tokens.reshape(b * n, t, h)),
                                       train=train)
    temporal = self.drop_path(temporal, deterministic=det).reshape(b, n * t, h)
    tokens = tokens + self.temporal_dense(temporal)
    # Spatial: the N patches of each frame plus a copy of the cls token attend to each other.
    frames = tokens.reshape(b, n, t, h).transpose(0, 2, 1, 3).reshape(b * t, n, h)
    cls_copies = jnp.broadcast_to(cls[:, None], (b, t, 1, h)).reshape(b * t, 1, h)
    spatial = self.attention(self.attention_norm(jnp.concatenate([cls_copies, frames], axis=1)),
                             train=train)
    spatial = self.drop_path(spatial, deterministic=det)
    cls_update = spatial[:, 0].reshape(b, t, h).mean(axis=1, keepdims=True)
    patch_update = spatial[:, 1:].reshape(b, t, n, h).transpose(0, 2, 1, 3).reshape(b, n * t, h)
    x = jnp.concatenate([cls, tokens], axis=1) + jnp.concatenate([cls_update, patch_update],
                                                                 axis=1)
    return x + self.drop_path(self.mlp(x, train=train), deterministic=det)


class Timesformer(nnx.Module):
  """The TimeSformer encoder stack with its final LayerNorm (no classifier)."""

  def __init__(self, cfg: TimesformerConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs, dtype=dtype)
    # transformers' stochastic depth decay rule: linspace(0, drop_path_rate, num_layers).
    rates = np.linspace(0.0, cfg.drop_path_rate, cfg.num_layers, dtype=np.float32)
    self.layers = nnx.List([Layer(cfg, float(r), rngs=rngs, dtype=dtype) for r in rates])
    self.norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)

  def _check_input(self, pixel_values: jax.Array, channels_last_input: bool) -> jax.Array:
    cfg = self.config
    if pixel_values.ndim != 5:
      raise ValueError(f'pixel_values must be [B, T, C, H, W] (or [B, T, H, W, C] with '
                       f'channels_last=True); got shape {tuple(pixel_values.shape)}')
    if not channels_last_input:
      pixel_values = to_channels_last(pixel_values)
    _, t, height, width, c = pixel_values.shape
    if c != cfg.num_channels:
      raise ValueError(f'pixel_values have {c} channels, the config {cfg.num_channels} (shape '
                       f'{tuple(pixel_values.shape)}, channels_last={channels_last_input})')
    if min(height, width) < cfg.patch_size:
      raise ValueError(f'frames of {height}x{width} are smaller than a {cfg.patch_size}-pixel '
                       'patch')
    if t != cfg.num_frames and cfg.attention_type == 'divided_space_time':
      raise ValueError(f'clips have {t} frames but the config has num_frames {cfg.num_frames}: '
                       'transformers\' divided space-time layers assume the config\'s frame '
                       'count, so resample the clips to it')
    return pixel_values

  def __call__(self, pixel_values: jax.Array, *, channels_last: bool = False,
               train: bool = False, all_hidden_states: bool = False):
    """Last hidden states f32[B, 1 + T * N, D].

    Args:
      pixel_values: f32[B, T, C, H, W], or f32[B, T, H, W, C] with `channels_last`.
      channels_last: the layout of `pixel_values`.
      train: enables dropout and stochastic depth (from the rng streams the model holds).
      all_hidden_states: return a list of num_layers + 2 arrays instead: transformers'
        `hidden_states` (the embeddings, then every layer's output before the final
        LayerNorm), then the normed last hidden states.

    For 'space_only' the shapes are [B, T * (1 + N), D]: each frame's cls and patch tokens.
    """
    x = self._check_input(pixel_values, channels_last)
    b, t = x.shape[:2]
    x = self.embeddings(x, train=train)
    states = [x]
    for layer in self.layers:
      x = layer(x, t, train=train)
      states.append(x)
    states.append(self.norm(x))
    states = [s.astype(jnp.float32).reshape(b, -1, s.shape[-1]) for s in states]
    return states if all_hidden_states else states[-1]

  def utterance_features(self, pixel_values: jax.Array, *, channels_last: bool = False,
                         train: bool = False) -> jax.Array:
    """f32[B, D]: the last hidden states mean-pooled over all tokens (cls included)."""
    return self(pixel_values, channels_last=channels_last, train=train).mean(axis=1)


# ---------------------------------------------------------------------------
# Hugging Face checkpoints (the shared machinery is hf_checkpoint's).

# [3 * D, D] (out, in) -> [D, 3, D]; the bias [3 * D] -> [3, D].
_QKV = Transform(lambda w: w.T.reshape(w.shape[1], 3, -1), lambda s: (s[1] * s[2], s[0]))
_QKV_BIAS = Transform(lambda w: w.reshape(3, -1), lambda s: (s[0] * s[1],))
# Conv2d [out, in, kh, kw] -> [kh, kw, in, out].
_CONV = Transform(lambda w: w.transpose(2, 3, 1, 0), lambda s: (s[3], s[2], s[0], s[1]))
# A leading batch axis of 1 dropped: [1, ..., D] -> [..., D].
_UNBATCH = Transform(lambda w: w.reshape(w.shape[1:]), lambda s: (1, *s))
_CLS = Transform(lambda w: w.reshape(-1), lambda s: (1, 1, *s))


def _hf_names(cfg: TimesformerConfig) -> hf_checkpoint.NameTable:
  """Checkpoint tensor name -> (path of our parameter, Transform)."""
  kernel_names, norm_names = hf_checkpoint.kernel_names, hf_checkpoint.norm_names
  names = {
      'embeddings.cls_token': (('embeddings', 'cls_token'), _CLS),
      'embeddings.position_embeddings': (('embeddings', 'position'), _UNBATCH),
      **kernel_names('embeddings.patch_embeddings.projection', ('embeddings', 'patch'), _CONV),
      **norm_names('layernorm', ('norm',)),
  }
  if cfg.attention_type != 'space_only':
    names['embeddings.time_embeddings'] = (('embeddings', 'time'), _UNBATCH)
  for i in range(cfg.num_layers):
    hf, ours = f'encoder.layer.{i}.', ('layers', i)
    attentions = [('attention', 'attention')]
    norms = [('layernorm_before', 'attention_norm'), ('layernorm_after', 'mlp_norm')]
    denses = [('intermediate.dense', ('intermediate',)), ('output.dense', ('output',))]
    if cfg.attention_type == 'divided_space_time':
      attentions.append(('temporal_attention', 'temporal_attention'))
      norms.append(('temporal_layernorm', 'temporal_norm'))
      denses.append(('temporal_dense', ('temporal_dense',)))
    for hf_attention, attention in attentions:
      names[f'{hf}{hf_attention}.attention.qkv.weight'] = ((*ours, attention, 'qkv', 'kernel'),
                                                           _QKV)
      if cfg.qkv_bias:
        names[f'{hf}{hf_attention}.attention.qkv.bias'] = ((*ours, attention, 'qkv', 'bias'),
                                                           _QKV_BIAS)
      denses.append((f'{hf_attention}.output.dense', (attention, 'output')))
    for hf_dense, path in denses:
      names.update(kernel_names(hf + hf_dense, (*ours, *path)))
    for hf_norm, ln in norms:
      names.update(norm_names(hf + hf_norm, (*ours, ln)))
  return names


def _canonical_name(name: str) -> str:
  return name[len('timesformer.'):] if name.startswith('timesformer.') else name


def load_weights(model: Timesformer, tensors: Mapping[str, np.ndarray], source: str
                 ) -> list[str]:
  """Copies checkpoint tensors into `model`; returns the ignored (head) entries.

  `model` may be initialised or abstract (`nnx.eval_shape`): every parameter is replaced.
  Raises CheckpointError naming the entry for a missing, unexpected or misshapen tensor.
  """
  cfg = model.config
  return hf_checkpoint.load_tensors(
      model, tensors, source, _hf_names(cfg), what=f'a {cfg.attention_type} TimeSformer',
      canonical=_canonical_name, ignored_prefixes=_IGNORED_PREFIXES)


def load_hf_checkpoint(folder: str, *, dtype=jnp.float32, seed: int = 0
                       ) -> tuple[TimesformerConfig, Timesformer]:
  """(config, encoder) from a Hugging Face folder with config.json and model.safetensors."""
  return hf_checkpoint.load_hf_checkpoint(folder, TimesformerConfig, Timesformer, load_weights,
                                          dtype=dtype, seed=seed)
