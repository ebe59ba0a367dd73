"""Labels new dialogues with a trained workdir's best checkpoints.

  python -m mer_jax.predict --workdir W --input dialogues.jsonl [--output predictions.jsonl]
  python -m mer_jax.predict --workdir W --input_dir MELD_FOLDER [--split test] [--output ...]
  (installed: mer-jax-predict --workdir W --input dialogues.jsonl ...)

Each input line is one dialogue:
  {"dialogue_id": "d1", "utterances": [
     {"speaker": "Joey", "text": "...", "features": {"t": [...], "a": [...], "v": [...]}}, ...]}
"dialogue_id" (a string or an integer; default: the input's path and line) must be unique in the
file; "utterance_id" (an integer in the int32 range; default: the utterance's position) must be
unique within its dialogue. A modality that is null or absent is treated as missing for that
utterance; an utterance with none of the inputs the model reads is refused, naming it.
For a workdir trained from transcripts or raw clips (data.source 'text_csv' or 'raw'),
text features may be left out: they are computed from each utterance's "text" (and the
dialogue's earlier utterances, for context prompts) with the run's text encoder, fine-tuned
weights included. The config and label names are read from the checkpoints, so only the workdir
(or a bundle written by mer_jax.export) is needed. In Python, `mer_jax.load(path).predict(...)`
does the same with in-memory dialogues (docs/predict_api.md).

A model trained from raw clips (data.source 'raw', a stage reading audio or video) also reads
clips: an utterance's "video" (an .mp4; its own audio unless "audio" names another file) or
"audio" alone, paths relative to the JSONL file's folder. They go through the run's front end
(mer_jax/preprocess/clip_features.py: decoding, face tracks, the trained LipSyncNet's speaker
choice, the run's audio and visual encoders). A clip that cannot be read is listed on stderr and
in its row ("clip": {"error": ...}) and counted; its utterance is labelled from its other inputs
(its text), or refused, naming it, when it has none. Other models refuse clips.
--input_dir reads a folder in MELD layout instead of a JSONL file: the run's raw.csv_pattern CSV
for --split (default: the run's test split) and its dia{D}_utt{U}.mp4 clips in
MELD_FOLDER/<raw.split_folders[split]> (or in MELD_FOLDER itself).

predict never writes over its input: --input and --output are checked before any model loads
(the output is not the input, not a folder, and its folder exists and is writable), and the
output appears only once complete (written beside it, then renamed).
"""

from __future__ import annotations

import json
import os
import sys
import weakref
from typing import Any, Iterable, Iterator, Sequence

import ml_collections
import numpy as np
from absl import flags
from etils import epath

from mer_jax import bundle
from mer_jax import cli
from mer_jax import errors
from mer_jax import files
from mer_jax import stages
from mer_jax.data import dialogue_csv
from mer_jax.data import shards
from mer_jax.data import sources
from mer_jax.preprocess import clip_features
from mer_jax.preprocess import raw
from mer_jax.preprocess import text_features
from mer_jax.train import checkpointing
from mer_jax.train import inference
from mer_jax.train import sharding
from mer_jax.train import stacking

FLAGS = flags.FLAGS


_INT32 = np.iinfo(np.int32)
CLIP_KEYS = ('video', 'audio')  # an utterance's media files
MODALITY_NAMES = {'t': 'text', 'a': 'audio', 'v': 'visual'}


class PredictInputError(errors.UserError):
  """A problem in the dialogues given to predict (the message names the line and key), or in the
  --input and --output paths (the message names the path)."""


def _shown(value: Any) -> str:
  """A JSON value as the input wrote it, shortened, for messages."""
  text = json.dumps(value)
  return text if len(text) <= 40 else text[:37] + '...'


def _dialogue_id(obj: dict, where: str) -> str:
  if 'dialogue_id' not in obj:
    return where
  value = obj['dialogue_id']
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise PredictInputError(f'{where}: dialogue_id: expected a string or an integer, got '
                            f'{_shown(value)}')
  if isinstance(value, str) and not value.strip():
    raise PredictInputError(f'{where}: dialogue_id: empty')
  return str(value)


