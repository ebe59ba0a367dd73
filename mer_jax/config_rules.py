"""The rule of every config key: its type and its range or choices, keyed by dotted name.

'*' in a key stands for any one segment (a stage, a modality). A rule's `doc` is the key's
documentation, edge values included (e.g. 'an int >= 0 (0: at the end of every epoch only)').
mer_jax/config_validation.py applies them, then checks across keys. No JAX here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
from typing import Any, Callable, Mapping

import ml_collections

from mer_jax import stages

SCHEDULES = ('constant', 'warmup_cosine', 'warmup_linear')
# The parameter groups of the fusion model (mer_jax.models.PARAM_GROUPS; not imported: JAX).
FUSION_PARAM_GROUPS = ('proj', 'transformer', 'classifiers', 'other')
# Blocks only some data sources read (see configs/meld_text.py and configs/raw_demo.py).
OPTIONAL_BLOCKS = ('text', 'raw', 'lipsync')
SPLIT_NAME = re.compile(r'^[A-Za-z0-9_]+$')  # as the shard writer requires


# --- rules ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Kind:
  """A value's type: `name` as a message says it, `test` whether a value has it."""
  name: str
  test: Callable[[Any], bool]


def _is_int(v) -> bool:
  t = type(v)
  return t is int or (t is not bool and isinstance(v, numbers.Integral))


def _is_number(v) -> bool:
  t = type(v)
  if t is not float and t is not int:
    if t is bool or not isinstance(v, numbers.Real):
      return False
  return math.isfinite(v)


def is_dict(v) -> bool:
  return isinstance(v, (dict, ml_collections.ConfigDict))


