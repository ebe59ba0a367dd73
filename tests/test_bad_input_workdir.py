"""Workdir faults: a rerun with changed settings, a second run on the same workdir, stale locks,
unreadable stage records, a workdir that cannot be written. Each is refused with one message
before any work, and a refused run leaves the workdir's checkpoints and results as they were."""

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from configs import default
from mer_jax import errors
from mer_jax import locks
from mer_jax.run import job
from mer_jax.train import checkpointing
from mer_jax.train import fingerprints
from mer_jax.train import trainer

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEAD_PID = 2 ** 22 + 1  # beyond Linux's pid range: never a live process


def small(**overrides):
  config = default.get_config('tiny')
  config.data.synthetic.num_dialogues = {'train': 12, 'dev': 4, 'test': 4}
  config.data.synthetic.num_shards = {'train': 1, 'dev': 1, 'test': 1}
  config.train.stages = ('teacher', 'audio')
  config.data.modalities = ('t', 'a')
  config.model.fusion.input = 'raw'
  config.train.epochs = 1
  config.update_from_flattened_dict(overrides)
  return config


def tree_digest(folder) -> dict[str, str]:
  """sha256 of every file under `folder` (the compilation cache aside)."""
  out = {}
  for root, dirs, names in os.walk(folder):
    dirs[:] = [d for d in dirs if d != 'jax_cache']
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('workdir') / 'run')
  job.train_and_evaluate(small(), workdir)
  return workdir


@pytest.fixture
def workdir(trained, tmp_path):
  copy = str(tmp_path / 'run')
  shutil.copytree(trained, copy, symlinks=True)
  return copy


def refused(config, workdir, error=fingerprints.SettingsChanged, new_data=False) -> str:
  """The error of a run refused before any training; nothing it found was changed (with
  `new_data`, a corpus the new config asks for may have been added to the data cache)."""
  before = tree_digest(workdir)
  with pytest.raises(error) as e:
    job.train_and_evaluate(config, workdir)
  assert isinstance(e.value, errors.UserError)
  after = tree_digest(workdir)
  if new_data:
    after = {k: v for k, v in after.items() if k in before or not k.startswith('data' + os.sep)}
  assert after == before  # nothing written, removed or retrained
  return str(e.value)


def test_each_stage_records_what_determines_it(trained):
  ckpts = os.path.join(trained, 'checkpoints')
  records = fingerprints.plan(small(), os.path.join(trained, 'data', os.listdir(
      os.path.join(trained, 'data'))[0]))
  with open(os.path.join(trained, 'results.json')) as f:
    run = json.load(f)
  assert run['mer_jax_version'] == '0.1.0' and 'git_commit' in run
  results = run['stages']
  for stage in ('teacher', 'audio'):
    stored = fingerprints.read_record(ckpts, stage)
    assert stored['fingerprint'] == records[stage].fingerprint == results[stage]['fingerprint']
    assert results[stage]['settings'] == stored['settings']
    # Seconds of this run (0.0 for a program an earlier run in this process compiled; the
    # end-to-end test checks a fresh process's).
    compiled = results[stage]['compile_seconds']
    assert set(compiled) == {'initializer', 'train_step', 'eval_step'}
    assert all(isinstance(v, float) and v >= 0 for v in compiled.values()), compiled
  # The student depends on the teacher it distils from.
  assert fingerprints.read_record(ckpts, 'audio')['frozen'] == {
      'teacher': records['teacher'].fingerprint}


def test_changed_learning_rate_stops_before_any_work(workdir):
  message = refused(small(**{'optim.teacher.lr': 0.5, 'train.epochs': 2}), workdir)
  assert message == (
      f"{os.path.join(workdir, 'checkpoints')} holds stages trained with other settings: "
      "optim.teacher.lr 0.001 -> 0.5; train.epochs 1 -> 2. Invalidated stages: teacher, audio. "
      'Nothing was changed. Rerun with --config.train.on_change=retrain to retrain exactly '
      'these (the others are kept), or use a new --workdir.')


