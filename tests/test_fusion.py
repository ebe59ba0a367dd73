"""Mixture of experts and hierarchical fusion: references, masking, scope, switches."""

import functools
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from mer_jax import models
from mer_jax.models import fusion as fusion_lib
from mer_jax.models import moe as moe_lib

pytestmark = pytest.mark.slow

DIMS = {'t': 12, 'a': 10, 'v': 8}
_erf = np.vectorize(math.erf)


def gelu(x):
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def tiny_config(**fusion):
  config = default.base_config()
  config.model.fusion.dim = 16
  config.model.fusion.heads = 2
  config.model.fusion.layers = 1
  config.model.fusion.pool_queries = 2
  config.model.fusion.dropout = 0.1
  config.model.fusion.update(fusion)
  return config


def build_fusion(config=None, seed=0):
  return models.build_model('fusion', config or tiny_config(), in_dims=DIMS, num_classes=7,
                            rngs=nnx.Rngs(seed))


TRACES = []


@functools.partial(jax.jit, static_argnums=(0, 6))
def _apply(graphdef, state, inputs, present, graph_ids, node_mask, train):
  """The model as a pure function of its state, compiled whole."""
  TRACES.append(train)
  model = nnx.merge(graphdef, state)
  return model(inputs, present, graph_ids, node_mask, train=train), nnx.state(model)


def run(model, inputs, present, graph_ids, node_mask, train=False):
  graphdef, state = nnx.split(model)
  outputs, state = _apply(graphdef, state, inputs, present, graph_ids, node_mask, train)
  nnx.update(model, state)
  return outputs


def batch(seed=0, lengths=(5, 6), num_nodes=14):
  """Per-node inputs of two dialogues plus padding; some modalities absent."""
  rng = np.random.default_rng(seed)
  num_real = sum(lengths)
  graph_ids = np.concatenate([np.full(n, g) for g, n in enumerate(lengths)]
                             + [np.full(num_nodes - num_real, len(lengths))])
  node_mask = np.arange(num_nodes) < num_real
  present = {m: node_mask & (rng.random(num_nodes) > 0.25) for m in DIMS}
  present['t'][0] = present['a'][0] = present['v'][0] = False  # nothing observed
  present['t'][1], present['a'][1], present['v'][1] = True, False, False  # text only
  inputs = {m: (rng.normal(size=(num_nodes, d)) * present[m][:, None]).astype(np.float32)
            for m, d in DIMS.items()}
  return (jax.tree.map(jnp.asarray, inputs), jax.tree.map(jnp.asarray, present),
          jnp.asarray(graph_ids, jnp.int32), jnp.asarray(node_mask))


def reference_moe(x, layer):
  """Per-sample loop over the selected experts, as the authors' module computes it."""
  p = lambda v: np.asarray(v[...], np.float64)
  hidden, out = layer.router_hidden, layer.router_out
  result = []
  for row in np.asarray(x, np.float64):
    scores = gelu(row @ p(hidden.kernel) + p(hidden.bias)) @ p(out.kernel) + p(out.bias)
    chosen = np.argsort(-scores)[:layer.top_k]
    weights = np.exp(scores[chosen] - scores[chosen].max())
    weights /= weights.sum()
    total = 0.0
    for w, e in zip(weights, chosen):
      h = row @ p(layer.kernel)[e] + p(layer.bias)[e]
      h = (h - h.mean()) / np.sqrt(h.var() + 1e-5) * p(layer.norm_scale)[e] + p(
          layer.norm_bias)[e]
      total = total + w * gelu(h)
    result.append(total)
  return np.stack(result)


def test_mixture_of_experts_matches_per_sample_loop():
  rng = np.random.default_rng(0)
  layer = moe_lib.MixtureOfExperts(6, 5, num_experts=4, top_k=2, dropout=0.1,
                                    rngs=nnx.Rngs(0))
  for name in ('bias', 'norm_scale', 'norm_bias'):
    getattr(layer, name)[...] = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  x = rng.normal(size=(9, 6)).astype(np.float32)
  np.testing.assert_allclose(layer(jnp.asarray(x), train=False), reference_moe(x, layer),
                             rtol=1e-4, atol=1e-5)
  assert layer.kernel.get_metadata()['out_sharding'] == ('expert', 'embed', 'mlp')
  with pytest.raises(ValueError, match='top_k'):
    moe_lib.MixtureOfExperts(6, 5, num_experts=2, top_k=3, dropout=0.0, rngs=nnx.Rngs(0))


