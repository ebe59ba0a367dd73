"""The whole job through its command lines: train, rerun, predict.

One tiny workdir is trained once for the module (3 epochs, periodic checkpoints, a teacher lr that
plateaus so reduce-on-plateau acts) and shared by the tests. Subprocesses share a persistent XLA
compilation cache, so only the first run pays for compiling.
"""

import collections
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import default
from mer_jax import batch_contract
from mer_jax.run import corpus
from mer_jax.train import inference
from mer_jax import predict
from mer_jax.data import shards
from mer_jax.data import sources
from mer_jax.train import sharding
from mer_jax.train import stacking
from tests import _tensorboard_events as tb
from tests._checkpoints import latest_checkpoint
from tests._checkpoints import latest_steps

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ('teacher', 'audio', 'visual', 'fusion')
METRICS = ('test_weighted_f1', 'test_macro_f1', 'test_accuracy')
EPOCHS = 3
TIMEOUT = 600
# The run every test shares: the tiny config for 3 epochs, where no epoch after the first counts
# as an improvement, so the teacher's lr is cut on plateau after epochs 2 and 3. The teacher also
# accumulates 2 micro-batches and keeps an EMA, so every kind of optimizer state is saved and
# restored. Two stacking folds (the fewest) keep the cross-fitting cheap.
OVERRIDES = {'train.epochs': EPOCHS, 'train.early_stopping_min_delta': 1.0,
             'optim.teacher.lr_reduce_patience': 1, 'optim.teacher.grad_accum_steps': 2,
             'optim.teacher.ema_decay': 0.9, 'model.fusion.stacking_folds': 2}


def tiny_config(every: int):
  """The tiny config with OVERRIDES and the checkpoint period, as `run_args` passes them."""
  config = default.get_config('tiny')
  config.update_from_flattened_dict(dict(OVERRIDES, **{'train.checkpoint_every_steps': every}))
  return config


def run_args(workdir, every: int, cache_dir) -> list[str]:
  overrides = dict(OVERRIDES, **{'train.checkpoint_every_steps': every})
  return [sys.executable, '-m', 'mer_jax.main', '--config', 'configs/default.py:tiny',
          '--workdir', str(workdir), '--verbosity=0'] + [
              f'--config.{k}={v}' for k, v in overrides.items()] + cache_args(cache_dir)


def cache_args(cache_dir) -> list[str]:
  """Points the trainer's own compilation cache (default: per workdir) at the shared one."""
  if 'compilation_cache_dir' not in default.get_config('tiny').train:
    return []
  return [f'--config.train.compilation_cache_dir={cache_dir}']


def subprocess_env(cache_dir, **extra) -> dict:
  return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', JAX_PLATFORMS='cpu',
              JAX_COMPILATION_CACHE_DIR=str(cache_dir),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1', **extra)


def run(args, env) -> tuple[subprocess.CompletedProcess, float]:
  t0 = time.time()
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=TIMEOUT)
  return proc, time.time() - t0


def results_of(workdir) -> dict:
  """results.json's per-stage results."""
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)['stages']


@pytest.fixture(scope='module')
def cache_dir(shared_compilation_cache):
  return shared_compilation_cache  # the session's (conftest.py)


@pytest.fixture(scope='module')
def plan(tmp_path_factory):
  """The reference run's workdir, config and checkpoint period (in steps; interrupted runs and
  periods that land on an epoch's end are test_preemption's)."""
  every = 5
  return {'workdir': tmp_path_factory.mktemp('reference'), 'every': every,
          'config': tiny_config(every)}


@pytest.fixture(scope='module')
def reference(plan, cache_dir):
  """The uninterrupted run every test compares with (compile traces logged)."""
  proc, seconds = run(run_args(plan['workdir'], plan['every'], cache_dir),
                      subprocess_env(cache_dir, JAX_LOG_COMPILES='1'))
  assert proc.returncode == 0, proc.stderr[-6000:]
  return {'workdir': str(plan['workdir']), 'seconds': seconds, 'stderr': proc.stderr,
          'results': results_of(plan['workdir'])}


def test_training_writes_results_reports_events_and_checkpoints(reference):
  workdir, results = reference['workdir'], reference['results']
  assert list(results) == list(STAGES)
  for stage in STAGES:
    for key in METRICS:
      assert 0.0 <= results[stage][key] <= 1.0, (stage, key)
    with open(os.path.join(workdir, 'reports', f'{stage}_test.json')) as f:
      report = json.load(f)
    assert report['weighted_f1'] == pytest.approx(results[stage]['test_weighted_f1'], abs=1e-9)
    assert os.path.getsize(os.path.join(workdir, 'reports', f'{stage}_test_confusion.png')) > 0
    assert glob.glob(os.path.join(workdir, 'tensorboard', stage, 'events.out.tfevents.*'))
    best = os.path.join(workdir, 'checkpoints', stage, 'best')
    assert [n for n in os.listdir(best) if n.isdigit()], best
    assert latest_steps(workdir, stage), stage
    assert all(seconds > 0 for seconds in results[stage]['compile_seconds'].values()), stage
  # The stacking folds run their stage's compiled initializer and steps.
  folds = re.findall(r'stage fold\d/\w+: train step lowered and compiled in ([\d.]+) s \(model '
                     r'initializer: ([\d.]+) s\)', reference['stderr'])
  assert len(folds) == 6 and all(float(x) == 0.0 for pair in folds for x in pair), folds


