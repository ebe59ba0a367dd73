"""Synthetic talking heads: a deterministic MELD-layout folder of utterance clips (the raw demo).

`write_talking_heads(spec, root)` writes, from `spec.seed` alone:

  root/{split}_sent_emo.csv                      MELD's columns (Sr No., Utterance, Speaker,
                                                 Emotion, Sentiment, Dialogue_ID, ...)
  root/{folder of split}/dia{D}_utt{U}.mp4       H.264 video (25 fps) + AAC audio (16 kHz mono)
  root/truth_{split}.jsonl                       per clip: every drawn face's box, which one
                                                 speaks, how each mouth moves, each face's emotion

with MELD's folder names (train_splits, dev_splits_complete, output_repeated_splits_test).

The story of one dialogue: a cast of 2-3 characters, each with a face (skin, hair, place on
screen, size) and a voice (base pitch). Each utterance has a speaker and an emotion (the
speaker keeps their previous emotion with p = 0.6, else one drawn from MELD's train prior).
Its clip shows 1-3 faces of the cast, the speaker always among them at a random place:

- the speaker's mouth opens with the loudness envelope of the utterance's audio;
- every other face either mouths a different, independent syllable envelope (p =
  `p_distractor_moves`: a listener who is talking under their breath, the case a
  lip-sync model must not be fooled by) or keeps its mouth still with a small jitter.

Emotion cues, each with a random intensity and absent in a fraction of utterances (so no
modality is enough on its own):
- voice: pitch level and contour, syllable rate, loudness, brightness (harmonic roll-off) and
  breathiness depend on the emotion;
- face (the speaker's): brow slant and height, eye opening and mouth-corner curve; listeners
  show an emotion of their own, mostly neutral;
- words: an emotion word in most transcripts among neutral filler.

Sizes and probabilities come from `TalkingHeadsSpec` (filled from `config.raw.synthetic`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Sequence

import av
import cv2
import numpy as np
from tqdm import tqdm

from mer_jax import files
from mer_jax.data import synthetic

LABELS = synthetic.MELD_LABELS
SPLIT_FOLDERS = {'train': 'train_splits', 'dev': 'dev_splits_complete',
                 'test': 'output_repeated_splits_test'}
SENTIMENT = {'neutral': 'neutral', 'surprise': 'positive', 'fear': 'negative',
             'sadness': 'negative', 'joy': 'positive', 'disgust': 'negative', 'anger': 'negative'}
CSV_COLUMNS = ('Sr No.', 'Utterance', 'Speaker', 'Emotion', 'Sentiment', 'Dialogue_ID',
               'Utterance_ID', 'Season', 'Episode', 'StartTime', 'EndTime')

# Per emotion: (pitch factor, pitch slope over the utterance, syllables per second, loudness,
# harmonic roll-off exponent (smaller = brighter), breath noise, pitch jitter).
VOICE = {
    'neutral': (1.00, 0.00, 4.0, 0.55, 1.6, 0.02, 0.00),
    'surprise': (1.30, 0.35, 4.5, 0.75, 1.3, 0.03, 0.02),
    'fear': (1.35, 0.05, 6.0, 0.45, 1.5, 0.10, 0.08),
    'sadness': (0.82, -0.20, 2.6, 0.30, 2.2, 0.06, 0.01),
    'joy': (1.22, 0.10, 5.0, 0.75, 1.2, 0.02, 0.03),
    'disgust': (0.90, -0.10, 3.2, 0.50, 1.8, 0.08, 0.01),
    'anger': (1.12, -0.05, 5.5, 1.00, 0.9, 0.04, 0.02),
}
# Per emotion: (brow slant (+ = inner ends down, as in anger), brow raise, eye opening,
# mouth-corner curve (+ = smile)).
FACE = {
    'neutral': (0.0, 0.0, 1.0, 0.0),
    'surprise': (0.0, 1.0, 1.6, 0.0),
    'fear': (-0.6, 0.8, 1.5, -0.3),
    'sadness': (-1.0, 0.2, 0.7, -0.8),
    'joy': (0.0, 0.2, 0.8, 1.0),
    'disgust': (0.5, -0.4, 0.6, -0.6),
    'anger': (1.0, -0.6, 0.7, -0.4),
}
WORDS = {
    'neutral': ('okay', 'sure', 'right', 'fine', 'alright'),
    'surprise': ('what', 'really', 'wow', 'seriously', 'whoa'),
    'fear': ('scared', 'afraid', 'terrified', 'nervous', 'worried'),
    'sadness': ('sorry', 'miss', 'sad', 'lonely', 'crying'),
    'joy': ('great', 'love', 'wonderful', 'awesome', 'happy'),
    'disgust': ('gross', 'ew', 'disgusting', 'nasty', 'yuck'),
    'anger': ('hate', 'stupid', 'furious', 'shut', 'damn'),
}
FILLER = ('i', 'you', 'we', 'the', 'that', 'it', 'is', 'was', 'so', 'just', 'know', 'think',
          'going', 'there', 'now', 'well', 'about', 'this', 'here', 'with', 'me', 'him', 'her')
NAMES = ('Ava', 'Ben', 'Cleo', 'Dan', 'Eli', 'Fay', 'Gus', 'Hana', 'Ivo', 'Jun', 'Kai', 'Lea')
SKIN = ((170, 190, 225), (140, 165, 205), (105, 130, 175), (80, 100, 140), (190, 205, 235))
HAIR = ((40, 40, 60), (30, 60, 110), (20, 20, 20), (60, 90, 150), (100, 100, 110))


@dataclasses.dataclass(frozen=True)
class TalkingHeadsSpec:
  seed: int = 0
  num_dialogues: tuple[tuple[str, int], ...] = (('train', 60), ('dev', 12), ('test', 24))
  utterances: tuple[int, int] = (3, 8)  # per dialogue, inclusive
  cast: tuple[int, int] = (2, 3)
  faces: tuple[int, int] = (1, 3)  # visible per clip
  seconds: tuple[float, float] = (1.2, 2.0)
  fps: int = 25
  sample_rate: int = 16000
  width: int = 256
  height: int = 144
  face_size: tuple[int, int] = (46, 62)  # face height in pixels
  p_distractor_moves: float = 0.5
  p_face_cue: float = 0.75  # the speaker's face shows the emotion
  p_voice_cue: float = 0.8
  p_word_cue: float = 0.7
  p_keep_emotion: float = 0.6
  corrupt: tuple[str, ...] = ()  # 'split/diaD_uttU': written as garbage bytes (error reports)
  missing: tuple[str, ...] = ()  # 'split/diaD_uttU': listed in the CSV, no file

  @classmethod
  def from_config(cls, c) -> 'TalkingHeadsSpec':
    return cls(seed=int(c.seed), num_dialogues=tuple((k, int(v)) for k, v in
                                                     c.num_dialogues.items()),
               utterances=tuple(c.utterances), cast=tuple(c.cast), faces=tuple(c.faces),
               seconds=tuple(c.seconds), fps=int(c.fps), sample_rate=int(c.sample_rate),
               width=int(c.width), height=int(c.height), face_size=tuple(c.face_size),
               p_distractor_moves=float(c.p_distractor_moves), p_face_cue=float(c.p_face_cue),
               p_voice_cue=float(c.p_voice_cue), p_word_cue=float(c.p_word_cue),
               p_keep_emotion=float(c.p_keep_emotion), corrupt=tuple(c.corrupt),
               missing=tuple(c.missing))


def clip_name(dialogue: int, utterance: int) -> str:
  return f'dia{dialogue}_utt{utterance}.mp4'


# ---------------------------------------------------------------------------------------------
# Audio.


def syllable_envelope(rng: np.random.Generator, n_samples: int, sample_rate: int, rate: float
                      ) -> np.ndarray:
  """f32[n_samples] in [0, 1]: raised-cosine syllables of random length and loudness, gaps."""
  env = np.zeros(n_samples, np.float32)
  t = int(rng.uniform(0.02, 0.15) * sample_rate)
  while t < n_samples:
    length = int(rng.uniform(0.55, 1.1) / rate * sample_rate)
    amp = rng.uniform(0.5, 1.0)
    end = min(n_samples, t + length)
    phase = np.linspace(0, np.pi, length, endpoint=False)[:end - t]
    env[t:end] = amp * np.sin(phase) ** 2
    t = end + int(rng.uniform(0.15, 0.6) / rate * sample_rate)
  return env


def synthesize_voice(rng: np.random.Generator, emotion: str, base_pitch: float, n_samples: int,
                     sample_rate: int, cue: bool) -> tuple[np.ndarray, np.ndarray]:
  """(waveform f32[n_samples], loudness envelope f32[n_samples])."""
  factor, slope, rate, loud, rolloff, breath, jitter = VOICE[emotion if cue else 'neutral']
  env = syllable_envelope(rng, n_samples, sample_rate, rate * rng.uniform(0.85, 1.15))
  t = np.arange(n_samples) / sample_rate
  progress = t / max(t[-1], 1e-6)
  pitch = base_pitch * factor * (1.0 + slope * (progress - 0.5))
  pitch = pitch * (1.0 + jitter * np.sin(2 * np.pi * 7.0 * t + rng.uniform(0, 2 * np.pi)))
  pitch = pitch * (1.0 + 0.03 * rng.standard_normal())
  phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
  harmonics = np.arange(1, 9)
  wave = (np.sin(phase[:, None] * harmonics) / harmonics ** rolloff).sum(axis=1)
  wave = wave / np.abs(wave).max() + breath * rng.standard_normal(n_samples)
  signal = loud * rng.uniform(0.8, 1.2) * env * wave
  signal += 0.003 * rng.standard_normal(n_samples)  # room noise
  return (0.9 * signal / max(1.0, np.abs(signal).max())).astype(np.float32), env


def frame_envelope(env: np.ndarray, n_frames: int, samples_per_frame: int) -> np.ndarray:
  """Mean loudness per video frame, scaled to [0, 1] by the clip's peak."""
  per = env[:n_frames * samples_per_frame].reshape(n_frames, samples_per_frame).mean(axis=1)
  return per / max(per.max(), 1e-6)


