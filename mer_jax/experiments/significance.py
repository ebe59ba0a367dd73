"""Paired significance tests on per-utterance test predictions of two systems.

Both tests compare a metric (weighted F1 by default) of system A and system B on the same test
utterances. A system may be one run (`preds` [N]) or several seeds of one configuration
(`preds` [S, N]); its score is then the mean of the per-seed scores, so the tests ask whether the
seed-averaged systems differ, with the test set as the source of sampling noise.

- `paired_bootstrap`: resamples utterances with replacement; the percentile interval of the
  resampled differences is the confidence interval, and the p-value is the share of centred
  resampled differences at least as large as the observed one (two-sided).
- `approximate_randomization`: swaps A's and B's predictions of each utterance with probability
  1/2; the p-value is the share of swapped differences at least as large as the observed one.

Metrics follow mer_jax.evaluate.metrics (scikit-learn conventions) exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mer_jax.evaluate import metrics

METRICS = ('weighted_f1', 'macro_f1', 'accuracy')


def confusions(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
  """Confusion matrices of many prediction sets at once.

  Args:
    labels: int [..., N] true classes (>= 0).
    preds: int [..., N] predictions, broadcastable against labels.
    num_classes: C.

  Returns:
    int64 [..., C, C], row = true label, column = prediction.
  """
  labels, preds = np.broadcast_arrays(np.asarray(labels, np.int64), np.asarray(preds, np.int64))
  batch_shape = labels.shape[:-1]
  rows = int(np.prod(batch_shape, dtype=np.int64))
  cells = num_classes * num_classes
  flat = (labels * num_classes + preds).reshape(rows, -1)
  offsets = (np.arange(rows, dtype=np.int64) * cells)[:, None]
  counts = np.bincount((flat + offsets).ravel(), minlength=rows * cells)
  return counts.reshape(batch_shape + (num_classes, num_classes))


def scores_from_confusions(confusion: np.ndarray, metric: str) -> np.ndarray:
  """weighted_f1, macro_f1 or accuracy of each confusion matrix in [..., C, C]."""
  scores = metrics.per_class_scores(confusion)
  support, f1 = scores['support'], scores['f1']
  total = support.sum(axis=-1)
  if metric == 'accuracy':
    return np.diagonal(np.asarray(confusion), axis1=-2, axis2=-1).sum(axis=-1) / total
  if metric == 'weighted_f1':
    return (f1 * support).sum(axis=-1) / total
  if metric == 'macro_f1':
    # Classes seen in the labels or the predictions, as classification_metrics averages them.
    occurring = (support + np.asarray(confusion).sum(axis=-2)) > 0
    return (f1 * occurring).sum(axis=-1) / np.maximum(occurring.sum(axis=-1), 1)
  raise ValueError(f'unknown metric {metric!r}; expected one of {METRICS}.')


def system_score(labels: np.ndarray, preds: np.ndarray, num_classes: int, metric: str) -> float:
  """Mean over seeds of the metric of preds [N] or [S, N]."""
  preds = np.atleast_2d(preds)
  return float(scores_from_confusions(confusions(labels, preds, num_classes), metric).mean())


def _check(labels, preds_a, preds_b, num_classes):
  labels = np.asarray(labels, np.int64)
  preds_a, preds_b = np.atleast_2d(preds_a).astype(np.int64), np.atleast_2d(preds_b).astype(np.int64)
  if labels.ndim != 1 or not labels.size:
    raise ValueError(f'labels must be a non-empty 1-D array, got shape {labels.shape}.')
  for name, p in (('preds_a', preds_a), ('preds_b', preds_b)):
    if p.ndim != 2 or p.shape[1] != labels.size:
      raise ValueError(f'{name} must be [N] or [seeds, N] with N = {labels.size} utterances, '
                       f'got shape {p.shape}.')
    if p.min() < 0 or p.max() >= num_classes:
      raise ValueError(f'{name} holds classes outside [0, {num_classes}).')
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f'labels must be in [0, {num_classes}); drop unlabeled utterances first.')
  return labels, preds_a, preds_b


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Outcome of a paired test of A against B (difference = A - B)."""
  metric: str
  score_a: float
  score_b: float
  difference: float
  ci_low: float
  ci_high: float
  confidence: float
  p_value: float
  samples: int
  method: str

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def paired_bootstrap(labels, preds_a, preds_b, num_classes: int, *, metric: str = 'weighted_f1',
                     samples: int = 1000, confidence: float = 0.95, seed: int = 0,
                     chunk: int = 100) -> Comparison:
  """Percentile CI of score(A) - score(B) and a two-sided p-value, resampling utterances.

  The same resampled utterances score every seed of A and of B (the pairing).
  """
  labels, preds_a, preds_b = _check(labels, preds_a, preds_b, num_classes)
  if not 0.0 < confidence < 1.0:
    raise ValueError(f'confidence must be in (0, 1), got {confidence}.')
  score_a = system_score(labels, preds_a, num_classes, metric)
  score_b = system_score(labels, preds_b, num_classes, metric)
  observed = score_a - score_b
  rng = np.random.default_rng(seed)
  n = labels.size
  diffs = []
  for start in range(0, samples, chunk):
    idx = rng.integers(0, n, size=(min(chunk, samples - start), n))
    resampled = labels[idx][:, None, :]
    a = scores_from_confusions(confusions(resampled, preds_a[:, idx].transpose(1, 0, 2),
                                          num_classes), metric).mean(axis=1)
    b = scores_from_confusions(confusions(resampled, preds_b[:, idx].transpose(1, 0, 2),
                                          num_classes), metric).mean(axis=1)
    diffs.append(a - b)
  diffs = np.concatenate(diffs)
  tail = (1.0 - confidence) / 2.0
  low, high = np.quantile(diffs, [tail, 1.0 - tail])
  # Centred at the observed difference, the resamples approximate the null distribution.
  extreme = np.sum(np.abs(diffs - observed) >= abs(observed) - 1e-12)
  return Comparison(metric=metric, score_a=score_a, score_b=score_b, difference=observed,
                    ci_low=float(low), ci_high=float(high), confidence=confidence,
                    p_value=float((extreme + 1) / (samples + 1)), samples=samples,
                    method='paired bootstrap')


