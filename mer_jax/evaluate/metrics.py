"""Classification metrics on the host: confusion matrix, per-class and weighted/macro F1.

Conventions follow scikit-learn so numbers are comparable with the literature: labels < 0 are
ignored (padding or unlabeled), a 0/0 precision, recall or F1 is 0 (zero_division=0), weighted
averages weight each class by its support, and the macro average runs over the classes that
occur in the labels or the predictions (scikit-learn's default label set).
"""

from collections.abc import Sequence
from typing import Any

import numpy as np


def _as_label_array(values: Any, name: str) -> np.ndarray:
  array = np.asarray(values)
  if array.ndim != 1:
    array = array.reshape(-1)
  if array.size and not np.issubdtype(array.dtype, np.integer):
    if not np.all(np.equal(np.mod(array, 1), 0)):
      raise ValueError(f'{name} must hold integer class indices, got dtype {array.dtype}.')
  return array.astype(np.int64)


def labeled_pairs(labels: Any, preds: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(labels, preds) restricted to entries with label >= 0, both checked to be in range."""
  labels = _as_label_array(labels, 'labels')
  preds = _as_label_array(preds, 'preds')
  if labels.shape != preds.shape:
    raise ValueError(f'labels and preds must have the same number of entries, got '
                     f'{labels.size} and {preds.size}.')
  keep = labels >= 0
  labels, preds = labels[keep], preds[keep]
  if labels.size and labels.max() >= num_classes:
    raise ValueError(f'labels must be < num_classes = {num_classes}, found {labels.max()}.')
  bad = (preds < 0) | (preds >= num_classes)
  if np.any(bad):
    raise ValueError(f'preds of labeled entries must be in [0, {num_classes}), found '
                     f'{sorted(set(preds[bad].tolist()))}.')
  return labels, preds


def confusion_matrix(labels: Any, preds: Any, num_classes: int) -> np.ndarray:
  """int64 [C, C] counts, row = true label, column = prediction; labels < 0 are ignored."""
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}.')
  labels, preds = labeled_pairs(labels, preds, num_classes)
  flat = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
  return flat.reshape(num_classes, num_classes).astype(np.int64)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  out = np.zeros(np.shape(numerator), np.float64)
  np.divide(numerator, denominator, out=out, where=denominator > 0)
  return out


def per_class_scores(confusion: np.ndarray) -> dict[str, np.ndarray]:
  """Precision, recall, F1 and support per class from confusion matrices [..., C, C] (0/0 -> 0)."""
  confusion = np.asarray(confusion, np.float64)
  true_positives = np.diagonal(confusion, axis1=-2, axis2=-1)
  predicted = confusion.sum(axis=-2)
  support = confusion.sum(axis=-1)
  precision = _safe_divide(true_positives, predicted)
  recall = _safe_divide(true_positives, support)
  f1 = _safe_divide(2.0 * true_positives, predicted + support)
  return {'precision': precision, 'recall': recall, 'f1': f1, 'support': support}


def classification_metrics(labels: Any, preds: Any,
                           label_names: Sequence[str]) -> dict[str, Any]:
  """Weighted F1 (the headline), macro F1, accuracy, per-class scores and the confusion matrix.

  Args:
    labels: int [N] true classes; entries < 0 are ignored.
    preds: int [N] predicted classes.
    label_names: class names in index order.

  Returns:
    A JSON-ready dict of Python numbers: weighted_f1, macro_f1, accuracy, num_examples,
    per_class {name: {precision, recall, f1, support}}, confusion (row = true label),
    label_names.
  """
  label_names = [str(name) for name in label_names]
  if not label_names:
    raise ValueError('label_names is empty.')
  if len(set(label_names)) != len(label_names):
    raise ValueError(f'label_names has duplicates: {label_names}.')
  num_classes = len(label_names)
  confusion = confusion_matrix(labels, preds, num_classes)
  num_examples = int(confusion.sum())
  if num_examples == 0:
    raise ValueError('No labeled examples to score: every label is < 0.')

  scores = per_class_scores(confusion)
  support = scores['support']
  occurring = (support > 0) | (confusion.sum(axis=0) > 0)
  return {
      'weighted_f1': float(np.sum(scores['f1'] * support) / num_examples),
      'macro_f1': float(np.mean(scores['f1'][occurring])),
      'accuracy': float(np.trace(confusion) / num_examples),
      'num_examples': num_examples,
      'per_class': {
          name: {
              'precision': float(scores['precision'][c]),
              'recall': float(scores['recall'][c]),
              'f1': float(scores['f1'][c]),
              'support': int(support[c]),
          } for c, name in enumerate(label_names)
      },
      'confusion': confusion.tolist(),
      'label_names': label_names,
  }
