"""Cloud TPU: create a TPU VM (or queued resource), install mer_jax on every worker, train, delete.
Every step prints the gcloud commands it runs; `--dry-run` prints them without running anything.

  python launch/tpu.py up      --name mer --zone us-west4-a --type v5litepod-8 [--queued] [--spot]
  python launch/tpu.py install --name mer --zone us-west4-a
  python launch/tpu.py run     --name mer --zone us-west4-a --config configs/meld.py \\
      --workdir gs://my-bucket/mer_meld -- --config.data.shard_dir=gs://my-bucket/meld_shards
  python launch/tpu.py logs    --name mer --zone us-west4-a
  python launch/tpu.py down    --name mer --zone us-west4-a [--queued]
  python launch/tpu.py all     ... (up, install, run, down; --keep_vm skips down)

Types: v4 (v4-N), v5e (v5litepod-N), v5p (v5p-N), v6e (v6e-N); the runtime version follows the
type. The job starts detached (setsid nohup) on every worker, with its log and exit status in
~/mer_jax_run/ on the VM, so a dropped SSH session does not stop it; `run` then polls the workers
every --poll_seconds and prints worker 0's new log lines. `all` deletes the VM when the job ends,
fails, or the launcher is stopped (Ctrl-C, SIGTERM, SIGHUP), unless --keep_vm.

--workdir is a path on the VM (`~/...` is expanded there; quote it so your shell leaves it alone)
or a gs:// folder: then checkpoints go there directly (train.checkpoint_dir) and the rest of the
run (reports, results.json, TensorBoard, predictions, the job log) is copied there from
--local_workdir every --sync_seconds while the job runs (launch/mirror.py), and once more at the
end. See docs/tpu.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Callable

RUNTIME_OF_FAMILY = {'v4': 'tpu-ubuntu2204-base', 'v5litepod': 'v2-alpha-tpuv5-lite',
                     'v5p': 'v2-alpha-tpuv5', 'v6e': 'v2-alpha-tpuv6e'}
# Remote paths are written "$HOME"/... so that the VM's shell expands them, never the local one.
REMOTE_DIR = '"$HOME"/mer_jax'
REMOTE_VENV = '"$HOME"/mer_jax_venv'
RUN_DIR = '"$HOME"/mer_jax_run'
ARCHIVE = '/tmp/mer_jax_src.tar.gz'
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_POLL_FAILURES = 10  # consecutive failed polls before `all` decides the VM is gone
MIRROR_WAIT_SECONDS = 600  # for the last copy to gs:// once the job has ended

# runner(command, capture=False, echo=True) -> (exit status, stdout if captured)
Runner = Callable[..., tuple[int, str]]


def runtime_version(tpu_type: str) -> str:
  family, _, chips = tpu_type.rpartition('-')
  if family not in RUNTIME_OF_FAMILY or not chips.isdigit():
    raise ValueError(f'unsupported TPU type {tpu_type!r}; use v4-N, v5litepod-N (v5e), v5p-N or '
                     f'v6e-N')
  return RUNTIME_OF_FAMILY[family]


def remote_path(path: str) -> str:
  """`path` as one word for the VM's shell: `~/x` becomes "$HOME"/x, expanded on the VM."""
  if path == '~':
    return '"$HOME"'
  if path.startswith('~/'):
    rest = path[2:]
    return '"$HOME"/' + (shlex.quote(rest) if rest else '')
  return shlex.quote(path)


def remote_arg(arg: str) -> str:
  """remote_path for a path argument, also the value of `--config.key=~/...`."""
  if arg.startswith('--') and '=~' in arg:
    key, value = arg.split('=', 1)
    return shlex.quote(key + '=') + remote_path(value)
  return remote_path(arg)


def is_gcs(path: str) -> bool:
  return path.startswith('gs://')


def _scope(args) -> list[str]:
  out = [f'--zone={args.zone}']
  if args.project:
    out.append(f'--project={args.project}')
  return out


def ssh(args, command: str, worker: str = 'all') -> list[str]:
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', args.name, *_scope(args),
          f'--worker={worker}', f'--command={command}']


