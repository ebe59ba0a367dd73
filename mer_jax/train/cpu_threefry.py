"""Threefry, JAX's default PRNG, without its while loop on CPU.

JAX lowers the threefry2x32 hash as a five-trip `fori_loop` on CPU (smaller programs, quicker
compiles) and unrolled everywhere else. XLA's CPU runtime pays for each trip of that loop, and
every dropout mask and every rng stream's `fold_in` goes through one. At the authors' MELD sizes
on this project's 2-core development machine, one [48, 1024] dropout mask took about 330 µs
rolled and 150 µs unrolled, and the visual student's train step 10.2 ms rolled against 6.5 ms
unrolled (`python -m mer_jax.bench`, one run each way).

`unroll_threefry_on_cpu()` makes the CPU use JAX's own unrolled lowering as well. It is the same
hash, so every random bit, and so every run, checkpoint and result, is unchanged; only programs
with random draws compile a little slower. The lowering rule is JAX-internal: where the installed
JAX does not have it under a known name, the call logs a warning, changes nothing and returns
False. Call it before the first jitted function with random draws is traced: programs lowered
earlier keep the loop.
"""

from __future__ import annotations

import importlib

from absl import logging
from jax.interpreters import mlir

# Where JAX has kept the threefry primitive and its unrolled lowering rule.
_MODULES = ('jax._src.random.threefry2x32', 'jax._src.prng')


def unroll_threefry_on_cpu() -> bool:
  """Registers JAX's unrolled threefry2x32 lowering for CPU; False where it cannot be found."""
  for name in _MODULES:
    try:
      module = importlib.import_module(name)
    except ImportError:
      continue
    primitive = getattr(module, 'threefry2x32_p', None)
    rule = getattr(module, '_threefry2x32_lowering_rule', None)
    if primitive is not None and rule is not None:
      mlir.register_lowering(primitive, rule, platform='cpu')
      return True
  logging.warning('this JAX has no unrolled threefry lowering under %s; random draws on CPU keep '
                  'their while loop (slower steps, same numbers)', ' or '.join(_MODULES))
  return False
