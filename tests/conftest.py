"""One persistent XLA compilation cache per test worker, for every run that does not name its own
(`train.compilation_cache_dir` unset reads JAX_COMPILATION_CACHE_DIR): the tiny configs' programs
then compile once per worker instead of once per test, in process and in subprocesses alike."""

import os

import pytest


@pytest.fixture(scope='session', autouse=True)
def shared_compilation_cache(tmp_path_factory):
  path = tmp_path_factory.getbasetemp() / 'xla_cache'
  path.mkdir(exist_ok=True)
  previous = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = str(path)
  yield path
  if previous is None:
    os.environ.pop('JAX_COMPILATION_CACHE_DIR', None)
  else:
    os.environ['JAX_COMPILATION_CACHE_DIR'] = previous