def test_a_student_setting_invalidates_only_the_student(workdir):
  message = refused(small(**{'loss.distill_alpha': 0.1}), workdir)
  assert 'loss.distill_alpha 0.5772777397767895 -> 0.1' in message
  assert 'Invalidated stages: audio.' in message


def test_changed_training_data_is_a_changed_setting(workdir):
  message = refused(small(**{'data.synthetic.seed': 99}), workdir, new_data=True)
  assert "training/dev data (manifest)" in message and 'Invalidated stages: teacher, audio' in (
      message)


def test_retrain_on_change_retrains_exactly_the_invalidated_stages(workdir):
  before = tree_digest(os.path.join(workdir, 'checkpoints', 'teacher'))
  config = small(**{'optim.audio.lr': 0.01, 'train.on_change': 'retrain'})
  results = job.train_and_evaluate(config, workdir)
  assert tree_digest(os.path.join(workdir, 'checkpoints', 'teacher')) == before  # kept
  ckpts = os.path.join(workdir, 'checkpoints')
  record = fingerprints.plan(config, records_dir(workdir))
  assert fingerprints.read_record(ckpts, 'audio')['fingerprint'] == record['audio'].fingerprint
  assert results['audio']['settings']['optim']['audio']['lr'] == 0.01
  assert not os.path.exists(os.path.join(ckpts, 'audio.replaced'))


def records_dir(workdir):
  data = os.path.join(workdir, 'data')
  return os.path.join(data, os.listdir(data)[0])


def test_evaluation_only_change_reevaluates_without_retraining(workdir, capsys):
  config = small(**{'data.test_split': 'dev'})
  ckpts = os.path.join(workdir, 'checkpoints')
  records = fingerprints.plan(config, records_dir(workdir))
  assert fingerprints.check_workdir(records, ckpts, 'error') == []
  out = capsys.readouterr().out
  assert ("stage teacher: evaluation settings changed (data.test_split 'test' -> 'dev'; test "
          "data '") in out and 're-evaluating without retraining' in out
  assert fingerprints.read_record(ckpts, 'teacher')['evaluation']['data.test_split'] == 'dev'


def test_stage_trained_by_an_earlier_version_is_kept_and_recorded(workdir, capsys):
  ckpts = os.path.join(workdir, 'checkpoints')
  os.remove(os.path.join(ckpts, 'teacher', fingerprints.RECORD_NAME))
  records = fingerprints.plan(small(), records_dir(workdir))
  assert fingerprints.check_workdir(records, ckpts, 'error') == []
  assert 'stage teacher: ' in capsys.readouterr().out
  assert fingerprints.read_record(ckpts, 'teacher') == records['teacher'].to_json()


def test_unreadable_stage_record_names_the_file(workdir):
  path = os.path.join(workdir, 'checkpoints', 'teacher', fingerprints.RECORD_NAME)
  with open(path, 'w') as f:
    f.write('{"fingerprint": ')
  message = refused(small(), workdir)
  assert message.startswith(f'{path}: unreadable stage record (')
  assert message.endswith(f'remove the stage folder {os.path.dirname(path)} to train it again')


def test_second_run_on_a_held_workdir_names_the_holder(workdir):
  lock = os.path.join(workdir, job.LOCK_NAME)
  with open(lock, 'w') as f:
    f.write(f'{socket.gethostname()} {os.getpid()}')  # this live process holds it
  message = refused(small(), workdir, locks.LockHeld)
  assert message == (f'workdir {workdir} is in use by process {os.getpid()} on host '
                     f'{socket.gethostname()} (lock file {lock}); wait for it to end, or remove '
                     'the lock file if that process is gone')


def test_lock_of_another_host_is_respected(tmp_path):
  lock = str(tmp_path / 'run.lock')
  with open(lock, 'w') as f:
    f.write(f'elsewhere-{socket.gethostname()} {DEAD_PID}')
  with pytest.raises(locks.LockHeld, match=f'process {DEAD_PID} on host elsewhere-'):
    with locks.held(lock, 'workdir w'):
      pass


