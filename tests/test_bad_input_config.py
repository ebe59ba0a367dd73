"""Every key of every config in configs/ is validated: 0, -1 and a value of the wrong type either
fail with a ConfigError naming the key, or are what the key's rule documents as accepted; never a
Python or JAX error. Plus hostile values with their exact messages."""

import importlib
import json
import math
import numbers
import os
import pathlib
import re
from typing import Any, Mapping

import jax
from jax.sharding import PartitionSpec as P
import ml_collections
import pytest
from flax import nnx

from configs import ablations
from configs import default
from configs import meld_text
from configs import meld_text_ablations
from mer_jax import config_rules
from mer_jax import errors
from mer_jax import models
from mer_jax.train import inference
from mer_jax.train import sharding
from mer_jax.config_validation import ConfigError
from mer_jax.config_validation import validate_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
MELD_CSV = ROOT.parent / 'shared' / 'data' / 'meld'  # configs/meld_text.py: ../shared/data/meld
MELD_TEXT_ARGS = (None, 'layers_gru', 'utterance', 'last_layer', 'context', 'finetune',
                  'finetune_last', 'finetune_utterance', 'roberta')
# Every config file and the arguments its get_config supports (see each file's docstring).
VARIANTS = {
    'default': (None, 'runlocal', 'tiny'),
    'meld': (None, 'authors_batch_scope'),
    'iemocap': (None,),
    'meld_text': MELD_TEXT_ARGS,
    'iemocap_text': MELD_TEXT_ARGS,
    'raw_demo': (None, 'runlocal', 'tiny') + tuple(
        f'{face}{size}' for face in ('selected_face', 'true_face', 'random_face', 'largest_face')
        for size in ('', ',runlocal')),
    'ablations': tuple(f'{v},{base}' for v in ablations.VARIANTS
                       for base in ('', 'runlocal', 'tiny')),
    'meld_text_ablations': tuple(f'{v},{base or ""}' for v in meld_text_ablations.VARIANTS
                                 for base in MELD_TEXT_ARGS),
}
NEEDS_MELD_CSV = ('meld_text', 'meld_text_ablations')
# Variants whose settings contradict each other: they fail validation, with this message.
CONFLICTS = {
    ('meld_text_ablations', 'scope_batch,last_layer'):
        "model.teacher.context_gru: reads each dialogue's turns in order, so it needs "
        "graph.scope='dialogue'",
    ('meld_text_ablations', 'scope_batch,layers_gru'):
        "model.teacher.context_gru: reads each dialogue's turns in order, so it needs "
        "graph.scope='dialogue'",
}


def tiny():
  return default.get_config('tiny')


def rebuilt(config, **changes) -> ml_collections.ConfigDict:
  """A ConfigDict made from `config.to_dict()` with keys (`block__key=value`) set to any value,
  as a config file that builds its dicts itself would have it (no ml_collections type checks)."""
  tree = config.to_dict()
  for key, value in changes.items():
    *parents, last = key.split('__')
    node = tree
    for p in parents:
      node = node[p]
    node[last] = value
  return ml_collections.ConfigDict(tree)


def problems(config) -> list[str]:
  """The lines of the ConfigError that validate_config raises ([] when it passes)."""
  try:
    validate_config(config)
  except ConfigError as e:
    lines = str(e).splitlines()
    assert lines[0] == 'invalid config:', str(e)
    return [line.strip() for line in lines[1:]]
  return []


def names(lines: list[str], key: str) -> bool:
  """Whether a problem line is about `key` itself (it starts with the key, then ':' or ' ')."""
  return any(re.match(re.escape(key) + r'[:\s]', line) for line in lines)


# --- the walk over every leaf of every config -------------------------------------------------

def flat_leaves(tree: dict, prefix: str = '') -> dict:
  """dotted key -> value of every leaf (empty dicts included) of nested dicts."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(flat_leaves(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


class Rebuilder:
  """ConfigDicts equal to `tree` but for one leaf: every block is built once, and a change
  rebuilds only the blocks on the leaf's path (the others are shared)."""

  def __init__(self, tree: dict):
    self.blocks: dict[str, dict] = {}
    self._build(tree, '')

  def _build(self, node: dict, path: str) -> ml_collections.ConfigDict:
    items = {k: self._build(v, f'{path}{k}.') if isinstance(v, dict) else v
             for k, v in node.items()}
    self.blocks[path] = items
    return ml_collections.ConfigDict(items)

  def with_leaf(self, key: str, value) -> ml_collections.ConfigDict:
    parts = key.split('.')
    child = value
    for depth in range(len(parts) - 1, -1, -1):
      items = dict(self.blocks[''.join(p + '.' for p in parts[:depth])])
      items[parts[depth]] = child
      child = ml_collections.ConfigDict(items)
    return child


