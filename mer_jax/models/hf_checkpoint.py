"""Hugging Face checkpoint folders (config.json + model.safetensors) into Flax NNX encoders.

The loading machinery the text (BERT/RoBERTa), speech (wav2vec2) and video (TimeSformer)
encoders share; each of them keeps only its config, its modules and its name table.
`load_hf_checkpoint(folder, config_cls, build_model, load_weights)`:

  1. `read_hf_folder`: config.json through `config_cls.from_hf`, and the path of the weights
     file; a missing or invalid file, or a config `from_hf` rejects, is a CheckpointError naming
     the file.
  2. `build_model(cfg, rngs=..., dtype=...)`, abstractly (`abstract_model`: no random
     initialisation computed only to be overwritten) or initialised.
  3. `load_weights(model, tensors, source)`, the encoder's, which hands its name table
     (checkpoint tensor name -> (path of our parameter, `Transform`)) to `load_tensors`: every
     tensor is loaded, ignored (a head the encoder does not build) or unexpected; an unexpected,
     missing or misshapen tensor is a CheckpointError naming the entry.
  4. The ignored entries logged.

`transformers` is used for nothing here; huggingface_hub is imported only to fetch a checkpoint
by hub name.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Collection, Mapping, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from safetensors import safe_open

from mer_jax import errors

WEIGHT_FILES = ('model.safetensors',)


class CheckpointError(errors.UserError):
  """A checkpoint folder is missing files or holds weights that do not fit the config."""


class Transform(NamedTuple):
  """A checkpoint tensor's layout -> ours, and the checkpoint shape our parameter shape needs."""
  to_ours: Callable[[np.ndarray], np.ndarray]
  hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


COPY = Transform(lambda w: w, lambda s: s)
# All axes reversed: torch Linear [out, in] -> [in, out], Conv1d [out, in, k] -> [k, in, out].
TRANSPOSE = Transform(np.transpose, lambda s: s[::-1])

# Checkpoint tensor name -> (path of our parameter in nnx.to_flat_state, its Transform).
NameTable = dict[str, tuple[tuple[Any, ...], Transform]]


def config_getter(hf: Mapping[str, Any] | Any, model_types: tuple[str, ...]
                  ) -> Callable[..., Any]:
  """`get(key, default=None)` on a transformers config object or the dict of a config.json.

  Raises ValueError unless its model_type is one of `model_types`.
  """
  if isinstance(hf, Mapping):
    get = lambda key, default=None: hf.get(key, default)
  else:
    get = lambda key, default=None: getattr(hf, key, default)
  model_type = get('model_type')
  if model_type not in model_types:
    expected = repr(model_types[0]) if len(model_types) == 1 else f'one of {model_types}'
    raise ValueError(f'model_type {model_type!r} is not supported; expected {expected}')
  return get


def kernel_names(hf: str, path: tuple[Any, ...], transform: Transform = TRANSPOSE, *,
                 bias: bool = True) -> NameTable:
  """Entries for torch's `{hf}.weight` (and `.bias`): our kernel (and bias) at `path`."""
  names = {f'{hf}.weight': ((*path, 'kernel'), transform)}
  if bias:
    names[f'{hf}.bias'] = ((*path, 'bias'), COPY)
  return names


def norm_names(hf: str, path: tuple[Any, ...]) -> NameTable:
  """Entries for a torch LayerNorm / GroupNorm `{hf}.weight` and `.bias`: ours at `path`."""
  return {f'{hf}.weight': ((*path, 'scale'), COPY), f'{hf}.bias': ((*path, 'bias'), COPY)}


# The files of a checkpoint folder that loading reads: config, weights, tokenizer (vocab, merges,
# sentencepiece model). Downloads and model bundles keep these and nothing else.
FILE_PATTERNS = ('*.json', '*.safetensors', '*.txt', '*.model')


def resolve_checkpoint_folder(name_or_folder: str) -> str:
  """A local folder as is; otherwise a Hugging Face hub name, downloaded (needs a network)."""
  if os.path.isdir(name_or_folder):
    return name_or_folder
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(f'{name_or_folder!r} is not a folder and huggingface_hub is not '
                          'installed to download it') from None
  try:
    return snapshot_download(name_or_folder, allow_patterns=list(FILE_PATTERNS))
  except Exception as e:  # network errors come in many types
    raise CheckpointError(f'{name_or_folder!r} is not a local folder and could not be '
                          f'downloaded from the Hugging Face hub (a network is needed): {e}') from e


def read_hf_folder(folder: str, from_hf) -> tuple[Any, str]:
  """(from_hf(config.json), path of the weights file) of a Hugging Face checkpoint folder.

  Raises CheckpointError naming the file for a missing or invalid config.json, a config
  `from_hf` rejects, or no safetensors weights.
  """
  config_path = os.path.join(folder, 'config.json')
  if not os.path.isfile(config_path):
    raise CheckpointError(f'{folder}: no config.json (not a Hugging Face checkpoint folder)')
  with open(config_path) as f:
    try:
      raw = json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f'{config_path}: not valid JSON ({e})') from None
  try:
    cfg = from_hf(raw)
  except (ValueError, TypeError) as e:
    raise CheckpointError(f'{config_path}: {e}') from None
  weights = [os.path.join(folder, w) for w in WEIGHT_FILES
             if os.path.isfile(os.path.join(folder, w))]
  if not weights:
    raise CheckpointError(f'{folder}: no {" or ".join(WEIGHT_FILES)} (save the checkpoint with '
                          'safe_serialization=True)')
  return cfg, weights[0]


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  tensors = {}
  with safe_open(path, framework='np') as f:
    for key in f.keys():
      tensors[key] = f.get_tensor(key)
  return tensors


