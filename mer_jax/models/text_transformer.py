"""BERT- and RoBERTa-architecture text encoders in Flax NNX, loading Hugging Face checkpoints.

`load_hf_checkpoint(folder)` reads `config.json` and `model.safetensors` (names with or without
a `bert.` / `roberta.` prefix, as sentence-transformers folders store them) into a
`TextEncoder`; `transformers` is used for nothing here. The encoder is post-LayerNorm, as both
architectures: embeddings (word + position + token type, LayerNorm, dropout) -> N layers of
self-attention and a GELU MLP, each with a residual and LayerNorm. It returns the last hidden
states [B, L, H] (and every layer's with `all_hidden_states=True`).

RoBERTa differs only in its positions: they count non-padding tokens starting after
`pad_token_id` (so position ids are `pad_token_id + cumsum(mask)` and padding keeps
`pad_token_id`), and it has a single token type.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from mer_jax.models import hf_checkpoint
# Importable from here: what load_hf_checkpoint raises, and the hub resolution text_features uses.

ARCHITECTURES = ('bert', 'roberta')


def gelu_erf(x: jax.Array) -> jax.Array:
  """Exact GELU as Hugging Face and PyTorch compute it, x/2 * (1 + erf(x/sqrt(2))).

  jax.nn.gelu(approximate=False) evaluates the same function through erfc, which XLA's CPU
  backend emits as a longer polynomial: 2.3x the time of this form on an MLP activation.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(1 / np.sqrt(2))))


ACTIVATIONS = {
    'gelu': gelu_erf,
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
}
# Checkpoint entries that belong to heads we do not build; they are listed, not loaded.
_IGNORED_PREFIXES = ('pooler.', 'cls.', 'lm_head.', 'classifier.', 'qa_outputs.')
_IGNORED_SUFFIXES = ('position_ids',)


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  pad_token_id: int = 0
  hidden_act: str = 'gelu'
  model_type: str = 'bert'

  def __post_init__(self):
    if self.model_type not in ARCHITECTURES:
      raise ValueError(f'model_type {self.model_type!r} is not supported; expected one of '
                       f'{ARCHITECTURES}')
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f'hidden_act {self.hidden_act!r} is not supported; expected one of '
                       f'{sorted(ACTIVATIONS)}')
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not divisible by num_heads '
                       f'{self.num_heads}')

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any] | Any) -> 'TextEncoderConfig':
    """From a transformers config object or the dict of a config.json."""
    get = hf_checkpoint.config_getter(hf, ARCHITECTURES)
    position = get('position_embedding_type', 'absolute')
    if position not in (None, 'absolute'):
      raise ValueError(f'position_embedding_type {position!r} is not supported (absolute only)')
    return cls(
        vocab_size=int(get('vocab_size')), hidden_size=int(get('hidden_size')),
        num_layers=int(get('num_hidden_layers')), num_heads=int(get('num_attention_heads')),
        intermediate_size=int(get('intermediate_size')),
        max_position_embeddings=int(get('max_position_embeddings')),
        type_vocab_size=int(get('type_vocab_size', 2)),
        layer_norm_eps=float(get('layer_norm_eps', 1e-12)),
        hidden_dropout=float(get('hidden_dropout_prob', 0.1)),
        attention_dropout=float(get('attention_probs_dropout_prob', 0.1)),
        pad_token_id=int(get('pad_token_id', 0) or 0), hidden_act=str(get('hidden_act', 'gelu')),
        model_type=get('model_type'))


def dense(n_in: int, n_out: int, axes: tuple[str | None, str | None], rngs: nnx.Rngs,
          dtype) -> nnx.Linear:
  """A Linear with logical axes, initialised as the Hugging Face encoders are."""
  return nnx.Linear(
      n_in, n_out, dtype=dtype, rngs=rngs,
      kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), axes),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:]))


