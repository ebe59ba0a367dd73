"""Graph teacher/students: shapes, dialogue scope, masked batch norm, one compilation."""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from configs import default
from mer_jax import models
from mer_jax.models import encoders

pytestmark = pytest.mark.slow

DIMS = {'t': 12, 'a': 10, 'v': 8}
STAGE_MODALITY = {'teacher': 't', 'audio': 'a', 'visual': 'v'}


def tiny_config():
  """Tiny widths; no input feature drop (tested alone) so batch statistics are exact."""
  config = default.base_config()
  config.model.teacher.hidden = 8
  config.model.teacher.heads = 2
  config.model.audio.hidden = 8
  config.model.visual.layers = ((4, 2, True), (8, 2, True), (6, 1, False))
  config.graph.k = {'t': 3, 'a': 2, 'v': 2}
  config.graph.speaker_edges = True
  for name in ('teacher', 'audio', 'visual'):
    config.model[name].input_dropout = 0.0
  return config


def dialogue(rng, n, absent=()):
  """A dialogue GraphsTuple with the batch contract's node fields and edges."""
  present = {m: np.ones(n, bool) for m in DIMS}
  for m, i in absent:
    present[m][i] = False
  features = {m: rng.normal(size=(n, d)).astype(np.float32) * present[m][:, None]
              for m, d in DIMS.items()}
  senders, receivers = [], []
  for i in range(n - 1):
    senders += [i, i + 1]
    receivers += [i + 1, i]
  speakers = rng.integers(0, 2, n)
  kinds = [0] * len(senders)
  for i in range(n):
    earlier = [j for j in range(i) if speakers[j] == speakers[i]]
    if earlier:
      senders += [i, earlier[-1]]
      receivers += [earlier[-1], i]
      kinds += [1, 1]
  nodes = dict(features=features, present=present, mask=np.ones(n, bool),
               label=np.zeros(n, np.int32), speaker=speakers.astype(np.int32),
               position=np.arange(n, dtype=np.int32))
  return jraph.GraphsTuple(
      nodes=nodes, edges={'kind': np.asarray(kinds, np.int32)},
      senders=np.asarray(senders, np.int32), receivers=np.asarray(receivers, np.int32),
      n_node=np.array([n]), n_edge=np.array([len(senders)]),
      globals={'record': np.array([0], np.int32)})


def pad(dialogues, num_nodes, num_edges, num_graphs):
  batch = jraph.pad_with_graphs(jraph.batch_np(dialogues), num_nodes, num_edges, num_graphs)
  kind = np.asarray(batch.edges['kind']).copy()
  kind[sum(int(d.n_edge[0]) for d in dialogues):] = -1
  return jax.tree.map(jnp.asarray, batch._replace(edges={'kind': kind}))


def build(stage, config=None, seed=0):
  return models.build_model(stage, config or tiny_config(), in_dims=DIMS, num_classes=7,
                            rngs=nnx.Rngs(seed))


TRACES = []


@functools.partial(jax.jit, static_argnums=(0, 2, 4))
def _apply(graphdef, state, modality, batch, train):
  """The model as a pure function of its state, compiled whole (and cached across tests)."""
  TRACES.append(train)
  model = nnx.merge(graphdef, state)
  outputs = model(batch.nodes['features'][modality], batch, train=train)
  return outputs, nnx.state(model)


def run(model, stage, batch, train):
  """model(...) through `_apply`; eager op-by-op dispatch is slow for tests."""
  graphdef, state = nnx.split(model)
  outputs, state = _apply(graphdef, state, STAGE_MODALITY[stage], batch, train)
  nnx.update(model, state)
  return outputs


@pytest.mark.parametrize('stage', ['teacher', 'audio', 'visual'])
def test_shapes_widths_and_absent_nodes(stage):
  rng = np.random.default_rng(0)
  batch = pad([dialogue(rng, 5, absent=[('t', 1), ('a', 2), ('v', 3)]), dialogue(rng, 4)],
              12, 40, 3)
  model = build(stage)
  for train in (True, False):
    logits, representation = run(model, stage, batch, train)
    assert logits.shape == (12, 7)
    assert representation.shape == (12, models.representation_dim(stage, tiny_config()))
    assert np.isfinite(logits).all() and np.isfinite(representation).all()