def up_commands(args) -> list[list[str]]:
  version = args.version or runtime_version(args.type)
  spot = ['--spot'] if args.spot else []
  if args.queued:
    return [['gcloud', 'compute', 'tpus', 'queued-resources', 'create', args.name,
             f'--node-id={args.name}', *_scope(args), f'--accelerator-type={args.type}',
             f'--runtime-version={version}', *spot]]
  return [['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', args.name, *_scope(args),
           f'--accelerator-type={args.type}', f'--version={version}', *spot]]


def wait_command(args) -> list[str]:
  return ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', args.name, *_scope(args),
          '--format=value(state.state)']


def install_commands(args) -> list[list[str]]:
  # Some base images lack python3-venv (ensurepip); install it only when venv fails.
  venv = (f'{{ python3 -m venv {REMOTE_VENV} || {{ sudo apt-get update -qq && '
          f'sudo apt-get install -y -qq python3-venv && python3 -m venv {REMOTE_VENV}; }}; }}')
  setup = (f'mkdir -p {REMOTE_DIR} && tar -xzf "$HOME"/mer_jax_src.tar.gz -C {REMOTE_DIR} && '
           f'{venv} && . {REMOTE_VENV}/bin/activate && '
           f'pip install -q --upgrade pip && cd {REMOTE_DIR} && pip install -q -e ".[tpu]"')
  return [['git', 'archive', '--format=tar.gz', f'--output={ARCHIVE}', args.ref],
          ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', ARCHIVE, f'{args.name}:~/',
           *_scope(args), '--worker=all'],
          ssh(args, setup)]


def train_workdir(args) -> str:
  """The --workdir of mer_jax.main: the VM-local folder when the run's home is on GCS."""
  return args.local_workdir if is_gcs(args.workdir) else args.workdir


def train_overrides(args) -> list[str]:
  overrides = list(args.overrides)
  if is_gcs(args.workdir) and not any(o.startswith('--config.train.checkpoint_dir=')
                                      for o in overrides):
    overrides.append(f'--config.train.checkpoint_dir={args.workdir.rstrip("/")}/checkpoints')
  return overrides


def train_command_line(args) -> str:
  # --multihost: every worker is one JAX process of the slice (also right on a one-host slice).
  main = ['python', '-m', 'mer_jax.main', '--multihost', '--config', args.config, '--workdir',
          train_workdir(args), *train_overrides(args)]
  return (f'cd {REMOTE_DIR} && . {REMOTE_VENV}/bin/activate && '
          + ' '.join(remote_arg(word) for word in main))


def _detached(script: str, name: str) -> str:
  """Starts `script` in its own session, immune to the SSH session ending; its exit status lands
  in RUN_DIR/<name>.status (written whole, then renamed), its pid in <name>.pid."""
  status = f'{RUN_DIR}/{name}.status'
  wrapped = f'{script}; echo $? > {status}.tmp; mv {status}.tmp {status}'
  return (f'setsid nohup bash -c {shlex.quote(wrapped)} > {RUN_DIR}/{name}.log 2>&1 < /dev/null '
          f'& echo $! > {RUN_DIR}/{name}.pid')


def start_command(args) -> list[str]:
  """Starts the job on every worker, unless one is still running there."""
  busy = (f'if kill -0 "$(cat {RUN_DIR}/job.pid 2>/dev/null)" 2>/dev/null; then '
          f'echo "a mer_jax job is still running on $(hostname); see {RUN_DIR}/job.log" >&2; '
          f'exit 3; fi')
  fresh = (f'mkdir -p {RUN_DIR}; '
           f'rm -f {RUN_DIR}/job.status {RUN_DIR}/mirror.status {RUN_DIR}/mirror.pid')
  return ssh(args, f'{busy}; {fresh}; {_detached(train_command_line(args), "job")}')


def mirror_command(args) -> list[str]:
  """On worker 0 (process 0 writes the reports): copies the local workdir to the gs:// one."""
  mirror = ['python', 'launch/mirror.py', '--src', train_workdir(args), '--dst', args.workdir,
            '--until', '~/mer_jax_run/job.status', '--every', str(args.sync_seconds),
            '--extra', '~/mer_jax_run/job.log']
  script = (f'cd {REMOTE_DIR} && . {REMOTE_VENV}/bin/activate && '
            + ' '.join(remote_arg(word) for word in mirror))
  return ssh(args, _detached(script, 'mirror'), worker='0')


