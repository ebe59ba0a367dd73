"""Train-state checkpoints: round trip, and checkpoints stored in the older nnx.State layout.

The train state holds plain dicts of arrays. Checkpoints written while it held nnx.State trees
store each array one level deeper, inside its Variable (`<path>/value`); they must restore to
the same numbers.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from mer_jax.train import checkpointing
from mer_jax.train import steps


class Toy(nnx.Module):
  """Params, batch statistics, a list of submodules and a submodule named `value`."""

  def __init__(self, rngs):
    self.blocks = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 4, rngs=rngs)])
    self.value = nnx.Linear(4, 2, rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)


def train_state(params, batch_stats, tx):
  return steps.TrainState(
      step=jnp.asarray(7, jnp.int32), params=params, model_state=batch_stats,
      opt_state=tx.init(params), ema_params=jax.tree.map(lambda x: x * 0.5, params),
      lr_scale=jnp.asarray(0.25, jnp.float32), rng=jax.random.PRNGKey(3))


@pytest.fixture()
def states():
  """(the state as nnx.State trees, the same state as plain dicts), after one AdamW update so
  that the optimizer moments are not zeros."""
  _, params, batch_stats = nnx.split(Toy(nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
  batch_stats = jax.tree.map(lambda x: x + 1.5, batch_stats)
  tx = optax.adamw(1e-2)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
  as_state = train_state(params, batch_stats, tx)
  _, opt_state = tx.update(grads, as_state.opt_state, params)
  as_state = as_state.replace(opt_state=opt_state)
  pure = nnx.to_pure_dict
  as_dicts = train_state(pure(params), pure(batch_stats), tx)
  _, pure_opt = tx.update(pure(grads), as_dicts.opt_state, pure(params))
  return as_state, as_dicts.replace(opt_state=pure_opt)


def assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def zeros_like(tree):
  return jax.tree.map(jnp.zeros_like, tree)


def best_restores_to(ckpt, state) -> dict:
  """Restores the best weights onto zeros, checks they are `state`'s EMA parameters and batch
  statistics, and returns the best checkpoint's metadata."""
  params, batch_stats, meta = ckpt.restore_best(zeros_like(state.ema_params),
                                                zeros_like(state.model_state))
  assert_same(params, state.ema_params)
  assert_same(batch_stats, state.model_state)
  return meta


@pytest.mark.parametrize('saved_as', ['dicts', 'nnx_state'])
def test_latest_and_best_restore_onto_plain_dicts(tmp_path, states, saved_as):
  as_state, as_dicts = states
  saved = as_dicts if saved_as == 'dicts' else as_state
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), 'teacher')
  ckpt.save_latest(12, saved, {'epoch': 1}, {'finished': False})
  ckpt.save_best(12, saved.ema_params, saved.model_state, {'dev_weighted_f1': 0.5})
  ckpt.close()

  ckpt = checkpointing.StageCheckpoints(str(tmp_path), 'teacher', read_only=True)
  # Restored onto zeros shaped like the plain-dict state: every number comes from the disk.
  state, data, meta = ckpt.restore_latest(zeros_like(as_dicts))
  assert data == {'epoch': 1} and meta == {'finished': False}
  assert_same(state, as_dicts)
  assert best_restores_to(ckpt, as_dicts) == {'dev_weighted_f1': 0.5}
  ckpt.close()


def test_async_saves_write_what_was_saved(tmp_path, states):
  """The stage trainer's saves return before the files are written. The arrays saved may be
  donated (deleted) right after; reads through the same object wait for the writes; a save of
  a step in flight replaces it; after close another process's view has every file."""
  _, as_dicts = states
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), 'teacher', async_saves=True)
  saved = jax.tree.map(jnp.copy, as_dicts)
  ckpt.save_best(12, saved.ema_params, saved.model_state, {'epoch': 1})
  ckpt.save_latest(12, saved, {'epoch': 1}, {'finished': False})
  for x in jax.tree.leaves(saved):  # what the next train step's donation does
    x.delete()
  assert ckpt.latest_meta() == {'finished': False}
  state, data, _ = ckpt.restore_latest(zeros_like(as_dicts))
  assert data == {'epoch': 1}
  assert_same(state, as_dicts)
  newer = as_dicts.replace(lr_scale=jnp.asarray(0.5, jnp.float32))
  ckpt.save_latest(12, newer, {'epoch': 2}, {'finished': True})
  ckpt.close()

  ckpt = checkpointing.StageCheckpoints(str(tmp_path), 'teacher', read_only=True)
  assert ckpt.latest_step() == 12 and ckpt.latest_meta() == {'finished': True}
  state, data, _ = ckpt.restore_latest(zeros_like(as_dicts))
  assert data == {'epoch': 2} and float(state.lr_scale) == 0.5
  assert best_restores_to(ckpt, as_dicts) == {'epoch': 1}
  ckpt.close()


