"""All Orbax calls of the project.

Per stage, two CheckpointManagers under `workdir/checkpoints/<stage>/`:
  latest/  the last `keep` epochs: train state (params, batch statistics, optimizer, EMA, step,
           lr scale, rng), the data-iterator state and the loop's bookkeeping (for resuming);
  best/    the evaluation weights (EMA where the stage has it) of the best dev weighted F1, with
           the config and label names (for prediction).
In one process, a latest checkpoint's train state (up to PACK_MAX_BYTES) is packed: one flat
array per dtype (`state`) and the list of arrays it holds, with their paths, shapes and dtypes
(`layout`). Orbax pays a few milliseconds per array saved, and a stage's state has hundreds of
small ones (parameters, two Adam moments, EMA), so packing makes these frequent saves about 8x
cheaper. Best checkpoints, which users restore, keep one Orbax array per parameter; so do latest
ones written by several processes, where no process holds every shard.
Orbax writes each step into a temporary folder and renames it when complete, so a crash during a
save leaves the previous checkpoint usable. With `async_saves` (the stage trainer's), a save
returns once the arrays are on the host and Orbax writes them in a background thread while
training goes on; every read, deletion and `close` first waits for writes in flight.
`train.checkpoint_dir` moves `checkpoints/` elsewhere, e.g. to gs://bucket/run/checkpoints,
which Orbax writes directly (tensorstore).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from mer_jax import errors
from mer_jax import models
from mer_jax.data import staging


class MissingCheckpoint(errors.UserError, FileNotFoundError):
  """A stage the caller needs has no checkpoint (the message names the folder)."""


class CheckpointMismatch(errors.UserError, ValueError):
  """A checkpoint's arrays are not the ones the model being restored has."""


def checkpoint_dir(config, workdir: str) -> str:
  """The folder of every stage's checkpoints: train.checkpoint_dir, else workdir/checkpoints."""
  return config.train.get('checkpoint_dir', '') or os.path.join(workdir, 'checkpoints')


def _absolute(directory: str) -> str:
  return directory if staging.is_remote(directory) else os.path.abspath(directory)


def _manager(directory: str, keep: int, items: dict[str, type], read_only: bool = False,
             async_saves: bool = False) -> ocp.CheckpointManager:
  """`items`: name -> Orbax handler class. Handlers are given up front (not only at save and
  restore) so that item_metadata can read the stored trees."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=async_saves and not read_only)
  return ocp.CheckpointManager(_absolute(directory), options=options,
                               item_handlers={name: h() for name, h in items.items()})


def _replace_step(manager: ocp.CheckpointManager, step: int) -> None:
  """Drops an existing checkpoint at `step` so a newer save of that step can take its place.

  Happens when a periodic save lands on an epoch's last step (the end-of-epoch save adds the loop
  bookkeeping), or when a run is resumed after a crash between the best and the latest save.
  """
  manager.wait_until_finished()
  if step in manager.all_steps():
    manager.delete(step)


def _abstract(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)


def _stored_path_of(stored_paths) -> Callable[[tuple[str, ...]], tuple[str, ...]]:
  """Where each of the model's arrays (by path names) sits among `stored_paths`.

  Checkpoints written while the train state held nnx.State trees (before it became plain dicts
  of arrays, see inference.build_sharded_model) store each array inside its Variable, at
  `<path>/value`.
  """
  def stored(names):
    if names not in stored_paths and names + ('value',) in stored_paths:
      return names + ('value',)
    return names
  return stored


def _check_same_arrays(folder: str, item: str, wanted: set, stored_paths: set) -> None:
  if wanted != stored_paths:
    differ = min(wanted - stored_paths or stored_paths - wanted)
    what = (f"lacks the model's {'/'.join(differ)}" if differ in wanted
            else f"holds {'/'.join(differ)}, which the model does not have")
    raise CheckpointMismatch(
        f'{folder}: the {item} {what} ({len(wanted - stored_paths)} arrays missing, '
        f'{len(stored_paths - wanted)} extra); it was written for another parameter layout '
        '(another mer_jax version or model settings); retrain the stage or use the mer_jax '
        'version that wrote it')


def _restore_tree(manager: ocp.CheckpointManager, step: int, item: str, like: Any,
                  other_items: dict) -> tuple[Any, dict]:
  """Restores `item`, stored one Orbax array per leaf, onto the structure and shardings of
  `like` (plus JSON items)."""
  stored = manager.item_metadata(step)[item]
  stored_paths = {models.path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(stored)[0]}
  stored_path = _stored_path_of(stored_paths)

  def as_stored(path, leaf):
    names = models.path_names(path)
    return {'value': leaf} if stored_path(names) != names else leaf

  target = jax.tree_util.tree_map_with_path(as_stored, _abstract(like))
  wanted = {models.path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(target)[0]}
  _check_same_arrays(os.path.join(manager.directory, str(step)), item, wanted, stored_paths)
  out = manager.restore(step, args=ocp.args.Composite(
      **{item: ocp.args.StandardRestore(target)}, **other_items))
  restored = jax.tree.map(lambda _, r: r['value'] if isinstance(r, dict) else r, like, out[item])
  return restored, out


# Larger states are saved one array per leaf: there the bytes, not the number of arrays, cost the
# time, and packing would hold a second host copy of the state.
PACK_MAX_BYTES = 1 << 30


def _packable(state: Any) -> bool:
  """Whether a latest state is saved packed: in a single process (which holds every array), and
  up to PACK_MAX_BYTES."""
  return jax.process_count() == 1 and sum(
      x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) <= PACK_MAX_BYTES


def _pack(tree: Any) -> tuple[dict[str, np.ndarray], list[dict]]:
  """`tree`'s arrays on the host, concatenated into one flat array per dtype, and the layout
  (path names, shape, dtype, in flattening order) that `_unpack` splits them back by."""
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  parts: dict[str, list[np.ndarray]] = {}
  layout = []
  for path, leaf in leaves:
    leaf = np.asarray(leaf)
    parts.setdefault(leaf.dtype.name, []).append(leaf.ravel())
    layout.append({'path': list(models.path_names(path)), 'shape': list(leaf.shape),
                   'dtype': leaf.dtype.name})
  return {name: np.concatenate(arrays) for name, arrays in parts.items()}, layout


def _split(packed: dict[str, np.ndarray], layout: list[dict]) -> list[np.ndarray]:
  """The arrays of a packed state, in `layout`'s order."""
  offsets = dict.fromkeys(packed, 0)
  arrays = []
  for entry in layout:
    size = int(np.prod(entry['shape'], dtype=np.int64))
    start = offsets[entry['dtype']]
    offsets[entry['dtype']] = start + size
    arrays.append(packed[entry['dtype']][start:start + size].reshape(entry['shape']))
  return arrays