def _state_probe(name: str) -> str:
  """Shell that prints <name>'s exit status, `running`, or `lost` (gone without a status). The
  second look at the status file covers a job that ended between the first look and `kill -0`."""
  status, pid = f'{RUN_DIR}/{name}.status', f'{RUN_DIR}/{name}.pid'
  return (f'cat {status} 2>/dev/null || {{ kill -0 "$(cat {pid} 2>/dev/null)" 2>/dev/null && '
          f'echo running; }} || cat {status} 2>/dev/null || echo lost')


def poll_command(args) -> list[str]:
  return ssh(args, f'echo "mer_jax_job $({_state_probe("job")})"')


def progress_command(args, offset: int) -> list[str]:
  """Worker 0: the mirror's state, then the job log from byte `offset` on."""
  return ssh(args, f'echo "mer_jax_mirror $({_state_probe("mirror")})"; '
                   f'tail -c +{offset + 1} {RUN_DIR}/job.log 2>/dev/null || true', worker='0')


def logs_command(args) -> list[str]:
  # Worker 0 holds the log of process 0, which is the one that prints reports.
  return ssh(args, f'tail -n +1 -F {RUN_DIR}/job.log', worker='0')


def down_commands(args) -> list[list[str]]:
  if args.queued:
    return [['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', args.name,
             *_scope(args), '--force', '--quiet']]
  return [['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', args.name, *_scope(args),
           '--quiet']]


def subprocess_runner(dry_run: bool) -> Runner:
  def run(command: list[str], capture: bool = False, echo: bool = True) -> tuple[int, str]:
    if echo:
      print('+ ' + shlex.join(command), flush=True)
    if dry_run:
      return 0, ''
    proc = subprocess.run(command, stdout=subprocess.PIPE if capture else None, text=True,
                          errors='surrogateescape', check=False, cwd=REPO)  # for git archive
    return proc.returncode, proc.stdout or ''
  return run


class StepFailed(Exception):
  pass


def execute(commands: list[list[str]], runner: Runner) -> None:
  for command in commands:
    code, _ = runner(command)
    if code:
      raise StepFailed(f'{shlex.join(command[:5])} ... exited with status {code}')


def wait_until_active(args, runner: Runner, sleep, poll_seconds: float = 30.0) -> None:
  command = wait_command(args)
  print(f'# repeated until ACTIVE:\n+ {shlex.join(command)}', flush=True)
  if args.dry_run:
    return
  while True:
    code, out = runner(command, capture=True, echo=False)
    state = out.strip()
    print(f'  queued resource {args.name}: {state or f"(status {code})"}', flush=True)
    if state == 'ACTIVE':
      return
    if state in ('FAILED', 'SUSPENDED'):
      raise StepFailed(f'queued resource {args.name} is {state}')
    sleep(poll_seconds)


def _parse_states(out: str, marker: str) -> list[str]:
  return [line.split()[1] for line in out.splitlines()
          if line.startswith(marker + ' ') and len(line.split()) == 2]


def _job_outcome(code: int, states: list[str]) -> int | None:
  """The job's exit status once it is known from the workers' states, else None."""
  for state in states:
    if state == 'lost':
      print('a worker\'s job ended without an exit status (killed, or the VM restarted)',
            flush=True)
      return 1
    if state != 'running' and state != '0':
      return int(state) if state.isdigit() else 1
  if code == 0 and states and all(s == '0' for s in states):
    return 0
  return None


