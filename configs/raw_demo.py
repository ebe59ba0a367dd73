"""The embedded raw demo: synthetic talking-head clips -> prediction, one command.

  python -m mer_jax.main --config configs/raw_demo.py --workdir /tmp/mer_raw

generates a MELD-layout folder of synthetic clips (mer_jax/data/talking_heads.py) into the data
cache, then `mer_jax.preprocess.raw`: decodes every clip, tracks the faces, trains LipSyncNet
self-supervised on the train clips and picks each utterance's speaking face, encodes audio
(Wav2Vec2), the chosen face track (TimeSformer) and the transcripts (MiniLM), writes shards and
trains every stage on them. `python -m mer_jax.preprocess --config configs/raw_demo.py` runs
the preprocessing alone.

No pretrained audio/visual checkpoints can be downloaded here, so the demo's Wav2Vec2 and
TimeSformer are small and randomly initialised (frozen random features); point
raw.audio_encoder.checkpoint / raw.visual_encoder.checkpoint at Hugging Face folders to use
real ones (README, "Raw clips front end", has the command for a real MELD folder).

Variants (`:arg`): `runlocal` (a seconds-to-minutes smoke run), `tiny` (a few dialogues, tiny
random encoders, 10 LipSyncNet steps and one epoch of raw-input fusion alone: the cheapest run
that reads clips, for tests), and `true_face`, `random_face`, `largest_face` (which face the
visual encoder sees: the speaker-ambiguity ablation).
"""

import ml_collections

from configs import default
from configs import meld_text


def lipsync_config() -> ml_collections.ConfigDict:
  """LipSyncNet (SPEC stage 2) at demo size; the comments give the paper's sizes."""
  s = ml_collections.ConfigDict()
  s.window_frames = 8  # video frames per window (the paper: e.g. 32)
  s.crop_size = 32  # face crops are resized to this square
  s.channels = 1  # 1 = grayscale crops, 3 = RGB
  s.embed_dim = 64  # the paper: 256
  s.video_widths = (16, 32, 64)
  s.audio_widths = (16, 32, 64)
  s.margin = 1.5
  s.alpha = 0.7
  s.lr = 1e-3
  s.weight_decay = 1e-4
  s.grad_clip_norm = 1.0
  s.batch_size = 16
  s.steps = 240
  s.eval_every = 80
  s.min_shift_frames = 4
  s.batchnorm_momentum = 0.9
  s.flip_prob = 0.5
  s.use_mined_pairs = False
  s.score_hop_frames = 4
  s.seed = 0
  return s


def raw_frontend(root: str, generate: bool) -> ml_collections.ConfigDict:
  r = ml_collections.ConfigDict()
  # A MELD-layout folder: {split}_sent_emo.csv and one folder of dia{D}_utt{U}.mp4 per split.
  # With generate=True the synthetic talking heads are written into the data cache instead.
  r.dir = root
  r.generate = generate
  r.csv_pattern = '{split}_sent_emo.csv'
  r.split_folders = ml_collections.ConfigDict(
      {'train': 'train_splits', 'dev': 'dev_splits_complete', 'test': 'output_repeated_splits_test'})
  r.fps = 25
  r.sample_rate = 16000
  r.workers = 0  # processes decoding and tracking clips (0: one per CPU core)
  r.max_seconds = 12.0  # longer clips are cut (counted): bounds memory per clip
  r.mel = ml_collections.ConfigDict({'n_mels': 64, 'hop': 160, 'win': 400})

  r.faces = ml_collections.ConfigDict()
  r.faces.detector = 'haar'  # OpenCV's bundled cascade (offline)
  # A coarser pyramid from 32 px suits the synthetic faces (>= 46 px tall); real video: 1.1 and
  # 24 (see docs/results/raw_demo.md).
  r.faces.scale_factor = 1.15
  r.faces.min_neighbors = 3
  r.faces.min_size = 32
  r.faces.detect_stride = 2  # detect on every n-th frame; tracks fill the others
  r.faces.iou_threshold = 0.3
  r.faces.max_gap = 5
  r.faces.min_fraction = 0.3
  r.faces.smooth = 5
  r.faces.margin = 0.15
  r.faces.crop_size = 48
  r.faces.max_tracks = 4  # the largest tracks are kept (extra ones counted)

  # Which face track the visual encoder reads: 'selected' (LipSyncNet), 'true' (synthetic
  # truth; an oracle for the ablation), 'largest' or 'random'.
  r.visual_face = 'selected'

  # Seeds the random initialisation of encoders without a checkpoint; not config.seed, so the
  # seeds of a sweep share one set of shards.
  r.encoder_seed = 0
  r.audio_encoder = ml_collections.ConfigDict()
  r.audio_encoder.checkpoint = ''  # a Hugging Face Wav2Vec2 folder; '' = random init below
  r.audio_encoder.random = ml_collections.ConfigDict(dict(
      hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192,
      conv_dim=(64, 64, 64, 64), conv_kernel=(10, 4, 4, 4), conv_stride=(5, 4, 4, 4),
      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm='layer',
      do_stable_layer_norm=True))
  r.audio_encoder.seconds_per_batch = 64.0  # padded audio per encoder call
  r.audio_encoder.bucket_seconds = 0.5  # waveforms are padded to a multiple of this
  r.audio_encoder.normalize = True  # zero mean, unit variance per waveform (do_normalize)

  r.visual_encoder = ml_collections.ConfigDict()
  r.visual_encoder.checkpoint = ''  # a Hugging Face TimeSformer folder; '' = random init below
  r.visual_encoder.random = ml_collections.ConfigDict(dict(
      image_size=48, patch_size=8, num_frames=8, hidden_size=96, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=192))
  r.visual_encoder.clips_per_batch = 16
  r.visual_encoder.pixel_mean = 0.45  # the VideoMAE processor's, used by TimeSformer checkpoints
  r.visual_encoder.pixel_std = 0.225

  r.synthetic = ml_collections.ConfigDict()
  r.synthetic.seed = 0
  r.synthetic.num_dialogues = ml_collections.ConfigDict({'train': 120, 'dev': 24, 'test': 48})
  r.synthetic.utterances = (3, 8)
  r.synthetic.cast = (2, 3)
  r.synthetic.faces = (1, 3)
  r.synthetic.seconds = (1.2, 2.0)
  r.synthetic.fps = 25
  r.synthetic.sample_rate = 16000
  r.synthetic.width = 256
  r.synthetic.height = 144
  r.synthetic.face_size = (46, 62)
  r.synthetic.p_distractor_moves = 0.5
  r.synthetic.p_face_cue = 0.75
  r.synthetic.p_voice_cue = 0.8
  r.synthetic.p_word_cue = 0.7
  r.synthetic.p_keep_emotion = 0.6
  # One unreadable and one missing clip, as real MELD has: they show up in the error report.
  r.synthetic.corrupt = ('train/dia3_utt1',)
  r.synthetic.missing = ('dev/dia2_utt0',)
  return r


