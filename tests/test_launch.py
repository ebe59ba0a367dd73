"""launch/tpu.py: --dry-run prints every gcloud command and runs none; `all` polls a detached job
and always deletes the VM (a fake runner plays gcloud); the remote shell side runs here under a
temporary $HOME; launch/mirror.py copies a workdir while a job runs; local_multidevice.sh."""

import importlib.util
import os
import shlex
import signal
import stat
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = '"$HOME"/mer_jax_run'
ACTIVATE = 'cd "$HOME"/mer_jax && . "$HOME"/mer_jax_venv/bin/activate && '
DOWN = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'mer', '--zone=z', '--quiet']


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'launch', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


tpu = _load('tpu')
mirror = _load('mirror')


def launch(*args, home='/home/tester'):
  # PATH points nowhere: a command that was run instead of printed would fail.
  return subprocess.run([sys.executable, 'launch/tpu.py', *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=60,
                        env=dict(os.environ, PATH='/nonexistent', HOME=home))


def commands(stdout):
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith('+ ')]


def ssh(command, worker='all', scope=('--zone=z',)):
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'mer', *scope, f'--worker={worker}',
          f'--command={command}']


def detached(script, name):
  wrapped = (f'{script}; echo $? > {RUN}/{name}.status.tmp; '
             f'mv {RUN}/{name}.status.tmp {RUN}/{name}.status')
  return (f'setsid nohup bash -c {shlex.quote(wrapped)} > {RUN}/{name}.log 2>&1 < /dev/null '
          f'& echo $! > {RUN}/{name}.pid')


def start(main_args):
  return (f'if kill -0 "$(cat {RUN}/job.pid 2>/dev/null)" 2>/dev/null; then '
          f'echo "a mer_jax job is still running on $(hostname); see {RUN}/job.log" >&2; '
          f'exit 3; fi; mkdir -p {RUN}; rm -f {RUN}/job.status {RUN}/mirror.status '
          f'{RUN}/mirror.pid; '
          + detached(ACTIVATE + 'python -m mer_jax.main --multihost ' + main_args, 'job'))


def probe(name):
  return (f'cat {RUN}/{name}.status 2>/dev/null || {{ kill -0 "$(cat {RUN}/{name}.pid '
          f'2>/dev/null)" 2>/dev/null && echo running; }} || cat {RUN}/{name}.status '
          f'2>/dev/null || echo lost')


def polls(scope=('--zone=z',)):
  return [ssh(f'echo "mer_jax_job $({probe("job")})"', scope=scope),
          ssh(f'echo "mer_jax_mirror $({probe("mirror")})"; tail -c +1 {RUN}/job.log '
              '2>/dev/null || true', worker='0', scope=scope)]


def test_dry_run_of_a_whole_queued_spot_run_with_sync():
  proc = launch('all', '--name', 'mer', '--zone', 'us-east5-b', '--type', 'v6e-8', '--queued',
                '--spot', '--project', 'p1', '--config', 'configs/meld.py', '--workdir',
                '/tmp/w', '--sync', 'gs://bucket/run', '--dry-run', '--',
                '--config.data.shard_dir=/data/meld', '--config.train.epochs=3')
  assert proc.returncode == 0, proc.stderr
  scope = ('--zone=us-east5-b', '--project=p1')
  venv = '"$HOME"/mer_jax_venv'
  assert commands(proc.stdout) == [
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'mer', '--node-id=mer', *scope,
       '--accelerator-type=v6e-8', '--runtime-version=v2-alpha-tpuv6e', '--spot'],
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', 'mer', *scope,
       '--format=value(state.state)'],
      ['git', 'archive', '--format=tar.gz', '--output=/tmp/mer_jax_src.tar.gz', 'HEAD'],
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', '/tmp/mer_jax_src.tar.gz', 'mer:~/', *scope,
       '--worker=all'],
      ssh('mkdir -p "$HOME"/mer_jax && tar -xzf "$HOME"/mer_jax_src.tar.gz -C "$HOME"/mer_jax && '
          f'{{ python3 -m venv {venv} || {{ sudo apt-get update -qq && sudo apt-get install -y '
          f'-qq python3-venv && python3 -m venv {venv}; }}; }} && . {venv}/bin/activate && '
          'pip install -q --upgrade pip && cd "$HOME"/mer_jax && pip install -q -e ".[tpu]"',
          scope=scope),
      # --sync: the VM path stays the trainer's workdir, checkpoints go to gs:// directly.
      ssh(start('--config configs/meld.py --workdir /tmp/w --config.data.shard_dir=/data/meld '
                '--config.train.epochs=3 '
                '--config.train.checkpoint_dir=gs://bucket/run/checkpoints'), scope=scope),
      ssh(detached(ACTIVATE + 'python launch/mirror.py --src /tmp/w --dst gs://bucket/run '
                   '--until "$HOME"/mer_jax_run/job.status --every 60 '
                   '--extra "$HOME"/mer_jax_run/job.log', 'mirror'), worker='0', scope=scope),
      *polls(scope),
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'mer', *scope, '--force',
       '--quiet']]
  assert [line for line in proc.stdout.splitlines() if line.startswith('# ')][:4] == [
      '# up', '# repeated until ACTIVE:', '# install', '# run']