def layer_norm(n: int, eps: float, rngs: nnx.Rngs, axis: str | None = 'embed',
               use_fast_variance: bool = True) -> nnx.LayerNorm:
  return nnx.LayerNorm(n, epsilon=eps, rngs=rngs, use_fast_variance=use_fast_variance,
                       scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), (axis,)),
                       bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axis,)))


class Embeddings(nnx.Module):

  def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs, dtype):
    init = nnx.initializers.normal(0.02)
    self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs,
                          embedding_init=nnx.with_partitioning(init, ('vocab', 'embed')))
    self.position = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype,
                              rngs=rngs, embedding_init=nnx.with_partitioning(init, (None, 'embed')))
    self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs,
                                embedding_init=nnx.with_partitioning(init, (None, 'embed')))
    self.norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)

  def __call__(self, input_ids, position_ids, token_type_ids, *, train: bool):
    x = self.word(input_ids) + self.position(position_ids) + self.token_type(token_type_ids)
    return self.dropout(self.norm(x), deterministic=not train)


class SelfAttention(nnx.Module):

  def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs, dtype):
    h = cfg.hidden_size
    self.num_heads = cfg.num_heads
    self.query = dense(h, h, ('embed', 'heads'), rngs, dtype)
    self.key = dense(h, h, ('embed', 'heads'), rngs, dtype)
    self.value = dense(h, h, ('embed', 'heads'), rngs, dtype)
    self.output = dense(h, h, ('heads', 'embed'), rngs, dtype)
    self.attention_dropout = nnx.Dropout(cfg.attention_dropout, rngs=rngs)

  def __call__(self, x, bias, *, train: bool):
    b, length, h = x.shape
    split = lambda t: t.reshape(b, length, self.num_heads, h // self.num_heads)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
    logits = logits / np.sqrt(h // self.num_heads) + bias
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    weights = self.attention_dropout(weights, deterministic=not train)
    context = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, length, h)
    return self.output(context)


class Layer(nnx.Module):

  def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs, dtype):
    self.attention = SelfAttention(cfg, rngs=rngs, dtype=dtype)
    self.attention_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
    self.intermediate = dense(cfg.hidden_size, cfg.intermediate_size, ('embed', 'mlp'), rngs,
                               dtype)
    self.output = dense(cfg.intermediate_size, cfg.hidden_size, ('mlp', 'embed'), rngs, dtype)
    self.output_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)
    self.act = cfg.hidden_act

  def __call__(self, x, bias, *, train: bool):
    attended = self.dropout(self.attention(x, bias, train=train), deterministic=not train)
    x = self.attention_norm(x + attended)
    mlp = self.output(ACTIVATIONS[self.act](self.intermediate(x)))
    return self.output_norm(x + self.dropout(mlp, deterministic=not train))


class TextEncoder(nnx.Module):
  """The BERT/RoBERTa encoder stack (no pooler)."""

  def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs, dtype=dtype)
    self.layers = nnx.List([Layer(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.num_layers)])

  def position_ids(self, attention_mask: jax.Array) -> jax.Array:
    length = attention_mask.shape[-1]
    if self.config.model_type == 'roberta':
      mask = (attention_mask > 0).astype(jnp.int32)
      return (jnp.cumsum(mask, axis=-1) * mask + self.config.pad_token_id).astype(jnp.int32)
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), attention_mask.shape)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None, *, train: bool = False,
               all_hidden_states: bool = False):
    """Last hidden states f32[B, L, H]; with `all_hidden_states`, a list of L+1 of them."""
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    # Additive key mask in f32: finite, so a row with no valid key stays finite too.
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0,
                     jnp.finfo(jnp.float32).min).astype(jnp.float32)
    x = self.embeddings(input_ids, self.position_ids(attention_mask), token_type_ids,
                        train=train)
    states = [x]
    for layer in self.layers:
      x = layer(x, bias, train=train)
      states.append(x)
    if all_hidden_states:
      return [s.astype(jnp.float32) for s in states]
    return x.astype(jnp.float32)