INT = Kind('an int', _is_int)
NUMBER = Kind('a finite number', _is_number)
STR = Kind('a str', lambda v: isinstance(v, str))
CHOICE = Kind('', lambda v: isinstance(v, str))  # a str among a rule's options (says which)
BOOL = Kind('a bool', lambda v: isinstance(v, bool))
TUPLE = Kind('a tuple', lambda v: isinstance(v, (tuple, list)))
DICT = Kind('a dict', is_dict)
ANY = Kind('any value', lambda v: True)


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one key accepts: a `kind`, a condition `says` (checked by `test`) and a `note` on what
  edge values mean. `check` returns None or the problem; `template` (formatted with `value`)
  replaces the generated message where an older wording is kept."""
  kind: Kind
  says: str = ''
  test: Callable[[Any], bool] | None = None
  note: str = ''
  template: str = ''

  @property
  def doc(self) -> str:
    text = ' '.join(p for p in (self.kind.name, self.says) if p)
    return f'{text} ({self.note})' if self.note else text

  def accepts(self, value) -> bool:
    return self.kind.test(value) and (self.test is None or bool(self.test(value)))

  def check(self, value) -> str | None:
    if self.accepts(value):
      return None
    if self.template:
      return self.template.format(value=value)
    if not self.kind.test(value) or self.kind is TUPLE:
      return f'must be {self.doc}, got {value!r}'
    said = f'{self.says} ({self.note})' if self.note else self.says
    return f'must be {said}, got {value!r}'


def _range(lo, hi, lo_open: bool, hi_open: bool) -> tuple[str, Callable[[Any], bool]]:
  """Text and test of lo <= v <= hi (open ends: <), None = unbounded; NaN is never in range."""
  def test(v):
    return ((lo is None or (v > lo if lo_open else v >= lo))
            and (hi is None or (v < hi if hi_open else v <= hi)))
  if lo is not None and hi is not None:
    text = f'in {"(" if lo_open else "["}{lo!r}, {hi!r}{")" if hi_open else "]"}'
  elif lo is not None:
    text = f'{">" if lo_open else ">="} {lo!r}'
  elif hi is not None:
    text = f'{"<" if hi_open else "<="} {hi!r}'
  else:
    text = ''
  return text, test


def integer(lo=None, hi=None, *, note='', template='') -> Rule:
  """An int in [lo, hi]."""
  says, test = _range(lo, hi, False, False)
  return Rule(INT, says, test, note, template)


def number(lo=None, hi=None, *, lo_open=False, hi_open=False, note='', template='') -> Rule:
  """A finite number (an int is fine) in [lo, hi]; open ends with lo_open / hi_open."""
  says, test = _range(lo, hi, lo_open, hi_open)
  return Rule(NUMBER, says, test, note, template)


def choice(*options, note='', template='') -> Rule:
  says = ', '.join(repr(o) for o in options[:-1])
  says = f'{says} or {options[-1]!r}' if says else repr(options[0])
  return Rule(CHOICE, says, lambda v: v in options, note, template)


def flag(note='') -> Rule:
  return Rule(BOOL, note=note)


def text(*, nonempty=False, pattern: re.Pattern | None = None, note='', template='') -> Rule:
  """A str; `nonempty` or matching `pattern` if asked."""
  says = 'matching ' + pattern.pattern if pattern else ('(not empty)' if nonempty else '')
  def test(v):
    return (not nonempty or bool(v)) and (pattern is None or bool(pattern.match(v)))
  return Rule(STR, says, test, note, template)


def tuple_of(item: Rule, *, min_len=0, distinct=False, note='', template='') -> Rule:
  """A tuple (or list) of at least `min_len` entries, each accepted by `item`."""
  counts = ([f'at least {min_len} {"entry" if min_len == 1 else "entries"}'] if min_len else []
            ) + (['distinct'] if distinct else [])
  says = (f'({", ".join(counts)}) ' if counts else '') + f'of entries each {item.doc}'
  def test(v):
    return (len(v) >= min_len and all(item.accepts(x) for x in v)
            and (not distinct or len(set(v)) == len(v)))
  return Rule(TUPLE, says, test, note, template)


def pair(item: Rule, *, note='') -> Rule:
  """A (lo, hi) range: two entries accepted by `item`, lo <= hi."""
  def test(v):
    return len(v) == 2 and item.accepts(v[0]) and item.accepts(v[1]) and v[0] <= v[1]
  return Rule(TUPLE, f'(lo, hi) with lo <= hi, each {item.doc}', test, note)


def record(says: str, *items: Rule) -> Rule:
  """A tuple of fixed length whose i-th entry `items[i]` accepts."""
  def test(v):
    return len(v) == len(items) and all(r.accepts(x) for r, x in zip(items, v))
  return Rule(TUPLE, says, test)


def mapping(note='') -> Rule:
  return Rule(DICT, note=note)


def anything(note='') -> Rule:
  return Rule(ANY, note=note)


def _formats_split(pattern: str) -> bool:
  try:
    pattern.format(split='train')
  except (KeyError, IndexError, ValueError, AttributeError, TypeError):
    return False
  return True


POSITIVE = number(0, lo_open=True)
NON_NEGATIVE = number(0)
PROBABILITY = number(0, 1)
DROPOUT = number(0, 1, hi_open=True)
COUNT = integer(1)
SEED = integer(0, 2**31 - 1, note='numpy streams need seeds >= 0, JAX keys hold 32 bits')
PATH = text(note='a path')
SPLIT = text(pattern=SPLIT_NAME)
FILE_PATTERN = Rule(STR, 'naming a file per split with {split} (no other {fields})',
                    _formats_split)
MOMENTUM = number(0, 1, hi_open=True)


def _optim_rules() -> dict[str, Rule]:
  """The settings of one training stage's optimizer (configs/default.py: stage_optim)."""
  return {
      'lr': POSITIVE,
      'weight_decay': NON_NEGATIVE,
      'schedule': choice(*SCHEDULES),
      'warmup_fraction': number(0, 1, hi_open=True),
      'grad_clip_norm': number(0, note='0: no clipping'),
      'grad_accum_steps': COUNT,
      'ema_decay': number(0, 1, hi_open=True, note='0: no EMA'),
      'early_stopping_patience': COUNT,
      'lr_reduce_patience': COUNT,
      'lr_reduce_factor': number(0, 1, lo_open=True, note='1: never reduce'),
      'b1': MOMENTUM,
      'b2': MOMENTUM,
      'eps': POSITIVE,
      'lr_multipliers': mapping('parameter group -> lr multiplier; empty: 1 for all'),
      'lr_multipliers.*': number(0, note='0 freezes the group'),
  }


