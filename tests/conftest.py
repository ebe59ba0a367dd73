"""Session fixtures.

One persistent XLA compilation cache for the whole test session, for every run that does not name
its own (`train.compilation_cache_dir` unset reads JAX_COMPILATION_CACHE_DIR): the tiny configs'
programs then compile once per session instead of once per test, in process and in subprocesses
alike, whichever xdist worker runs them.

The workers share the folder above their own temporary folders. JAX writes cache entries without
locking unless the cache has a size limit, and a reader in another process could see a
half-written entry; a limit (larger than the suite ever fills) makes every read and write take
the cache's file lock.

Every program the tests compile, in this process and in subprocesses, is compiled with LLVM at
optimisation level 0 (TEST_XLA_FLAGS): most of the suite's time is XLA compiling small programs
that then run a few steps, and level 0 takes about a sixth off the suite on 2 cores
(docs/performance.md). It changes LLVM's code generation only, not XLA's graph optimisations or
IEEE arithmetic. An XLA_FLAGS that names its own `--xla_backend_optimization_level` is left as it
is: that is how to run the suite at another level.

Modules marked `slow` (15 s or more of tests in all on 2 cores) run first. Under
`-n 2 --dist loadfile` xdist hands each worker a whole module at a time, by default the modules
with the most tests first; the few-test modules that train whole runs then came last, and one
worker finished them alone while the other idled. With them first, the short modules fill in at
the end.
"""

import os
import sys
import types

TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

CACHE_LIMIT_BYTES = 8 << 30


def pytest_configure(config):
  if hasattr(config.option, 'loadscopereorder'):  # xdist: keep the order collected below
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  """Slow modules first, each module's tests together and in their own order (a stable sort)."""
  def fast(item):
    module = item.getparent(pytest.Module)
    return module is None or module.get_closest_marker('slow') is None
  items.sort(key=fast)


@pytest.fixture(scope='session', autouse=True)
def shared_compilation_cache(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  path = (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / 'xla_cache'
  path.mkdir(exist_ok=True)
  saved = {k: os.environ.get(k) for k in ('JAX_COMPILATION_CACHE_DIR',
                                          'JAX_COMPILATION_CACHE_MAX_SIZE')}
  os.environ['JAX_COMPILATION_CACHE_DIR'] = str(path)
  os.environ['JAX_COMPILATION_CACHE_MAX_SIZE'] = str(CACHE_LIMIT_BYTES)  # subprocesses
  limit = jax.config.jax_compilation_cache_max_size
  jax.config.update('jax_compilation_cache_max_size', CACHE_LIMIT_BYTES)  # this process
  yield path
  jax.config.update('jax_compilation_cache_max_size', limit)
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


@pytest.fixture(name='clean_flags')
def fixture_clean_flags(monkeypatch):
  """absl's flags as they were after the test: commands define theirs when they run. The usage
  comes from a `__main__` without a docstring, as under a console script."""
  app.define_help_flags()
  before, parsed = set(flags.FLAGS), flags.FLAGS.is_parsed()
  monkeypatch.setitem(sys.modules, '__main__', types.ModuleType('__main__'))
  yield
  for name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, name)
  if not parsed:
    flags.FLAGS.unparse_flags()