def test_steps_trace_once_per_stage_over_the_whole_run(reference):
  """Every stage traces its train step once and its stacking folds not at all (they run the
  stage's compiled step), and after a training's first epoch nothing traces again: later epochs'
  batches and dev evaluations reuse the compiled steps."""
  epoch_line = re.compile(r'stage (\S+) epoch (\d+): dev weighted F1')
  trace_line = re.compile(r'Finished tracing (train_step|predict_step) for jit')
  trainings, train_traces, late_traces = [], 0, []
  inside = None  # (training, epoch) while a training is between its first and last epoch
  for line in reference['stderr'].splitlines():
    if m := epoch_line.search(line):
      name, epoch = m.group(1), int(m.group(2))
      trainings += [name] if epoch == 1 else []
      inside = (name, epoch) if epoch < EPOCHS else None
    elif m := trace_line.search(line):
      train_traces += m.group(1) == 'train_step'
      if inside:
        late_traces.append((inside, m.group(1)))
  assert set(STAGES) <= set(trainings) and any(t.startswith('fold') for t in trainings), trainings
  assert train_traces == len(STAGES), (train_traces, trainings)
  # The students' and fusion's programs were compiled while earlier stages trained
  # (compile_ahead.start): each one's train step and eval program are traced once, maybe
  # inside an earlier training's epochs, and the stage's runner used them (the train-step
  # traces counted above are those compiles').
  compiled_ahead = ('audio', 'visual', 'fusion')
  ahead = [(where, fn) for where, fn in late_traces if where[0] != 'fusion']
  assert collections.Counter(fn for _, fn in ahead) <= collections.Counter(
      {'train_step': len(compiled_ahead), 'predict_step': len(compiled_ahead)}), ahead
  for stage in compiled_ahead:
    [line] = re.findall(rf'stage {stage}: train step lowered and compiled in .*',
                        reference['stderr'])
    assert line.endswith(', ahead of the stage'), line
  late_traces = [t for t in late_traces if t not in ahead]
  assert not late_traces, f'traced again after (training, epoch): {late_traces}'


def test_teacher_lr_was_reduced_on_plateau(reference, plan):
  state, meta = latest_checkpoint(reference['workdir'], 'teacher')
  factor = plan['config'].optim.teacher.lr_reduce_factor
  assert meta['finished'] and meta['loop']['epoch'] == EPOCHS
  np.testing.assert_allclose(float(state['lr_scale']), factor ** 2, rtol=1e-6)


def best_checkpoint(workdir, stage) -> tuple[int, dict]:
  """(step, metadata) of a stage's best checkpoint."""
  best = os.path.join(workdir, 'checkpoints', stage, 'best')
  [step] = [int(n) for n in os.listdir(best) if n.isdigit()]
  with open(os.path.join(best, str(step), 'meta', 'metadata')) as f:
    return step, json.load(f)


def test_results_record_version_commit_config_and_number_epochs_from_1(reference, plan):
  with open(os.path.join(reference['workdir'], 'results.json')) as f:
    run = json.load(f)
  assert run['mer_jax_version'] == '0.1.0'
  assert run['git_commit'] is None or re.fullmatch(r'[0-9a-f]{40}', run['git_commit'])
  assert run['config']['train']['epochs'] == EPOCHS
  assert run['config']['train']['checkpoint_every_steps'] == plan['every']
  assert run['config']['optim']['teacher']['grad_accum_steps'] == 2
  assert list(run['stages']) == list(STAGES)
  for stage, result in run['stages'].items():
    history = result['history']
    assert [h['epoch'] for h in history] == list(range(1, EPOCHS + 1)), stage
    # No epoch after the first improves by early_stopping_min_delta=1.0.
    assert result['best_epoch'] == 1, stage
    assert history[result['best_epoch'] - 1]['dev_weighted_f1'] == result['dev_weighted_f1']
    _, meta = latest_checkpoint(reference['workdir'], stage)
    assert meta['loop']['best_epoch'] == 1 and meta['loop']['history'] == history, stage
    assert best_checkpoint(reference['workdir'], stage)[1]['epoch'] == 1, stage


