"""Edge construction and graph layers against brute-force numpy references."""

from flax import nnx
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from mer_jax.models import graph as graph_lib

pytestmark = pytest.mark.slow


def dialogue_graph(features, present, speakers):
  """One dialogue as a GraphsTuple: temporal edges both ways, same-speaker edges both ways."""
  n = len(speakers)
  senders, receivers, kind = [], [], []
  for i in range(n - 1):
    senders += [i, i + 1]
    receivers += [i + 1, i]
    kind += [0, 0]
  last_turn = {}
  for i, speaker in enumerate(speakers):
    if speaker in last_turn:
      j = last_turn[speaker]
      senders += [i, j]
      receivers += [j, i]
      kind += [1, 1]
    last_turn[speaker] = i
  nodes = dict(features=np.asarray(features, np.float32), present=np.asarray(present),
               mask=np.ones(n, bool), speaker=np.asarray(speakers, np.int32))
  return jraph.GraphsTuple(
      nodes=nodes, edges={'kind': np.asarray(kind, np.int32).reshape(-1)},
      senders=np.asarray(senders, np.int32).reshape(-1),
      receivers=np.asarray(receivers, np.int32).reshape(-1),
      n_node=np.array([n]), n_edge=np.array([len(senders)]), globals=None)


def padded_batch(dialogues, num_nodes, num_edges, num_graphs):
  batch = jraph.pad_with_graphs(jraph.batch_np(dialogues), num_nodes, num_edges, num_graphs)
  kind = np.asarray(batch.edges['kind']).copy()
  kind[sum(int(d.n_edge[0]) for d in dialogues):] = -1  # jraph pads with zeros
  return batch._replace(edges={'kind': kind})


def random_batch(seed=0, dim=5):
  rng = np.random.default_rng(seed)
  lengths = (6, 2, 5)
  dialogues = []
  for n in lengths:
    present = rng.random(n) > 0.2
    features = rng.normal(size=(n, dim)) * present[:, None]
    dialogues.append(dialogue_graph(features, present, rng.integers(0, 2, n)))
  return padded_batch(dialogues, num_nodes=16, num_edges=40, num_graphs=4)


def reference_edges(x, batch, k, temporal_weight, speaker_weight, speaker_edges,
                    self_loops):
  """{(sender, receiver): weight} by brute force over Python loops."""
  x = np.asarray(x, np.float64)
  node_mask = np.asarray(batch.nodes['mask'])
  candidate = node_mask & np.asarray(batch.nodes['present'])
  graph_ids = np.repeat(np.arange(len(batch.n_node)), batch.n_node)
  unit = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)
  similarity = unit @ unit.T
  structural = {}
  for s, r, kind in zip(batch.senders, batch.receivers, batch.edges['kind']):
    if kind == 0 or (kind == 1 and speaker_edges):
      if candidate[s] and node_mask[r]:
        weight = temporal_weight if kind == 0 else speaker_weight
        structural[(s, r)] = structural.get((s, r), 0.0) + weight
  edges = {}
  for r in range(len(x)):
    if not candidate[r]:
      continue
    options = [s for s in range(len(x))
               if s != r and candidate[s] and graph_ids[s] == graph_ids[r]]
    for s in sorted(options, key=lambda s: -similarity[r, s])[:k]:
      edges[(s, r)] = similarity[r, s] + structural.get((s, r), 0.0)
  for pair, weight in structural.items():
    edges.setdefault(pair, weight)
  if self_loops:
    for i in np.flatnonzero(node_mask):
      edges[(i, i)] = 1.0
  return edges


def as_dict(edges):
  mask = np.asarray(edges.mask)
  pairs = list(zip(np.asarray(edges.senders)[mask], np.asarray(edges.receivers)[mask]))
  assert len(pairs) == len(set(pairs)), 'duplicate valid edges'
  return dict(zip(pairs, np.asarray(edges.weights)[mask]))


def build(batch, **kwargs):
  x = jnp.asarray(batch.nodes['features'])
  candidate = jnp.asarray(batch.nodes['present'] & batch.nodes['mask'])
  return graph_lib.build_modality_edges(x, jax.tree.map(jnp.asarray, batch),
                                        candidate_mask=candidate, **kwargs)


def test_node_graph_ids_follow_n_node():
  batch = random_batch()
  np.testing.assert_array_equal(
      graph_lib.node_graph_ids(batch),
      [0] * 6 + [1] * 2 + [2] * 5 + [3] * 3)


