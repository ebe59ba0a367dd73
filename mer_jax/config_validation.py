"""Checks a config once at start-up; every problem is reported in one message naming its key.

Every leaf of a config has a rule (mer_jax/config_rules.py: its type and its range or choices);
tests/test_bad_input_config.py checks that every key of every config in configs/ has one and that
each rule agrees with the key's type in configs/default.py. Checks across keys (budgets that must
fit, blocks a data source needs, files that must exist) run after the per-key rules, and
only on keys that passed them, so a bad value is reported once, by its own key, and never reaches
code that would fail on it. No JAX here: `main` validates before JAX loads.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from etils import epath
import ml_collections

from mer_jax import batch_contract
from mer_jax import config_rules
from mer_jax import errors
from mer_jax import stages
from mer_jax.data import staging
from mer_jax.data import synthetic


class ConfigError(errors.UserError):
  """A config key has an invalid value (the message names the key)."""


def leaf_problems(tree: Mapping) -> tuple[dict[str, Any], dict[str, str]]:
  """(every key -> its value, blocks included; key -> problem) of a config as nested dicts:
  each key's rule, and the keys every block must have."""
  flat: dict[str, Any] = {}
  problems: dict[str, str] = {}

  def walk(node: Mapping, prefix: str) -> None:
    for name in config_rules.required_keys(prefix[:-1]):
      if name not in node:
        problems[prefix + name] = 'is missing'
    for name, value in node.items():
      key = prefix + str(name)
      flat[key] = value
      rule = config_rules.rule_for(key)
      if rule is not None:
        problem = rule.check(value)
      elif not config_rules.is_dict(value) and config_rules.is_block(key):
        problem = f'must be a dict of settings, got {value!r}'
      else:
        problem = None
      if problem is not None:
        problems[key] = problem
      elif config_rules.is_dict(value):
        walk(value, key + '.')

  walk(tree, '')
  return flat, problems


def validate_config(config) -> None:
  """Raises ConfigError listing every key of `config` (a ConfigDict) with an unusable value."""
  flat, problems = leaf_problems(_plain(config))
  messages = [f'{k}: {m}' for k, m in problems.items()]
  messages += _cross_errors(config, flat, _Usable(flat, problems))
  if messages:
    raise ConfigError('invalid config:\n  ' + '\n  '.join(messages))


def _plain(node):
  """Nested ConfigDicts (FieldReferences resolved) as nested dicts, like ConfigDict.to_dict."""
  if isinstance(node, ml_collections.ConfigDict):
    return {k: _plain(v.get() if isinstance(v, ml_collections.FieldReference) else v)
            for k, v in node.items(preserve_field_references=True)}
  if isinstance(node, dict):
    return {k: _plain(v) for k, v in node.items()}
  return node


class _Usable:
  """`ok(*keys)`: every key is present, and it, the blocks holding it and its entries passed their
  rules; the checks across keys read only such keys."""

  def __init__(self, flat: Mapping[str, Any], problems: Mapping[str, str]):
    self.flat, self.bad = flat, tuple(problems)

  def __call__(self, *keys: str) -> bool:
    if not self.bad:
      return all(k in self.flat for k in keys)
    return all(k in self.flat and not any(b == k or b.startswith(k + '.') or k.startswith(b + '.')
                                          for b in self.bad) for k in keys)


