"""The text encoder against PyTorch: MiniLM feature extraction and one fine-tuning step, per token.

  python -m mer_jax.bench_text [--config configs/meld_text.py] [--rounds 3] [--batches 3]
      [--threads 0] [--torch_adamw default] [--config.<key>=<value> ...]
  (installed: mer-jax-bench-text [flags])

Times our Flax encoder (mer_jax/models/text_transformer.py) and transformers' PyTorch model of the
same checkpoint (`BertModel` for MiniLM) on the same batches, in one run, with the same threads:

  extraction  eval mode, no gradients: the encoder's hidden states pooled and normalised as our
              feature extraction does (`text_features.make_encode_fn`: config.text.pooling,
              .layers, .normalize), the vectors fetched to the host;
  fine-tune   one training step: encoder (dropout on) -> pooling -> our classification head
              (dropout, projection, classifier: mer_jax/models/text_classifier.py), weighted
              cross-entropy on fixed random labels, backward, gradient clipping and AdamW with the
              config's schedule (`text_finetune.train_step` with `optim.make_optimizer`; PyTorch:
              the same head with our initial weights, `clip_grad_norm_`, `torch.optim.AdamW`).

The sentences are the MELD training transcripts (config.text.csv.dir) when present, else a
deterministic synthetic dialogue list (the output says which); they are tokenised once as our
feature extraction tokenises them (config.text.input) and cut into batches by our length buckets
(`text_batching.plan_batches`: extraction at config.text.tokens_per_batch, a sample of a shuffled
plan; fine-tuning at config.text.finetune.tokens_per_batch, the first batches of our fine-tuning's
epoch-1 plan). Both frameworks get the same batches, already in their own arrays.

Every batch is run once untimed by each framework first (the Flax programs compile then: their
tracing, lowering and compilation seconds are reported on their own); then each of `--rounds`
rounds times every batch of both tasks in both frameworks, alternating which goes first. Printed:
the medians over rounds of tokens/second (non-padding tokens of real rows) for each framework and
the ratio ours / PyTorch, for extraction and for the fine-tuning step.

torch is a test-only dependency: `pip install -e .[test]`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import tempfile
import time
from typing import Any, Callable, Sequence

from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from mer_jax import cli
from mer_jax import errors
from mer_jax.data import dialogue_csv
from mer_jax.data import prompts as prompts_lib
from mer_jax.data import text_batching
from mer_jax.preprocess import text_features
from mer_jax.preprocess import text_finetune
from mer_jax.train import cpu_backend
from mer_jax.train import optim
from mer_jax.train import sharding

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined when it runs (cli.run_absl), not on import."""
  config_flags.DEFINE_config_file('config', 'configs/meld_text.py',
                                  'Config whose config.text section is benchmarked.')
  flags.DEFINE_integer('rounds', 3, 'Timing rounds, each over every batch of both tasks in both '
                       'frameworks.')
  flags.DEFINE_integer('batches', 3, 'Batches per task (extraction, fine-tuning).')
  flags.DEFINE_integer('tokens_per_batch', 0, 'Token slots of an extraction batch (0: '
                       'config.text.tokens_per_batch).')
  flags.DEFINE_integer('finetune_tokens_per_batch', 0, 'Token slots of a fine-tuning batch (0: '
                       'config.text.finetune.tokens_per_batch).')
  flags.DEFINE_integer('threads', 0, 'CPU threads for both frameworks (0: every CPU this process '
                       'may run on). Fewer pins the process to that many CPUs, which sizes JAX\'s '
                       'thread pool, and sets torch\'s.')
  flags.DEFINE_enum('torch_adamw', 'default', ['default', 'foreach', 'fused'],
                    'PyTorch AdamW implementation (default: what torch picks on CPU, a loop over '
                    'parameters).')
  flags.DEFINE_bool('synthetic', False,
                    'Use the synthetic sentence list even when the MELD transcripts are present.')
  flags.DEFINE_integer('seed', 0, 'Seed of the batch sample and of the random labels.')


TASKS = ('extraction', 'finetune')
FRAMEWORKS = ('flax', 'torch')