# ---------------------------------------------------------------------------------------------
# Video.


def draw_face(img: np.ndarray, cx: float, cy: float, size: float, skin, hair, mouth: float,
              emotion: str, intensity: float) -> None:
  """Draws one face (BGR, in place); `mouth` in [0, 1] is the mouth opening."""
  slant, raise_, eyes, curve = (v * intensity for v in FACE[emotion])
  eyes = 1.0 + (FACE[emotion][2] - 1.0) * intensity
  s = size
  p = lambda x, y: (int(round(cx + x * s)), int(round(cy + y * s)))
  r = lambda v: max(1, int(round(v * s)))
  cv2.ellipse(img, p(0, 0), (r(0.38), r(0.5)), 0, 0, 360, skin, -1, cv2.LINE_AA)
  cv2.ellipse(img, p(0, -0.34), (r(0.40), r(0.20)), 0, 180, 360, hair, -1, cv2.LINE_AA)
  eye_y = -0.11
  for side in (-1, 1):
    ex = side * 0.16
    cv2.ellipse(img, p(ex, eye_y), (r(0.08), max(1, int(round(0.045 * eyes * s)))), 0, 0, 360,
                (250, 250, 250), -1, cv2.LINE_AA)
    cv2.circle(img, p(ex, eye_y), r(0.035), (30, 30, 30), -1, cv2.LINE_AA)
    brow_y = eye_y - 0.10 - 0.06 * raise_
    inner, outer = ex - side * 0.09, ex + side * 0.10
    cv2.line(img, p(inner, brow_y + 0.05 * slant), p(outer, brow_y - 0.03 * slant), hair,
             r(0.035), cv2.LINE_AA)
  cv2.line(img, p(0, -0.05), p(-0.035, 0.11), tuple(int(c * 0.75) for c in skin), r(0.025),
           cv2.LINE_AA)
  mouth_y, half_width = 0.26, 0.14
  opening = 0.015 + 0.11 * float(np.clip(mouth, 0.0, 1.0))
  cv2.ellipse(img, p(0, mouth_y), (r(half_width), max(1, int(round(opening * s)))), 0, 0, 360,
              (45, 35, 120), -1, cv2.LINE_AA)
  for side in (-1, 1):  # mouth corners: up for a smile, down for a frown
    cv2.line(img, p(side * half_width * 0.9, mouth_y),
             p(side * (half_width + 0.05), mouth_y - 0.06 * curve), (45, 35, 120), r(0.025),
             cv2.LINE_AA)


