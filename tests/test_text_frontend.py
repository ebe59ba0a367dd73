"""The text front end on a tiny local checkpoint: pooling, bucketed encoding, shards, fine-tuning.

The checkpoint is a random 2-layer BERT with a 30-word tokenizer saved here, and the corpus a
keyword-labelled dialogue CSV, so fine-tuning has something learnable within seconds.
"""

import csv
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from configs import meld_text  # pylint: disable=g-import-not-at-top
from mer_jax.run import job
from mer_jax.data import prompts  # pylint: disable=g-import-not-at-top
from mer_jax.data import shards  # pylint: disable=g-import-not-at-top
from mer_jax.data import text_batching  # pylint: disable=g-import-not-at-top
from mer_jax.models import text_classifier  # pylint: disable=g-import-not-at-top
from mer_jax.models import text_transformer  # pylint: disable=g-import-not-at-top
from mer_jax.preprocess import text_features  # pylint: disable=g-import-not-at-top
from mer_jax.preprocess import text_finetune  # pylint: disable=g-import-not-at-top
from mer_jax.train import sharding  # pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.slow

WORDS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'now', 'feels', 'i', 'am', 'so', 'happy',
         'sad', 'angry', 'ok', 'the', 'a', '.', '!', '?', 'what', 'is', 'it', 'you', 'we', 'they',
         'well', 'really', 'yes', 'no', 'maybe']
KEYWORD_LABEL = {'happy': 'joy', 'sad': 'sadness', 'angry': 'anger'}
FILLER = ['i', 'am', 'so', 'the', 'a', 'what', 'is', 'it', 'you', 'we', 'they', 'well', 'really',
          'yes', 'no', 'maybe']


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  folder = tmp_path_factory.mktemp('tiny_bert')
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=128, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)
  transformers.BertModel(cfg).save_pretrained(folder, safe_serialization=True)
  tok = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)})
  tok.save_pretrained(folder)
  return str(folder)


def write_split(path, num_dialogues, seed):
  rng = np.random.default_rng(seed)
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['Sr No.', 'Utterance', 'Speaker', 'Emotion', 'Dialogue_ID', 'Utterance_ID'])
    row = 0
    for d in range(num_dialogues):
      for u in range(int(rng.integers(2, 7))):
        words = list(rng.choice(FILLER, size=int(rng.integers(2, 6))))
        keyword = rng.choice(['happy', 'sad', 'angry', 'ok'])
        words.insert(int(rng.integers(0, len(words) + 1)), keyword)
        label = KEYWORD_LABEL.get(keyword, 'neutral')
        row += 1
        w.writerow([row, ' '.join(words) + ' .', rng.choice(['Ann', 'Bob', 'Cy']), label, d, u])


@pytest.fixture(scope='module')
def csv_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp('csv')
  for split, n, seed in (('train', 60, 0), ('dev', 16, 1), ('test', 16, 2)):
    write_split(folder / f'{split}_sent_emo.csv', n, seed)
  return str(folder)


def tiny_config(checkpoint, csv_dir, variant='utterance'):
  c = meld_text.get_config(variant)
  c.text.encoder = checkpoint
  c.text.csv.dir = csv_dir
  c.text.max_length = 64
  c.text.tokens_per_batch = 512
  c.text.num_shards = {'train': 2, 'dev': 1, 'test': 1}
  c.text.layers = (-1,)  # the tiny encoder has 2 layers (MELD's utterance variant pools 1-6)
  c.data.dims.t = 32
  c.train.progress_bar = False
  c.train.cpu_fast_compile = True
  c.mesh.shape = {'data': 1, 'model': 1}
  return c


def test_pooling_against_hand_computed_values():
  hidden = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  last = jnp.array([2, 1])
  target = jnp.array([[False, True, True, False], [False, False, False, False]])
  h = np.asarray(hidden)
  np.testing.assert_allclose(text_classifier.pool(hidden, mask, last, target, 'cls'), h[:, 0])
  np.testing.assert_allclose(text_classifier.pool(hidden, mask, last, target, 'last'),
                             [h[0, 2], h[1, 1]])
  np.testing.assert_allclose(text_classifier.pool(hidden, mask, last, target, 'mean'),
                             [h[0, :3].mean(0), h[1, :2].mean(0)])
  # Row 1 has no target tokens: falls back to the mean over its tokens.
  np.testing.assert_allclose(text_classifier.pool(hidden, mask, last, target, 'target_mean'),
                             [h[0, 1:3].mean(0), h[1, :2].mean(0)])
  with pytest.raises(ValueError, match='pooling must be one of'):
    text_classifier.pool(hidden, mask, last, target, 'max')