def probes(value) -> tuple:
  """0, -1 and a value of another type (and True where an int or a number belongs)."""
  if isinstance(value, str):
    return 0, -1, 2.5
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return 0, -1, 'x', True
  return 0, -1, 'x'


@pytest.fixture(scope='module')
def fixtures(tmp_path_factory):
  """Folders the configs that name no data need: a shard folder and IEMOCAP-style CSVs."""
  root = tmp_path_factory.mktemp('configs')
  shard_dir = root / 'shards'
  shard_dir.mkdir()
  (shard_dir / 'manifest.json').write_text(json.dumps({}))
  csv_dir = root / 'csv'
  csv_dir.mkdir()
  for split in ('train', 'dev', 'test'):
    (csv_dir / f'{split}.csv').write_text('Dialogue_ID\n')
  return {'shard_dir': str(shard_dir), 'csv_dir': str(csv_dir)}


def runnable(config, fixtures) -> ml_collections.ConfigDict:
  """The config with the paths a user must give filled in (shards, CSV folder)."""
  if config.data.source == 'shards' and not config.data.shard_dir:
    config.data.shard_dir = fixtures['shard_dir']
  if config.data.source == 'text_csv':
    if not config.text.csv.dir:
      config.text.csv.dir = fixtures['csv_dir']
    elif not os.path.isabs(config.text.csv.dir):
      config.text.csv.dir = str(ROOT / config.text.csv.dir)  # independent of the cwd
  return config


_DONE: set = set()  # perturbations already validated in an equivalent setting


def walk_config(name: str, arg, config) -> list[str]:
  """Validates every leaf of `config` set to each probe; returns what went wrong."""
  tree = config.to_dict()
  leaves = flat_leaves(tree)
  failures = [f'{name}:{arg}: {key} has no rule'
              for key in leaves if config_rules.rule_for(key) is None]
  baseline = problems(config)
  failures += [f'{name}:{arg}: the config itself fails: {line}' for line in baseline]
  if failures:
    return failures
  # A leaf perturbed from the same value under the same data source was validated already: the
  # variants of a config differ in a few keys, and each of those is walked.
  build = Rebuilder(tree)
  for key, value in leaves.items():
    rule = config_rules.rule_for(key)
    for probe in probes(value):
      done = (config.data.source, key, repr(value), repr(probe))
      if done in _DONE:
        continue
      _DONE.add(done)
      where = f'{name}:{arg}: {key}={probe!r}'
      try:
        lines = problems(build.with_leaf(key, probe))
      except Exception as e:  # pylint: disable=broad-except
        failures.append(f'{where}: {type(e).__name__}: {e}')
        continue
      if rule.accepts(probe):
        if names(lines, key):
          failures.append(f'{where}: accepted by its rule ({rule.doc}) but reported: {lines}')
      elif not names(lines, key):
        failures.append(f'{where}: refused by its rule ({rule.doc}) but not reported: {lines}')
  return failures


def test_every_config_file_has_its_variants_listed():
  files = {p.stem for p in (ROOT / 'configs').glob('*.py') if p.stem != '__init__'}
  assert files == set(VARIANTS)


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_every_leaf_of_every_config_is_validated(name, fixtures):
  if name in NEEDS_MELD_CSV and not MELD_CSV.is_dir():
    pytest.skip(f'{MELD_CSV} is absent')
  module = importlib.import_module(f'configs.{name}')
  seen, failures = set(), []
  for arg in VARIANTS[name]:
    config = runnable(module.get_config(arg), fixtures)
    if (name, arg) in CONFLICTS:
      assert problems(config) == [CONFLICTS[name, arg]]
      continue
    key = json.dumps(config.to_dict(), sort_keys=True, default=repr)
    if key not in seen:
      seen.add(key)
      failures += walk_config(name, arg, config)
  assert not failures, '\n'.join(failures[:40])


# --- the types of configs/default.py's keys, to hold the rules to ---------------------------

def is_dict(value) -> bool:
  return isinstance(value, (dict, ml_collections.ConfigDict))


_SHAPES = {bool: 'bool', int: 'int', float: 'float', str: 'str', dict: 'dict',
           type(None): 'None'}


def _shape(value) -> Any:
  """A value's type as compared with the reference: 'int', 'float', ..., ('tuple', {entries})."""
  shape = _SHAPES.get(type(value))
  if shape is not None:
    return shape
  if is_dict(value):
    return 'dict'
  if isinstance(value, numbers.Integral):
    return 'int'
  if isinstance(value, numbers.Real):
    return 'float'
  if isinstance(value, (tuple, list)):
    return ('tuple', frozenset(_shape(x) for x in value))
  return 'None' if value is None else type(value).__name__


