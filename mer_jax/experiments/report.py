"""The results page of a sweep: tables like the paper's, confusion matrices and training curves.

Written into <experiment>/report/ as index.md and index.html (the same content), with one
confusion-matrix image (summed over seeds) and one training-curve image per variant.
"""

from __future__ import annotations

import html
import os

from matplotlib.backends import backend_agg
from matplotlib import figure
from matplotlib import ticker
import numpy as np

from mer_jax import evaluate
from mer_jax.experiments.seeds import pct


def _signed(value: float) -> str:
  return f'{100 * value:+.2f}'


def comparison_cells(comparison: dict | None) -> list[str]:
  if comparison is None:
    return ['(reference)', '', '']
  ci = (f'{_signed(comparison["difference"])} [{_signed(comparison["ci_low"])}, '
        f'{_signed(comparison["ci_high"])}]')
  ar = comparison.get('p_randomization')
  return [ci, f'{comparison["p_value"]:.3f}', '' if ar is None else f'{ar:.3f}']


def save_curves_png(summary: dict, path: str, title: str) -> None:
  """Dev weighted F1 per epoch of every seed (thin) and their mean (thick), one panel per stage."""
  stages = list(summary['stages'])
  fig = figure.Figure(figsize=(4.0 * len(stages), 3.2))
  backend_agg.FigureCanvasAgg(fig)
  axes = np.atleast_1d(fig.subplots(1, len(stages), squeeze=False)[0])
  for ax, stage in zip(axes, stages):
    curves = [[100 * h['dev_weighted_f1'] for h in r['history']]
              for r in summary['stages'][stage]['per_seed'] if r['history']]
    for curve in curves:
      ax.plot(np.arange(1, len(curve) + 1), curve, color='tab:blue', alpha=0.35, linewidth=1)
    if curves:
      longest = max(len(c) for c in curves)
      mean = [np.mean([c[e] for c in curves if len(c) > e]) for e in range(longest)]
      ax.plot(np.arange(1, longest + 1), mean, color='tab:blue', linewidth=2.5, label='mean')
    ax.set_title(stage)
    ax.set_xlabel('epoch')
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_ylabel('dev weighted F1 (%)')
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, format='png', dpi=100)


def save_mean_confusion_png(stage_summary: dict, path: str, title: str) -> None:
  """Row-normalised confusion of the seeds' summed counts (= mean of the per-seed rates)."""
  evaluate.save_confusion_matrix_png(stage_summary['confusion_sum'],
                                     stage_summary['label_names'], path, title)


def build_blocks(title: str, reference: str, summaries: dict, comparisons: dict,
                 images: dict, notes: list[str]) -> list[tuple]:
  """The page as blocks: ('h1'|'h2'|'p', text), ('table', header, rows), ('img', file, alt)."""
  blocks: list[tuple] = [('h1', title)]
  blocks += [('p', n) for n in notes]
  rows = []
  for name, summary in summaries.items():
    head = summary['stages'][summary['headline_stage']]
    rows.append([name, summary['headline_stage'], str(len(summary['runs'])),
                 pct(head['weighted_f1']), pct(head['macro_f1']), pct(head['accuracy']),
                 *comparison_cells(comparisons.get(name))])
  blocks += [('h2', 'Main results (test, mean ± sd over seeds)'),
             ('table', ['variant', 'stage', 'seeds', 'weighted F1', 'macro F1', 'accuracy',
                        f'Δ weighted F1 vs {reference} [95% CI]', 'p (bootstrap)',
                        'p (randomization)'], rows)]
  stage_names = []
  for summary in summaries.values():
    stage_names += [s for s in summary['stages'] if s not in stage_names]
  rows = [[name] + [pct(s['stages'][st]['weighted_f1']) if st in s['stages'] else ''
                    for st in stage_names] for name, s in summaries.items()]
  blocks += [('h2', 'Every stage (test weighted F1, mean ± sd)'),
             ('table', ['variant'] + stage_names, rows)]
  classes = None
  rows = []
  for name, summary in summaries.items():
    head = summary['stages'][summary['headline_stage']]
    classes = classes or head['label_names']
    rows.append([name] + [pct(head['per_class_f1'][c]) for c in classes])
  blocks += [('h2', 'Per-class F1 of each variant\'s final stage (mean ± sd)'),
             ('table', ['variant'] + list(classes or []), rows)]
  blocks.append(('h2', 'Confusion matrices (final stage, counts summed over seeds) and '
                       'dev curves'))
  for name, files in images.items():
    blocks.append(('h2', name))
    blocks += [('img', f, f'{name} {kind}') for kind, f in files.items()]
  return blocks


def to_markdown(blocks) -> str:
  lines = []
  for block in blocks:
    kind = block[0]
    if kind == 'h1':
      lines += [f'# {block[1]}', '']
    elif kind == 'h2':
      lines += [f'## {block[1]}', '']
    elif kind == 'p':
      lines += [block[1], '']
    elif kind == 'table':
      header, rows = block[1], block[2]
      lines.append('| ' + ' | '.join(header) + ' |')
      lines.append('|' + ' --- |' * len(header))
      lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
      lines.append('')
    elif kind == 'img':
      lines += [f'![{block[2]}]({block[1]})', '']
  return '\n'.join(lines)


def to_html(blocks) -> str:
  esc = html.escape
  body = []
  for block in blocks:
    kind = block[0]
    if kind in ('h1', 'h2', 'p'):
      body.append(f'<{kind}>{esc(block[1])}</{kind}>')
    elif kind == 'table':
      head = ''.join(f'<th>{esc(h)}</th>' for h in block[1])
      rows = ''.join('<tr>' + ''.join(f'<td>{esc(c)}</td>' for c in row) + '</tr>'
                     for row in block[2])
      body.append(f'<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>')
    elif kind == 'img':
      body.append(f'<img src="{esc(block[1])}" alt="{esc(block[2])}">')
  style = ('body{font-family:sans-serif;max-width:1200px;margin:2em auto}'
           'table{border-collapse:collapse;margin:1em 0}'
           'td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}'
           'td:first-child,th:first-child{text-align:left}img{max-width:100%}')
  title = esc(blocks[0][1]) if blocks and blocks[0][0] == 'h1' else 'results'
  return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title>'
          f'<style>{style}</style></head><body>\n' + '\n'.join(body) + '\n</body></html>\n')


def write_report(out_dir: str, title: str, reference: str, summaries: dict, comparisons: dict,
                 notes: list[str]) -> dict[str, str]:
  """Writes index.md, index.html and the images; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  images = {}
  for name, summary in summaries.items():
    stage = summary['headline_stage']
    safe = ''.join(ch if ch.isalnum() or ch in '-_' else '_' for ch in name)
    files = {'confusion': f'confusion_{safe}.png', 'curves': f'curves_{safe}.png'}
    save_mean_confusion_png(summary['stages'][stage], os.path.join(out_dir, files['confusion']),
                            f'{name}: {stage}, {len(summary["runs"])} seed(s)')
    save_curves_png(summary, os.path.join(out_dir, files['curves']), name)
    images[name] = files
  blocks = build_blocks(title, reference, summaries, comparisons, images, notes)
  paths = {'markdown': os.path.join(out_dir, 'index.md'),
           'html': os.path.join(out_dir, 'index.html')}
  with open(paths['markdown'], 'w') as f:
    f.write(to_markdown(blocks))
  with open(paths['html'], 'w') as f:
    f.write(to_html(blocks))
  return paths
