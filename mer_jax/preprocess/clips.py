"""Stage 1: a MELD-layout folder of clips -> per-utterance face tracks, audio and log-mel.

For every utterance of a split's CSV, `extract_split` decodes `{folder}/dia{D}_utt{U}.mp4`,
detects and tracks the faces, crops each track to a fixed square and computes the log-mel
spectrogram, and writes one file per dialogue, `{cache}/{split}/dia{D}.npz`, with per
utterance U:

  u{U}_tracks  uint8[K, F, S, S, 3]   K face tracks (left to right), F frames at raw.fps
  u{U}_boxes   f32[K, F, 4]           their boxes in the frame
  u{U}_audio   f16[F * sample_rate / fps]
  u{U}_logmel  f32[F * 4, n_mels]     (at 25 fps and hop 160: 4 mel frames per video frame)

A dialogue file is written to a temporary name and renamed, so a rerun skips every finished
dialogue and a crash never leaves a half-written one. A clip that is missing or cannot be
decoded (real MELD has some, e.g. dia125_utt3 of train) is stored in its dialogue's file with
the reason, counted, and listed in `{cache}/{split}/errors.jsonl` (rebuilt from the dialogue
files at the end); the utterance keeps its text and label and has no audio/visual features.
Clips longer than `raw.max_seconds` are cut (counted), which bounds memory; a worker holds one
dialogue in memory at a time.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import time
from typing import Sequence

import cv2
import numpy as np

from mer_jax import console
from mer_jax import files
from mer_jax.data import dialogue_csv
from mer_jax.preprocess import faces as faces_lib
from mer_jax.preprocess import media

ERRORS_NAME = 'errors.jsonl'
STATS_NAME = 'extract_stats.json'


@dataclasses.dataclass
class StageTimes:
  """Seconds spent per stage and clips through it (for clips/second)."""
  seconds: dict = dataclasses.field(default_factory=dict)
  clips: int = 0

  def add(self, stage: str, seconds: float) -> None:
    self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

  def clips_per_second(self) -> dict[str, float]:
    return {k: self.clips / v for k, v in self.seconds.items() if v > 0}


def make_detector(faces_cfg) -> faces_lib.Detector:
  kwargs = {}
  if faces_cfg.detector == 'haar':
    kwargs = dict(scale_factor=float(faces_cfg.scale_factor),
                  min_neighbors=int(faces_cfg.min_neighbors), min_size=int(faces_cfg.min_size))
  return faces_lib.make_detector(faces_cfg.detector, **kwargs)


def decode_utterance(raw_cfg, path: str, audio_path: str | None = None) -> media.DecodedClip:
  """One utterance's frames and audio at the config's rates; the audio from `audio_path` when
  given (fitted to the video's length, as a clip's own audio is). Raises media.MediaError."""
  rates = dict(fps=float(raw_cfg.fps), sample_rate=int(raw_cfg.sample_rate),
               max_seconds=float(raw_cfg.max_seconds))
  if audio_path is None:
    return media.decode_clip(path, **rates)
  video = media.decode_clip(path, need_audio=False, **rates)
  sound = media.decode_clip(audio_path, need_video=False, **rates).audio
  n = int(round(len(video.frames) * video.sample_rate / video.fps))
  return dataclasses.replace(video, audio=media.fit_audio(sound, n))


def extract_utterance(raw_cfg, path: str, detector, times: StageTimes,
                      audio_path: str | None = None) -> tuple[dict, dict]:
  """(arrays of one clip, notes) — raises media.MediaError for an unreadable clip."""
  start = time.perf_counter()
  clip = decode_utterance(raw_cfg, path, audio_path)
  times.add('decode', time.perf_counter() - start)
  notes = {}
  if len(clip.frames) >= int(raw_cfg.max_seconds * raw_cfg.fps):
    notes['truncated'] = True
  f = raw_cfg.faces
  start = time.perf_counter()
  detections = faces_lib.detect_every(clip.frames, detector, int(f.detect_stride))
  tracking = faces_lib.track_faces(detections, iou_threshold=float(f.iou_threshold),
                                   max_gap=int(f.max_gap), min_fraction=float(f.min_fraction),
                                   smooth=int(f.smooth))
  tracks = tracking.tracks
  if len(tracks) > int(f.max_tracks):
    keep = sorted(np.argsort([-t.mean_area for t in tracks])[:int(f.max_tracks)])
    notes['tracks_dropped'] = len(tracks) - len(keep)
    tracks = [tracks[i] for i in keep]
  times.add('faces', time.perf_counter() - start)
  start = time.perf_counter()
  size = int(f.crop_size)
  crops = (np.stack([faces_lib.crop_track(clip.frames, t, size, float(f.margin)) for t in tracks])
           if tracks else np.zeros((0, len(clip.frames), size, size, 3), np.uint8))
  times.add('crop', time.perf_counter() - start)
  start = time.perf_counter()
  mel = media.log_mel(clip.audio, sample_rate=clip.sample_rate, n_mels=int(raw_cfg.mel.n_mels),
                      hop=int(raw_cfg.mel.hop), win=int(raw_cfg.mel.win))
  times.add('logmel', time.perf_counter() - start)
  if not tracks:
    notes['no_face'] = True
  boxes = (np.stack([t.boxes for t in tracks]) if tracks
           else np.zeros((0, len(clip.frames), 4), np.float32))
  return {'tracks': crops, 'boxes': boxes.astype(np.float32),
          'audio': clip.audio.astype(np.float16), 'logmel': mel}, notes


def dialogue_file(cache: str, split: str, dialogue_id) -> str:
  return os.path.join(cache, split, f'dia{dialogue_id}.npz')


COUNT_KEYS = ('clips', 'no_face', 'truncated', 'tracks_dropped')
_WORKER_DETECTOR = {}


def extract_dialogue(raw_cfg, folder: str, cache: str, split: str,
                     dialogue: dialogue_csv.Dialogue, detector=None
                     ) -> tuple[dict[str, int], StageTimes]:
  """Extracts one dialogue's clips into its npz file; returns its counts and stage times."""
  if detector is None:  # a worker process: one detector per process
    if 'detector' not in _WORKER_DETECTOR:
      cv2.setNumThreads(1)  # the processes are the parallelism
      _WORKER_DETECTOR['detector'] = make_detector(raw_cfg.faces)
    detector = _WORKER_DETECTOR['detector']
  times = StageTimes()
  counts = dict.fromkeys(COUNT_KEYS, 0)
  arrays, errors = {}, []
  for u, utterance_id in enumerate(dialogue.utterance_ids):
    path = os.path.join(folder, f'dia{dialogue.dialogue_id}_utt{utterance_id}.mp4')
    try:
      clip, notes = extract_utterance(raw_cfg, path, detector, times)
    except media.MediaError as e:
      errors.append({'dialogue': dialogue.dialogue_id, 'utterance': int(utterance_id),
                     'file': path, 'error': str(e)})
      continue
    times.clips += 1
    counts['clips'] += 1
    for key in COUNT_KEYS[1:]:
      counts[key] += int(notes.get(key, 0))
    for key, value in clip.items():
      arrays[f'u{u}_{key}'] = value
  arrays['errors'] = np.asarray(json.dumps(errors))
  with files.atomic_path(dialogue_file(cache, split, dialogue.dialogue_id)) as tmp:
    np.savez(tmp, **arrays)
  return counts, times


