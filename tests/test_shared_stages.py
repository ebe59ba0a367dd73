"""Encoder stages shared between runs (train.shared_stages_dir): fingerprints, locks, and that a
reused stage gives the same results as retraining it."""

import os
import sys
import threading
import time

from jax.interpreters import mlir
import numpy as np
import pytest

from configs import ablations
from configs import default
from mer_jax import models
from mer_jax.run import job
from mer_jax.experiments import runs
from mer_jax.train import cpu_backend
from mer_jax.train import fingerprints
from mer_jax.train import shared_stages

pytestmark = pytest.mark.slow


def variant(name: str, **overrides):
  config = ablations.apply_variant(default.get_config('tiny'), name)
  config.update_from_flattened_dict(overrides)
  return config


def fp(config, stage, deps=None, fold=None, data='d'):
  return shared_stages.fingerprint(config, stage, data, deps or {}, fold=fold)


def test_fingerprints_ignore_what_cannot_change_an_encoder_and_see_what_can():
  full = variant('full')
  teacher = fp(full, 'teacher')
  # Fusion-only ablations, and modality subsets that keep the text encoder, share the teacher.
  for name in ('no_gates', 'no_cross_attention', 'moe', 'fusion_raw', 'fusion_graph',
               'loss_poly_focal', 't', 't+a', 'no_distill'):
    assert fp(variant(name), 'teacher') == teacher, name
  # ... and the students when distillation is unchanged.
  for stage in ('audio', 'visual'):
    assert fp(variant('no_gates'), stage, {'teacher': teacher}) == fp(full, stage,
                                                                        {'teacher': teacher})
  # Students without distillation share between no_distill and the single-modality subsets.
  assert fp(variant('no_distill'), 'audio') == fp(variant('a'), 'audio')
  # Anything that changes how the teacher trains changes its fingerprint.
  changed = {'seed': 1, 'optim.teacher.lr': 0.0123, 'augment.t_noise_std': 0.2, 'graph.k.t': 3,
             'model.teacher.hidden': 12, 'batch.max_nodes': 64, 'loss.class_weights': 'none',
             'graph.scope': 'batch', 'train.epochs': 3, 'model.batchnorm_momentum': 0.5}
  for key, value in changed.items():
    assert fp(variant('full', **{key: value}), 'teacher') != teacher, key
  assert fp(full, 'teacher', data='other shards') != teacher
  assert fp(full, 'teacher', fold=0) != teacher != fp(full, 'teacher', fold=1)
  assert (fp(full, 'teacher', fold=0) !=
          fp(variant('full', **{'model.fusion.stacking_folds': 4}), 'teacher', fold=0))
  # Other modalities' settings do not touch the teacher; its distillation partner does touch
  # the students.
  assert fp(variant('full', **{'augment.a_noise_std': 0.5, 'graph.k.v': 2}), 'teacher') == teacher
  # How records are read (held in memory or not) is not what they are.
  assert fp(variant('full', **{'data.cache_mib': 0}), 'teacher') == teacher
  assert fp(full, 'audio', {'teacher': 'x'}) != fp(full, 'audio', {'teacher': 'y'})
  assert fp(variant('full', **{'loss.distill_alpha': 0.1}), 'teacher') == teacher
  # Where the students' teacher runs is a student setting (a new key: counted, not ignored).
  assert fp(variant('full', **{'loss.distill_cached_teacher': False}), 'teacher') == teacher
  assert (fp(variant('full', **{'loss.distill_cached_teacher': False}), 'audio',
             {'teacher': teacher}) != fp(full, 'audio', {'teacher': teacher}))
  assert (fp(variant('full', **{'loss.distill_alpha': 0.1}), 'audio', {'teacher': teacher}) !=
          fp(full, 'audio', {'teacher': teacher}))
  # A student reads the text's augmentation only through a teacher that sees augmented text.
  student = fp(full, 'audio', {'teacher': teacher})
  authors = variant('full', **{'augment.clean_frozen_inputs': False})
  assert fp(authors, 'teacher') == teacher
  assert fp(authors, 'audio', {'teacher': teacher}) != student
  assert fp(variant('full', **{'augment.t_noise_std': 0.2}), 'audio', {'teacher': teacher}) == student
  assert (fp(variant('full', **{'augment.clean_frozen_inputs': False, 'augment.t_noise_std': 0.2}),
             'audio', {'teacher': teacher}) != fp(authors, 'audio', {'teacher': teacher}))
  with pytest.raises(ValueError, match='only encoder stages'):
    fp(full, 'fusion')


def test_fingerprints_change_with_the_code(monkeypatch):
  full = variant('full')
  before = fp(full, 'teacher')
  monkeypatch.setattr(shared_stages, 'code_identity', lambda: 'edited')
  assert fp(full, 'teacher') != before