def render_clip(rng: np.random.Generator, faces: Sequence[dict], mouths: np.ndarray,
                width: int, height: int, background) -> np.ndarray:
  """uint8[F, H, W, 3] RGB; `mouths` f32[F, K] mouth openings of the K faces."""
  n_frames = mouths.shape[0]
  drift = np.cumsum(rng.normal(0, 0.3, size=(n_frames, len(faces), 2)), axis=0)
  frames = np.empty((n_frames, height, width, 3), np.uint8)
  base = np.empty((height, width, 3), np.uint8)
  base[:] = background
  for i in range(n_frames):
    img = base.copy()
    for k, face in enumerate(faces):
      draw_face(img, face['cx'] + drift[i, k, 0], face['cy'] + drift[i, k, 1], face['size'],
                face['skin'], face['hair'], mouths[i, k], face['emotion'], face['intensity'])
    noise = rng.integers(-4, 5, size=img.shape, dtype=np.int16)
    frames[i] = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)[..., ::-1]
  return frames


def write_mp4(path: str, frames: np.ndarray, audio: np.ndarray, fps: int, sample_rate: int
              ) -> None:
  """H.264 video + AAC mono audio, written to a temporary name and renamed (atomic)."""
  with files.atomic_path(path) as tmp, av.open(tmp, 'w') as out:
    video = out.add_stream('libx264', rate=fps, options={'preset': 'ultrafast', 'crf': '20'})
    video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], 'yuv420p'
    sound = out.add_stream('aac', rate=sample_rate)
    sound.layout = 'mono'
    for image in frames:
      for packet in video.encode(av.VideoFrame.from_ndarray(image, format='rgb24')):
        out.mux(packet)
    for packet in video.encode():
      out.mux(packet)
    chunk = 1024
    for start in range(0, len(audio), chunk):
      frame = av.AudioFrame.from_ndarray(audio[None, start:start + chunk], format='flt',
                                         layout='mono')
      frame.sample_rate = sample_rate
      frame.pts = start
      for packet in sound.encode(frame):
        out.mux(packet)
    for packet in sound.encode():
      out.mux(packet)