def import_torch():
  """(torch, transformers), or the one-line error saying how to install them."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.UserError(f'the text bench needs PyTorch ({e}): pip install -e .[test]') from None
  return torch, transformers


# ---------------------------------------------------------------------------
# The sentences and their batches.


@dataclasses.dataclass
class Workload:
  """Token sequences (tokenised once) with fixed labels, and where they came from."""
  source: str
  sequences: list[prompts_lib.Prompt]
  labels: np.ndarray  # int32[n], fixed random labels
  pad_id: int
  vocab_size: int  # of the tokenizer, speaker tokens included

  @property
  def lengths(self) -> list[int]:
    return [len(s) for s in self.sequences]


_WORDS = ('i', 'you', 'we', 'know', 'what', 'oh', 'my', 'god', 'this', 'is', 'the', 'best',
          'day', 'ever', 'no', 'way', 'really', 'okay', 'so', 'and', 'then', 'she', 'said',
          'he', 'was', 'going', 'to', 'tell', 'me', 'about', 'it', 'but', 'never', 'did', 'hey',
          'how', 'are', 'doing', 'come', 'on', 'that', 'not', 'funny', 'wait', 'a', 'minute',
          'coffee', 'apartment', 'tonight', 'party', 'sorry', 'great', 'yeah', 'well', 'maybe')


def synthetic_dialogues(num_dialogues: int = 400, seed: int = 0) -> list[dialogue_csv.Dialogue]:
  """Deterministic dialogues of 1-20 utterances of 1-40 words (about 9 on average)."""
  rng = np.random.default_rng(seed)
  dialogues = []
  for d in range(num_dialogues):
    n = int(rng.integers(1, 21))
    words = [rng.choice(_WORDS, size=min(40, 1 + int(rng.geometric(1 / 9)))) for _ in range(n)]
    dialogues.append(dialogue_csv.Dialogue(
        dialogue_id=str(d), utterance_ids=np.arange(n, dtype=np.int32),
        speakers=[f'speaker{int(s)}' for s in rng.integers(0, 3, size=n)],
        transcripts=[' '.join(w).capitalize() + '.' for w in words],
        labels=np.zeros(n, np.int32)))
  return dialogues


def text_workload(config, tok: prompts_lib.PromptTokenizer, *, synthetic: bool = False,
                  seed: int = 0) -> Workload:
  """The MELD training transcripts (config.text.csv) tokenised as our feature extraction does,
  or, where that file is missing (or `synthetic`), the synthetic dialogues."""
  t = config.text
  split = config.data.train_split
  path = os.path.join(os.path.abspath(t.csv.dir), t.csv.pattern.format(split=split))
  if not synthetic and os.path.isfile(path):
    dialogues = text_features.read_splits(t, [split])[split]
    source = f'MELD transcripts ({path})'
  else:
    dialogues = synthetic_dialogues(seed=seed)
    source = ('synthetic dialogues (deterministic; ' +
              ('--synthetic' if synthetic else f'{path} not found') + ')')
  sequences = text_features.dialogue_sequences(tok, dialogues, t)
  source += f', input={t.input!r}: {len(sequences)} sequences'
  return Workload(source, sequences, random_labels(len(sequences), len(config.label_names), seed),
                  tok.pad_id, tok.vocab_size)


def random_labels(n: int, num_classes: int, seed: int) -> np.ndarray:
  return np.random.default_rng([seed, 1]).integers(0, num_classes, size=n).astype(np.int32)


def extraction_batches(config, workload: Workload, n: int, tokens_per_batch: int = 0,
                       seed: int = 0) -> list[text_batching.TokenBatch]:
  """`n` batches of our feature extraction's plan (its buckets and token budget), sampled from a
  shuffled plan of every sequence: the buckets in the proportions of the whole list."""
  t = config.text
  buckets = text_batching.bucket_lengths(t.max_length, t.smallest_bucket, t.bucket_growth)
  plan = text_batching.plan_batches(workload.lengths, buckets,
                                    tokens_per_batch or t.tokens_per_batch,
                                    rng=np.random.default_rng([seed, 2]))
  return list(text_batching.iterate_batches(
      workload.sequences, text_batching.BatchPlan(plan.batches[:n]), workload.pad_id,
      workload.labels))


def finetune_batches(tuner: text_finetune.TextFinetuner, workload: Workload, n: int
                     ) -> list[text_batching.TokenBatch]:
  """The first `n` batches of our fine-tuning's first epoch."""
  plan = tuner.epoch_plan(0)
  return list(text_batching.iterate_batches(
      workload.sequences, text_batching.BatchPlan(plan.batches[:n]), workload.pad_id,
      workload.labels))


def shapes(batches: Sequence[text_batching.TokenBatch]) -> list[tuple[int, int]]:
  return sorted({b.input_ids.shape for b in batches})


# ---------------------------------------------------------------------------
# The two frameworks.


