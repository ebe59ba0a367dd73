"""Multi-seed summaries, run alignment, ablation configs, the results page and failing runs.

The runs here are written by hand (results.json, reports, predictions as the trainer writes
them), so every summarised number is known; tests/test_sweep.py trains real runs.
"""

import os
import sys

import ml_collections
import numpy as np
import pytest

from configs import ablations
from configs import default
from configs import meld_text_ablations
from mer_jax import evaluate
from mer_jax.config_validation import validate_config
from mer_jax.experiments import compare
from mer_jax.experiments import report
from mer_jax.experiments import runs
from mer_jax.experiments import seeds
from mer_jax.experiments import significance
from mer_jax.experiments import sweep
from mer_jax.train import trainer

NAMES = ('neutral', 'joy', 'anger')


def fake_run(workdir, labels, preds_by_stage, order_seed=0):
  """A finished run: test predictions (in a shuffled order), reports and results.json."""
  os.makedirs(workdir, exist_ok=True)
  results = {}
  rng = np.random.default_rng(order_seed)
  for stage, preds in preds_by_stage.items():
    n = labels.size
    order = rng.permutation(n)
    probs = np.eye(len(NAMES), dtype=np.float32)[preds]
    trainer.save_test_predictions(
        {'probs': probs[order], 'labels': labels[order],
         'records': (np.arange(n) // 4)[order], 'utterances': (np.arange(n) % 4)[order]},
        workdir, stage)
    metrics = evaluate.classification_metrics(labels, preds, NAMES)
    evaluate.write_report(metrics, os.path.join(workdir, 'reports'), f'{stage}_test', png=False)
    results[stage] = {'test_weighted_f1': metrics['weighted_f1'], 'dev_weighted_f1': 0.5,
                      'best_epoch': 2, 'seconds': 1.0,
                      'history': [{'epoch': 1, 'dev_weighted_f1': 0.4},
                                  {'epoch': 2, 'dev_weighted_f1': 0.5}]}
  trainer.save_results(results, workdir, ml_collections.ConfigDict({'seed': order_seed}))


@pytest.fixture(name='two_systems')
def fixture_two_systems(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 40)
  systems = {}
  for name, accuracy in (('ref', 0.5), ('better', 0.8)):
    preds = []
    for s in range(3):
      p = np.where(rng.random(40) < accuracy, labels, rng.integers(0, 3, 40))
      teacher = np.where(rng.random(40) < 0.4, labels, rng.integers(0, 3, 40))
      fake_run(str(tmp_path / name / f'seed_{s}'), labels, {'teacher': teacher, 'fusion': p},
               order_seed=s)
      preds.append(p)
    systems[name] = np.stack(preds)
  return tmp_path, labels, systems


def test_seed_runs_and_alignment(two_systems):
  root, labels, systems = two_systems
  workdirs = runs.seed_runs(str(root / 'ref'))
  assert [os.path.basename(w) for w in workdirs] == ['seed_0', 'seed_1', 'seed_2']
  assert runs.seed_runs(workdirs[1]) == [workdirs[1]]
  aligned_labels, preds = runs.aligned_predictions(workdirs, 'fusion')
  np.testing.assert_array_equal(aligned_labels, labels)  # sorted back by (record, utterance)
  np.testing.assert_array_equal(preds, systems['ref'])
  assert runs.headline_stage(workdirs[0]) == 'fusion'
  with pytest.raises(runs.RunError, match='no finished run'):
    runs.seed_runs(str(root))


def test_alignment_refuses_runs_on_other_utterances(two_systems, tmp_path):
  root, labels, _ = two_systems
  other = tmp_path / 'other'
  fake_run(str(other), labels[:36], {'fusion': labels[:36]})
  with pytest.raises(runs.RunError, match='other utterances'):
    runs.aligned_predictions([str(root / 'ref' / 'seed_0'), str(other)], 'fusion')
  relabelled = tmp_path / 'relabelled'
  fake_run(str(relabelled), (labels + 1) % 3, {'fusion': labels})
  with pytest.raises(runs.RunError, match='other test labels'):
    runs.aligned_predictions([str(root / 'ref' / 'seed_0'), str(relabelled)], 'fusion')
  with pytest.raises(runs.RunError, match='saved no test predictions'):
    runs.load_test_predictions(str(other), 'teacher')


def test_unlabelled_utterances_are_left_out_of_comparisons(tmp_path):
  labels = np.array([0, 1, -1, 2, 1, 0, -1, 2])
  preds = np.array([0, 1, 2, 2, 0, 0, 1, 2])
  fake_run(str(tmp_path / 'run'), labels, {'fusion': np.clip(preds, 0, 2)})
  kept_labels, kept = runs.aligned_predictions([str(tmp_path / 'run')], 'fusion')
  np.testing.assert_array_equal(kept_labels, labels[labels >= 0])
  np.testing.assert_array_equal(kept[0], preds[labels >= 0])


def test_summary_mean_and_sd_by_hand(two_systems):
  root, labels, systems = two_systems
  summary = seeds.summarize(str(root / 'better'))
  assert summary['headline_stage'] == 'fusion' and list(summary['stages']) == ['teacher', 'fusion']
  per_seed = [evaluate.classification_metrics(labels, p, NAMES) for p in systems['better']]
  fusion = summary['stages']['fusion']
  for key in ('weighted_f1', 'macro_f1', 'accuracy'):
    values = [m[key] for m in per_seed]
    assert fusion[key]['mean'] == pytest.approx(np.mean(values))
    assert fusion[key]['sd'] == pytest.approx(np.std(values, ddof=1))
  assert fusion['per_class_f1']['joy']['mean'] == pytest.approx(
      np.mean([m['per_class']['joy']['f1'] for m in per_seed]))
  np.testing.assert_array_equal(fusion['confusion_sum'],
                                np.sum([m['confusion'] for m in per_seed], axis=0))
  text = seeds.format_summary(summary, 'better')
  assert f'{100 * fusion["weighted_f1"]["mean"]:.2f} ± {100 * fusion["weighted_f1"]["sd"]:.2f}' in text
  assert text.count('| seed_') == 6  # 3 seeds x 2 stages
  one = seeds.summarize(str(root / 'better' / 'seed_0'))['stages']['fusion']['weighted_f1']
  assert one == {'mean': per_seed[0]['weighted_f1'], 'sd': None}
  assert seeds.pct(one) == f'{100 * per_seed[0]["weighted_f1"]:.2f}'


def test_compare_paths_matches_significance(two_systems):
  root, labels, systems = two_systems
  result = compare.compare_paths(str(root / 'better'), str(root / 'ref'), samples=300)
  direct = significance.paired_bootstrap(labels, systems['better'], systems['ref'], 3,
                                         samples=300)
  assert result['weighted_f1']['difference'] == pytest.approx(direct.difference)
  assert result['weighted_f1']['ci_low'] == pytest.approx(direct.ci_low)
  assert result['weighted_f1']['ci_high'] == pytest.approx(direct.ci_high)
  assert result['weighted_f1']['difference'] > 0 and result['accuracy']['ci_low'] > 0
  teacher = compare.compare_paths(str(root / 'better'), str(root / 'ref'), stage='teacher',
                                  samples=100)
  assert teacher['accuracy']['stages'] == ('teacher', 'teacher')


def test_results_page(two_systems):
  root, _, _ = two_systems
  summaries = {name: seeds.summarize(str(root / name)) for name in ('ref', 'better')}
  comparison = compare.compare_paths(str(root / 'better'), str(root / 'ref'),
                                     samples=100)['weighted_f1']
  comparison['p_randomization'] = 0.25
  out = root / 'report'
  paths = report.write_report(str(out), 'Fake sweep', 'ref', summaries,
                              {'better': comparison}, ['a note'])
  markdown = open(paths['markdown']).read()
  page = open(paths['html']).read()
  delta = (f'{100 * comparison["difference"]:+.2f} [{100 * comparison["ci_low"]:+.2f}, '
           f'{100 * comparison["ci_high"]:+.2f}]')
  assert delta in markdown and delta in page
  assert '| ref | fusion | 3 |' in markdown and '(reference)' in page
  assert 'a note' in page and '<table>' in page
  for name in ('ref', 'better'):
    for kind in ('confusion', 'curves'):
      png = out / f'{kind}_{name}.png'
      assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
      assert f'{kind}_{name}.png' in markdown


def test_every_ablation_is_a_valid_config_that_changes_what_it_names():
  full = ablations.get_config('full,tiny')
  validate_config(full)
  assert full.to_dict() == default.get_config('tiny').to_dict()
  expected = {
      'no_distill': {'loss.distill': False},
      'no_cross_attention': {'model.fusion.cross_attention': False},
      'no_gates': {'model.fusion.gates': False},
      'moe': {'model.fusion.use_moe': True},
      'a+v': {'data.modalities': ('a', 'v'), 'train.stages': ('audio', 'visual', 'fusion'),
              'loss.distill': False},
      't+v': {'data.modalities': ('t', 'v'), 'train.stages': ('teacher', 'visual', 'fusion')},
      'scope_batch': {'graph.scope': 'batch'},
      'fusion_raw': {'model.fusion.input': 'raw'},
      'two_folds': {'model.fusion.stacking_folds': 2},
      'loss_ce': {'loss.class_weights': 'none', 'loss.poly_alpha': 0.0,
                  'loss.main_focal_share': 0.0, 'loss.use_uncertainty': False},
  }
  flat_full = flatten(full.to_dict())
  for variant in ablations.VARIANTS:
    config = ablations.get_config(f'{variant},tiny')
    validate_config(config)
    flat = flatten(config.to_dict())
    changed = {k for k in flat if flat[k] != flat_full[k]}
    if variant == 'full':
      assert not changed
      continue
    assert changed, variant
    for key, value in expected.get(variant, {}).items():
      assert flat[key] == value, (variant, key)
  for variant in meld_text_ablations.VARIANTS:
    validate_config(meld_text_ablations.get_config(variant))
  with pytest.raises(ValueError, match='unknown ablation'):
    ablations.get_config('no_such_thing')


def flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = tuple(v) if isinstance(v, list) else v
  return out


def test_failed_runs_are_reported_with_their_logs(tmp_path):
  ok = tmp_path / 'done'
  fake_run(str(ok), np.array([0, 1]), {'fusion': np.array([0, 1])})
  jobs = [seeds.Job('configs/ablations.py:no_such_variant', str(tmp_path / 'bad'), 0),
          seeds.Job('configs/ablations.py:full', str(ok), 0)]  # finished: not run again
  with pytest.raises(RuntimeError, match=r'1 of 2 runs failed: .*bad .*run\.log'):
    seeds.run_jobs(jobs, parallel=2, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                   poll_seconds=0.1)
  assert 'no_such_variant' in (tmp_path / 'bad' / 'run.log').read_text()
  assert not (ok / 'run.log').exists()
  [attempt] = seeds.load_attempts(str(tmp_path / 'bad'))
  assert attempt['returncode'] != 0
  assert 0 < attempt['cpu_seconds'] and 0 < attempt['wall_seconds'] < 300
  assert seeds.load_attempts(str(ok)) is None


def test_run_time_sums_every_attempt_and_counts_untimed_runs(tmp_path):
  resumed, once, untimed = (str(tmp_path / n) for n in ('resumed', 'once', 'untimed'))
  for workdir in (resumed, once, untimed):
    os.makedirs(workdir)
  seeds.record_attempt(resumed, 100.0, 150.5, -9)  # killed, then resumed
  seeds.record_attempt(resumed, 20.0, 30.25, 0)
  seeds.record_attempt(once, 7.5, 12.0, 0)
  total = seeds.total_run_time([resumed, once, untimed])
  assert total == {'runs': 3, 'untimed': 1, 'attempts': 3, 'wall_seconds': 127.5,
                   'cpu_seconds': 192.75}
  text = seeds.format_run_time(total)
  assert '128 s wall' in text and '193 s CPU' in text and '1 run(s) have no timing' in text
  assert 'none of the 1 runs' in seeds.format_run_time(seeds.total_run_time([untimed]))
  (tmp_path / 'once' / seeds.RUN_TIMES).write_text('[{"wall')
  with pytest.raises(runs.RunError, match='once/run_times.json is not valid JSON'):
    seeds.total_run_time([once])


def test_command_lines():
  job = seeds.Job('configs/default.py:tiny', '/w/seed_3', 3, ('--config.train.epochs=1',))
  assert job.command() == [sys.executable, '-m', 'mer_jax.main', '--config',
                           'configs/default.py:tiny', '--workdir', '/w/seed_3',
                           '--config.seed=3', '--config.train.epochs=1']
  with pytest.raises(ValueError, match='only --config'):
    seeds.check_overrides(['--epochs=3'])
  assert seeds.with_shared_cache((), '/w') == ('--config.data.cache_dir=/w/data',
                                                '--config.train.compilation_cache_dir=/w/jax_cache')
  mine = ('--config.data.cache_dir=/elsewhere', '--config.train.compilation_cache_dir=off')
  assert seeds.with_shared_cache(mine, '/w') == mine


def test_report_of_an_unfinished_sweep_lists_what_is_missing(two_systems):
  root, _, _ = two_systems
  definition = {'title': 't', 'reference': 'ref', 'variants': {
      'ref': 'configs/ablations.py:full', 'better': 'configs/ablations.py:moe',
      'later': 'configs/ablations.py:no_gates'}}
  with pytest.raises(runs.RunError, match='no finished run'):
    sweep.summarize_sweep(definition, definition['variants'], str(root), bootstrap_samples=50)
  result = sweep.summarize_sweep(definition, definition['variants'], str(root),
                                 bootstrap_samples=50, allow_missing=True)
  assert result['missing'] == ['later']
  assert list(result['summaries']) == ['ref', 'better'] and list(result['comparisons']) == ['better']
  definition['reference'] = 'later'
  with pytest.raises(runs.RunError):
    sweep.summarize_sweep(definition, definition['variants'], str(root), bootstrap_samples=50,
                          allow_missing=True)
