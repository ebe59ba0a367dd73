"""Copies a run's VM-local workdir to a gs:// folder while the job runs, through etils/epath.

  python launch/mirror.py --src ~/mer_jax_workdir --dst gs://bucket/run \\
      --until ~/mer_jax_run/job.status --every 60 [--extra ~/mer_jax_run/job.log]

Every `--every` seconds it copies the files that are new or changed since its last pass (reports,
results.json, predictions, TensorBoard events, ...); once the `--until` file exists (the job has
ended) it makes a last pass and exits, non-zero if that pass could not copy everything. It never
deletes in the destination. The data and compilation caches, the run lock, half-written files
and Orbax's unfinished checkpoints are skipped. launch/tpu.py starts it on worker 0 (process 0
writes the reports); it needs only etils and, for gs://, gcsfs (the `[tpu]` extra).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Callable

from etils import epath

SKIPPED_TOP = ('data', 'jax_cache', 'run.lock')
# files.atomic_path writes `name.tmp-<pid>-<hex>.ext`; Orbax writes `<step>.orbax-checkpoint-tmp-*`.
SKIPPED_PARTS = ('.tmp-', 'orbax-checkpoint-tmp')
FINAL_TRIES = 3


def _skipped(rel: str) -> bool:
  parts = rel.split(os.sep)
  return parts[0] in SKIPPED_TOP or any(s in p for p in parts for s in SKIPPED_PARTS)


def changed_files(src: str, seen: dict[str, tuple[int, int]]) -> list[tuple[str, tuple]]:
  """(relative path, (size, mtime_ns)) of the files under `src` that differ from `seen`."""
  out = []
  for folder, dirs, names in os.walk(src):
    dirs[:] = sorted(d for d in dirs if not _skipped(os.path.relpath(os.path.join(folder, d), src)))
    for name in sorted(names):
      rel = os.path.relpath(os.path.join(folder, name), src)
      if _skipped(rel):
        continue
      try:
        st = os.stat(os.path.join(src, rel))
      except FileNotFoundError:
        continue
      if seen.get(rel) != (st.st_size, st.st_mtime_ns):
        out.append((rel, (st.st_size, st.st_mtime_ns)))
  return out


def copy_file(src: str, dst: epath.Path) -> None:
  dst.parent.mkdir(parents=True, exist_ok=True)
  with open(src, 'rb') as f, dst.open('wb') as g:
    shutil.copyfileobj(f, g)


def mirror_once(src: str, dst: epath.Path, seen: dict, extra: tuple[str, ...] = ()) -> int:
  """Copies what changed; returns how many files could not be copied (they are retried)."""
  failed = 0
  jobs = [(os.path.join(src, rel), dst / rel, rel, sig) for rel, sig in changed_files(src, seen)]
  for path in extra:
    if os.path.exists(path):
      st = os.stat(path)
      jobs.append((path, dst / os.path.basename(path), path, (st.st_size, st.st_mtime_ns)))
  for local, remote, key, sig in jobs:
    if seen.get(key) == sig:
      continue
    try:
      copy_file(local, remote)
      seen[key] = sig
    except FileNotFoundError:
      pass  # replaced or removed since the walk; the next pass sees its new state
    except Exception as e:  # pylint: disable=broad-except
      print(f'mirror: cannot copy {local} to {remote}: {e}', file=sys.stderr, flush=True)
      failed += 1
  return failed


def mirror_until(src: str, dst: epath.PathLike, until: str, every: float,
                 extra: tuple[str, ...] = (), sleep: Callable[[float], None] = time.sleep) -> int:
  """Mirrors every `every` seconds until `until` exists, then once more; 0 if all was copied."""
  dst, seen = epath.Path(dst), {}
  while not os.path.exists(until):
    if os.path.isdir(src):
      mirror_once(src, dst, seen, extra)
    sleep(every)
  for _ in range(FINAL_TRIES):
    if mirror_once(src, dst, seen, extra) == 0:
      print(f'mirror: {src} copied to {dst}', flush=True)
      return 0
    sleep(every)
  print(f'mirror: some files of {src} could not be copied to {dst}', file=sys.stderr, flush=True)
  return 1


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--src', required=True, help='the local workdir')
  parser.add_argument('--dst', required=True, help='folder to copy it to (gs://... or local)')
  parser.add_argument('--until', required=True, help='file whose appearance ends the mirroring')
  parser.add_argument('--every', type=float, default=60.0, help='seconds between passes')
  parser.add_argument('--extra', action='append', default=[],
                      help='a file outside src also copied, to dst/<its name> (the job log)')
  args = parser.parse_args(argv)
  return mirror_until(args.src, args.dst, args.until, args.every, tuple(args.extra))


if __name__ == '__main__':
  sys.exit(main())