def test_tilde_workdir_is_expanded_on_the_vm():
  proc = launch('run', '--name', 'mer', '--zone', 'z', '--workdir', '~/mer meld', '--dry-run',
                '--', '--config.data.shard_dir=~/shards')
  assert proc.returncode == 0, proc.stderr
  assert commands(proc.stdout) == [
      ssh(start('--config configs/default.py --workdir "$HOME"/\'mer meld\' '
                '--config.data.shard_dir="$HOME"/shards')),
      *polls()]


def test_workdir_expanded_by_the_local_shell_goes_back_to_the_vm_home():
  # `--workdir ~/mer_meld` unquoted reaches us as this machine's home (HOME=/home/tester here).
  proc = launch('run', '--name', 'mer', '--zone', 'z', '--workdir', '/home/tester/mer_meld',
                '--no-follow', '--dry-run')
  assert proc.returncode == 0, proc.stderr
  assert commands(proc.stdout) == [
      ssh(start('--config configs/default.py --workdir "$HOME"/mer_meld'))]
  assert 'using ~/mer_meld on the VM' in proc.stderr


def test_gcs_workdir_sends_checkpoints_there_and_mirrors_the_rest_while_running():
  proc = launch('run', '--name', 'mer', '--zone', 'z', '--workdir', 'gs://b/run/',
                '--local_workdir', '~/scratch', '--sync_seconds', '30', '--no-follow',
                '--dry-run')
  assert proc.returncode == 0, proc.stderr
  assert commands(proc.stdout) == [
      ssh(start('--config configs/default.py --workdir "$HOME"/scratch '
                '--config.train.checkpoint_dir=gs://b/run/checkpoints')),
      ssh(detached(ACTIVATE + 'python launch/mirror.py --src "$HOME"/scratch --dst gs://b/run/ '
                   '--until "$HOME"/mer_jax_run/job.status --every 30 '
                   '--extra "$HOME"/mer_jax_run/job.log', 'mirror'), worker='0')]
  # A checkpoint_dir of the user's own is kept, not doubled.
  proc = launch('run', '--name', 'mer', '--zone', 'z', '--workdir', 'gs://b/run', '--no-follow',
                '--dry-run', '--', '--config.train.checkpoint_dir=gs://b/ckpt')
  assert commands(proc.stdout)[0] == ssh(start(
      '--config configs/default.py --workdir "$HOME"/mer_jax_workdir '
      '--config.train.checkpoint_dir=gs://b/ckpt'))


def test_v4_and_the_other_types_get_their_runtime():
  for tpu_type, runtime in (('v4-8', 'tpu-ubuntu2204-base'), ('v4-32', 'tpu-ubuntu2204-base'),
                            ('v5litepod-16', 'v2-alpha-tpuv5-lite'), ('v5p-8', 'v2-alpha-tpuv5'),
                            ('v6e-8', 'v2-alpha-tpuv6e')):
    proc = launch('up', '--name', 'n', '--zone', 'z', '--type', tpu_type, '--dry-run')
    assert proc.returncode == 0, proc.stderr
    assert commands(proc.stdout) == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'n',
                                      '--zone=z', f'--accelerator-type={tpu_type}',
                                      f'--version={runtime}']]


def test_keep_vm_skips_down_and_says_how_to_delete():
  proc = launch('all', '--name', 'mer', '--zone', 'z', '--type', 'v4-16', '--keep_vm',
                '--dry-run')
  assert proc.returncode == 0, proc.stderr
  cmds = commands(proc.stdout)
  assert cmds[0][-2:] == ['--accelerator-type=v4-16', '--version=tpu-ubuntu2204-base']
  assert cmds[-2:] == polls() and DOWN not in cmds
  assert 'python launch/tpu.py down --name mer --zone=z' in proc.stdout
  # --no-follow would let `down` delete a running job: `all` always waits.
  proc = launch('all', '--name', 'mer', '--zone', 'z', '--no-follow', '--dry-run')
  assert commands(proc.stdout)[-3:] == [*polls(), DOWN]