# ---------------------------------------------------------------------------------------------
# Dialogues.


def _emotion_prior() -> np.ndarray:
  counts = np.asarray(synthetic.MELD_TRAIN_CLASS_COUNTS, np.float64)
  return counts / counts.sum()


def _cast(rng: np.random.Generator, n: int, spec: TalkingHeadsSpec) -> list[dict]:
  names = rng.choice(len(NAMES), size=n, replace=False)
  return [dict(name=NAMES[i], skin=SKIN[rng.integers(len(SKIN))],
               hair=HAIR[rng.integers(len(HAIR))],
               pitch=float(rng.uniform(95, 150) if rng.random() < 0.5 else rng.uniform(170, 250)))
          for i in names]


def _transcript(rng: np.random.Generator, emotion: str, cue: bool) -> str:
  words = list(rng.choice(FILLER, size=int(rng.integers(3, 8))))
  if cue:
    words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(WORDS[emotion])))
  text = ' '.join(words)
  return text[0].upper() + text[1:] + ('?' if emotion == 'surprise' else '.')


def _layout(rng: np.random.Generator, n: int, spec: TalkingHeadsSpec
            ) -> list[tuple[float, float, float]]:
  """(cx, cy, size) for n faces in distinct horizontal slots."""
  slots = rng.permutation(3)[:n]
  out = []
  for slot in slots:
    size = float(rng.uniform(*spec.face_size))
    cx = (slot + 0.5) * spec.width / 3 + rng.uniform(-6, 6)
    cy = spec.height / 2 + rng.uniform(-8, 8)
    out.append((cx, cy, size))
  return out


def _timestamp(seconds: float) -> str:
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{int(h):02d}:{int(m):02d}:{int(s):02d},{int(round((s % 1) * 1000)) % 1000:03d}'


def _utterance(rng, spec: TalkingHeadsSpec, cast, speaker: int, emotion: str) -> tuple[dict, dict]:
  """(clip arrays and truth, CSV fields) of one utterance."""
  n_frames = int(round(rng.uniform(*spec.seconds) * spec.fps))
  per_frame = spec.sample_rate // spec.fps
  n_samples = n_frames * per_frame
  voice_cue = rng.random() < spec.p_voice_cue
  audio, env = synthesize_voice(rng, emotion, cast[speaker]['pitch'], n_samples,
                                spec.sample_rate, voice_cue)
  n_faces = int(min(len(cast), rng.integers(spec.faces[0], spec.faces[1] + 1)))
  others = [k for k in rng.permutation(len(cast)) if k != speaker][:n_faces - 1]
  members = [speaker] + [int(k) for k in others]
  order = rng.permutation(n_faces)  # the speaker's place on screen is random
  places = _layout(rng, n_faces, spec)
  faces, mouths, truth_faces = [], np.zeros((n_frames, n_faces), np.float32), []
  for slot, idx in enumerate(order):
    member = members[idx]
    cx, cy, size = places[slot]
    if member == speaker:
      shown = emotion if rng.random() < spec.p_face_cue else 'neutral'
      mouths[:, slot] = frame_envelope(env, n_frames, per_frame)
      motion = 'speaking'
    else:
      shown = LABELS[0] if rng.random() < 0.6 else str(rng.choice(LABELS))
      if rng.random() < spec.p_distractor_moves:
        other = syllable_envelope(rng, n_samples, spec.sample_rate, rng.uniform(3, 6))
        mouths[:, slot] = frame_envelope(other, n_frames, per_frame)
        motion = 'other'
      else:
        mouths[:, slot] = 0.05 * rng.random() + 0.02 * rng.standard_normal(n_frames)
        motion = 'still'
    intensity = float(rng.uniform(0.5, 1.0))
    faces.append(dict(cx=cx, cy=cy, size=size, skin=cast[member]['skin'],
                      hair=cast[member]['hair'], emotion=shown, intensity=intensity))
    truth_faces.append(dict(box=[round(cx - 0.4 * size, 1), round(cy - 0.55 * size, 1),
                                 round(cx + 0.4 * size, 1), round(cy + 0.5 * size, 1)],
                            cast_member=member, motion=motion, emotion=shown))
  background = tuple(int(v) for v in rng.integers(15, 65, size=3))
  frames = render_clip(rng, faces, mouths, spec.width, spec.height, background)
  speaker_slot = int(np.flatnonzero(order == 0)[0])
  truth = dict(speaker_face=speaker_slot, faces=truth_faces, frames=n_frames,
               voice_cue=bool(voice_cue))
  text = _transcript(rng, emotion, rng.random() < spec.p_word_cue)
  return dict(frames=frames, audio=audio, truth=truth), dict(text=text,
                                                              seconds=n_frames / spec.fps)


