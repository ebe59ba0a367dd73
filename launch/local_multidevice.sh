#!/usr/bin/env bash
# Runs training on N fake CPU devices (a data x model mesh), to try sharded configs without
# accelerators. Usage: launch/local_multidevice.sh N WORKDIR [extra main.py flags...]
# Example: launch/local_multidevice.sh 8 /tmp/mer8 --config.mesh.shape.data=4 --config.mesh.shape.model=2
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NUM_DEVICES WORKDIR [flags for mer_jax.main]" >&2
  exit 2
fi
n="$1"; workdir="$2"; shift 2
cd "$(dirname "$0")/.."
export XLA_FLAGS="--xla_force_host_platform_device_count=${n} ${XLA_FLAGS:-}"
exec python -m mer_jax.main --config "${CONFIG:-configs/default.py}" --workdir "$workdir" "$@"