def watch(args, runner: Runner, sleep, mirror: bool) -> int:
  """Polls until the job has ended on every worker (or failed on one) and, with a mirror, until
  its last copy is done, printing worker 0's new log; returns the job's exit status."""
  print(f'# polling every {args.poll_seconds:g} s (the log from the last byte shown on):\n'
        f'+ {shlex.join(poll_command(args))}\n+ {shlex.join(progress_command(args, 0))}',
        flush=True)
  if args.dry_run:
    return 0
  offset, failures, outcome, waits = 0, 0, None, 0
  while True:
    sleep(args.poll_seconds)
    code = 0
    if outcome is None:
      code, out = runner(poll_command(args), capture=True, echo=False)
      outcome = _job_outcome(code, _parse_states(out, 'mer_jax_job'))
    else:
      waits += 1  # for the mirror's last copy
    # Read after the poll, so that a finished job's last lines are shown before returning.
    log_code, out = runner(progress_command(args, offset), capture=True, echo=False)
    first, _, log = out.partition('\n')
    mirror_state = _parse_states(first, 'mer_jax_mirror')
    if mirror_state and log:
      sys.stdout.write(log)
      sys.stdout.flush()
      offset += len(log.encode('utf-8', 'surrogateescape'))
    failures = 0 if code == 0 and log_code == 0 else failures + 1
    copied = not mirror or mirror_state not in (['running'], [])
    if outcome is not None and (copied or waits * args.poll_seconds >= MIRROR_WAIT_SECONDS):
      if mirror and mirror_state != ['0']:
        print(f'warning: the last copy to {args.workdir} did not finish (mirror: '
              f'{mirror_state[0] if mirror_state else "no answer"}); see '
              '~/mer_jax_run/mirror.log on worker 0', flush=True)
      return outcome
    if failures >= MAX_POLL_FAILURES:
      print(f'no answer from the VM in {failures} polls: it is gone (preempted?) or '
            'unreachable', flush=True)
      return 1


def run_job(args, runner: Runner, sleep) -> int:
  execute([start_command(args)], runner)
  mirror = is_gcs(args.workdir)
  if mirror:
    execute([mirror_command(args)], runner)
  if not args.follow:
    return 0
  code = watch(args, runner, sleep, mirror)
  if not args.dry_run:
    print(f'# job finished with status {code}', flush=True)
  return code


@contextlib.contextmanager
def signals_interrupt():
  """SIGTERM and SIGHUP (a closed terminal) stop `all` like Ctrl-C, so its `down` still runs."""
  def interrupt(signum, frame):
    if signum == signal.SIGHUP:  # the terminal is gone: writing to it would fail before `down`
      devnull = os.open(os.devnull, os.O_WRONLY)
      os.dup2(devnull, 1)
      os.dup2(devnull, 2)
    raise KeyboardInterrupt(signal.Signals(signum).name)
  previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


