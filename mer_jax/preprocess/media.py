"""Utterance clips -> video frames at a fixed rate, 16 kHz mono audio and log-mel features.

Decoding uses PyAV (FFmpeg bundled in the wheel; no system ffmpeg needed).

Frame rate: the video is resampled to `fps` by taking, for each output time i / fps, the last
source frame shown at or before that time (what a player would display), so a 24 or 30 fps
clip gives the same number of frames per second as a 25 fps one and frames line up with the
audio: at 25 fps and a 160-sample hop at 16 kHz there are exactly 4 log-mel frames per video
frame, which LipSyncNet relies on.

Log-mel: Hann window of `win` samples, FFT size the next power of two, hop `hop`, power
spectrum, triangular filters equally spaced on the HTK mel scale from `fmin` to `fmax`, then
log(x + 1e-6). Frame i is centred on sample i * hop + hop / 2 (the signal is reflect-padded),
so a clip of S samples has exactly S // hop frames and frame i covers audio time
[i * hop, (i + 1) * hop) / sample_rate on average.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import av
import numpy as np

from mer_jax import errors


class MediaError(errors.UserError):
  """A clip is missing, unreadable, or lacks the stream a stage needs."""


@dataclasses.dataclass(frozen=True)
class DecodedClip:
  path: str
  frames: np.ndarray  # uint8[F, H, W, 3] RGB at `fps`
  audio: np.ndarray  # f32[S] mono in [-1, 1] at `sample_rate`
  fps: float
  sample_rate: int

  @property
  def duration(self) -> float:
    return len(self.frames) / self.fps


def _decode_audio(container, path: str, sample_rate: int) -> np.ndarray:
  resampler = av.AudioResampler(format='flt', layout='mono', rate=sample_rate)
  chunks = []
  for frame in container.decode(audio=0):
    for out in resampler.resample(frame):
      chunks.append(out.to_ndarray().reshape(-1))
  for out in resampler.resample(None):
    chunks.append(out.to_ndarray().reshape(-1))
  if not chunks:
    raise MediaError(f'{path}: the audio stream has no samples')
  return np.concatenate(chunks).astype(np.float32)


def _decode_video(container, path: str, fps: float, max_frames: int | None) -> np.ndarray:
  stream = container.streams.video[0]
  times, images = [], []
  for frame in container.decode(video=0):
    if frame.pts is None or frame.time_base is None:
      raise MediaError(f'{path}: a video frame has no timestamp')
    times.append(float(frame.pts * frame.time_base))
    images.append(frame.to_ndarray(format='rgb24'))
  if not images:
    raise MediaError(f'{path}: the video stream has no frames')
  times = np.asarray(times)
  order = np.argsort(times, kind='stable')
  times = times[order] - times[order[0]]
  # Length of the clip: last timestamp plus one source frame duration.
  source_rate = float(stream.average_rate) if stream.average_rate else fps
  duration = times[-1] + 1.0 / source_rate
  n = max(1, int(round(duration * fps)))
  if max_frames is not None:
    n = min(n, max_frames)
  wanted = np.arange(n) / fps + 1e-6
  pick = np.clip(np.searchsorted(times, wanted, side='right') - 1, 0, len(times) - 1)
  return np.stack([images[order[i]] for i in pick])


def fit_audio(audio: np.ndarray, n: int) -> np.ndarray:
  """Trims or zero-pads to n samples (AAC pads its last frame; some clips end audio early)."""
  if len(audio) >= n:
    return audio[:n]
  return np.pad(audio, (0, n - len(audio)))


def decode_clip(path: str | os.PathLike, *, fps: float = 25.0, sample_rate: int = 16000,
                need_video: bool = True, need_audio: bool = True,
                max_seconds: float | None = None) -> DecodedClip:
  """Decodes one clip; raises MediaError naming the file for anything unreadable.

  With both streams, the audio is trimmed or zero-padded to the video's length, so that
  video frame i and audio samples [i, i + 1) * sample_rate / fps cover the same time.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise MediaError(f'{path}: no such file')
  try:
    container = av.open(path)
  except (av.FFmpegError, OSError, ValueError) as e:
    raise MediaError(f'{path}: cannot open ({e})') from None
  try:
    with container:
      if need_video and not container.streams.video:
        raise MediaError(f'{path}: no video stream')
      if need_audio and not container.streams.audio:
        raise MediaError(f'{path}: no audio stream')
      max_frames = None if max_seconds is None else int(max_seconds * fps)
      frames = (_decode_video(container, path, fps, max_frames) if need_video
                else np.zeros((0, 0, 0, 3), np.uint8))
      container.seek(0)
      audio = _decode_audio(container, path, sample_rate) if need_audio else np.zeros(0, np.float32)
      if max_seconds is not None:
        audio = audio[:int(max_seconds * sample_rate)]
      if need_video and need_audio:
        audio = fit_audio(audio, int(round(len(frames) * sample_rate / fps)))
  except av.FFmpegError as e:
    raise MediaError(f'{path}: corrupt stream ({e})') from None
  return DecodedClip(path=path, frames=frames, audio=audio, fps=fps, sample_rate=sample_rate)


def hz_to_mel(hz):
  return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel):
  return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=8)
def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, fmin: float, fmax: float
                   ) -> np.ndarray:
  """f32[n_fft // 2 + 1, n_mels]: triangles with peaks equally spaced in mel, peak value 1."""
  if not 0 <= fmin < fmax <= sample_rate / 2:
    raise ValueError(f'need 0 <= fmin < fmax <= sample_rate / 2; got fmin={fmin}, fmax={fmax}, '
                     f'sample_rate={sample_rate}')
  edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
  bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
  lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
  rising = (bins[:, None] - lower) / (centre - lower)
  falling = (upper - bins[:, None]) / (upper - centre)
  return np.clip(np.minimum(rising, falling), 0.0, None).astype(np.float32)


def log_mel(audio: np.ndarray, *, sample_rate: int = 16000, n_mels: int = 64, hop: int = 160,
            win: int = 400, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
  """f32[len(audio) // hop, n_mels] log-mel spectrogram (see the module docstring)."""
  audio = np.asarray(audio, np.float32).reshape(-1)
  n_frames = len(audio) // hop
  if n_frames == 0:
    return np.zeros((0, n_mels), np.float32)
  n_fft = 1 << (win - 1).bit_length()
  pad = win // 2
  mode = 'reflect' if len(audio) > pad else 'constant'
  padded = np.pad(audio, (pad, pad + hop), mode=mode)
  # Window i starts at padded index i * hop + hop // 2, i.e. original sample
  # i * hop + hop // 2 - win // 2: it is centred on i * hop + hop // 2.
  starts = np.arange(n_frames) * hop + hop // 2
  frames = padded[starts[:, None] + np.arange(win)[None, :]]
  window = np.hanning(win + 1)[:-1].astype(np.float32)  # periodic Hann
  power = np.abs(np.fft.rfft(frames * window, n=n_fft, axis=-1)) ** 2
  bank = mel_filterbank(n_mels, n_fft, sample_rate, float(fmin), float(fmax or sample_rate / 2))
  return np.log(power.astype(np.float32) @ bank + 1e-6).astype(np.float32)
