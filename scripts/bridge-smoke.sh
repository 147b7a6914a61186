#!/usr/bin/env bash
# End-to-end checks of the Dask bridge against real Dask processes (a LocalCluster
# the bridge creates, and real `dask scheduler` / `dask worker` processes). See
# scripts/bridge-smoke.py.
#   scripts/bridge-smoke.sh [local] [real]
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${SOLIDFLOW_PYTHON:-$("$repo_root/scripts/python-env.sh")}
exec "$python" "$repo_root/scripts/bridge-smoke.py" "$@"
