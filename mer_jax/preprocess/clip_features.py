"""New clips -> the audio and visual features a raw run (data.source 'raw') computed for its own.

What `mer_jax.predict` runs for an utterance that names a clip: the training front end, stage by
stage, on that one clip (mer_jax/preprocess/raw.py has the whole pipeline):

  1. clips     decode at raw.fps / raw.sample_rate, track and crop the faces, log-mel
               (clips.extract_utterance; the audio rounded to float16 as the clip cache stores it);
  2. speaker   the run's trained LipSyncNet scores every face track against the audio and the
               closest is the speaker (raw.choose_faces); a model trained on the 'largest' face
               reads the largest. 'true' (the synthetic corpus's oracle) and 'random' are
               ablations with no counterpart for a new clip: their models read LipSyncNet's choice;
  3. features  the run's Wav2Vec2 on the audio and TimeSformer on the chosen track
               (av_features), with the same batching.

A clip that cannot be read gives no audio/visual features and the reason (as training keeps
such an utterance's text only); a clip without a detected face gives audio alone. An utterance
may name its audio apart from its video ("audio" beside "video", the video's length wins), or
audio alone (audio features only).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from mer_jax.preprocess import av_features
from mer_jax.preprocess import clips as clips_lib
from mer_jax.preprocess import lipsync_training
from mer_jax.preprocess import media
from mer_jax.preprocess import raw


@dataclasses.dataclass(frozen=True)
class ClipRequest:
  """The media files of one utterance: a video (its own audio unless `audio` is given), or an
  audio file alone."""
  video: str | None = None
  audio: str | None = None


@dataclasses.dataclass(frozen=True)
class ClipFeatures:
  """What the front end made of one ClipRequest."""
  audio: np.ndarray | None  # f32[d_a], None when the clip could not be read
  visual: np.ndarray | None  # f32[d_v], None without a readable video or a detected face
  faces: int = 0  # face tracks found
  speaker_face: int = -1  # the track the visual encoder read (-1: none)
  error: str = ''  # why the clip could not be read ('' when it was)


class ClipFeaturizer:
  """The AV front end of a raw run, restored: ClipRequests in, ClipFeatures out (module docstring).

  `lipsync_folder` holds the trained LipSyncNet (raw.trained_lipsync_dir for a workdir, the
  bundle's av/lipsync otherwise); `audio_checkpoint` / `visual_checkpoint` read the encoders from
  other folders than the config names (a bundle's copies).
  """

  def __init__(self, config, lipsync_folder: str | None, audio_checkpoint: str | None = None,
               visual_checkpoint: str | None = None):
    self.config = config
    self.detector = clips_lib.make_detector(config.raw.faces)
    self.scorer = None
    if config.raw.visual_face != 'largest':
      if lipsync_folder is None:
        raise FileNotFoundError(
            "the run's trained LipSyncNet is not there (a workdir whose data cache was cleared); "
            'export a bundle while the workdir has it, or rebuild the cache')
      self.scorer = lipsync_training.TrackScorer(
          lipsync_training.restore_lipsync(config.lipsync, lipsync_folder), config.lipsync)
    self.audio = av_features.audio_featurizer(config.raw, audio_checkpoint)
    self.visual = av_features.visual_featurizer(config.raw, visual_checkpoint)

  def speaker_face(self, utterance: clips_lib.UtteranceMedia, clip_id: str) -> int:
    """The track the run's visual encoder reads (raw.choose_faces for the run's policy)."""
    clip = raw.sync_clip(utterance, self.config.lipsync, clip_id)
    if self.scorer is None:
      return lipsync_training.largest_face(clip)
    distances = self.scorer(clip) if clip.num_tracks > 1 else np.zeros(1, np.float32)
    return int(np.argmin(distances))

  def _media(self, request: ClipRequest, clip_id: str) -> tuple[np.ndarray, np.ndarray | None,
                                                                int, int]:
    """(waveform, chosen face track or None, tracks, chosen index); raises media.MediaError."""
    raw_cfg = self.config.raw
    if request.video is None:
      sound = media.decode_clip(request.audio, need_video=False, fps=float(raw_cfg.fps),
                                sample_rate=int(raw_cfg.sample_rate),
                                max_seconds=float(raw_cfg.max_seconds)).audio
      # As stored in the clip cache (float16) for the audio of training clips.
      return sound.astype(np.float16).astype(np.float32), None, 0, -1
    arrays, _ = clips_lib.extract_utterance(raw_cfg, request.video, self.detector,
                                            clips_lib.StageTimes(), audio_path=request.audio)
    utterance = clips_lib.utterance_media(arrays)
    if not len(utterance.tracks):
      return utterance.audio, None, 0, -1
    face = self.speaker_face(utterance, clip_id)
    return utterance.audio, utterance.tracks[face], len(utterance.tracks), face

  def __call__(self, requests: Sequence[ClipRequest], chunk: int = 64) -> list[ClipFeatures]:
    """One ClipFeatures per request, in order; `chunk` clips are held in memory at a time."""
    out: list[ClipFeatures] = []
    for start in range(0, len(requests), chunk):
      out.extend(self._features(requests[start:start + chunk]))
    return out

  def _features(self, requests: Sequence[ClipRequest]) -> list[ClipFeatures]:
    read, errors = {}, {}
    for i, request in enumerate(requests):
      try:
        read[i] = self._media(request, os.path.basename(request.video or request.audio))
      except media.MediaError as e:
        errors[i] = str(e)
    waves = [read[i][0] for i in sorted(read)]
    with_face = [i for i in sorted(read) if read[i][1] is not None]
    audio = dict(zip(sorted(read), self.audio(waves, desc='audio features (clips)')))
    visual = dict(zip(with_face, self.visual([read[i][1] for i in with_face],
                                             desc='visual features (clips)')))
    return [ClipFeatures(audio=None, visual=None, error=errors[i]) if i in errors else
            ClipFeatures(audio=audio[i], visual=visual.get(i), faces=read[i][2],
                         speaker_face=read[i][3]) for i in range(len(requests))]