def write_talking_heads(spec: TalkingHeadsSpec, root: str, *, progress: bool = False
                        ) -> dict[str, int]:
  """Writes the corpus under `root`; returns clips written per split. Deterministic in spec."""
  os.makedirs(root, exist_ok=True)
  prior = _emotion_prior()
  counts = {}
  split_seeds = {name: i for i, name in enumerate(SPLIT_FOLDERS)}
  for split, n_dialogues in spec.num_dialogues:
    if split not in SPLIT_FOLDERS:
      raise ValueError(f'talking heads: unknown split {split!r}; expected {list(SPLIT_FOLDERS)}')
    rng = np.random.default_rng([spec.seed, split_seeds[split]])
    folder = os.path.join(root, SPLIT_FOLDERS[split])
    os.makedirs(folder, exist_ok=True)
    rows, truths = [], []
    bar = None
    if progress:
      bar = tqdm(total=n_dialogues, desc=f'talking heads {split}', unit='dialogue')
    for d in range(n_dialogues):
      cast = _cast(rng, int(rng.integers(spec.cast[0], spec.cast[1] + 1)), spec)
      n_utt = int(rng.integers(spec.utterances[0], spec.utterances[1] + 1))
      last = {}
      clock = float(rng.uniform(0, 600))
      for u in range(n_utt):
        speaker = int(rng.integers(len(cast)))
        if speaker in last and rng.random() < spec.p_keep_emotion:
          emotion = last[speaker]
        else:
          emotion = LABELS[int(rng.choice(len(LABELS), p=prior))]
        last[speaker] = emotion
        clip, fields = _utterance(rng, spec, cast, speaker, emotion)
        key = f'{split}/dia{d}_utt{u}'
        path = os.path.join(folder, clip_name(d, u))
        if key in spec.corrupt:
          with open(path, 'wb') as f:
            f.write(b'\x00not an mp4\x00' * 64)
        elif key not in spec.missing:
          write_mp4(path, clip['frames'], clip['audio'], spec.fps, spec.sample_rate)
        rows.append({'Sr No.': len(rows) + 1, 'Utterance': fields['text'],
                     'Speaker': cast[speaker]['name'], 'Emotion': emotion,
                     'Sentiment': SENTIMENT[emotion], 'Dialogue_ID': d, 'Utterance_ID': u,
                     'Season': 1, 'Episode': 1, 'StartTime': _timestamp(clock),
                     'EndTime': _timestamp(clock + fields['seconds'])})
        clock += fields['seconds'] + float(rng.uniform(0.1, 1.0))
        truths.append(dict(dialogue=d, utterance=u, clip=clip_name(d, u), emotion=emotion,
                           **clip['truth']))
      if bar is not None:
        bar.update(1)
    if bar is not None:
      bar.close()
    _write_csv(os.path.join(root, f'{split}_sent_emo.csv'), rows)
    with open(os.path.join(root, f'truth_{split}.jsonl'), 'w') as f:
      for t in truths:
        f.write(json.dumps(t) + '\n')
    counts[split] = len(rows)
  return counts


def _write_csv(path: str, rows: list[dict]) -> None:
  with files.open_atomically(path, newline='', encoding='utf-8') as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)


def read_truth(root: str, split: str) -> dict[tuple[int, int], dict]:
  """(dialogue, utterance) -> the clip's truth record."""
  out = {}
  with open(os.path.join(root, f'truth_{split}.jsonl')) as f:
    for line in f:
      t = json.loads(line)
      out[(t['dialogue'], t['utterance'])] = t
  return out
