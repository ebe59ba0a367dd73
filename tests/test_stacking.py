"""Cross-fitting helpers: folds partition the training dialogues; stacked records keep labels;
placeholder stacked records have the stacked shapes."""

import numpy as np

from configs import default
from mer_jax.data import sources
from mer_jax.train import inference
from mer_jax.train import stacking
from tests.test_pipeline import make_record


def test_folds_partition_the_records_and_are_seeded():
  folds = sources.fold_indices(10, 3, seed=4)
  assert sorted(np.concatenate(folds).tolist()) == list(range(10))
  assert [len(f) for f in folds] == [4, 3, 3]
  again = sources.fold_indices(10, 3, seed=4)
  assert all(np.array_equal(a, b) for a, b in zip(folds, again))
  assert not all(np.array_equal(a, b) for a, b in zip(folds, sources.fold_indices(10, 3, seed=5)))


def test_subset_source_renumbers_records():
  rng = np.random.default_rng(0)
  base = sources.InMemorySource([make_record(i, n, rng) for i, n in enumerate([2, 5, 3])])
  sub = sources.SubsetSource(base, np.array([2, 0]))
  assert len(sub) == 2 and sub[0] is base[2] and sub[1] is base[0]
  np.testing.assert_array_equal(sub.dialogue_lengths, [3, 2])


def test_stacked_records_replace_features_and_zero_absent_modalities():
  rng = np.random.default_rng(1)
  base = sources.InMemorySource([make_record(i, n, rng) for i, n in enumerate([4, 2])])
  log_probs = {m: [np.full((4, 7), -1.0, np.float32), np.full((2, 7), -2.0, np.float32)]
               for m in ('t', 'a', 'v')}
  out = stacking.stacked_records(base, log_probs)
  for record, stacked, value in zip(base.records, out, (-1.0, -2.0)):
    np.testing.assert_array_equal(stacked.labels, record.labels)
    for m in ('t', 'a', 'v'):
      expected = np.where(record.present[m][:, None], np.full((len(record.labels), 7), value), 0.0)
      np.testing.assert_array_equal(stacked.features[m], expected)


def test_per_record_outputs_restores_dialogue_order():
  rng = np.random.default_rng(2)
  base = sources.InMemorySource([make_record(i, n, rng) for i, n in enumerate([3, 2])])
  # Rows in a scrambled (batch) order, tagged with their record and utterance id.
  pred = {'records': np.array([1, 0, 0, 1, 0]), 'utterances': np.array([1, 2, 0, 0, 1]),
          'probs': np.arange(5, dtype=np.float32)[:, None]}
  out = inference.per_record_outputs(pred, base, 'probs')
  np.testing.assert_array_equal(out[0][:, 0], [2, 4, 1])
  np.testing.assert_array_equal(out[1][:, 0], [3, 0])


def test_placeholder_stacked_records_have_the_stacked_shapes():
  rng = np.random.default_rng(3)
  base = sources.InMemorySource([make_record(i, n, rng) for i, n in enumerate([4, 2])])
  config = default.get_config('tiny')
  log_probs = {m: [rng.normal(size=(len(r.labels), len(config.label_names))).astype(np.float32)
                   for r in base.records] for m in config.data.modalities}
  real = stacking.stacked_records(base, log_probs)
  placeholder = stacking.placeholder_stacked(base, config)
  assert len(placeholder) == len(real)
  for r, p in zip(real, placeholder.records):
    np.testing.assert_array_equal(p.labels, r.labels)
    assert {m: (x.shape, x.dtype) for m, x in p.features.items()} == {
        m: (x.shape, x.dtype) for m, x in r.features.items()}
    assert not any(x.any() for x in p.features.values())