def _build_rules() -> dict[str, Rule]:
  mod_list = tuple_of(choice(*stages.MODALITIES), min_len=1, distinct=True,
                      template=f'{{value!r}} must be distinct entries of {stages.MODALITIES}')
  rules = {
      'seed': SEED,
      'label_names': tuple_of(text(nonempty=True), min_len=2, distinct=True,
                              template='needs at least two distinct names, got {value!r}'),
      # data
      'data.source': choice('synthetic', 'shards', 'text_csv', 'raw',
                            template="{value!r} is not 'synthetic', 'shards', 'text_csv' or 'raw'"),
      'data.shard_dir': text(note="a folder with manifest.json, for source 'shards'"),
      'data.train_split': SPLIT,
      'data.dev_split': SPLIT,
      'data.test_split': SPLIT,
      'data.modalities': mod_list,
      'data.dims': mapping('modality -> feature dimension'),
      'data.dims.*': integer(1, template='must be a positive dimension, got {value!r}'),
      'data.cache_dir': text(note="'': workdir/data"),
      'data.verify_checksums': flag(),
      'data.on_bad_record': choice('error', 'skip'),
      'data.cache_mib': integer(0, note='0: read every record from its file'),
      'data.read_threads': integer(0, note='0: read in the iterating thread'),
      'data.prefetch': integer(0, note='0: no prefetch buffer'),
      'data.synthetic.seed': integer(0),
      'data.synthetic.num_dialogues': mapping('split -> dialogues'),
      'data.synthetic.num_dialogues.*': COUNT,
      'data.synthetic.num_shards': mapping('split -> shard files'),
      'data.synthetic.num_shards.*': COUNT,
      'data.synthetic.story': mapping('the fields of mer_jax.data.synthetic.CorpusStory'),
      'data.synthetic.story.modalities': mapping('modality -> its ModalityStory fields'),
      'data.synthetic.story.modalities.*.groups': tuple_of(
          tuple_of(integer(0), min_len=1), min_len=1,
          note='class indices grouped; each class once'),
      'data.synthetic.story.modalities.*.signal': POSITIVE,
      'data.synthetic.story.modalities.*.weak_rate': PROBABILITY,
      'data.synthetic.story.modalities.*.missing_rate': PROBABILITY,
      'data.synthetic.story.subspace_dim': COUNT,
      **{f'data.synthetic.story.{k}': PROBABILITY
         for k in ('keep_own_emotion', 'copy_previous_emotion', 'label_noise',
                   'shared_weak_rate', 'cue_rate')},
      **{f'data.synthetic.story.{k}': NON_NEGATIVE
         for k in ('within_group', 'weak_intensity', 'zipf_exponent', 'style_in_subspace',
                   'style_per_dim', 'offset_in_subspace', 'offset_per_dim')},
      'data.synthetic.story.speaker_repeat_weight': POSITIVE,
      # augmentation
      'augment.enabled': flag(),
      'augment.clean_frozen_inputs': flag(),
      'augment.t_dropout': DROPOUT,
      'augment.t_noise_std': NON_NEGATIVE,
      'augment.t_shuffle_prob': PROBABILITY,
      'augment.t_shuffle_fraction': PROBABILITY,
      'augment.t_scale_prob': PROBABILITY,
      'augment.t_scale_range': pair(POSITIVE),
      'augment.a_noise_std': NON_NEGATIVE,
      'augment.v_scale_range': pair(POSITIVE),
      # batches and graphs
      'batch.max_nodes': integer(2, template='must be >= 2 (one slot is padding), got {value!r}'),
      'batch.max_graphs': integer(2, template='must be >= 2 (one slot is padding), got {value!r}'),
      'batch.utterances_per_batch': COUNT,
      'batch.groups': integer(0, note='0: one sub-batch per JAX process'),
      'graph.scope': choice('dialogue', 'batch', template="{value!r} is not 'dialogue' or 'batch'"),
      'graph.k': mapping('modality -> neighbours per utterance'),
      'graph.k.*': COUNT,
      'graph.temporal_weight': mapping('modality -> temporal edge weight'),
      'graph.temporal_weight.*': number(0, note='0: temporal edges carry no weight'),
      'graph.speaker_edges': flag(),
      'graph.speaker_weight': number(0),
      'graph.gat_edge_weights': choice('bias', 'none'),
      # models
      'model.teacher.hidden': COUNT,
      'model.teacher.heads': COUNT,
      'model.teacher.dropout': DROPOUT,
      'model.teacher.input_dropout': DROPOUT,
      'model.teacher.linear_skip': flag(),
      'model.teacher.context_gru': integer(0, note='0: no GRU',
                                           template='{value!r} must be an int >= 0'),
      'model.teacher.context_projection': integer(0, note='0: the GRU reads the features',
                                                  template='{value!r} must be an int >= 0'),
      'model.teacher.input_batchnorm': flag(),
      'model.audio.hidden': COUNT,
      'model.audio.layers': COUNT,
      'model.audio.dropout': DROPOUT,
      'model.audio.input_dropout': DROPOUT,
      'model.visual.layers': tuple_of(
          record('(width per head >= 1, heads >= 1, concat: a bool)', COUNT, COUNT, flag()),
          min_len=1),
      'model.visual.dropout': DROPOUT,
      'model.visual.input_dropout': DROPOUT,
      'model.batchnorm_momentum': MOMENTUM,
      'model.fusion.input': choice(*stages.FUSION_INPUTS),
      'model.fusion.stacking_folds': integer(2),
      'model.fusion.dim': integer(2),
      'model.fusion.layers': integer(0, note='0: no transformer layers'),
      'model.fusion.heads': COUNT,
      'model.fusion.dropout': DROPOUT,
      'model.fusion.use_moe': flag(),
      'model.fusion.num_experts': COUNT,
      'model.fusion.top_k': COUNT,
      'model.fusion.alignment': flag(),
      'model.fusion.alignment_mix': PROBABILITY,
      'model.fusion.gates': flag(),
      'model.fusion.gate_residual': number(0),
      'model.fusion.cross_attention': flag(),
      'model.fusion.cross_residual': number(0),
      'model.fusion.pool_queries': COUNT,
      'model.fusion.classifier_heads': COUNT,
      'model.fusion.alignment_scope': choice('dialogue', 'batch'),
      'model.fusion.linear_skip': flag(),
      # losses
      'loss.class_weights': choice('balanced', 'none'),
      'loss.class_weight_power': number(0, note='0: unweighted'),
      'loss.poly_alpha': number(-1, note='the PolyLoss epsilon; 0: no poly term'),
      'loss.poly_gamma': number(0),
      'loss.distill': flag(),
      'loss.distill_temperature': POSITIVE,
      'loss.distill_alpha': PROBABILITY,
      'loss.distill_cached_teacher': flag(),
      'loss.focal_gamma': number(0, note='0: no focal weighting'),
      'loss.main_focal_share': PROBABILITY,
      'loss.label_smoothing': number(0, 1, hi_open=True),
      'loss.use_uncertainty': flag(),
      'loss.main_weight': PROBABILITY,
      'loss.aux_weights': mapping('modality -> auxiliary loss weight'),
      'loss.aux_weights.*': number(0),
      'loss.contrastive': flag(),
      'loss.contrastive_weight': number(0),
      'loss.contrastive_temperature': POSITIVE,
      'loss.contrastive_dim': COUNT,
      # training
      'train.stages': tuple_of(choice(*stages.STAGES), min_len=1, distinct=True,
                               template=f'{{value!r}} must be distinct entries of {stages.STAGES}'),
      'train.epochs': COUNT,
      'train.log_every_steps': COUNT,
      'train.progress_bar': flag(),
      'train.checkpoint_keep': COUNT,
      'train.checkpoint_every_steps': integer(0, note='0: at the end of every epoch only'),
      'train.on_change': choice('error', 'retrain'),
      'train.checkpoint_dir': text(note="'': workdir/checkpoints"),
      'train.shared_stages_dir': text(note="'': off"),
      'train.compilation_cache_dir': text(
          note="'': $JAX_COMPILATION_CACHE_DIR if set, else workdir/jax_cache; 'off': none"),
      'train.cpu_fast_compile': flag(),
      'train.early_stopping_min_delta': number(0),
      **{f'optim.*.{k}': r for k, r in _optim_rules().items()},
      # devices and evaluation
      'mesh.shape': mapping('mesh axis -> size'),
      'mesh.shape.*': Rule(INT, '-1 or >= 1', lambda v: v == -1 or v >= 1,
                           note='-1: all remaining devices'),
      'mesh.rules': tuple_of(record('(logical axis, mesh axis or None)', text(nonempty=True),
                                    Rule(Kind('a str or None',
                                              lambda v: v is None or isinstance(v, str))))),
      'eval.confusion_png': flag(),
  }
  rules.update(_text_rules())
  rules.update(_raw_rules())
  rules.update(_lipsync_rules())
  return rules


