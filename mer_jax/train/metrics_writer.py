"""TensorBoard event files for training curves (tensorboardX: no TensorFlow needed)."""

from __future__ import annotations

from typing import Any, Mapping

from tensorboardX import SummaryWriter
from tensorboardX import summary


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

  def text(self, step: int, tag: str, text: str) -> None:
    """`text` shown verbatim (a Markdown code block) in TensorBoard's Text tab."""
    if self._writer is None:
      return
    self._writer.add_text(tag, ''.join(f'    {line}\n' for line in text.splitlines()), step)
    self._writer.flush()

  def hparams(self, step: int, values: Mapping[str, Any]) -> None:
    """The run's settings for TensorBoard's HParams tab: a session-start summary, and no
    experiment summary, so the tab takes its columns from every run's session (the stages'
    runs have different settings) and its metrics from their scalars (test/...)."""
    if self._writer is None:
      return
    _, session_start, _ = summary.hparams(
        {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in values.items()},
        {})
    self._writer.file_writer.add_summary(session_start, step)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
