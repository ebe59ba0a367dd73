"""Paired bootstrap and approximate randomization against hand-computed and enumerated values."""

import itertools

import numpy as np
import pytest

from mer_jax import evaluate
from mer_jax.experiments import significance


def test_vectorised_scores_equal_classification_metrics():
  rng = np.random.default_rng(0)
  for trial in range(20):
    c = int(rng.integers(2, 8))
    n = int(rng.integers(1, 60))
    labels = rng.integers(0, c, n)
    preds = rng.integers(0, max(1, c - trial % 3), n)  # some classes never predicted
    expected = evaluate.classification_metrics(labels, preds, [str(i) for i in range(c)])
    confusion = significance.confusions(labels, preds, c)
    np.testing.assert_array_equal(confusion, expected['confusion'])
    for metric in significance.METRICS:
      assert significance.scores_from_confusions(confusion, metric) == pytest.approx(
          expected[metric], abs=1e-12), (trial, metric)


def test_weighted_f1_by_hand():
  # class 0: P 1, R 1/2, F1 2/3; class 1: P 2/3, R 1, F1 4/5; supports 2 and 2.
  labels, preds = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
  assert significance.system_score(labels, preds, 2, 'weighted_f1') == pytest.approx(
      (2 / 3 * 2 + 0.8 * 2) / 4)
  assert significance.system_score(labels, preds, 2, 'macro_f1') == pytest.approx((2 / 3 + 0.8) / 2)
  assert significance.system_score(labels, preds, 2, 'accuracy') == pytest.approx(0.75)


def test_several_seeds_score_is_mean_of_seeds():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 4, 50)
  preds = rng.integers(0, 4, (3, 50))
  per_seed = [evaluate.classification_metrics(labels, p, list('abcd'))['weighted_f1']
              for p in preds]
  assert significance.system_score(labels, preds, 4, 'weighted_f1') == pytest.approx(
      np.mean(per_seed))


def test_identical_systems_differ_by_nothing():
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 3, 40)
  preds = rng.integers(0, 3, 40)
  result = significance.paired_bootstrap(labels, preds, preds, 3, samples=200)
  assert (result.difference, result.ci_low, result.ci_high) == (0.0, 0.0, 0.0)
  assert result.p_value == 1.0
  assert significance.approximate_randomization(labels, preds, preds, 3, samples=200) == 1.0


def test_perfect_against_always_wrong():
  labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
  perfect, wrong = labels.copy(), (labels + 1) % 3
  samples = 300
  result = significance.paired_bootstrap(labels, perfect, wrong, 3, samples=samples)
  assert result.difference == 1.0
  assert result.ci_low == result.ci_high == 1.0  # every resample: F1 1 against F1 0
  assert result.p_value == pytest.approx(1 / (samples + 1))
  reverse = significance.paired_bootstrap(labels, wrong, perfect, 3, samples=samples)
  assert (reverse.difference, reverse.ci_low, reverse.ci_high) == (-1.0, -1.0, -1.0)


def test_one_bootstrap_resample_by_hand():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 5, 30)
  a, b = rng.integers(0, 5, (2, 30)), rng.integers(0, 5, 30)
  result = significance.paired_bootstrap(labels, a, b, 5, samples=1, seed=7)
  idx = np.random.default_rng(7).integers(0, 30, size=(1, 30))[0]
  names = list('abcde')
  score_a = np.mean([evaluate.classification_metrics(labels[idx], p[idx], names)['weighted_f1']
                     for p in a])
  score_b = evaluate.classification_metrics(labels[idx], b[idx], names)['weighted_f1']
  assert result.ci_low == result.ci_high == pytest.approx(score_a - score_b, abs=1e-12)


def test_bootstrap_interval_covers_difference_and_narrows_with_data():
  rng = np.random.default_rng(4)

  def systems(n):
    labels = rng.integers(0, 3, n)
    better = np.where(rng.random(n) < 0.8, labels, rng.integers(0, 3, n))
    worse = np.where(rng.random(n) < 0.6, labels, rng.integers(0, 3, n))
    return labels, better, worse

  small = significance.paired_bootstrap(*systems(100), 3, samples=500)
  large = significance.paired_bootstrap(*systems(2000), 3, samples=500)
  for result in (small, large):
    assert result.ci_low < result.difference < result.ci_high
  assert large.ci_high - large.ci_low < small.ci_high - small.ci_low
  assert large.p_value < 0.01 and large.ci_low > 0


def test_randomization_matches_exact_enumeration():
  labels = np.array([0, 1, 1, 2, 0, 2, 1, 0])
  a = np.array([0, 1, 1, 2, 1, 2, 0, 0])
  b = np.array([0, 0, 1, 1, 1, 2, 0, 2])
  observed = abs(significance.system_score(labels, a, 3, 'weighted_f1') -
                 significance.system_score(labels, b, 3, 'weighted_f1'))
  extreme = 0
  for swap in itertools.product([False, True], repeat=labels.size):
    swap = np.array(swap)
    a2, b2 = np.where(swap, b, a), np.where(swap, a, b)
    diff = abs(significance.system_score(labels, a2, 3, 'weighted_f1') -
               significance.system_score(labels, b2, 3, 'weighted_f1'))
    extreme += diff >= observed - 1e-12
  exact = extreme / 2**labels.size
  approx = significance.approximate_randomization(labels, a, b, 3, samples=20000, seed=1)
  assert approx == pytest.approx(exact, abs=0.015)


def test_bad_shapes_and_seed_counts_fail_clearly():
  labels = np.array([0, 1, 2])
  with pytest.raises(ValueError, match='preds_b must be'):
    significance.paired_bootstrap(labels, labels, labels[:2], 3)
  with pytest.raises(ValueError, match='outside'):
    significance.paired_bootstrap(labels, labels, labels + 1, 3)
  with pytest.raises(ValueError, match='as many seeds'):
    significance.approximate_randomization(labels, np.stack([labels, labels]), labels, 3)
  with pytest.raises(ValueError, match='unknown metric'):
    significance.paired_bootstrap(labels, labels, labels, 3, metric='auc')
