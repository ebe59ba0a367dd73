"""Human-readable evaluation reports: a text table, a JSON record and a confusion-matrix image."""

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np


def _percent(value: float) -> str:
  return f'{100.0 * value:.2f}'


def _confusion_and_names(metrics: Mapping[str, Any]) -> tuple[np.ndarray, list[str]]:
  for key in ('per_class', 'confusion', 'weighted_f1', 'macro_f1', 'accuracy', 'num_examples'):
    if key not in metrics:
      raise ValueError(f'metrics has no key {key!r}; expected the dict of '
                       f'classification_metrics.')
  names = list(metrics.get('label_names') or metrics['per_class'])
  confusion = np.asarray(metrics['confusion'], np.int64)
  if confusion.shape != (len(names), len(names)):
    raise ValueError(f'metrics["confusion"] has shape {confusion.shape}, expected '
                     f'{(len(names), len(names))} for classes {names}.')
  return confusion, names


def format_report(metrics: Mapping[str, Any], title: str) -> str:
  """Per-class precision/recall/F1 (%) and support, the averages, and the confusion matrix.

  The confusion matrix has one row per true label and one column per prediction.
  """
  confusion, names = _confusion_and_names(metrics)
  name_width = max(len('weighted F1'), *(len(n) for n in names))
  lines = [title, '=' * len(title)]
  header = f'{"class":<{name_width}}  {"precision":>9}  {"recall":>9}  {"F1":>9}  {"support":>8}'
  lines += [header, '-' * len(header)]
  for name in names:
    row = metrics['per_class'][name]
    lines.append(f'{name:<{name_width}}  {_percent(row["precision"]):>9}  '
                 f'{_percent(row["recall"]):>9}  {_percent(row["f1"]):>9}  '
                 f'{int(row["support"]):>8d}')
  lines.append('-' * len(header))
  total = int(metrics['num_examples'])
  for label, key in (('accuracy', 'accuracy'), ('macro F1', 'macro_f1'),
                     ('weighted F1', 'weighted_f1')):
    lines.append(f'{label:<{name_width}}  {"":>9}  {"":>9}  {_percent(metrics[key]):>9}  '
                 f'{total:>8d}')

  lines += ['', 'Confusion matrix (rows: true label, columns: prediction)']
  cell = max(len(str(int(confusion.max()))) if confusion.size else 1, *(len(n) for n in names))
  row_name_width = max(len(n) for n in names)
  lines.append(' ' * row_name_width + '  ' + '  '.join(f'{n:>{cell}}' for n in names))
  for name, counts in zip(names, confusion):
    lines.append(f'{name:<{row_name_width}}  ' + '  '.join(f'{int(c):>{cell}d}' for c in counts))
  return '\n'.join(lines) + '\n'


def save_confusion_png(metrics: Mapping[str, Any], path: str, title: str) -> None:
  """Row-normalised confusion heat map of a report, with the raw counts written in each cell."""
  confusion, names = _confusion_and_names(metrics)
  save_confusion_matrix_png(confusion, names, path, title)


def save_confusion_matrix_png(confusion: np.ndarray, names, path: str, title: str) -> None:
  """Row-normalised heat map of counts [C, C] (row = true label), the counts in each cell."""
  confusion = np.asarray(confusion, np.int64)
  row_totals = confusion.sum(axis=1, keepdims=True)
  normalized = np.divide(confusion, row_totals, out=np.zeros(confusion.shape, np.float64),
                         where=row_totals > 0)
  size = 1.0 + 0.75 * len(names)
  # Imported here: a command that draws no confusion matrix does not pay for matplotlib.
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  # An explicit Agg canvas: no pyplot, so no global backend state and no display needed.
  fig = figure.Figure(figsize=(size + 1.5, size))
  backend_agg.FigureCanvasAgg(fig)
  ax = fig.subplots()
  image = ax.imshow(normalized, cmap='Blues', vmin=0.0, vmax=1.0)
  fig.colorbar(image, ax=ax, label='fraction of true label')
  ticks = np.arange(len(names))
  ax.set_xticks(ticks, labels=names, rotation=45, ha='right')
  ax.set_yticks(ticks, labels=names)
  ax.set_xlabel('predicted label')
  ax.set_ylabel('true label')
  ax.set_title(title)
  for i in range(len(names)):
    for j in range(len(names)):
      color = 'white' if normalized[i, j] > 0.5 else 'black'
      ax.text(j, i, str(int(confusion[i, j])), ha='center', va='center', color=color,
              fontsize=8)
  fig.tight_layout()
  fig.savefig(path, format='png', dpi=120)


def write_report(metrics: Mapping[str, Any], out_dir: str, name: str, *,
                 png: bool = True) -> dict[str, str]:
  """Writes `{name}.json`, `{name}.txt` and (with `png`) `{name}_confusion.png` into out_dir.

  Returns:
    {'json': path, 'text': path[, 'png': path]}.
  """
  _confusion_and_names(metrics)
  if not name or os.sep in name:
    raise ValueError(f'report name must be a plain file stem, got {name!r}.')
  os.makedirs(out_dir, exist_ok=True)
  paths = {'json': os.path.join(out_dir, f'{name}.json'),
           'text': os.path.join(out_dir, f'{name}.txt')}
  with open(paths['json'], 'w') as f:
    json.dump(metrics, f, indent=2)
  with open(paths['text'], 'w') as f:
    f.write(format_report(metrics, name))
  if png:
    paths['png'] = os.path.join(out_dir, f'{name}_confusion.png')
    save_confusion_png(metrics, paths['png'], name)
  return paths