@pytest.mark.parametrize('k', [1, 3, 20])
@pytest.mark.parametrize('speaker_edges', [False, True])
@pytest.mark.parametrize('self_loops', [False, True])
def test_edges_match_brute_force_reference(k, speaker_edges, self_loops):
  batch = random_batch(seed=k)
  options = dict(k=k, temporal_weight=1.65, speaker_weight=0.4,
                 speaker_edges=speaker_edges, self_loops=self_loops)
  edges = build(batch, **options)
  expected = reference_edges(batch.nodes['features'], batch, **options)
  got = as_dict(edges)
  assert set(got) == set(expected)
  for pair, weight in expected.items():
    np.testing.assert_allclose(got[pair], weight, rtol=1e-5, atol=1e-6)
  num_nodes, num_edges = 16, 40
  assert edges.senders.shape == (num_nodes * min(k, num_nodes - 1) + num_edges
                                 + num_nodes * self_loops,)


def test_edges_stay_inside_graphs_and_off_padding():
  batch = random_batch(seed=3)
  edges = build(batch, k=4, temporal_weight=1.0, speaker_weight=1.0, speaker_edges=True,
                self_loops=True)
  mask = np.asarray(edges.mask)
  graph_ids = np.asarray(graph_lib.node_graph_ids(batch))
  senders, receivers = np.asarray(edges.senders), np.asarray(edges.receivers)
  np.testing.assert_array_equal(graph_ids[senders[mask]], graph_ids[receivers[mask]])
  real = np.asarray(batch.nodes['mask'])
  assert real[senders[mask]].all() and real[receivers[mask]].all()
  # Masked edges are parked on the last (padding) slot with zero weight.
  assert (senders[~mask] == 15).all() and (receivers[~mask] == 15).all()
  assert (np.asarray(edges.weights)[~mask] == 0).all()
  # Absent-modality nodes send nothing but still receive (self loop, structural edges).
  absent = real & ~np.asarray(batch.nodes['present'])
  assert absent.any()
  non_self = mask & (senders != receivers)
  assert not absent[senders[non_self]].any()