def _cross_errors(config, v: Mapping[str, Any], ok: _Usable) -> list[str]:
  """Problems between keys (and with files) in keys that passed their own rules."""
  errors: list[str] = []

  def need(cond: bool, key: str, msg: str) -> None:
    if not cond:
      errors.append(f'{key}: {msg}')

  source = v.get('data.source') if ok('data.source') else None
  splits = (tuple(dict.fromkeys(v[f'data.{s}_split'] for s in ('train', 'dev', 'test')))
            if ok('data.train_split', 'data.dev_split', 'data.test_split') else None)
  mods = tuple(v['data.modalities']) if ok('data.modalities') else ()
  if source == 'raw':
    if not all(k in v for k in ('raw', 'lipsync', 'text')):
      errors.append("raw: data.source='raw' needs raw, lipsync and text blocks (see "
                    'configs/raw_demo.py)')
    else:
      errors.extend(raw_frontend_errors(config, v, ok))
  if source == 'text_csv' and 'text' not in v:
    errors.append("text: data.source='text_csv' needs a text block (see configs/meld_text.py)")
  if 'text' in v and (source in ('text_csv', 'raw') or source is None):
    errors.extend(text_frontend_errors(config, v, ok, files=source == 'text_csv'))
  if source == 'shards' and ok('data.shard_dir'):
    shard_dir = v['data.shard_dir']
    need(bool(shard_dir), 'data.shard_dir', 'is empty; point it at a folder with manifest.json')
    if shard_dir:
      need(_exists(os.path.join(shard_dir, 'manifest.json')), 'data.shard_dir',
           f'{shard_dir!r} has no manifest.json (a shard folder written by mer_jax)')
  if source == 'synthetic':
    errors.extend(_synthetic_errors(v, ok, mods, splits))

  for m in mods:
    for table in ('data.dims', 'graph.k', 'graph.temporal_weight', 'loss.aux_weights'):
      if ok(table):
        need(m in v[table], f'{table}.{m}', f'is missing (data.modalities has {m!r})')

  if ok('batch.max_nodes', 'batch.utterances_per_batch'):
    top = v['batch.max_nodes'] - 1
    need(v['batch.utterances_per_batch'] <= top, 'batch.utterances_per_batch',
         f'must be in [1, batch.max_nodes - 1 = {top}]')
  if ok('model.teacher.context_gru', 'graph.scope'):
    need(not (v['model.teacher.context_gru'] and v['graph.scope'] == 'batch'),
         'model.teacher.context_gru',
         "reads each dialogue's turns in order, so it needs graph.scope='dialogue'")
  if ok('model.teacher.context_projection', 'model.teacher.context_gru'):
    need(not (v['model.teacher.context_projection'] and not v['model.teacher.context_gru']),
         'model.teacher.context_projection',
         'projects the input of the context GRU, so it needs model.teacher.context_gru > 0')
  if ok('model.fusion.dim', 'model.fusion.heads'):
    dim, heads = v['model.fusion.dim'], v['model.fusion.heads']
    need(dim % heads == 0, 'model.fusion.dim', f'{dim} is not divisible by heads={heads}')
  if ok('model.fusion.top_k', 'model.fusion.num_experts'):
    experts = v['model.fusion.num_experts']
    need(v['model.fusion.top_k'] <= experts, 'model.fusion.top_k',
         f'must be in [1, num_experts={experts}]')

  if ok('train.stages'):
    run = tuple(v['train.stages'])
    if ok('data.modalities'):
      for s in run:
        if stages.is_encoder(s):
          m = stages.MODALITY_OF_STAGE[s]
          need(m in mods, 'train.stages', f'stage {s!r} needs modality {m!r} in data.modalities')
    order = [s for s in stages.STAGES if s in run]
    need(list(run) == order, 'train.stages', f'must run in the order {order}')
    if 'fusion' in run and ok('model.fusion.input', 'data.modalities'):
      if v['model.fusion.input'] in ('graph', 'stacked'):
        for enc in stages.encoders_of(mods):
          need(enc in run, 'train.stages',
               f"fusion on encoder outputs needs the {enc!r} stage (or model.fusion.input='raw')")
    if ok('loss.distill', 'data.modalities') and v['loss.distill']:
      students = [s for s in run if s in stages.STUDENT_STAGES]
      need(not students or 't' in mods, 'loss.distill',
           f"the students {students} learn from the text teacher, which needs 't' in "
           'data.modalities (or set loss.distill=False)')

  if ok('optim'):
    for s in stages.STAGES:
      need(s in v['optim'], f'optim.{s}', 'is missing (every stage has its optimizer settings)')
  if ok('optim.fusion.lr_multipliers') and v['optim.fusion.lr_multipliers']:
    given = v['optim.fusion.lr_multipliers']
    missing = [g for g in config_rules.FUSION_PARAM_GROUPS if g not in given]
    need(not missing, 'optim.fusion.lr_multipliers',
         f'has no entry for the parameter groups {missing} (or leave it empty)')

  if ok('train.shared_stages_dir', 'train.checkpoint_dir') and v['train.shared_stages_dir']:
    shared = v['train.shared_stages_dir']
    need(not staging.is_remote(shared), 'train.shared_stages_dir',
         f'{shared!r} must be a local folder (runs link their stages to it)')
    need(not staging.is_remote(v['train.checkpoint_dir']), 'train.checkpoint_dir',
         'must be local when train.shared_stages_dir is set')

  if ok('mesh.shape'):
    shape = dict(v['mesh.shape'])
    need(set(shape) >= {'data', 'model'}, 'mesh.shape',
         f'needs a data and a model axis, got {shape}')
    need(list(shape.values()).count(-1) <= 1, 'mesh.shape',
         f'at most one axis may be -1, got {shape}')
    if ok('mesh.rules'):
      unknown = sorted({r[1] for r in v['mesh.rules'] if r[1] is not None} - set(shape))
      need(not unknown, 'mesh.rules', f'name mesh axes {unknown} that mesh.shape lacks')
  return errors


