"""Raw clips -> shards: the whole front end of SPEC stages 1-3 behind one function.

`build_raw_shards(config, out_dir, workdir)` runs, for the MELD-layout folder `raw.dir` (or
the synthetic talking heads it generates when `raw.generate`):

  1. clips     decode, track faces, crop, log-mel (mer_jax/preprocess/clips.py), per dialogue
               into the data cache; resumable, unreadable clips reported and counted;
  2. lipsync   LipSyncNet trained self-supervised on the train clips
               (mer_jax/preprocess/lipsync_training.py), checkpointed in the cache; each utterance's face tracks scored against its audio
               and the closest chosen; per-track distances saved (speakers_{split}.jsonl);
  3. features  Wav2Vec2 on the audio, TimeSformer on the face track `raw.visual_face` names,
               the text encoder on the transcripts; an utterance whose clip could not be read
               keeps its text and has no audio/visual features (present = False), one without
               a detected face has no visual feature;
  4. shards    written atomically, with `raw_features.json` beside the manifest: counts, clips
               per second of every stage and, for the synthetic corpus (which knows the
               speaking face), active-speaker accuracy against the largest- and random-face
               baselines.

Cache layout under the data root (data.cache_dir, else workdir/data), one folder per setting:
  talking-heads-<key>/      the generated corpus
  clips-<key>/{split}/      stage 1, per dialogue
  clips-<key>/lipsync-<key>/  stage 2: checkpoints, speakers_{split}.jsonl
  raw-<key>/                the shards (built once, renamed into place)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import cv2
import numpy as np

from mer_jax import console
from mer_jax import files
from mer_jax.data import dialogue_csv
from mer_jax.data import shards
from mer_jax.data import cache
from mer_jax.data import talking_heads
from mer_jax.preprocess import av_features
from mer_jax.preprocess import clips as clips_lib
from mer_jax.preprocess import faces as faces_lib
from mer_jax.preprocess import lipsync_training
from mer_jax.preprocess import text_features

STATS_NAME = 'raw_features.json'
CORPUS_MARKER = 'corpus.json'
LIPSYNC_DONE = 'done.json'
VISUAL_FACES = ('selected', 'true', 'largest', 'random')


def _key(obj: Any) -> str:
  return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _splits(config) -> tuple[str, ...]:
  return tuple(dict.fromkeys((config.data.train_split, config.data.dev_split,
                              config.data.test_split)))


# --- stage 0: the corpus ---------------------------------------------------------------------


def raw_root(config, workdir: str) -> str:
  """Where the MELD-layout folder is: raw.dir, or where the synthetic talking heads are generated
  (nothing is built here; see ensure_raw_root)."""
  r = config.raw
  if not r.generate:
    return r.dir
  spec = talking_heads.TalkingHeadsSpec.from_config(r.synthetic)
  return os.path.join(cache.data_root(config, workdir), 'talking-heads-' + _key(spec.__dict__))


def ensure_raw_root(config, workdir: str) -> str:
  """The MELD-layout folder to read: raw.dir, or the generated synthetic talking heads."""
  r = config.raw
  out = raw_root(config, workdir)
  if not r.generate:
    if not os.path.isdir(out):
      raise FileNotFoundError(f'raw.dir {r.dir!r} is not a folder')
    return out
  spec = talking_heads.TalkingHeadsSpec.from_config(r.synthetic)

  def build(folder):
    console.say('generating the synthetic talking-heads corpus into %s', out)
    counts = talking_heads.write_talking_heads(spec, folder, progress=True)
    with open(os.path.join(folder, CORPUS_MARKER), 'w') as f:
      json.dump({'clips': counts, 'spec': spec.__dict__}, f, indent=1, default=list)
  return cache.build_once(out, build, marker=CORPUS_MARKER)


def read_split_csv(config, root: str, split: str, *, allow_unlabeled: bool = False):
  """(dialogues, report) of `split`'s CSV (raw.csv_pattern) under `root`, read with the run's
  text.csv schema and labels."""
  schema = dialogue_csv.schema_from_config(config.text.csv, config.label_names)
  return dialogue_csv.read_dialogue_csv(
      os.path.join(root, config.raw.csv_pattern.format(split=split)), schema,
      on_bad_row=config.text.csv.on_bad_row, allow_unlabeled=allow_unlabeled)


def read_dialogues(config, root: str) -> dict[str, list[dialogue_csv.Dialogue]]:
  out = {}
  for split in _splits(config):
    out[split], report = read_split_csv(config, root, split)
    if report.skipped or report.listed_speakers:
      console.say('%s', report.summary())
  return out


# --- stage 1: clips --------------------------------------------------------------------------


def clips_dir(config, workdir: str, root: str) -> str:
  r = config.raw
  key = _key({'root': os.path.abspath(root), 'fps': r.fps, 'sr': r.sample_rate,
              'max_seconds': r.max_seconds, 'mel': r.mel.to_dict(), 'faces': r.faces.to_dict(),
              'folders': r.split_folders.to_dict(), 'csv': r.csv_pattern})
  return os.path.join(cache.data_root(config, workdir), 'clips-' + key)


# --- stage 2: LipSyncNet ---------------------------------------------------------------------


def _sync_tracks(tracks: np.ndarray, cfg) -> np.ndarray:
  """Extracted crops uint8[K, F, S, S, 3] -> LipSyncNet's crop size and channels."""
  k, f, s = tracks.shape[:3]
  flat = tracks.reshape(k * f, s, s, 3)
  size = int(cfg.crop_size)
  if s != size:
    flat = np.stack([cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA) for x in flat])
  if int(cfg.channels) == 1:
    flat = np.stack([cv2.cvtColor(x, cv2.COLOR_RGB2GRAY) for x in flat])[..., None]
  return flat.reshape(k, f, size, size, int(cfg.channels))