def _text_rules() -> dict[str, Rule]:
  """The `text` block (configs/meld_text.py: text_frontend)."""
  column = text(note="'': the preset's column")
  rules = {
      'text.csv.preset': choice('meld', 'iemocap', 'custom',
                                template="{value!r} is not 'meld', 'iemocap' or 'custom'"),
      'text.csv.dir': PATH,
      'text.csv.pattern': FILE_PATTERN,
      'text.csv.dialogue_column': Rule(
          Kind('a str or a tuple of str', lambda v: isinstance(v, (str, tuple, list))),
          'naming distinct columns',
          lambda v: isinstance(v, str) or (
              all(isinstance(c, str) and c for c in v) and len(set(v)) == len(v)),
          note="'' or (): the preset's column; several: the dialogue id joins their values "
               "with '/'",
          template="must be a column name or a tuple of distinct column names ('' or (): the "
                   "preset's column), got {value!r}"),
      **{f'text.csv.{k}_column': column for k in ('utterance', 'text', 'speaker', 'label')},
      'text.csv.label_names': tuple_of(text(nonempty=True),
                                       note='(): label_names; else the same as label_names'),
      'text.csv.label_aliases': mapping('spelling in the CSV -> label name'),
      'text.csv.label_aliases.*': text(nonempty=True),
      'text.csv.on_bad_row': choice('error', 'skip'),
      'text.csv.ascii_punctuation': flag(),
      'text.encoder': text(nonempty=True, template='is empty'),
      'text.input': choice('utterance', 'context'),
      'text.pooling': choice('mean', 'cls', 'last', 'target_mean'),
      'text.normalize': flag(),
      'text.layers': tuple_of(integer(), min_len=1, template=(
          '{value} must name at least one hidden state by integer index (-1: the last layer)')),
      'text.max_length': integer(16, 8192),
      'text.max_speakers': integer(1, 100),
      'text.smallest_bucket': COUNT,
      'text.bucket_growth': number(1, lo_open=True),
      'text.tokens_per_batch': COUNT,
      'text.num_shards': mapping('split -> shard files; a split without an entry: 1'),
      'text.num_shards.*': COUNT,
      'text.finetune.enabled': flag(),
      'text.finetune.epochs': COUNT,
      'text.finetune.projection_dim': COUNT,
      'text.finetune.dropout': DROPOUT,
      'text.finetune.class_weights': choice('balanced', 'none'),
      'text.finetune.tokens_per_batch': COUNT,
  }
  rules.update({f'text.finetune.optim.{k}': r for k, r in _optim_rules().items()})
  return rules


