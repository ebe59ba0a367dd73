"""Reading finished runs: results, per-stage reports and per-utterance test predictions.

A run is a workdir written by `mer_jax.main` (results.json, reports/, predictions/). A system is
one or more runs of the same configuration with different seeds: a multi-seed directory holds
them as seed_<s>/ subfolders.
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np

from mer_jax import errors

SEED_DIR = re.compile(r'^seed_(\d+)$')


class RunError(errors.UserError):
  """A run folder is missing something the experiment tools need."""


def seed_workdir(experiment_dir: str, seed: int) -> str:
  return os.path.join(experiment_dir, f'seed_{seed}')


def is_finished(workdir: str) -> bool:
  return os.path.isfile(os.path.join(workdir, 'results.json'))


def seed_runs(path: str) -> list[str]:
  """The finished runs of a system: `path` itself if it is a run, else its seed_<s>/ folders."""
  if is_finished(path):
    return [path]
  found = []
  for sub in glob.glob(os.path.join(path, 'seed_*')):
    match = SEED_DIR.match(os.path.basename(sub))
    if match and is_finished(sub):
      found.append((int(match.group(1)), sub))
  if not found:
    raise RunError(f'{path} holds no finished run: no results.json in it or in a seed_<s>/ '
                   f'subfolder.')
  return [sub for _, sub in sorted(found)]


def load_run(workdir: str) -> dict:
  """A finished run's results.json: `mer_jax_version`, `git_commit`, `config` (each None in files
  written before they were recorded) and `stages`."""
  path = os.path.join(workdir, 'results.json')
  try:
    with open(path) as f:
      run = json.load(f)
  except FileNotFoundError as e:
    raise RunError(f'{workdir} has no results.json: the run did not finish.') from e
  except json.JSONDecodeError as e:
    raise RunError(f'{path} is not valid JSON ({e}).') from e
  if 'stages' not in run:  # written before `stages`: the stages at the top, 0-based history
    run = {'stages': {stage: _numbered_from_1(r) for stage, r in run.items()}}
  return {'mer_jax_version': None, 'git_commit': None, 'config': None, **run}


def _numbered_from_1(result: dict) -> dict:
  history = [dict(h, epoch=h['epoch'] + 1) for h in result.get('history', [])]
  return dict(result, history=history) if 'history' in result else result


def load_results(workdir: str) -> dict:
  """{stage: its results} of a finished run, in training order."""
  return load_run(workdir)['stages']


def headline_stage(workdir: str) -> str:
  """The last stage the run trained (fusion in the full system)."""
  results = load_results(workdir)
  if not results:
    raise RunError(f'{workdir}/results.json lists no stage.')
  return list(results)[-1]


def load_report(workdir: str, stage: str) -> dict:
  path = os.path.join(workdir, 'reports', f'{stage}_test.json')
  if not os.path.isfile(path):
    raise RunError(f'{path} does not exist: stage {stage!r} has no test report in {workdir}.')
  with open(path) as f:
    return json.load(f)


def load_test_predictions(workdir: str, stage: str) -> dict[str, np.ndarray]:
  """probs [N, C], labels, records and utterances [N] of a stage's test split."""
  path = os.path.join(workdir, 'predictions', f'{stage}_test.npz')
  if not os.path.isfile(path):
    raise RunError(f'{path} does not exist: stage {stage!r} of {workdir} saved no test '
                   f'predictions (runs before predictions were saved must be rerun).')
  with np.load(path) as data:
    pred = {k: data[k] for k in data.files}
  missing = {'probs', 'labels', 'records', 'utterances'} - set(pred)
  if missing:
    raise RunError(f'{path} lacks arrays {sorted(missing)}.')
  return pred


def aligned_predictions(workdirs: list[str], stage: str) -> tuple[np.ndarray, np.ndarray]:
  """(labels [N], predicted classes [runs, N]) over the labelled test utterances, in one order.

  Utterances are matched by (record, utterance id); every run must hold the same utterances with
  the same labels, or the comparison would not be paired.
  """
  labels, preds, keys = None, [], None
  for workdir in workdirs:
    pred = load_test_predictions(workdir, stage)
    order = np.lexsort((pred['utterances'], pred['records']))
    run_keys = np.stack([pred['records'][order], pred['utterances'][order]], axis=1)
    run_labels = pred['labels'][order]
    if keys is None:
      keys, labels = run_keys, run_labels
    elif run_keys.shape != keys.shape or not np.array_equal(run_keys, keys):
      raise RunError(f'{workdir} stage {stage!r} was tested on other utterances than '
                     f'{workdirs[0]}: the runs do not share a test set.')
    elif not np.array_equal(run_labels, labels):
      raise RunError(f'{workdir} stage {stage!r} has other test labels than {workdirs[0]}.')
    preds.append(pred['probs'][order].argmax(-1))
  labelled = labels >= 0
  return labels[labelled], np.stack(preds)[:, labelled]
