"""Writes a portable model bundle: everything prediction needs from a trained workdir, in one folder
that `mer_jax.load(DIR)` (or `python -m mer_jax.predict --workdir DIR`) reads on any machine.

  python -m mer_jax.export --workdir W --out DIR [--checkpoint_dir C]
  (installed: mer-jax-export --workdir W --out DIR)

The bundle holds the best checkpoints of exactly the stages prediction runs, the config and label
names, the text encoder's weights and tokenizer (a model that reads text), the AV front end's
LipSyncNet and encoder weights (a model trained from clips, where the workdir still has them), the
run's test metrics and reports, and a model card (README.md); mer_jax/bundle.py lists the layout.

--out must not exist or be an empty folder. The bundle is written beside it and renamed into
place once complete, so a refused or failed export leaves nothing behind.
"""

from __future__ import annotations

import datetime
import fnmatch
import os
import shutil
import sys

import ml_collections
from absl import flags

from mer_jax import bundle
from mer_jax import cli
from mer_jax import errors
from mer_jax import files
from mer_jax import predict
from mer_jax import stages
from mer_jax.data import staging
from mer_jax.experiments import runs
from mer_jax.models import hf_checkpoint
from mer_jax.preprocess import raw
from mer_jax.preprocess import text_features
from mer_jax.preprocess import text_finetune
from mer_jax.train import checkpointing

FLAGS = flags.FLAGS


class ExportError(errors.UserError):
  """A workdir that cannot be exported, or an --out that would be overwritten (names the path)."""


def check_out(out: str) -> None:
  if os.path.isdir(out):
    if os.listdir(out):
      raise ExportError(f'--out {out}: is not empty; name a new folder for the bundle')
  elif os.path.lexists(out):
    raise ExportError(f'--out {out}: exists and is not a folder')
  elif not os.path.isdir(os.path.dirname(os.path.abspath(out))):
    raise ExportError(f'--out {out}: folder {os.path.dirname(os.path.abspath(out))} does not '
                      'exist')


