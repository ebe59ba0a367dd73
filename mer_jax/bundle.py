"""The layout of a model bundle: a folder that `mer_jax.export` writes from a trained workdir and
`mer_jax.load` (or `predict --workdir`) reads without it, on any machine.

  bundle.json          what this is: format, stage predicted, the stages and files it holds,
                       label names, modalities, the mer_jax version and commit that trained it
  config.json          the run's config (as the checkpoints hold it)
  checkpoints/<stage>/best/   the best weights of each stage prediction runs (and text_finetune/
                       when the text encoder was fine-tuned), as training saved them
  text_encoder/        the text encoder's weights and tokenizer (models that read text)
  av/lipsync/          the trained LipSyncNet (checkpoints/lipsync/best, done.json) and
  av/audio_encoder/, av/visual_encoder/   the clip encoders' weights (models trained from
                       clips; an encoder initialised at random from the config has no folder)
  results.json         the run's results (test metrics of every stage)
  reports/             the test reports of the stages it holds
  README.md            the model card
"""

from __future__ import annotations

import json
import os

from mer_jax import errors

FORMAT = 'mer_jax.bundle/1'
MANIFEST = 'bundle.json'
CONFIG = 'config.json'
CHECKPOINTS = 'checkpoints'
TEXT_ENCODER = 'text_encoder'
LIPSYNC = os.path.join('av', 'lipsync')
AV_ENCODERS = {'audio_encoder': os.path.join('av', 'audio_encoder'),
               'visual_encoder': os.path.join('av', 'visual_encoder')}
RESULTS = 'results.json'
REPORTS = 'reports'
CARD = 'README.md'


class BundleError(errors.UserError):
  """A folder that should be a model bundle is not a readable one (the message names the file)."""


def is_bundle(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MANIFEST))


def read_manifest(path: str) -> dict:
  """bundle.json of the bundle at `path`, checked for a format this version reads."""
  manifest_path = os.path.join(path, MANIFEST)
  try:
    with open(manifest_path, encoding='utf-8') as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise BundleError(f'{manifest_path}: cannot be read ({e})') from None
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    found = manifest.get('format') if isinstance(manifest, dict) else None
    raise BundleError(f'{manifest_path}: format {found!r}; this mer_jax reads {FORMAT!r}')
  return manifest


def text_encoder_dir(path: str) -> str:
  """The bundle's text encoder folder, or '' when the model reads no text through one."""
  folder = os.path.join(path, TEXT_ENCODER)
  return folder if os.path.isdir(folder) else ''


def av_front_end_dirs(path: str, manifest: dict) -> dict | None:
  """Where the bundle keeps the AV front end of a model trained from clips: {'lipsync',
  'audio_encoder', 'visual_encoder'} folders (None: not shipped; for an encoder, the config's own
  checkpoint or random initialisation), or None for a model not trained from clips."""
  shipped = manifest.get('av_front_end')
  if not shipped:
    return None
  out = {'lipsync': os.path.join(path, shipped['lipsync']) if shipped.get('lipsync') else None}
  for name in AV_ENCODERS:
    entry = shipped.get(name) or {}
    out[name] = os.path.join(path, entry['path']) if entry.get('path') else None
  return out