def test_top_k_combine_weights_select_k_experts():
  logits = jnp.asarray([[0.1, 2.0, -1.0, 1.0], [3.0, 0.0, 0.5, 0.2]])
  weights = np.asarray(moe_lib.top_k_combine_weights(logits, 2))
  assert ((weights > 0).sum(axis=1) == 2).all()
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
  e = np.exp([2.0, 1.0])
  np.testing.assert_allclose(weights[0], [0, e[0] / e.sum(), 0, e[1] / e.sum()], rtol=1e-6)


def test_outputs_shapes_and_modality_weights():
  inputs, present, graph_ids, node_mask = batch()
  model = build_fusion()
  out = run(model, inputs, present, graph_ids, node_mask)
  assert out['logits'].shape == (14, 7) and out['fused'].shape == (14, 16)
  assert set(out['aux_logits']) == {'t', 'a', 'v'} and out['contrastive'] is None
  weights = np.asarray(out['modality_weights'])
  observed = np.stack([present[m] for m in ('t', 'a', 'v')], axis=1)
  assert (weights[~observed] == 0).all()
  rows = observed.any(axis=1)
  np.testing.assert_allclose(weights[rows].sum(axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(weights[1], [1.0, 0.0, 0.0], rtol=1e-6)
  for leaf in jax.tree.leaves(out):
    assert np.isfinite(leaf).all()
  np.testing.assert_array_equal(model.loss_log_vars[...], np.zeros(4))
  assert isinstance(model.loss_log_vars, nnx.Param)


@pytest.mark.parametrize('use_moe', [False, True])
def test_absent_modality_features_cannot_reach_outputs(use_moe):
  inputs, present, graph_ids, node_mask = batch(seed=1)
  model = build_fusion(tiny_config(use_moe=use_moe))
  base = run(model, inputs, present, graph_ids, node_mask)
  for m in ('t', 'a', 'v'):
    noise = jnp.asarray(np.random.default_rng(2).normal(size=inputs[m].shape) * 50,
                        jnp.float32)
    changed = dict(inputs)
    changed[m] = jnp.where(present[m][:, None], inputs[m], noise)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 base, run(model, changed, present, graph_ids, node_mask))
  # The check can fail: observed features do change the outputs.
  changed = dict(inputs, t=inputs['t'] + 1.0)
  assert not np.allclose(run(model, changed, present, graph_ids, node_mask)['logits'],
                         base['logits'])


@pytest.mark.parametrize('scope, isolated', [('dialogue', True), ('batch', False)])
def test_alignment_stays_inside_the_dialogue(scope, isolated):
  inputs, present, graph_ids, node_mask = batch(seed=3)
  # Only alignment mixes nodes; switch it on alone to test its scope.
  model = build_fusion(tiny_config(alignment_scope=scope))
  base = run(model, inputs, present, graph_ids, node_mask)
  other = np.asarray(graph_ids) == 1
  changed = {m: jnp.where(jnp.asarray(other)[:, None] & present[m][:, None], x * -3.0 + 1.0, x)
             for m, x in inputs.items()}
  out = run(model, changed, present, graph_ids, node_mask)
  first = np.asarray(graph_ids) == 0
  same = np.allclose(np.asarray(out['logits'])[first], np.asarray(base['logits'])[first],
                     rtol=1e-5, atol=1e-6)
  assert same == isolated


# use_moe=True runs in the masking test, gates=False in the single-modality test.
@pytest.mark.parametrize('switches', [
    dict(alignment=False, cross_attention=False, layers=0, pool_queries=1),
])
def test_every_switch_off_still_runs(switches):
  inputs, present, graph_ids, node_mask = batch(seed=4)
  model = build_fusion(tiny_config(**switches))
  names = {str(path[0]) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert ('aligners' in names) == switches.get('alignment', True)
  assert ('transformer' in names) == (switches.get('layers', 1) > 0)
  assert ('context_gates' in names) == switches.get('gates', True)
  assert ('cross_attention' in names) == switches.get('cross_attention', True)
  out = run(model, inputs, present, graph_ids, node_mask)
  assert out['logits'].shape == (14, 7)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(out))


def test_single_modality_and_contrastive_head():
  config = tiny_config(gates=False)
  config.data.modalities = ('t',)
  config.loss.contrastive = True
  config.loss.contrastive_dim = 6
  inputs, present, graph_ids, node_mask = batch(seed=5)
  model = build_fusion(config)
  out = run(model, inputs, present, graph_ids, node_mask)
  assert set(out['aux_logits']) == {'t'} and out['modality_weights'].shape == (14, 1)
  assert not hasattr(model, 'context_gates') and not hasattr(model, 'aligners')
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(out))
  assert model.loss_log_vars.shape == (2,)
  norms = np.linalg.norm(out['contrastive'], axis=-1)
  np.testing.assert_allclose(norms[np.asarray(present['t'])], 1.0, rtol=1e-5)


