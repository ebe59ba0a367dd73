"""Choosing a text variant: the selection rule on hand-written scores, the table read back from
results.json, and the command end to end on a tiny local BERT and a few keyword dialogues.

The command's runs are two variants (`utterance` and the default `layers_gru`, which share their
features) x one seed, one epoch, a tiny teacher, one after the other (the second reuses the
first's features; in parallel both would encode them), about 30 s of CPU each, mostly compiling;
the spread over several seeds is checked on written results.json files instead.
"""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import mer_jax
from mer_jax import errors
from mer_jax.experiments import runs
from mer_jax.experiments import select

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'i', 'am', 'so', 'happy', 'sad', 'angry',
         'ok', 'the', 'what', 'is', 'it', 'you', 'well', 'yes', 'no', '.']
LABEL_OF = {'happy': 'joy', 'sad': 'sadness', 'angry': 'anger', 'ok': 'neutral'}
VARIANTS = ('utterance', 'layers_gru')


def test_choose_takes_the_best_mean_then_the_best_seed():
  dev = {'utterance': [0.50, 0.60], 'last_layer': [0.58, 0.56], 'layers_gru': [0.54, 0.53]}
  # Means 0.55, 0.57, 0.535: last_layer; its seeds 0.58 > 0.56: the first.
  assert select.choose(dev) == ('last_layer', 0)
  assert select.choose({'a': [0.3, 0.7, 0.6]}) == ('a', 1)


def test_ties_go_to_the_variant_listed_first_then_the_lowest_seed():
  # Equal means, summed in another order (0.1 + 0.2 + 0.3 != 0.3 + 0.2 + 0.1 in floats).
  dev = {'utterance': [0.1, 0.2, 0.3], 'layers_gru': [0.3, 0.2, 0.1]}
  assert np.mean(dev['utterance']) != np.mean(dev['layers_gru'])
  assert select.choose(dev) == ('utterance', 2)
  assert select.choose(dict(reversed(dev.items()))) == ('layers_gru', 0)
  assert select.choose({'a': [0.4, 0.4], 'b': [0.4, 0.4]}) == ('a', 0)
  assert select.choose({'a': [0.4, 0.4], 'b': [0.4 + 1e-6, 0.4]}) == ('b', 0)


def write_run(workdir, dev, test):
  """results.json as mer_jax.main writes it, with only the keys select reads."""
  os.makedirs(workdir)
  stages = {'teacher': {'dev_weighted_f1': dev, 'test_weighted_f1': test, 'best_epoch': 1}}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump({'mer_jax_version': '0.1.0', 'git_commit': None, 'config': {}, 'stages': stages}, f)


def test_the_table_reads_every_seed_from_results_json(tmp_path):
  dev = {'utterance': [0.52, 0.55, 0.49], 'last_layer': [0.58, 0.61, 0.57],
         'layers_gru': [0.60, 0.57, 0.59]}
  for name, scores in dev.items():
    for seed, score in zip((3, 4, 5), scores):
      write_run(runs.seed_workdir(tmp_path / name, seed), score, score - 0.1)
  write_run(runs.seed_workdir(tmp_path / 'utterance', 6), 0.99, 0.99)  # not a requested seed
  result = select.selection(select.variant_rows(str(tmp_path), dev, [3, 4, 5]))
  assert list(result['variants']) == list(dev)
  for name, scores in dev.items():
    row = result['variants'][name]
    assert row['dev_weighted_f1']['mean'] == pytest.approx(np.mean(scores))
    assert row['dev_weighted_f1']['sd'] == pytest.approx(np.std(scores, ddof=1))
    assert row['test_weighted_f1']['mean'] == pytest.approx(np.mean(scores) - 0.1)
    assert [r['seed'] for r in row['per_seed']] == [3, 4, 5]
  # Means: 0.52, 0.5867, 0.5867 (equal up to float rounding): last_layer is listed first.
  assert result['chosen']['variant'] == 'last_layer' and result['chosen']['seed'] == 4
  assert result['chosen']['run'] == str(tmp_path / 'last_layer' / 'seed_4')
  text = select.format_selection(dict(result, seeds=[3, 4, 5], link='L', predict_command='P',
                                      run_time={'runs': 9, 'untimed': 9}), 'title')
  assert '| **last_layer** (chosen) | 58.67 ± 2.08 | 58.00, 61.00, 57.00 | 48.67 ± 2.08 |' in text
  assert '| utterance | 52.00 ± 3.00 |' in text


def test_chosen_link_is_relative_and_replaced(tmp_path):
  for seed in (0, 1):
    os.makedirs(tmp_path / 'v' / f'seed_{seed}')
  link = select.link_chosen(str(tmp_path), str(tmp_path / 'v' / 'seed_0'))
  assert os.readlink(link) == os.path.join('v', 'seed_0')
  select.link_chosen(str(tmp_path), str(tmp_path / 'v' / 'seed_1'))
  assert os.path.realpath(link) == str((tmp_path / 'v' / 'seed_1').resolve())