def tiny_front_end(c: ml_collections.ConfigDict) -> None:
  """The `tiny` size, in place: the smallest corpus, encoders and training that still run every
  front-end stage (clips, faces, LipSyncNet, audio/visual/text features) and a model reading them.
  """
  c.raw.synthetic.num_dialogues = ml_collections.ConfigDict({'train': 6, 'dev': 2, 'test': 2})
  c.raw.synthetic.utterances = (2, 4)
  c.raw.synthetic.corrupt = ('train/dia3_utt1',)
  c.raw.synthetic.missing = ('dev/dia1_utt0',)
  c.raw.workers = 1  # in process: spawning workers costs more than these few clips
  c.lipsync.steps = 10
  c.lipsync.eval_every = 10
  c.lipsync.batch_size = 8
  c.lipsync.score_hop_frames = 16  # fewer windows per clip: fewer scoring shapes to compile
  c.raw.audio_encoder.bucket_seconds = 2.0  # the clips' 1.2-2 s in one length: one compile
  c.raw.audio_encoder.random = ml_collections.ConfigDict(dict(
      hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
      conv_dim=(16, 16, 16, 16), conv_kernel=(10, 4, 4, 4), conv_stride=(5, 4, 4, 4),
      num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, feat_extract_norm='layer',
      do_stable_layer_norm=True))
  c.raw.visual_encoder.random = ml_collections.ConfigDict(dict(
      image_size=16, patch_size=8, num_frames=4, hidden_size=16, num_hidden_layers=1,
      num_attention_heads=2, intermediate_size=32))
  c.data.dims = ml_collections.ConfigDict({'t': 384, 'a': 16, 'v': 16})
  # Fusion on the features themselves: one stage, no encoder stages to train first.
  c.train.stages = ('fusion',)
  c.model.fusion.input = 'raw'
  c.model.fusion.dim = 16
  c.model.fusion.heads = 2
  c.model.fusion.layers = 1
  # The plainest fusion: its train step compiles in about half the time of the demo's.
  c.model.fusion.alignment = False
  c.model.fusion.gates = False
  c.model.fusion.cross_attention = False
  c.model.fusion.pool_queries = 1
  c.model.fusion.classifier_heads = 1
  c.optim.fusion.grad_accum_steps = 1
  c.loss.contrastive_dim = 8
  c.train.epochs = 1
  c.train.progress_bar = False
  c.train.cpu_fast_compile = True
  c.eval.confusion_png = False


def get_config(arg=None):
  c = default.get_config()
  c.data.source = 'raw'
  c.raw = raw_frontend('', generate=True)
  c.lipsync = lipsync_config()
  c.text = meld_text.text_frontend('meld', '', '{split}_sent_emo.csv')  # dir: the raw folder
  c.data.dims = ml_collections.ConfigDict({
      't': 384, 'a': c.raw.audio_encoder.random.hidden_size,
      'v': c.raw.visual_encoder.random.hidden_size})
  c.batch.max_nodes = 24  # dialogues have at most 8 utterances
  c.batch.max_graphs = 4
  c.batch.utterances_per_batch = 16
  c.graph.k = ml_collections.ConfigDict({'t': 6, 'a': 4, 'v': 4})
  variant, _, size = (arg or '').partition(',')
  if variant in ('runlocal', 'tiny'):
    variant, size = '', variant
  faces = {'': 'selected', 'selected_face': 'selected', 'true_face': 'true',
           'random_face': 'random', 'largest_face': 'largest'}
  if variant not in faces:
    raise ValueError(f'unknown variant {variant!r}; use runlocal, tiny, true_face, random_face, '
                     'largest_face (optionally followed by ,runlocal or ,tiny)')
  c.raw.visual_face = faces[variant]
  if size == 'runlocal':
    c.raw.synthetic.num_dialogues = ml_collections.ConfigDict({'train': 24, 'dev': 6, 'test': 8})
    c.lipsync.steps = 100
    c.lipsync.eval_every = 50
    c.train.epochs = 2
    c.train.progress_bar = False
    c.train.cpu_fast_compile = True
  elif size == 'tiny':
    tiny_front_end(c)
  elif size:
    raise ValueError(f'unknown size {size!r}; use runlocal or tiny')
  return c