def test_run_step_detaches_the_job_and_logs_follow_worker_0():
  proc = launch('logs', '--name', 'mer', '--zone', 'z', '--dry-run')
  assert commands(proc.stdout) == [ssh(f'tail -n +1 -F {RUN}/job.log', worker='0')]


def test_bad_arguments_fail_with_a_message():
  proc = launch('up', '--name', 'n', '--zone', 'z', '--type', 'v3-8', '--dry-run')
  assert proc.returncode == 2 and 'unsupported TPU type' in proc.stderr
  proc = launch('run', '--name', 'n', '--zone', 'z', '--dry-run', '--', '--epochs=3')
  assert proc.returncode == 2 and 'only --config.<key>=<value>' in proc.stderr
  proc = launch('run', '--name', 'n', '--zone', 'z', '--sync', '/local', '--dry-run')
  assert proc.returncode == 2 and 'gs://' in proc.stderr
  proc = launch('run', '--name', 'n', '--zone', 'z', '--workdir', '~bob/w', '--dry-run')
  assert proc.returncode == 2 and 'use ~/...' in proc.stderr
  proc = launch('run', '--name', 'n', '--zone', 'z', '--workdir', 's3://b/w', '--dry-run')
  assert proc.returncode == 2 and 'only remote storage is gs://' in proc.stderr


class FakeGcloud:
  """Plays gcloud for `all`: records every command; the job polls answer `job_states` in turn."""

  def __init__(self, job_states, fail=(), on_poll=None):
    self.commands, self.job_states, self.fail, self.on_poll = [], list(job_states), fail, on_poll

  def __call__(self, command, capture=False, echo=True):
    self.commands.append(command)
    text = command[-1]
    if any(word in command for word in self.fail):
      return 1, ''
    if 'mer_jax_job $(' in text:
      if self.on_poll:
        self.on_poll()
      return 0, f'mer_jax_job {self.job_states.pop(0)}\n'
    if 'mer_jax_mirror $(' in text:
      log = 'epoch 1\n' if 'tail -c +1 ' in text else ''  # new lines only on the first read
      return 0, 'mer_jax_mirror lost\n' + log
    return 0, ''

  def steps(self):
    return [c[3] if c[0] == 'gcloud' else c[0] for c in self.commands]


def run_all(fake, *extra):
  return tpu.main(['all', '--name', 'mer', '--zone', 'z', '--poll_seconds', '1', *extra],
                  runner=fake, sleep=lambda s: None)


def test_all_polls_a_failing_job_then_still_deletes_the_vm(capsys):
  fake = FakeGcloud(['running', 'running', '1'])
  assert run_all(fake) == 1
  polls_ = [c for c in fake.commands if 'mer_jax_job $(' in c[-1]]
  assert len(polls_) == 3 and fake.commands[-1] == DOWN
  assert fake.steps() == ['tpu-vm', 'git', 'tpu-vm', 'tpu-vm', 'tpu-vm'] + ['tpu-vm'] * 6 + [
      'tpu-vm']
  out = capsys.readouterr().out
  assert out.count('epoch 1') == 1  # the log is shown once, then read on from its end
  assert '# job finished with status 1' in out


def test_all_deletes_the_vm_on_ctrl_c_and_on_sigterm():
  def ctrl_c():
    raise KeyboardInterrupt()

  for interrupt in (ctrl_c, lambda: os.kill(os.getpid(), signal.SIGTERM)):
    previous = signal.getsignal(signal.SIGTERM)
    fake = FakeGcloud(['running'] * 3, on_poll=interrupt)
    assert run_all(fake) == 130
    assert fake.commands[-1] == DOWN
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored


def test_all_with_keep_vm_leaves_it_and_a_failed_create_deletes_nothing():
  fake = FakeGcloud(['0'])
  assert run_all(fake, '--keep_vm') == 0
  assert DOWN not in fake.commands
  fake = FakeGcloud([], fail=('create',))  # e.g. the name is someone's running VM
  assert run_all(fake) == 1
  assert fake.steps() == ['tpu-vm']


def test_all_gives_up_on_an_unreachable_vm_and_deletes_it():
  fake = FakeGcloud([])

  def unreachable(command, capture=False, echo=True):
    if ' $(cat ' in command[-1]:  # the polls: ssh fails (a preempted VM)
      fake.commands.append(command)
      return 255, ''
    return fake(command, capture, echo)
  assert tpu.main(['all', '--name', 'mer', '--zone', 'z'], runner=unreachable,
                  sleep=lambda s: None) == 1
  assert fake.commands[-1] == DOWN
  assert sum('mer_jax_job $(' in c[-1] for c in fake.commands) == tpu.MAX_POLL_FAILURES


