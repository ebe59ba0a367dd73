"""The wav2vec 2.0 speech encoder in Flax NNX, loading Hugging Face checkpoints.

`load_hf_checkpoint(folder)` reads `config.json` and `model.safetensors` (names with or without
the `wav2vec2.` prefix that e.g. `Wav2Vec2ForSequenceClassification` folders use) into a
`Wav2Vec2Encoder`, the architecture of `transformers.Wav2Vec2Model`; `transformers` is used for
nothing here. From a raw waveform f32[B, S]:

  feature encoder   a stack of strided 1-D convolutions over the samples, each followed by GELU.
                    With `feat_extract_norm='group'` (wav2vec2-base) the first conv alone is
                    followed by a GroupNorm with one group per channel (each channel normalised
                    over time); with 'layer' (large / large-robust) every conv is followed by a
                    LayerNorm over the channels of each frame. F frames of conv_dim[-1] channels.
  projection        LayerNorm, Linear to hidden_size, dropout.
  positional conv   a grouped Conv1d over the frames ('same' padding; for an even kernel the
                    extra trailing frame is dropped), GELU, added to the hidden states. In the
                    checkpoint its kernel is weight-normalised over dim 2 (g and v, stored as
                    `parametrizations.weight.original0/1` or, older, `weight_g/weight_v`); the
                    loader folds them into one kernel, w = g * v / ||v|| (norm over all dims but
                    the kernel-position one), so the module holds a plain kernel.
  transformer       `do_stable_layer_norm=False`: LayerNorm and dropout after the positional
                    add, then post-LN layers (attention, residual, LayerNorm, GELU MLP,
                    residual, LayerNorm). `True`: dropout after the add, pre-LN layers, and one
                    LayerNorm after the last layer.

It returns the last hidden states f32[B, F, H]. `attention_mask` i32[B, S] (1 = a valid sample,
right padding) becomes a frame mask through the conv output-length formula
(floor((L - kernel) / stride) + 1 per conv, `feature_lengths`); as in transformers, padded frames
are zeroed before the positional conv and masked as attention keys. One deliberate difference:
with a mask, the group-norm statistics of the first conv are taken over the valid frames only, so
every item of a padded batch gets the features it gets alone, unpadded (transformers averages
over the padding too, and its feature extractor passes no mask to group-norm models for that
reason). Without a mask the model is transformers' exactly. `utterance_features` mean-pools the
last hidden states over the valid frames: the utterance-level speech feature.

Not built: SpecAugment masking, LayerDrop and adapters (rejected in the config).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from mer_jax.models import hf_checkpoint
from mer_jax.models.hf_checkpoint import CheckpointError
from mer_jax.models.text_transformer import ACTIVATIONS
from mer_jax.models.text_transformer import dense
from mer_jax.models.text_transformer import layer_norm
from mer_jax.models.text_transformer import SelfAttention

FEATURE_NORMS = ('group', 'layer')
# transformers' conv LayerNorm / GroupNorm use torch's default eps, not config.layer_norm_eps.
_CONV_NORM_EPS = 1e-5
_PREFIX = 'wav2vec2.'
# Checkpoint entries that belong to heads or pre-training parts we do not build.
_IGNORED_PREFIXES = ('lm_head.', 'classifier.', 'projector.', 'quantizer.', 'project_q.',
                     'project_hid.', 'masked_spec_embed', 'layer_weights', 'tdnn.', 'objective.')
_POS_CONV = 'encoder.pos_conv_embed.conv.'
# Weight-normalised positional-conv kernel: (g, v) under either naming of torch.
_WEIGHT_NORM_NAMES = (('parametrizations.weight.original0', 'parametrizations.weight.original1'),
                      ('weight_g', 'weight_v'))


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config:
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  conv_dim: tuple[int, ...] = (512,) * 7
  conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
  conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
  conv_bias: bool = False
  feat_extract_norm: str = 'group'
  feat_extract_activation: str = 'gelu'
  num_conv_pos_embeddings: int = 128
  num_conv_pos_embedding_groups: int = 16
  do_stable_layer_norm: bool = False
  layer_norm_eps: float = 1e-5
  hidden_act: str = 'gelu'
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  activation_dropout: float = 0.1
  feat_proj_dropout: float = 0.0
  model_type: str = 'wav2vec2'

  def __post_init__(self):
    if self.model_type != 'wav2vec2':
      raise ValueError(f"model_type {self.model_type!r} is not supported; expected 'wav2vec2'")
    if self.feat_extract_norm not in FEATURE_NORMS:
      raise ValueError(f'feat_extract_norm {self.feat_extract_norm!r} is not supported; '
                       f'expected one of {FEATURE_NORMS}')
    for key in ('feat_extract_activation', 'hidden_act'):
      if getattr(self, key) not in ACTIVATIONS:
        raise ValueError(f'{key} {getattr(self, key)!r} is not supported; expected one of '
                         f'{sorted(ACTIVATIONS)}')
    if not self.conv_dim or not len(self.conv_dim) == len(self.conv_kernel) == len(
        self.conv_stride):
      raise ValueError(f'conv_dim, conv_kernel and conv_stride must have one (equal) length, '
                       f'got {len(self.conv_dim)}, {len(self.conv_kernel)} and '
                       f'{len(self.conv_stride)}')
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not divisible by num_heads '
                       f'{self.num_heads}')
    if self.hidden_size % self.num_conv_pos_embedding_groups:
      raise ValueError(f'hidden_size {self.hidden_size} is not divisible by '
                       f'num_conv_pos_embedding_groups {self.num_conv_pos_embedding_groups}')

  @property
  def receptive_field(self) -> int:
    """Samples the first frame sees: the shortest waveform with one frame."""
    field = 1
    for kernel, stride in zip(self.conv_kernel[::-1], self.conv_stride[::-1]):
      field = (field - 1) * stride + kernel
    return field

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any] | Any) -> 'Wav2Vec2Config':
    """From a transformers config object or the dict of a config.json."""
    get = hf_checkpoint.config_getter(hf, ('wav2vec2',))
    if get('add_adapter', False):
      raise ValueError('add_adapter=True is not supported (the adapter after the encoder is not '
                       'built)')
    if get('adapter_attn_dim') is not None:
      raise ValueError(f'adapter_attn_dim={get("adapter_attn_dim")} is not supported (attention '
                       'adapters are not built)')
    n_conv = get('num_feat_extract_layers')
    conv_dim = tuple(int(c) for c in get('conv_dim', cls.conv_dim))
    if n_conv is not None and int(n_conv) != len(conv_dim):
      raise ValueError(f'num_feat_extract_layers {n_conv} does not match conv_dim '
                       f'{list(conv_dim)}')
    return cls(
        hidden_size=int(get('hidden_size')), num_layers=int(get('num_hidden_layers')),
        num_heads=int(get('num_attention_heads')),
        intermediate_size=int(get('intermediate_size')), conv_dim=conv_dim,
        conv_kernel=tuple(int(k) for k in get('conv_kernel', cls.conv_kernel)),
        conv_stride=tuple(int(s) for s in get('conv_stride', cls.conv_stride)),
        conv_bias=bool(get('conv_bias', False)),
        feat_extract_norm=str(get('feat_extract_norm', 'group')),
        feat_extract_activation=str(get('feat_extract_activation', 'gelu')),
        num_conv_pos_embeddings=int(get('num_conv_pos_embeddings', 128)),
        num_conv_pos_embedding_groups=int(get('num_conv_pos_embedding_groups', 16)),
        do_stable_layer_norm=bool(get('do_stable_layer_norm', False)),
        layer_norm_eps=float(get('layer_norm_eps', 1e-5)),
        hidden_act=str(get('hidden_act', 'gelu')),
        hidden_dropout=float(get('hidden_dropout', 0.1)),
        attention_dropout=float(get('attention_dropout', 0.1)),
        activation_dropout=float(get('activation_dropout', 0.1)),
        feat_proj_dropout=float(get('feat_proj_dropout', 0.0)), model_type=get('model_type'))


def feature_lengths(cfg: Wav2Vec2Config, sample_lengths, *, num_convs: int | None = None):
  """Frames the conv feature encoder makes of `sample_lengths` samples (ints or int arrays).

  floor((L - kernel) / stride) + 1 per conv, as transformers' `_get_feat_extract_output_lengths`
  (not clipped: a waveform shorter than the receptive field gives a length <= 0). `num_convs`
  stops after that many convs.
  """
  lengths = sample_lengths
  for kernel, stride in list(zip(cfg.conv_kernel, cfg.conv_stride))[:num_convs]:
    lengths = (lengths - kernel) // stride + 1
  return lengths


def length_mask(lengths: jax.Array, size: int) -> jax.Array:
  """bool[B, size]: True at the first `lengths[b]` positions of row b."""
  return jnp.arange(size, dtype=jnp.int32)[None, :] < jnp.asarray(lengths)[:, None]


def frame_mask(cfg: Wav2Vec2Config, attention_mask: jax.Array, num_frames: int) -> jax.Array:
  """bool[B, F] valid frames from a (right-padded) sample mask i32[B, S]."""
  samples = jnp.sum(jnp.asarray(attention_mask) > 0, axis=-1, dtype=jnp.int32)
  return length_mask(feature_lengths(cfg, samples), num_frames)


def mean_pool(hidden: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """f32[B, H]: `hidden` [B, F, H] averaged over the frames where `mask` [B, F] is true."""
  hidden = hidden.astype(jnp.float32)
  if mask is None:
    return hidden.mean(axis=1)
  weights = mask.astype(jnp.float32)[..., None]
  return (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)


class FeatureConv(nnx.Module):
  """One conv of the feature encoder: Conv1d, optional GroupNorm/LayerNorm, activation."""

  def __init__(self, cfg: Wav2Vec2Config, index: int, norm: str | None, *, rngs: nnx.Rngs,
               dtype):
    n_in = cfg.conv_dim[index - 1] if index else 1
    n_out = cfg.conv_dim[index]
    self.conv = nnx.Conv(
        n_in, n_out, kernel_size=cfg.conv_kernel[index], strides=cfg.conv_stride[index],
        padding='VALID', use_bias=cfg.conv_bias, dtype=dtype, rngs=rngs,
        kernel_init=nnx.with_partitioning(
            nnx.initializers.variance_scaling(2.0, 'fan_in', 'normal'), (None, None, None)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)))
    self.norm_kind = norm
    if norm == 'group':
      # One group per channel: each channel normalised over time.
      self.norm = nnx.GroupNorm(
          n_out, num_groups=n_out, epsilon=_CONV_NORM_EPS, use_fast_variance=False, rngs=rngs,
          scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), (None,)),
          bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)))
    elif norm == 'layer':
      self.norm = layer_norm(n_out, _CONV_NORM_EPS, rngs, axis=None, use_fast_variance=False)
    else:
      self.norm = None
    self.act = cfg.feat_extract_activation

  def __call__(self, x, valid: jax.Array | None):
    """x [B, T, C_in] -> [B, T', C_out]; `valid` bool[B, T'] restricts the group-norm stats."""
    x = self.conv(x)
    if self.norm_kind == 'group':
      mask = None if valid is None else jnp.broadcast_to(valid[..., None], x.shape)
      x = self.norm(x.astype(jnp.float32), mask=mask).astype(x.dtype)
    elif self.norm_kind == 'layer':
      x = self.norm(x)
    return ACTIVATIONS[self.act](x)


class FeatureEncoder(nnx.Module):
  """The conv stack: waveform [B, S] -> frames [B, F, conv_dim[-1]]."""

  def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs, dtype):
    self.config = cfg
    norms = ([cfg.feat_extract_norm] + [None] * (len(cfg.conv_dim) - 1)
             if cfg.feat_extract_norm == 'group' else ['layer'] * len(cfg.conv_dim))
    self.convs = nnx.List([FeatureConv(cfg, i, norm, rngs=rngs, dtype=dtype)
                           for i, norm in enumerate(norms)])

  def __call__(self, input_values: jax.Array, sample_lengths: jax.Array | None):
    x = input_values[..., None].astype(jnp.float32)
    for i, conv in enumerate(self.convs):
      valid = None
      if sample_lengths is not None and conv.norm_kind == 'group':
        frames = (x.shape[1] - self.config.conv_kernel[i]) // self.config.conv_stride[i] + 1
        # An item without a valid frame keeps its first one: statistics stay finite.
        lengths = feature_lengths(self.config, sample_lengths, num_convs=i + 1)
        valid = length_mask(jnp.maximum(lengths, 1), frames)
      x = conv(x, valid)
    return x


class FeatureProjection(nnx.Module):

  def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs, dtype):
    self.norm = layer_norm(cfg.conv_dim[-1], cfg.layer_norm_eps, rngs, axis=None,
                           use_fast_variance=False)
    self.projection = dense(cfg.conv_dim[-1], cfg.hidden_size, (None, 'embed'), rngs, dtype)
    self.dropout = nnx.Dropout(cfg.feat_proj_dropout, rngs=rngs)

  def __call__(self, x, *, train: bool):
    return self.dropout(self.projection(self.norm(x)), deterministic=not train)


class PositionalConv(nnx.Module):
  """Grouped 'same' Conv1d over the frames and GELU (the relative positional embedding)."""

  def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs, dtype):
    k, h = cfg.num_conv_pos_embeddings, cfg.hidden_size
    # torch pads k // 2 on both sides and drops the last frame when k is even.
    padding = [(k // 2, k // 2 - (1 if k % 2 == 0 else 0))]
    self.conv = nnx.Conv(
        h, h, kernel_size=k, padding=padding, feature_group_count=cfg.num_conv_pos_embedding_groups,
        dtype=dtype, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.normal(2 * np.sqrt(1 / (k * h))),
                                          (None, None, 'embed')),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ('embed',)))
    self.act = cfg.feat_extract_activation

  def __call__(self, x):
    return ACTIVATIONS[self.act](self.conv(x))


class Layer(nnx.Module):
  """A transformer layer; post-LN, or pre-LN when `do_stable_layer_norm`."""

  def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs, dtype):
    self.pre_norm = cfg.do_stable_layer_norm
    self.attention = SelfAttention(cfg, rngs=rngs, dtype=dtype)
    self.attention_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs,
                                     use_fast_variance=False)
    self.intermediate = dense(cfg.hidden_size, cfg.intermediate_size, ('embed', 'mlp'), rngs,
                               dtype)
    self.output = dense(cfg.intermediate_size, cfg.hidden_size, ('mlp', 'embed'), rngs, dtype)
    self.mlp_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs, use_fast_variance=False)
    self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)
    self.activation_dropout = nnx.Dropout(cfg.activation_dropout, rngs=rngs)
    self.act = cfg.hidden_act

  def _mlp(self, x, *, train: bool):
    x = self.activation_dropout(ACTIVATIONS[self.act](self.intermediate(x)),
                                deterministic=not train)
    return self.dropout(self.output(x), deterministic=not train)

  def __call__(self, x, bias, *, train: bool):
    if self.pre_norm:
      attended = self.attention(self.attention_norm(x), bias, train=train)
      x = x + self.dropout(attended, deterministic=not train)
      return x + self._mlp(self.mlp_norm(x), train=train)
    attended = self.dropout(self.attention(x, bias, train=train), deterministic=not train)
    x = self.attention_norm(x + attended)
    return self.mlp_norm(x + self._mlp(x, train=train))


class Wav2Vec2Encoder(nnx.Module):
  """`transformers.Wav2Vec2Model` (no adapter, no SpecAugment): waveform -> hidden states."""

  def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config = cfg
    self.feature_encoder = FeatureEncoder(cfg, rngs=rngs, dtype=dtype)
    self.feature_projection = FeatureProjection(cfg, rngs=rngs, dtype=dtype)
    self.positional_conv = PositionalConv(cfg, rngs=rngs, dtype=dtype)
    # After the positional add (post-LN) or after the last layer (pre-LN).
    self.norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs, use_fast_variance=False)
    self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)
    self.layers = nnx.List([Layer(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.num_layers)])

  def num_frames(self, num_samples: int) -> int:
    """Frames for a batch padded to `num_samples` samples (the output's time axis)."""
    return int(feature_lengths(self.config, num_samples))

  def frame_mask(self, attention_mask: jax.Array) -> jax.Array:
    """bool[B, F] valid frames of a sample mask i32[B, S]."""
    return frame_mask(self.config, attention_mask, self.num_frames(attention_mask.shape[-1]))

  def __call__(self, input_values: jax.Array, attention_mask: jax.Array | None = None, *,
               train: bool = False, all_hidden_states: bool = False):
    """Last hidden states f32[B, F, H] of waveforms f32[B, S].

    Args:
      input_values: the (normalised) waveforms, right-padded to S samples.
      attention_mask: i32[B, S], 1 at valid samples; None: every sample is valid (and the
        model is transformers' exactly, padding included in the group-norm statistics).
      train: dropout on.
      all_hidden_states: return a list of num_layers + 1 states: the input of the first layer,
        the outputs of the others, and the last hidden states (after the final LayerNorm of
        pre-LN models), as transformers v4's `hidden_states`.
    """
    if input_values.shape[-1] < self.config.receptive_field:
      raise ValueError(f'{input_values.shape[-1]} samples are fewer than the '
                       f'{self.config.receptive_field} the first frame needs')
    sample_lengths = None
    if attention_mask is not None:
      sample_lengths = jnp.sum(attention_mask > 0, axis=-1, dtype=jnp.int32)
    x = self.feature_encoder(input_values, sample_lengths)
    x = self.feature_projection(x, train=train)
    if sample_lengths is None:
      bias = jnp.zeros((1, 1, 1, x.shape[1]), jnp.float32)
    else:
      valid = length_mask(feature_lengths(self.config, sample_lengths), x.shape[1])
      x = jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))
      # Additive key mask in f32: finite, so a row with no valid key stays finite too.
      bias = jnp.where(valid[:, None, None, :], 0.0,
                       jnp.finfo(jnp.float32).min).astype(jnp.float32)
    x = x + self.positional_conv(x)
    if not self.config.do_stable_layer_norm:
      x = self.norm(x)
    x = self.dropout(x, deterministic=not train)
    states = [x]
    for layer in self.layers:
      x = layer(x, bias, train=train)
      states.append(x)
    if self.config.do_stable_layer_norm:
      x = self.norm(x)
    if all_hidden_states:
      return [s.astype(jnp.float32) for s in states[:-1]] + [x.astype(jnp.float32)]
    return x.astype(jnp.float32)

  def utterance_features(self, input_values: jax.Array, attention_mask: jax.Array | None = None,
                         *, train: bool = False) -> jax.Array:
    """f32[B, H]: the last hidden states mean-pooled over each waveform's valid frames."""
    hidden = self(input_values, attention_mask, train=train)
    mask = None if attention_mask is None else self.frame_mask(attention_mask)
    return mean_pool(hidden, mask)