def _unpack(packed: dict[str, np.ndarray], layout: list[dict], like: Any, folder: str) -> Any:
  """The arrays of `like`'s structure, shapes and shardings, taken from a packed state."""
  stored = {tuple(e['path']): x for e, x in zip(layout, _split(packed, layout))}
  stored_path = _stored_path_of(set(stored))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
  wanted = {stored_path(models.path_names(p)): x for p, x in leaves}
  _check_same_arrays(folder, 'state', set(wanted), set(stored))
  for names, x in wanted.items():
    if (tuple(np.shape(x)), np.dtype(x.dtype)) != (stored[names].shape, stored[names].dtype):
      raise CheckpointMismatch(
          f'{folder}: the state holds {"/".join(names)} as {stored[names].dtype.name}'
          f'{list(stored[names].shape)}, the model as {np.dtype(x.dtype).name}'
          f'{list(np.shape(x))}; it was written for other model settings; retrain the stage')
  arrays = [stored[names] for names in wanted]  # `wanted` is in `leaves`' order
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = [getattr(x, 'sharding', None) or default for _, x in leaves]
  return jax.tree_util.tree_unflatten(treedef, jax.device_put(arrays, shardings))


class StageCheckpoints:
  """latest-k (resume) and best-by-dev-F1 (predict) checkpoints of one training stage."""

  LATEST_ITEMS = {'state': ocp.StandardCheckpointHandler, 'data': ocp.JsonCheckpointHandler,
                  'meta': ocp.JsonCheckpointHandler, 'layout': ocp.JsonCheckpointHandler}
  BEST_ITEMS = {'weights': ocp.StandardCheckpointHandler, 'meta': ocp.JsonCheckpointHandler}

  def __init__(self, workdir: str, stage: str, keep: int = 2, read_only: bool = False,
               directory: str = '', async_saves: bool = False):
    """Under `directory`/<stage>/ (default: workdir/checkpoints; see `checkpoint_dir`).
    `async_saves`: saves return before the files are written (see the module's docstring)."""
    root = os.path.join(directory or os.path.join(workdir, 'checkpoints'), stage)
    self.stage = stage
    self.root = root
    self._latest = _manager(os.path.join(root, 'latest'), keep, self.LATEST_ITEMS, read_only,
                            async_saves)
    self._best = _manager(os.path.join(root, 'best'), 1, self.BEST_ITEMS, read_only,
                          async_saves)

  # --- resume -------------------------------------------------------------------------------
  def latest_step(self) -> int | None:
    self._latest.wait_until_finished()
    return self._latest.latest_step()

  def save_latest(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    # A latest checkpoint's bookkeeping (best epoch and F1, finished) describes the best
    # checkpoint, which must therefore be on disk before the latest one can be.
    self._best.wait_until_finished()
    _replace_step(self._latest, step)
    items = {'data': ocp.args.JsonSave(data_state), 'meta': ocp.args.JsonSave(meta)}
    if _packable(state):
      packed, layout = _pack(state)
      items.update(state=ocp.args.StandardSave(packed), layout=ocp.args.JsonSave(layout))
    else:
      items.update(state=ocp.args.StandardSave(state))
    self._latest.save(step, args=ocp.args.Composite(**items), force=True)

  def latest_meta(self) -> dict | None:
    step = self.latest_step()
    if step is None:
      return None
    return self._latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore_latest(self, like_state: Any) -> tuple[Any, dict, dict] | None:
    """Restores onto the shardings of `like_state` (concrete or abstract arrays)."""
    step = self.latest_step()
    if step is None:
      return None
    json_items = {'data': ocp.args.JsonRestore(), 'meta': ocp.args.JsonRestore()}
    stored = self._latest.item_metadata(step)
    if 'layout' not in stored:  # one array per leaf
      state, out = _restore_tree(self._latest, step, 'state', like_state, json_items)
      return state, out['data'], out['meta']
    packed, layout, out = self._read_packed(step, stored['state'], json_items)
    state = _unpack(packed, layout, like_state,
                    os.path.join(self._latest.directory, str(step)))
    return state, out['data'], out['meta']

  def latest_arrays(self) -> tuple[dict, dict] | None:
    """The newest latest checkpoint as stored, for inspection: its train state as nested dicts
    of host arrays keyed by path names, and its loop metadata; None if there is none."""
    step = self.latest_step()
    if step is None:
      return None
    json_items = {'meta': ocp.args.JsonRestore()}
    stored = self._latest.item_metadata(step)
    if 'layout' not in stored:
      out = self._latest.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(), **json_items))
      return jax.device_get(out['state']), out['meta']
    packed, layout, out = self._read_packed(step, stored['state'], json_items)
    nested = {}
    for entry, array in zip(layout, _split(packed, layout)):
      *parents, name = entry['path']
      node = nested
      for parent in parents:
        node = node.setdefault(parent, {})
      node[name] = array
    return nested, out['meta']

  def _read_packed(self, step: int, stored_state: Any, json_items: dict
                   ) -> tuple[dict, list, dict]:
    """(flat arrays by dtype, layout, the other items) of a packed latest checkpoint, given its
    state item's metadata."""
    target = {name: np.empty(x.shape, x.dtype) for name, x in stored_state.items()}
    out = self._latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), layout=ocp.args.JsonRestore(), **json_items))
    return out['state'], out['layout'], out

  # --- best (for evaluation and prediction) ---------------------------------------------------
  def save_best(self, step: int, params: Any, batch_stats: Any, meta: dict) -> None:
    # One item: a model without batch norm has empty batch statistics, which Orbax cannot
    # save as an item of its own.
    weights = {'params': params, 'batch_stats': batch_stats}
    _replace_step(self._best, step)
    self._best.save(step, args=ocp.args.Composite(
        weights=ocp.args.StandardSave(weights), meta=ocp.args.JsonSave(meta)), force=True)

  def has_best(self) -> bool:
    self._best.wait_until_finished()
    return self._best.latest_step() is not None

  def best_step(self) -> int:
    return self._require_best()

  def best_meta(self) -> dict:
    step = self._require_best()
    return self._best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore_best(self, like_params: Any, like_batch_stats: Any) -> tuple[Any, Any, dict]:
    step = self._require_best()
    like = {'params': like_params, 'batch_stats': like_batch_stats}
    weights, out = _restore_tree(self._best, step, 'weights', like,
                                 {'meta': ocp.args.JsonRestore()})
    return weights['params'], weights['batch_stats'], out['meta']

  def _require_best(self) -> int:
    self._best.wait_until_finished()
    step = self._best.latest_step()
    if step is None:
      raise MissingCheckpoint(f'no best checkpoint for stage {self.stage!r} under '
                              f'{os.path.join(self.root, "best")}; train the stage first')
    return step

  def close(self) -> None:
    self._latest.close()
    self._best.close()