@pytest.mark.parametrize('stage', ['teacher', 'audio', 'visual'])
def test_dialogue_outputs_do_not_depend_on_batch_mates(stage):
  rng = np.random.default_rng(1)
  target = dialogue(rng, 5, absent=[('t', 4), ('a', 0), ('v', 2)])
  others = [dialogue(rng, 6), dialogue(rng, 3)]
  model = build(stage)
  norm = model.input_stage.batch_norm.norm
  norm.mean[...] = jnp.asarray(rng.normal(size=norm.mean.shape), jnp.float32)
  norm.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, norm.var.shape), jnp.float32)
  alone = run(model, stage, pad([target], 12, 40, 3), train=False)
  # The same dialogue placed after two others, with more padding slots.
  crowded = run(model, stage, pad(others + [target], 24, 64, 5), train=False)
  for got_alone, got_crowded in zip(alone, crowded):
    np.testing.assert_allclose(got_alone[:5], got_crowded[9:14], rtol=1e-5, atol=1e-5)


def with_features(batch, modality, rows, values):
  features = dict(batch.nodes['features'])
  features[modality] = features[modality].at[rows].set(values)
  return batch._replace(nodes={**batch.nodes, 'features': features})


@pytest.mark.parametrize('stage', ['teacher', 'audio', 'visual'])
def test_batch_norm_and_present_nodes_ignore_padding_and_absent_features(stage):
  m = STAGE_MODALITY[stage]
  rng = np.random.default_rng(2)
  batch = pad([dialogue(rng, 5, absent=[(m, 1)]), dialogue(rng, 4, absent=[(m, 3)])],
              12, 40, 3)
  valid = np.asarray(batch.nodes['mask'] & batch.nodes['present'][m])
  noisy = with_features(batch, m, np.flatnonzero(~valid), 100.0)

  outputs = []
  for b in (batch, noisy):
    model = build(stage)  # same seed: same dropout masks for both batches
    outputs.append(run(model, stage, b, train=True))
    norm = model.input_stage.batch_norm.norm
    x = np.asarray(batch.nodes['features'][m])[valid]
    momentum = 0.9
    np.testing.assert_allclose(norm.mean[...], (1 - momentum) * x.mean(0), atol=1e-6)
    np.testing.assert_allclose(norm.var[...], momentum + (1 - momentum) * x.var(0),
                               rtol=1e-5, atol=1e-6)
  for clean, dirty in zip(*outputs):
    np.testing.assert_allclose(np.asarray(clean)[valid], np.asarray(dirty)[valid],
                               rtol=1e-5, atol=1e-5)


def test_residual_projections_follow_the_authors_layout():
  config = tiny_config()
  config.model.teacher.hidden = 6  # input 12 == 6 * 2 heads: layer 1 still projects
  projected = lambda model: [block.residual is not None for block in model.blocks]
  assert projected(build('teacher', config)) == [True, False, True, False]
  assert projected(build('visual', config)) == [True, True, True]
  assert projected(build('audio', config)) == [True, False, False]


def test_batch_with_modality_absent_everywhere_keeps_statistics():
  rng = np.random.default_rng(3)
  batch = pad([dialogue(rng, 4, absent=[('v', i) for i in range(4)])], 12, 40, 3)
  model = build('visual')
  logits, representation = run(model, 'visual', batch, train=True)
  norm = model.input_stage.batch_norm.norm
  np.testing.assert_array_equal(norm.mean[...], np.zeros(DIMS['v']))
  np.testing.assert_array_equal(norm.var[...], np.ones(DIMS['v']))
  assert np.isfinite(logits).all() and np.isfinite(representation).all()


def test_feature_drop_zeroes_without_rescaling():
  drop = encoders.FeatureDrop(0.3, rngs=nnx.Rngs(0))
  x = jnp.full((400, 25), 2.5)
  dropped = np.asarray(drop(x, train=True))
  assert set(np.unique(dropped)) == {0.0, 2.5}
  assert abs((dropped == 0).mean() - 0.3) < 0.02
  np.testing.assert_array_equal(drop(x, train=False), x)
  with pytest.raises(ValueError, match='input_dropout'):
    encoders.FeatureDrop(1.0, rngs=nnx.Rngs(0))


def test_edge_weight_mode_none_builds_plain_attention():
  config = tiny_config()
  config.graph.gat_edge_weights = 'none'
  paths = [path for path, _ in nnx.to_flat_state(nnx.state(build('teacher', config)))]
  assert not any('edge_scale' in path for path in paths)
  paths = [path for path, _ in nnx.to_flat_state(nnx.state(build('teacher')))]
  assert sum('edge_scale' in path for path in paths) == 4