def test_stale_lock_of_a_dead_process_is_cleared_with_a_message(tmp_path, capsys):
  lock = str(tmp_path / 'run.lock')
  with open(lock, 'w') as f:
    f.write(f'{socket.gethostname()} {DEAD_PID}')
  with locks.held(lock, 'workdir w'):
    with open(lock) as f:
      assert f.read() == f'{socket.gethostname()} {os.getpid()}'
  assert not os.path.exists(lock)  # released at the end of the block
  assert (f'workdir w: clearing a stale lock {lock} (process {DEAD_PID} on '
          f'{socket.gethostname()} has ended)') in capsys.readouterr().out


def test_lock_is_released_when_the_run_fails(tmp_path):
  lock = str(tmp_path / 'run.lock')
  with pytest.raises(RuntimeError):
    with locks.held(lock, 'workdir w'):
      raise RuntimeError('boom')
  assert not os.path.exists(lock)


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / 'not_a_folder'
  path.write_text('user data')
  with pytest.raises(errors.UserError) as e:
    job.train_and_evaluate(small(), str(path))
  assert str(e.value).startswith(f'workdir {path}: cannot be written (')
  assert path.read_text() == 'user data'


def test_cli_second_run_exits_2_with_one_line(workdir):
  lock = os.path.join(workdir, job.LOCK_NAME)
  with open(lock, 'w') as f:
    f.write(f'{socket.gethostname()} {os.getppid()}')  # pytest's parent: alive
  proc = subprocess.run(
      [sys.executable, '-m', 'mer_jax.main', '--config', 'configs/default.py:tiny',
       '--workdir', workdir], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr == (f'error: workdir {workdir} is in use by process {os.getppid()} on host '
                         f'{socket.gethostname()} (lock file {lock}); wait for it to end, or '
                         'remove the lock file if that process is gone\n')


def test_stage_checkpoints_elsewhere_are_checked_too(trained, tmp_path):
  """train.checkpoint_dir outside the workdir: the records travel with the checkpoints."""
  moved = str(tmp_path / 'ckpts')
  shutil.copytree(os.path.join(trained, 'checkpoints'), moved)
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns('checkpoints'))
  config = small(**{'train.checkpoint_dir': moved, 'optim.teacher.lr': 0.2})
  assert checkpointing.checkpoint_dir(config, workdir) == moved
  message = refused(config, workdir)
  assert message.startswith(f'{moved} holds stages trained with other settings: '
                            'optim.teacher.lr 0.001 -> 0.2.')


def test_full_disk_while_writing_results_or_a_record_keeps_the_old_files(workdir, monkeypatch):
  results = os.path.join(workdir, 'results.json')
  record = os.path.join(workdir, 'checkpoints', 'teacher', fingerprints.RECORD_NAME)
  before = tree_digest(workdir)

  def dump(obj, f, **kwargs):
    f.write('{"partial": ')
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(json, 'dump', dump)
  with pytest.raises(OSError, match='No space left on device'):
    trainer.save_results({'teacher': {'test_weighted_f1': 0.0}}, workdir, small())
  records = fingerprints.plan(small(**{'optim.teacher.lr': 0.5}), records_dir(workdir))
  with pytest.raises(OSError, match='No space left on device'):
    fingerprints.write_record(os.path.join(workdir, 'checkpoints'), records['teacher'])
  assert tree_digest(workdir) == before  # old results and record intact, no temporary files
  assert os.path.exists(results) and os.path.exists(record)


def test_retrain_removes_a_changed_stage_and_its_dependants_only(workdir, capsys):
  ckpts = os.path.join(workdir, 'checkpoints')
  records = fingerprints.plan(small(**{'model.teacher.dropout': 0.3}), records_dir(workdir))
  assert fingerprints.check_workdir(records, ckpts, 'retrain') == ['teacher', 'audio']
  out = capsys.readouterr().out
  assert 'stage teacher: settings changed (model.teacher.dropout 0.15 -> 0.3); retraining it' in out
  assert ('stage audio: settings changed (frozen stages it depends on changed: teacher); '
          'retraining it') in out
  assert not os.path.exists(os.path.join(ckpts, 'teacher'))
  assert not os.path.exists(os.path.join(ckpts, 'audio'))
  assert sorted(os.listdir(ckpts)) == []  # nothing half-removed left beside them
