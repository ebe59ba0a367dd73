"""The benchmark's accounting: matmul FLOPs, the matmuls a traced step runs, the program that runs
them alone, and the projected MELD run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mer_jax import bench


def _matmuls(fn, *args):
  return bench.step_matmuls(jax.make_jaxpr(fn)(*args).jaxpr)


def test_matmul_flops_counts_batch_contracted_and_free_dims():
  x, w = jnp.ones((3, 4)), jnp.ones((4, 5))
  (m,) = _matmuls(lambda x, w: x @ w, x, w)
  assert m.flops == 2 * 3 * 4 * 5
  a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
  (m,) = _matmuls(lambda a, b: jnp.einsum('bij,bjk->bik', a, b), a, b)
  assert m.flops == 2 * 2 * 3 * 4 * 5
  # A weight gradient: contracts two dims (nodes and tokens) of [48, 3, 128] activations.
  h, g = jnp.ones((48, 3, 128)), jnp.ones((48, 3, 64))
  (m,) = _matmuls(lambda h, g: jnp.einsum('nti,nto->io', h, g), h, g)
  assert m.flops == 2 * (48 * 3) * 128 * 64


def test_step_matmuls_of_a_gradient_through_scan_and_cond():
  x, w = jnp.ones((2, 4)), jnp.ones((4, 4))

  def loss(w, x):
    def body(c, _):
      return c @ w, None
    c, _ = lax.scan(body, x, None, length=3)
    return lax.cond(c.sum() > 0, lambda c: c @ w, lambda c: c, c).sum()

  matmuls = _matmuls(jax.grad(loss), w, x)
  # Forward: 3 trips of c @ w. Backward: 2 per trip (d carry, d w). The conds (forward and its
  # transpose) count their cheaper branch, the identity: nothing.
  assert len(matmuls) == 9
  assert sum(m.flops for m in matmuls) == 9 * (2 * 2 * 4 * 4)


def test_step_matmuls_takes_the_cheaper_branch_of_a_cond():
  x, w = jnp.ones((2, 8)), jnp.ones((8, 8))
  fn = lambda x, w: lax.cond(x.sum() > 0, lambda: x @ w @ w, lambda: x[:, :4] @ w[:4])
  (m,) = _matmuls(fn, x, w)
  assert m.flops == 2 * 2 * 4 * 8


def test_step_matmuls_refuses_a_while_loop_with_matmuls():
  x, w = jnp.ones((2, 4)), jnp.ones((4, 4))
  fn = lambda x, w: lax.while_loop(lambda c: c.sum() < 100, lambda c: c @ w + 1, x)
  with pytest.raises(ValueError, match='while loop'):
    _matmuls(fn, x, w)


def test_matmuls_alone_runs_each_matmul_on_its_shared_operands():
  x, w, v = jnp.ones((3, 4)), jnp.ones((4, 5)), jnp.ones((5, 2))
  matmuls = _matmuls(lambda x, w, v: (x @ w) @ v + (x @ w).sum(), x, w, v)
  assert len(matmuls) == 3
  run, operands = bench.matmuls_alone(matmuls)
  # x and w feed two matmuls; x @ w and v feed the third: four distinct operands, not six.
  assert len(operands) == 4
  outs = run(operands)
  for m, out in zip(matmuls, outs):
    want = lax.dot_general(operands[id(m.lhs)], operands[id(m.rhs)],
                           m.params['dimension_numbers'])
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    assert out.shape == want.shape and out.dtype == jnp.float32


def test_projected_minutes_by_hand():
  rows = [
      {'stage': 'teacher', 'moe': False, 'utterances_per_step': 40.0, 'step_ms': 20.0},
      {'stage': 'audio', 'moe': False, 'utterances_per_step': 40.0, 'step_ms': 5.0},
      {'stage': 'visual', 'moe': False, 'utterances_per_step': 40.0, 'step_ms': 5.0},
      {'stage': 'fusion', 'moe': False, 'utterances_per_step': 40.0, 'step_ms': 10.0},
      {'stage': 'fusion(graph)', 'moe': False, 'utterances_per_step': 40.0, 'step_ms': 30.0},
      {'stage': 'fusion(raw)', 'moe': False, 'utterances_per_step': 40.0, 'step_ms': 12.0},
      {'stage': 'fusion', 'moe': True, 'utterances_per_step': 40.0, 'step_ms': 99.0},
  ]
  steps = 30 * 9989 / 40  # 30 epochs of MELD's training utterances at 40 a step
  minutes = lambda ms: steps * ms / 1e3 / 60
  got = bench.projected_minutes(rows, use_moe=False, folds=3)
  assert got['authors'] == pytest.approx(minutes(20 + 5 + 5 + 12))
  assert got['default'] == pytest.approx(minutes(3 * (20 + 5 + 5) + 10))


def test_timed_waits_for_each_call_and_skips_the_warmup():
  calls = []
  times = bench.timed(lambda: calls.append(len(calls)) or jnp.ones(3) * len(calls), 4, warmup=2)
  assert calls == list(range(6))  # 2 untimed, then 4 timed
  assert len(times) == 4 and all(t >= 0 for t in times)


def test_equal_batch_budget_by_hand():
  # Dialogues of 8 utterances: two a batch hold 16, which needs 16 real node slots (17 with the
  # padding slot) and 2 real graph slots (3); every larger graph budget packs the same batches, and
  # ties go to the smaller budget. Below 17 node slots a batch holds one dialogue: 8 utterances.
  lengths = [8] * 32
  assert bench.equal_batch_budget(lengths, 16, 48, 8) == (17, 3, 16.0)
  # Two sub-batches a step: 32 utterances a step from the same budget.
  assert bench.equal_batch_budget(lengths, 32, 48, 8, groups=2) == (17, 3, 32.0)
  # Only budgets that fit (the mesh): odd node counts are out, so 18 (two dialogues, 16).
  got = bench.equal_batch_budget(lengths, 16, 48, 8, fits=lambda nodes, graphs: nodes % 2 == 0)
  assert got == (18, 3, 16.0)
  with pytest.raises(ValueError, match='longest dialogue'):
    bench.equal_batch_budget(lengths, 16, 8, 8)  # 8 slots hold 7 utterances, not 8


def test_equal_batch_budget_on_meld_lengths():
  from mer_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  counts = synthetic.MELD_TRAIN_LENGTH_COUNTS
  lengths = np.repeat(np.arange(1, len(counts) + 1), counts)
  nodes, graphs, planned = bench.equal_batch_budget(lengths, 16, 48, 8)
  # The longest dialogue (33) sets the node floor; two dialogues a batch come nearest 16.
  assert (nodes, graphs) == (34, 3)
  assert 17 < planned < 21
  # The configured budget's own batches, for comparison: about 40 utterances.
  assert bench.equal_batch_budget(lengths, 41.5, 48, 8)[:2] == (48, 8)