@contextlib.contextmanager
def signals_ignored():
  """While deleting the VM: a second Ctrl-C must not leave it running (children inherit this)."""
  previous = {s: signal.signal(s, signal.SIG_IGN)
              for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def down_always(args, runner: Runner) -> bool:
  print('# down', flush=True)
  with signals_ignored():
    try:
      execute(down_commands(args), runner)
      return True
    except StepFailed as e:
      print(f'error: could not delete {args.name} ({e}); it may still be billed: check '
            f'`gcloud compute tpus tpu-vm list --zone={args.zone}`', file=sys.stderr, flush=True)
      return False


def run_all(args, runner: Runner, sleep) -> int:
  """up, install, run (until the job ends), then down whatever happened, unless --keep_vm."""
  created, code = False, 1
  args.follow = True  # `down` must wait for the job
  with signals_interrupt():
    try:
      print('# up', flush=True)
      created = True  # from here on the VM (or queued request) may exist
      try:
        execute(up_commands(args), runner)
      except StepFailed:
        created = False  # create failed: nothing of ours to delete, maybe someone else's VM
        raise
      if args.queued:
        wait_until_active(args, runner, sleep)
      print('# install', flush=True)
      execute(install_commands(args), runner)
      print('# run', flush=True)
      code = run_job(args, runner, sleep)
    except StepFailed as e:
      print(f'error: {e}', file=sys.stderr, flush=True)
    except KeyboardInterrupt as e:
      print(f'\n# stopped ({e or "SIGINT"})', flush=True)
      code = 130
    finally:
      if created and args.keep_vm:
        print(f'# --keep_vm: {args.name} is still running (and billed); delete it with: '
              f'python launch/tpu.py down --name {args.name} {shlex.join(_scope(args))}'
              + (' --queued' if args.queued else ''), flush=True)
      elif created and not down_always(args, runner) and code == 0:
        code = 1
  return code


def run_step(args, runner: Runner, sleep) -> int:
  print(f'# {args.step}', flush=True)
  if args.step == 'up':
    execute(up_commands(args), runner)
    if args.queued:
      wait_until_active(args, runner, sleep)
  elif args.step == 'install':
    execute(install_commands(args), runner)
  elif args.step == 'run':
    try:
      return run_job(args, runner, sleep)
    except KeyboardInterrupt:
      print(f'\n# stopped watching; the job keeps running on {args.name} (`logs` follows it)')
      return 130
  elif args.step == 'logs':
    execute([logs_command(args)], runner)
  elif args.step == 'down':
    execute(down_commands(args), runner)
  return 0


def vm_path(path: str, flag: str) -> str:
  """A path the local shell already expanded (`~/x` -> /home/me/x) goes back to `~/x`: the VM's
  home is another folder (/home/<user> there, /Users/<me> or /root here)."""
  home = os.path.expanduser('~').rstrip('/')
  if home and (path == home or path.startswith(home + '/')):
    fixed = '~' + path[len(home):]
    print(f'note: {flag} {path} is in this machine\'s home folder (did your shell expand ~?); '
          f'using {fixed} on the VM. Quote it (\'{fixed}\') to say so.', file=sys.stderr)
    return fixed
  return path


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='python launch/tpu.py', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('step', choices=('up', 'install', 'run', 'logs', 'down', 'all'))
  parser.add_argument('--name', required=True, help='TPU VM (and queued resource) name')
  parser.add_argument('--zone', required=True)
  parser.add_argument('--project', default='')
  parser.add_argument('--type', default='v5litepod-8', help='v4-N, v5litepod-N, v5p-N or v6e-N')
  parser.add_argument('--version', default='', help='runtime version (default: from --type)')
  parser.add_argument('--queued', action='store_true', help='use a queued resource')
  parser.add_argument('--spot', action='store_true', help='spot (preemptible) capacity')
  parser.add_argument('--ref', default='HEAD', help='git revision to install')
  parser.add_argument('--config', default='configs/default.py')
  parser.add_argument('--workdir', default='~/mer_jax_workdir',
                      help="the run's folder: on each VM ('~/...' expanded there) or gs://...")
  parser.add_argument('--local_workdir', default='~/mer_jax_workdir',
                      help='with a gs:// --workdir: the folder on the VM that is copied there')
  parser.add_argument('--sync', default='',
                      help='gs:// folder: same as --workdir gs://... with --local_workdir '
                           'set to --workdir')
  parser.add_argument('--sync_seconds', type=int, default=60,
                      help='with a gs:// workdir: seconds between copies while the job runs')
  parser.add_argument('--poll_seconds', type=float, default=60.0,
                      help='seconds between checks of the job (and new log lines)')
  parser.add_argument('--follow', action=argparse.BooleanOptionalAction, default=True,
                      help='run: poll the job and print its log until it ends')
  parser.add_argument('--keep_vm', action='store_true', help='all: do not delete the VM')
  parser.add_argument('--dry-run', action='store_true', help='print the commands only')
  argv = list(argv)
  split = argv.index('--') if '--' in argv else len(argv)
  args = parser.parse_args(argv[:split])
  args.overrides = argv[split + 1:]
  bad = [o for o in args.overrides if not o.startswith('--config.')]
  if bad:
    parser.error(f'after --, only --config.<key>=<value> overrides are accepted, got {bad}')
  if args.sync:
    if not is_gcs(args.sync) or is_gcs(args.workdir):
      parser.error(f'--sync must be a gs:// folder and --workdir a VM path, got {args.sync!r} '
                   f'and {args.workdir!r}')
    args.workdir, args.local_workdir = args.sync, args.workdir
  for flag in ('workdir', 'local_workdir'):
    path = getattr(args, flag)
    if path.startswith('~') and path != '~' and not path.startswith('~/'):
      parser.error(f'--{flag} {path!r}: use ~/... (your home on the VM) or an absolute path')
    if '://' in path and not is_gcs(path):
      parser.error(f'--{flag} {path!r}: the only remote storage is gs://')
    setattr(args, flag, vm_path(path, f'--{flag}'))
  if is_gcs(args.local_workdir):
    parser.error('--local_workdir is a folder on the VM, not gs://')
  try:
    runtime_version(args.type)
  except ValueError as e:
    if not args.version:
      parser.error(str(e))
  return args


def main(argv=None, runner: Runner | None = None, sleep=time.sleep) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  runner = runner or subprocess_runner(args.dry_run)
  if args.step == 'all':
    return run_all(args, runner, sleep)
  try:
    return run_step(args, runner, sleep)
  except StepFailed as e:
    print(f'error: {e}', file=sys.stderr)
    return 1


if __name__ == '__main__':
  sys.exit(main())
