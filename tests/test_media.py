"""Raw clips: decoding, log-mel, face detection and tracking, and the synthetic talking heads."""

import json
import os

import numpy as np
import pytest

from mer_jax.data import dialogue_csv
from mer_jax.data import talking_heads as th
from mer_jax.preprocess import faces
from mer_jax.preprocess import media

SPEC = th.TalkingHeadsSpec(seed=3, num_dialogues=(('train', 3), ('test', 1)),
                           utterances=(2, 3), corrupt=('train/dia0_utt1',),
                           missing=('train/dia1_utt0',))


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('heads'))
  counts = th.write_talking_heads(SPEC, root)
  return root, counts


def _clip_path(root, split, d, u):
  return os.path.join(root, th.SPLIT_FOLDERS[split], th.clip_name(d, u))


# --- decoding --------------------------------------------------------------------------------


def test_decoded_clip_matches_what_was_written(corpus):
  root, _ = corpus
  truth = th.read_truth(root, 'train')
  clip = media.decode_clip(_clip_path(root, 'train', 0, 0))
  n = truth[(0, 0)]['frames']
  assert clip.frames.shape == (n, SPEC.height, SPEC.width, 3)
  assert clip.frames.dtype == np.uint8
  assert clip.audio.shape == (n * SPEC.sample_rate // SPEC.fps,)
  assert 0.05 < np.abs(clip.audio).max() <= 1.0


def test_frame_rate_is_resampled_by_timestamps(tmp_path):
  # 30 fps clip whose frame i has brightness 8 * i; decoded at 10 fps, output frame j shows the
  # source frame at time j / 10, i.e. frame 3 * j.
  path = str(tmp_path / 'count.mp4')
  frames = np.stack([np.full((32, 32, 3), 8 * i, np.uint8) for i in range(30)])
  th.write_mp4(path, frames, np.zeros(16000, np.float32), fps=30, sample_rate=16000)
  clip = media.decode_clip(path, fps=10)
  assert len(clip.frames) == 10
  brightness = clip.frames.reshape(10, -1).mean(axis=1)
  np.testing.assert_allclose(brightness, 8 * 3 * np.arange(10), atol=3)


@pytest.mark.parametrize('case', ['missing', 'garbage', 'no_audio'])
def test_unreadable_clips_raise_naming_the_file(tmp_path, case):
  path = str(tmp_path / f'{case}.mp4')
  if case == 'garbage':
    open(path, 'wb').write(b'\x00junk' * 100)
  elif case == 'no_audio':
    import av
    with av.open(path, 'w') as out:
      stream = out.add_stream('libx264', rate=25)
      stream.width = stream.height = 32
      stream.pix_fmt = 'yuv420p'
      for _ in range(3):
        for p in stream.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8),
                                                          format='rgb24')):
          out.mux(p)
      for p in stream.encode():
        out.mux(p)
  with pytest.raises(media.MediaError, match=f'{case}.mp4'):
    media.decode_clip(path)


# --- log-mel ---------------------------------------------------------------------------------


def test_filterbank_triangles_peak_on_mel_spaced_centres():
  bank = media.mel_filterbank(64, 512, 16000, 0.0, 8000.0)
  assert bank.shape == (257, 64)
  centres = media.mel_to_hz(np.linspace(0, media.hz_to_mel(8000), 66))[1:-1]
  bins = np.linspace(0, 8000, 257)
  # Each filter peaks at the FFT bin nearest its centre frequency, with a value close to 1.
  peak_bins = bank.argmax(axis=0)
  far = np.abs(bins[peak_bins] - centres) > 8000 / 256
  assert not far.any()
  assert media.hz_to_mel(1000.0) == pytest.approx(999.99, abs=0.1)  # HTK: 1 kHz ~ 1000 mel


def test_log_mel_frames_and_a_pure_tone():
  sr, hop = 16000, 160
  t = np.arange(sr) / sr
  tone = 0.5 * np.sin(2 * np.pi * 1000.0 * t).astype(np.float32)
  mel = media.log_mel(tone, sample_rate=sr, hop=hop, win=400)
  assert mel.shape == (100, 64)
  centres = media.mel_to_hz(np.linspace(0, media.hz_to_mel(8000), 66))[1:-1]
  assert abs(centres[mel[50].argmax()] - 1000.0) < 60
  # One frame by hand: window centred on sample 50 * 160 + 80.
  c = 50 * hop + hop // 2
  seg = tone[c - 200:c + 200] * (np.hanning(401)[:-1])
  power = np.abs(np.fft.rfft(seg, n=512)) ** 2
  expected = np.log(power @ media.mel_filterbank(64, 512, sr, 0.0, 8000.0) + 1e-6)
  np.testing.assert_allclose(mel[50], expected, rtol=1e-4, atol=1e-3)


def test_log_mel_of_audio_shorter_than_a_hop_is_empty():
  assert media.log_mel(np.zeros(100, np.float32)).shape == (0, 64)


# --- faces -----------------------------------------------------------------------------------


def test_iou_by_hand():
  a = np.array([[0, 0, 10, 10]])
  b = np.array([[5, 5, 15, 15], [20, 20, 30, 30], [0, 0, 10, 10]])
  np.testing.assert_allclose(faces.iou(a, b), [[25 / 175, 0.0, 1.0]], rtol=1e-6)