def _synthetic_errors(v: Mapping[str, Any], ok: _Usable, mods: tuple[str, ...],
                      splits: tuple[str, ...] | None) -> list[str]:
  """The embedded corpus: its story, and what the generator needs of the rest of the config."""
  errors: list[str] = []
  if ok('label_names'):
    n = len(synthetic.MELD_LABELS)
    if len(v['label_names']) != n:
      errors.append(f'label_names: the synthetic corpus has the {n} MELD classes, got '
                    f'{len(v["label_names"])} names')
  for table in ('num_dialogues', 'num_shards'):
    key = f'data.synthetic.{table}'
    if splits and ok(key):
      missing = [s for s in splits if s not in v[key]]
      if missing:
        errors.append(f'{key}: has no entry for the splits {missing}')
      bad = [s for s in v[key] if not config_rules.SPLIT_NAME.match(str(s))]
      if bad:
        errors.append(f'{key}: split names {bad} must match {config_rules.SPLIT_NAME.pattern}')
  if not ok('data.synthetic.story'):
    return errors
  story = v['data.synthetic.story']
  k = story['subspace_dim']
  for m, given in story['modalities'].items():
    groups = given['groups']
    needed = len(groups) + sum(len(g) for g in groups if len(g) > 1)
    if needed > k:
      errors.append(f'data.synthetic.story.subspace_dim: {k} is below the {needed} directions '
                    f'the groups of modality {m!r} need')
      return errors
  try:
    synthetic.story_from_dict(story)
  except ValueError as e:
    errors.append(f'data.synthetic.{e}')
    return errors
  if ok('data.dims'):
    unknown = sorted(set(mods) - set(story['modalities']))
    if unknown:
      errors.append(f'data.synthetic.story.modalities: has no story for {unknown}')
    extra = sorted(set(v['data.dims']) - set(story['modalities']))
    if extra:
      errors.append(f'data.dims: the synthetic corpus has no story for {extra} (remove them)')
    for m, d in v['data.dims'].items():
      if d < k:
        errors.append(f'data.dims.{m}: {d} is below the synthetic class subspace dimension '
                      f'{k} (data.synthetic.story.subspace_dim)')
  return errors


def _exists(path: str) -> bool:
  """os.path.exists, or through etils/epath for remote paths (gs://: needs gcsfs, `[gcs]`)."""
  if not staging.is_remote(path):
    return os.path.exists(path)
  try:
    return epath.Path(path).exists()
  except ImportError as e:
    raise ConfigError(f'cannot read {path}: {e} (pip install -e ".[gcs]")') from e


def check_mesh_fits_batch(config, data_axis: int, groups: int = 1) -> None:
  """Every array of a step's batch (`groups` sub-batches end to end) splits evenly over 'data'."""
  budget = batch_contract.budget_from_config(config)
  each = f'{groups} sub-batches of ' if groups > 1 else ''
  if (groups * budget.max_nodes) % data_axis:
    raise ConfigError(f'{each}batch.max_nodes={budget.max_nodes} must be divisible by the data '
                      f'axis size {data_axis} (nodes are split over it)')
  if (groups * budget.max_edges) % data_axis:
    raise ConfigError(f'edge budget {each}{batch_contract.EDGES_PER_NODE}*batch.max_nodes must '
                      f'be divisible by {data_axis}')
  graphs = budget.max_graphs
  if groups > 1 and (groups * graphs) % data_axis:
    raise ConfigError(f'{each}{graphs} graph slots (batch.max_graphs) must be divisible by the '
                      f'data axis size {data_axis} (with several sub-batches, per-graph arrays '
                      'are split over it too)')