@pytest.mark.parametrize('pooling', ['mean', 'last', 'target_mean'])
def test_bucketed_encoding_equals_one_by_one(checkpoint, pooling):
  _, model = text_transformer.load_hf_checkpoint(checkpoint)
  tok = prompts.PromptTokenizer(transformers.AutoTokenizer.from_pretrained(checkpoint), 3)
  text_transformer.resize_token_embeddings(model, tok.vocab_size)
  texts = ['i am so happy .', 'what', 'they really are sad and angry ! ! yes no maybe', 'ok .']
  seqs = tok.dialogue_prompts(texts, [0, 1, 0, 2], context=True, max_length=32)
  encode = text_features.make_encode_fn(model, pooling, normalize=False)
  got, stats = text_features.encode_sequences(encode, seqs, pad_id=tok.pad_id,
                                              buckets=(8, 16, 32), tokens_per_batch=64)
  assert stats.sequences == 4 and stats.tokens == sum(len(s) for s in seqs)
  for i, s in enumerate(seqs):
    single = text_batching.make_batch(seqs, np.array([i]), len(s), tok.pad_id)
    np.testing.assert_allclose(got[i], np.asarray(encode(single))[0], atol=1e-5)


def test_layer_features_match_torch_hidden_states(checkpoint):
  """text.layers=(0, 1, -1): each hidden state mean-pooled, L2-normalised and concatenated."""
  _, model = text_transformer.load_hf_checkpoint(checkpoint)
  tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
  texts = ['i am so happy .', 'what is it ?', 'they really are sad and angry ! ! yes']
  enc = tok(texts, padding=True, return_tensors='np')
  batch = text_batching.TokenBatch(
      input_ids=jnp.asarray(enc['input_ids']), attention_mask=jnp.asarray(enc['attention_mask']),
      last_index=jnp.asarray(enc['attention_mask'].sum(1) - 1),
      target_mask=jnp.zeros(enc['input_ids'].shape, bool), labels=np.zeros(3, np.int32),
      index=np.arange(3))
  got = np.asarray(text_features.make_encode_fn(model, 'mean', True, (0, 1, -1))(batch))
  with torch.no_grad():
    states = transformers.BertModel.from_pretrained(checkpoint).eval()(
        **{k: torch.tensor(v) for k, v in enc.items()}, output_hidden_states=True).hidden_states
  mask = enc['attention_mask'][..., None].astype(np.float32)
  want = []
  for layer in (0, 1, 2):
    pooled = (states[layer].numpy() * mask).sum(1) / mask.sum(1)
    want.append(pooled / np.linalg.norm(pooled, axis=-1, keepdims=True))
  assert got.shape == (3, 3 * 32)
  np.testing.assert_allclose(got, np.concatenate(want, axis=-1), atol=1e-5)
  with pytest.raises(ValueError, match='out of range: the encoder has 2 layers'):
    text_features.make_encode_fn(model, 'mean', True, (3,))
  with pytest.raises(ValueError, match='twice'):
    text_features.make_encode_fn(model, 'mean', True, (2, -1))


def test_build_text_shards(checkpoint, csv_dir, tmp_path):
  config = tiny_config(checkpoint, csv_dir, 'context')
  summary = text_features.build_text_shards(config, str(tmp_path / 'shards'))
  manifest = shards.load_manifest(tmp_path / 'shards')
  assert manifest.dims == {'t': 32} and manifest.label_names == config.label_names
  assert summary['dim'] == 32 and summary['splits']['train']['tokens'] > 0
  assert os.path.isfile(tmp_path / 'shards' / text_features.STATS_NAME)
  src = shards.DialogueShardSource(tmp_path / 'shards', 'dev', modalities=('t',))
  with open(os.path.join(csv_dir, 'dev_sent_emo.csv')) as f:
    rows = list(csv.DictReader(f))
  assert sum(src.dialogue_lengths) == len(rows)
  first = src[0]
  dialogue0 = [r for r in rows if r['Dialogue_ID'] == '0']
  assert first.transcripts == [r['Utterance'] for r in dialogue0]
  assert [config.label_names[i] for i in first.labels] == [r['Emotion'] for r in dialogue0]
  assert first.present['t'].all()
  np.testing.assert_allclose(np.linalg.norm(first.features['t'], axis=1), 1.0, rtol=1e-5)


def finetune_config(checkpoint, csv_dir):
  """The fine-tuning tests' settings: one length bucket (64) and 1024-token batches, so a
  fine-tuning compiles two train programs (16 rows, and the last batch's power of two of rows)
  rather than one per bucket and row count; the same model and optimizer in every test, so later
  fine-tuners in the process reuse the first one's compiled steps."""
  config = tiny_config(checkpoint, csv_dir, 'finetune')
  config.text.pooling = 'target_mean'
  config.text.smallest_bucket = config.text.max_length
  config.text.finetune.tokens_per_batch = 1024
  config.text.finetune.optim.lr = 3e-3
  config.text.finetune.optim.warmup_fraction = 0.05
  config.text.finetune.optim.early_stopping_patience = 5
  return config


