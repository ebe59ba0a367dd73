"""The unrolled threefry lowering on CPU: same random bits; no while loop but for the small draws
of train steps."""

import json
import subprocess
import sys

import pytest

# Draws what training draws (fold_in per stream, split, dropout masks, normal noise) in one jitted
# program, lowered inside `step_draws(min_words)` (argv[2]; 'none': outside it), and says how
# many loops its compiled CPU program has. Run in a fresh process, as the lowering is
# registered process-wide.
_PROBE = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from mer_jax.train import cpu_backend
unrolled = cpu_backend.unroll_threefry_on_cpu() if sys.argv[1] == 'unrolled' else None

def draws(key):
  streams = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(5))
  a, b = jax.random.split(streams[3])
  return {'streams': jax.random.key_data(streams),
          'split': jax.random.key_data(jnp.stack([a, b])),
          'mask': jax.random.bernoulli(a, 0.85, (48, 1024)),
          'normal': jax.random.normal(b, (7, 33)),
          'bits': jax.random.bits(jax.random.fold_in(key, 11), (3, 1001), jnp.uint32)}

fn = jax.jit(draws)
key = jax.random.key(20260)
if sys.argv[2] == 'none':
  hlo = fn.lower(key).compile().as_text()
else:
  with cpu_backend.step_draws(int(sys.argv[2])):
    hlo = fn.lower(key).compile().as_text()
out = {k: np.asarray(v).astype(np.int64 if v.dtype != np.float32 else np.float64).tolist()
       for k, v in fn(key).items()}
print(json.dumps({'unrolled': unrolled, 'loops': hlo.count(' while('), 'draws': out}))
"""


def _probe(mode: str, min_words: str) -> dict:
  out = subprocess.run([sys.executable, '-c', _PROBE, mode, min_words], capture_output=True,
                       text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_unrolled_threefry_draws_the_same_bits_without_a_loop():
  rolled = _probe('rolled', 'none')
  if not rolled['loops']:
    pytest.skip('this JAX does not loop threefry on CPU: nothing to unroll')
  unrolled = _probe('unrolled', 'none')
  if not unrolled['unrolled']:
    pytest.skip('this JAX keeps its unrolled threefry lowering elsewhere (module left as is)')
  assert unrolled['loops'] == 0
  assert unrolled['draws'] == rolled['draws']
  # The draws are real draws: masks near the keep rate, distinct streams.
  mask = [x for row in rolled['draws']['mask'] for x in row]
  assert 0.83 < sum(mask) / len(mask) < 0.87
  assert len({tuple(s) for s in rolled['draws']['streams']}) == 5


def test_train_steps_keep_the_loop_for_small_draws_only():
  rolled = _probe('rolled', 'none')
  if not rolled['loops']:
    pytest.skip('this JAX does not loop threefry on CPU: nothing to unroll')
  if not _probe('unrolled', 'none')['unrolled']:
    pytest.skip('this JAX keeps its unrolled threefry lowering elsewhere (module left as is)')
  # In a step program, draws of at least min_words words are unrolled: of the probe's draws only
  # the [48, 1024] mask (49,152 words) and the [3, 1001] bits (3,003) reach 3,003; the others
  # (keys, the [7, 33] normals) are small and keep their loops.
  partly = _probe('unrolled', '3003')
  assert 0 < partly['loops'] == rolled['loops'] - 2 and partly['draws'] == rolled['draws']
  only_mask = _probe('unrolled', '3004')
  assert only_mask['loops'] == rolled['loops'] - 1 and only_mask['draws'] == rolled['draws']