def raw_frontend_errors(config, v: Mapping[str, Any], ok: _Usable) -> list[str]:
  """Problems across the keys of the `raw` and `lipsync` blocks (clips -> features)."""
  errors: list[str] = []

  def need(cond: bool, key: str, msg: str) -> None:
    if not cond:
      errors.append(f'{key}: {msg}')

  if ok('raw.generate', 'raw.dir') and not v['raw.generate']:
    need(os.path.isdir(v['raw.dir']), 'raw.dir',
         f'{v["raw.dir"]!r} is not a folder (or set raw.generate)')
  splits = (tuple(dict.fromkeys(v[f'data.{s}_split'] for s in ('train', 'dev', 'test')))
            if ok('data.train_split', 'data.dev_split', 'data.test_split') else ())
  for split in splits:
    if ok('raw.split_folders'):
      need(split in v['raw.split_folders'], 'raw.split_folders',
           f'has no folder for split {split!r}')
    if ok('raw.generate', 'raw.synthetic.num_dialogues') and v['raw.generate']:
      need(split in v['raw.synthetic.num_dialogues'], 'raw.synthetic.num_dialogues',
           f'has no entry for split {split!r} (raw.generate writes the splits it names)')
  if ok('raw.sample_rate', 'raw.mel.hop', 'raw.fps'):
    rate, hop, fps = v['raw.sample_rate'], v['raw.mel.hop'], v['raw.fps']
    need(rate % hop == 0 and rate // hop == 4 * fps, 'raw.mel.hop',
         f'LipSyncNet needs 4 log-mel frames per video frame: sample_rate / hop = '
         f'{rate / hop:g} but 4 * fps = {4 * fps}')
  if ok('raw.mel.n_mels'):
    need(v['raw.mel.n_mels'] == 64, 'raw.mel.n_mels', 'LipSyncNet reads 64 mel bands')
  if ok('raw.faces.detect_stride', 'raw.faces.max_gap'):
    need(v['raw.faces.max_gap'] >= v['raw.faces.detect_stride'], 'raw.faces.detect_stride',
         'must be >= 1 and <= raw.faces.max_gap')
  if ok('raw.synthetic.face_size', 'raw.synthetic.height'):
    need(v['raw.synthetic.face_size'][1] <= v['raw.synthetic.height'], 'raw.synthetic.face_size',
         'faces must fit raw.synthetic.height')
  for name, width in (('audio_encoder', 'a'), ('visual_encoder', 'v')):
    key = f'raw.{name}.checkpoint'
    if not ok(key):
      continue
    ckpt = v[key]
    need(not ckpt or os.path.isdir(ckpt), key,
         f'{ckpt!r} is not a folder (a Hugging Face checkpoint; empty = random init)')
    init = f'raw.{name}.random'
    if not ckpt and ok(init):
      errors.extend(_random_encoder_errors(name, v[init]))
      if ok(f'data.dims.{width}'):
        hidden = v[init]['hidden_size']
        need(v[f'data.dims.{width}'] == hidden, f'data.dims.{width}',
             f'must be {init}.hidden_size = {hidden} (the features of the {name})')
  if ok('lipsync.crop_size', 'lipsync.video_widths'):
    scale = 2 ** len(v['lipsync.video_widths'])
    need(v['lipsync.crop_size'] % scale == 0, 'lipsync.crop_size',
         f'must be divisible by 2**len(lipsync.video_widths) = {scale}')
  if ok('lipsync') and not any(e.startswith('lipsync.') for e in errors):
    # Imported here: the LipSyncNet trainer brings JAX, which main starts after validation.
    from mer_jax.preprocess import lipsync_training  # pylint: disable=g-import-not-at-top
    try:
      lipsync_training.check_lipsync_config(_Attributes(v['lipsync']))
    except (ValueError, AttributeError, KeyError) as e:
      errors.append(f'lipsync: {e}')
  return errors


class _Attributes(dict):
  """A dict whose keys read as attributes too (what check_lipsync_config reads)."""
  __getattr__ = dict.__getitem__


