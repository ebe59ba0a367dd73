"""XLA_FLAGS for a test's subprocess that needs several CPU devices."""

import os


def with_host_devices(n: int) -> str:
  """XLA_FLAGS that give the CPU backend `n` devices and keep the suite's own flags
  (tests/conftest.py)."""
  return f"--xla_force_host_platform_device_count={n} {os.environ.get('XLA_FLAGS', '')}".strip()