def _fits(value, shape) -> bool:
  if isinstance(shape, tuple):
    return isinstance(value, (tuple, list)) and (
        not shape[1] or all(any(_fits(x, s) for s in shape[1]) for x in value))
  if shape == 'float':
    return _shape(value) in ('int', 'float')
  return _shape(value) == shape


def _shape_name(shape) -> str:
  if isinstance(shape, tuple):
    return 'a tuple' + (' of ' + ' or '.join(sorted(_shape_name(s) for s in shape[1]))
                        if shape[1] else '')
  return {'int': 'an int', 'float': 'a number', 'bool': 'a bool', 'str': 'a str',
          'dict': 'a dict', 'None': 'None'}.get(shape, shape)


def reference_shapes() -> dict[str, Any]:
  """dotted key -> type of every key of configs/default.py's base_config()."""
  base = default.base_config().to_dict()
  flat: dict[str, Any] = {}
  _flatten(base, '', flat)
  return {k: _shape(v) for k, v in flat.items()}


def _flatten(tree: Mapping, prefix: str, out: dict[str, Any]) -> None:
  for key, value in tree.items():
    out[prefix + str(key)] = value
    if is_dict(value):
      _flatten(value, f'{prefix}{key}.', out)


def test_rule_types_agree_with_the_default_config():
  """Where configs/default.py has a key, its rule accepts no value of another type."""
  reference = reference_shapes()
  values = (0, -1, 2.5, 'x', True, (), ('x',), (1,), ((1, 2),), None, {})
  for key, shape in reference.items():
    rule = config_rules.rule_for(key)
    if rule is None:
      assert config_rules.is_block(key), key
      continue
    for value in values:
      fits = _fits(value, shape)
      assert fits or not rule.accepts(value), (key, value)


def test_fusion_parameter_groups_match_the_model():
  from mer_jax import models  # pylint: disable=g-import-not-at-top
  assert config_rules.FUSION_PARAM_GROUPS == tuple(models.PARAM_GROUPS)


# --- hostile values, one by one ---------------------------------------------------------------

HOSTILE = {
    'fusion_heads_zero': (dict(model__fusion__heads=0),
                          'model.fusion.heads: must be >= 1, got 0'),
    'negative_teacher_hidden': (dict(model__teacher__hidden=-1),
                                'model.teacher.hidden: must be >= 1, got -1'),
    'negative_checkpoint_every_steps': (
        dict(train__checkpoint_every_steps=-1),
        'train.checkpoint_every_steps: must be >= 0 (0: at the end of every epoch only), got -1'),
    'epochs_as_a_string': (dict(train__epochs='3'),
                           "train.epochs: must be an int >= 1, got '3'"),
    'epochs_as_a_bool': (dict(train__epochs=True), 'train.epochs: must be an int >= 1, got True'),
    'stages_not_a_tuple': (
        dict(train__stages='teacher'),
        "train.stages: 'teacher' must be distinct entries of ('teacher', 'audio', 'visual', "
        "'fusion')"),
    'unknown_source': (dict(data__source='csv'),
                       "data.source: 'csv' is not 'synthetic', 'shards', 'text_csv' or 'raw'"),
    'one_label_name': (dict(label_names=('joy',)),
                       "label_names: needs at least two distinct names, got ('joy',)"),
    'dims_of_a_missing_modality': (dict(data__dims={'t': 32, 'a': 24}),
                                   "data.dims.v: is missing (data.modalities has 'v')"),
    'unknown_on_change': (dict(train__on_change='maybe'),
                          "train.on_change: must be 'error' or 'retrain', got 'maybe'"),
    'nan_learning_rate': (dict(optim__teacher__lr=float('nan')),
                          'optim.teacher.lr: must be a finite number > 0, got nan'),
    'infinite_temperature': (
        dict(loss__distill_temperature=math.inf),
        'loss.distill_temperature: must be a finite number > 0, got inf'),
    'infinite_max_nodes': (dict(batch__max_nodes=math.inf),
                           'batch.max_nodes: must be >= 2 (one slot is padding), got inf'),
    'probability_above_one': (dict(augment__t_shuffle_prob=1.5),
                              'augment.t_shuffle_prob: must be in [0, 1], got 1.5'),
    'reversed_scale_range': (
        dict(augment__v_scale_range=(1.05, 0.95)),
        'augment.v_scale_range: must be a tuple (lo, hi) with lo <= hi, each a finite number > 0, '
        'got (1.05, 0.95)'),
    'visual_layer_not_a_triple': (
        dict(model__visual__layers=((8, 2),)),
        'model.visual.layers: must be a tuple (at least 1 entry) of entries each a tuple (width '
        'per head >= 1, heads >= 1, concat: a bool), got ((8, 2),)'),
    'two_open_mesh_axes': (dict(mesh__shape={'data': -1, 'model': -1}),
                           "mesh.shape: at most one axis may be -1, got {'data': -1, 'model': -1}"),
    'zero_mesh_axis': (dict(mesh__shape={'data': 0, 'model': 1}),
                       'mesh.shape.data: must be -1 or >= 1 (-1: all remaining devices), got 0'),
    'block_replaced_by_a_number': (dict(graph__k=3),
                                   'graph.k: must be a dict (modality -> neighbours per '
                                   'utterance), got 3'),
    'story_subspace_too_small': (
        dict(data__synthetic__story__subspace_dim=4),
        "data.synthetic.story.subspace_dim: 4 is below the 9 directions the groups of modality "
        "'a' need"),
}


