"""Input pipeline: packing plans, collation into padded GraphsTuples, augmentation, resumption."""

import statistics

import jax
import jraph
import ml_collections
import numpy as np
import pytest

from configs import default
from mer_jax import batch_contract
from mer_jax.train import stage as stage_lib
from mer_jax.data import pipeline
from mer_jax.data.shards import DialogueRecord, speaker_ranks
from mer_jax.data.sources import InMemorySource

DIMS = {'t': 6, 'a': 4, 'v': 3}


def make_record(i: int, n: int, rng) -> DialogueRecord:
  speakers = [f's{int(x)}' for x in rng.integers(0, 3, size=n)]
  present = {m: np.ones(n, bool) for m in DIMS}
  present['v'][::3] = False
  feats = {m: rng.normal(size=(n, d)).astype(np.float32) * present[m][:, None]
           for m, d in DIMS.items()}
  return DialogueRecord(
      dialogue_id=str(i), utterance_ids=np.arange(n, dtype=np.int32), speakers=speakers,
      speaker_ids=speaker_ranks(speakers), labels=rng.integers(0, 7, size=n).astype(np.int32),
      transcripts=['x'] * n, features=feats, present=present)


def small_config(**overrides) -> ml_collections.ConfigDict:
  c = default.get_config()
  c.data.dims = ml_collections.ConfigDict(DIMS)
  c.batch.max_nodes = 16
  c.batch.max_graphs = 4
  c.batch.utterances_per_batch = 5
  for k, v in overrides.items():
    node = c
    *path, last = k.split('.')
    for p in path:
      node = node[p]
    node[last] = v
  return c


@pytest.fixture
def source():
  rng = np.random.default_rng(0)
  lengths = [3, 7, 1, 5, 15, 2, 4, 6, 8]
  return InMemorySource([make_record(i, n, rng) for i, n in enumerate(lengths)])


def test_plan_covers_every_dialogue_once_within_budget(source):
  budget = batch_contract.Budget(16, 4)
  lengths = source.dialogue_lengths
  for epoch in range(3):
    plan = pipeline.plan_dialogue_batches(lengths, budget,
                                          pipeline.epoch_order(len(lengths), 5, epoch))
    flat = np.concatenate(plan)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    for b in plan:
      assert lengths[b].sum() <= 15 and len(b) <= 3


def test_epoch_order_is_seeded_and_changes_per_epoch():
  a = pipeline.epoch_order(50, 3, 0)
  assert np.array_equal(a, pipeline.epoch_order(50, 3, 0))
  assert not np.array_equal(a, pipeline.epoch_order(50, 3, 1))
  assert np.array_equal(pipeline.epoch_order(5, None, 4), np.arange(5))


def test_dialogue_longer_than_budget_is_a_clear_error():
  with pytest.raises(ValueError, match='dialogue record 1 has 20 utterances.*max_nodes'):
    pipeline.plan_dialogue_batches(np.array([3, 20]), batch_contract.Budget(16, 4), np.arange(2))


def test_collated_batch_is_a_padded_graphs_tuple(source):
  config = small_config(**{'graph.speaker_edges': True})
  ds = pipeline.make_dataset(source, config=config, budget=batch_contract.budget_from_config(config),
                             train=False, epoch=0, seed=0)
  batch = ds[0]
  assert isinstance(batch, jraph.GraphsTuple)
  n, e, g = 16, 64, 4
  assert batch.nodes['features']['t'].shape == (n, 6)
  assert batch.senders.shape == (e,) and batch.n_node.shape == (g,)
  # jraph's own padding masks agree with ours.
  np.testing.assert_array_equal(jraph.get_node_padding_mask(batch), batch.nodes['mask'])
  edge_mask = np.asarray(jraph.get_edge_padding_mask(batch))
  np.testing.assert_array_equal(edge_mask, batch.edges['kind'] >= 0)
  assert batch.n_node.sum() == n and batch.n_edge.sum() == e
  # Eval order follows the records: first batch holds dialogues 0, 1, 2 (3 + 7 + 1 nodes) ...
  first = batch.globals['record'][batch.globals['record'] >= 0]
  np.testing.assert_array_equal(first, [0, 1, 2])
  # ... and its temporal edges join consecutive utterances of the same dialogue only.
  kinds = batch.edges['kind']
  s, r = batch.senders[kinds == 0], batch.receivers[kinds == 0]
  assert np.all(np.abs(s - r) == 1)
  rec = batch.nodes['record']
  assert np.all(rec[s] == rec[r])
  assert (kinds == 0).sum() == 2 * (2 + 6 + 0)
  # Same-speaker edges connect an utterance to the same speaker's previous utterance.
  s, r = batch.senders[kinds == 1], batch.receivers[kinds == 1]
  spk = batch.nodes['speaker']
  assert np.all(spk[s] == spk[r]) and np.all(rec[s] == rec[r])
  # Missing modality rows are zero and flagged absent; padding labels are -1.
  pres = batch.nodes['present']['v']
  assert np.all(batch.nodes['features']['v'][~pres] == 0)
  assert np.all(batch.nodes['label'][~batch.nodes['mask']] == -1)