def _raw_rules() -> dict[str, Rule]:
  """The `raw` block (configs/raw_demo.py: raw_frontend)."""
  sizes = tuple_of(COUNT, min_len=1)
  return {
      'raw.dir': text(note="a MELD-layout folder ('' with raw.generate)"),
      'raw.generate': flag(),
      'raw.csv_pattern': FILE_PATTERN,
      'raw.split_folders': mapping('split -> folder of clips'),
      'raw.split_folders.*': text(nonempty=True),
      'raw.fps': COUNT,
      'raw.sample_rate': COUNT,
      'raw.workers': integer(0, note='0: one per CPU core'),
      'raw.max_seconds': POSITIVE,
      'raw.mel.n_mels': COUNT,
      'raw.mel.hop': COUNT,
      'raw.mel.win': COUNT,
      'raw.faces.detector': choice('haar', template=(
          "must be 'haar' (or plug a detector into mer_jax.preprocess.faces.DETECTORS)")),
      'raw.faces.scale_factor': number(1, lo_open=True),
      'raw.faces.min_neighbors': integer(0),
      'raw.faces.min_size': COUNT,
      'raw.faces.detect_stride': COUNT,
      'raw.faces.iou_threshold': PROBABILITY,
      'raw.faces.max_gap': integer(0),
      'raw.faces.min_fraction': PROBABILITY,
      'raw.faces.smooth': integer(0, note='0 or 1: no smoothing'),
      'raw.faces.margin': number(0),
      'raw.faces.crop_size': integer(8),
      'raw.faces.max_tracks': COUNT,
      'raw.visual_face': choice('selected', 'true', 'largest', 'random'),
      'raw.encoder_seed': SEED,
      'raw.audio_encoder.checkpoint': text(note="a Hugging Face folder; '': random init"),
      'raw.audio_encoder.random': mapping('Hugging Face Wav2Vec2 config values'),
      'raw.audio_encoder.random.*': anything(
          'other Wav2Vec2 config keys, checked when the encoder is built'),
      **{f'raw.audio_encoder.random.{k}': COUNT
         for k in ('hidden_size', 'num_hidden_layers', 'num_attention_heads',
                   'intermediate_size', 'num_conv_pos_embeddings',
                   'num_conv_pos_embedding_groups')},
      **{f'raw.audio_encoder.random.conv_{k}': sizes for k in ('dim', 'kernel', 'stride')},
      'raw.audio_encoder.random.feat_extract_norm': choice('group', 'layer'),
      'raw.audio_encoder.random.do_stable_layer_norm': flag(),
      'raw.audio_encoder.seconds_per_batch': POSITIVE,
      'raw.audio_encoder.bucket_seconds': POSITIVE,
      'raw.audio_encoder.normalize': flag(),
      'raw.visual_encoder.checkpoint': text(note="a Hugging Face folder; '': random init"),
      'raw.visual_encoder.random': mapping('Hugging Face TimeSformer config values'),
      'raw.visual_encoder.random.*': anything(
          'other TimeSformer config keys, checked when the encoder is built'),
      **{f'raw.visual_encoder.random.{k}': COUNT
         for k in ('image_size', 'patch_size', 'num_frames', 'hidden_size', 'num_hidden_layers',
                   'num_attention_heads', 'intermediate_size')},
      'raw.visual_encoder.clips_per_batch': COUNT,
      'raw.visual_encoder.pixel_mean': PROBABILITY,
      'raw.visual_encoder.pixel_std': POSITIVE,
      'raw.synthetic.seed': SEED,
      'raw.synthetic.num_dialogues': mapping('split -> dialogues'),
      'raw.synthetic.num_dialogues.*': COUNT,
      'raw.synthetic.utterances': pair(COUNT),
      'raw.synthetic.cast': pair(COUNT),
      'raw.synthetic.faces': pair(integer(1, 3), note='3 places on screen'),
      'raw.synthetic.seconds': pair(POSITIVE),
      'raw.synthetic.fps': COUNT,
      'raw.synthetic.sample_rate': COUNT,
      'raw.synthetic.width': COUNT,
      'raw.synthetic.height': COUNT,
      'raw.synthetic.face_size': pair(COUNT),
      **{f'raw.synthetic.p_{k}': PROBABILITY
         for k in ('distractor_moves', 'face_cue', 'voice_cue', 'word_cue', 'keep_emotion')},
      'raw.synthetic.corrupt': tuple_of(text(pattern=re.compile(r'^\w+/dia\d+_utt\d+$'))),
      'raw.synthetic.missing': tuple_of(text(pattern=re.compile(r'^\w+/dia\d+_utt\d+$'))),
  }


