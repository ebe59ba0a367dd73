"""Cloud TPU: create a TPU VM (or queued resource), install mer_jax on every worker, train, stream
the log, copy the workdir to GCS, delete. Every step prints the gcloud commands it runs;
`--dry-run` prints them without running anything.

  python launch/tpu.py up      --name mer --zone us-west4-a --type v5litepod-8 [--queued] [--spot]
  python launch/tpu.py install --name mer --zone us-west4-a
  python launch/tpu.py run     --name mer --zone us-west4-a --config configs/meld.py \\
      --workdir /tmp/mer_meld --sync gs://my-bucket/mer_meld -- --config.data.shard_dir=...
  python launch/tpu.py logs    --name mer --zone us-west4-a
  python launch/tpu.py down    --name mer --zone us-west4-a [--queued]
  python launch/tpu.py all     ... (up, install, run, down)

Types: v5e (v5litepod-N), v5p (v5p-N), v6e (v6e-N); the runtime version follows the type. The
training job runs under nohup on every worker, so a dropped SSH session does not stop it, and
SIGTERM on preemption makes it checkpoint and exit (rerun `run` to resume). The workdir lives on
the VM's disk; `--sync` copies it to a gs:// folder with `gcloud storage rsync` when the job ends.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

RUNTIME_OF_FAMILY = {'v5litepod': 'v2-alpha-tpuv5-lite', 'v5p': 'v2-alpha-tpuv5',
                     'v6e': 'v2-alpha-tpuv6e'}
REMOTE_DIR = '~/mer_jax'
REMOTE_VENV = '~/mer_jax_venv'
REMOTE_LOG = '~/mer_jax_run.log'
ARCHIVE = '/tmp/mer_jax_src.tar.gz'


def runtime_version(tpu_type: str) -> str:
  family, _, chips = tpu_type.rpartition('-')
  if family not in RUNTIME_OF_FAMILY or not chips.isdigit():
    raise ValueError(f'unsupported TPU type {tpu_type!r}; use v5litepod-N (v5e), v5p-N or '
                     f'v6e-N')
  return RUNTIME_OF_FAMILY[family]


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
  setup = (f'mkdir -p {REMOTE_DIR} && tar -xzf ~/mer_jax_src.tar.gz -C {REMOTE_DIR} && '
           f'python3 -m venv {REMOTE_VENV} && . {REMOTE_VENV}/bin/activate && '
           f'pip install -q --upgrade pip && cd {REMOTE_DIR} && pip install -q -e ".[tpu]"')
  return [['git', 'archive', '--format=tar.gz', f'--output={ARCHIVE}', args.ref],
          ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', ARCHIVE, f'{args.name}:~/',
           *_scope(args), '--worker=all'],
          ssh(args, setup)]


def train_command_line(args) -> str:
  # --multihost: every worker is one JAX process of the slice (also right on a one-host slice).
  main = ['python', '-m', 'mer_jax.main', '--multihost', '--config', args.config, '--workdir',
          args.workdir, *args.overrides]
  line = (f'cd {REMOTE_DIR} && . {REMOTE_VENV}/bin/activate && '
          f'{shlex.join(main)}')
  if args.sync:
    line += f' && gcloud storage rsync -r {shlex.quote(args.workdir)} {shlex.quote(args.sync)}'
  return line


def run_commands(args) -> list[list[str]]:
  job = train_command_line(args)
  start = f'nohup bash -c {shlex.quote(job)} > {REMOTE_LOG} 2>&1 < /dev/null &'
  cmds = [ssh(args, start)]
  if args.follow:
    cmds.append(logs_command(args))
  return cmds


def logs_command(args) -> list[str]:
  # Worker 0 holds the log of process 0, which is the one that prints reports.
  return ssh(args, f'tail -n +1 -F {REMOTE_LOG}', worker='0')


def down_commands(args) -> list[list[str]]:
  if args.queued:
    return [['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', args.name,
             *_scope(args), '--force', '--quiet']]
  return [['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', args.name, *_scope(args),
           '--quiet']]


def execute(commands: list[list[str]], dry_run: bool) -> None:
  for command in commands:
    print('+ ' + shlex.join(command), flush=True)
    if not dry_run:
      subprocess.run(command, check=True)


def wait_until_active(args, dry_run: bool, poll_seconds: float = 30.0) -> None:
  command = wait_command(args)
  print(f'+ {shlex.join(command)}  # repeated until ACTIVE', flush=True)
  if dry_run:
    return
  while True:
    state = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()
    print(f'  queued resource {args.name}: {state}', flush=True)
    if state == 'ACTIVE':
      return
    if state in ('FAILED', 'SUSPENDED'):
      raise SystemExit(f'queued resource {args.name} is {state}')
    time.sleep(poll_seconds)


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='python launch/tpu.py', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('step', choices=('up', 'install', 'run', 'logs', 'down', 'all'))
  parser.add_argument('--name', required=True, help='TPU VM (and queued resource) name')
  parser.add_argument('--zone', required=True)
  parser.add_argument('--project', default='')
  parser.add_argument('--type', default='v5litepod-8', help='v5litepod-N, v5p-N or v6e-N')
  parser.add_argument('--version', default='', help='runtime version (default: from --type)')
  parser.add_argument('--queued', action='store_true', help='use a queued resource')
  parser.add_argument('--spot', action='store_true', help='spot (preemptible) capacity')
  parser.add_argument('--ref', default='HEAD', help='git revision to install')
  parser.add_argument('--config', default='configs/default.py')
  parser.add_argument('--workdir', default='~/mer_jax_workdir', help='workdir on each VM')
  parser.add_argument('--sync', default='', help='gs:// folder the workdir is copied to')
  parser.add_argument('--follow', action=argparse.BooleanOptionalAction, default=True,
                      help='stream the log after starting the run')
  parser.add_argument('--dry-run', action='store_true', help='print the commands only')
  argv = list(argv)
  split = argv.index('--') if '--' in argv else len(argv)
  args = parser.parse_args(argv[:split])
  args.overrides = argv[split + 1:]
  bad = [o for o in args.overrides if not o.startswith('--config.')]
  if bad:
    parser.error(f'after --, only --config.<key>=<value> overrides are accepted, got {bad}')
  if args.sync and not args.sync.startswith('gs://'):
    parser.error(f'--sync must be a gs:// folder, got {args.sync!r}')
  try:
    runtime_version(args.type)
  except ValueError as e:
    if not args.version:
      parser.error(str(e))
  return args


def main(argv=None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # git archive needs it
  steps = ('up', 'install', 'run', 'down') if args.step == 'all' else (args.step,)
  for step in steps:
    print(f'# {step}', flush=True)
    if step == 'up':
      execute(up_commands(args), args.dry_run)
      if args.queued:
        wait_until_active(args, args.dry_run)
    elif step == 'install':
      execute(install_commands(args), args.dry_run)
    elif step == 'run':
      if args.step == 'all':
        args.follow = False
        # Blocks until the job ends, so that `down` does not delete a running VM.
        execute([ssh(args, train_command_line(args))], args.dry_run)
      else:
        execute(run_commands(args), args.dry_run)
    elif step == 'logs':
      execute([logs_command(args)], args.dry_run)
    elif step == 'down':
      execute(down_commands(args), args.dry_run)


if __name__ == '__main__':
  main()