def test_temporal_edges_are_boosted_and_deduplicated_by_hand():
  features = [[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]
  batch = padded_batch([dialogue_graph(features, [True] * 3, [0, 1, 2])],
                       num_nodes=4, num_edges=6, num_graphs=2)
  tw = 0.5
  edges = as_dict(build(batch, k=1, temporal_weight=tw, speaker_weight=9.0))
  s01 = 1.0 / np.sqrt(1.01)
  s12 = 0.1 / np.sqrt(1.01)
  # kNN (sender -> receiver): 1->0, 0->1, 1->2, all temporal pairs, so boosted by tw; the
  # temporal edge 2->1 is no kNN edge and comes in alone with weight tw.
  expected = {(1, 0): s01 + tw, (0, 1): s01 + tw, (1, 2): s12 + tw, (2, 1): tw}
  assert set(edges) == set(expected)
  for pair, weight in expected.items():
    np.testing.assert_allclose(edges[pair], weight, rtol=1e-6)


def test_edge_builder_compiles_once():
  traces = []

  @jax.jit
  def edges_of(batch):
    traces.append(1)
    return build(batch, k=3, temporal_weight=1.0, speaker_weight=1.0)

  for seed in range(3):
    edges_of(jax.tree.map(jnp.asarray, random_batch(seed)))
  assert len(traces) == 1


def explicit_edges(rng, num_nodes=6, num_valid=12, num_masked=5):
  senders = rng.integers(0, num_nodes - 1, num_valid)
  receivers = rng.integers(0, num_nodes - 1, num_valid)
  loops = np.arange(num_nodes - 1)
  senders = np.concatenate([senders, loops, rng.integers(0, num_nodes, num_masked)])
  receivers = np.concatenate([receivers, loops, rng.integers(0, num_nodes, num_masked)])
  weights = rng.uniform(0.1, 2.0, senders.shape)
  mask = np.arange(senders.shape[0]) < num_valid + num_nodes - 1
  return graph_lib.GraphEdges(jnp.asarray(senders, jnp.int32),
                              jnp.asarray(receivers, jnp.int32),
                              jnp.asarray(weights, jnp.float32), jnp.asarray(mask))


def reference_attention(x, edges, kernel, attend_s, attend_r, bias, heads, features,
                        concat, edge_scale):
  h = (x @ kernel).reshape(len(x), heads, features)
  out = np.zeros((len(x), heads, features))
  senders, receivers = np.asarray(edges.senders), np.asarray(edges.receivers)
  weights, mask = np.asarray(edges.weights), np.asarray(edges.mask)
  for i in range(len(x)):
    incoming = [e for e in range(len(senders)) if mask[e] and receivers[e] == i]
    if not incoming:
      continue
    for head in range(heads):
      logits = []
      for e in incoming:
        raw = h[senders[e], head] @ attend_s[head] + h[i, head] @ attend_r[head]
        logit = raw if raw > 0 else 0.2 * raw
        if edge_scale is not None:
          logit += edge_scale[head] * weights[e]
        logits.append(logit)
      alpha = np.exp(np.array(logits) - max(logits))
      alpha /= alpha.sum()
      out[i, head] = sum(a * h[senders[e], head] for a, e in zip(alpha, incoming))
  out = out.reshape(len(x), -1) if concat else out.mean(axis=1)
  return out + bias


@pytest.mark.parametrize('edge_weights', ['bias', 'none'])
@pytest.mark.parametrize('concat', [True, False])
def test_graph_attention_matches_dense_reference(edge_weights, concat):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(6, 4)).astype(np.float32)
  edges = explicit_edges(rng)
  layer = graph_lib.GraphAttention(4, 3, 2, concat=concat, edge_weights=edge_weights,
                                   rngs=nnx.Rngs(0))
  edge_scale = None
  if edge_weights == 'bias':
    edge_scale = np.array([0.7, -1.3], np.float32)
    layer.edge_scale[...] = jnp.asarray(edge_scale)
  else:
    assert not hasattr(layer, 'edge_scale')
  layer.bias[...] = jnp.asarray(rng.normal(size=layer.bias.shape), jnp.float32)
  got = layer(jnp.asarray(x), edges)
  expected = reference_attention(
      x, edges, np.asarray(layer.projection.kernel[...]),
      np.asarray(layer.attend_sender[...]), np.asarray(layer.attend_receiver[...]),
      np.asarray(layer.bias[...]), 2, 3, concat, edge_scale)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)

  # Masked edges contribute nothing, wherever they point and whatever their weight.
  mask = np.asarray(edges.mask)
  moved = edges._replace(
      senders=jnp.where(edges.mask, edges.senders, 2),
      receivers=jnp.where(edges.mask, edges.receivers, 0),
      weights=jnp.where(edges.mask, edges.weights, 50.0))
  assert not mask.all()
  np.testing.assert_allclose(layer(jnp.asarray(x), moved), got, rtol=1e-6, atol=1e-6)


def test_graph_attention_edge_bias_changes_attention():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  edges = explicit_edges(rng)
  layer = graph_lib.GraphAttention(4, 3, 2, concat=True, rngs=nnx.Rngs(0))
  heavier = edges._replace(weights=edges.weights * 3.0)
  assert not np.allclose(layer(x, edges), layer(x, heavier))


def test_graph_attention_rejects_unknown_edge_weight_mode():
  with pytest.raises(ValueError, match='graph.gat_edge_weights'):
    graph_lib.GraphAttention(4, 3, 2, concat=True, edge_weights='mean', rngs=nnx.Rngs(0))


def test_graph_convolution_matches_numpy():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(6, 4)).astype(np.float32)
  edges = explicit_edges(rng)
  layer = graph_lib.GraphConvolution(4, 5, rngs=nnx.Rngs(0))
  layer.bias[...] = jnp.asarray(rng.normal(size=5), jnp.float32)
  aggregated = np.zeros_like(x)
  for s, r, w, valid in zip(*(np.asarray(a) for a in edges)):
    if valid:
      aggregated[r] += w * x[s]
  expected = (x @ np.asarray(layer.root.kernel[...])
              + aggregated @ np.asarray(layer.neighbour.kernel[...])
              + np.asarray(layer.bias[...]))
  np.testing.assert_allclose(layer(jnp.asarray(x), edges), expected, rtol=1e-5, atol=1e-5)


def dense_of(edges, num_nodes):
  """{(sender, receiver): weight} of a DenseGraph (stored [receiver, sender])."""
  mask = np.asarray(edges.mask)
  receivers, senders = np.nonzero(mask)
  return dict(zip(zip(senders, receivers), np.asarray(edges.weights)[mask]))