def sync_clip(media: clips_lib.UtteranceMedia, cfg, clip_id: str):
  boxes = media.boxes
  areas = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).mean(axis=1)
  return lipsync_training.SyncClip(tracks=_sync_tracks(media.tracks, cfg), logmel=media.logmel,
                          clip_id=clip_id, areas=areas.astype(np.float32))


def load_training_clips(config, cache: str, split: str, dialogues) -> tuple[list, int]:
  """LipSyncNet's training clips: those with exactly one face track, and how many were not.

  Without known speakers only a single visible face can be taken as the speaker (mined pairs
  need a speaker label, which raw clips do not have), so clips with several tracks give the
  self-supervised objective nothing; they are counted, not loaded, which keeps memory to the
  single-face clips.
  """
  out, multi = [], 0
  for d in dialogues:
    for u, m in enumerate(clips_lib.load_dialogue(cache, split, d.dialogue_id, len(d))):
      if m.tracks is None or not len(m.tracks):
        continue
      if len(m.tracks) > 1:
        multi += 1
        continue
      out.append(sync_clip(m, config.lipsync, f'{split}/dia{d.dialogue_id}_utt{u}'))
  return out, multi


def lipsync_dir(config, cache: str) -> str:
  """The folder of the config's LipSyncNet under a clips cache: its checkpoints and LIPSYNC_DONE."""
  return os.path.join(cache, 'lipsync-' + _key(config.lipsync.to_dict()))


def trained_lipsync_dir(config, workdir: str) -> str | None:
  """The folder of a raw run's trained LipSyncNet, or None when it is not (or no longer) there."""
  folder = lipsync_dir(config, clips_dir(config, workdir, raw_root(config, workdir)))
  return folder if os.path.exists(os.path.join(folder, LIPSYNC_DONE)) else None


def ensure_lipsync(config, cache: str, dialogues) -> tuple[Any, str, dict]:
  """(trained LipSyncNet, its folder, training summary); trains unless already done."""
  folder = lipsync_dir(config, cache)
  done = os.path.join(folder, LIPSYNC_DONE)
  if os.path.exists(done):
    with open(done) as f:
      return lipsync_training.restore_lipsync(config.lipsync, folder), folder, json.load(f)
  train, train_multi = load_training_clips(config, cache, config.data.train_split,
                                           dialogues[config.data.train_split])
  val, val_multi = load_training_clips(config, cache, config.data.dev_split,
                                       dialogues[config.data.dev_split])
  console.say('LipSyncNet: training on the %d single-face train clips, validating on %d dev '
              'ones (%d and %d clips with several faces have no self-supervised pairs)',
              len(train), len(val), train_multi, val_multi)
  start = time.perf_counter()
  model, history = lipsync_training.train_lipsync(config.lipsync, train, val, folder)
  summary = {'seconds': time.perf_counter() - start, 'train_clips': len(train),
             'val_clips': len(val), 'multi_face_clips_unused': train_multi + val_multi,
             'history': history}
  files.write_json(done, summary, indent=1, default=float)
  return model, folder, summary


def _truth_face(truth: dict | None, boxes: np.ndarray) -> int:
  """Index of the track that best overlaps the true speaker's face (-1: none overlaps)."""
  if truth is None or not len(boxes):
    return -1
  speaker_box = np.asarray(truth['faces'][truth['speaker_face']]['box'], np.float32)
  overlap = faces_lib.iou(boxes.mean(axis=1), speaker_box[None])[:, 0]
  return int(overlap.argmax()) if overlap.max() >= 0.3 else -1


