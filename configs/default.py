"""Default config: the embedded synthetic corpus, sized to train all stages on 2 CPU cores.

Usage:
  python -m mer_jax.main --config configs/default.py --workdir /tmp/mer_default
  python -m mer_jax.main --config configs/default.py --config.train.epochs=2 ...

Every number the recipe needs lives here (or in the dataset configs that start from it).
"""

import dataclasses

import ml_collections

from mer_jax.data import synthetic


def stage_optim(lr: float, wd: float, schedule: str = 'constant') -> ml_collections.ConfigDict:
  """Optimizer settings of one training stage."""
  s = ml_collections.ConfigDict()
  s.lr = lr
  s.weight_decay = wd
  s.schedule = schedule  # 'constant', 'warmup_cosine' or 'warmup_linear'
  s.warmup_fraction = 0.2
  s.grad_clip_norm = 0.6311058766199245
  s.grad_accum_steps = 1
  s.ema_decay = 0.0  # 0 disables EMA for the stage
  s.early_stopping_patience = 6
  s.lr_reduce_patience = 3
  s.lr_reduce_factor = 0.4431268354268777
  s.b1 = 0.9
  s.b2 = 0.999
  s.eps = 1e-8
  # Per-parameter-group multipliers of lr: group name -> multiplier (fusion only).
  s.lr_multipliers = ml_collections.ConfigDict()
  return s