@pytest.mark.parametrize('k', [1, 3, 20])
@pytest.mark.parametrize('speaker_edges', [False, True])
@pytest.mark.parametrize('self_loops', [False, True])
def test_adjacency_matches_edge_list_and_reference(k, speaker_edges, self_loops):
  batch = random_batch(seed=10 + k)
  options = dict(k=k, temporal_weight=1.65, speaker_weight=0.4,
                 speaker_edges=speaker_edges, self_loops=self_loops)
  x = jnp.asarray(batch.nodes['features'])
  candidate = jnp.asarray(batch.nodes['present'] & batch.nodes['mask'])
  adjacency = graph_lib.build_modality_adjacency(
      x, jax.tree.map(jnp.asarray, batch), candidate_mask=candidate, **options)
  assert adjacency.weights.shape == adjacency.mask.shape == (16, 16)
  from_list = graph_lib.dense_adjacency(build(batch, **options), 16)
  np.testing.assert_array_equal(adjacency.mask, from_list.mask)
  np.testing.assert_array_equal(adjacency.weights, from_list.weights)
  expected = reference_edges(batch.nodes['features'], batch, **options)
  got = dense_of(adjacency, 16)
  assert set(got) == set(expected)
  for pair, weight in expected.items():
    np.testing.assert_allclose(got[pair], weight, rtol=1e-5, atol=1e-6)
  # Padding rows and columns stay empty; absent-modality nodes send only their self loop.
  padding = ~np.asarray(batch.nodes['mask'])
  mask = np.asarray(adjacency.mask)
  assert not mask[padding].any() and not mask[:, padding].any()
  absent = ~padding & ~np.asarray(batch.nodes['present'])
  assert absent.any()
  assert not (mask & ~np.eye(16, dtype=bool))[:, absent].any()


def test_adjacency_rejects_bad_budgets():
  batch = jax.tree.map(jnp.asarray, random_batch())
  x = jnp.asarray(batch.nodes['features'])
  with pytest.raises(ValueError, match='build_modality_adjacency: k must be >= 1'):
    graph_lib.build_modality_adjacency(x, batch, k=0, temporal_weight=1.0,
                                       speaker_weight=1.0, candidate_mask=batch.nodes['mask'])


def test_dense_adjacency_sums_duplicates_and_drops_masked_edges():
  edges = graph_lib.GraphEdges(
      senders=jnp.array([0, 0, 2, 1, 3, 0], jnp.int32),
      receivers=jnp.array([1, 1, 2, 0, 3, 1], jnp.int32),
      weights=jnp.array([0.5, 0.25, 1.0, -2.0, 7.0, 9.0], jnp.float32),
      mask=jnp.array([True, True, True, True, False, False]))
  adjacency = graph_lib.dense_adjacency(edges, 4)
  expected = np.zeros((4, 4), np.float32)  # [receiver, sender]
  expected[1, 0] = 0.75
  expected[2, 2] = 1.0
  expected[0, 1] = -2.0
  np.testing.assert_array_equal(adjacency.weights, expected)
  np.testing.assert_array_equal(adjacency.mask, expected != 0)


def unique_edges(edges):
  """The edge list with each valid ordered pair once, weights summed; masked edges kept."""
  merged = {}
  for s, r, w, valid in zip(*(np.asarray(a) for a in edges)):
    if valid:
      merged[(s, r)] = merged.get((s, r), 0.0) + w
  masked = ~np.asarray(edges.mask)
  senders = [s for s, _ in merged] + list(np.asarray(edges.senders)[masked])
  receivers = [r for _, r in merged] + list(np.asarray(edges.receivers)[masked])
  weights = list(merged.values()) + list(np.asarray(edges.weights)[masked])
  mask = [True] * len(merged) + [False] * int(masked.sum())
  return graph_lib.GraphEdges(jnp.asarray(senders, jnp.int32), jnp.asarray(receivers, jnp.int32),
                              jnp.asarray(weights, jnp.float32), jnp.asarray(mask))