class CompileSeconds:
  """Seconds JAX spends tracing, lowering and compiling, summed from its monitoring events."""

  EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
            '/jax/core/compile/jaxpr_to_mlir_module_duration',
            '/jax/core/compile/backend_compile_duration')
  _registered = False
  _active: 'CompileSeconds | None' = None

  def __init__(self):
    self.seconds = 0.0
    if not CompileSeconds._registered:
      jax.monitoring.register_event_duration_secs_listener(CompileSeconds._listen)
      CompileSeconds._registered = True

  @staticmethod
  def _listen(event: str, duration: float, **_):
    if CompileSeconds._active is not None and event in CompileSeconds.EVENTS:
      CompileSeconds._active.seconds += duration

  def __enter__(self):
    CompileSeconds._active = self
    return self

  def __exit__(self, *_):
    CompileSeconds._active = None


class FlaxSide:
  """Our extraction (`make_encode_fn`) and fine-tuning step (`TextFinetuner`'s jitted train step,
  state donated), each on its own copy of the encoder."""

  name = 'flax'

  def __init__(self, config, folder: str, workload: Workload, workdir: str):
    t = config.text
    encoder = text_features.encoder_from_folder(folder, workload.vocab_size)
    self.encode_fn = text_features.make_encode_fn(encoder, t.pooling, t.normalize, tuple(t.layers))
    split = text_finetune.TokenSplit(workload.sequences, workload.labels)
    mesh = sharding.make_mesh(config)
    self.tuner = text_finetune.TextFinetuner(
        config, workdir, mesh, text_features.encoder_from_folder(folder, workload.vocab_size),
        split, split, workload.pad_id)
    self.state = self.tuner.state
    self.train_step = self.tuner._train_step  # pylint: disable=protected-access

  def put_extraction(self, batch: text_batching.TokenBatch) -> text_batching.TokenBatch:
    return dataclasses.replace(
        batch, **{k: jax.device_put(getattr(batch, k))
                  for k in ('input_ids', 'attention_mask', 'last_index', 'target_mask')})

  def put_finetune(self, batch: text_batching.TokenBatch) -> dict:
    return self.tuner.put(batch)

  def extract(self, batches: Sequence[Any]) -> list[np.ndarray]:
    """Vectors of every batch on the host; two batches dispatched ahead, as encode_sequences."""
    pending, out = [], []
    for batch in batches:
      pending.append(self.encode_fn(batch))
      if len(pending) > 2:
        out.append(np.asarray(pending.pop(0)))
    return out + [np.asarray(v) for v in pending]

  def finetune(self, batches: Sequence[Any]) -> list[float]:
    losses = []
    for batch in batches:
      self.state, metrics = self.train_step(self.state, batch, self.tuner.class_weights,
                                            self.tuner.schedule_steps)
      losses.append(metrics['loss'])
    return [float(l) for l in jax.device_get(losses)]

  def head_weights(self) -> dict[str, np.ndarray]:
    params = self.state.params
    get = lambda *path: np.asarray(jax.device_get(_leaf(params, path)))
    return {'projection.weight': get('projection', 'kernel').T,
            'projection.bias': get('projection', 'bias'),
            'classifier.weight': get('classifier', 'kernel').T,
            'classifier.bias': get('classifier', 'bias')}


def _leaf(tree, path):
  for key in path:
    tree = tree[key]
  return tree[...] if isinstance(tree, nnx.Variable) else tree


def torch_pool(torch, hidden, attention_mask, last_index, target_mask, pooling: str):
  """`text_classifier.pool` in PyTorch."""
  if pooling == 'cls':
    return hidden[:, 0]
  if pooling == 'last':
    return hidden[torch.arange(hidden.shape[0]), last_index]
  if pooling == 'mean':
    weights = attention_mask.to(hidden.dtype)
  elif pooling == 'target_mean':
    has_target = target_mask.any(dim=1, keepdim=True)
    weights = torch.where(has_target, target_mask, attention_mask > 0).to(hidden.dtype)
  else:
    raise ValueError(f'pooling must be one of {text_features.POOLINGS}, got {pooling!r}')
  total = torch.einsum('bl,blh->bh', weights, hidden)
  return total / weights.sum(dim=1, keepdim=True).clamp(min=1.0)


