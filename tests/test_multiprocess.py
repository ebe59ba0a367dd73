"""Two JAX processes on localhost (CPU, gloo collectives), each reading only its own sub-batch of
every step, train the same run as one process with two devices building both sub-batches: same
results and test predictions. Only process 0 writes reports and results."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from mer_jax.experiments import runs
from tests import _xla_flags

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ('--config', 'configs/default.py:tiny', '--config.train.epochs=1',
        "--config.train.stages=('teacher',)", '--config.train.progress_bar=False')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def env(cache, devices: int):
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', OMP_NUM_THREADS='1',
              XLA_FLAGS=_xla_flags.with_host_devices(devices),
              JAX_COMPILATION_CACHE_DIR=str(cache))


def test_two_processes_equal_one_process_with_two_devices(tmp_path):
  single = tmp_path / 'single'
  # Two sub-batches per step, as the two processes build (one each, reading only its own).
  proc = subprocess.run([sys.executable, '-m', 'mer_jax.main', *ARGS, '--workdir', str(single),
                         '--config.batch.groups=2',
                         f'--config.train.compilation_cache_dir={tmp_path / "cache1"}'],
                        cwd=ROOT, env=env(tmp_path / 'cache1', 2), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]

  multi = tmp_path / 'multi'
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'mer_jax.main', *ARGS, '--workdir', str(multi),
       f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}',
       f'--config.train.compilation_cache_dir={tmp_path / f"cache_p{i}"}'],
      cwd=ROOT, env=env(tmp_path / f'cache_p{i}', 1), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert 'mesh {\'data\': 2, \'model\': 1}' in outputs[0][0] + outputs[0][1]
  assert 'test weighted F1' in outputs[0][0] and 'test weighted F1' not in outputs[1][0]
  for i, (out, err) in enumerate(outputs):
    assert f'process {i} reads and builds sub-batch(es) [{i}]' in out + err

  expected = runs.load_results(str(single))['teacher']
  got = runs.load_results(str(multi))['teacher']
  for key in ('test_weighted_f1', 'test_macro_f1', 'test_accuracy', 'dev_weighted_f1'):
    assert got[key] == expected[key], key
  a = runs.load_test_predictions(str(single), 'teacher')
  b = runs.load_test_predictions(str(multi), 'teacher')
  np.testing.assert_array_equal(a['records'], b['records'])
  np.testing.assert_allclose(a['probs'], b['probs'], atol=1e-6)
