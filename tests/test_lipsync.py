"""LipSyncNet (SPEC stage 2): loss by hand, embeddings, triplet sampler, scoring windows, a
small learning test on synthetic talking faces, and the checkpoint round trip."""

import time

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mer_jax.losses import lipsync as lipsync_loss
from mer_jax.models import lipsync as lipsync_model
from mer_jax.preprocess import lipsync_training as lipsync

pytestmark = pytest.mark.slow

WINDOW = 8
CROP = 24
FRAMES = 24  # frames per synthetic clip: 3 windows of 8


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      window_frames=WINDOW, crop_size=CROP, channels=1, embed_dim=32, video_widths=(8, 16),
      audio_widths=(8, 16), batchnorm_momentum=0.9, margin=1.5, alpha=0.7, lr=5e-3,
      weight_decay=1e-4, grad_clip_norm=1.0, batch_size=8, steps=150, eval_every=75,
      min_shift_frames=2, use_mined_pairs=False, flip_prob=0.5, score_hop_frames=4, seed=0))
  cfg.update(overrides)
  return cfg


# ------------------------------------------------------------------------------------------
# Loss.
# ------------------------------------------------------------------------------------------

# Two triplets in 2-D, margin 1.5, alpha 0.7:
#   1: a = (0, 0), p = (0.6, 0.8), n = (0, 2): d_pos = 1, d_neg = 2,
#      hinge = max(0, 1.5 - (2 - 1)) = 0.5.
#   2: a = (1, 0), p = (1, 0), n = (4, 4): d_pos = 0, d_neg = sqrt(9 + 16) = 5,
#      hinge = max(0, 1.5 - 5) = 0.
# loss = 0.7 * mean(0.5, 0) + 0.3 * mean(1, 0) = 0.175 + 0.15 = 0.325;
# mean d_pos 0.5, mean d_neg 3.5, both triplets have d_pos < d_neg.
# Mask [1, 0]: 0.7 * 0.5 + 0.3 * 1 = 0.65 (d_neg 2); mask [0, 1]: 0.7 * 0 + 0.3 * 0 = 0 (d_neg 5).
ANCHOR = jnp.array([[0.0, 0.0], [1.0, 0.0]])
POSITIVE = jnp.array([[0.6, 0.8], [1.0, 0.0]])
NEGATIVE = jnp.array([[0.0, 2.0], [4.0, 4.0]])


@pytest.mark.parametrize('mask, loss, d_pos, d_neg', [
    (None, 0.325, 0.5, 3.5),
    (jnp.array([True, False]), 0.65, 1.0, 2.0),
    (jnp.array([False, True]), 0.0, 0.0, 5.0),
    (jnp.array([False, False]), 0.0, 0.0, 0.0),
])
def test_sync_margin_loss_by_hand(mask, loss, d_pos, d_neg):
  got, metrics = lipsync_loss.sync_margin_loss(ANCHOR, POSITIVE, NEGATIVE, 1.5, 0.7, mask)
  np.testing.assert_allclose(got, loss, atol=1e-6)
  np.testing.assert_allclose(metrics['d_pos'], d_pos, atol=1e-6)
  np.testing.assert_allclose(metrics['d_neg'], d_neg, atol=1e-6)
  expected_accuracy = 0.0 if mask is not None and not mask.any() else 1.0
  np.testing.assert_allclose(metrics['triplet_accuracy'], expected_accuracy)


def test_sync_margin_loss_counts_wrong_order_and_has_finite_gradients():
  # Swapping positives and negatives: d_pos > d_neg for both, hinges 1.5 + 1 and 1.5 + 5.
  loss, metrics = lipsync_loss.sync_margin_loss(ANCHOR, NEGATIVE, POSITIVE, 1.5, 0.7)
  np.testing.assert_allclose(loss, 0.7 * (2.5 + 6.5) / 2 + 0.3 * 3.5, atol=1e-5)
  assert float(metrics['triplet_accuracy']) == 0.0
  # d_pos = 0 for the second triplet: sqrt's infinite slope must not become NaN.
  grads = jax.grad(lambda a: lipsync_loss.sync_margin_loss(a, POSITIVE, NEGATIVE, 1.5, 0.7)[0])(
      ANCHOR)
  assert np.all(np.isfinite(grads))