def resize_token_embeddings(model: TextEncoder, vocab_size: int) -> None:
  """Grows the word-embedding table in place to `vocab_size` rows (for added tokens).

  New rows start at the mean of the existing rows: an added token (e.g. a speaker tag) then
  begins as an "average word" instead of a random vector far from anything the encoder has seen.
  """
  table = model.embeddings.word.embedding
  old = table[...]
  if vocab_size < old.shape[0]:
    raise ValueError(f'cannot shrink the vocabulary from {old.shape[0]} to {vocab_size} rows')
  if vocab_size == old.shape[0]:
    return
  extra = jnp.broadcast_to(old.mean(axis=0, keepdims=True), (vocab_size - old.shape[0],
                                                              old.shape[1]))
  model.embeddings.word.embedding = table.replace(
      jnp.concatenate([old, extra.astype(old.dtype)], axis=0))
  model.embeddings.word.num_embeddings = vocab_size
  model.config = dataclasses.replace(model.config, vocab_size=vocab_size)


# ---------------------------------------------------------------------------
# Hugging Face checkpoints (the shared machinery is hf_checkpoint's).


def _hf_names(cfg: TextEncoderConfig) -> hf_checkpoint.NameTable:
  """Checkpoint tensor name -> (path of our parameter, Transform)."""
  copy = hf_checkpoint.COPY
  names = {
      'embeddings.word_embeddings.weight': (('embeddings', 'word', 'embedding'), copy),
      'embeddings.position_embeddings.weight': (('embeddings', 'position', 'embedding'), copy),
      'embeddings.token_type_embeddings.weight': (('embeddings', 'token_type', 'embedding'), copy),
      **hf_checkpoint.norm_names('embeddings.LayerNorm', ('embeddings', 'norm')),
  }
  for i in range(cfg.num_layers):
    hf, ours = f'encoder.layer.{i}.', ('layers', i)
    for hf_dense, path in (('attention.self.query', ('attention', 'query')),
                           ('attention.self.key', ('attention', 'key')),
                           ('attention.self.value', ('attention', 'value')),
                           ('attention.output.dense', ('attention', 'output')),
                           ('intermediate.dense', ('intermediate',)),
                           ('output.dense', ('output',))):
      names.update(hf_checkpoint.kernel_names(hf + hf_dense, (*ours, *path)))
    for hf_norm, ln in (('attention.output.LayerNorm', 'attention_norm'),
                        ('output.LayerNorm', 'output_norm')):
      names.update(hf_checkpoint.norm_names(hf + hf_norm, (*ours, ln)))
  return names


def _canonical_name(name: str, model_type: str) -> str:
  for prefix in (f'{model_type}.', 'bert.', 'roberta.', 'model.'):
    if name.startswith(prefix):
      name = name[len(prefix):]
      break
  return name.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('LayerNorm.beta',
                                                                     'LayerNorm.bias')


def load_weights(model: TextEncoder, tensors: Mapping[str, np.ndarray], source: str
                 ) -> list[str]:
  """Copies checkpoint tensors into `model`; returns the ignored (head) entries.

  Raises CheckpointError naming the entry for a missing, unexpected or misshapen tensor.
  """
  cfg = model.config
  return hf_checkpoint.load_tensors(
      model, tensors, source, _hf_names(cfg), what=f'a {cfg.model_type} encoder',
      canonical=lambda name: _canonical_name(name, cfg.model_type),
      ignored_prefixes=_IGNORED_PREFIXES, ignored_suffixes=_IGNORED_SUFFIXES)


def load_hf_checkpoint(folder: str, *, dtype=jnp.float32, seed: int = 0
                       ) -> tuple[TextEncoderConfig, TextEncoder]:
  """(config, encoder) from a Hugging Face folder with config.json and model.safetensors."""
  # Initialised, not abstract, before loading: this keeps the dropout streams of nnx.Rngs(seed).
  return hf_checkpoint.load_hf_checkpoint(folder, TextEncoderConfig, TextEncoder, load_weights,
                                          dtype=dtype, seed=seed, abstract=False)
