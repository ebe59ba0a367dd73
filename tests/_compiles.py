"""Counting the XLA compilations JAX asks for, by jitted function name.

JAX records one backend-compile duration event (jax.monitoring) for every compilation it asks
XLA or the persistent cache for, with the function's name; a program found in JAX's in-process
caches records none.
"""

import collections

import jax

BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


class CompileRequests:
  """`with CompileRequests() as c: ...`, then c.by_name: Counter of function names compiled."""

  def __init__(self):
    self.by_name = collections.Counter()

  def _listener(self, event, seconds, **kwargs):
    if event == BACKEND_COMPILE_EVENT:
      self.by_name[kwargs.get('fun_name', '?')] += 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)