class TorchSide:
  """transformers' PyTorch encoder of the same checkpoint (`BertModel` for MiniLM; resized as
  ours), for extraction, and a second copy under our classification head for fine-tuning."""

  name = 'torch'

  def __init__(self, config, folder: str, workload: Workload, head: dict[str, np.ndarray],
               total_steps: int, adamw: str = 'default'):
    torch, transformers = import_torch()
    self.torch = torch
    t, ft = config.text, config.text.finetune
    self.pooling, self.normalize = t.pooling, t.normalize
    self.encoder = self._load(transformers, folder, workload.vocab_size).eval()
    self.indices = text_features.hidden_state_indices(
        tuple(t.layers), self.encoder.config.num_hidden_layers)
    # pylint: disable-next=protected-access
    self.attn_implementation = self.encoder.config._attn_implementation
    nn = torch.nn
    hidden = self.encoder.config.hidden_size

    outer = self

    class Classifier(nn.Module):
      """TextClassifier: pooled hidden state -> dropout -> projection -> classifier."""

      def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(ft.dropout)
        self.projection = nn.Linear(hidden, int(ft.projection_dim))
        self.classifier = nn.Linear(int(ft.projection_dim), len(config.label_names))

      def forward(self, input_ids, attention_mask, last_index, target_mask):
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=torch.zeros_like(input_ids))
        pooled = torch_pool(torch, out.last_hidden_state, attention_mask, last_index, target_mask,
                            outer.pooling)
        return self.classifier(self.projection(self.dropout(pooled)))

    self.model = Classifier(self._load(transformers, folder, workload.vocab_size)).train()
    with torch.no_grad():
      for name, value in head.items():
        self.model.get_parameter(name).copy_(torch.from_numpy(np.array(value)))
    opt = ft.optim
    kwargs = {'foreach': {'foreach': True}, 'fused': {'fused': True}}.get(adamw, {})
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=float(opt.lr),
                                       betas=(float(opt.b1), float(opt.b2)), eps=float(opt.eps),
                                       weight_decay=float(opt.weight_decay), **kwargs)
    schedule = optim.make_schedule(opt, total_steps)  # as our make_optimizer's
    self.lr_factors = (np.asarray(schedule(jnp.arange(total_steps + 1))) / float(opt.lr)).tolist()
    self.scheduler = torch.optim.lr_scheduler.LambdaLR(
        self.optimizer, lambda i: self.lr_factors[min(i, len(self.lr_factors) - 1)])
    self.clip = float(opt.grad_clip_norm or 0.0)
    self.class_weights = None  # filled by run_bench with ours
    self.adamw = adamw

  def _load(self, transformers, folder: str, vocab_size: int):
    torch = self.torch
    model = transformers.AutoModel.from_pretrained(folder, add_pooling_layer=False)
    old = model.get_input_embeddings().weight.shape[0]
    if vocab_size > old:
      model.resize_token_embeddings(vocab_size, mean_resizing=False)
      with torch.no_grad():  # new rows at the mean of the old ones, as resize_token_embeddings
        table = model.get_input_embeddings().weight
        table[old:] = table[:old].mean(dim=0, keepdim=True)
    return model

  def _tensors(self, batch: text_batching.TokenBatch) -> dict:
    torch = self.torch
    return {'input_ids': torch.from_numpy(batch.input_ids.astype(np.int64)),
            'attention_mask': torch.from_numpy(batch.attention_mask.astype(np.int64)),
            'last_index': torch.from_numpy(batch.last_index.astype(np.int64)),
            'target_mask': torch.from_numpy(batch.target_mask),
            'labels': torch.from_numpy(batch.labels.astype(np.int64))}

  put_extraction = put_finetune = _tensors

  def extract(self, batches: Sequence[dict]) -> list[np.ndarray]:
    torch, out = self.torch, []
    with torch.inference_mode():
      for b in batches:
        hidden = self.encoder(input_ids=b['input_ids'], attention_mask=b['attention_mask'],
                              token_type_ids=torch.zeros_like(b['input_ids']),
                              output_hidden_states=True).hidden_states
        parts = []
        for i in self.indices:
          v = torch_pool(torch, hidden[i], b['attention_mask'], b['last_index'], b['target_mask'],
                         self.pooling)
          if self.normalize:
            v = v / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)
          parts.append(v)
        out.append(torch.cat(parts, dim=-1).numpy())
    return out

  def finetune(self, batches: Sequence[dict]) -> list[float]:
    torch, losses = self.torch, []
    for b in batches:
      self.optimizer.zero_grad(set_to_none=True)
      logits = self.model(b['input_ids'], b['attention_mask'], b['last_index'], b['target_mask'])
      loss = torch.nn.functional.cross_entropy(logits, b['labels'], weight=self.class_weights,
                                               ignore_index=-1)
      loss.backward()
      if self.clip > 0:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
      self.optimizer.step()
      self.scheduler.step()
      losses.append(loss.detach())
    return [float(l) for l in losses]