def choose_faces(config, model, cache: str, lipsync_folder: str, root: str, split: str,
                 dialogues, times: dict) -> dict[tuple[str, int], dict]:
  """Per utterance: the scores of its tracks and the track each policy picks.

  Saved to speakers_{split}.jsonl beside the LipSyncNet checkpoint and read back from there by
  later runs (they depend only on the clips and LipSyncNet).
  """
  path = os.path.join(lipsync_folder, f'speakers_{split}.jsonl')
  if os.path.exists(path):
    with open(path) as f:
      rows = [json.loads(line) for line in f]
    return {(r.pop('dialogue'), r.pop('index')): r for r in rows}
  truth_path = os.path.join(root, f'truth_{split}.jsonl')
  truth = talking_heads.read_truth(root, split) if os.path.exists(truth_path) else {}
  scorer = lipsync_training.TrackScorer(model, config.lipsync)
  rng = np.random.default_rng([int(config.lipsync.seed), 77])  # the random-face baseline
  out = {}
  start, n = time.perf_counter(), 0
  with files.open_atomically(path) as f:  # runs sharing the cache may score at once
    for d in console.progress(dialogues, desc=f'speakers ({split})', unit='dialogue'):
      media = clips_lib.load_dialogue(cache, split, d.dialogue_id, len(d))
      for u, m in enumerate(media):
        if m.tracks is None or not len(m.tracks):
          continue
        clip = sync_clip(m, config.lipsync, f'{split}/dia{d.dialogue_id}_utt{u}')
        distances = scorer(clip) if clip.num_tracks > 1 else np.zeros(1, np.float32)
        n += 1
        t = truth.get((int(d.dialogue_id), int(d.utterance_ids[u])))
        row = {'distances': [float(x) for x in distances],
               'selected': int(np.argmin(distances)),
               'largest': lipsync_training.largest_face(clip),
               'random': lipsync_training.random_face(clip, rng),
               'true': _truth_face(t, m.boxes), 'tracks': clip.num_tracks,
               'truth_faces': len(t['faces']) if t else None,
               'utterance': int(d.utterance_ids[u])}
        out[(d.dialogue_id, u)] = row
        f.write(json.dumps({'dialogue': d.dialogue_id, 'index': u, **row}) + '\n')
  times['speaker_selection'] = times.get('speaker_selection', 0.0) + time.perf_counter() - start
  times['speaker_selection_clips'] = times.get('speaker_selection_clips', 0) + n
  return out


def speaker_accuracy(choices: dict) -> dict[str, Any]:
  """Accuracy of each policy on clips where the truth shows >= 2 faces and a track matches it."""
  rows = [r for r in choices.values() if r['truth_faces'] and r['truth_faces'] >= 2
          and r['true'] >= 0]
  if not rows:
    return {'clips': 0}
  out = {'clips': len(rows)}
  for policy in ('selected', 'largest', 'random'):
    out[policy] = float(np.mean([r[policy] == r['true'] for r in rows]))
  out['undetected_speaker'] = sum(1 for r in choices.values()
                                  if r['truth_faces'] and r['true'] < 0)
  return out


# --- stage 3: features -----------------------------------------------------------------------


def build_raw_shards(config, out_dir: str, *, workdir: str) -> dict[str, Any]:
  """Runs stages 1-4 (module docstring) and writes the shards to `out_dir`; returns the stats."""
  r = config.raw
  if r.visual_face not in VISUAL_FACES:
    raise ValueError(f'raw.visual_face {r.visual_face!r} is not one of {VISUAL_FACES}')
  root = ensure_raw_root(config, workdir)
  dialogues = read_dialogues(config, root)
  cache = clips_dir(config, workdir, root)
  stats: dict[str, Any] = {'root': root, 'cache': cache, 'splits': {}}
  for split in _splits(config):
    stats['splits'][split] = clips_lib.extract_split(config, root, split, cache,
                                                      dialogues[split])
  model, folder, lipsync_summary = ensure_lipsync(config, cache, dialogues)
  stats['lipsync'] = {k: v for k, v in lipsync_summary.items() if k != 'history'}
  times: dict[str, float] = {}
  choices = {s: choose_faces(config, model, cache, folder, root, s, dialogues[s], times)
             for s in _splits(config)}
  stats['active_speaker'] = {s: speaker_accuracy(c) for s, c in choices.items()}
  if r.visual_face == 'true' and not any(a.get('clips') for a in stats['active_speaker'].values()):
    raise ValueError("raw.visual_face='true' needs the synthetic corpus's truth files")

  audio = av_features.audio_featurizer(r)
  visual = av_features.visual_featurizer(r)
  text = text_features.TextFeaturizer(config, workdir=workdir)
  dims = {'t': int(config.data.dims.t), 'a': audio.hidden, 'v': visual.cfg.hidden_size}
  records = {}
  for split in _splits(config):
    records[split] = _split_records(config, split, dialogues[split], cache, choices[split],
                                    audio, visual, text, dims, times)
  for name, n in (('audio_encoder', 'audio_encoder_clips'),
                  ('visual_encoder', 'visual_encoder_clips'),
                  ('speaker_selection', 'speaker_selection_clips')):
    if times.get(name):
      times[f'{name}_clips_per_second'] = times[n] / times[name]
  stats['times'] = times
  text_dim = next(iter(records.values()))[0].features['t'].shape[1]
  if text_dim != dims['t']:
    raise ValueError(f'the text encoder gives {text_dim}-d features; set data.dims.t={text_dim}')
  shards.write_shards(out_dir, records, label_names=config.label_names, dims=dims,
                      num_shards=1, overwrite=True)
  with open(os.path.join(out_dir, STATS_NAME), 'w') as f:
    json.dump(stats, f, indent=1, default=float)
  return stats