@pytest.mark.parametrize('case', sorted(HOSTILE))
def test_a_hostile_value_is_reported_with_its_key(case):
  changes, message = HOSTILE[case]
  lines = problems(rebuilt(tiny(), **changes))
  assert lines == [message]


def test_a_missing_key_is_reported():
  config = tiny().to_dict()
  del config['train']['on_change']
  del config['optim']['audio']
  assert problems(ml_collections.ConfigDict(config)) == [
      'train.on_change: is missing',
      'optim.audio: is missing (every stage has its optimizer settings)']


def test_raw_front_end_values_that_would_divide_by_zero():
  from configs import raw_demo  # pylint: disable=g-import-not-at-top
  config = raw_demo.get_config('runlocal')
  assert problems(rebuilt(config, raw__mel__hop=0)) == ['raw.mel.hop: must be >= 1, got 0']
  assert problems(rebuilt(config, lipsync__crop_size=36)) == [
      'lipsync.crop_size: must be divisible by 2**len(lipsync.video_widths) = 8']
  assert problems(rebuilt(config, data__dims={'t': 384, 'a': 96, 'v': 64})) == [
      'data.dims.v: must be raw.visual_encoder.random.hidden_size = 96 (the features of the '
      'visual_encoder)']


def test_an_empty_csv_folder_is_named():
  config = meld_text.get_config()
  config.text.csv.dir = ''
  assert problems(config) == ['text.csv.dir: is empty; point it at the folder of dialogue CSVs']


def test_every_rule_documents_itself():
  for pattern, rule in config_rules.RULES.items():
    assert rule.doc, pattern
  assert config_rules.RULES['batch.groups'].doc == (
      'an int >= 0 (0: one sub-batch per JAX process)')
  assert config_rules.RULES['mesh.shape.*'].doc == (
      'an int -1 or >= 1 (-1: all remaining devices)')


def test_a_parameter_the_mesh_cannot_split_is_named_before_training():
  """A mesh whose model axis does not divide a parameter's dimension stops the run with one line
  naming the parameter, its shape and the axis (checked on an abstract 4 x 2 mesh)."""
  config = default.get_config('tiny')
  config.model.fusion.use_moe = True
  mesh = jax.sharding.AbstractMesh((4, 2), ('data', 'model'),
                                   axis_types=(jax.sharding.AxisType.Auto,) * 2)

  def params(modalities_dims):
    model = models.build_model('fusion', config, in_dims=modalities_dims, num_classes=7,
                               rngs=nnx.Rngs(0))
    return nnx.split(model, nnx.Param, ...)[1]

  abstract = nnx.eval_shape(lambda: params(inference.stage_in_dims('fusion', config)))
  with pytest.raises(errors.UserError) as raised:
    sharding.state_shardings(abstract, mesh, config.mesh.rules)
  message = str(raised.value)
  assert '\n' not in message
  assert re.search(r'parameter projections/\w/router_hidden/bias of shape \(3,\) cannot be split '
                   r"over the device mesh \{'data': 4, 'model': 2\}: its dimension 0 \(3\) is "
                   r'split over mesh axis model of 2 devices', message), message
  # Without the mixture of experts every parameter divides: the shardings come back.
  config.model.fusion.use_moe = False
  abstract = nnx.eval_shape(lambda: params(inference.stage_in_dims('fusion', config)))
  assert jax.tree.leaves(sharding.state_shardings(abstract, mesh, config.mesh.rules))


def test_indivisible_axis_names_the_dimension_and_axes():
  mesh = {'data': 4, 'model': 2}
  assert sharding.indivisible_axis((6, 8), P(None, 'model'), mesh) == ''
  assert sharding.indivisible_axis((6, 8), P(('data', 'model'), None), mesh) == (
      'its dimension 0 (6) is split over mesh axis dataxmodel of 8 devices')
  assert sharding.indivisible_axis((3,), P('model'), mesh) == (
      'its dimension 0 (3) is split over mesh axis model of 2 devices')