def _lipsync_rules() -> dict[str, Rule]:
  """The `lipsync` block (configs/raw_demo.py: lipsync_config)."""
  return {
      'lipsync.window_frames': COUNT,
      'lipsync.crop_size': COUNT,
      'lipsync.channels': Rule(INT, '1 or 3', lambda v: v in (1, 3), note='grey or RGB'),
      'lipsync.embed_dim': COUNT,
      'lipsync.video_widths': tuple_of(COUNT, min_len=1),
      'lipsync.audio_widths': tuple_of(COUNT, min_len=2),
      'lipsync.margin': POSITIVE,
      'lipsync.alpha': PROBABILITY,
      'lipsync.lr': POSITIVE,
      'lipsync.weight_decay': NON_NEGATIVE,
      'lipsync.grad_clip_norm': number(0, note='0: no clipping'),
      'lipsync.batch_size': COUNT,
      'lipsync.steps': COUNT,
      'lipsync.eval_every': COUNT,
      'lipsync.min_shift_frames': COUNT,
      'lipsync.batchnorm_momentum': MOMENTUM,
      'lipsync.flip_prob': PROBABILITY,
      'lipsync.use_mined_pairs': flag(),
      'lipsync.score_hop_frames': COUNT,
      'lipsync.seed': SEED,
  }