def attention_layer(edge_weights, concat, seed=0):
  layer = graph_lib.GraphAttention(4, 3, 2, concat=concat, edge_weights=edge_weights,
                                   rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  if edge_weights == 'bias':
    layer.edge_scale[...] = jnp.asarray([0.7, -1.3], jnp.float32)
  layer.bias[...] = jnp.asarray(rng.normal(size=layer.bias.shape), jnp.float32)
  return layer


def value_and_grads(layer, x, edges):
  """Output and d(sum(out * probe))/d(params, x): checks the backward pass too."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  probe = jnp.cos(jnp.arange(layer.output_width * x.shape[0], dtype=jnp.float32)).reshape(
      x.shape[0], -1)

  def loss(params, x):
    out = nnx.merge(graphdef, params, rest)(x, edges)
    return jnp.sum(out * probe), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  return out, grads


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize('edge_weights', ['bias', 'none'])
@pytest.mark.parametrize('concat', [True, False])
def test_graph_attention_dense_matches_segment_and_reference(edge_weights, concat):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  edges = unique_edges(explicit_edges(rng))  # masked edges kept, pointing anywhere
  layer = attention_layer(edge_weights, concat)
  segment, segment_grads = value_and_grads(layer, x, edges)
  dense, dense_grads = value_and_grads(layer, x, graph_lib.dense_adjacency(edges, 6))
  np.testing.assert_allclose(dense, segment, rtol=1e-5, atol=1e-6)
  assert_trees_close(dense_grads, segment_grads)
  expected = reference_attention(
      np.asarray(x), edges, np.asarray(layer.projection.kernel[...]),
      np.asarray(layer.attend_sender[...]), np.asarray(layer.attend_receiver[...]),
      np.asarray(layer.bias[...]), 2, 3, concat,
      np.asarray(layer.edge_scale[...]) if edge_weights == 'bias' else None)
  np.testing.assert_allclose(dense, expected, rtol=1e-4, atol=1e-5)
  # Node 5 has no valid incoming edge: only the bias.
  assert not np.asarray(edges.mask & (edges.receivers == 5)).any()
  np.testing.assert_allclose(dense[5], layer.bias[...], rtol=1e-6)


def test_graph_attention_dense_merges_duplicate_edges_into_one():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  edges = explicit_edges(rng)
  pairs = list(zip(np.asarray(edges.senders)[np.asarray(edges.mask)],
                   np.asarray(edges.receivers)[np.asarray(edges.mask)]))
  assert len(pairs) > len(set(pairs))  # the draw has duplicate pairs
  layer = attention_layer('bias', True)
  np.testing.assert_allclose(layer(x, graph_lib.dense_adjacency(edges, 6)),
                             layer(x, unique_edges(edges)), rtol=1e-5, atol=1e-6)


def test_graph_convolution_dense_matches_segment_with_duplicates():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  edges = explicit_edges(rng)  # duplicate pairs and masked edges with nonzero weights
  layer = graph_lib.GraphConvolution(4, 5, rngs=nnx.Rngs(0))
  layer.bias[...] = jnp.asarray(rng.normal(size=5), jnp.float32)
  segment, segment_grads = value_and_grads(layer, x, edges)
  dense, dense_grads = value_and_grads(layer, x, graph_lib.dense_adjacency(edges, 6))
  np.testing.assert_allclose(dense, segment, rtol=1e-5, atol=1e-5)
  assert_trees_close(dense_grads, segment_grads)
  # Masked entries of a DenseGraph are ignored whatever weight they hold.
  adjacency = graph_lib.dense_adjacency(edges, 6)
  noisy = adjacency._replace(weights=jnp.where(adjacency.mask, adjacency.weights, 50.0))
  np.testing.assert_allclose(layer(x, noisy), dense, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('edge_weights', ['bias', 'none'])
def test_layers_agree_on_built_edges_with_padding_and_absent_nodes(edge_weights):
  batch = random_batch(seed=7, dim=4)
  x = jnp.asarray(batch.nodes['features'])
  candidate = jnp.asarray(batch.nodes['present'] & batch.nodes['mask'])
  options = dict(k=3, temporal_weight=1.65, speaker_weight=0.4, speaker_edges=True,
                 candidate_mask=candidate)
  graph = jax.tree.map(jnp.asarray, batch)
  attention = attention_layer(edge_weights, False)
  conv = graph_lib.GraphConvolution(4, 5, rngs=nnx.Rngs(1))
  for layer, self_loops in ((attention, True), (conv, False)):
    edges = graph_lib.build_modality_edges(x, graph, self_loops=self_loops, **options)
    adjacency = graph_lib.build_modality_adjacency(x, graph, self_loops=self_loops, **options)
    segment, segment_grads = value_and_grads(layer, x, edges)
    dense, dense_grads = value_and_grads(layer, x, adjacency)
    np.testing.assert_allclose(dense, segment, rtol=1e-5, atol=1e-5)
    assert_trees_close(dense_grads, segment_grads)