# ---------------------------------------------------------------------------
# Hugging Face checkpoints (the shared machinery is hf_checkpoint's).


def _hf_names(cfg: Wav2Vec2Config) -> hf_checkpoint.NameTable:
  """Checkpoint tensor name -> (path of our parameter, Transform).

  Kernels are TRANSPOSE'd (all axes reversed): torch Linear [out, in] -> [in, out], Conv1d
  [out, in, k] -> [k, in, out]. The positional conv kernel is listed under its effective name
  `encoder.pos_conv_embed.conv.weight`, which the loader computes from the weight-norm pair.
  """
  kernel_names, norm_names = hf_checkpoint.kernel_names, hf_checkpoint.norm_names
  names: hf_checkpoint.NameTable = {}
  for i in range(len(cfg.conv_dim)):
    hf, ours = f'feature_extractor.conv_layers.{i}.', ('feature_encoder', 'convs', i)
    names.update(kernel_names(f'{hf}conv', (*ours, 'conv'), bias=cfg.conv_bias))
    if cfg.feat_extract_norm == 'layer' or i == 0:
      names.update(norm_names(f'{hf}layer_norm', (*ours, 'norm')))
  names.update({
      **norm_names('feature_projection.layer_norm', ('feature_projection', 'norm')),
      **kernel_names('feature_projection.projection', ('feature_projection', 'projection')),
      **kernel_names(_POS_CONV.rstrip('.'), ('positional_conv', 'conv')),
      **norm_names('encoder.layer_norm', ('norm',)),
  })
  for i in range(cfg.num_layers):
    hf, ours = f'encoder.layers.{i}.', ('layers', i)
    for hf_dense, path in (('attention.q_proj', ('attention', 'query')),
                           ('attention.k_proj', ('attention', 'key')),
                           ('attention.v_proj', ('attention', 'value')),
                           ('attention.out_proj', ('attention', 'output')),
                           ('feed_forward.intermediate_dense', ('intermediate',)),
                           ('feed_forward.output_dense', ('output',))):
      names.update(kernel_names(hf + hf_dense, (*ours, *path)))
    for hf_norm, ln in (('layer_norm', 'attention_norm'), ('final_layer_norm', 'mlp_norm')):
      names.update(norm_names(hf + hf_norm, (*ours, ln)))
  return names