RULES: dict[str, Rule] = _build_rules()


def _by_length(rules: Mapping[str, Rule]) -> dict[int, list[tuple[tuple[str, ...], Rule]]]:
  out: dict[int, list[tuple[tuple[str, ...], Rule]]] = {}
  for pattern, rule in rules.items():
    parts = tuple(pattern.split('.'))
    out.setdefault(len(parts), []).append((parts, rule))
  return out


_PATTERNS = _by_length(RULES)
# Every proper prefix of a pattern is a block (a dict of settings).
_BLOCKS = frozenset(tuple(p.split('.'))[:i] for p in RULES for i in range(1, p.count('.') + 1))


def _matches(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
  return len(pattern) == len(parts) and all(s in ('*', p) for s, p in zip(pattern, parts))


@functools.lru_cache(maxsize=4096)
def rule_for(key: str) -> Rule | None:
  """The rule of a dotted key; of several patterns the one with literal segments leftmost."""
  parts = tuple(key.split('.'))
  found = [(tuple(s != '*' for s in pattern), rule)
           for pattern, rule in _PATTERNS.get(len(parts), ()) if _matches(pattern, parts)]
  return max(found, key=lambda f: f[0])[1] if found else None


@functools.lru_cache(maxsize=4096)
def is_block(key: str) -> bool:
  parts = tuple(key.split('.')) if key else ()
  return not parts or any(_matches(b, parts) for b in _BLOCKS)


@functools.lru_cache(maxsize=4096)
def required_keys(key: str) -> tuple[str, ...]:
  """Keys a block at `key` ('' = the root) must have: literal next segments of its patterns."""
  parts = tuple(key.split('.')) if key else ()
  n = len(parts)
  found = {pattern[n] for pattern in list(_BLOCKS) + [tuple(p.split('.')) for p in RULES]
           if len(pattern) > n and pattern[n] != '*' and _matches(pattern[:n], parts)}
  if not parts:
    found -= set(OPTIONAL_BLOCKS)
  return tuple(sorted(found))
