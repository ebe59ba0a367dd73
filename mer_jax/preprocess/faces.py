"""Faces in a clip: detection (pluggable), tracking through the clip, fixed-size crops per track.

A detector is any callable `frame uint8[H, W, 3] RGB -> f32[N, 4]` boxes (x0, y0, x1, y1) in
pixels. The default, `HaarFaceDetector`, runs the frontal-face cascade that the OpenCV wheel
ships, so it works offline; a better detector (RetinaFace, MediaPipe, ...) plugs in through
`make_detector` by name or as any such callable.

Tracking is greedy IoU association frame to frame: each detection joins the live track whose
last box overlaps it most (IoU >= `iou_threshold`), else starts a track; a track survives
`max_gap` frames without a detection. Tracks seen in fewer than `min_fraction` of the clip's
detection frames are dropped and counted (false positives flicker). Boxes are then filled in for
every frame (linear interpolation inside, held at the ends), smoothed with a moving average,
squared and enlarged by `margin`, and cropped (clamped to the frame) and resized to `size`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import cv2
import numpy as np

Detector = Callable[[np.ndarray], np.ndarray]


class HaarFaceDetector:
  """OpenCV's bundled Viola-Jones frontal-face cascade."""

  def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 3, min_size: int = 24,
               cascade: str = 'haarcascade_frontalface_default.xml'):
    path = cv2.data.haarcascades + cascade
    self._cascade = cv2.CascadeClassifier(path)
    if self._cascade.empty():
      raise FileNotFoundError(f'OpenCV cascade {path} could not be loaded (opencv-python-headless '
                              '4.x ships it; 5.x does not)')
    self._cv2 = cv2
    self.scale_factor, self.min_neighbors, self.min_size = scale_factor, min_neighbors, min_size

  def __call__(self, frame: np.ndarray) -> np.ndarray:
    gray = self._cv2.cvtColor(np.ascontiguousarray(frame), self._cv2.COLOR_RGB2GRAY)
    found = self._cascade.detectMultiScale(gray, scaleFactor=self.scale_factor,
                                           minNeighbors=self.min_neighbors,
                                           minSize=(self.min_size, self.min_size))
    if len(found) == 0:
      return np.zeros((0, 4), np.float32)
    found = np.asarray(found, np.float32)
    return np.concatenate([found[:, :2], found[:, :2] + found[:, 2:]], axis=1)


DETECTORS = {'haar': HaarFaceDetector}


def make_detector(name: str, **kwargs) -> Detector:
  if name not in DETECTORS:
    raise ValueError(f'unknown face detector {name!r}; known: {sorted(DETECTORS)} (or pass any '
                     'callable frame -> boxes)')
  return DETECTORS[name](**kwargs)


@dataclasses.dataclass
class FaceTrack:
  boxes: np.ndarray  # f32[F, 4] for every frame of the clip (filled in)
  detected: np.ndarray  # bool[F] frames with a real detection

  @property
  def mean_area(self) -> float:
    b = self.boxes[self.detected] if self.detected.any() else self.boxes
    return float(np.mean((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])))

  @property
  def mean_box(self) -> np.ndarray:
    return self.boxes.mean(axis=0)


@dataclasses.dataclass(frozen=True)
class TrackingResult:
  tracks: list[FaceTrack]
  dropped: int  # short-lived tracks left out
  frames_without_faces: int


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """f32[N, M] intersection over union of boxes a[N, 4] and b[M, 4]."""
  a, b = np.asarray(a, np.float32)[:, None], np.asarray(b, np.float32)[None]
  w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = w * h
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  return inter / np.maximum(area(a) + area(b) - inter, 1e-6)


def track_faces(detections: Sequence[np.ndarray], *, iou_threshold: float = 0.3,
                max_gap: int = 5, min_fraction: float = 0.3, smooth: int = 5
                ) -> TrackingResult:
  """Tracks from per-frame boxes (see the module docstring)."""
  n = len(detections)
  live: list[dict] = []  # {'frames': [...], 'boxes': [...], 'last': frame}
  done: list[dict] = []
  for t, boxes in enumerate(detections):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    live, expired = [x for x in live if t - x['last'] <= max_gap], [
        x for x in live if t - x['last'] > max_gap]
    done.extend(expired)
    if not len(boxes):
      continue
    taken = set()
    if live:
      overlap = iou(boxes, np.stack([x['boxes'][-1] for x in live]))
      # Greedy: best pairs first.
      for flat in np.argsort(-overlap, axis=None):
        i, j = np.unravel_index(flat, overlap.shape)
        if overlap[i, j] < iou_threshold:
          break
        if i in taken or live[j]['last'] == t:
          continue
        live[j]['frames'].append(t)
        live[j]['boxes'].append(boxes[i])
        live[j]['last'] = t
        taken.add(i)
    for i in range(len(boxes)):
      if i not in taken:
        live.append({'frames': [t], 'boxes': [boxes[i]], 'last': t})
  done.extend(live)
  frames_with = sum(1 for d in detections if len(np.asarray(d).reshape(-1, 4)))
  keep = [x for x in done if len(x['frames']) >= max(1, min_fraction * frames_with)]
  tracks = [_fill(x, n, smooth) for x in keep]
  tracks.sort(key=lambda tr: float(tr.mean_box[0]))  # left to right: a stable order
  return TrackingResult(tracks=tracks, dropped=len(done) - len(keep),
                        frames_without_faces=n - frames_with)


def _fill(raw: dict, n: int, smooth: int) -> FaceTrack:
  frames = np.asarray(raw['frames'])
  boxes = np.stack(raw['boxes'])
  every = np.arange(n)
  filled = np.stack([np.interp(every, frames, boxes[:, c]) for c in range(4)], axis=1)
  if smooth > 1 and n > 1:
    k = min(smooth, n)
    padded = np.pad(filled, ((k // 2, k - 1 - k // 2), (0, 0)), mode='edge')
    kernel = np.ones(k) / k
    filled = np.stack([np.convolve(padded[:, c], kernel, mode='valid') for c in range(4)], 1)
  detected = np.zeros(n, bool)
  detected[frames] = True
  return FaceTrack(boxes=filled.astype(np.float32), detected=detected)


def crop_track(frames: np.ndarray, track: FaceTrack, size: int, margin: float = 0.15
               ) -> np.ndarray:
  """uint8[F, size, size, 3]: a square around each frame's box, enlarged by `margin`."""
  n, height, width = frames.shape[:3]
  out = np.empty((n, size, size, 3), np.uint8)
  for t in range(n):
    x0, y0, x1, y1 = track.boxes[t]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = max(x1 - x0, y1 - y0) * (1 + margin) / 2
    # Pad with edge pixels so a box at the border keeps its aspect instead of being squashed.
    left, top = int(np.floor(cx - half)), int(np.floor(cy - half))
    side = max(2, int(np.ceil(2 * half)))
    pad = max(0, -left, -top, left + side - width, top + side - height)
    image = frames[t]
    if pad:
      image = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode='edge')
    patch = image[top + pad:top + pad + side, left + pad:left + pad + side]
    out[t] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
  return out


def detect_every(frames: np.ndarray, detector: Detector, stride: int = 1) -> list[np.ndarray]:
  """Runs the detector on every `stride`-th frame; the others get no boxes (tracks fill them)."""
  return [detector(f) if t % stride == 0 else np.zeros((0, 4), np.float32)
          for t, f in enumerate(frames)]