def base_config() -> ml_collections.ConfigDict:
  """Every key the code reads, with the authors' MELD values where they have one."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.label_names = ('neutral', 'surprise', 'fear', 'sadness', 'joy', 'disgust', 'anger')

  # --- data ------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.source = 'synthetic'  # 'synthetic' (generated into workdir/shards) or 'shards'.
  c.data.shard_dir = ''  # Required when source == 'shards': a folder with manifest.json.
  c.data.train_split = 'train'
  c.data.dev_split = 'dev'
  c.data.test_split = 'test'
  c.data.modalities = ('t', 'a', 'v')
  c.data.dims = ml_collections.ConfigDict({'t': 1024, 'a': 1024, 'v': 768})
  # Generated corpora and extracted text features go here ('' = workdir/data), in a folder per
  # setting: runs that point at the same cache_dir (a sweep's seeds) build each only once.
  c.data.cache_dir = ''
  c.data.verify_checksums = True
  # What to do with a record that fails validation (NaN/Inf features, bad shapes, labels out
  # of range): 'error' stops with the file and record named; 'skip' counts and reports it.
  c.data.on_bad_record = 'error'
  # A split whose features fit in this many MiB is decoded and validated once, then read from
  # memory (MELD's train split, 9,989 utterances at t/a/v 1024/1024/768: 107 MiB). 0: never.
  c.data.cache_mib = 1024
  # Grain read threads and prefetch buffer (batches) of the training iterator.
  c.data.read_threads = 2
  c.data.prefetch = 8

  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.seed = 1234
  c.data.synthetic.num_dialogues = ml_collections.ConfigDict({'train': 1038, 'dev': 114, 'test': 280})
  c.data.synthetic.num_shards = ml_collections.ConfigDict({'train': 4, 'dev': 1, 'test': 1})
  # The generative story (mer_jax/data/synthetic.py), e.g. --config.data.synthetic.story.
  # label_noise=0.2 or ...story.modalities.a.signal=3.0: a corpus to probe a claim on.
  c.data.synthetic.story = ml_collections.ConfigDict(dataclasses.asdict(synthetic.CorpusStory()))

  # Training augmentation, as the authors apply it per utterance (text: dropout, noise,
  # partial shuffle, scaling; audio: noise; visual: scaling).
  c.augment = ml_collections.ConfigDict()
  c.augment.enabled = True
  c.augment.t_dropout = 0.2
  c.augment.t_noise_std = 0.1
  c.augment.t_shuffle_prob = 0.3
  c.augment.t_shuffle_fraction = 0.1
  c.augment.t_scale_prob = 0.4
  c.augment.t_scale_range = (0.8, 1.2)
  c.augment.a_noise_std = 0.05
  c.augment.v_scale_range = (0.95, 1.05)
  # Encoder stages augment only the modality they train: the frozen teacher reads the stored
  # text, so its distillation targets are its real predictions. False: the authors' (the
  # teacher's text is augmented too).
  c.augment.clean_frozen_inputs = True

  # --- batching: static budgets so every step compiles once ------------------------------
  c.batch = ml_collections.ConfigDict()
  c.batch.max_nodes = 48  # Utterance slots per batch (>= the longest dialogue).
  c.batch.max_graphs = 8  # Dialogue slots per batch (one more is reserved for padding).
  c.batch.utterances_per_batch = 16  # Only for graph scope 'batch': the authors' batch of 16.
  # A step's batch is this many sub-batches, each packed into the budgets above (0: one per JAX
  # process, so each host reads only its own dialogues; a pod's global batch grows with its hosts).
  c.batch.groups = 0

  # --- graphs ----------------------------------------------------------------------------
  c.graph = ml_collections.ConfigDict()
  c.graph.scope = 'dialogue'  # 'dialogue' (ours) or 'batch' (authors': shuffled minibatch).
  c.graph.k = ml_collections.ConfigDict({'t': 12, 'a': 6, 'v': 7})
  c.graph.temporal_weight = ml_collections.ConfigDict(
      {'t': 1.653647526520393, 'a': 0.534697670184466, 'v': 1.0014116523635417})
  c.graph.speaker_edges = False  # Edge to the same speaker's previous utterance.
  c.graph.speaker_weight = 1.0
  # How graph attention uses edge weights: 'bias' adds a learned multiple of the weight to
  # the attention logit; 'none' ignores them (what PyG's GATConv does in the authors' code).
  c.graph.gat_edge_weights = 'bias'

  # --- models ----------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.teacher = ml_collections.ConfigDict()  # Text, 4 graph-attention layers.
  c.model.teacher.hidden = 256
  c.model.teacher.heads = 4
  c.model.teacher.dropout = 0.15
  c.model.teacher.input_dropout = 0.1
  # The normalised input also reaches the logits through a zero-initialised linear map (ours).
  c.model.teacher.linear_skip = False
  # Width per direction of a bidirectional GRU that reads each dialogue's turns in order before
  # the graph layers, its states concatenated to their input (ours; 0: none, as the authors).
  c.model.teacher.context_gru = 0
  # > 0: the GRU reads relu(linear(features)) of this width instead of the features (ours).
  c.model.teacher.context_projection = 0
  # Batch norm of the input features (the authors'). False: they enter as stored, e.g. unit-length
  # sentence embeddings, whose low-variance directions batch norm would scale up.
  c.model.teacher.input_batchnorm = True
  c.model.audio = ml_collections.ConfigDict()  # Audio student, 3 graph-convolution layers.
  c.model.audio.hidden = 256
  c.model.audio.layers = 3
  c.model.audio.dropout = 0.1113389962276903
  c.model.audio.input_dropout = 0.05
  c.model.visual = ml_collections.ConfigDict()  # Visual student, 3 graph-attention layers.
  # (width per head, heads, concat heads) for each layer, as in the authors' encoder.
  c.model.visual.layers = ((128, 4, True), (256, 2, True), (256, 1, False))
  c.model.visual.dropout = 0.15
  c.model.visual.input_dropout = 0.05
  c.model.batchnorm_momentum = 0.9

  c.model.fusion = ml_collections.ConfigDict()
  # What fusion reads per modality: 'stacked' (cross-fitted log-probabilities of the teacher and
  # students: out-of-fold on train, see mer_jax/train/stacking.py), 'graph' (the frozen encoders'
  # representations, computed in the step; leaks on train) or 'raw' (features, as the authors).
  c.model.fusion.input = 'stacked'
  c.model.fusion.stacking_folds = 3
  c.model.fusion.dim = 256
  c.model.fusion.layers = 3
  c.model.fusion.heads = 8
  c.model.fusion.dropout = 0.1113389962276903
  c.model.fusion.use_moe = False
  c.model.fusion.num_experts = 4
  c.model.fusion.top_k = 2
  c.model.fusion.alignment = True
  c.model.fusion.alignment_mix = 0.3  # aligned = (1 - mix) * own + mix * soft-aligned.
  c.model.fusion.gates = True
  c.model.fusion.gate_residual = 0.1
  c.model.fusion.cross_attention = True
  c.model.fusion.cross_residual = 0.2
  c.model.fusion.pool_queries = 3
  c.model.fusion.classifier_heads = 3
  c.model.fusion.alignment_scope = 'dialogue'  # 'dialogue' (ours) or 'batch' (authors').
  # Each modality's input also reaches the logits through a zero-initialised linear map (ours):
  # with stacked inputs a learned weighted product of the encoders' predictions, which the
  # hierarchical blocks then correct (see docs/results/embedded.md).
  c.model.fusion.linear_skip = True

  # --- losses ----------------------------------------------------------------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.class_weights = 'balanced'  # 'balanced' (from train class counts) or 'none'.
  c.loss.class_weight_power = 1.0  # balanced weights ** power (1: the authors')
  c.loss.poly_alpha = 1.9508055462649292
  c.loss.poly_gamma = 1.402459950741192
  c.loss.distill = True
  c.loss.distill_temperature = 1.8246074213744867
  c.loss.distill_alpha = 0.5772777397767895
  # Compute the frozen teacher's targets once per student stage instead of in every step; used
  # only where they cannot differ (clean text, dialogue-scope graphs: train/teacher_cache.py).
  c.loss.distill_cached_teacher = True
  c.loss.focal_gamma = 2.5
  c.loss.main_focal_share = 0.8  # main = share * focal-weighted poly + (1 - share) * smoothed CE
  c.loss.label_smoothing = 0.14402230062019625
  c.loss.use_uncertainty = True
  c.loss.main_weight = 0.30033659945418567
  c.loss.aux_weights = ml_collections.ConfigDict(
      {'t': 0.4377451330211305, 'a': 0.2658361822470082, 'v': 0.3528118819082934})
  c.loss.contrastive = False
  c.loss.contrastive_weight = 0.1
  c.loss.contrastive_temperature = 0.07
  c.loss.contrastive_dim = 128

  # --- optimisation, per stage ------------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.stages = ('teacher', 'audio', 'visual', 'fusion')
  c.train.epochs = 30
  c.train.log_every_steps = 50
  c.train.progress_bar = True
  c.train.checkpoint_keep = 2  # latest-k checkpoints per stage (best is kept separately)
  c.train.checkpoint_every_steps = 0  # 0: at the end of every epoch only
  # A rerun of a workdir whose settings changed for a trained stage: 'error' stops before any
  # work and lists the changed keys; 'retrain' retrains exactly the changed stages and those
  # that depend on them, keeping the rest (docs/design.md, "Trust").
  c.train.on_change = 'error'
  # '' = workdir/checkpoints. A gs://bucket/run/checkpoints folder is written by Orbax directly;
  # predict then needs --checkpoint_dir.
  c.train.checkpoint_dir = ''
  # Finished encoder stages shared between runs with the same settings for them (sweeps set it;
  # see mer_jax/train/shared_stages.py). '' = off.
  c.train.shared_stages_dir = ''
  # Persistent XLA compilation cache ('' = $JAX_COMPILATION_CACHE_DIR if set, else
  # workdir/jax_cache; 'off' = none): the cross-fitting folds and resumed runs then compile each
  # step once.
  c.train.compilation_cache_dir = ''
  # On the CPU backend, compile the stages' and text fine-tuning's programs at LLVM level 0: shorter
  # compiles, slower elementwise code (docs/performance.md). For smoke runs; no effect elsewhere.
  c.train.cpu_fast_compile = False
  c.train.early_stopping_min_delta = 0.001

  # The authors multiply the text weight decay by 5.
  c.optim = ml_collections.ConfigDict()
  c.optim.teacher = stage_optim(1.708857357010743e-05, 0.0004004846462605576 * 5.0)
  c.optim.audio = stage_optim(2.8310157425471475e-06, 0.000011630145789712038)
  c.optim.visual = stage_optim(1.5846528953372982e-05, 0.00009208015059525338)
  c.optim.fusion = stage_optim(1.4733257939520586e-05, 0.0000997646370349997, 'warmup_cosine')
  c.optim.fusion.grad_accum_steps = 2
  c.optim.fusion.ema_decay = 0.999
  c.optim.fusion.lr_multipliers = ml_collections.ConfigDict(
      {'proj': 0.5, 'transformer': 1.0, 'classifiers': 2.0, 'other': 1.0})

  # --- devices ---------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = ml_collections.ConfigDict({'data': -1, 'model': 1})  # -1: all remaining devices
  # Logical parameter axes -> mesh axes (None = replicated).
  c.mesh.rules = (('expert', 'model'), ('mlp', 'model'), ('heads', 'model'), ('embed', None),
                  ('vocab', None))

  c.eval = ml_collections.ConfigDict()
  c.eval.confusion_png = True
  return c


def get_config(arg=None) -> ml_collections.ConfigDict:
  """The embedded synthetic demo: small corpus, larger learning rates, few epochs."""
  c = base_config()
  c.data.source = 'synthetic'
  c.data.synthetic.num_dialogues = ml_collections.ConfigDict({'train': 360, 'dev': 60, 'test': 120})
  c.data.synthetic.num_shards = ml_collections.ConfigDict({'train': 2, 'dev': 1, 'test': 1})
  c.train.epochs = 8
  c.train.log_every_steps = 20
  for name, lr in (('teacher', 1e-3), ('audio', 1e-3), ('visual', 1e-3), ('fusion', 2e-3)):
    c.optim[name].lr = lr
    c.optim[name].early_stopping_patience = 3
    c.optim[name].lr_reduce_patience = 2
  c.optim.fusion.ema_decay = 0.99
  # Demo-sized fusion (the authors' 256-d, 3-layer, 8-head fusion is in base_config, meld.py and
  # the benchmark): the whole demo then trains in minutes on 2 CPU cores.
  c.model.fusion.dim = 128
  c.model.fusion.layers = 2
  c.model.fusion.heads = 4
  if arg in ('runlocal', 'tiny'):  # A seconds-long smoke run (tiny: also tiny models, for tests).
    c.data.synthetic.num_dialogues = ml_collections.ConfigDict({'train': 24, 'dev': 8, 'test': 8})
    c.data.synthetic.num_shards = ml_collections.ConfigDict({'train': 2, 'dev': 1, 'test': 1})
    c.train.epochs = 2
    c.train.progress_bar = False
    c.train.cpu_fast_compile = True
  if arg == 'tiny':
    c.data.dims = ml_collections.ConfigDict({'t': 32, 'a': 24, 'v': 16})
    c.batch.max_nodes = 40
    c.batch.max_graphs = 8
    c.model.teacher.hidden = 8
    c.model.teacher.heads = 2
    c.model.audio.hidden = 16
    c.model.visual.layers = ((8, 2, True), (16, 1, False))
    c.model.fusion.dim = 16
    c.model.fusion.heads = 2
    c.model.fusion.layers = 1
    c.loss.contrastive_dim = 8
  return c