def _utterance_id(value: Any, key: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise PredictInputError(f'{key}.utterance_id: expected an integer, got {_shown(value)}')
  if not _INT32.min <= value <= _INT32.max:
    raise PredictInputError(f'{key}.utterance_id: {_shown(value)} is outside the int32 range '
                            f'[{_INT32.min}, {_INT32.max}]')
  return value


def _clip_request(u: dict, key: str, base_dir: str) -> clip_features.ClipRequest:
  paths = {}
  for name in CLIP_KEYS:
    value = u.get(name)
    if value is None:
      continue
    if not isinstance(value, str) or not value.strip():
      raise PredictInputError(f'{key}.{name}: expected the path of a media file, got '
                              f'{_shown(value)}')
    paths[name] = os.path.join(base_dir, value)
  return clip_features.ClipRequest(**paths)


def parse_dialogue(obj: Any, where: str, modalities: Sequence[str], dims: dict[str, int],
                   text_from_transcripts: bool = False, clips: list | None = None,
                   base_dir: str = ''):
  """One JSON dialogue -> DialogueRecord (labels -1); errors name the line and key.

  With `text_from_transcripts`, missing text features are left for the caller to compute from
  the transcripts, so every utterance needs a non-empty "text" (or a clip).
  `clips`: for a model that reads clips, a list that gets this dialogue's ClipRequest (or None)
  per utterance, paths joined to `base_dir`; without it, an utterance naming a clip is refused.
  """
  if not isinstance(obj, dict):
    raise PredictInputError(f'{where}: expected a JSON object, got {type(obj).__name__}')
  utts = obj.get('utterances')
  if not isinstance(utts, list) or not utts:
    raise PredictInputError(f'{where}: "utterances" must be a non-empty list')
  dialogue_id = _dialogue_id(obj, where)
  speakers, texts, uids, requests = [], [], [], []
  first_with_id: dict[int, int] = {}  # utterance id -> index of the first utterance with it
  feats = {m: np.zeros((len(utts), dims[m]), np.float32) for m in modalities}
  present = {m: np.zeros(len(utts), bool) for m in modalities}
  for i, u in enumerate(utts):
    key = f'{where}: utterances[{i}]'
    if not isinstance(u, dict):
      raise PredictInputError(f'{key}: expected an object')
    for name in ('speaker', 'text'):  # null is as if absent
      if u.get(name) is not None and not isinstance(u[name], str):
        raise PredictInputError(f'{key}.{name}: expected a string, got {_shown(u[name])}')
    named = [name for name in CLIP_KEYS if u.get(name) is not None]
    if named and clips is None:
      raise PredictInputError(f'{key}.{named[0]}: this model cannot read clips; give the '
                              'utterance\'s "features" or "text" instead')
    requests.append(_clip_request(u, key, base_dir) if named else None)
    speakers.append('unknown' if u.get('speaker') is None else u['speaker'])
    texts.append(u.get('text') or '')
    if text_from_transcripts and not texts[-1].strip() and not named:
      raise PredictInputError(f'{key}.text: empty; this model computes text features from it')
    uids.append(_utterance_id(u['utterance_id'], key) if 'utterance_id' in u else i)
    first = first_with_id.setdefault(uids[-1], i)
    if first != i:
      positional = 'utterance_id' not in utts[first]
      if 'utterance_id' in u:
        raise PredictInputError(
            f"{key}.utterance_id: {uids[-1]} repeats utterances[{first}]'s id"
            + (' (its position: it gives no utterance_id)' if positional else ''))
      raise PredictInputError(f"{key}: gives no utterance_id, and its position {i} repeats "
                              f"utterances[{first}]'s id")
    given = u.get('features')
    if given is None:
      given = {}
    if not isinstance(given, dict):
      raise PredictInputError(f'{key}.features: expected an object, got {_shown(given)}')
    unknown = set(given) - set(modalities) - {'t', 'a', 'v'}
    if unknown:
      raise PredictInputError(f'{key}.features: unknown modality keys {sorted(unknown)}')
    for m in modalities:
      value = given.get(m)
      if value is None:
        continue
      try:
        arr = np.asarray(value, np.float32)
      except (TypeError, ValueError, OverflowError) as e:
        raise PredictInputError(f'{key}.features.{m}: not a list of numbers ({e})') from None
      if arr.shape != (dims[m],):
        raise PredictInputError(f'{key}.features.{m}: expected {dims[m]} numbers, got shape '
                                f'{arr.shape}')
      if not np.all(np.isfinite(arr)):
        raise PredictInputError(f'{key}.features.{m}: contains NaN or Inf')
      feats[m][i] = arr
      present[m][i] = True
  if (not text_from_transcripts and not any(present[m].any() for m in modalities)
      and not any(requests)):
    raise PredictInputError(f'{where}: no utterance has any features')
  if clips is not None:
    clips.append(requests)
  return shards.DialogueRecord(
      dialogue_id=dialogue_id, utterance_ids=np.asarray(uids, np.int32), speakers=speakers,
      speaker_ids=shards.speaker_ranks(speakers), labels=np.full(len(utts), -1, np.int32),
      transcripts=texts, features=feats, present=present)


class Predictor:
  """The final stage of a trained workdir or bundle (and the frozen stages it reads), restored:
  what `mer_jax.load` returns. `predict` labels dicts; the command reads JSONL into the same
  records (`read_jsonl`) and writes the same rows (`predict_records`)."""

  def __init__(self, workdir: str, stage: str | None = None, checkpoint_dir: str = '',
               text_encoder: str = '', av_front_end: dict | None = None):
    """`checkpoint_dir`: where the run's train.checkpoint_dir put them (default
    workdir/checkpoints; gs:// paths are read by Orbax directly). `text_encoder`: a checkpoint
    folder (weights and tokenizer) to use in place of the config's text.encoder, e.g. a bundle's
    copy of it. `av_front_end`: for a model that reads clips, where its LipSyncNet and clip
    encoders are ({'lipsync', 'audio_encoder', 'visual_encoder'}: folders, None for the
    config's; a bundle's copies); default: where the workdir's run left them."""
    self.workdir = workdir
    directory = checkpoint_dir or os.path.join(workdir, 'checkpoints')
    trained = trained_stages(directory)
    if not trained:
      raise checkpointing.MissingCheckpoint(f'{directory}: no trained stage checkpoints')
    self.stage = stage or trained[-1]
    meta = checkpointing.StageCheckpoints(workdir, self.stage, read_only=True,
                                          directory=directory).best_meta()
    self.config = ml_collections.ConfigDict(meta['config'])
    self.label_names = tuple(meta['label_names'])
    self.modalities = stages.modalities_read(self.stage, self.config.data.modalities)
    self.mesh = sharding.make_mesh(self.config)
    self.stacked = self.stage == 'fusion' and self.config.model.fusion.input == 'stacked'
    self.models = {}
    for name in needed_for(self.stage, self.config):
      ckpt = checkpointing.StageCheckpoints(workdir, name, read_only=True, directory=directory)
      graphdef, params, batch_stats, rng_state = inference.build_sharded_model(
          name, self.config, self.mesh, seed=0)
      params, batch_stats, _ = ckpt.restore_best(params, batch_stats)
      self.models[name] = inference.FrozenModel(graphdef, (params, batch_stats, rng_state))
    self._predict_fn = inference.stage_predict_fn(self.stage, self.models[self.stage],
                                                  self.config, self.models)
    self.text = None
    if reads_transcripts(self.stage, self.config):
      self.text = text_features.TextFeaturizer(
          _located_text_config(self.config, directory, text_encoder), workdir)
    self.reads_clips = reads_clips(self.stage, self.config)
    if self.reads_clips and av_front_end is None:
      av_front_end = {'lipsync': raw.trained_lipsync_dir(self.config, workdir)}
    self._av_front_end = av_front_end
    self._clips = None  # the ClipFeaturizer, built when a clip first comes
    # What the front end made of each record's clips (read_*), for its rows and messages.
    self.clip_outcomes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

  def clip_featurizer(self) -> clip_features.ClipFeaturizer:
    """The run's AV front end (restoring LipSyncNet and compiling the encoders: built once)."""
    if self._clips is None:
      paths = self._av_front_end
      try:
        self._clips = clip_features.ClipFeaturizer(
            self.config, paths.get('lipsync'), audio_checkpoint=paths.get('audio_encoder'),
            visual_checkpoint=paths.get('visual_encoder'))
      except FileNotFoundError as e:
        raise PredictInputError(f'{self.workdir}: cannot read clips: {e}') from None
    return self._clips

  def fill_clip_features(self, records: list, clips: list) -> None:
    """Computes audio and visual features from the clips the utterances name (`clips`: per
    record, a ClipRequest or None per utterance). Features an utterance gave are kept; a clip
    that cannot be read leaves its utterance's other inputs (its outcome holds the reason)."""
    todo = [(r, u, request) for r, requests in zip(records, clips)
            for u, request in enumerate(requests) if request is not None]
    if not todo:
      return
    results = self.clip_featurizer()([request for _, _, request in todo])
    for record in records:
      self.clip_outcomes[record] = [None] * len(record.labels)
    for (record, u, request), result in zip(todo, results):
      self.clip_outcomes[record][u] = (request, result)
      for m, vector in (('a', result.audio), ('v', result.visual)):
        if vector is not None and m in record.present and not record.present[m][u]:
          record.features[m][u] = vector
          record.present[m][u] = True

  def fill_text_features(self, records: list) -> None:
    """Computes the text features an input left out, from the transcripts."""
    todo = [r for r in records if not r.present['t'].all()]
    if not todo:
      return
    ascii_punct = self.config.text.csv.ascii_punctuation
    cleaned = [dialogue_csv.Dialogue(r.dialogue_id, r.utterance_ids, r.speakers,
                                     [dialogue_csv.clean_text(t, ascii_punctuation=ascii_punct)
                                      for t in r.transcripts], r.labels) for r in todo]
    for record, vectors in zip(todo, self.text.features(cleaned)):
      # An utterance without text (one that names a clip) has no text features.
      missing = ~record.present['t'] & np.asarray([bool(t.strip()) for t in record.transcripts])
      record.features['t'][missing] = vectors[missing]
      record.present['t'][missing] = True

  def check_inputs(self, records: list) -> None:
    """Refuses an utterance with none of the inputs the model reads: it would be labelled from
    padding alone (e.g. a text model's utterance whose text features were never computed)."""
    for record in records:
      usable = np.any([record.present[m] for m in self.modalities], axis=0)
      if usable.all():
        continue
      i = int(np.flatnonzero(~usable)[0])
      wanted = ', '.join(f'{MODALITY_NAMES[m]} features (features.{m})' for m in self.modalities)
      how = (', or its "text" (Predictor.fill_text_features computes text features from it)'
             if self.text is not None else '')
      outcome = getattr(self, 'clip_outcomes', {}).get(record)
      if outcome is not None and outcome[i] is not None and outcome[i][1].error:
        how += f'; its clip could not be read: {outcome[i][1].error}'
      raise PredictInputError(
          f'dialogue {_shown(record.dialogue_id)}, utterance_id {int(record.utterance_ids[i])} '
          f'(utterances[{i}]): has no input this model reads; give '
          f'{"" if len(self.modalities) == 1 else "one of "}{wanted}{how}')

  def probabilities(self, records: list) -> list[np.ndarray]:
    """Per dialogue, [n_utterances, C] class probabilities."""
    self.check_inputs(records)
    source = sources.InMemorySource(records)
    if self.stacked:
      source = sources.InMemorySource(stacking.stacked_records(
          source, stacking.encoder_log_probs(source, self.models, self.config, self.mesh)))
    budget = sharding.batch_budget(self.config, self.mesh)
    pred = inference.predict_split(source, self.config, budget, self._predict_fn, self.mesh,
                                   dims=inference.batch_dims(self.stage, self.config))
    return inference.per_record_outputs(pred, source, 'probs')

  def predict(self, dialogues: Any) -> list[dict]:
    """Labels in-memory dialogues: a list of dicts as in the JSONL input (or one such dict).

    Returns one row per utterance, in input order: dialogue_id, utterance_id, speaker, emotion
    (the most probable label), probabilities ({label: p}) and modalities (those the model read
    for it: 't' text, 'a' audio, 'v' visual). Refuses (PredictInputError naming the dialogue and
    utterance) input the model cannot label, before predicting anything.
    """
    if isinstance(dialogues, dict):
      dialogues = [dialogues]
    return self.predict_records(self.read_dialogues(dialogues))

  def predict_records(self, records: list) -> list[dict]:
    """One row per utterance: ids, speaker, emotion, probabilities and the modalities read; an
    utterance that named a clip also has "clip" (`clip_row`)."""
    rows = format_predictions(records, self.probabilities(records), self.label_names,
                              modalities=self.modalities)
    outcomes = [o for r in records
                for o in (self.clip_outcomes.get(r) or [None] * len(r.labels))]
    for row, outcome in zip(rows, outcomes):
      if outcome is not None:
        row['clip'] = clip_row(*outcome)
    return rows

  def predict_folder(self, folder: str, split: str | None = None) -> list[dict]:
    """Labels a folder in MELD layout (`read_meld_folder`)."""
    return self.predict_records(self.read_meld_folder(folder, split))

  def read_dialogues(self, dialogues: Iterable[Any], source: str = 'dialogues') -> list:
    """In-memory dialogues (dicts as in the JSONL input) -> records, text features filled in.
    Messages name each one as `source`[i]."""
    return _read_records(self, ((f'{source}[{i}]', f'{source}[{i}]', obj)
                                for i, obj in enumerate(dialogues)), source, base_dir='')

  def read_jsonl(self, path: str) -> list:
    """A JSONL file of dialogues -> records; clip paths are relative to its folder."""
    return _read_records(self, _jsonl_objects(path), path,
                         base_dir=os.path.dirname(os.path.abspath(path)))

  def read_meld_folder(self, folder: str, split: str | None = None) -> list:
    """A folder in MELD layout -> records: the rows of the run's raw.csv_pattern CSV for `split`
    (default: the run's test split; labels are not read) with the clips
    dia{D}_utt{U}.mp4 in folder/<raw.split_folders[split]>, or in the folder itself (read when
    the model reads clips; a model reading text only reads the transcripts)."""
    split = split or self.config.data.test_split
    csv_path, dialogues = read_meld_csv(self.config, folder, split)
    clip_dir = os.path.join(folder, self.config.raw.split_folders.get(split, ''))
    if not os.path.isdir(clip_dir):
      clip_dir = folder
    def utterance(d, uid, speaker, text):
      clip = {'video': f'dia{d.dialogue_id}_utt{uid}.mp4'} if self.reads_clips else {}
      return {'utterance_id': int(uid), 'speaker': speaker, 'text': text, **clip}
    objects = ((f'{csv_path}: dialogue {d.dialogue_id}', f'dialogue {d.dialogue_id}', {
        'dialogue_id': d.dialogue_id, 'utterances': [
            utterance(d, *u) for u in zip(d.utterance_ids, d.speakers, d.transcripts)]})
               for d in dialogues)
    return _read_records(self, objects, csv_path, base_dir=clip_dir)


def _read_records(predictor, objects: Iterable[tuple[str, str, Any]], source: str,
                  base_dir: str) -> list:
  """Parsed dialogues with the text features and clip features the predictor computes filled
  in (a module function: the bad-input tests read with a stand-in holding config and text)."""
  clips = [] if getattr(predictor, 'reads_clips', False) else None
  records = parse_dialogues(objects, predictor.config, predictor.text is not None, source,
                            clips=clips, base_dir=base_dir)
  if predictor.text is not None:
    predictor.fill_text_features(records)
  if clips:
    predictor.fill_clip_features(records, clips)
  return records


def read_meld_csv(config, folder: str, split: str) -> tuple[str, list]:
  """(path, dialogues) of the run's raw.csv_pattern CSV for `split` in `folder`, read as the raw
  front end reads it (raw.read_split_csv), with empty labels allowed."""
  if not config.get('raw'):
    raise PredictInputError(f'{folder}: a MELD-layout folder needs a model trained from raw clips '
                            "(data.source 'raw')")
  path = os.path.join(folder, config.raw.csv_pattern.format(split=split))
  if not os.path.isfile(path):
    raise PredictInputError(f'{path}: no such file (a MELD-layout folder has '
                            f'{config.raw.csv_pattern.format(split=split)} for split {split!r})')
  try:
    dialogues, report = raw.read_split_csv(config, folder, split, allow_unlabeled=True)
  except (dialogue_csv.CsvFormatError, ValueError) as e:
    raise PredictInputError(str(e)) from None
  if report.skipped:
    print(report.summary(), file=sys.stderr)
  return path, dialogues


def clip_row(request: clip_features.ClipRequest, result: clip_features.ClipFeatures) -> dict:
  """What a row says of its utterance's clip: the files, and the face tracks found and the one
  read, or why the clip could not be read."""
  row = {name: getattr(request, name) for name in CLIP_KEYS if getattr(request, name)}
  if result.error:
    row['error'] = result.error
  else:
    row.update(faces=result.faces, speaker_face=result.speaker_face)
  return row


def clip_counts(rows: Iterable[dict]) -> dict[str, int]:
  """How many rows named a clip, and of those how many were read, could not be read, or showed no
  face (audio only)."""
  clips = [row['clip'] for row in rows if 'clip' in row]
  unreadable = sum('error' in c for c in clips)
  return {'clips': len(clips), 'read': len(clips) - unreadable, 'unreadable': unreadable,
          'without_face': sum('error' not in c and 'video' in c and not c['faces']
                              for c in clips)}


def _jsonl_objects(path: str) -> Iterator[tuple[str, str, Any]]:
  """(where, how a repeat names it, object) per non-blank line."""
  try:
    with open(path, encoding='utf-8') as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f'{path}:{line_no}'
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise PredictInputError(f'{where}: invalid JSON ({e.msg})') from None
        except RecursionError:
          raise PredictInputError(f'{where}: invalid JSON (nested too deeply)') from None
        except ValueError as e:  # an integer of more than 4300 digits
          raise PredictInputError(f'{where}: invalid JSON ({str(e).split(";")[0]})') from None
        yield where, f'the dialogue on line {line_no}', obj
  except UnicodeDecodeError as e:
    raise PredictInputError(f'{path}: not UTF-8 text ({e})') from None


def parse_dialogues(objects: Iterable[tuple[str, str, Any]], config, text_from_transcripts: bool,
                    source: str, clips: list | None = None, base_dir: str = '') -> list:
  """(where, name, JSON dialogue) -> DialogueRecords with unique dialogue ids, each within the
  config's node budget; `source` (a path, or 'dialogues') names the whole input. `clips` and
  `base_dir` as in parse_dialogue (one list per record)."""
  records = []
  first_name: dict[str, str] = {}  # dialogue id -> name of the first dialogue with it
  dims = {m: int(config.data.dims[m]) for m in config.data.modalities}
  for where, name, obj in objects:
    record = parse_dialogue(obj, where, tuple(config.data.modalities), dims,
                            text_from_transcripts=text_from_transcripts, clips=clips,
                            base_dir=base_dir)
    first = first_name.setdefault(record.dialogue_id, name)
    if first != name:
      raise PredictInputError(f'{where}: dialogue_id: {_shown(record.dialogue_id)} repeats '
                              f'{first}')
    records.append(record)
  if not records:
    raise PredictInputError(f'{source}: no dialogues')
  longest = max(len(r.labels) for r in records)
  if longest > config.batch.max_nodes - 1:
    raise PredictInputError(f'{source}: a dialogue has {longest} utterances; this model was '
                            f'configured for at most {config.batch.max_nodes - 1}')
  return records


def _located_text_config(config, checkpoint_dir: str, text_encoder: str):
  """The config the text front end reads, pointed at where this copy of the run keeps its
  fine-tuned encoder (`checkpoint_dir`) and, when given, its text encoder folder."""
  located = ml_collections.ConfigDict(config.to_dict())
  located.train.checkpoint_dir = checkpoint_dir
  if text_encoder:
    located.text.encoder = text_encoder
  return located


def load(path: str, checkpoint_dir: str = '') -> Predictor:
  """The model of a trained workdir or of a bundle written by mer_jax.export (`mer_jax.load`).

  `checkpoint_dir`: for a workdir whose run moved its checkpoints (train.checkpoint_dir).
  """
  if not bundle.is_bundle(path):
    if not checkpoint_dir and not os.path.exists(path) and '://' not in path:
      raise PredictInputError(f'{path}: no such folder (expected a workdir or a model bundle)')
    return Predictor(path, checkpoint_dir=checkpoint_dir)
  if checkpoint_dir:
    raise PredictInputError(f'{path}: is a model bundle; it keeps its own checkpoints '
                            '(no checkpoint_dir)')
  manifest = bundle.read_manifest(path)
  return Predictor(path, stage=manifest['stage'], text_encoder=bundle.text_encoder_dir(path),
                   av_front_end=bundle.av_front_end_dirs(path, manifest))


def reads_transcripts(stage: str, config) -> bool:
  """Whether predicting with `stage` computes text features from transcripts with the run's text
  encoder (runs trained from dialogue CSVs or raw clips, whose stage reads text)."""
  return (config.data.source in ('text_csv', 'raw')
          and 't' in stages.modalities_read(stage, config.data.modalities))


def reads_clips(stage: str, config) -> bool:
  """Whether predicting with `stage` reads clips through the run's AV front end (runs trained
  from raw clips, whose stage reads audio or video)."""
  read = stages.modalities_read(stage, config.data.modalities)
  return config.data.source == 'raw' and bool({'a', 'v'} & set(read))


def trained_stages(directory: str) -> list[str]:
  """The stages with a best checkpoint under `directory` (local, or gs:// through epath)."""
  return [s for s in stages.STAGES if (epath.Path(directory) / s / 'best').is_dir()]


def needed_for(stage: str, config) -> list[str]:
  """The stage and the frozen encoders whose outputs it reads at prediction time."""
  needed = stages.prerequisites(stage, distill=False, fusion_input=config.model.fusion.input,
                                modalities=config.data.modalities)
  return [*needed, stage]


def format_predictions(records: Iterable, probs: Iterable[np.ndarray],
                       label_names: Sequence[str],
                       modalities: Sequence[str] | None = None) -> list[dict]:
  """One row per utterance; with `modalities` (those the model reads), the ones it had."""
  rows = []
  for record, p in zip(records, probs):
    for i in range(len(record.labels)):
      row = {
          'dialogue_id': record.dialogue_id, 'utterance_id': int(record.utterance_ids[i]),
          'speaker': record.speakers[i], 'emotion': label_names[int(np.argmax(p[i]))],
          'probabilities': {name: float(v) for name, v in zip(label_names, p[i])}}
      if modalities is not None:
        row['modalities'] = [m for m in modalities if record.present[m][i]]
      rows.append(row)
  return rows


def _same_file(a: str, b: str) -> bool:
  if os.path.realpath(a) == os.path.realpath(b):
    return True
  try:
    return os.path.samefile(a, b)  # hard links, case-insensitive file systems
  except OSError:  # one of them does not exist
    return False


def check_paths(input_path: str, output_path: str | None) -> None:
  """Refuses, before any work, an input that is not there and an output that would harm the
  input or could not be written. Each problem is a PredictInputError naming the path."""
  if not os.path.exists(input_path):
    raise PredictInputError(f'--input {input_path}: no such file')
  if os.path.isdir(input_path):
    raise PredictInputError(f'--input {input_path}: is a folder, not a JSONL file')
  if output_path:
    check_output(output_path, input_path)


def check_folder(input_dir: str, output_path: str | None) -> None:
  """check_paths for --input_dir: a folder that exists, and an output as check_output wants that
  is not one of the folder's own files (its CSV, its clips) either."""
  if not os.path.isdir(input_dir):
    raise PredictInputError(f'--input_dir {input_dir}: '
                            + ('is not a folder' if os.path.exists(input_dir) else 'no such folder'))
  if not output_path:
    return
  check_output(output_path, input_dir)
  inside = os.path.realpath(output_path).startswith(os.path.realpath(input_dir) + os.sep)
  if inside and os.path.exists(output_path) and not output_path.endswith('.jsonl'):
    raise PredictInputError(f'--output {output_path}: is a file of --input_dir {input_dir}; '
                            'predict never writes over its input')


def check_output(output_path: str, input_path: str) -> None:
  """Refuses an output that is the input (however spelled, links included), a folder, in a
  folder that is missing or not writable, or an existing read-only file."""
  name = f'--output {output_path}'
  if _same_file(output_path, input_path):
    raise PredictInputError(f'{name}: is the input file (--input {input_path}); predict never '
                            'writes over its input')
  if output_path.endswith(('/', os.sep)) or os.path.isdir(output_path):
    raise PredictInputError(f'{name}: is a folder; name a file for the predictions')
  folder = os.path.dirname(os.path.abspath(output_path))
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise PredictInputError(f'{name}: {folder} is not a folder')
  if not os.path.isdir(folder):
    raise PredictInputError(f'{name}: folder {folder} does not exist')
  if not os.access(folder, os.W_OK | os.X_OK):
    raise PredictInputError(f'{name}: folder {folder} is not writable')
  if os.path.exists(output_path) and not os.access(output_path, os.W_OK):
    raise PredictInputError(f'{name}: exists and is read-only')


def write_predictions(path: str, rows: Sequence[dict]) -> None:
  """JSONL, atomically: `path` holds either its old contents or all the rows."""
  with files.open_atomically(path, encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')


def define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'A workdir trained by mer_jax.main, or a bundle written '
                      'by mer_jax.export.')
  flags.DEFINE_string('input', None, 'JSONL file of dialogues.')
  flags.DEFINE_string('input_dir', None, 'A folder in MELD layout (a model trained from raw clips): '
                      "the run's raw.csv_pattern CSV for --split and its dia{D}_utt{U}.mp4 clips.")
  flags.DEFINE_string('split', None, 'With --input_dir: the split whose CSV and clip folder to '
                      "read (default: the run's test split).")
  flags.DEFINE_string('output', None, 'Optional JSONL file for the predictions.')
  flags.DEFINE_string(
      'checkpoint_dir', '', 'Where the run kept its checkpoints, if train.checkpoint_dir moved '
      'them (e.g. gs://bucket/run/checkpoints); default: workdir/checkpoints.')
  flags.mark_flags_as_required(['workdir'])
  flags.mark_flags_as_mutual_exclusive(['input', 'input_dir'], required=True)


def main(argv):
  del argv
  source = FLAGS.input or FLAGS.input_dir
  if FLAGS.input_dir is not None:
    check_folder(FLAGS.input_dir, FLAGS.output)
  else:
    check_paths(FLAGS.input, FLAGS.output)
  predictor = load(FLAGS.workdir, checkpoint_dir=FLAGS.checkpoint_dir)
  if FLAGS.input_dir is not None:
    rows = predictor.predict_folder(FLAGS.input_dir, FLAGS.split)
  else:
    rows = predictor.predict_records(predictor.read_jsonl(FLAGS.input))
  for row in rows:
    top = sorted(row['probabilities'].items(), key=lambda kv: -kv[1])[:3]
    print(f'{row["dialogue_id"]}\t{row["utterance_id"]}\t{row["speaker"]}\t{row["emotion"]}\t'
          + ' '.join(f'{k}={v:.3f}' for k, v in top))
  report_clips(rows)
  if FLAGS.output:
    check_output(FLAGS.output, source)  # again: the files may have changed meanwhile
    write_predictions(FLAGS.output, rows)
    print(f'wrote {len(rows)} predictions to {FLAGS.output}', file=sys.stderr)


def report_clips(rows: Sequence[dict], out=None) -> None:
  """On stderr: each clip that could not be read (its row, file and reason) and the counts."""
  out = out or sys.stderr
  counts = clip_counts(rows)
  if not counts['clips']:
    return
  for row in rows:
    if 'error' in row.get('clip', {}):
      print(f'dialogue {row["dialogue_id"]}, utterance_id {row["utterance_id"]}: clip not read, '
            f'labelled from {"/".join(row["modalities"])}: {row["clip"]["error"]}', file=out)
  print(f'clips: {counts["clips"]} named, {counts["read"]} read ({counts["without_face"]} '
        f'without a face: audio only), {counts["unreadable"]} could not be read', file=out)


def run(argv=None) -> None:
  """The `mer-jax-predict` console script."""
  cli.run_absl(main, doc=__doc__, define_flags=define_flags, argv=argv,
               quiet_libraries=True)


if __name__ == '__main__':
  run()
