#!/usr/bin/env bash
# Runs training on N fake CPU devices (a data x model mesh), to try sharded configs without
# accelerators. Usage: launch/local_multidevice.sh N WORKDIR [extra main.py flags...]
# Example: launch/local_multidevice.sh 8 /tmp/mer8 --config.mesh.shape.data=4 \
#   --config.mesh.shape.model=2
# Python: $PYTHON, else the repo's .venv, else python3 (an activated venv's, if any).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: [PYTHON=/path/to/python] $0 NUM_DEVICES WORKDIR [flags for mer_jax.main]" >&2
  exit 2
fi
n="$1"; workdir="$2"; shift 2
cd "$(dirname "$0")/.."
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
if ! "$python" -c 'import mer_jax' 2>/dev/null; then
  echo "$0: $python cannot import mer_jax; set PYTHON=/path/to/venv/bin/python" \
    "(or pip install -e . into $python)" >&2
  exit 2
fi
export XLA_FLAGS="--xla_force_host_platform_device_count=${n} ${XLA_FLAGS:-}"
exec "$python" -m mer_jax.main --config "${CONFIG:-configs/default.py}" --workdir "$workdir" "$@"