def approximate_randomization(labels, preds_a, preds_b, num_classes: int, *,
                              metric: str = 'weighted_f1', samples: int = 1000, seed: int = 0,
                              chunk: int = 100) -> float:
  """Two-sided p-value of score(A) - score(B) under random swaps of A's and B's predictions.

  With several seeds, A and B must have the same number; a swap exchanges the whole column of
  an utterance's seed predictions.
  """
  labels, preds_a, preds_b = _check(labels, preds_a, preds_b, num_classes)
  if preds_a.shape != preds_b.shape:
    raise ValueError(f'approximate randomization needs as many seeds of A as of B, got '
                     f'{preds_a.shape[0]} and {preds_b.shape[0]}.')
  observed = abs(system_score(labels, preds_a, num_classes, metric) -
                 system_score(labels, preds_b, num_classes, metric))
  rng = np.random.default_rng(seed)
  extreme = 0
  for start in range(0, samples, chunk):
    swap = rng.random((min(chunk, samples - start), 1, labels.size)) < 0.5
    a = np.where(swap, preds_b[None], preds_a[None])
    b = np.where(swap, preds_a[None], preds_b[None])
    diff = (scores_from_confusions(confusions(labels, a, num_classes), metric).mean(axis=1) -
            scores_from_confusions(confusions(labels, b, num_classes), metric).mean(axis=1))
    extreme += int(np.sum(np.abs(diff) >= observed - 1e-12))
  return float((extreme + 1) / (samples + 1))
