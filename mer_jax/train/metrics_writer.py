"""TensorBoard event files for training curves (tensorboardX: no TensorFlow needed)."""

from __future__ import annotations

from typing import Mapping

from tensorboardX import SummaryWriter


class MetricsWriter:
  """Writes scalars from the main process only (every process of a multi-host run calls it)."""

  def __init__(self, logdir: str):
    import jax  # Local: the writer must not initialise a backend at import time.
    self._writer = SummaryWriter(logdir) if jax.process_index() == 0 else None

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    for name, value in values.items():
      self._writer.add_scalar(name, float(value), step)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