def test_tensorboard_has_learning_rates_config_hparams_and_test_metrics(reference, plan):
  workdir, results, config = reference['workdir'], reference['results'], plan['config']
  for stage in STAGES:
    logdir = os.path.join(workdir, 'tensorboard', stage)
    scalars = tb.scalars(logdir)
    cfg = config.optim[stage]
    groups = dict(cfg.lr_multipliers) if stage == 'fusion' else {'all': 1.0}
    assert {t for t in scalars if t.startswith('train/lr/')} == {f'train/lr/{g}' for g in groups}
    logged_steps = [s for s, _ in scalars['train/loss']]
    lr_scale = dict(scalars['train/lr_scale'])
    for group, multiplier in groups.items():
      lrs = scalars[f'train/lr/{group}']
      assert [s for s, _ in lrs] == logged_steps, (stage, group)
      for step, lr in lrs:  # the schedule (at most lr, and lr itself when constant), scaled
        bound = cfg.lr * lr_scale[step] * multiplier
        assert 0 <= lr <= bound * (1 + 1e-6), (stage, group, step)
        if cfg.schedule == 'constant':
          assert lr == pytest.approx(bound, rel=1e-6), (stage, group, step)
    if stage == 'teacher':  # cut once on plateau before the third epoch (and once after it)
      ratios = [lr / cfg.lr for _, lr in scalars['train/lr/all']]
      assert ratios[0] == pytest.approx(1.0, rel=1e-5)
      assert ratios[-1] == pytest.approx(cfg.lr_reduce_factor, rel=1e-5)
    best_step, _ = best_checkpoint(workdir, stage)
    for key in ('weighted_f1', 'macro_f1', 'accuracy'):
      logged = scalars[f'test/{key}']  # a rerun of the finished workdir logs them again
      assert {s for s, _ in logged} == {best_step}, (stage, key)
      for _, value in logged:
        assert value == pytest.approx(results[stage][f'test_{key}'], abs=1e-6), (stage, key)
    [text] = tb.texts(logdir)['config/text_summary']
    assert f'    seed: {config.seed}\n' in text and f'  epochs: {EPOCHS}\n' in text
    [hparams] = tb.hparams(logdir)
    assert hparams['stage'] == stage
    assert hparams[f'optim.{stage}.lr'] == pytest.approx(cfg.lr)


def test_rerun_of_a_finished_workdir_trains_nothing(reference, plan, cache_dir):
  workdir = reference['workdir']

  def files(sub):
    return sorted(glob.glob(os.path.join(workdir, sub, '**', '*'), recursive=True))

  before = {sub: files(sub) for sub in ('checkpoints', 'tensorboard')}
  proc, seconds = run(run_args(workdir, plan['every'], cache_dir),
                      subprocess_env(cache_dir, JAX_LOG_COMPILES='1'))
  assert proc.returncode == 0, proc.stderr[-6000:]
  for stage in STAGES:
    assert f'stage {stage}: already finished' in proc.stdout + proc.stderr, stage
  # No train step is even traced (finished fusion's is not compiled ahead).
  assert 'Finished tracing train_step' not in proc.stderr
  assert {sub: files(sub) for sub in before} == before
  again = results_of(workdir)
  for stage in STAGES:
    for key in METRICS:
      assert again[stage][key] == pytest.approx(reference['results'][stage][key], abs=1e-9)
  assert seconds < reference['seconds'], (seconds, reference['seconds'])


# --- prediction from the trained workdir --------------------------------------------------

@pytest.fixture(scope='module')
def dialogues(reference, plan, tmp_path_factory):
  """Two test-split dialogues (one with a missing modality) as predict's JSONL input."""
  config = plan['config']
  test = shards.DialogueShardSource(corpus.synthetic_dir(config, reference['workdir']), 'test',
                                    modalities=tuple(config.data.modalities))
  lengths = test.dialogue_lengths
  with_missing = next(i for i in range(len(test)) if lengths[i] >= 2 and not all(
      test[i].present[m].all() for m in config.data.modalities))
  other = next(i for i in range(len(test)) if i != with_missing and lengths[i] >= 2)
  chosen = [with_missing, other]
  path = tmp_path_factory.mktemp('predict') / 'dialogues.jsonl'
  with open(path, 'w', encoding='utf-8') as f:
    for i in chosen:
      r = test[i]
      utterances = [{
          'utterance_id': int(r.utterance_ids[j]), 'speaker': r.speakers[j],
          'text': r.transcripts[j],
          'features': {m: (r.features[m][j].tolist() if r.present[m][j] else None)
                       for m in config.data.modalities}} for j in range(len(r.labels))]
      f.write(json.dumps({'dialogue_id': r.dialogue_id, 'utterances': utterances}) + '\n')
  return {'path': str(path), 'indices': chosen, 'records': [test[i] for i in chosen],
          'source': test}


