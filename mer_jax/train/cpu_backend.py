"""Start-up settings that speed up training on JAX's CPU backend, applied only there.

* Host allocator (`keep_freed_blocks_in_heap`): glibc serves large allocations with a fresh mmap
  and returns it on free, so every XLA CPU step that allocates a few MiB of temporaries page-faults
  again. The mmap and trim thresholds are raised and mmap is switched off for ordinary allocations
  (the threshold caps at 32 MiB, below the teacher step's largest block), so freed blocks are
  reused. glibc still mmaps where the heap cannot grow.
* Threefry (`unroll_threefry_on_cpu`): JAX lowers the threefry2x32 hash as a five-trip loop on CPU
  and unrolled elsewhere; XLA's CPU runtime pays for every trip, and every dropout mask and
  `fold_in` goes through one. JAX's own unrolled lowering gives the same bits (so every run,
  checkpoint and result is unchanged) in fewer, faster ops, and is used for every draw except
  the small ones of train steps (lowered inside `step_draws`): there the loop compiles faster and
  costs little per step. The rules are JAX-internal: where they are not found, nothing changes
  and a warning says so.
* Fast compiles (`compiler_options`, `train.cpu_fast_compile`): a stage's programs compiled at
  LLVM optimisation level 0, for smoke runs whose wall time is mostly compiling.
* Dots on their own (`dots_alone_options`): XLA's CPU backend hands each dot to YNNPACK together
  with the elementwise ops and reductions around it (bias, residual, LayerNorm, GELU), as one
  fused graph. For a transformer encoder's forward pass the dots run faster alone; its training
  step does not (both measured in docs/performance.md), so only feature extraction asks for it.

docs/performance.md has the measurements behind each.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import functools
import importlib
import math

import jax
import jax.numpy as jnp
from absl import logging
from jax.interpreters import mlir

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# glibc caps the mmap threshold at 32 MiB on 64-bit hosts; larger blocks are mmapped regardless.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20  # free heap kept by the process before it is returned to the OS

# Where JAX has kept the threefry primitive and its unrolled lowering rule.
_THREEFRY_MODULES = ('jax._src.random.threefry2x32', 'jax._src.prng')
# Train steps keep the loop for draws of fewer words than this (docs/performance.md).
STEP_UNROLL_MIN_WORDS = 1 << 14
# Draws of at least this many words are unrolled in the programs being lowered now.
_UNROLL_FROM = contextvars.ContextVar('unroll_threefry_from', default=0)


def tune_for_cpu_backend() -> bool:
  """Applies both settings when JAX's default backend is the CPU; False (no change) elsewhere.

  Call it once JAX's backends may start (after jax.distributed.initialize) and before the first
  jitted function with random draws is traced: programs lowered earlier keep the loop.
  """
  if jax.default_backend() != 'cpu':
    return False
  keep_freed_blocks_in_heap()
  unroll_threefry_on_cpu()
  return True


def _libc():
  name = ctypes.util.find_library('c')
  try:
    libc = ctypes.CDLL(name)
  except OSError:
    return None
  return libc if hasattr(libc, 'mallopt') else None


def keep_freed_blocks_in_heap() -> bool:
  """Sets glibc's mmap and trim thresholds and turns off mmap for ordinary allocations; False
  (and no change) where malloc is not glibc's."""
  libc = _libc()
  if libc is None:
    return False
  return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
              and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
              and libc.mallopt(_M_MMAP_MAX, 0))


def unroll_threefry_on_cpu() -> bool:
  """Registers a CPU lowering of threefry2x32 that unrolls every draw but the small ones of train
  steps (`step_draws`); False where JAX's rules cannot be found."""
  for name in _THREEFRY_MODULES:
    try:
      module = importlib.import_module(name)
    except ImportError:
      continue
    primitive = getattr(module, 'threefry2x32_p', None)
    unrolled = getattr(module, '_threefry2x32_lowering_rule', None)
    rolled = getattr(module, '_threefry2x32_cpu_lowering_rule', None)
    if primitive is not None and unrolled is not None and rolled is not None:

      def rule(ctx, *args, **kwargs):
        size = math.prod(ctx.avals_out[0].shape)
        return (unrolled if size >= _UNROLL_FROM.get() else rolled)(ctx, *args, **kwargs)

      mlir.register_lowering(primitive, rule, platform='cpu')
      return True
  logging.warning('this JAX has no unrolled threefry lowering under %s; random draws on CPU keep '
                  'their while loop (slower steps, same numbers)', ' or '.join(_THREEFRY_MODULES))
  return False


# XLA's options for a program compiled fast: LLVM's code generation at optimisation level 0.
FAST_COMPILE_OPTIONS = {'xla_backend_optimization_level': 0}


def compiler_options(fast_compile: bool) -> dict | None:
  """The XLA compiler options of a program: FAST_COMPILE_OPTIONS where `fast_compile` is set and
  the program compiles for the CPU backend, else None (XLA's defaults). Level 0 skips LLVM's
  optimisations (vectorising elementwise loops among them) but not IEEE arithmetic."""
  if fast_compile and jax.default_backend() == 'cpu':
    return dict(FAST_COMPILE_OPTIONS)
  return None


# XLA's option for a program whose dots go to YNNPACK alone, not fused with elementwise neighbours.
DOTS_ALONE_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}


def dots_alone_options() -> dict | None:
  """DOTS_ALONE_OPTIONS where the default backend is the CPU and its XLA knows the (experimental)
  option, else None."""
  return dict(DOTS_ALONE_OPTIONS) if _xla_takes(tuple(DOTS_ALONE_OPTIONS.items())) else None


@functools.cache
def _xla_takes(options: tuple[tuple[str, str], ...]) -> bool:
  """Whether the default backend is the CPU and compiles a trivial program with `options`."""
  if jax.default_backend() != 'cpu':
    return False
  try:
    jax.jit(lambda x: x @ x, compiler_options=dict(options)).lower(
        jax.ShapeDtypeStruct((2, 2), jnp.float32)).compile()
  except Exception as error:  # pylint: disable=broad-except
    logging.info('XLA does not take the compiler options %s (%s)', dict(options), error)
    return False
  return True


@contextlib.contextmanager
def step_draws(min_words: int = STEP_UNROLL_MIN_WORDS):
  """Programs lowered in this block (train steps) unroll only their draws of at least
  `min_words` words, where `unroll_threefry_on_cpu` has registered the rule."""
  token = _UNROLL_FROM.set(min_words)
  try:
    yield
  finally:
    _UNROLL_FROM.reset(token)
