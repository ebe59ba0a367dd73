"""TimedCompile: compiled once, on the first call's arguments, with its seconds recorded, and the
same results as the jitted function."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from mer_jax.run import job
from mer_jax.train import compile_timing
from mer_jax.train import cpu_backend


def test_compiles_once_and_matches_the_jitted_function():
  traces = []

  def f(x, y):
    traces.append(1)
    return jnp.tanh(x @ y) * 2.0

  timed = compile_timing.TimedCompile(jax.jit(f))
  assert timed.seconds is None
  x, y = jnp.arange(12.0).reshape(3, 4) / 10, jnp.ones((4, 2))
  out = [timed(x, y), timed(x + 1, y)]
  assert len(traces) == 1  # traced, lowered and compiled once
  assert timed.lower_seconds > 0 and timed.compile_seconds > 0
  assert timed.seconds == timed.lower_seconds + timed.compile_seconds
  np.testing.assert_allclose(out[0], np.tanh(np.asarray(x) @ np.asarray(y)) * 2.0, rtol=1e-6)
  np.testing.assert_array_equal(out[1], jax.jit(f)(x + 1, y))


def test_fast_compile_asks_xla_for_llvm_level_zero_on_cpu_and_keeps_the_results(monkeypatch):
  assert jax.default_backend() == 'cpu'
  assert cpu_backend.compiler_options(False) is None
  assert cpu_backend.compiler_options(True) == {'xla_backend_optimization_level': 0}
  asked = []
  options_of = cpu_backend.compiler_options
  monkeypatch.setattr(cpu_backend, 'compiler_options',
                      lambda fast: asked.append(fast) or options_of(fast))

  def f(x):
    return jnp.sum(jnp.exp(jnp.sin(x) * 3.0) / (1.0 + x * x), axis=-1)

  x = jnp.linspace(-3.0, 3.0, 4096).reshape(16, 256)
  fast = compile_timing.TimedCompile(jax.jit(f), fast_compile=True)(x)
  default = compile_timing.TimedCompile(jax.jit(f))(x)
  assert asked == [True, False]
  np.testing.assert_allclose(fast, default, rtol=1e-6)


def test_donated_state_stays_donated():
  step = compile_timing.TimedCompile(jax.jit(lambda s, x: (s + x, s.sum()), donate_argnums=(0,)))
  state = jnp.zeros(8)
  for i in range(3):
    state, total = step(state, jnp.full(8, 1.0))
  np.testing.assert_array_equal(state, np.full(8, 3.0))
  assert float(total) == 16.0


def test_the_cache_folder_is_the_config_s_then_the_environment_s_then_the_workdir_s(monkeypatch):
  config = default.get_config('tiny')
  before = jax.config.jax_compilation_cache_dir
  try:
    monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '/env/cache')
    job.enable_compilation_cache(config, '/w')
    assert jax.config.jax_compilation_cache_dir == '/env/cache'
    monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')
    job.enable_compilation_cache(config, '/w')
    assert jax.config.jax_compilation_cache_dir == '/w/jax_cache'
    config.train.compilation_cache_dir = '/mine'
    monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '/env/cache')
    job.enable_compilation_cache(config, '/w')
    assert jax.config.jax_compilation_cache_dir == '/mine'
  finally:
    jax.config.update('jax_compilation_cache_dir', before)
