"""TensorBoard event files for training curves (tensorboardX: no TensorFlow needed)."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Mapping


def _tensorboardx():
  """tensorboardX, imported without torch.

  Its writer module imports torch when it can, only to accept torch tensors; where torch is
  installed (our test environment, many users') that costs every command 2-4 s of start-up.
  Unless torch is already loaded, its import is refused for the moment tensorboardX loads.
  """
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    return importlib.import_module('tensorboardX')
  sys.modules['torch'] = None  # `import torch` raises ImportError, which tensorboardX expects
  try:
    return importlib.import_module('tensorboardX')
  finally:
    del sys.modules['torch']


class MetricsWriter:
  """Writes scalars from the main process only (every process of a multi-host run calls it)."""

  def __init__(self, logdir: str):
    import jax  # Local: the writer must not initialise a backend at import time.
    self._writer = _tensorboardx().SummaryWriter(logdir) if jax.process_index() == 0 else None

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
    _, session_start, _ = _tensorboardx().summary.hparams(
        {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in values.items()},
        {})
    self._writer.file_writer.add_summary(session_start, step)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