def _fake_vm(tmp_path):
  """A $HOME that looks like an installed worker: mer_jax/ is this repo, the venv's `python`
  fakes a training run (and runs launch/mirror.py for real, gs:// mapped to $HOME/gcs/)."""
  home = tmp_path / 'home'
  (home / 'mer_jax_venv' / 'bin').mkdir(parents=True)
  (home / 'bin').mkdir()
  os.symlink(ROOT, home / 'mer_jax')
  (home / 'mer_jax_venv' / 'bin' / 'activate').write_text('export PATH="$HOME/bin:$PATH"\n')
  python = home / 'bin' / 'python'
  python.write_text(f"""#!/usr/bin/env bash
if [ "$1" = launch/mirror.py ]; then
  args=(); for a in "$@"; do args+=("${{a/gs:\\/\\//$HOME/gcs/}}"); done
  exec {sys.executable} "${{args[@]}}"
fi
while [ $# -gt 0 ]; do [ "$1" = --workdir ] && w="$2"; shift; done
mkdir -p "$w/reports" "$w/data"
echo "epoch 1 $w"; echo '{{"f1": 0.5}}' > "$w/results.json"; echo big > "$w/data/cache"
sleep 1; echo "test report"; echo '{{}}' > "$w/reports/fusion_test.json"
exit "${{FAKE_EXIT:-0}}"
""")
  python.chmod(python.stat().st_mode | stat.S_IEXEC)
  return home


def test_remote_side_runs_detached_reports_its_status_and_mirrors(tmp_path, capsys):
  home = _fake_vm(tmp_path)
  env = dict(os.environ, HOME=str(home), FAKE_EXIT='3')

  def local_ssh(command, capture=False, echo=True):
    assert command[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']
    script = command[-1][len('--command='):]
    proc = subprocess.run(['bash', '-c', script], env=env, capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)
    return proc.returncode, proc.stdout

  code = tpu.main(['run', '--name', 'mer', '--zone', 'z', '--workdir', 'gs://b/run',
                   '--sync_seconds', '1', '--poll_seconds', '0.3'], runner=local_ssh)
  assert code == 3
  out = capsys.readouterr().out
  assert f'epoch 1 {home}/mer_jax_workdir' in out and 'test report' in out
  gcs = home / 'gcs' / 'b' / 'run'
  assert (gcs / 'results.json').read_text() == '{"f1": 0.5}\n'
  assert (gcs / 'reports' / 'fusion_test.json').exists()
  assert 'test report' in (gcs / 'job.log').read_text()
  assert not (gcs / 'data').exists()  # caches stay on the VM
  assert (home / 'mer_jax_run' / 'mirror.status').read_text() == '0\n'
  assert not (home / '~').exists() and not (home / 'mer_jax' / '~').exists()


def test_mirror_copies_what_changed_and_skips_caches_and_partial_files(tmp_path):
  src, dst, done = tmp_path / 'w', tmp_path / 'out', tmp_path / 'done'
  for rel, text in (('results.json', 'a'), ('reports/x.json', 'r'), ('data/shard', 'big'),
                    ('jax_cache/k', 'c'), ('run.lock', ''), ('results.tmp-1-ab.json', 'half'),
                    ('checkpoints/s/1.orbax-checkpoint-tmp-9/f', 'p'),
                    ('checkpoints/s/2/f', 'ok')):
    (src / rel).parent.mkdir(parents=True, exist_ok=True)
    (src / rel).write_text(text)
  passes = []

  def sleep(seconds):
    passes.append(sorted(str(p.relative_to(dst)) for p in dst.rglob('*') if p.is_file()))
    if len(passes) == 1:
      (src / 'results.json').write_text('bb')  # another size: mtimes can be coarse
    else:
      done.write_text('0')
  assert mirror.mirror_until(str(src), str(dst), str(done), 5, sleep=sleep) == 0
  assert passes[0] == ['checkpoints/s/2/f', 'reports/x.json', 'results.json']
  assert (dst / 'results.json').read_text() == 'bb'


def test_local_multidevice_says_which_python_cannot_import_mer_jax(tmp_path):
  proc = subprocess.run(['bash', 'launch/local_multidevice.sh', '2', str(tmp_path / 'w')],
                        cwd=ROOT, capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, PYTHON='/bin/false'))
  assert proc.returncode == 2
  assert proc.stderr.strip().endswith(
      'local_multidevice.sh: /bin/false cannot import mer_jax; set '
      'PYTHON=/path/to/venv/bin/python (or pip install -e . into /bin/false)')
  assert len(proc.stderr.strip().splitlines()) == 1
