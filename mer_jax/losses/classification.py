"""Classification losses for imbalanced emotion labels: balanced class weights and poly-focal loss.

Every loss takes a bool `mask` [N] of valid nodes and averages over valid nodes only. A node
counts as valid when `mask` is True AND its label is >= 0 (unlabeled utterances carry -1), so
an all-false mask gives a loss of exactly 0 and no NaN. Logits of invalid nodes are replaced by
zeros before any arithmetic, so whatever sits in padding slots (even Inf/NaN) reaches neither
the loss nor its gradients.
"""

import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

CLASS_WEIGHT_MODES = ('balanced', 'none')


def balanced_class_weights(class_counts: Sequence[int] | np.ndarray) -> np.ndarray:
  """Weights n / (C * count_c), as scikit-learn's class_weight='balanced'.

  A class with count 0 gets weight 0 (scikit-learn refuses such a class instead): it has no
  examples to weight, and a zero keeps the weight vector finite. A warning names the class.

  Args:
    class_counts: [C] non-negative number of training examples per class.

  Returns:
    float32 [C] weights.
  """
  counts = np.asarray(class_counts)
  if counts.ndim != 1 or counts.size == 0:
    raise ValueError(f'class_counts must be a non-empty 1-D array, got shape {counts.shape}.')
  if not np.issubdtype(counts.dtype, np.number) or np.any(counts < 0):
    raise ValueError(f'class_counts must be non-negative numbers, got {counts.tolist()}.')
  total = counts.sum()
  if total <= 0:
    raise ValueError('class_counts sum to 0: no labeled examples to weight classes by.')
  absent = np.flatnonzero(counts == 0)
  if absent.size:
    logging.warning('Classes %s have no examples; their balanced class weight is 0.',
                    absent.tolist())
  safe_counts = np.where(counts > 0, counts, 1).astype(np.float64)
  weights = np.where(counts > 0, total / (counts.size * safe_counts), 0.0)
  return weights.astype(np.float32)


def class_weights_for(mode: str, class_counts: Sequence[int] | np.ndarray,
                      power: float = 1.0) -> np.ndarray:
  """Class weights as config key `loss.class_weights` asks: 'balanced' or 'none' (all ones).

  'balanced' weights are raised to `power`: 1 is scikit-learn's 'balanced' (the authors'), 0.5
  their square root, which tilts the loss towards rare classes less; an absent class keeps 0.
  """
  if power < 0:
    raise ValueError(f'class weight power must be >= 0, got {power}.')
  if mode == 'balanced':
    weights = balanced_class_weights(class_counts)
    return np.where(weights > 0, weights ** power, 0.0).astype(np.float32)
  if mode == 'none':
    return np.ones(len(class_counts), np.float32)
  raise ValueError(f'loss.class_weights must be one of {CLASS_WEIGHT_MODES}, got {mode!r}.')


def valid_nodes(labels: Array, mask: Array) -> Array:
  """Nodes that enter a loss: masked in and labeled (label >= 0)."""
  return jnp.logical_and(mask.astype(bool), labels >= 0)


def masked_mean(values: Array, valid: Array) -> Array:
  """Mean of `values` [N] over `valid` nodes; 0 when there are none."""
  total = jnp.sum(jnp.where(valid, values, 0.0))
  count = jnp.sum(valid.astype(values.dtype))
  return total / jnp.maximum(count, 1.0)


def clean_logits(logits: Array, valid: Array) -> Array:
  """Zeros the logits of invalid rows so padding never reaches values or gradients."""
  return jnp.where(valid[:, None], logits, 0.0)


def safe_labels(labels: Array, valid: Array) -> Array:
  """Labels with invalid entries replaced by class 0, so indexing stays in range."""
  return jnp.where(valid, labels, 0).astype(jnp.int32)


def true_class_log_prob(logits: Array, labels: Array) -> Array:
  """log softmax(logits)[n, labels[n]] for each row; labels must be in range."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def _check_shapes(logits: Array, labels: Array, mask: Array) -> None:
  if logits.ndim != 2:
    raise ValueError(f'logits must be [N, C], got shape {logits.shape}.')
  n = logits.shape[0]
  if labels.shape != (n,) or mask.shape != (n,):
    raise ValueError(f'labels and mask must be [{n}] to match logits {logits.shape}, got '
                     f'labels {labels.shape} and mask {mask.shape}.')


def _class_weight_vector(class_weights: Array | np.ndarray | None, num_classes: int) -> Array:
  if class_weights is None:
    return jnp.ones((num_classes,), jnp.float32)
  weights = jnp.asarray(class_weights, jnp.float32)
  if weights.shape != (num_classes,):
    raise ValueError(f'class_weights must have shape ({num_classes},) to match the logits, '
                     f'got {weights.shape}.')
  return weights


def poly_focal_loss(logits: Array,
                    labels: Array,
                    mask: Array,
                    *,
                    class_weights: Array | np.ndarray | None,
                    poly_alpha: float,
                    poly_gamma: float,
                    reduce: bool = True) -> Array:
  """Class-weighted cross-entropy plus a poly-focal term.

  Per node: w_y * CE + poly_alpha * (1 - p_t)^(1 + poly_gamma), with p_t the predicted
  probability of the true class. As in the authors' CompositePolyLoss, the class weight scales
  each node's CE and the reduction is a plain mean over valid nodes (not PyTorch's weighted
  mean that divides by the summed weights).

  Args:
    logits: [N, C].
    labels: int [N]; negative = unlabeled.
    mask: bool [N] of valid nodes.
    class_weights: [C] or None (all ones).
    poly_alpha: scale of the poly term.
    poly_gamma: the poly term's exponent is 1 + poly_gamma.
    reduce: True gives the scalar mean over valid nodes; False the per-node loss [N], 0 at
      invalid nodes.

  Returns:
    Scalar, or [N] when reduce is False.
  """
  _check_shapes(logits, labels, mask)
  valid = valid_nodes(labels, mask)
  logits = clean_logits(logits.astype(jnp.float32), valid)
  labels = safe_labels(labels, valid)
  weights = _class_weight_vector(class_weights, logits.shape[-1])
  log_p_true = true_class_log_prob(logits, labels)
  one_minus_p = jnp.clip(-jnp.expm1(log_p_true), 0.0, 1.0)  # 1 - p_t, exact near p_t = 1
  per_node = -weights[labels] * log_p_true + poly_alpha * one_minus_p**(1.0 + poly_gamma)
  per_node = jnp.where(valid, per_node, 0.0)
  if not reduce:
    return per_node
  return masked_mean(per_node, valid)


def label_smoothed_cross_entropy(logits: Array, labels: Array, mask: Array, *,
                                 label_smoothing: float) -> Array:
  """Unweighted CE against (1 - eps) * one_hot + eps / C, mean over valid nodes."""
  _check_shapes(logits, labels, mask)
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f'loss.label_smoothing must be in [0, 1), got {label_smoothing}.')
  valid = valid_nodes(labels, mask)
  logits = clean_logits(logits.astype(jnp.float32), valid)
  labels = safe_labels(labels, valid)
  num_classes = logits.shape[-1]
  targets = (1.0 - label_smoothing) * jax.nn.one_hot(labels, num_classes)
  targets = targets + label_smoothing / num_classes
  per_node = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
  return masked_mean(per_node, valid)