def test_soft_alignment_plan_matches_numpy_for_each_pair():
  rng = np.random.default_rng(6)
  aligner = fusion_lib.SoftAlignment(2, 4, rngs=nnx.Rngs(0))
  aligner.log_temperature[...] = jnp.log(jnp.asarray([0.7, 1.3]))
  source, target = rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 5, 4))
  allowed = rng.random((2, 5, 5)) > 0.4
  allowed[:, 3] = False
  got = aligner.plan(jnp.asarray(source, jnp.float32), jnp.asarray(target, jnp.float32),
                     jnp.asarray(allowed))
  means = aligner(jnp.asarray(source, jnp.float32), jnp.asarray(target, jnp.float32),
                  jnp.asarray(allowed))
  for pair, tau in enumerate((0.7, 1.3)):
    p = lambda layer: (np.asarray(layer.kernel[pair]), np.asarray(layer.bias[pair]))
    (ws, bs), (wt, bt) = p(aligner.source), p(aligner.target)
    s, t = source[pair] @ ws + bs, target[pair] @ wt + bt
    cost = np.linalg.norm(s[:, None] - t[None], axis=-1)
    plan = np.exp(-cost / tau) * allowed[pair]
    sums = plan.sum(axis=1, keepdims=True)
    plan = np.divide(plan, sums, out=np.zeros_like(plan), where=sums > 0)
    np.testing.assert_allclose(got[pair], plan, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(means[pair], plan @ target[pair], rtol=1e-4, atol=1e-5)


def test_attention_ignores_masked_keys_and_zeroes_empty_rows():
  rng = np.random.default_rng(7)
  attention = fusion_lib.MultiHeadAttention(8, 2, dropout=0.0, rngs=nnx.Rngs(0))
  queries = jnp.asarray(rng.normal(size=(3, 2, 8)), jnp.float32)
  keys = jnp.asarray(rng.normal(size=(3, 4, 8)), jnp.float32)
  mask = jnp.asarray([[True, False, True, False], [True] * 4, [False] * 4])
  out = attention(queries, keys, mask, train=False)
  moved = jnp.where(mask[..., None], keys, 9.0)
  np.testing.assert_allclose(attention(queries, moved, mask, train=False), out, atol=1e-6)
  np.testing.assert_array_equal(out[2], np.zeros((2, 8)))


def test_stacked_blocks_equal_one_block_per_copy():
  """A block with copies computes, slice by slice, what one unstacked block with that slice's
  parameters computes (attention; LayerNorm against nnx.LayerNorm)."""
  rng = np.random.default_rng(8)
  stacked = fusion_lib.MultiHeadAttention(8, 2, dropout=0.0, rngs=nnx.Rngs(1), copies=3)
  single = fusion_lib.MultiHeadAttention(8, 2, dropout=0.0, rngs=nnx.Rngs(2))
  queries = jnp.asarray(rng.normal(size=(3, 4, 1, 8)), jnp.float32)
  keys = jnp.asarray(rng.normal(size=(3, 4, 2, 8)), jnp.float32)
  mask = jnp.asarray(rng.random((3, 4, 2)) > 0.3)
  out = stacked(queries, keys, mask, train=False)
  norm = fusion_lib.StackedLayerNorm(3, 8)
  norm.scale[...] = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
  norm.bias[...] = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
  normed = norm(keys)
  plain_norm = nnx.LayerNorm(8, epsilon=1e-5, rngs=nnx.Rngs(0))
  for copy in range(3):
    for name in ('query', 'key', 'value', 'out'):
      getattr(single, name).kernel[...] = getattr(stacked, name).kernel[copy]
      getattr(single, name).bias[...] = getattr(stacked, name).bias[copy]
    np.testing.assert_allclose(out[copy], single(queries[copy], keys[copy], mask[copy],
                                                 train=False), rtol=1e-5, atol=1e-6)
    plain_norm.scale[...], plain_norm.bias[...] = norm.scale[copy], norm.bias[copy]
    np.testing.assert_allclose(normed[copy], plain_norm(keys[copy]), rtol=1e-5, atol=1e-5)


def test_param_groups_follow_the_authors_optimizer_groups():
  model = build_fusion(tiny_config(use_moe=True))
  groups = {}
  for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    groups.setdefault(models.param_group(path), set()).add(str(path[0]))
  assert groups == {
      'proj': {'projections'}, 'transformer': {'transformer'},
      'classifiers': {'classifiers'},
      'other': {'feature_gates', 'aligners', 'fusion_gate', 'information_gates',
                'context_gates', 'cross_attention', 'pool_queries', 'pool', 'integrator',
                'aux_classifiers', 'loss_log_vars', 'skip'}}
  key_paths = [path for path, _ in
               jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]]
  assert {models.param_group(path) for path in key_paths} == set(models.PARAM_GROUPS)
  assert models.param_group('model/transformer/0/attention/query/kernel') == 'transformer'
  assert models.param_group(('aux_classifiers', 'out', 'kernel')) == 'other'


