"""Reading a workdir's latest checkpoints in tests, as plain arrays and JSON."""

import os

from mer_jax.train import checkpointing


def latest_steps(workdir, stage) -> list[int]:
  folder = os.path.join(workdir, 'checkpoints', stage, 'latest')
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def latest_checkpoint(workdir, stage) -> tuple[dict, dict]:
  """(train state as nested dicts of host arrays, loop metadata) of a stage's newest latest
  checkpoint."""
  ckpt = checkpointing.StageCheckpoints(workdir, stage, read_only=True)
  try:
    return ckpt.latest_arrays()
  finally:
    ckpt.close()


def without_seconds(loop: dict) -> dict:
  """A checkpoint's loop state without the wall-clock seconds of its epochs."""
  return dict(loop, history=[{k: v for k, v in h.items() if k != 'seconds'}
                             for h in loop['history']])