def test_batch_scope_puts_shuffled_utterances_into_one_graph(source):
  config = small_config(**{'graph.scope': 'batch'})
  budget = batch_contract.budget_from_config(config)
  ds = pipeline.make_dataset(source, config=config, budget=budget, train=True, epoch=0, seed=1)
  total = int(source.dialogue_lengths.sum())
  assert len(ds) == -(-total // 5)
  batch = ds[0]
  assert batch.n_node[0] == 5 and batch.globals['record'][0] == -1
  # Temporal edges join consecutive batch slots even across dialogues (the authors' semantics).
  kinds = batch.edges['kind']
  assert (kinds == 0).sum() == 8
  assert len(set(batch.nodes['record'][:5].tolist())) > 1


def test_augmentation_is_seeded_and_only_in_training(source):
  config = small_config()
  budget = batch_contract.budget_from_config(config)
  a = pipeline.make_dataset(source, config=config, budget=budget, train=True, epoch=0, seed=0)[0]
  b = pipeline.make_dataset(source, config=config, budget=budget, train=True, epoch=0, seed=0)[0]
  np.testing.assert_array_equal(a.nodes['features']['t'], b.nodes['features']['t'])
  ev = pipeline.make_dataset(source, config=config, budget=budget, train=False, epoch=0, seed=0)[0]
  rec = ev.globals['record'][ev.globals['record'] >= 0]
  raw = np.concatenate([source[r].features['t'] for r in rec])
  np.testing.assert_array_equal(ev.nodes['features']['t'][:len(raw)], raw)
  # Training features differ from the raw ones (noise), absent modalities stay zero.
  m = a.nodes['mask']
  assert not np.allclose(a.nodes['features']['t'][m], 0)
  assert np.all(a.nodes['features']['v'][~a.nodes['present']['v']] == 0)


def test_augmentation_statistics_match_the_recipe():
  aug = pipeline.Augmentation(t_dropout=0.2, t_noise_std=0.0, t_shuffle_prob=0.0,
                              t_shuffle_fraction=0.1, t_scale_prob=0.0, t_scale_range=(1, 1),
                              a_noise_std=0.05, v_scale_range=(0.95, 1.05))
  x = {'t': np.ones((200, 100), np.float32), 'a': np.zeros((200, 100), np.float32),
       'v': np.ones((200, 10), np.float32)}
  present = {m: np.ones(200, bool) for m in x}
  out = aug.apply(x, present, pipeline.modality_rngs(0, 0))
  assert abs((out['t'] == 0).mean() - 0.2) < 0.01
  assert abs(out['a'].std() - 0.05) < 0.002
  v_scales = out['v'][:, 0]
  assert v_scales.min() >= 0.95 and v_scales.max() <= 1.05
  np.testing.assert_allclose(out['v'], v_scales[:, None] * np.ones((1, 10)), rtol=1e-6)


def test_augmentation_draws_follow_the_documented_sequence():
  """Pins each modality's draws (a faster rewrite must not change a seed's batches; the text
  draws 108 noise values, a multiple of 4 (64-bit draws), the audio 63, not one) and checks
  that read-only record features are left as they were."""
  aug = pipeline.Augmentation(t_dropout=0.3, t_noise_std=0.02, t_shuffle_prob=0.0,
                              t_shuffle_fraction=0.1, t_scale_prob=0.5, t_scale_range=(0.8, 1.2),
                              a_noise_std=0.05, v_scale_range=(0.9, 1.1))
  rng = np.random.default_rng(4)
  dims = {'t': 12, 'a': 7, 'v': 5}
  x = {m: rng.normal(size=(9, d)).astype(np.float32) for m, d in dims.items()}
  for v in x.values():
    v.setflags(write=False)
  before = {m: v.copy() for m, v in x.items()}
  present = {m: np.arange(9) % 4 != i for i, m in enumerate(dims)}
  out = aug.apply(x, present, pipeline.modality_rngs(11, 2))

  ref = pipeline.modality_rngs(11, 2)

  def normal(rng, shape):  # 16 random bits per value, each the midpoint quantile of its bin
    bits = np.frombuffer(rng.bytes(2 * int(np.prod(shape))), np.uint16)
    dist = statistics.NormalDist()
    return np.asarray([dist.inv_cdf((b + 0.5) / 65536) for b in bits.tolist()],
                      np.float32).reshape(shape)

  t = ref['t']
  dropped = t.random((9, 12), dtype=np.float32) < 0.3
  noise = normal(t, (9, 12)) * np.float32(0.02)
  t.random(9)  # rows to shuffle (probability 0 here)
  scaled = t.random(9) < 0.5
  scale = np.where(scaled, t.uniform(0.8, 1.2, size=9), 1.0).astype(np.float32)
  want = {
      't': (np.where(dropped, 0.0, x['t']).astype(np.float32) + noise) * scale[:, None],
      'a': x['a'] + normal(ref['a'], (9, 7)) * np.float32(0.05),
      'v': x['v'] * ref['v'].uniform(0.9, 1.1, size=(9, 1)).astype(np.float32),
  }
  for m in dims:
    want[m][~present[m]] = 0.0
    assert out[m].dtype == np.float32
    np.testing.assert_array_equal(out[m], want[m])
    np.testing.assert_array_equal(x[m], before[m])
  assert 0 < scaled.sum() < 9 and 0 < dropped.mean() < 1


@pytest.mark.parametrize('size', [4096, 4098, 6])
@pytest.mark.parametrize('leftover_half', [False, True])
def test_gaussian_noise_uses_the_bits_rng_bytes_gives(size, leftover_half):
  """The noise is the quantile of each 16 bits of rng.bytes, whichever way it draws them, and
  leaves the generator where rng.bytes leaves it: also when an odd number of 32-bit draws (here
  float32 uniforms) left half of a 64-bit output for the next draw."""
  fast, ref = np.random.default_rng(9), np.random.default_rng(9)
  for rng in (fast, ref):
    rng.random(3 if leftover_half else 4, dtype=np.float32)
  assert fast.bit_generator.state['has_uint32'] == leftover_half
  bits = np.frombuffer(ref.bytes(2 * size), np.uint16)
  want = np.asarray([statistics.NormalDist().inv_cdf((b + 0.5) / 65536) for b in bits.tolist()],
                    np.float32)
  np.testing.assert_array_equal(pipeline.gaussian_noise(fast, (size,)), want)
  np.testing.assert_array_equal(fast.random(5, dtype=np.float32), ref.random(5, dtype=np.float32))
  assert fast.random() == ref.random()


def test_gaussian_noise_is_a_finely_quantised_standard_normal():
  z = pipeline.gaussian_noise(np.random.default_rng(0), (1000, 400))
  assert z.shape == (1000, 400) and z.dtype == np.float32
  # Moments of N(0, 1) within about 4 standard errors of 400,000 draws.
  assert abs(z.mean()) < 0.007 and abs(z.std() - 1) < 0.005
  assert abs(np.mean(z**4) - 3) < 0.05
  for q, want in [(0.025, -1.95996), (0.5, 0.0), (0.8413, 0.99982)]:
    assert abs(np.quantile(z, q) - want) < 0.01, q
  levels = np.unique(z)
  assert len(levels) > 60000  # nearly every one of the 65,536 levels appears
  np.testing.assert_allclose(levels.max(), 4.3, atol=0.05)  # the outermost bin's midpoint
  np.testing.assert_allclose(levels.min(), -levels.max(), rtol=1e-5)
  # Distinct generator states give distinct noise.
  assert not np.array_equal(z[0], pipeline.gaussian_noise(np.random.default_rng(1), (400,)))


def test_partial_shuffle_permutes_the_chosen_share_of_dimensions_within_a_row():
  aug = pipeline.Augmentation(t_dropout=0.0, t_noise_std=0.0, t_shuffle_prob=0.5,
                              t_shuffle_fraction=0.1, t_scale_prob=0.0, t_scale_range=(1, 1),
                              a_noise_std=0.0, v_scale_range=(1, 1))
  n, d = 400, 200
  x = np.tile(np.arange(d, dtype=np.float32), (n, 1))
  out = aug.apply({'t': x}, {'t': np.ones(n, bool)}, pipeline.modality_rngs(3, 0))['t']
  changed = (out != x).any(axis=1)
  assert abs(changed.mean() - 0.5) < 0.07  # rows drawn with t_shuffle_prob (+/- 3 sd)
  # Each row keeps its values (a permutation), and a shuffled row moves at most 10% of them.
  np.testing.assert_array_equal(np.sort(out, axis=1), x)
  moved = (out != x).sum(axis=1)
  assert moved.max() <= int(0.1 * d) and moved[changed].mean() > 0.8 * int(0.1 * d)


def test_text_augmentation_does_not_depend_on_the_other_modalities_loaded(source):
  """The teacher trains on the same augmented text whether audio and visual are loaded or not."""
  full = small_config()
  text_only = small_config(**{'data.modalities': ('t',)})
  a = pipeline.make_dataset(source, config=full, budget=batch_contract.budget_from_config(full),
                            train=True, epoch=1, seed=5)
  b = pipeline.make_dataset(source, config=text_only,
                            budget=batch_contract.budget_from_config(text_only), train=True, epoch=1,
                            seed=5)
  assert len(a) == len(b)
  for i in range(len(a)):
    np.testing.assert_array_equal(a[i].nodes['features']['t'], b[i].nodes['features']['t'])


def test_a_stage_can_leave_the_frozen_teachers_text_as_stored(source):
  """augmented=('a',): audio gets the same draws as when everything is augmented, text none."""
  config = small_config()
  budget = batch_contract.budget_from_config(config)
  every = pipeline.make_dataset(source, config=config, budget=budget, train=True, epoch=1, seed=5)
  audio = pipeline.make_dataset(source, config=config, budget=budget, train=True, epoch=1, seed=5,
                                augmented=('a',))
  stored = pipeline.make_dataset(source, config=config, budget=budget, train=False, epoch=1,
                                 seed=5)
  # Training shuffles dialogues; the unaugmented text must be the stored text of the same nodes.
  by_utterance = {}
  for b in stored:
    for key, row in zip(_node_keys(b), b.nodes['features']['t']):
      by_utterance[key] = row
  for i in range(len(every)):
    np.testing.assert_array_equal(audio[i].nodes['features']['a'], every[i].nodes['features']['a'])
    assert not np.array_equal(audio[i].nodes['features']['t'], every[i].nodes['features']['t'])
    for key, row in zip(_node_keys(audio[i]), audio[i].nodes['features']['t']):
      np.testing.assert_array_equal(row, by_utterance[key])


def test_encoder_stages_augment_their_own_modality_unless_the_authors_way_is_asked_for():
  clean = small_config(**{'model.fusion.input': 'graph'})
  authors = small_config(**{'augment.clean_frozen_inputs': False, 'model.fusion.input': 'graph'})
  assert [stage_lib.augmented_modalities(s, clean) for s in ('teacher', 'audio', 'visual')] == [
      ('t',), ('a',), ('v',)]
  assert stage_lib.augmented_modalities('fusion', clean) == ('t', 'a', 'v')
  for stage in ('teacher', 'audio', 'visual', 'fusion'):
    assert stage_lib.augmented_modalities(stage, authors) == ('t', 'a', 'v')
  # Stacked fusion reads log-probabilities, not features: nothing to augment.
  for config in (clean, authors):
    config.model.fusion.input = 'stacked'
    assert stage_lib.augmented_modalities('fusion', config) == ()


def _node_keys(batch):
  real = np.asarray(batch.nodes['mask'])
  return list(zip(np.asarray(batch.nodes['record'])[real].tolist(),
                  np.asarray(batch.nodes['utterance'])[real].tolist()))


def test_iterator_state_resumes_mid_epoch(source):
  config = small_config()
  budget = batch_contract.budget_from_config(config)
  ds = pipeline.make_dataset(source, config=config, budget=budget, train=True, epoch=2, seed=0)
  it = iter(ds.to_iter_dataset())
  next(it)
  state = it.get_state()
  expected = [b.nodes['features']['t'] for b in it]
  it2 = iter(pipeline.make_dataset(source, config=config, budget=budget, train=True, epoch=2,
                                   seed=0).to_iter_dataset())
  it2.set_state(state)
  resumed = [b.nodes['features']['t'] for b in it2]
  assert len(resumed) == len(expected) > 0
  for x, y in zip(expected, resumed):
    np.testing.assert_array_equal(x, y)


class CountingSource(InMemorySource):
  """Remembers which records were read."""

  def __init__(self, records):
    super().__init__(records)
    self.read = set()

  def __getitem__(self, index):
    self.read.add(int(index))
    return super().__getitem__(index)


@pytest.mark.parametrize('scope', ['dialogue', 'batch'])
def test_groups_give_each_process_its_own_records_and_compose_the_global_batch(source, scope):
  """Two processes (one sub-batch each) read disjoint records, all of them between them, agree
  on the step count, and their sub-batches end to end are the one-process two-group batch."""
  config = small_config(**{'graph.scope': scope})
  records = [source[i] for i in range(len(source))]
  per_process, lengths = [], set()
  for local in ((0,), (1,)):
    counting = CountingSource(records)
    budget = batch_contract.budget_from_config(config, groups=2, local_groups=local)
    ds = pipeline.make_dataset(counting, config=config, budget=budget, train=True, epoch=1, seed=3)
    per_process.append([ds[i] for i in range(len(ds))])
    lengths.add(len(ds))
    per_process[-1].append(counting.read)
  assert len(lengths) == 1
  read0, read1 = per_process[0].pop(), per_process[1].pop()
  assert read0 | read1 == set(range(len(source)))
  if scope == 'dialogue':  # whole dialogues: no record is read by both
    assert read0 and read1 and not read0 & read1
  utterances = [{(int(r), int(u)) for g in batches for r, u, m in zip(
      g.nodes['record'], g.nodes['utterance'], g.nodes['mask']) if m} for batches in per_process]
  assert utterances[0] and utterances[1] and not utterances[0] & utterances[1]

  both = batch_contract.budget_from_config(config, groups=2, local_groups=(0, 1))
  whole = pipeline.make_dataset(InMemorySource(records), config=config, budget=both, train=True,
                                epoch=1, seed=3)
  for step, (a, b) in enumerate(zip(*per_process)):
    w = whole[step]
    one = batch_contract.budget_from_config(config)
    assert a.nodes['mask'].shape == (one.max_nodes,) and a.n_node.shape == (one.max_graphs,)
    for got, x, y in zip(jax.tree.leaves(w), jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(got, np.concatenate([x, y]))
    # Process 1's edges point at its own rows of the global batch.
    assert b.senders.min() >= one.max_nodes and b.receivers.max() < 2 * one.max_nodes
  # Every utterance appears exactly once in the epoch.
  nodes = [(int(r), int(u)) for s in range(len(whole))
           for r, u, m in zip(whole[s].nodes['record'], whole[s].nodes['utterance'],
                              whole[s].nodes['mask']) if m]
  assert len(nodes) == len(set(nodes)) == int(source.dialogue_lengths.sum())


def test_a_group_with_no_dialogues_left_is_all_padding(source):
  config = small_config()
  one = batch_contract.budget_from_config(config)
  plan_len = len(pipeline.make_dataset(source, config=config, budget=one, train=False, epoch=0,
                                       seed=0))
  groups = plan_len + 1  # more groups than sub-batches: the last one gets nothing
  budget = batch_contract.budget_from_config(config, groups=groups, local_groups=(groups - 1,))
  ds = pipeline.make_dataset(source, config=config, budget=budget, train=False, epoch=0, seed=0)
  assert len(ds) == 1
  batch = ds[0]
  assert not batch.nodes['mask'].any() and (batch.nodes['label'] == -1).all()
  assert batch.n_node.sum() == one.max_nodes and batch.n_node.shape == (one.max_graphs,)
  assert (batch.edges['kind'] == batch_contract.PADDING_EDGE).all()