def test_tracking_joins_gaps_and_drops_flicker():
  n = 20
  dets = []
  for t in range(n):
    boxes = [[10 + t, 10, 40 + t, 40]]  # moves right one pixel per frame
    if not 8 <= t <= 10:  # second face missed for 3 frames
      boxes.append([100, 10, 130, 40])
    if t == 5:
      boxes.append([60, 60, 70, 70])  # a one-frame false positive
    dets.append(np.array(boxes, np.float32))
  result = faces.track_faces(dets, max_gap=5, smooth=1)
  assert len(result.tracks) == 2 and result.dropped == 1
  left, right = result.tracks
  np.testing.assert_allclose(left.boxes[:, 0], 10 + np.arange(n))
  assert right.detected.sum() == n - 3 and not right.detected[9]
  np.testing.assert_allclose(right.boxes[9], [100, 10, 130, 40])  # filled in
  assert right.mean_area == pytest.approx(900.0)


def test_a_gap_longer_than_max_gap_splits_the_track():
  dets = [np.array([[0, 0, 20, 20]], np.float32) if t < 5 or t >= 15 else np.zeros((0, 4))
          for t in range(20)]
  assert len(faces.track_faces(dets, max_gap=3, min_fraction=0.0).tracks) == 2


def test_crop_is_square_and_pads_at_the_border():
  frames = np.zeros((2, 50, 80, 3), np.uint8)
  frames[:, :, :40] = 200
  track = faces.FaceTrack(boxes=np.array([[-10, -10, 20, 30]] * 2, np.float32),
                          detected=np.ones(2, bool))
  crops = faces.crop_track(frames, track, 24)
  assert crops.shape == (2, 24, 24, 3)
  assert crops.min() == 200  # edge padding, no black border


def test_haar_detector_finds_the_drawn_faces(corpus):
  root, _ = corpus
  truth = th.read_truth(root, 'test')
  detector = faces.make_detector('haar')
  found = total = 0
  for (d, u), t in truth.items():
    clip = media.decode_clip(_clip_path(root, 'test', d, u))
    result = faces.track_faces(faces.detect_every(clip.frames, detector, stride=2))
    boxes = np.array([f['box'] for f in t['faces']])
    if result.tracks:
      overlap = faces.iou(np.stack([tr.mean_box for tr in result.tracks]), boxes)
      found += int((overlap.max(axis=0) > 0.3).sum())
    total += len(boxes)
  assert found == total


def test_unknown_detector_is_named():
  with pytest.raises(ValueError, match='retina'):
    faces.make_detector('retina')


# --- the synthetic corpus --------------------------------------------------------------------


def test_corpus_is_meld_layout_and_readable(corpus):
  root, counts = corpus
  dialogues, report = dialogue_csv.read_dialogue_csv(os.path.join(root, 'train_sent_emo.csv'),
                                                     dialogue_csv.MELD_SCHEMA)
  assert sum(len(d) for d in dialogues) == counts['train'] and not report.skipped
  assert len(dialogues) == 3
  listed = {th.clip_name(int(d.dialogue_id), u) for d in dialogues
            for u in range(len(d))}
  present = set(os.listdir(os.path.join(root, 'train_splits')))
  assert listed - present == {'dia1_utt0.mp4'}  # the one clip asked to be missing
  with pytest.raises(media.MediaError, match='dia0_utt1'):
    media.decode_clip(_clip_path(root, 'train', 0, 1))


def test_corpus_is_deterministic(corpus, tmp_path):
  root, _ = corpus
  spec = th.TalkingHeadsSpec(**{**SPEC.__dict__, 'num_dialogues': (('test', 1),)})
  th.write_talking_heads(spec, str(tmp_path))
  for name in ('test_sent_emo.csv', 'truth_test.jsonl'):
    assert open(os.path.join(root, name)).read() == open(tmp_path / name).read()
  a = media.decode_clip(_clip_path(root, 'test', 0, 0))
  b = media.decode_clip(_clip_path(str(tmp_path), 'test', 0, 0))
  np.testing.assert_array_equal(a.audio, b.audio)
  np.testing.assert_array_equal(a.frames, b.frames)


def test_only_the_speaker_mouth_follows_the_audio():
  rng = np.random.default_rng(0)
  spec = th.TalkingHeadsSpec()
  per = spec.sample_rate // spec.fps
  for emotion in th.LABELS:
    audio, env = th.synthesize_voice(rng, emotion, 120.0, 40 * per, spec.sample_rate, True)
    mouth = th.frame_envelope(env, 40, per)
    loudness = np.abs(audio).reshape(40, per).mean(axis=1)
    other = th.frame_envelope(th.syllable_envelope(rng, 40 * per, spec.sample_rate, 4.0), 40, per)
    assert np.corrcoef(mouth, loudness)[0, 1] > 0.8
    assert abs(np.corrcoef(other, loudness)[0, 1]) < 0.6


def test_truth_names_one_speaking_face_per_clip(corpus):
  root, _ = corpus
  with open(os.path.join(root, 'truth_train.jsonl')) as f:
    for line in f:
      t = json.loads(line)
      motions = [face['motion'] for face in t['faces']]
      assert motions.count('speaking') == 1 and motions[t['speaker_face']] == 'speaking'
      assert 1 <= len(motions) <= 3