# ---------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass
class Timings:
  """One framework on one task: seconds and real tokens of each timed round."""
  seconds: list = dataclasses.field(default_factory=list)
  tokens: list = dataclasses.field(default_factory=list)

  @property
  def median_s(self) -> float:
    return statistics.median(self.seconds)

  @property
  def tokens_per_s(self) -> float:
    return statistics.median(t / s for t, s in zip(self.tokens, self.seconds))


def real_tokens(batches: Sequence[Any]) -> int:
  """Non-padding tokens of the real rows (label >= 0) of one framework's own input arrays."""
  total = 0
  for b in batches:
    get = (lambda k: getattr(b, k)) if isinstance(b, text_batching.TokenBatch) else b.__getitem__
    mask, labels = np.asarray(get('attention_mask')), np.asarray(get('labels'))
    total += int(mask[labels >= 0].sum())
  return total


def run_task(side, task: str, batches: Sequence[Any]) -> tuple[float, list]:
  """Seconds for `side` to run `task` over every batch (results on the host), and its outputs
  (vectors or losses)."""
  run = side.extract if task == 'extraction' else side.finetune
  t0 = time.perf_counter()
  out = run(batches)
  return time.perf_counter() - t0, out


def run_bench(config, folder: str, workload: Workload, *, rounds: int, batches: int,
              tokens_per_batch: int = 0, finetune_tokens_per_batch: int = 0, threads: int = 0,
              torch_adamw: str = 'default', seed: int = 0) -> dict:
  """Times both frameworks on both tasks; returns the results (see `report`)."""
  torch, _ = import_torch()
  threads = threads or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  config = config.copy_and_resolve_references()
  if finetune_tokens_per_batch:
    config.text.finetune.tokens_per_batch = finetune_tokens_per_batch
  with tempfile.TemporaryDirectory() as workdir:
    started = time.perf_counter()
    flax_side = FlaxSide(config, folder, workload, workdir)
    flax_load_s = time.perf_counter() - started
    work = {'extraction': extraction_batches(config, workload, batches, tokens_per_batch, seed),
            'finetune': finetune_batches(flax_side.tuner, workload, batches)}
    started = time.perf_counter()
    torch_side = TorchSide(config, folder, workload, flax_side.head_weights(),
                           total_steps=max(1, sum(flax_side.tuner.plan_sizes)), adamw=torch_adamw)
    torch_side.class_weights = torch.from_numpy(np.array(flax_side.tuner.class_weights))
    torch_load_s = time.perf_counter() - started
    sides = {'flax': flax_side, 'torch': torch_side}
    inputs = {(name, task): [getattr(side, f'put_{task}')(b) for b in work[task]]
              for name, side in sides.items() for task in TASKS}
    tokens = {task: sum(b.num_real_tokens for b in work[task]) for task in TASKS}
    seen = {key: real_tokens(batches) for key, batches in inputs.items()}  # per framework
    slots = {task: sum(b.input_ids.size for b in work[task]) for task in TASKS}

    # Warm-up: every batch once (Flax compiles each shape here), untimed.
    warm, outputs = {}, {}
    for task in TASKS:
      for name, side in sides.items():
        with CompileSeconds() as compiled:
          seconds, outputs[name, task] = run_task(side, task, inputs[name, task])
        warm[name, task] = (seconds, compiled.seconds)
    diff = max(float(np.abs(a - b).max())
               for a, b in zip(outputs['flax', 'extraction'], outputs['torch', 'extraction']))
    first_loss = {name: outputs[name, 'finetune'][0] for name in sides}

    timings = {(name, task): Timings() for name in sides for task in TASKS}
    for r in range(rounds):
      order = FRAMEWORKS if r % 2 == 0 else FRAMEWORKS[::-1]
      for task in TASKS:
        for name in order:
          seconds, out = run_task(sides[name], task, inputs[name, task])
          if task == 'finetune' and not all(math.isfinite(l) for l in out):
            raise FloatingPointError(f'{name}: non-finite fine-tuning loss {out}')
          timings[name, task].seconds.append(seconds)
          timings[name, task].tokens.append(seen[name, task])
  return {
      'source': workload.source, 'threads': threads, 'jax_devices': str(jax.devices()),
      'torch_threads': torch.get_num_threads(), 'torch_version': torch.__version__,
      'torch_model': type(torch_side.encoder).__name__,
      'attn_implementation': torch_side.attn_implementation, 'torch_adamw': torch_adamw,
      'rounds': rounds, 'load_s': {'flax': flax_load_s, 'torch': torch_load_s},
      'batches': {task: len(work[task]) for task in TASKS},
      'shapes': {task: shapes(work[task]) for task in TASKS},
      'tokens': tokens, 'slots': slots, 'warmup': warm, 'feature_max_diff': diff,
      'first_loss': first_loss, 'timings': timings, 'loadavg': os.getloadavg()[0],
  }