def export_bundle(workdir: str, out: str, checkpoint_dir: str = '') -> dict:
  """Writes the bundle of `workdir`'s model to `out`; returns its manifest (bundle.json)."""
  check_out(out)
  directory = checkpoint_dir or os.path.join(workdir, 'checkpoints')
  if staging.is_remote(directory):
    raise ExportError(f'{directory}: export copies local checkpoints; copy them here first and '
                      'pass --checkpoint_dir')
  trained = predict.trained_stages(directory)
  if not trained:
    raise ExportError(f'{directory}: no trained stage checkpoints; is {workdir} a trained workdir?')
  run = runs.load_run(workdir)  # a run that has not finished has no test metrics to ship
  stage = trained[-1]
  ckpt = checkpointing.StageCheckpoints(workdir, stage, read_only=True, directory=directory)
  meta = ckpt.best_meta()
  ckpt.close()
  config = ml_collections.ConfigDict(meta['config'])
  needed = predict.needed_for(stage, config)
  if predict.reads_transcripts(stage, config) and config.text.finetune.enabled:
    needed.append(text_finetune.CHECKPOINT_NAME)
  with files.atomic_folder(out) as tmp:
    for name in needed:
      shutil.copytree(os.path.join(directory, name, 'best'),
                      os.path.join(tmp, bundle.CHECKPOINTS, name, 'best'))
    text_encoder = _copy_text_encoder(stage, config, tmp)
    av = copy_av_front_end(config, workdir, tmp)
    manifest = {
        'format': bundle.FORMAT, 'stage': stage, 'checkpoints': needed,
        'label_names': list(meta['label_names']),
        'modalities': list(stages.modalities_read(stage, config.data.modalities)),
        'reads_transcripts': predict.reads_transcripts(stage, config),
        'text_encoder': text_encoder, 'av_front_end': av,
        'mer_jax_version': run['mer_jax_version'], 'git_commit': run['git_commit'],
        'exported_from': os.path.abspath(workdir),
        'exported_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
    reports = _copy_reports(workdir, run['stages'], needed, tmp)
    files.write_json(os.path.join(tmp, bundle.CONFIG), meta['config'], indent=1)
    files.write_json(os.path.join(tmp, bundle.RESULTS), run, indent=2)
    files.write_json(os.path.join(tmp, bundle.MANIFEST), manifest, indent=1)
    with open(os.path.join(tmp, bundle.CARD), 'w', encoding='utf-8') as f:
      f.write(model_card(manifest, config, run, reports))
  return manifest


def _copy_checkpoint_folder(src: str, dst: str) -> list[str]:
  """The files of a Hugging Face checkpoint folder that loading reads; returns their names."""
  names = sorted(n for n in os.listdir(src) if os.path.isfile(os.path.join(src, n)) and any(
      fnmatch.fnmatch(n, p) for p in hf_checkpoint.FILE_PATTERNS))
  os.makedirs(dst)
  for name in names:
    shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
  return names


def _copy_text_encoder(stage: str, config, out_dir: str) -> dict | None:
  if not predict.reads_transcripts(stage, config):
    return None
  folder = text_features.resolve_encoder(config.text.encoder)
  names = _copy_checkpoint_folder(folder, os.path.join(out_dir, bundle.TEXT_ENCODER))
  return {'name': config.text.encoder, 'files': names,
          'finetuned': bool(config.text.finetune.enabled)}


def copy_av_front_end(config, workdir: str, out_dir: str) -> dict | None:
  """The LipSyncNet and the clip encoders of a run trained from clips (for predicting from new
  clips); what the workdir no longer has is recorded as missing rather than refused."""
  if config.data.source != 'raw':
    return None
  shipped = {}
  lipsync = raw.trained_lipsync_dir(config, workdir)
  if lipsync is None:
    shipped['lipsync'] = None
  else:
    dst = os.path.join(out_dir, bundle.LIPSYNC)
    shutil.copytree(os.path.join(lipsync, 'checkpoints', 'lipsync', 'best'),
                    os.path.join(dst, 'checkpoints', 'lipsync', 'best'))
    shutil.copy2(os.path.join(lipsync, raw.LIPSYNC_DONE), os.path.join(dst, raw.LIPSYNC_DONE))
    shipped['lipsync'] = bundle.LIPSYNC
  for name, path in bundle.AV_ENCODERS.items():
    source = config.raw[name].checkpoint
    if not source:
      shipped[name] = {'random_init_seed': int(config.raw.encoder_seed)}
    elif os.path.isdir(source):
      shipped[name] = {'name': source, 'path': path,
                       'files': _copy_checkpoint_folder(source, os.path.join(out_dir, path))}
    else:
      shipped[name] = {'name': source, 'path': None}
  return shipped


def _copy_reports(workdir: str, results: dict, needed: list[str], out_dir: str) -> dict[str, str]:
  """Copies the test reports of the bundled stages; returns {stage: report text}."""
  texts = {}
  for name in needed:
    if name not in results:
      continue
    for ext in ('.txt', '.json'):
      src = os.path.join(workdir, 'reports', f'{name}_test{ext}')
      if os.path.isfile(src):
        os.makedirs(os.path.join(out_dir, bundle.REPORTS), exist_ok=True)
        shutil.copy2(src, os.path.join(out_dir, bundle.REPORTS, os.path.basename(src)))
        if ext == '.txt':
          with open(src, encoding='utf-8') as f:
            texts[name] = f.read()
  return texts


def _pct(value) -> str:
  return '-' if value is None else f'{100 * value:.2f}'


def model_card(manifest: dict, config, run: dict, reports: dict[str, str]) -> str:
  """README.md of a bundle: what the model labels, how to use it, its test results and how it
  was trained."""
  stage, labels = manifest['stage'], manifest['label_names']
  names = [predict.MODALITY_NAMES[m] for m in manifest['modalities']]
  inputs = [f'features.{m} ({int(config.data.dims[m])} numbers)' for m in manifest['modalities']]
  if manifest['reads_transcripts']:
    inputs.append(f'"text" (encoded with {manifest["text_encoder"]["name"]}'
                  + (', fine-tuned' if manifest['text_encoder']['finetuned'] else '') + ')')
  if predict.reads_clips(stage, config):
    inputs.append('"video" and/or "audio" (clips, read through the run\'s front end: faces, '
                  'LipSyncNet, the audio and visual encoders; docs/predict_api.md)')
  lines = [
      f'# mer_jax model: {stage} ({", ".join(names)})', '',
      f'Emotion recognition in conversation: labels every utterance of a dialogue with one of '
      f'{len(labels)} classes ({", ".join(labels)}).', '',
      '## Use', '', '```python', 'import mer_jax', '',
      "model = mer_jax.load('path/to/this/folder')",
      "rows = model.predict([{'dialogue_id': 'd1', 'utterances': [",
      "    {'speaker': 'Ann', 'text': '...', 'features': {...}}]}])",
      "rows[0]['emotion'], rows[0]['probabilities'], rows[0]['modalities']", '```', '',
      'or `python -m mer_jax.predict --workdir path/to/this/folder --input dialogues.jsonl`.',
      f'Each utterance needs at least one of: {"; ".join(inputs)}.', '',
      '## Test results', '',
      '| stage | test weighted F1 | test macro F1 | test accuracy | dev weighted F1 | best epoch |',
      '|---|---|---|---|---|---|']
  for name, r in run['stages'].items():
    lines.append(f'| {name}{" (this model)" if name == stage else ""} | '
                 f'{_pct(r.get("test_weighted_f1"))} | {_pct(r.get("test_macro_f1"))} | '
                 f'{_pct(r.get("test_accuracy"))} | {_pct(r.get("dev_weighted_f1"))} | '
                 f'{r.get("best_epoch", "-")} |')
  if stage in reports:
    lines += ['', f'Test report of {stage} (split {config.data.test_split!r}):', '', '```',
              reports[stage].rstrip('\n'), '```']
  data = config.data
  lines += [
      '', '## How it was trained', '',
      f'- mer_jax {run["mer_jax_version"] or "(version unknown)"}, git commit '
      f'{run["git_commit"] or "(unknown)"}',
      f'- data: source {data.source!r}, splits {data.train_split}/{data.dev_split}/'
      f'{data.test_split}, modalities {list(data.modalities)}',
      f'- stages {list(config.train.stages)}, up to {config.train.epochs} epochs each (best dev '
      f'weighted F1 kept), seed {config.seed}',
      f'- the whole config: {bundle.CONFIG}; every stage\'s results and history: '
      f'{bundle.RESULTS}',
      f'- exported from {manifest["exported_from"]} at {manifest["exported_at"]}', '']
  return '\n'.join(lines)


def define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'A workdir trained by mer_jax.main (a finished run).')
  flags.DEFINE_string('out', None, 'The bundle folder to write: new, or an empty folder.')
  flags.DEFINE_string(
      'checkpoint_dir', '', 'Where the run kept its checkpoints, if train.checkpoint_dir moved '
      'them; default: workdir/checkpoints.')
  flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  del argv
  manifest = export_bundle(FLAGS.workdir, FLAGS.out, FLAGS.checkpoint_dir)
  print(f'wrote the {manifest["stage"]} model ({", ".join(manifest["checkpoints"])}) to '
        f'{FLAGS.out}', file=sys.stderr)


def run(argv=None) -> None:
  """The `mer-jax-export` console script."""
  cli.run_absl(main, doc=__doc__, define_flags=define_flags, argv=argv,
               quiet_libraries=True)


if __name__ == '__main__':
  run()