def extract_split(config, root: str, split: str, cache: str,
                  dialogues: Sequence[dialogue_csv.Dialogue]) -> dict:
  """Extracts every dialogue of `split` not yet in `cache`; returns counts and throughput.

  With raw.workers > 1 the dialogues are spread over that many processes (spawned: the parent
  may hold JAX's threads, which must not be forked); clips/second are then per process.
  """
  raw_cfg = config.raw
  folder = os.path.join(root, raw_cfg.split_folders[split])
  out = os.path.join(cache, split)
  os.makedirs(out, exist_ok=True)
  times = StageTimes()
  counts = {'dialogues': len(dialogues), 'skipped_done': 0, 'errors': 0,
            **dict.fromkeys(COUNT_KEYS, 0)}
  todo = [d for d in dialogues if not os.path.exists(dialogue_file(cache, split, d.dialogue_id))]
  counts['skipped_done'] = len(dialogues) - len(todo)
  workers = min(int(raw_cfg.workers) or (os.cpu_count() or 1), max(1, len(todo)))
  start = time.perf_counter()
  bar = console.progress(None, total=len(todo), desc=f'clips ({split})', unit='dialogue')
  if workers > 1:
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context('spawn')) as pool:
      futures = [pool.submit(extract_dialogue, raw_cfg, folder, cache, split, d) for d in todo]
      results = []
      for future in concurrent.futures.as_completed(futures):
        results.append(future.result())
        bar.update(1)
  else:
    detector = make_detector(raw_cfg.faces)
    results = []
    for d in todo:
      results.append(extract_dialogue(raw_cfg, folder, cache, split, d, detector))
      bar.update(1)
  bar.close()
  for c, t in results:
    for key in COUNT_KEYS:
      counts[key] += c[key]
    for stage, seconds in t.seconds.items():
      times.add(stage, seconds)
    times.clips += t.clips
  errors = []
  for d in dialogues:
    with np.load(dialogue_file(cache, split, d.dialogue_id)) as z:
      errors.extend(json.loads(str(z['errors'])))
  errors_path = os.path.join(out, ERRORS_NAME)
  with open(errors_path, 'w') as f:
    for e in errors:
      f.write(json.dumps(e) + '\n')
  counts['errors'] = len(errors)
  counts['workers'] = workers
  counts['seconds'] = time.perf_counter() - start
  counts['clips_per_second'] = times.clips_per_second()
  if counts['seconds'] > 0 and times.clips:
    counts['clips_per_second']['all_stages_wall'] = times.clips / counts['seconds']
  with open(os.path.join(out, STATS_NAME), 'w') as f:
    json.dump(counts, f, indent=1)
  if counts['errors']:
    console.say('%s: %d clips could not be read (listed in %s)', split, counts['errors'],
                errors_path)
  return counts