@pytest.mark.parametrize('args, message', [
    (('--config', 'configs/meld_text.py:last_layer'), 'give the file without :last_layer'),
    (('--config', 'configs/meld_text.py', '--variants', 'utterance,nope'),
     "variant .*meld_text.py:nope: .*unknown variant 'nope'"),
    (('--config', 'configs/meld_text.py', '--variants', 'utterance,utterance'),
     'must be distinct names'),
    (('--config', 'configs/meld_text.py', '--variants', 'utterance,data'), "not \\['data'\\]"),
])
def test_bad_arguments_fail_before_any_run(args, message, tmp_path, clean_flags, monkeypatch,
                                           capsys):
  for split in ('train', 'dev', 'test'):
    (tmp_path / f'{split}_sent_emo.csv').touch()
  argv = ['mer-jax-select', *args, f'--config.text.csv.dir={tmp_path}',
          '--workdir', str(tmp_path / 'exp')]
  monkeypatch.setattr(sys, 'argv', argv)
  with pytest.raises(SystemExit) as exit_info:
    select.run(argv)
  assert exit_info.value.code == errors.EXIT_USER_ERROR
  [line] = capsys.readouterr().err.strip().splitlines()
  assert re.match(f'error: .*{message}', line), line
  assert not (tmp_path / 'exp').exists()


@pytest.fixture(scope='module', name='tiny_text')
def fixture_tiny_text(tmp_path_factory):
  """A random 2-layer BERT (hidden 32) and MELD-layout CSVs whose label is a keyword's."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  base = tmp_path_factory.mktemp('tiny_text')
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=64)
  transformers.BertModel(cfg).save_pretrained(base / 'bert', safe_serialization=True)
  transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(
      base / 'bert')
  rng = np.random.default_rng(0)
  (base / 'csv').mkdir()
  for split, dialogues in (('train', 16), ('dev', 6), ('test', 6)):
    with open(base / 'csv' / f'{split}_sent_emo.csv', 'w', newline='') as f:
      w = csv.writer(f)
      w.writerow(['Utterance', 'Speaker', 'Emotion', 'Dialogue_ID', 'Utterance_ID'])
      for d in range(dialogues):
        for u in range(int(rng.integers(2, 6))):
          keyword = str(rng.choice(list(LABEL_OF)))
          words = list(rng.choice(WORDS[5:], size=3)) + [keyword, '.']
          w.writerow([' '.join(words), rng.choice(['Ann', 'Bob']), LABEL_OF[keyword], d, u])
  return base


@pytest.fixture(scope='module', name='selected')
def fixture_selected(tiny_text, shared_compilation_cache):
  exp = tiny_text / 'exp'
  args = [sys.executable, '-m', 'mer_jax.experiments.select', '--config', 'configs/meld_text.py',
          '--workdir', str(exp), '--seeds', '1',
          '--variants', ','.join(VARIANTS),
          f'--config.text.encoder={tiny_text / "bert"}', f'--config.text.csv.dir={tiny_text / "csv"}',
          '--config.text.max_length=64', '--config.text.tokens_per_batch=512',
          # Both variants read layers 1-6 of MiniLM; the tiny encoder has 2 layers of 32.
          '--config.text.layers=(1, 2)', '--config.data.dims.t=64',
          '--config.model.teacher.hidden=8', '--config.model.teacher.heads=2',
          '--config.train.epochs=1', '--config.train.progress_bar=False',
          '--config.train.cpu_fast_compile=True',
          '--config.eval.confusion_png=False', "--config.mesh.shape={'data': 1, 'model': 1}",
          f'--config.train.compilation_cache_dir={shared_compilation_cache}']
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', OMP_NUM_THREADS='1')
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return exp, proc.stdout


def test_select_trains_every_variant_and_keeps_the_best_on_dev(selected):
  exp, stdout = selected
  result = json.loads((exp / 'select.json').read_text())
  assert list(result['variants']) == list(VARIANTS) and result['seeds'] == [0]
  dev = {}
  for name in VARIANTS:
    stages = runs.load_results(str(exp / name / 'seed_0'))
    assert list(stages) == ['teacher']
    dev[name] = stages['teacher']['dev_weighted_f1']
    row = result['variants'][name]
    assert row['dev_weighted_f1'] == {'mean': pytest.approx(dev[name]), 'sd': None}
    assert row['test_weighted_f1']['mean'] == pytest.approx(
        stages['teacher']['test_weighted_f1'])
  # The first listed wins a tie (best_index), so this is the argmax rule spelled out.
  best = max(VARIANTS, key=lambda n: (dev[n], -VARIANTS.index(n)))
  assert result['chosen']['variant'] == best
  assert os.path.realpath(exp / 'chosen') == str((exp / best / 'seed_0').resolve())
  # Both variants read the same features: the first run encoded them, the second reused them.
  assert len([d for d in os.listdir(exp / 'data') if d.startswith('text-')]) == 1
  assert 'text features' in (exp / VARIANTS[0] / 'seed_0' / 'run.log').read_text()
  assert 'text features' not in (exp / VARIANTS[1] / 'seed_0' / 'run.log').read_text()
  assert (exp / 'select.md').read_text() in stdout
  assert f'python -m mer_jax.predict --workdir {exp / "chosen"} ' in stdout


def test_the_chosen_workdir_predicts(selected):
  exp, _ = selected
  result = json.loads((exp / 'select.json').read_text())
  model = mer_jax.load(str(exp / 'chosen'))
  gru = model.config.model.teacher.context_gru
  assert bool(gru) == (result['chosen']['variant'] == 'layers_gru')
  rows = model.predict([{'dialogue_id': 'd', 'utterances': [
      {'speaker': 'Ann', 'text': 'i am so happy .'}, {'speaker': 'Bob', 'text': 'yes sad .'}]}])
  assert [r['utterance_id'] for r in rows] == [0, 1]
  for r in rows:
    assert r['emotion'] in model.label_names
    assert sum(r['probabilities'].values()) == pytest.approx(1.0, abs=1e-5)