def abstract_model(build, seed: int) -> nnx.Module:
  """`build(rngs)` with abstract parameters (for a loader to fill) and seeded dropout streams.

  Initialising parameters only to overwrite them would cost an eager XLA compile per parameter
  shape (seconds) and, for a pretrained size, the random draws themselves.
  """
  model = nnx.eval_shape(lambda: build(nnx.Rngs(seed)))
  streams = nnx.to_flat_state(nnx.state(model, nnx.RngState))
  keys = jax.random.split(jax.random.key(seed), max(len(streams), 1))
  for key, (_, variable) in zip(keys, streams):
    if isinstance(variable, nnx.RngKey):
      variable.set_value(key)
    else:  # RngCount
      variable.set_value(jnp.zeros(variable.shape, variable.dtype))
  nnx.update(model, nnx.from_flat_state(streams))
  return model


def log_ignored(weights: str, ignored: list[str]) -> None:
  if ignored:
    logging.info('%s: not loaded (heads this encoder does not use): %s', weights, ignored)


def load_tensors(model: nnx.Module, tensors: Mapping[str, np.ndarray], source: str,
                 names: NameTable, *, what: str,
                 canonical: Callable[[str], str | None] = lambda name: name,
                 ignored_prefixes: tuple[str, ...] = (), ignored_suffixes: tuple[str, ...] = (),
                 extra_inputs: Collection[str] = (),
                 combine: Callable[[dict[str, np.ndarray]], None] | None = None,
                 missing_name: Callable[[str], str] = repr) -> list[str]:
  """Copies checkpoint tensors into `model` by the table `names`; returns the ignored entries.

  `model` may be initialised or abstract (`nnx.eval_shape`): every parameter is replaced, and
  each must be the target of an entry of `names`.

  Args:
    model: the module to fill.
    tensors: checkpoint name -> array, as `read_safetensors` gives them.
    source: the weights file, which every error names first.
    names: the encoder's table; its keys are canonical names.
    what: the model in the unexpected-tensor error ("a bert encoder").
    canonical: checkpoint name -> the name `names` uses (e.g. without a `bert.` prefix), or None
      for an entry outside the encoder (ignored).
    ignored_prefixes, ignored_suffixes: canonical names of heads we do not build: listed and
      returned, not loaded. Any other name neither in `names` nor in `extra_inputs` is an error.
    extra_inputs: canonical names that are not loaded as they are but read by `combine`.
    combine: edits the found tensors (canonical name -> array) in place before the missing
      check, e.g. folds a weight-norm pair of `extra_inputs` into the one kernel `names` lists.
    missing_name: how the missing-tensor error names the first missing entry.

  Raises:
    CheckpointError naming the entry for an unexpected, missing or misshapen tensor.
  """
  found: dict[str, np.ndarray] = {}
  ignored, unexpected = [], []
  for name, value in tensors.items():
    key = canonical(name)
    if key is not None and (key in names or key in extra_inputs):
      found[key] = value
    elif key is None or key.startswith(ignored_prefixes) or key.endswith(ignored_suffixes):
      ignored.append(name)
    else:
      unexpected.append(name)
  if unexpected:
    raise CheckpointError(f'{source}: unexpected tensors {sorted(unexpected)[:8]} '
                          f'({len(unexpected)} in all) for {what}')
  if combine is not None:
    combine(found)
  missing = sorted(set(names) - set(found))
  if missing:
    raise CheckpointError(f'{source}: missing tensor {missing_name(missing[0])} ({len(missing)} '
                          'missing in all)')
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  uncovered = set(flat) - {path for path, _ in names.values()}
  if uncovered:  # a bug in the table, not in the checkpoint: it must cover every parameter
    raise RuntimeError(f'no checkpoint tensor maps to the parameters {sorted(uncovered)}')
  for name, (path, transform) in names.items():
    variable = flat[path]
    value = np.asarray(found[name], np.float32)
    needed = tuple(transform.hf_shape(tuple(variable.shape)))
    if value.shape != needed:
      raise CheckpointError(f'{source}: tensor {name!r} has shape {list(value.shape)}; the '
                            f'config needs {list(needed)}')
    # set_value, not [...] =: abstract values have no [...].
    variable.set_value(jnp.asarray(transform.to_ours(value), variable.dtype))
  nnx.update(model, nnx.from_flat_state(flat))
  return sorted(ignored)


def load_hf_checkpoint(folder: str, config_cls, build_model, load_weights, *, dtype, seed: int,
                       abstract: bool = True) -> tuple[Any, nnx.Module]:
  """(config, model) from a Hugging Face folder with config.json and model.safetensors.

  Args:
    folder: the checkpoint folder.
    config_cls: its `from_hf(dict)` reads config.json (a ValueError or TypeError becomes a
      CheckpointError naming the file).
    build_model: `build_model(cfg, rngs=..., dtype=...)`, the module.
    load_weights: `load_weights(model, tensors, source)` fills it and returns the ignored
      entries (which are logged).
    dtype: the compute dtype handed to `build_model`.
    seed: the seed of the rng streams (dropout).
    abstract: build with abstract parameters and streams seeded by `abstract_model`; False
      initialises the module with `nnx.Rngs(seed)` (and its streams) before loading.
  """
  cfg, weights = read_hf_folder(folder, config_cls.from_hf)
  build = lambda rngs: build_model(cfg, rngs=rngs, dtype=dtype)
  model = abstract_model(build, seed) if abstract else build(nnx.Rngs(seed))
  log_ignored(weights, load_weights(model, read_safetensors(weights), weights))
  return cfg, model