def _fold_weight_norm(found: dict[str, np.ndarray], cfg: Wav2Vec2Config, source: str) -> None:
  """Replaces the positional conv's (g, v) pair in `found` by the effective kernel w."""
  k, h = cfg.num_conv_pos_embeddings, cfg.hidden_size
  shapes = ((1, 1, k), (h, h // cfg.num_conv_pos_embedding_groups, k))
  for pair in _WEIGHT_NORM_NAMES:
    names = [_POS_CONV + n for n in pair]
    present = [n in found for n in names]
    if not any(present):
      continue
    if not all(present):
      raise CheckpointError(f'{source}: missing tensor {names[present.index(False)]!r} (the '
                            f'weight-norm partner of {names[present.index(True)]!r})')
    g, v = (np.asarray(found.pop(n), np.float32) for n in names)
    for name, value, shape in zip(names, (g, v), shapes):
      if value.shape != shape:
        raise CheckpointError(f'{source}: tensor {name!r} has shape {list(value.shape)}; the '
                              f'config needs {list(shape)}')
    norm = np.sqrt(np.sum(np.square(v.astype(np.float64)), axis=(0, 1), keepdims=True))
    found[_POS_CONV + 'weight'] = (g * v / norm).astype(np.float32)
    return


def _missing_name(name: str) -> str:
  """The missing positional kernel is named by its weight-norm form, as checkpoints hold it."""
  if name == _POS_CONV + 'weight':
    return f'{_POS_CONV + _WEIGHT_NORM_NAMES[0][0]!r} (or weight_g / weight_v)'
  return repr(name)


def load_weights(model: Wav2Vec2Encoder, tensors: Mapping[str, np.ndarray], source: str
                 ) -> list[str]:
  """Copies checkpoint tensors into `model`; returns the ignored (head) entries.

  Raises CheckpointError naming the entry for a missing, unexpected or misshapen tensor. In a
  checkpoint whose encoder sits under `wav2vec2.`, entries outside that prefix are heads.
  """
  cfg = model.config
  prefixed = any(name.startswith(_PREFIX) for name in tensors)

  def canonical(name: str) -> str | None:  # None: outside the encoder
    if name.startswith(_PREFIX):
      return name[len(_PREFIX):]
    return None if prefixed else name

  return hf_checkpoint.load_tensors(
      model, tensors, source, _hf_names(cfg),
      what=(f'a wav2vec2 encoder with config feat_extract_norm={cfg.feat_extract_norm!r}, '
            f'conv_bias={cfg.conv_bias}'),
      canonical=canonical, ignored_prefixes=_IGNORED_PREFIXES,
      extra_inputs={_POS_CONV + n for pair in _WEIGHT_NORM_NAMES for n in pair},
      combine=lambda found: _fold_weight_norm(found, cfg, source), missing_name=_missing_name)


def load_hf_checkpoint(folder: str, *, dtype=jnp.float32, seed: int = 0
                       ) -> tuple[Wav2Vec2Config, Wav2Vec2Encoder]:
  """(config, encoder) from a Hugging Face folder with config.json and model.safetensors."""
  return hf_checkpoint.load_hf_checkpoint(folder, Wav2Vec2Config, Wav2Vec2Encoder, load_weights,
                                          dtype=dtype, seed=seed)