def _split_records(config, split, dialogues, cache, choices, audio, visual, text, dims,
                   times) -> list[shards.DialogueRecord]:
  """Shard records of one split, encoded a chunk of dialogues at a time (bounded memory)."""
  chunk = 32
  out = []
  for start in range(0, len(dialogues), chunk):
    part = dialogues[start:start + chunk]
    waves, tracks, where_a, where_v = [], [], [], []
    for i, d in enumerate(part):
      for u, m in enumerate(clips_lib.load_dialogue(cache, split, d.dialogue_id, len(d))):
        if m.audio is None:
          continue
        waves.append(m.audio)
        where_a.append((i, u))
        row = choices.get((d.dialogue_id, u))
        face = -1 if row is None else row[config.raw.visual_face]
        if face >= 0:
          tracks.append(m.tracks[face])
          where_v.append((i, u))
    t0 = time.perf_counter()
    a = audio(waves, desc=f'audio features ({split})')
    times['audio_encoder'] = times.get('audio_encoder', 0.0) + time.perf_counter() - t0
    times['audio_encoder_clips'] = times.get('audio_encoder_clips', 0) + len(waves)
    t0 = time.perf_counter()
    v = visual(tracks, desc=f'visual features ({split})')
    times['visual_encoder'] = times.get('visual_encoder', 0.0) + time.perf_counter() - t0
    times['visual_encoder_clips'] = times.get('visual_encoder_clips', 0) + len(tracks)
    t0 = time.perf_counter()
    t = text.features(part)
    times['text_encoder'] = times.get('text_encoder', 0.0) + time.perf_counter() - t0
    feats = [{'t': t[i], 'a': np.zeros((len(d), dims['a']), np.float32),
              'v': np.zeros((len(d), dims['v']), np.float32)} for i, d in enumerate(part)]
    present = [{'t': np.ones(len(d), bool), 'a': np.zeros(len(d), bool),
                'v': np.zeros(len(d), bool)} for d in part]
    for (i, u), x in zip(where_a, a):
      feats[i]['a'][u], present[i]['a'][u] = x, True
    for (i, u), x in zip(where_v, v):
      feats[i]['v'][u], present[i]['v'][u] = x, True
    out.extend(dialogue_csv.to_record(d, feats[i], present[i]) for i, d in enumerate(part))
  return out


def raw_shard_dir(config, workdir: str) -> str:
  key = _key({'raw': config.raw.to_dict(), 'lipsync': config.lipsync.to_dict(),
              'text': config.text.to_dict(), 'labels': list(config.label_names),
              'dims': config.data.dims.to_dict()})
  return os.path.join(cache.data_root(config, workdir), 'raw-' + key)


def ensure_raw_shards(config, workdir: str) -> str:
  out = raw_shard_dir(config, workdir)

  def build(folder):
    stats = build_raw_shards(config, folder, workdir=workdir)
    report_stats(stats)
  return cache.build_once(out, build)


def report_stats(stats: dict) -> None:
  for split, s in stats['splits'].items():
    console.say('%s: %d clips, %d unreadable, %d without a face; clips/s %s', split, s['clips'],
                s['errors'], s['no_face'],
                {k: round(v, 1) for k, v in s['clips_per_second'].items()})
  for split, a in stats['active_speaker'].items():
    if a.get('clips'):
      console.say('active speaker (%s, %d clips with 2-3 faces): LipSyncNet %.1f%%, largest face '
                  '%.1f%%, random face %.1f%%', split, a['clips'], 100 * a['selected'],
                  100 * a['largest'], 100 * a['random'])