def report(res: dict, log: Callable[[str], None] = print) -> None:
  log(f'sentences: {res["source"]}')
  log(f'threads: {res["threads"]} (torch.get_num_threads() = {res["torch_threads"]}; JAX '
      f'{res["jax_devices"]}); torch {res["torch_version"]}, {res["torch_model"]} attention '
      f'{res["attn_implementation"]!r}, AdamW {res["torch_adamw"]!r}')
  for task in TASKS:
    tok, slots = res['tokens'][task], res['slots'][task]
    log(f'{task}: {res["batches"][task]} batches of shapes {res["shapes"][task]} '
        f'(rows x length): {tok} real tokens in {slots} slots ({100 * (1 - tok / slots):.0f}% '
        'padding)')
  for task in TASKS:
    (fs, fc), (ts, _) = res['warmup']['flax', task], res['warmup']['torch', task]
    log(f'warm-up, {task}: flax {fs:.1f} s, of which {fc:.1f} s tracing, lowering and compiling '
        f'{len(res["shapes"][task])} shapes; torch {ts:.1f} s')
  log(f'features agree: max |flax - torch| = {res["feature_max_diff"]:.1e}; first fine-tuning '
      f'loss flax {res["first_loss"]["flax"]:.4f}, torch {res["first_loss"]["torch"]:.4f}')
  log('')
  log(f'{res["rounds"]} rounds, frameworks alternating; medians (1-minute load average at the end: '
      f'{res["loadavg"]:.1f} on {os.cpu_count()} CPUs). "per round": each round\'s ratio.')
  log(f'{"task":11} {"flax s":>7} {"torch s":>7} {"flax tok/s":>10} {"torch tok/s":>11} '
      f'{"flax/torch":>10}  per round')
  for task in TASKS:
    f, t = res['timings']['flax', task], res['timings']['torch', task]
    rounds = ' '.join(f'{ts / fs:.2f}' for fs, ts in zip(f.seconds, t.seconds))
    log(f'{task:11} {f.median_s:7.2f} {t.median_s:7.2f} {f.tokens_per_s:10.0f} '
        f'{t.tokens_per_s:11.0f} {f.tokens_per_s / t.tokens_per_s:9.2f}x  {rounds}')


def main(argv):
  del argv
  if FLAGS.threads:
    cpus = sorted(os.sched_getaffinity(0))
    if FLAGS.threads > len(cpus):
      raise errors.UserError(f'--threads={FLAGS.threads}: this process may run on {len(cpus)} '
                             'CPUs')
    os.sched_setaffinity(0, cpus[:FLAGS.threads])  # before JAX starts its thread pool
  _, transformers = import_torch()
  transformers.logging.set_verbosity_error()  # no load reports (the pooler is left out on purpose)
  cpu_backend.tune_for_cpu_backend()  # as text fine-tuning and feature extraction run
  config = errors.loaded_config(FLAGS['config'])
  folder = text_features.resolve_encoder(config.text.encoder)
  tok = text_features.prompt_tokenizer(config.text, folder)
  workload = text_workload(config, tok, synthetic=FLAGS.synthetic, seed=FLAGS.seed)
  print(f'encoder: {config.text.encoder} ({folder})')
  res = run_bench(config, folder, workload, rounds=FLAGS.rounds, batches=FLAGS.batches,
                  tokens_per_batch=FLAGS.tokens_per_batch,
                  finetune_tokens_per_batch=FLAGS.finetune_tokens_per_batch,
                  threads=FLAGS.threads, torch_adamw=FLAGS.torch_adamw, seed=FLAGS.seed)
  report(res)


def run(argv=None) -> None:
  """The `mer-jax-bench-text` console script."""
  cli.run_absl(main, doc=__doc__, define_flags=define_flags, argv=argv)


if __name__ == '__main__':
  run()