def finetuner(checkpoint, csv_dir, workdir, epochs=2):
  config = finetune_config(checkpoint, csv_dir)
  config.train.checkpoint_every_steps = 6
  config.text.finetune.epochs = epochs
  t = config.text
  tok = text_features.prompt_tokenizer(t, checkpoint)
  encoder, _ = text_features.load_encoder(t, tok.vocab_size)
  dialogues = text_features.read_splits(t, ('train', 'dev'))
  splits = {s: text_finetune.TokenSplit(text_features.dialogue_sequences(tok, dialogues[s], t),
                                        np.concatenate([d.labels for d in dialogues[s]]))
            for s in ('train', 'dev')}
  mesh = sharding.make_mesh(config)
  return text_finetune.TextFinetuner(config, str(workdir), mesh, encoder, splits['train'],
                                     splits['dev'], tok.pad_id)


def test_finetuning_learns_and_resumes_exactly(checkpoint, csv_dir, tmp_path):
  tuner = finetuner(checkpoint, csv_dir, tmp_path / 'a')
  before = tuner.evaluate(tuner.state.params, tuner.dev_split)['weighted_f1']
  tuner.fit()
  after = tuner.evaluate(tuner.state.params, tuner.dev_split)['weighted_f1']
  assert after > 0.8 and after > before + 0.3, (before, after)
  # Each batch shape compiles once: one cache entry per distinct training batch shape.
  shapes = {(length, len(rows)) for e in range(2) for length, rows in tuner.epoch_plan(e).batches}
  assert len(shapes) > 1 and tuner._train_step._cache_size() == len(shapes), shapes

  # A run killed mid-epoch (after its step 7; the last checkpoint is at step 6) resumes from
  # its workdir to the same weights as the uninterrupted run.
  interrupted = finetuner(checkpoint, csv_dir, tmp_path / 'b')
  real_step, calls = interrupted._train_step, []

  def dying_step(*args):
    calls.append(1)
    if len(calls) > 7:
      raise KeyboardInterrupt('killed')
    return real_step(*args)

  interrupted._train_step = dying_step
  with pytest.raises(KeyboardInterrupt):
    interrupted.fit()
  resumed = finetuner(checkpoint, csv_dir, tmp_path / 'b')
  resumed.fit()
  assert int(resumed.state.step) == int(tuner.state.step)
  for a, b in zip(jax.tree.leaves(tuner.state.params), jax.tree.leaves(resumed.state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_csv_to_prediction_with_finetuning(checkpoint, csv_dir, tmp_path):
  """data.source='text_csv': fine-tune -> features -> teacher -> predict from transcripts."""
  from mer_jax import predict  # pylint: disable=g-import-not-at-top
  from mer_jax.config_validation import validate_config  # pylint: disable=g-import-not-at-top
  config = finetune_config(checkpoint, csv_dir)
  config.text.finetune.epochs = 1
  config.train.epochs = 2
  config.optim.teacher.lr = 3e-3
  config.model.teacher.hidden = 32
  validate_config(config)
  workdir = str(tmp_path / 'w')
  results = job.train_and_evaluate(config, workdir)
  assert set(results) == {'teacher'}
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', text_finetune.CHECKPOINT_NAME, 'best'))
  shard_dirs = [d for d in os.listdir(os.path.join(workdir, 'data')) if d.startswith('text-')]
  assert len(shard_dirs) == 1

  lines = tmp_path / 'dialogues.jsonl'
  lines.write_text(
      '{"dialogue_id": "x", "utterances": [{"speaker": "Ann", "text": "i am so happy ."}, '
      '{"speaker": "Bob", "text": "they are sad ."}]}\n')
  predictor = predict.Predictor(workdir)
  records = predictor.read_jsonl(str(lines))
  assert records[0].present['t'].all()
  # The features computed for prediction are those the shards hold for the same text.
  feats = predictor.text.features([records[0]])[0]
  np.testing.assert_allclose(records[0].features['t'], feats, atol=1e-6)
  probs = predictor.probabilities(records)
  assert probs[0].shape == (2, 7)
  np.testing.assert_allclose(probs[0].sum(-1), 1.0, rtol=1e-5)
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('{"utterances": [{"speaker": "Ann", "text": "  "}]}\n')
  with pytest.raises(predict.PredictInputError, match=r'utterances\[0\].text: empty'):
    predictor.read_jsonl(str(empty))
  # Rerunning the workdir reuses the finished fine-tuning, shards and teacher.
  again = job.train_and_evaluate(config, workdir)
  assert again['teacher']['test_weighted_f1'] == results['teacher']['test_weighted_f1']