def test_weights_of_another_parameter_layout_are_refused_naming_the_array(tmp_path, states):
  """Best weights saved for one parameter tree (here: a fusion block per modality) restored onto
  another (the block stacked over modalities) stop with the checkpoint and the array named."""
  _, as_dicts = states
  per_modality = {'gates': {m: {'kernel': jnp.ones((4, 4))} for m in ('a', 't')}}
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), 'fusion')
  ckpt.save_best(3, per_modality, {}, {'epoch': 1})
  ckpt.close()
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), 'fusion', read_only=True)
  stacked = {'gates': {'kernel': jnp.zeros((2, 4, 4))}}
  with pytest.raises(checkpointing.CheckpointMismatch) as raised:
    ckpt.restore_best(stacked, {})
  message = str(raised.value)
  assert os.path.join('fusion', 'best', '3') in message and '\n' not in message
  assert "lacks the model's params/gates/kernel (1 arrays missing, 2 extra)" in message
  # The layout it was saved with still restores.
  params, _, _ = ckpt.restore_best(zeros_like(per_modality), {})
  assert_same(params, per_modality)
  ckpt.close()


@pytest.mark.parametrize('packed', [True, False])
def test_latest_state_is_packed_in_one_process_and_both_layouts_restore(tmp_path, states,
                                                                         monkeypatch, packed):
  """One process packs the train state into one array per dtype; larger states (and several
  processes, where none holds every shard) are stored one array per leaf. Either restores to the
  same numbers and reads back as nested host arrays."""
  _, as_dicts = states
  if not packed:
    monkeypatch.setattr(checkpointing, 'PACK_MAX_BYTES',
                        sum(x.nbytes for x in jax.tree.leaves(as_dicts)) - 1)
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), 'teacher')
  ckpt.save_latest(12, as_dicts, {'epoch': 1}, {'finished': False})
  ckpt.close()
  stored = ocp.StandardCheckpointer().metadata(
      os.path.join(tmp_path, 'checkpoints', 'teacher', 'latest', '12', 'state')).item_metadata
  n_leaves = len(jax.tree.leaves(as_dicts))
  if packed:  # step and Adam's counts, the rng key, everything else
    assert sorted(stored) == ['float32', 'int32', 'uint32']
    assert stored['float32'].shape == (sum(
        x.size for x in jax.tree.leaves(as_dicts) if x.dtype == jnp.float32),)
  else:
    assert len(jax.tree.leaves(stored)) == n_leaves
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), 'teacher', read_only=True)
  state, data, meta = ckpt.restore_latest(zeros_like(as_dicts))
  assert data == {'epoch': 1} and meta == {'finished': False}
  assert_same(state, as_dicts)
  arrays, meta = ckpt.latest_arrays()
  assert meta == {'finished': False}
  np.testing.assert_array_equal(arrays['params']['blocks']['1']['kernel'],
                                as_dicts.params['blocks'][1]['kernel'])
  assert float(arrays['lr_scale']) == 0.25 and len(jax.tree.leaves(arrays)) == n_leaves
  ckpt.close()


def test_packed_state_of_another_shape_is_refused_naming_the_array(tmp_path, states):
  _, as_dicts = states
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), 'teacher')
  ckpt.save_latest(5, as_dicts, {'epoch': 1}, {'finished': False})
  ckpt.close()
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), 'teacher', read_only=True)
  wider = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros((2, 2)) if jax.tree_util.keystr(p).endswith(
          ".params['value']['bias']") else jnp.zeros_like(x), as_dicts)
  with pytest.raises(checkpointing.CheckpointMismatch) as raised:
    ckpt.restore_latest(wider)
  message = str(raised.value)
  assert os.path.join('teacher', 'latest', '5') in message and '\n' not in message
  assert 'params/value/bias as float32[2], the model as float32[2, 2]' in message
  fewer = as_dicts.replace(ema_params={})
  with pytest.raises(checkpointing.CheckpointMismatch, match='holds ema_params/'):
    ckpt.restore_latest(zeros_like(fewer))
  ckpt.close()