@pytest.fixture(scope='module')
def predictor(reference):
  return predict.Predictor(reference['workdir'])


def test_predict_cli_matches_the_in_process_predictor(reference, dialogues, predictor,
                                                      cache_dir, tmp_path):
  out = tmp_path / 'out.jsonl'
  proc, _ = run([sys.executable, '-m', 'mer_jax.predict', '--workdir', reference['workdir'],
                 '--input', dialogues['path'], '--output', str(out)], subprocess_env(cache_dir))
  assert proc.returncode == 0, proc.stderr[-6000:]
  num_utterances = sum(len(r.labels) for r in dialogues['records'])
  printed = proc.stdout.strip().splitlines()
  assert len(printed) == num_utterances, proc.stdout
  ids = [r.dialogue_id for r in dialogues['records']]
  assert [line.split('\t')[0] for line in printed] == [
      d for d, r in zip(ids, dialogues['records']) for _ in r.labels]
  with open(out, encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == num_utterances
  names = list(predictor.label_names)
  cli = np.asarray([[row['probabilities'][n] for n in names] for row in rows])
  np.testing.assert_allclose(cli.sum(-1), 1.0, atol=1e-5)
  assert [row['emotion'] for row in rows] == [names[k] for k in cli.argmax(-1)]

  records = predictor.read_jsonl(dialogues['path'])
  in_process = np.concatenate(predictor.probabilities(records))
  np.testing.assert_allclose(cli, in_process, atol=1e-5)


def trainer_test_predictions(config, models, source) -> dict[str, dict]:
  """What train_and_evaluate computes for its test reports, with the given (restored) models."""
  mesh = sharding.make_mesh(config)
  out = {}
  for stage in STAGES:
    stage_source = source
    if stage == 'fusion' and config.model.fusion.input == 'stacked':
      stage_source = sources.InMemorySource(stacking.stacked_records(
          source, stacking.encoder_log_probs(source, models, config, mesh)))
    out[stage] = inference.predict_split(
        stage_source, config, batch_contract.budget_from_config(config),
        inference.stage_predict_fn(stage, models[stage], config, models), mesh,
        dims=inference.batch_dims(stage, config))
  return out


def test_restored_models_reproduce_the_training_run_predictions(reference, plan, dialogues,
                                                                predictor):
  """save -> restore -> identical predictions: the trainer's own evaluation (predict_split on
  the test shards) with the models the Predictor restored from the best checkpoints reproduces
  the test reports written during training, and its fusion probabilities for the two dialogues
  equal the Predictor's on their JSONL form."""
  workdir = reference['workdir']
  assert set(predictor.models) == set(STAGES)
  preds = trainer_test_predictions(predictor.config, predictor.models, dialogues['source'])
  for stage, pred in preds.items():
    metrics = inference.split_metrics(pred, plan['config'].label_names)
    with open(os.path.join(workdir, 'reports', f'{stage}_test.json')) as f:
      report = json.load(f)
    assert np.asarray(metrics['confusion']).tolist() == report['confusion'], stage
    for key in METRICS:
      assert metrics[key[len('test_'):]] == pytest.approx(reference['results'][stage][key],
                                                         abs=1e-9), (stage, key)
  fusion = preds['fusion']
  expected = predictor.probabilities(predictor.read_jsonl(dialogues['path']))
  for index, want in zip(dialogues['indices'], expected):
    rows = np.flatnonzero(fusion['records'] == index)
    got = fusion['probs'][rows][np.argsort(fusion['utterances'][rows])]
    ids = dialogues['source'][index].utterance_ids
    np.testing.assert_allclose(got, want[np.argsort(ids)], atol=1e-5)


def test_predictor_reads_checkpoints_kept_outside_the_workdir(reference, dialogues, predictor,
                                                              tmp_path):
  """train.checkpoint_dir moves checkpoints/ (e.g. to gs://); predict --checkpoint_dir finds them
  there, and a workdir without them says where it looked."""
  moved = tmp_path / 'bucket' / 'run' / 'ckpts'
  shutil.copytree(os.path.join(reference['workdir'], 'checkpoints'), moved)
  empty_workdir = tmp_path / 'workdir'
  empty_workdir.mkdir()
  with pytest.raises(FileNotFoundError, match='no trained stage checkpoints'):
    predict.Predictor(str(empty_workdir))
  elsewhere = predict.Predictor(str(empty_workdir), checkpoint_dir=str(moved))
  assert elsewhere.stage == predictor.stage
  records = predictor.read_jsonl(dialogues['path'])
  np.testing.assert_array_equal(np.concatenate(elsewhere.probabilities(records)),
                                np.concatenate(predictor.probabilities(records)))
