"""The same train step on 1 device and on a 4x2 mesh of 8 fake devices gives the same numbers."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_device_and_eight_device_mesh_agree(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', '_sharding_parity.py'),
                         str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  assert proc.returncode == 0 and lines, proc.stderr[-4000:]
  result = json.loads(lines[0][len('RESULT '):])
  one, eight = result['one'], result['eight']
  assert set(one) == {'teacher', 'audio', 'fusion'}
  for stage in one:
    np.testing.assert_allclose(eight[stage]['loss'], one[stage]['loss'], rtol=1e-4, err_msg=stage)
    np.testing.assert_allclose(eight[stage]['grad_norm'], one[stage]['grad_norm'], rtol=1e-4,
                               err_msg=stage)
    np.testing.assert_allclose(eight[stage]['params'], one[stage]['params'], rtol=1e-4,
                               atol=1e-5, err_msg=stage)
  # The 8-device run really was sharded: the MoE experts are split over the model axis.
  assert any("'model'" in spec for spec in eight['fusion']['specs']), eight['fusion']['specs']
