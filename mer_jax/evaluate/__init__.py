"""Evaluation: classification metrics and reports."""

from mer_jax.evaluate.metrics import classification_metrics
from mer_jax.evaluate.metrics import confusion_matrix
from mer_jax.evaluate.metrics import per_class_scores
from mer_jax.evaluate.report import format_report
from mer_jax.evaluate.report import save_confusion_matrix_png
from mer_jax.evaluate.report import save_confusion_png
from mer_jax.evaluate.report import write_report

__all__ = [
    'classification_metrics',
    'confusion_matrix',
    'format_report',
    'per_class_scores',
    'save_confusion_matrix_png',
    'save_confusion_png',
    'write_report',
]
