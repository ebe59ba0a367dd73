"""launch/tpu.py --dry-run prints every gcloud command of a TPU run and runs none."""

import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(*args):
  return subprocess.run([sys.executable, 'launch/tpu.py', *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=60, env=dict(os.environ, PATH='/nonexistent'))


def commands(stdout):
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith('+ ')]


def test_dry_run_of_a_whole_queued_spot_run():
  proc = launch('all', '--name', 'mer', '--zone', 'us-east5-b', '--type', 'v6e-8', '--queued',
                '--spot', '--project', 'p1', '--config', 'configs/meld.py', '--workdir',
                '/tmp/w', '--sync', 'gs://bucket/run', '--dry-run', '--',
                '--config.data.shard_dir=/data/meld', '--config.train.epochs=3')
  # PATH points nowhere: a command that was run instead of printed would fail.
  assert proc.returncode == 0, proc.stderr
  cmds = commands(proc.stdout)
  scope = ['--zone=us-east5-b', '--project=p1']
  assert cmds[0] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'mer',
                     '--node-id=mer', *scope, '--accelerator-type=v6e-8',
                     '--runtime-version=v2-alpha-tpuv6e', '--spot']
  assert cmds[1][:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', 'mer']
  assert cmds[2][:2] == ['git', 'archive']
  assert cmds[3][:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert '--worker=all' in cmds[3] and '--worker=all' in cmds[4]
  assert 'pip install -q -e ".[tpu]"' in cmds[4][-1]
  train = cmds[5][-1]
  assert cmds[5][:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'] and '--worker=all' in cmds[5]
  assert ('python -m mer_jax.main --multihost --config configs/meld.py --workdir /tmp/w '
          '--config.data.shard_dir=/data/meld --config.train.epochs=3') in train
  assert 'gcloud storage rsync -r /tmp/w gs://bucket/run' in train
  assert cmds[6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'mer', *scope,
                     '--force', '--quiet']
  assert len(cmds) == 7
  assert [line for line in proc.stdout.splitlines() if line.startswith('# ')] == [
      '# up', '# install', '# run', '# down']


def test_run_step_detaches_the_job_and_streams_worker_0():
  proc = launch('run', '--name', 'mer', '--zone', 'z', '--type', 'v5litepod-8', '--dry-run')
  assert proc.returncode == 0, proc.stderr
  start, follow = commands(proc.stdout)
  assert start[-1].startswith('--command=nohup bash -c ') and start[-1].endswith('&')
  assert follow[-2:] == ['--worker=0', '--command=tail -n +1 -F ~/mer_jax_run.log']


def test_plain_vm_uses_the_runtime_of_its_type():
  for tpu_type, runtime in (('v5litepod-16', 'v2-alpha-tpuv5-lite'), ('v5p-8', 'v2-alpha-tpuv5')):
    proc = launch('up', '--name', 'n', '--zone', 'z', '--type', tpu_type, '--dry-run')
    assert proc.returncode == 0, proc.stderr
    assert commands(proc.stdout) == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'n',
                                      '--zone=z', f'--accelerator-type={tpu_type}',
                                      f'--version={runtime}']]


def test_bad_arguments_fail_with_a_message():
  proc = launch('up', '--name', 'n', '--zone', 'z', '--type', 'v4-8', '--dry-run')
  assert proc.returncode == 2 and 'unsupported TPU type' in proc.stderr
  proc = launch('run', '--name', 'n', '--zone', 'z', '--dry-run', '--', '--epochs=3')
  assert proc.returncode == 2 and 'only --config.<key>=<value>' in proc.stderr
  proc = launch('run', '--name', 'n', '--zone', 'z', '--sync', '/local', '--dry-run')
  assert proc.returncode == 2 and 'gs://' in proc.stderr