def test_jitted_pure_function_compiles_once():
  model = build_fusion()
  start = len(TRACES)
  rng_counts = []
  logits = []
  for seed in (0, 1, 1):
    logits.append(run(model, *batch(seed=seed), train=True)['logits'])
    rng_counts.append(int(model.pool.dropout.rngs.count[...]))
  assert len(TRACES) - start <= 1  # 0 when an earlier test compiled the same model
  assert rng_counts == sorted(set(rng_counts))  # the dropout stream advances each step
  assert not np.allclose(logits[1], logits[2])  # so the same batch gets new masks


def test_logical_sharding_uses_each_mesh_axis_once():
  config = tiny_config(use_moe=True)
  model = build_fusion(config)
  mesh = jax.make_mesh((1, 1), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  shardings = models.logical_sharding(nnx.state(model), mesh, config.mesh.rules)
  expert = shardings['projections']['t']['kernel'].get_value()
  assert expert.spec == jax.sharding.PartitionSpec('model', None, None)
  router = shardings['projections']['t']['router_hidden']['kernel'].get_value()
  assert router.spec == jax.sharding.PartitionSpec(None, 'model')
  assert shardings['loss_log_vars'].get_value().spec == jax.sharding.PartitionSpec()


def test_factory_rejects_bad_arguments():
  config = tiny_config()
  with pytest.raises(ValueError, match='Unknown model stage'):
    models.build_model('speaker', config, in_dims=DIMS, num_classes=7, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\['v'\]"):
    models.build_model('fusion', config, in_dims={'t': 4, 'a': 4}, num_classes=7,
                       rngs=nnx.Rngs(0))
  config.model.fusion.alignment_scope = 'corpus'
  with pytest.raises(ValueError, match='alignment_scope'):
    build_fusion(config)
  assert models.representation_dim('fusion', config) == 16
  assert models.representation_dim('visual', config) == 256


def test_linear_skip_starts_at_zero_and_adds_each_present_modality_linearly():
  inputs, present, graph_ids, node_mask = batch(seed=3)
  without = build_fusion(tiny_config(linear_skip=False))
  model = build_fusion(tiny_config(linear_skip=True))
  base = run(without, inputs, present, graph_ids, node_mask)['logits']
  # Zero-initialised: the same logits as the model without the skip (same other parameters).
  np.testing.assert_allclose(run(model, inputs, present, graph_ids, node_mask)['logits'], base,
                             rtol=1e-6, atol=1e-6)
  rng = np.random.default_rng(4)
  kernels = {m: rng.normal(size=(d, 7)).astype(np.float32) for m, d in DIMS.items()}
  for m, kernel in kernels.items():
    model.skip[m].kernel[...] = jnp.asarray(kernel)
  # Absent modalities' inputs are made large and nonzero: they must not reach the logits.
  noisy = {m: np.where(np.asarray(present[m])[:, None], np.asarray(inputs[m]), 100.0)
           for m in DIMS}
  logits = run(model, jax.tree.map(jnp.asarray, noisy), present, graph_ids, node_mask)['logits']
  want = np.asarray(base) + sum(
      np.asarray(present[m] & node_mask)[:, None] * (np.asarray(inputs[m]) @ kernels[m])
      for m in DIMS)
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
