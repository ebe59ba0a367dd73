"""The text bench's core: both frameworks on the same batches of a tiny random BERT, one round."""

import math

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from configs import meld_text  # pylint: disable=g-import-not-at-top
from mer_jax import bench_text  # pylint: disable=g-import-not-at-top
from mer_jax.data import prompts  # pylint: disable=g-import-not-at-top

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64)


def test_one_round_on_a_tiny_bert(tmp_path):
  torch.manual_seed(0)
  transformers.BertModel(transformers.BertConfig(**TINY)).save_pretrained(tmp_path / 'bert')
  config = meld_text.get_config()
  config.text.layers = (1, 2)  # both of the tiny model's layers, concatenated
  config.text.max_length = 64
  config.text.tokens_per_batch = 512
  config.text.finetune.tokens_per_batch = 256
  config.text.finetune.projection_dim = 16
  rng = np.random.default_rng(0)
  sequences = [prompts.Prompt(rng.integers(5, 99, size=n).astype(np.int32), 1, int(n) - 1)
               for n in rng.integers(3, 40, size=120)]
  # Two more tokens than the checkpoint's vocabulary: both frameworks resize, as for speakers.
  workload = bench_text.Workload('random', sequences, bench_text.random_labels(120, 7, 0),
                                 pad_id=0, vocab_size=101)
  lines = []
  threads = torch.get_num_threads()
  try:
    res = bench_text.run_bench(config, str(tmp_path / 'bert'), workload, rounds=1, batches=1,
                               threads=1)
  finally:
    torch.set_num_threads(threads)
  bench_text.report(res, log=lines.append)
  assert res['threads'] == res['torch_threads'] == 1
  for task in bench_text.TASKS:
    flax, pt = res['timings']['flax', task], res['timings']['torch', task]
    assert len(flax.seconds) == len(pt.seconds) == 1
    assert flax.tokens == pt.tokens == [res['tokens'][task]] and res['tokens'][task] > 0
    for t in (flax, pt):
      assert math.isfinite(t.tokens_per_s) and t.tokens_per_s > 0
    assert res['warmup']['flax', task][1] > 0  # compile seconds
  assert res['feature_max_diff'] < 1e-4  # same weights, same pooling
  assert all(math.isfinite(l) for l in res['first_loss'].values())
  for task in bench_text.TASKS:  # the printed row's tokens/s, ratio and per-round ratio
    row = next(line for line in lines if line.startswith(task + ' ')).split()
    numbers = [float(v.rstrip('x')) for v in row[3:]]
    assert len(numbers) == 4, row
    assert all(math.isfinite(v) and v > 0 for v in numbers), row
