"""Jitted functions compiled ahead of time on their first call, with the seconds it took.

Users wait on XLA compilation as much as on steps, so every stage reports how long its programs
took to lower and compile (a hit in the persistent compilation cache shows as a short compile).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

from mer_jax.train import cpu_backend


class TimedCompile:
  """`jitted` (a jax.jit function), lowered and compiled for the arguments of its first call and
  then run as that executable. Every later call must have the same shapes and shardings (the
  static batch budgets of a stage guarantee it). `static` are keyword arguments that `jitted`
  takes as static; they are given once, here.

  Programs lowered here are steps unless `is_step=False` (initializers): on CPU a step's small
  random draws keep JAX's loop (`cpu_backend.step_draws`). `fast_compile`: on CPU, compile with
  `cpu_backend.compiler_options` (the stage's train.cpu_fast_compile).
  """

  def __init__(self, jitted: Callable, *, is_step: bool = True, fast_compile: bool = False,
               **static):
    self._jitted = jitted
    self._is_step = is_step
    self._fast_compile = fast_compile
    self._static = static
    self._compiled = None
    self.lower_seconds: float | None = None
    self.compile_seconds: float | None = None

  def compile(self, *args) -> None:
    """Lowers and compiles for these arguments (shapes and shardings only) without running."""
    if self._compiled is None:
      started = time.perf_counter()
      with cpu_backend.step_draws() if self._is_step else contextlib.nullcontext():
        lowered = self._jitted.lower(*args, **self._static)
      lowered_at = time.perf_counter()
      self._compiled = lowered.compile(cpu_backend.compiler_options(self._fast_compile))
      self.lower_seconds = lowered_at - started
      self.compile_seconds = time.perf_counter() - lowered_at

  def __call__(self, *args) -> Any:
    self.compile(*args)
    return self._compiled(*args)

  @property
  def seconds(self) -> float | None:
    """Lowering plus compilation, or None before the first call."""
    if self._compiled is None:
      return None
    return self.lower_seconds + self.compile_seconds
