"""Bad configs, shards and records fail with one clear error naming the file,
record or key (or, where asked for, are skipped and counted)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from configs import default
from mer_jax import batch_contract
from mer_jax.run import job
from mer_jax.run import corpus as corpus_lib
from mer_jax.config_validation import ConfigError
from mer_jax.config_validation import check_mesh_fits_batch
from mer_jax.config_validation import validate_config
from mer_jax.data import pipeline
from mer_jax.data import shards
from mer_jax.data import sources
from mer_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD_RECORD = 4  # train record given a NaN feature in the crafted shard folder


def tiny():
  return default.get_config('tiny')


# --- configs --------------------------------------------------------------------------------

def test_shards_source_without_a_shard_dir(tmp_path):
  config = tiny()
  config.data.source = 'shards'
  with pytest.raises(ConfigError, match=r'data\.shard_dir: is empty'):
    validate_config(config)
  for folder in (tmp_path, tmp_path / 'missing'):
    config.data.shard_dir = str(folder)
    with pytest.raises(ConfigError, match=r'data\.shard_dir') as e:
      validate_config(config)
    assert str(folder) in str(e.value) and 'manifest.json' in str(e.value)


def test_batch_layouts_that_do_not_split_over_the_data_axis():
  """Several sub-batches per step split their per-graph arrays over 'data' too."""
  config = tiny()
  config.batch.max_nodes, config.batch.max_graphs = 16, 3
  check_mesh_fits_batch(config, data_axis=4, groups=1)  # per-graph arrays replicated: fine
  with pytest.raises(ConfigError, match=r'2 sub-batches of 3 graph slots \(batch\.max_graphs\)'):
    check_mesh_fits_batch(config, data_axis=4, groups=2)
  config.batch.max_nodes = 10
  with pytest.raises(ConfigError, match=r'batch\.max_nodes=10 must be divisible by the data axis'):
    check_mesh_fits_batch(config, data_axis=4, groups=1)
  config.batch.max_nodes = 16
  config.batch.groups = -1
  with pytest.raises(ConfigError, match=r'batch\.groups: must be >= 0'):
    validate_config(config)


def test_impossible_values_are_reported_together():
  config = tiny()
  config.optim.audio.lr = -1e-3
  config.model.fusion.top_k = config.model.fusion.num_experts + 1
  config.graph.scope = 'global'
  config.train.stages = ('audio', 'teacher', 'visual', 'fusion')
  config.data.cache_mib = -1
  config.loss.class_weight_power = -0.5
  with pytest.raises(ConfigError) as e:
    validate_config(config)
  message = str(e.value)
  problems = [line.strip() for line in message.splitlines()[1:]]
  keys = sorted({p.split(':')[0] for p in problems})
  assert keys == ['data.cache_mib', 'graph.scope', 'loss.class_weight_power',
                  'model.fusion.top_k', 'optim.audio.lr', 'train.stages'], message
  assert "'global'" in message


def test_text_frontend_config_problems(tmp_path):
  from configs import meld_text  # pylint: disable=g-import-not-at-top
  config = meld_text.get_config()
  config.text.csv.dir = str(tmp_path / 'nowhere')
  config.text.pooling = 'max'
  config.text.layers = (4, 4)
  config.text.finetune.enabled = True
  config.text.finetune.optim.lr = 0.0
  with pytest.raises(ConfigError) as e:
    validate_config(config)
  message = str(e.value)
  assert 'text.csv.dir:' in message and 'nowhere' in message
  assert "text.pooling: must be 'mean', 'cls', 'last' or 'target_mean'" in message
  assert 'text.finetune.optim.lr: must be > 0' in message
  assert 'text.layers: (4, 4) names a hidden state twice' in message
  (tmp_path / 'train_sent_emo.csv').write_text('x\n')
  config = meld_text.get_config()
  config.text.csv.dir = str(tmp_path)
  with pytest.raises(ConfigError, match=r"text\.csv\.pattern: .*dev_sent_emo\.csv \(split 'dev'\) "
                     'does not exist'):
    validate_config(config)
  config = meld_text.get_config()
  del config.text
  with pytest.raises(ConfigError, match="data.source='text_csv' needs a text block"):
    validate_config(config)
  with pytest.raises(ValueError, match='unknown variant'):
    meld_text.get_config('gpt')


def run_main(*args, workdir) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', 'mer_jax.main', '--config', 'configs/default.py:tiny',
       '--workdir', str(workdir), *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', JAX_PLATFORMS='cpu'))


def test_cli_rejects_an_unknown_override_key(tmp_path):
  proc = run_main('--config.nope=1', workdir=tmp_path / 'w')
  assert proc.returncode == 2
  assert proc.stderr == ("error: the config has no key 'nope' (overrides given: --config.nope)\n")
  assert not (tmp_path / 'w').exists()  # nothing ran


def test_cli_reports_an_invalid_value_before_training(tmp_path):
  proc = run_main('--config.graph.scope=global', workdir=tmp_path / 'w')
  assert proc.returncode == 2
  assert proc.stderr == ("error: invalid config:\n  graph.scope: 'global' is not 'dialogue' or "
                         "'batch'\n")  # one message, no traceback
  assert not (tmp_path / 'w').exists()


# --- shard folders and records --------------------------------------------------------------

@pytest.fixture(scope='module')
def corpus():
  config = tiny()
  dims = config.data.dims.to_dict()
  splits = synthetic.generate_records(seed=7, num_dialogues={'train': 10, 'dev': 3, 'test': 3},
                                      dims=dims, label_names=tuple(config.label_names))
  return {'splits': splits, 'dims': dims, 'label_names': tuple(config.label_names)}


def write(corpus, out_dir, splits=None, num_shards=1):
  return shards.write_shards(out_dir, splits or corpus['splits'],
                             label_names=corpus['label_names'], dims=corpus['dims'],
                             num_shards=num_shards)


@pytest.fixture(scope='module')
def shard_dir(corpus, tmp_path_factory):
  out = tmp_path_factory.mktemp('shards') / 'good'
  write(corpus, out)
  return out


def shards_config(shard_dir, **data):
  config = tiny()
  config.data.source = 'shards'
  config.data.shard_dir = str(shard_dir)
  config.data.update(data)
  return config


def test_shard_dims_differing_from_the_config(shard_dir):
  config = shards_config(shard_dir)
  config.data.dims.a = 20
  manifest = shards.load_manifest(shard_dir)
  with pytest.raises(ValueError) as e:
    sources.check_manifest_matches_config(manifest, config, str(shard_dir))
  message = str(e.value)
  assert os.path.join(str(shard_dir), 'manifest.json') in message
  assert "modality 'a'" in message and 'config.data.dims.a' in message


def test_dialogue_longer_than_the_node_budget(shard_dir, tmp_path):
  lengths = np.asarray(shards.load_manifest(shard_dir).splits['train'].dialogue_lengths)
  config = shards_config(shard_dir)
  config.batch.max_nodes = int(lengths.max())  # fits max_nodes - 1 utterances
  with pytest.raises(ValueError) as e:
    corpus_lib.open_splits(config, str(tmp_path))
  assert f'{shard_dir}/train' in str(e.value) and 'batch.max_nodes' in str(e.value)
  # The input pipeline names the record itself.
  train = sources.open_source(str(shard_dir), 'train', config)
  longest = int(np.argmax(lengths))
  with pytest.raises(ValueError, match=rf'dialogue record {longest} has {lengths.max()} '
                                       r'utterances.*batch\.max_nodes'):
    pipeline.make_dataset(train, config=config, budget=batch_contract.budget_from_config(config),
                          train=False, epoch=0, seed=0)


def with_nan_feature(corpus):
  splits = {k: list(v) for k, v in corpus['splits'].items()}
  bad = splits['train'][BAD_RECORD]
  features = {m: np.array(x) for m, x in bad.features.items()}
  features['t'][1, 3] = np.nan
  splits['train'][BAD_RECORD] = shards.DialogueRecord(**{**vars(bad), 'features': features})
  return splits, bad.dialogue_id


def test_nan_features_are_refused_when_shards_are_written(corpus, tmp_path):
  splits, dialogue_id = with_nan_feature(corpus)
  with pytest.raises(shards.BadRecordError) as e:
    write(corpus, tmp_path / 'out', splits, num_shards=2)
  message = str(e.value)
  # Round-robin over 2 files: record 4 is the 3rd record of the first file.
  assert str(tmp_path / 'out' / 'train-00000-of-00002.array_record') in message
  assert f'record {BAD_RECORD // 2} ' in message and repr(dialogue_id) in message
  assert 'NaN' in message
  assert not (tmp_path / 'out').exists()  # no half-written folder


@pytest.fixture(scope='module')
def shard_dir_with_a_bad_record(corpus, tmp_path_factory):
  """Shards holding a NaN record (written with validation switched off, as a corrupt producer
  or an older writer might), with consistent checksums."""
  splits, dialogue_id = with_nan_feature(corpus)
  out = tmp_path_factory.mktemp('shards') / 'bad'
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(shards, 'validate_record', lambda *args, **kwargs: None)
    write(corpus, out, splits)
  return out, dialogue_id


def test_reading_a_bad_record_names_file_and_record(shard_dir_with_a_bad_record):
  out, dialogue_id = shard_dir_with_a_bad_record
  source = shards.DialogueShardSource(out, 'train')
  source[BAD_RECORD - 1]  # its neighbours read fine
  with pytest.raises(shards.BadRecordError) as e:
    source[BAD_RECORD]
  message = str(e.value)
  assert str(out / 'train-00000-of-00001.array_record') in message
  assert f'record {BAD_RECORD} ' in message and repr(dialogue_id) in message
  assert 'NaN' in message


def written_train_records(shard_dir_with_a_bad_record):
  """The train records as written (read back with validation off)."""
  out, _ = shard_dir_with_a_bad_record
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(shards, 'validate_record', lambda *args, **kwargs: None)
    source = shards.DialogueShardSource(out, 'train')
    return [source[i] for i in range(len(source))]


def test_skipped_bad_record_is_counted_and_training_runs(shard_dir_with_a_bad_record, tmp_path):
  out, dialogue_id = shard_dir_with_a_bad_record
  config = shards_config(out, on_bad_record='skip')
  config.train.stages = ('teacher',)
  config.train.epochs = 1
  validate_config(config)
  data = corpus_lib.open_splits(config, str(tmp_path))
  assert data.train.num_skipped == 1 and len(data.train) == 9
  assert data.train.skipped[0].dialogue_id == dialogue_id
  assert (data.dev.num_skipped, data.test.num_skipped) == (0, 0)
  written = written_train_records(shard_dir_with_a_bad_record)
  good = [r for i, r in enumerate(written) if i != BAD_RECORD]
  labels = np.concatenate([r.labels for r in good])
  expected_counts = np.bincount(labels[labels >= 0], minlength=7)
  np.testing.assert_array_equal(data.class_counts, expected_counts)
  results = job.train_and_evaluate(config, str(tmp_path))
  assert list(results) == ['teacher']
  assert 0.0 <= results['teacher']['test_accuracy'] <= 1.0


def test_non_finite_loss_stops_training_naming_stage_and_step(shard_dir, tmp_path):
  config = shards_config(shard_dir)
  config.train.stages = ('teacher',)
  config.train.epochs = 1
  config.optim.teacher.lr = 1e30
  with pytest.raises(FloatingPointError,
                     match=r'stage teacher: non-finite loss at step \d+ \(epoch 1, batch \d+ of'):
    job.train_and_evaluate(config, str(tmp_path))
  # Stopped before anything was reported as a result.
  assert not (tmp_path / 'results.json').exists()