# ------------------------------------------------------------------------------------------
# Model.
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_model():
  graphdef, params, batch_stats = lipsync.init_lipsync(tiny_config())
  return nnx.merge(graphdef, params, batch_stats)


def test_time_stacked_conv_is_a_3d_convolution():
  conv = lipsync_model.TimeStackedConv3D(
      2, 5, rngs=nnx.Rngs(jax.random.key(0, impl=lipsync.RNG_IMPL)))
  x = np.random.default_rng(1).normal(size=(2, 6, 8, 8, 2)).astype(np.float32)
  kernel = np.asarray(conv.kernel[...])
  # A 3x3x3 SAME convolution by hand: sum over the 27 taps of shifted input times the tap.
  padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (1, 1), (0, 0)])
  expected = sum(np.einsum('bthwc,co->bthwo', padded[:, dt:dt + 6, dh:dh + 8, dw:dw + 8],
                           kernel[dt, dh, dw])
                 for dt in range(3) for dh in range(3) for dw in range(3))
  np.testing.assert_allclose(jax.jit(lambda x: conv(x))(x), expected, atol=1e-4)


def test_embeddings_are_unit_norm_and_order_sensitive(tiny_model):
  rng = np.random.default_rng(0)
  video = rng.uniform(size=(3, WINDOW, CROP, CROP, 1)).astype(np.float32)
  audio = rng.normal(size=(2, 4 * WINDOW, 64)).astype(np.float32)
  graphdef, state = nnx.split(tiny_model)

  @jax.jit
  def embed(state, video, audio):
    model = nnx.merge(graphdef, state)
    video_emb, audio_emb = model(video, audio, train=False)
    return video_emb, audio_emb, model.embed_video(video), model.embed_video(video[:, ::-1])

  video_emb, audio_emb, again, reversed_emb = embed(state, video, audio)
  assert video_emb.shape == (3, 32) and audio_emb.shape == (2, 32)
  np.testing.assert_allclose(jnp.linalg.norm(video_emb, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(audio_emb, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(again, video_emb, atol=1e-6)
  assert np.min(np.linalg.norm(reversed_emb - video_emb, axis=-1)) > 1e-3
  with pytest.raises(ValueError, match='expected'):
    tiny_model.embed_audio(audio[:, :-4])


# ------------------------------------------------------------------------------------------
# Sampler. Content-coded clips: pixel (0, 0) of a frame holds its frame index, pixel (0, 1)
# the clip number, pixel (0, 2) the track; log-mel column 0 holds the video frame index of
# each mel frame and column 1 the clip number.
# ------------------------------------------------------------------------------------------

def coded_clip(number: int, frames: int, tracks: int = 1, speaker: int = -1) -> lipsync.SyncClip:
  video = np.zeros((tracks, frames, CROP, CROP, 1), np.uint8)
  video[:, :, 0, 0, 0] = np.arange(frames)
  video[:, :, 0, 1, 0] = number
  video[:, :, 0, 2, 0] = np.arange(tracks)[:, None]
  logmel = np.zeros((4 * frames, 64), np.float32)
  logmel[:, 0] = np.repeat(np.arange(frames), 4)
  logmel[:, 1] = number
  return lipsync.SyncClip(video, logmel, speaker, f'clip{number}')


def coded_clips():
  clips = [coded_clip(i, 12 + i) for i in range(6)]  # 12 to 17 frames
  clips.append(coded_clip(6, 5))  # shorter than a window
  clips.append(coded_clip(7, 14, tracks=3, speaker=1))  # known speaker: mined pairs
  clips.append(coded_clip(8, 14, tracks=2))  # unknown speaker
  return clips


def test_sampler_aligns_positives_and_shifts_negatives():
  cfg = tiny_config(batch_size=64, min_shift_frames=3, use_mined_pairs=True)
  sampler = lipsync.TripletSampler(coded_clips(), cfg, seed=3)
  batch = sampler.batch(0)
  assert batch['positive'].shape == (64, WINDOW, CROP, CROP, 1)
  assert batch['positive'].dtype == np.uint8 and batch['audio'].shape == (64, 4 * WINDOW, 64)
  anchor_frames = batch['audio'][:, ::4, 0]
  anchor_clip = batch['audio'][:, 0, 1]
  # Positives: the same clip and frames as the anchor audio, and the speaker's track.
  np.testing.assert_array_equal(batch['positive'][:, :, 0, 0, 0], anchor_frames)
  np.testing.assert_array_equal(batch['positive'][:, 0, 0, 1, 0], anchor_clip)
  np.testing.assert_array_equal(batch['positive'][:, 0, 0, 2, 0],
                                np.where(anchor_clip == 7, 1, 0))
  neg_frames = batch['negative'][:, :, 0, 0, 0].astype(int)
  neg_clip = batch['negative'][:, 0, 0, 1, 0]
  neg_track = batch['negative'][:, 0, 0, 2, 0]
  kinds = np.asarray(lipsync.NEGATIVE_KINDS)[batch['neg_kind']]
  shifted, other, mined = kinds == 'shifted', kinds == 'other_utterance', kinds == 'other_face'
  assert shifted.any() and other.any() and mined.any()
  # Same face, shifted by >= min_shift_frames (the same shift over the whole window).
  np.testing.assert_array_equal(neg_clip[shifted], anchor_clip[shifted])
  shift = neg_frames[shifted] - anchor_frames[shifted]
  assert np.all(np.abs(shift) >= 3) and np.all(shift == shift[:, :1])
  assert np.all(neg_clip[other] != anchor_clip[other])
  # Mined: the speaker's audio against another (silent) face over the same frames.
  np.testing.assert_array_equal(anchor_clip[mined], 7)
  np.testing.assert_array_equal(neg_frames[mined], anchor_frames[mined])
  assert np.all(neg_track[mined] != 1)
  # Neither the short clip nor the clip without a known speaker provides anchors; the short
  # one is never a negative either.
  assert not np.isin(anchor_clip, [6, 8]).any() and not np.isin(neg_clip, [6]).any()


def test_sampler_is_deterministic_and_counts_unusable_clips():
  cfg = tiny_config(use_mined_pairs=False)
  clips = coded_clips()
  first = lipsync.TripletSampler(clips, cfg, seed=5)
  again = lipsync.TripletSampler(clips, cfg, seed=5)
  other = lipsync.TripletSampler(clips, cfg, seed=6)
  for key, value in first.batch(7).items():
    np.testing.assert_array_equal(value, again.batch(7)[key])
  keys = ('clip', 'start', 'neg_kind', 'neg_clip', 'neg_start')
  assert any(not np.array_equal(first.batch(7)[k], other.batch(7)[k]) for k in keys)
  assert any(not np.array_equal(first.batch(7)[k], first.batch(8)[k]) for k in keys)
  report = first.report()
  assert report == {'clips': 9, 'anchor_clips': 6, 'too_short': 1, 'too_short_ids': ['clip6'],
                    'no_known_speaker': 2}  # without mined pairs clip7 counts here too
  assert 'other_face' not in np.asarray(lipsync.NEGATIVE_KINDS)[first.batch(0)['neg_kind']]
  # Evaluation: one triplet per anchor clip, the last batch padded and masked.
  batches = first.eval_batches()
  assert len(batches) == 1 and batches[0]['mask'].tolist() == [True] * 6 + [False] * 2


def test_sampler_rejects_a_clip_without_negatives():
  with pytest.raises(ValueError, match='no negative'):
    lipsync.TripletSampler([coded_clip(0, 9)], tiny_config(min_shift_frames=2), seed=0)


def test_scoring_windows_cover_the_clip_and_pad_short_clips():
  np.testing.assert_array_equal(lipsync.window_starts(24, 8, 4), [0, 4, 8, 12, 16])
  np.testing.assert_array_equal(lipsync.window_starts(19, 8, 4), [0, 4, 8, 11])
  video, audio = lipsync.clip_windows(coded_clip(0, 5, tracks=2), WINDOW, 4)
  assert video.shape == (2, 1, WINDOW, CROP, CROP, 1) and audio.shape == (1, 4 * WINDOW, 64)
  np.testing.assert_array_equal(video[0, 0, :, 0, 0, 0], [0, 1, 2, 3, 4, 4, 4, 4])
  np.testing.assert_array_equal(audio[0, ::4, 0], [0, 1, 2, 3, 4, 4, 4, 4])
  video, audio = lipsync.clip_windows(coded_clip(0, 19), WINDOW, 4)
  np.testing.assert_array_equal(video[0, :, 0, 0, 0, 0], [0, 4, 8, 11])
  np.testing.assert_array_equal(audio[:, 0, 0], [0, 4, 8, 11])


# ------------------------------------------------------------------------------------------
# Learning: synthetic talking faces. A grey face crop whose "mouth" (a dark rectangle) opens
# with the energy envelope (sum over mel bands) of the clip's own random log-mel.
# ------------------------------------------------------------------------------------------

def random_logmel(rng: np.random.Generator, frames: int) -> np.ndarray:
  """Syllable-like energy: a random level held for 1-3 video frames, over a random spectrum."""
  level = np.empty(frames)
  f = 0
  while f < frames:
    hold = int(rng.integers(1, 4))
    level[f:f + hold] = rng.uniform(0.0, 1.0)
    f += hold
  spectrum = rng.uniform(0.5, 1.5, 64)
  noise = rng.normal(0.0, 0.3, (4 * frames, 64))
  return (3.0 * np.repeat(level, 4)[:, None] * spectrum + noise).astype(np.float32)


def talking_face(rng: np.random.Generator, logmel: np.ndarray) -> np.ndarray:
  """uint8[F, CROP, CROP, 1]: mouth height follows the per-frame energy of `logmel`."""
  energy = logmel.sum(axis=1).reshape(-1, 4).mean(axis=1)
  energy = (energy - energy.min()) / max(energy.max() - energy.min(), 1e-6)
  frames = len(energy)
  face = rng.uniform(120, 200) + rng.normal(0.0, 8.0, (frames, CROP, CROP, 1))
  centre = 3 * CROP // 4
  for f, height in enumerate(np.round(energy * CROP / 3).astype(int)):
    top = centre - height // 2
    face[f, top:top + height, CROP // 3:2 * CROP // 3] = 30
  return np.clip(face, 0, 255).astype(np.uint8)


def single_face_clip(rng, name: str) -> lipsync.SyncClip:
  logmel = random_logmel(rng, FRAMES)
  return lipsync.SyncClip(talking_face(rng, logmel)[None], logmel, -1, name)


def two_face_clip(rng, name: str) -> lipsync.SyncClip:
  """The speaker's mouth follows the clip's audio; the other's another utterance's."""
  logmel, other = random_logmel(rng, FRAMES), random_logmel(rng, FRAMES)
  speaker = int(rng.integers(2))
  faces = [talking_face(rng, logmel), talking_face(rng, other)]
  if speaker == 1:
    faces.reverse()
  areas = rng.uniform(1.0, 2.0, 2).astype(np.float32)
  return lipsync.SyncClip(np.stack(faces), logmel, speaker, name, areas=areas)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  rng = np.random.default_rng(0)
  train = [single_face_clip(rng, f'train{i}') for i in range(48)]
  val = [single_face_clip(rng, f'val{i}') for i in range(8)]
  test = [two_face_clip(rng, f'test{i}') for i in range(20)]
  cfg = tiny_config()
  workdir = str(tmp_path_factory.mktemp('lipsync'))
  compiled_before = lipsync.train_step._cache_size()
  start = time.time()
  # Half the steps, then the rest: the second call resumes from the first's checkpoint.
  _, first = lipsync.train_lipsync(tiny_config(steps=cfg.steps // 2), train, val, workdir)
  model, history = lipsync.train_lipsync(cfg, train, val, workdir)
  seconds = time.time() - start
  assert [e['step'] for e in first['evals']] == [cfg.steps // 2]
  # Static batch shapes, and runs that differ only in their length share the step: the
  # train step compiled exactly once for both runs.
  assert lipsync.train_step._cache_size() == compiled_before + 1
  return {'cfg': cfg, 'model': model, 'history': history, 'workdir': workdir, 'test': test,
          'train': train, 'val': val, 'seconds': seconds}


def test_learns_to_pick_the_speaking_face(trained):
  cfg, history = trained['cfg'], trained['history']
  assert [e['step'] for e in history['evals']] == [75, 150]
  assert history['data']['train']['anchor_clips'] == 48
  result = lipsync.speaker_accuracy(trained['model'], trained['test'], cfg)
  print(f'\nlipsync learning test: {trained["seconds"]:.1f} s training, speaker accuracy '
        f'{result}, last eval {history["evals"][-1]}')
  assert result['num_clips'] == 20 and result['skipped'] == 0
  assert result['lipsync'] >= 0.8
  assert result['largest_face'] is not None and result['random_face'] is not None
  index, distances = lipsync.select_speaker(trained['model'], trained['test'][0], cfg)
  assert distances.shape == (2,) and index == int(np.argmin(distances))


def test_checkpoint_round_trip_and_finished_run(trained):
  cfg, workdir = trained['cfg'], trained['workdir']
  clips = trained['test'][:3]
  before = [lipsync.score_tracks(trained['model'], c, cfg) for c in clips]
  restored = lipsync.restore_lipsync(cfg, workdir)
  for clip, expected in zip(clips, before):
    np.testing.assert_array_equal(lipsync.score_tracks(restored, clip, cfg), expected)
  # A finished run in the same workdir trains nothing more and returns the same model.
  model, history = lipsync.train_lipsync(cfg, trained['train'], trained['val'], workdir)
  assert history['evals'] == trained['history']['evals']
  np.testing.assert_array_equal(lipsync.score_tracks(model, clips[0], cfg), before[0])


def test_paper_scale_shapes():
  """32-frame windows, 96-pixel RGB crops, 256-d: shapes only (jax.eval_shape, no compute)."""
  cfg = tiny_config(window_frames=32, crop_size=96, channels=3, embed_dim=256,
                    video_widths=(64, 128, 256), audio_widths=(64, 128, 256))

  def embed():
    model = lipsync_model.LipSyncNet(cfg, rngs=nnx.Rngs(0))
    return model(jnp.zeros((2, 32, 96, 96, 3)), jnp.zeros((2, 128, 64)), train=True)

  video_emb, audio_emb = jax.eval_shape(embed)
  assert video_emb.shape == audio_emb.shape == (2, 256)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
  """Batches and step rngs are functions of (seed, step): stopping after 2 steps and resuming
  gives the weights of 4 uninterrupted steps, bit for bit."""
  rng = np.random.default_rng(1)
  clips = [single_face_clip(rng, f'clip{i}') for i in range(6)]
  cfg = tiny_config(steps=4, eval_every=2)
  straight, _ = lipsync.train_lipsync(cfg, clips, [], str(tmp_path / 'straight'))
  lipsync.train_lipsync(tiny_config(steps=2, eval_every=2), clips, [], str(tmp_path / 'resumed'))
  resumed, history = lipsync.train_lipsync(cfg, clips, [], str(tmp_path / 'resumed'))
  assert [e['step'] for e in history['evals']] == [2, 4] and history['best_step'] == 4
  for a, b in zip(jax.tree.leaves(nnx.state(straight)), jax.tree.leaves(nnx.state(resumed))):
    np.testing.assert_array_equal(a, b)
