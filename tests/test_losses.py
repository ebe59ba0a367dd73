"""Losses against hand-computed values, gradient sanity and masking."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.utils import class_weight as sk_class_weight

from mer_jax import losses

POLY = dict(poly_alpha=1.0, poly_gamma=1.0)


def softmax(row):
  e = [math.exp(x) for x in row]
  return [x / sum(e) for x in e]


# --- class weights ------------------------------------------------------------------------


def test_balanced_class_weights_match_sklearn():
  counts = np.array([47, 12, 3, 7, 17, 3, 11])
  y = np.repeat(np.arange(7), counts)
  expected = sk_class_weight.compute_class_weight('balanced', classes=np.arange(7), y=y)
  got = losses.balanced_class_weights(counts)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_balanced_class_weights_absent_class_gets_zero():
  # n = 6, C = 3: 6 / (3 * 4) = 0.5, absent class 0, 6 / (3 * 2) = 1.
  np.testing.assert_allclose(losses.balanced_class_weights([4, 0, 2]), [0.5, 0.0, 1.0])


def test_class_weight_power_softens_balanced_weights():
  # n = 16, C = 3: balanced 16 / (3 * 4) and 16 / (3 * 12); an absent class stays 0.
  np.testing.assert_allclose(losses.class_weights_for('balanced', [4, 12, 0]),
                             [16 / 12, 16 / 36, 0.0], rtol=1e-6)
  np.testing.assert_allclose(losses.class_weights_for('balanced', [4, 12, 0], power=0.5),
                             [(16 / 12) ** 0.5, (16 / 36) ** 0.5, 0.0], rtol=1e-6)
  np.testing.assert_allclose(losses.class_weights_for('balanced', [4, 12, 0], power=0.0),
                             [1.0, 1.0, 0.0])
  np.testing.assert_allclose(losses.class_weights_for('none', [4, 12, 0], power=0.5), [1, 1, 1])
  with pytest.raises(ValueError, match='power must be >= 0'):
    losses.class_weights_for('balanced', [4, 12], power=-1.0)


@pytest.mark.parametrize('counts, message', [([], 'non-empty'), ([3, -1], 'non-negative'),
                                             ([0, 0], 'sum to 0'), ([[1, 2]], '1-D')])
def test_balanced_class_weights_rejects_bad_counts(counts, message):
  with pytest.raises(ValueError, match=message):
    losses.balanced_class_weights(counts)


def test_class_weights_for_modes():
  np.testing.assert_allclose(losses.class_weights_for('none', [4, 0, 2]), [1, 1, 1])
  np.testing.assert_allclose(losses.class_weights_for('balanced', [4, 0, 2]), [0.5, 0, 1])
  with pytest.raises(ValueError, match='loss.class_weights'):
    losses.class_weights_for('inverse', [1, 2])


# --- poly-focal -----------------------------------------------------------------------------


def test_poly_focal_single_node_by_hand():
  # Two equal logits: p_t = 0.5, CE = ln 2; w_0 = 2; poly = 1 * 0.5^(1 + 1) = 0.25.
  loss = losses.poly_focal_loss(jnp.array([[0.0, 0.0]]), jnp.array([0]), jnp.array([True]),
                                class_weights=jnp.array([2.0, 1.0]), **POLY)
  np.testing.assert_allclose(loss, 2 * math.log(2) + 0.25, rtol=1e-6)


def test_poly_focal_plain_mean_of_weighted_terms_and_masking():
  logits = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0], [9.0, 9.0, 9.0]],
                    np.float32)
  labels = np.array([0, 2, 1, -1])  # the last node is unlabeled
  mask = np.array([True, True, False, True])  # the third node is padding
  weights = np.array([0.5, 2.0, 3.0], np.float32)
  alpha, gamma = 1.95, 1.4
  expected_nodes = []
  for row, y in ((logits[0], 0), (logits[1], 2)):
    p = softmax(row)[y]
    expected_nodes.append(-weights[y] * math.log(p) + alpha * (1 - p)**(1 + gamma))
  kwargs = dict(class_weights=weights, poly_alpha=alpha, poly_gamma=gamma)
  per_node = losses.poly_focal_loss(logits, labels, mask, reduce=False, **kwargs)
  np.testing.assert_allclose(per_node, expected_nodes + [0.0, 0.0], rtol=1e-5)
  mean = losses.poly_focal_loss(logits, labels, mask, **kwargs)
  np.testing.assert_allclose(mean, sum(expected_nodes) / 2, rtol=1e-5)


def test_poly_focal_without_class_weights_is_unit_weights():
  logits = jnp.array([[1.0, -2.0, 0.3], [0.1, 0.2, 0.7]])
  labels, mask = jnp.array([1, 2]), jnp.array([True, True])
  np.testing.assert_allclose(
      losses.poly_focal_loss(logits, labels, mask, class_weights=None, **POLY),
      losses.poly_focal_loss(logits, labels, mask, class_weights=jnp.ones(3), **POLY))


def test_poly_focal_all_masked_is_zero_with_zero_grads():
  logits = jnp.array([[1.0, 2.0], [3.0, -1.0]])
  fn = lambda x: losses.poly_focal_loss(x, jnp.array([0, 1]), jnp.zeros(2, bool),
                                        class_weights=None, **POLY)
  value, grads = jax.value_and_grad(fn)(logits)
  assert value == 0.0
  np.testing.assert_array_equal(grads, np.zeros((2, 2)))


def test_poly_focal_padding_never_reaches_loss_or_grads():
  labels, mask = jnp.array([0, 1, -1]), jnp.array([True, True, False])
  fn = lambda x: losses.poly_focal_loss(x, labels, mask, class_weights=jnp.array([1.0, 2.0]),
                                        poly_alpha=1.95, poly_gamma=1.4)
  base = jnp.array([[0.3, -0.2], [1.0, 0.5], [0.0, 0.0]])
  value, grads = jax.value_and_grad(fn)(base)
  for pad_row in ([1e30, -1e30], [jnp.nan, jnp.inf], [5.0, -5.0]):
    other_value, other_grads = jax.value_and_grad(fn)(base.at[2].set(jnp.array(pad_row)))
    np.testing.assert_array_equal(other_value, value)
    np.testing.assert_array_equal(other_grads, grads)
    np.testing.assert_array_equal(other_grads[2], [0.0, 0.0])
  assert np.all(np.isfinite(grads))


def test_poly_focal_gradient_matches_finite_differences():
  logits = jnp.array([[0.2, -0.4, 1.1], [0.7, 0.1, -0.3]], jnp.float32)
  labels, mask = jnp.array([2, 0]), jnp.array([True, True])
  fn = lambda x: losses.poly_focal_loss(x, labels, mask, class_weights=jnp.array([1.0, 2, 3]),
                                        poly_alpha=1.95, poly_gamma=1.4)
  grads = jax.grad(fn)(logits)
  eps = 1e-3
  for i, j in ((0, 0), (0, 2), (1, 1)):
    bump = jnp.zeros_like(logits).at[i, j].set(eps)
    numeric = (fn(logits + bump) - fn(logits - bump)) / (2 * eps)
    np.testing.assert_allclose(grads[i, j], numeric, rtol=2e-2, atol=1e-4)


def test_poly_focal_rejects_bad_shapes():
  with pytest.raises(ValueError, match='class_weights must have shape'):
    losses.poly_focal_loss(jnp.zeros((2, 3)), jnp.zeros(2, int), jnp.ones(2, bool),
                           class_weights=jnp.ones(4), **POLY)
  with pytest.raises(ValueError, match='labels and mask'):
    losses.poly_focal_loss(jnp.zeros((2, 3)), jnp.zeros(3, int), jnp.ones(2, bool),
                           class_weights=None, **POLY)


def test_label_smoothed_cross_entropy_by_hand():
  # C = 2, eps = 0.2: targets (0.9, 0.1); logits (0, ln 3) -> p = (0.25, 0.75).
  loss = losses.label_smoothed_cross_entropy(
      jnp.array([[0.0, math.log(3.0)], [4.0, 4.0]]), jnp.array([0, 1]),
      jnp.array([True, False]), label_smoothing=0.2)
  np.testing.assert_allclose(loss, -(0.9 * math.log(0.25) + 0.1 * math.log(0.75)), rtol=1e-6)


# --- distillation -----------------------------------------------------------------------


def test_distillation_by_hand():
  student = np.array([[1.0, 0.0], [0.0, 2.0], [7.0, -7.0]], np.float32)
  teacher = np.array([[0.0, 1.0], [1.0, 1.0], [-3.0, 3.0]], np.float32)
  labels, mask = np.array([0, 1, -1]), np.array([True, True, False])
  temperature, alpha = 2.0, 0.25
  kls, hards = [], []
  for s_row, t_row, y in zip(student[:2], teacher[:2], labels[:2]):
    p_t = softmax(t_row / temperature)
    p_s = softmax(s_row / temperature)
    kls.append(sum(a * math.log(a / b) for a, b in zip(p_t, p_s)))
    p = softmax(s_row)[y]
    hards.append(-math.log(p) + (1 - p)**2)  # unit class weights, poly_alpha = gamma = 1
  expected = alpha * np.mean(hards) + (1 - alpha) * temperature**2 * np.mean(kls)
  got = losses.distillation_loss(student, teacher, labels, mask, temperature=temperature,
                                 alpha=alpha, class_weights=None, **POLY)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_distillation_limits_and_teacher_gets_no_gradient():
  student = jnp.array([[0.5, -1.0, 0.2], [1.5, 0.0, 0.3]])
  teacher = jnp.array([[1.0, 1.0, -2.0], [0.0, 2.0, 0.0]])
  labels, mask = jnp.array([0, 2]), jnp.array([True, True])
  kwargs = dict(temperature=1.82, class_weights=None, **POLY)
  hard = losses.poly_focal_loss(student, labels, mask, class_weights=None, **POLY)
  np.testing.assert_allclose(
      losses.distillation_loss(student, teacher, labels, mask, alpha=1.0, **kwargs), hard)
  # Student equal to teacher: zero KL, so alpha = 0 gives 0.
  np.testing.assert_allclose(
      losses.distillation_loss(teacher, teacher, labels, mask, alpha=0.0, **kwargs), 0.0,
      atol=1e-7)
  teacher_grad = jax.grad(
      lambda t: losses.distillation_loss(student, t, labels, mask, alpha=0.3, **kwargs))(teacher)
  np.testing.assert_array_equal(teacher_grad, np.zeros_like(teacher))


def test_distillation_all_masked_and_padding():
  labels, mask = jnp.array([1, 0]), jnp.array([True, False])
  teacher = jnp.array([[0.0, 1.0], [jnp.nan, jnp.inf]])
  fn = lambda s, m: losses.distillation_loss(s, teacher, labels, m, temperature=1.8, alpha=0.6,
                                             class_weights=None, **POLY)
  student = jnp.array([[0.3, 0.1], [1e30, jnp.nan]])
  value, grads = jax.value_and_grad(fn)(student, mask)
  assert np.isfinite(value) and np.all(np.isfinite(grads))
  np.testing.assert_array_equal(grads[1], [0.0, 0.0])
  value, grads = jax.value_and_grad(fn)(student, jnp.zeros(2, bool))
  assert value == 0.0
  np.testing.assert_array_equal(grads, np.zeros((2, 2)))


# --- fusion ----------------------------------------------------------------------------


FUSION = dict(class_weights=None, poly_alpha=1.0, poly_gamma=1.0, focal_gamma=2.0,
              main_focal_share=0.75, label_smoothing=0.1)


def _hand_main_loss(logits, labels, share, smoothing, focal_gamma):
  focal, smooth = [], []
  for row, y in zip(logits, labels):
    p = softmax(row)
    poly = -math.log(p[y]) + (1 - p[y])**2
    focal.append(poly * (1 - p[y])**focal_gamma)
    c = len(row)
    smooth.append(-sum(((1 - smoothing) * (k == y) + smoothing / c) * math.log(p[k])
                       for k in range(c)))
  return share * np.mean(focal) + (1 - share) * np.mean(smooth)


def _fusion_inputs():
  main = jnp.array([[1.0, 0.0, -1.0], [0.2, 0.4, 0.1], [0.0, 0.0, 0.0]])
  aux = {'t': jnp.array([[0.5, 0.1, 0.0], [0.0, 1.0, 0.0], [3.0, 3.0, 3.0]]),
         'a': jnp.array([[0.0, 0.3, 0.0], [1.0, 0.0, 2.0], [3.0, 3.0, 3.0]])}
  labels, mask = jnp.array([0, 2, -1]), jnp.array([True, True, False])
  return main, aux, labels, mask


def test_fusion_main_term_by_hand():
  main, _, labels, mask = _fusion_inputs()
  got = losses.focal_weighted_main_loss(main, labels, mask, **FUSION)
  expected = _hand_main_loss(np.asarray(main[:2]), [0, 2], 0.75, 0.1, 2.0)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_fusion_focal_factor_is_per_node_and_without_gradient():
  main, _, labels, mask = _fusion_inputs()
  kwargs = dict(FUSION, main_focal_share=1.0)
  grads = jax.grad(lambda x: losses.focal_weighted_main_loss(x, labels, mask, **kwargs))(main)
  probs = jax.nn.softmax(main[:2])
  factor = (1 - probs[jnp.arange(2), labels[:2]])**2  # constant
  poly_nodes = lambda x: losses.poly_focal_loss(x, labels, mask, class_weights=None,
                                                reduce=False, **POLY)
  expected = jax.grad(lambda x: jnp.sum(poly_nodes(x)[:2] * factor) / 2)(main)
  np.testing.assert_allclose(grads, expected, rtol=1e-5, atol=1e-7)


def test_fusion_fixed_weights_renormalised_like_the_authors():
  main, aux, labels, mask = _fusion_inputs()
  total, parts = losses.fusion_loss(
      main, aux, labels, mask, None, modalities=('t', 'a'), use_uncertainty=False,
      main_weight=0.4, aux_weights={'t': 0.3, 'a': 0.1, 'v': 5.0}, **FUSION)
  # 't' and 'a' rescaled to sum to 0.6: 0.45 and 0.15; 'v' is not in use.
  np.testing.assert_allclose(parts['weight_main'], 0.4)
  np.testing.assert_allclose(parts['weight_aux_t'], 0.45, rtol=1e-6)
  np.testing.assert_allclose(parts['weight_aux_a'], 0.15, rtol=1e-6)
  for m in ('t', 'a'):
    np.testing.assert_allclose(parts[f'aux_{m}'], losses.poly_focal_loss(
        aux[m], labels, mask, class_weights=None, **POLY), rtol=1e-6)
  expected = 0.4 * parts['main'] + 0.45 * parts['aux_t'] + 0.15 * parts['aux_a']
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  assert 'weight_aux_v' not in parts


def test_fusion_uncertainty_weights_and_their_gradient():
  main, aux, labels, mask = _fusion_inputs()
  fn = functools.partial(losses.fusion_loss, main, aux, labels, mask, modalities=('t', 'a'),
                         use_uncertainty=True, main_weight=0.3,
                         aux_weights={'t': 1.0, 'a': 1.0}, **FUSION)
  log_vars = jnp.array([0.3, -0.5, 1.2])
  (total, parts), grads = jax.value_and_grad(fn, has_aux=True)(log_vars)
  task_losses = np.array([parts['main'], parts['aux_t'], parts['aux_a']])
  np.testing.assert_allclose(total, np.sum(np.exp(-log_vars) * task_losses + log_vars),
                             rtol=1e-6)
  np.testing.assert_allclose(grads, 1 - np.exp(-log_vars) * task_losses, rtol=1e-5)
  np.testing.assert_allclose(parts['weight_aux_t'], math.exp(0.5), rtol=1e-6)
  np.testing.assert_allclose(parts['weight_aux_a'], math.exp(-1.2), rtol=1e-6)
  # With s = 0 every task has weight 1.
  total_at_zero, _ = fn(jnp.zeros(3))
  np.testing.assert_allclose(total_at_zero, task_losses.sum(), rtol=1e-6)


def test_fusion_aux_masks_restrict_to_present_modality():
  main, aux, labels, mask = _fusion_inputs()
  present = {'t': jnp.array([True, True, False]), 'a': jnp.array([False, True, True])}
  _, parts = losses.fusion_loss(
      main, aux, labels, mask, jnp.zeros(3), modalities=('t', 'a'), use_uncertainty=True,
      main_weight=0.3, aux_weights={'t': 1.0, 'a': 1.0}, aux_masks=present, **FUSION)
  only_second = jnp.array([False, True, False])
  np.testing.assert_allclose(parts['aux_a'], losses.poly_focal_loss(
      aux['a'], labels, only_second, class_weights=None, **POLY), rtol=1e-6)
  np.testing.assert_allclose(parts['aux_t'], losses.poly_focal_loss(
      aux['t'], labels, mask, class_weights=None, **POLY), rtol=1e-6)


def test_fusion_is_jittable_and_padding_invariant():
  main, aux, labels, mask = _fusion_inputs()
  fn = jax.jit(functools.partial(
      losses.fusion_loss, modalities=('t', 'a'), use_uncertainty=True, main_weight=0.3,
      aux_weights={'t': 1.0, 'a': 1.0}, **FUSION))
  grad_fn = jax.grad(lambda x, a: fn(x, a, labels, mask, jnp.zeros(3))[0], argnums=(0, 1))
  g_main, g_aux = grad_fn(main, aux)
  noisy_aux = {m: v.at[2].set(jnp.array([1e30, jnp.nan, -4.0])) for m, v in aux.items()}
  g_main2, g_aux2 = grad_fn(main.at[2].set(jnp.inf), noisy_aux)
  np.testing.assert_array_equal(g_main, g_main2)
  for m in aux:
    np.testing.assert_array_equal(g_aux[m], g_aux2[m])
    assert np.all(np.isfinite(g_aux2[m]))


def test_fusion_rejects_missing_inputs():
  main, aux, labels, mask = _fusion_inputs()
  kwargs = dict(main_weight=0.3, aux_weights={'t': 1.0, 'a': 1.0}, **FUSION)
  with pytest.raises(ValueError, match=r"aux_logits has no logits for modalities \['v'\]"):
    losses.fusion_loss(main, aux, labels, mask, jnp.zeros(4), modalities=('t', 'a', 'v'),
                       use_uncertainty=True, **kwargs)
  with pytest.raises(ValueError, match='log_vars must have shape'):
    losses.fusion_loss(main, aux, labels, mask, jnp.zeros(2), modalities=('t', 'a'),
                       use_uncertainty=True, **kwargs)
  with pytest.raises(ValueError, match=r"loss.aux_weights has no entry for modalities \['a'\]"):
    losses.fusion_loss(main, aux, labels, mask, None, modalities=('t', 'a'),
                       use_uncertainty=False, **dict(kwargs, aux_weights={'t': 1.0}))


# --- supervised contrastive -------------------------------------------------------------


def test_supcon_by_hand():
  # z1 = z2 = (1, 0), z3 = (0, 1), T = 1. Anchors 1 and 2: one positive with similarity 1,
  # denominator e^1 + e^0; anchor 3 has no positive. Mean over 3 valid nodes.
  embeddings = jnp.array([[2.0, 0.0], [0.5, 0.0], [0.0, 3.0], [7.0, 7.0]])
  labels, mask = jnp.array([0, 0, 1, 0]), jnp.array([True, True, True, False])
  got = losses.supervised_contrastive_loss(embeddings, labels, mask, temperature=1.0)
  per_anchor = -math.log(math.e / (math.e + 1.0))
  np.testing.assert_allclose(got, 2 * per_anchor / 3, rtol=1e-6)


def _supcon_reference(z, labels, temperature):
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  n, total = len(z), 0.0
  for i in range(n):
    others = [a for a in range(n) if a != i]
    positives = [p for p in others if labels[p] == labels[i]]
    if not positives:
      continue
    denominator = sum(math.exp(z[i] @ z[a] / temperature) for a in others)
    total += -np.mean([math.log(math.exp(z[i] @ z[p] / temperature) / denominator)
                       for p in positives])
  return total / n


def test_supcon_matches_loop_reference_on_random_inputs():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(9, 4)).astype(np.float32)
  labels = np.array([0, 1, 0, 2, 1, 0, 2, 3, 1])
  got = losses.supervised_contrastive_loss(z, labels, np.ones(9, bool), temperature=0.5)
  np.testing.assert_allclose(got, _supcon_reference(z, labels, 0.5), rtol=1e-5)


def test_supcon_padding_and_empty_mask():
  labels, mask = jnp.array([0, 0, 1, -1]), jnp.array([True, True, True, False])
  fn = lambda e, m: losses.supervised_contrastive_loss(e, labels, m, temperature=0.07)
  base = jnp.array([[1.0, 0.2], [0.8, 0.1], [0.0, 1.0], [0.0, 0.0]])
  value, grads = jax.value_and_grad(fn)(base, mask)
  value2, grads2 = jax.value_and_grad(fn)(base.at[3].set(jnp.array([5.0, jnp.nan])), mask)
  np.testing.assert_array_equal(value, value2)
  np.testing.assert_array_equal(grads, grads2)
  assert np.all(np.isfinite(grads))
  value, grads = jax.value_and_grad(fn)(base, jnp.zeros(4, bool))
  assert value == 0.0
  np.testing.assert_array_equal(grads, np.zeros_like(base))
