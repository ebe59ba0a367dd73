"""Reading a workdir's latest checkpoints in tests, as plain arrays and JSON."""

import json
import os

import jax
import orbax.checkpoint as ocp


def latest_steps(workdir, stage) -> list[int]:
  folder = os.path.join(workdir, 'checkpoints', stage, 'latest')
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def latest_checkpoint(workdir, stage) -> tuple[dict, dict]:
  """(train state as arrays, loop metadata) of a stage's newest latest checkpoint."""
  step_dir = os.path.join(workdir, 'checkpoints', stage, 'latest',
                          str(latest_steps(workdir, stage)[-1]))
  state = ocp.StandardCheckpointer().restore(os.path.join(step_dir, 'state'))
  with open(os.path.join(step_dir, 'meta', 'metadata')) as f:
    meta = json.load(f)
  return jax.device_get(state), meta


def without_seconds(loop: dict) -> dict:
  """A checkpoint's loop state without the wall-clock seconds of its epochs."""
  return dict(loop, history=[{k: v for k, v in h.items() if k != 'seconds'}
                             for h in loop['history']])