def test_jitted_pure_step_compiles_once_and_threads_state():
  rng = np.random.default_rng(5)
  model = build('teacher')
  norm = model.input_stage.batch_norm.norm
  start = len(TRACES)
  means, outputs = [np.asarray(norm.mean[...])], []
  batches = [pad([dialogue(rng, 5), dialogue(rng, 3)], 12, 40, 3) for _ in range(3)]
  for batch in batches:
    outputs.append(run(model, 'teacher', batch, train=True)[0])
    means.append(np.asarray(norm.mean[...]))
  assert len(TRACES) - start <= 1  # 0 when an earlier test compiled the same model
  assert all(not np.allclose(a, b) for a, b in zip(means, means[1:]))
  # Same batch again: the dropout stream has advanced, so the masks differ.
  again = run(model, 'teacher', batches[-1], train=True)[0]
  assert not np.allclose(again, outputs[-1])


def build_with_message_passing(stage, message_passing):
  """`build(stage)` with the given edge form (the same graphdef as `build` for 'dense')."""
  config = tiny_config()
  common = dict(edge_spec=models.edge_spec(config, STAGE_MODALITY[stage]),
                dropout=config.model[stage].dropout, input_dropout=0.0,
                message_passing=message_passing, rngs=nnx.Rngs(0))
  if stage == 'teacher':
    return encoders.TextGraphTeacher(DIMS['t'], 7, hidden=8, heads=2, **common)
  if stage == 'audio':
    return encoders.AudioGraphStudent(DIMS['a'], 7, hidden=8, **common)
  return encoders.VisualGraphStudent(DIMS['v'], 7, layers=config.model.visual.layers,
                                     **common)


@pytest.mark.parametrize('stage', ['teacher', 'audio'])  # visual: the teacher's layer type
def test_dense_and_segment_message_passing_agree(stage):
  """Same parameters, dropout masks and outputs; layer gradients are compared in test_graph."""
  assert build_with_message_passing(stage, 'dense').input_stage.message_passing == 'dense'
  assert build(stage).input_stage.message_passing == 'dense'  # the default
  m = STAGE_MODALITY[stage]
  rng = np.random.default_rng(6)
  batch = pad([dialogue(rng, 5, absent=[(m, 1)]), dialogue(rng, 4, absent=[(m, 0)])],
              12, 40, 3)
  segment, dense = (
      run(build_with_message_passing(stage, message_passing), stage, batch, train=True)
      for message_passing in ('segment', 'dense'))
  for a, b in zip(dense, segment):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_unknown_message_passing_is_rejected():
  with pytest.raises(ValueError, match="message_passing must be one of .* got 'sparse'"):
    build_with_message_passing('audio', 'sparse')


def logits_with_random_skip(model, batch, rng):
  """Gives the teacher's linear skip a random kernel; returns (eval logits, that kernel)."""
  kernel = rng.normal(size=(DIMS['t'], 7)).astype(np.float32)
  model.skip.kernel[...] = jnp.asarray(kernel)
  logits, _ = run(model, 'teacher', batch, False)
  return logits, kernel


def test_teacher_linear_skip_starts_at_zero_and_adds_a_probe_of_the_normalised_input():
  rng = np.random.default_rng(3)
  batch = pad([dialogue(rng, 5), dialogue(rng, 4)], 12, 40, 3)
  config = tiny_config()
  base, _ = run(build('teacher', config), 'teacher', batch, False)
  config.model.teacher.linear_skip = True
  model = build('teacher', config)
  logits, _ = run(model, 'teacher', batch, False)
  np.testing.assert_allclose(logits, base, rtol=1e-6, atol=1e-6)
  logits, kernel = logits_with_random_skip(model, batch, rng)
  # Evaluation batch norm with its initial statistics (mean 0, variance 1): x / sqrt(1 + eps).
  x = np.asarray(batch.nodes['features']['t']) / np.sqrt(1.0 + 1e-5)
  np.testing.assert_allclose(logits, np.asarray(base) + x @ kernel, rtol=1e-4, atol=1e-4)


def test_teacher_without_input_batchnorm_reads_the_features_as_stored():
  rng = np.random.default_rng(4)
  batch = pad([dialogue(rng, 5), dialogue(rng, 4)], 12, 40, 3)
  config = tiny_config()
  config.model.teacher.input_batchnorm = False
  config.model.teacher.linear_skip = True
  model = build('teacher', config)
  assert not jax.tree.leaves(nnx.state(model, nnx.BatchStat))
  base, _ = run(model, 'teacher', batch, False)
  logits, kernel = logits_with_random_skip(model, batch, rng)
  x = np.asarray(batch.nodes['features']['t'])
  np.testing.assert_allclose(logits, np.asarray(base) + x @ kernel, rtol=1e-4, atol=1e-4)
