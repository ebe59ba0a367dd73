"""Checks a config once at start-up; every problem is reported in one message naming its key."""

from __future__ import annotations

import os

from etils import epath

from mer_jax import errors
from mer_jax import batch_contract
from mer_jax import stages
from mer_jax.data import staging
from mer_jax.data import synthetic

SCHEDULES = ('constant', 'warmup_cosine', 'warmup_linear')


class ConfigError(errors.UserError):
  """A config key has an invalid value (the message names the key)."""


def validate_config(config) -> None:
  errors: list[str] = []

  def need(ok: bool, key: str, msg: str) -> None:
    if not ok:
      errors.append(f'{key}: {msg}')

  d = config.data
  need(d.source in ('synthetic', 'shards', 'text_csv', 'raw'), 'data.source',
       f"{d.source!r} is not 'synthetic', 'shards', 'text_csv' or 'raw'")
  if d.source == 'raw':
    if not all(k in config for k in ('raw', 'lipsync', 'text')):
      errors.append("raw: data.source='raw' needs raw, lipsync and text blocks (see "
                    'configs/raw_demo.py)')
    else:
      errors.extend(raw_frontend_errors(config))
  if d.source == 'text_csv':
    if 'text' not in config:
      errors.append("text: data.source='text_csv' needs a text block (see configs/meld_text.py)")
    else:
      errors.extend(text_frontend_errors(config))
  if d.source == 'shards':
    need(bool(d.shard_dir), 'data.shard_dir', 'is empty; point it at a folder with manifest.json')
    if d.shard_dir:
      need(_exists(os.path.join(d.shard_dir, 'manifest.json')), 'data.shard_dir',
           f'{d.shard_dir!r} has no manifest.json (a shard folder written by mer_jax)')
  if d.source == 'synthetic':
    try:
      story = synthetic.story_from_config(config)
    except ValueError as e:
      errors.append(f'data.synthetic.{e}')
    else:
      unknown = sorted(set(d.modalities) - set(story.modalities))
      need(not unknown, 'data.synthetic.story.modalities', f'has no story for {unknown}')
  mods = tuple(d.modalities)
  need(len(mods) > 0 and len(set(mods)) == len(mods) and set(mods) <= set(stages.MODALITIES),
       'data.modalities', f'{mods!r} must be distinct entries of {stages.MODALITIES}')
  for m in mods:
    need(m in d.dims and int(d.dims[m]) > 0, f'data.dims.{m}', 'must be a positive dimension')
  need(d.on_bad_record in ('error', 'skip'), 'data.on_bad_record', "must be 'error' or 'skip'")
  need(d.cache_mib >= 0, 'data.cache_mib', 'must be >= 0 (0: read every record from its file)')
  need(len(config.label_names) >= 2 and len(set(config.label_names)) == len(config.label_names),
       'label_names', 'needs at least two distinct names')

  b = config.batch
  need(b.max_nodes >= 2, 'batch.max_nodes', 'must be >= 2 (one slot is padding)')
  need(b.max_graphs >= 2, 'batch.max_graphs', 'must be >= 2 (one slot is padding)')
  need(b.groups >= 0, 'batch.groups', 'must be >= 0 (0: one sub-batch per JAX process)')
  need(1 <= b.utterances_per_batch <= b.max_nodes - 1, 'batch.utterances_per_batch',
       f'must be in [1, batch.max_nodes - 1 = {b.max_nodes - 1}]')

  g = config.graph
  need(g.scope in ('dialogue', 'batch'), 'graph.scope', f"{g.scope!r} is not 'dialogue' or 'batch'")
  need(g.gat_edge_weights in ('bias', 'none'), 'graph.gat_edge_weights', "must be 'bias' or 'none'")
  for m in mods:
    need(int(g.k[m]) >= 1, f'graph.k.{m}', 'must be >= 1')
  gru = config.model.teacher.context_gru
  need(isinstance(gru, int) and gru >= 0, 'model.teacher.context_gru', f'{gru!r} must be an int >= 0')
  need(not (gru and g.scope == 'batch'), 'model.teacher.context_gru',
       "reads each dialogue's turns in order, so it needs graph.scope='dialogue'")
  proj = config.model.teacher.context_projection
  need(isinstance(proj, int) and proj >= 0, 'model.teacher.context_projection',
       f'{proj!r} must be an int >= 0')
  need(not (proj and not gru), 'model.teacher.context_projection',
       'projects the input of the context GRU, so it needs model.teacher.context_gru > 0')

  f = config.model.fusion
  need(f.input in stages.FUSION_INPUTS, 'model.fusion.input',
       "must be 'stacked', 'graph' or 'raw'")
  need(f.stacking_folds >= 2, 'model.fusion.stacking_folds', 'must be >= 2')
  need(f.dim % f.heads == 0, 'model.fusion.dim', f'{f.dim} is not divisible by heads={f.heads}')
  need(1 <= f.top_k <= f.num_experts, 'model.fusion.top_k', f'must be in [1, num_experts={f.num_experts}]')
  need(0.0 <= f.alignment_mix <= 1.0, 'model.fusion.alignment_mix', 'must be in [0, 1]')

  run = tuple(config.train.stages)
  need(len(run) > 0 and set(run) <= set(stages.STAGES) and len(set(run)) == len(run),
       'train.stages', f'{run!r} must be distinct entries of {stages.STAGES}')
  for s in run:
    if stages.is_encoder(s):
      m = stages.MODALITY_OF_STAGE[s]
      need(m in mods, 'train.stages', f'stage {s!r} needs modality {m!r} in data.modalities')
  order = [s for s in stages.STAGES if s in run]
  need(list(run) == order, 'train.stages', f'must run in the order {order}')
  if 'fusion' in run and f.input in ('graph', 'stacked'):
    for enc in stages.encoders_of(mods):
      need(enc in run, 'train.stages',
           f"fusion on encoder outputs needs the {enc!r} stage (or model.fusion.input='raw')")
  need(config.train.epochs >= 1, 'train.epochs', 'must be >= 1')

  for s in stages.STAGES:
    o = config.optim[s]
    need(o.lr > 0, f'optim.{s}.lr', 'must be > 0')
    need(o.weight_decay >= 0, f'optim.{s}.weight_decay', 'must be >= 0')
    need(o.schedule in SCHEDULES, f'optim.{s}.schedule', f'must be one of {SCHEDULES}')
    need(0.0 <= o.warmup_fraction < 1.0, f'optim.{s}.warmup_fraction', 'must be in [0, 1)')
    need(o.grad_accum_steps >= 1, f'optim.{s}.grad_accum_steps', 'must be >= 1')
    need(0.0 <= o.ema_decay < 1.0, f'optim.{s}.ema_decay', 'must be in [0, 1)')
    need(0.0 < o.lr_reduce_factor <= 1.0, f'optim.{s}.lr_reduce_factor', 'must be in (0, 1]')
    need(o.early_stopping_patience >= 1, f'optim.{s}.early_stopping_patience', 'must be >= 1')

  l = config.loss
  need(l.class_weights in ('balanced', 'none'), 'loss.class_weights', "must be 'balanced' or 'none'")
  need(l.class_weight_power >= 0, 'loss.class_weight_power', 'must be >= 0')
  need(l.distill_temperature > 0, 'loss.distill_temperature', 'must be > 0')
  need(0.0 <= l.distill_alpha <= 1.0, 'loss.distill_alpha', 'must be in [0, 1]')
  need(0.0 <= l.label_smoothing < 1.0, 'loss.label_smoothing', 'must be in [0, 1)')
  need(0.0 <= l.main_focal_share <= 1.0, 'loss.main_focal_share', 'must be in [0, 1]')

  shared = config.train.get('shared_stages_dir', '')
  if shared:
    need(not staging.is_remote(shared), 'train.shared_stages_dir',
         f'{shared!r} must be a local folder (runs link their stages to it)')
    need(not staging.is_remote(config.train.checkpoint_dir), 'train.checkpoint_dir',
         'must be local when train.shared_stages_dir is set')

  shape = dict(config.mesh.shape)
  need(set(shape) >= {'data', 'model'}, 'mesh.shape', f'needs a data and a model axis, got {shape}')
  if errors:
    raise ConfigError('invalid config:\n  ' + '\n  '.join(errors))


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