@dataclasses.dataclass
class UtteranceMedia:
  """One utterance's extracted arrays (None when its clip could not be read)."""
  tracks: np.ndarray | None
  boxes: np.ndarray | None
  audio: np.ndarray | None
  logmel: np.ndarray | None


def utterance_media(arrays) -> UtteranceMedia:
  """The arrays `extract_utterance` gives (or their stored copies) as the later stages read them:
  the audio as stored (float16), widened."""
  return UtteranceMedia(tracks=arrays['tracks'], boxes=arrays['boxes'],
                        audio=np.asarray(arrays['audio']).astype(np.float32),
                        logmel=arrays['logmel'])


def load_dialogue(cache: str, split: str, dialogue_id, num_utterances: int
                  ) -> list[UtteranceMedia]:
  path = dialogue_file(cache, split, dialogue_id)
  with np.load(path) as z:
    out = []
    for u in range(num_utterances):
      if f'u{u}_tracks' not in z:
        out.append(UtteranceMedia(None, None, None, None))
        continue
      out.append(utterance_media({key: z[f'u{u}_{key}']
                                  for key in ('tracks', 'boxes', 'audio', 'logmel')}))
  return out


def read_errors(cache: str, splits: Sequence[str]) -> list[dict]:
  out = []
  for split in splits:
    path = os.path.join(cache, split, ERRORS_NAME)
    if os.path.exists(path):
      with open(path) as f:
        out.extend(json.loads(line) for line in f)
  return out