def _random_encoder_errors(name: str, r: Mapping[str, Any]) -> list[str]:
  """A randomly initialised Wav2Vec2 (audio) or TimeSformer (visual): sizes that must divide or
  fit. Only keys with their own rule are read (others are passed through unchecked)."""
  key = f'raw.{name}.random'
  errors = []
  hidden = r['hidden_size']
  divisors = ('num_attention_heads',) + (
      ('num_conv_pos_embedding_groups',) if name == 'audio_encoder' else ())
  for divisor in divisors:
    if hidden % r[divisor]:
      errors.append(f'{key}.hidden_size: {hidden} is not divisible by {divisor}={r[divisor]}')
  if name == 'audio_encoder':
    convs = [len(r[f'conv_{k}']) for k in ('dim', 'kernel', 'stride')]
    if len(set(convs)) > 1:
      errors.append(f'{key}.conv_dim: conv_dim, conv_kernel and conv_stride must have one '
                    f'length, got {convs}')
  elif r['patch_size'] > r['image_size']:
    errors.append(f'{key}.patch_size: {r["patch_size"]} must be <= image_size '
                  f'{r["image_size"]}')
  return errors


def text_frontend_errors(config, v: Mapping[str, Any], ok: _Usable, *,
                         files: bool = True) -> list[str]:
  """Problems across the keys of the `text` block (dialogue CSVs -> text features); with
  `files`, also the CSV folder and files it names."""
  del config  # every key is read from `v`
  errors: list[str] = []

  def need(cond: bool, key: str, msg: str) -> None:
    if not cond:
      errors.append(f'text.{key}: {msg}')

  splits = (tuple(dict.fromkeys(v[f'data.{s}_split'] for s in ('train', 'dev', 'test')))
            if ok('data.train_split', 'data.dev_split', 'data.test_split') else ())
  if files and ok('text.csv.dir'):
    csv_dir = os.path.abspath(v['text.csv.dir'])
    if not v['text.csv.dir']:
      need(False, 'csv.dir', 'is empty; point it at the folder of dialogue CSVs')
    elif not os.path.isdir(csv_dir):
      need(False, 'csv.dir', f'{v["text.csv.dir"]!r} ({csv_dir}) is not a folder')
    elif ok('text.csv.pattern'):
      for split in splits:
        name = v['text.csv.pattern'].format(split=split)
        need(os.path.isfile(os.path.join(csv_dir, name)), 'csv.pattern',
             f'{os.path.join(csv_dir, name)} (split {split!r}) does not exist')
  # label_names is the one source of the labels; text.csv.label_names, kept for older configs,
  # may only repeat it.
  if ok('text.csv.label_names', 'label_names') and v['text.csv.label_names']:
    names, labels = list(v['text.csv.label_names']), list(v['label_names'])
    need(names == labels, 'csv.label_names',
         f'{names} contradicts label_names {labels}; set the labels once, in label_names '
         '(text.csv.label_names=() reads them from there)')
  if ok('text.csv.label_aliases', 'label_names'):
    known = {name.lower() for name in v['label_names']}
    for alias, target in dict(v['text.csv.label_aliases']).items():
      need(target.lower() in known, f'csv.label_aliases.{alias}',
           f'{target!r} is not one of label_names {list(v["label_names"])}')
  if ok('data.source', 'text.csv.dialogue_column') and v['data.source'] == 'raw':
    column = v['text.csv.dialogue_column']
    need(isinstance(column, str) or len(column) <= 1, 'csv.dialogue_column',
         f'{tuple(column)}: the raw front end finds clips as dia{{D}}_utt{{U}}.mp4, so D must be '
         'one column')
  if ok('text.layers'):
    layers = tuple(v['text.layers'])
    need(len(set(layers)) == len(layers), 'layers', f'{layers} names a hidden state twice')
  if ok('text.max_length', 'text.smallest_bucket'):
    need(v['text.smallest_bucket'] <= v['text.max_length'], 'smallest_bucket',
         'must be in [1, max_length]')
  if ok('text.max_length', 'text.tokens_per_batch'):
    need(v['text.tokens_per_batch'] >= v['text.max_length'], 'tokens_per_batch',
         'must be >= max_length')
  if ok('text.finetune.enabled') and v['text.finetune.enabled']:
    if ok('text.max_length', 'text.finetune.tokens_per_batch'):
      need(v['text.finetune.tokens_per_batch'] >= v['text.max_length'],
           'finetune.tokens_per_batch', 'must be >= max_length')
    if ok('text.finetune.optim.grad_accum_steps'):
      need(v['text.finetune.optim.grad_accum_steps'] == 1, 'finetune.optim.grad_accum_steps',
           'must be 1 (raise finetune.tokens_per_batch instead)')
  return errors