def test_acquire_waits_for_another_trainer_and_takes_over_a_dead_ones_lock(tmp_path):
  store = shared_stages.SharedStages(str(tmp_path / 'shared'), poll_seconds=0.05)
  assert store.acquire('teacher-a')  # free: this process trains it
  store.release('teacher-a')
  # A live holder (this process, as far as the lock says): wait until the stage is complete.
  with open(store.path('teacher-b') + '.lock', 'w') as f:
    f.write(f'{os.uname().nodename} {os.getpid()}')

  def finish():
    time.sleep(0.3)
    os.makedirs(store.path('teacher-b'))
    open(os.path.join(store.path('teacher-b'), shared_stages.COMPLETE), 'w').close()

  thread = threading.Thread(target=finish)
  thread.start()
  t0 = time.time()
  assert not store.acquire('teacher-b')  # complete: link it, do not train
  assert time.time() - t0 >= 0.25
  thread.join()
  # A holder that has ended (pid 2**22 + 1 is beyond Linux's pid range): the lock is taken over.
  with open(store.path('teacher-c') + '.lock', 'w') as f:
    f.write(f'{os.uname().nodename} {2 ** 22 + 1}')
  assert store.acquire('teacher-c')
  with open(store.path('teacher-c') + '.lock') as f:
    assert f.read() == f'{os.uname().nodename} {os.getpid()}'


def stage_results(workdir):
  return {s: {k: r[k] for k in ('test_weighted_f1', 'dev_weighted_f1', 'best_epoch')}
          for s, r in runs.load_results(workdir).items()}


# Fusion-only settings (not in any encoder's fingerprint) that shrink the tiny fusion model to the
# blocks the gates ablation touches, for both runs: its train step then compiles in about a third
# of the time. Fusion is never shared; here it only has to consume the stacked folds' outputs.
SMALL_FUSION = {'model.fusion.layers': 0, 'model.fusion.alignment': False,
                'model.fusion.cross_attention': False, 'model.fusion.linear_skip': False,
                'model.fusion.classifier_heads': 1, 'model.fusion.pool_queries': 1,
                'optim.fusion.grad_accum_steps': 1, 'optim.fusion.ema_decay': 0.0,
                'loss.use_uncertainty': False, 'loss.main_focal_share': 1.0,
                'loss.label_smoothing': 0.0}


@pytest.fixture(name='threefry_as_in_runs')
def fixture_threefry_as_in_runs():
  """Random draws lowered as `python -m mer_jax.main` lowers them on CPU (cpu_backend: the same
  bits; the model initializers compile several times faster, and the worker's compilation cache
  then serves these programs to the tests' subprocess runs); JAX's own rule is put back after."""
  if not cpu_backend.unroll_threefry_on_cpu():
    yield  # this JAX lacks the rules: the draws keep JAX's loop
    return
  module = next(sys.modules[name] for name in cpu_backend._THREEFRY_MODULES
                if hasattr(sys.modules.get(name), '_threefry2x32_cpu_lowering_rule'))
  yield
  mlir.register_lowering(module.threefry2x32_p, module._threefry2x32_cpu_lowering_rule,
                         platform='cpu')


@pytest.mark.usefixtures('threefry_as_in_runs')
def test_reused_stages_equal_retrained_ones(tmp_path):
  """full, then no_gates reusing full's encoders (and folds), equals no_gates trained alone."""
  common = {'data.modalities': ('t', 'a'), 'train.stages': ('teacher', 'audio', 'fusion'),
            'train.epochs': 1, 'model.fusion.stacking_folds': 2,
            'model.audio.layers': 1, 'eval.confusion_png': False,  # shorter compile, no plots
            'data.cache_dir': str(tmp_path / 'data'), **SMALL_FUSION}
  shared = {'train.shared_stages_dir': str(tmp_path / 'shared')}
  job.train_and_evaluate(variant('full', **common, **shared), str(tmp_path / 'full'))
  job.train_and_evaluate(variant('no_gates', **common, **shared), str(tmp_path / 'reused'))
  job.train_and_evaluate(variant('no_gates', **common), str(tmp_path / 'alone'))

  encoders = ('teacher', 'audio', 'fold0/teacher', 'fold0/audio', 'fold1/teacher', 'fold1/audio')
  for name in encoders:
    stage_dir = tmp_path / 'reused' / 'checkpoints' / name
    assert stage_dir.is_symlink(), name  # linked, not trained
    assert os.path.realpath(stage_dir) == os.path.realpath(tmp_path / 'full' / 'checkpoints' / name)
  assert not (tmp_path / 'reused' / 'checkpoints' / 'fusion').is_symlink()
  assert not (tmp_path / 'alone' / 'checkpoints' / 'teacher').is_symlink()
  published = sorted(os.listdir(tmp_path / 'shared'))
  assert len(published) == len(encoders) and not any(p.endswith('.lock') for p in published)

  reused, alone = stage_results(tmp_path / 'reused'), stage_results(tmp_path / 'alone')
  assert reused == alone
  assert stage_results(tmp_path / 'full')['teacher'] == alone['teacher']
  for stage in ('teacher', 'audio', 'fusion'):
    a = runs.load_test_predictions(str(tmp_path / 'reused'), stage)
    b = runs.load_test_predictions(str(tmp_path / 'alone'), stage)
    np.testing.assert_array_equal(a['probs'], b['probs'])


def test_fusion_records_its_parameter_layout():
  """A fusion stage trained before its blocks were stacked over modalities (its record has no
  parameter_layout) counts as trained with other settings, so a rerun is refused or retrains
  it instead of failing to restore."""
  settings = fingerprints.stage_settings(variant('full'), 'fusion')
  assert settings['parameter_layout'] == models.PARAMETER_LAYOUT['fusion'] == 2
  older = {k: v for k, v in settings.items() if k != 'parameter_layout'}
  assert fingerprints.changed_keys(older, settings) == {'parameter_layout': ('<absent>', 2)}
  assert 'parameter_layout' not in fingerprints.stage_settings(variant('full'), 'teacher')
