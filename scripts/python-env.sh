#!/usr/bin/env bash
# Create (or refresh) the Python virtualenv that solidflow's Dask bridge and the
# Dask integration tests use, and print the path of its python interpreter.
#
#   scripts/python-env.sh            # -> /path/to/repo/.venv/bin/python
#   SOLIDFLOW_PYTHON=$(scripts/python-env.sh) cargo test
#
# Idempotent: the venv is created once; pip only runs again when
# python/requirements.txt or python/requirements-dev.txt (pytest, ruff for the
# bridge's own tests) changed since the last successful install.
# Needs python3 (>= 3.10) with the venv module, and network access to PyPI.
# Environment: PYTHON3 (interpreter used to create the venv, default python3),
#              SOLIDFLOW_VENV (venv location, default <repo>/.venv).
set -euo pipefail

die() { printf 'python-env.sh: error: %s\n' "$*" >&2; exit 1; }

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
requirements="$repo_root/python/requirements.txt"
requirements_dev="$repo_root/python/requirements-dev.txt"
venv="${SOLIDFLOW_VENV:-$repo_root/.venv}"
python3_bin="${PYTHON3:-python3}"

[ -f "$requirements" ] || die "missing $requirements"

command -v "$python3_bin" >/dev/null 2>&1 \
  || die "'$python3_bin' not found on PATH. Install Python 3.10+ (Debian/Ubuntu: apt-get install python3 python3-venv), or set PYTHON3=/path/to/python3."

"$python3_bin" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
  || die "$("$python3_bin" --version 2>&1) is too old: dask/distributed 2026.x need Python 3.10+. Set PYTHON3=/path/to/python3.10+."

# CPython gh-106883: before 3.11.9 / 3.12.3, a Dask worker can deadlock (its profiler's
# sys._current_frames + a GC callback + a thread starting); a long Dask run then stalls
# for minutes (docs/benchmarks.md, "Per-step cost with size on Dask").
"$python3_bin" -c 'import sys; v = sys.version_info[:3]; sys.exit(1 if (3, 11) <= v < (3, 11, 9) or (3, 12) <= v < (3, 12, 3) else 0)' \
  || printf 'python-env.sh: warning: %s has CPython bug gh-106883 (Dask workers can deadlock in long runs); use Python >= 3.11.9, >= 3.12.3 or 3.13 (PYTHON3=...).\n' "$("$python3_bin" --version 2>&1)" >&2

"$python3_bin" -c 'import venv, ensurepip' >/dev/null 2>&1 \
  || die "'$python3_bin' has no working venv/ensurepip module. Debian/Ubuntu: apt-get install python3-venv (or python3.X-venv matching '$("$python3_bin" --version 2>&1)')."

venv_python="$venv/bin/python"
if [ ! -x "$venv_python" ] || ! "$venv_python" -c 'import sys' >/dev/null 2>&1; then
  rm -rf "$venv"
  "$python3_bin" -m venv "$venv" >&2 || die "'$python3_bin -m venv $venv' failed (see above). Debian/Ubuntu: apt-get install python3-venv."
fi

stamp="$venv/.solidflow-requirements.sha256"
want=$(cat "$requirements" "$requirements_dev" | sha256sum | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
if [ "$want" != "$have" ] || ! "$venv_python" -c 'import distributed' >/dev/null 2>&1; then
  "$venv_python" -m pip install --quiet --disable-pip-version-check --no-input -r "$requirements_dev" >&2 \
    || die "pip install -r $requirements_dev into $venv failed (see above). It needs network access to PyPI."
  "$venv_python" -c 'import dask, distributed' \
    || die "dask/distributed are not importable from $venv_python after installing"
  printf '%s\n' "$want" > "$stamp"
fi

printf '%s\n' "$venv_python"