def raw_frontend_errors(config) -> list[str]:
  """Problems with the `raw` and `lipsync` blocks (clips -> features)."""
  errors: list[str] = []

  def need(ok: bool, key: str, msg: str) -> None:
    if not ok:
      errors.append(f'{key}: {msg}')

  r = config.raw
  if not r.generate:
    need(os.path.isdir(r.dir), 'raw.dir', f'{r.dir!r} is not a folder (or set raw.generate)')
  for split in dict.fromkeys((config.data.train_split, config.data.dev_split,
                              config.data.test_split)):
    need(split in r.split_folders, 'raw.split_folders', f'has no folder for split {split!r}')
  need(r.visual_face in ('selected', 'true', 'largest', 'random'), 'raw.visual_face',
       "must be 'selected', 'true', 'largest' or 'random'")
  need(r.fps > 0 and r.sample_rate > 0 and r.max_seconds > 0, 'raw.fps',
       'fps, sample_rate and max_seconds must be > 0')
  need(r.sample_rate % r.mel.hop == 0 and (r.sample_rate // r.mel.hop) == 4 * r.fps, 'raw.mel.hop',
       f'LipSyncNet needs 4 log-mel frames per video frame: sample_rate / hop = '
       f'{r.sample_rate / r.mel.hop:g} but 4 * fps = {4 * r.fps}')
  need(r.mel.n_mels == 64, 'raw.mel.n_mels', 'LipSyncNet reads 64 mel bands')
  need(r.faces.detector in ('haar',), 'raw.faces.detector', "must be 'haar' (or plug a "
       'detector into mer_jax.preprocess.faces.DETECTORS)')
  need(r.faces.detect_stride >= 1 and r.faces.max_gap >= r.faces.detect_stride,
       'raw.faces.detect_stride', 'must be >= 1 and <= raw.faces.max_gap')
  need(r.faces.max_tracks >= 1, 'raw.faces.max_tracks', 'must be >= 1')
  need(r.faces.crop_size >= 8, 'raw.faces.crop_size', 'must be >= 8')
  for name in ('audio_encoder', 'visual_encoder'):
    ckpt = r[name].checkpoint
    need(not ckpt or os.path.isdir(ckpt), f'raw.{name}.checkpoint',
         f'{ckpt!r} is not a folder (a Hugging Face checkpoint; empty = random init)')
  # Imported here: the LipSyncNet trainer brings JAX, which main starts after validation.
  from mer_jax.preprocess import lipsync_training  # pylint: disable=g-import-not-at-top
  try:
    lipsync_training.check_lipsync_config(config.lipsync)
  except (ValueError, AttributeError, KeyError) as e:
    errors.append(f'lipsync: {e}')
  return errors


def text_frontend_errors(config) -> list[str]:
  """Problems with the `text` block (dialogue CSVs -> text features)."""
  errors: list[str] = []

  def need(ok: bool, key: str, msg: str) -> None:
    if not ok:
      errors.append(f'text.{key}: {msg}')

  t = config.text
  need(t.csv.preset in ('meld', 'iemocap', 'custom'), 'csv.preset',
       f"{t.csv.preset!r} is not 'meld', 'iemocap' or 'custom'")
  need(t.csv.on_bad_row in ('error', 'skip'), 'csv.on_bad_row', "must be 'error' or 'skip'")
  csv_dir = os.path.abspath(t.csv.dir)
  if not os.path.isdir(csv_dir):
    need(False, 'csv.dir', f'{t.csv.dir!r} ({csv_dir}) is not a folder')
  else:
    for split in dict.fromkeys((config.data.train_split, config.data.dev_split,
                                config.data.test_split)):
      name = t.csv.pattern.format(split=split)
      need(os.path.isfile(os.path.join(csv_dir, name)), 'csv.pattern',
           f'{os.path.join(csv_dir, name)} (split {split!r}) does not exist')
  if t.csv.preset == 'custom':
    need(len(t.csv.label_names) >= 2, 'csv.label_names', "csv.preset='custom' needs the labels")
  if t.csv.label_names:
    need(tuple(t.csv.label_names) == tuple(config.label_names), 'csv.label_names',
         f'{list(t.csv.label_names)} differ from label_names {list(config.label_names)}')
  need(t.input in ('utterance', 'context'), 'input', "must be 'utterance' or 'context'")
  need(t.pooling in ('mean', 'cls', 'last', 'target_mean'), 'pooling',
       "must be 'mean', 'cls', 'last' or 'target_mean'")
  layers = tuple(t.layers)
  need(len(layers) >= 1 and all(isinstance(i, int) for i in layers), 'layers',
       f'{layers} must name at least one hidden state by integer index (-1: the last layer)')
  need(len(set(layers)) == len(layers), 'layers', f'{layers} names a hidden state twice')
  need(16 <= t.max_length <= 8192, 'max_length', f'{t.max_length} is not in [16, 8192]')
  need(1 <= t.max_speakers <= 100, 'max_speakers', 'must be in [1, 100]')
  need(1 <= t.smallest_bucket <= t.max_length, 'smallest_bucket', 'must be in [1, max_length]')
  need(t.bucket_growth > 1.0, 'bucket_growth', 'must be > 1')
  ft = t.finetune
  if ft.enabled:
    need(ft.epochs >= 1, 'finetune.epochs', 'must be >= 1')
    need(ft.tokens_per_batch >= t.max_length, 'finetune.tokens_per_batch', 'must be >= max_length')
    need(ft.class_weights in ('balanced', 'none'), 'finetune.class_weights',
         "must be 'balanced' or 'none'")
    need(ft.optim.lr > 0, 'finetune.optim.lr', 'must be > 0')
    need(ft.optim.schedule in SCHEDULES, 'finetune.optim.schedule', f'must be one of {SCHEDULES}')
    need(ft.optim.grad_accum_steps == 1, 'finetune.optim.grad_accum_steps',
         'must be 1 (raise finetune.tokens_per_batch instead)')
  need(t.tokens_per_batch >= t.max_length, 'tokens_per_batch', 'must be >= max_length')
  need(bool(t.encoder), 'encoder', 'is empty')
  return errors
