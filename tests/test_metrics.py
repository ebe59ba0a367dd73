"""Metrics against scikit-learn and a hand-computed case; report files."""

import json
import os

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from mer_jax import evaluate

MELD_LABELS = ('neutral', 'surprise', 'fear', 'sadness', 'joy', 'disgust', 'anger')


def test_hand_computed_case():
  # Classes a, b, c. Labeled pairs (true, pred): (a,a) (a,b) (b,b) (b,b) (c,a) and one ignored.
  labels = [0, 0, 1, 1, 2, -1]
  preds = [0, 1, 1, 1, 0, 2]
  m = evaluate.classification_metrics(labels, preds, ['a', 'b', 'c'])
  assert m['confusion'] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
  assert m['num_examples'] == 5
  assert m['accuracy'] == pytest.approx(3 / 5)
  # a: P = 1/2, R = 1/2, F1 = 1/2. b: P = 2/3, R = 1, F1 = 0.8. c: all 0 (zero division).
  assert m['per_class']['a'] == pytest.approx(
      {'precision': 0.5, 'recall': 0.5, 'f1': 0.5, 'support': 2})
  assert m['per_class']['b'] == pytest.approx(
      {'precision': 2 / 3, 'recall': 1.0, 'f1': 0.8, 'support': 2})
  assert m['per_class']['c'] == {'precision': 0.0, 'recall': 0.0, 'f1': 0.0, 'support': 1}
  assert m['macro_f1'] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
  assert m['weighted_f1'] == pytest.approx((2 * 0.5 + 2 * 0.8 + 1 * 0.0) / 5)


@pytest.mark.parametrize('seed', range(6))
def test_parity_with_sklearn_on_random_inputs(seed):
  rng = np.random.default_rng(seed)
  n, num_classes = 200, len(MELD_LABELS)
  labels = rng.integers(0, num_classes, n)
  preds = rng.integers(0, num_classes, n)
  if seed % 2:  # 'fear' never true; 'disgust' in neither labels nor predictions.
    labels[labels == 2] = 0
    labels[labels == 5] = 1
    preds[preds == 5] = 3
  if seed % 3 == 0:  # 'joy' never predicted.
    preds[preds == 4] = 6
  padded_labels = np.concatenate([labels, -np.ones(13, int)])
  padded_preds = np.concatenate([preds, rng.integers(0, num_classes, 13)])

  m = evaluate.classification_metrics(padded_labels, padded_preds, MELD_LABELS)
  assert m['weighted_f1'] == pytest.approx(
      sk_metrics.f1_score(labels, preds, average='weighted', zero_division=0), abs=1e-12)
  assert m['macro_f1'] == pytest.approx(
      sk_metrics.f1_score(labels, preds, average='macro', zero_division=0), abs=1e-12)
  assert m['accuracy'] == pytest.approx(sk_metrics.accuracy_score(labels, preds), abs=1e-12)
  precision, recall, f1, support = sk_metrics.precision_recall_fscore_support(
      labels, preds, labels=np.arange(num_classes), zero_division=0)
  for c, name in enumerate(MELD_LABELS):
    row = m['per_class'][name]
    assert row['precision'] == pytest.approx(precision[c], abs=1e-12)
    assert row['recall'] == pytest.approx(recall[c], abs=1e-12)
    assert row['f1'] == pytest.approx(f1[c], abs=1e-12)
    assert row['support'] == support[c]
  np.testing.assert_array_equal(
      m['confusion'], sk_metrics.confusion_matrix(labels, preds, labels=np.arange(num_classes)))
  np.testing.assert_array_equal(
      evaluate.confusion_matrix(padded_labels, padded_preds, num_classes), m['confusion'])


@pytest.mark.parametrize('labels, preds, names, message', [
    ([0, 1], [0], ['a', 'b'], 'same number of entries'),
    ([0, 2], [0, 1], ['a', 'b'], 'labels must be < num_classes = 2'),
    ([0, 1], [0, 2], ['a', 'b'], r'preds of labeled entries must be in \[0, 2\), found \[2\]'),
    ([-1, -1], [0, 1], ['a', 'b'], 'No labeled examples'),
    ([0, 1], [0, 1], ['a', 'a'], 'duplicates'),
    ([0.5, 1], [0, 1], ['a', 'b'], 'integer class indices'),
])
def test_bad_inputs_raise(labels, preds, names, message):
  with pytest.raises(ValueError, match=message):
    evaluate.classification_metrics(labels, preds, names)


def test_prediction_of_ignored_entries_is_not_checked():
  m = evaluate.classification_metrics([0, -1], [0, 99], ['a', 'b'])
  assert m['num_examples'] == 1 and m['accuracy'] == 1.0


def _sample_metrics():
  rng = np.random.default_rng(7)
  labels = rng.integers(0, 7, 120)
  preds = np.where(rng.random(120) < 0.6, labels, rng.integers(0, 7, 120))
  return evaluate.classification_metrics(labels, preds, MELD_LABELS)


def test_format_report_table_and_confusion():
  m = evaluate.classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ['a', 'b', 'c'])
  text = evaluate.format_report(m, 'dev')
  lines = text.splitlines()
  assert lines[0] == 'dev'
  row_b = next(line for line in lines if line.startswith('b '))
  assert row_b.split() == ['b', '66.67', '100.00', '80.00', '2']
  weighted = next(line for line in lines if line.startswith('weighted F1'))
  assert weighted.split()[-2:] == ['52.00', '5']
  confusion_at = lines.index('Confusion matrix (rows: true label, columns: prediction)')
  assert lines[confusion_at + 1].split() == ['a', 'b', 'c']
  assert [line.split() for line in lines[confusion_at + 2:]] == [
      ['a', '1', '1', '0'], ['b', '0', '2', '0'], ['c', '1', '0', '0']]


def test_write_report_files(tmp_path):
  m = _sample_metrics()
  out_dir = tmp_path / 'reports' / 'test'
  paths = evaluate.write_report(m, str(out_dir), 'fusion_test')
  assert paths == {'json': str(out_dir / 'fusion_test.json'),
                   'text': str(out_dir / 'fusion_test.txt'),
                   'png': str(out_dir / 'fusion_test_confusion.png')}
  with open(paths['json']) as f:
    assert json.load(f) == m
  with open(paths['text']) as f:
    assert f.read() == evaluate.format_report(m, 'fusion_test')
  with open(paths['png'], 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert os.path.getsize(paths['png']) > 5000


def test_write_report_without_png_and_bad_metrics(tmp_path):
  paths = evaluate.write_report(_sample_metrics(), str(tmp_path), 'dev', png=False)
  assert set(paths) == {'json', 'text'}
  assert not (tmp_path / 'dev_confusion.png').exists()
  with pytest.raises(ValueError, match="metrics has no key 'confusion'"):
    evaluate.write_report({'per_class': {}, 'weighted_f1': 0.0}, str(tmp_path), 'x')
