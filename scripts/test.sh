#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need (the pinned
# Python venv with dask/distributed, the s3s-fs S3 test server, Debian's headless Chromium
# for the web page tests), checks formatting,
# lints, docs, and runs every test against real processes.
#
#   scripts/test.sh
#
# Needs: cargo (rustup toolchain), python3 with venv, apt-get (root or sudo) when Chromium is
# missing, network access to crates.io, PyPI and Debian's packages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "Python venv with pinned dask + distributed"
SOLIDFLOW_PYTHON="$(scripts/python-env.sh)"
export SOLIDFLOW_PYTHON

step "S3-compatible test server (s3s-fs)"
SOLIDFLOW_S3S_FS="$(scripts/s3-server.sh)"
export SOLIDFLOW_S3S_FS

step "Headless Chromium for the web page tests (Debian's chromium + chromium-driver)"
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = 0 ]; then apt_get=(apt-get); else apt_get=(sudo apt-get); fi
  if ! { "${apt_get[@]}" update -qq && DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y -qq chromium chromium-driver; }; then
    echo "error: cannot install chromium and chromium-driver with apt-get; the web page tests (tests/ui_browser.rs) need /usr/bin/chromium" >&2
    exit 1
  fi
fi
/usr/bin/chromium --version >&2 || { echo "error: /usr/bin/chromium does not run" >&2; exit 1; }

step "ruff check (the Dask bridge's Python package)"
"$SOLIDFLOW_PYTHON" -m ruff check crates/solidflow/src/executor/dask/bridge python

step "pytest (the Dask bridge's Python package)"
"$SOLIDFLOW_PYTHON" -m pytest -q python/tests

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet

step "cargo test"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked -- --test-threads=2 2>&1 | tee "$log"
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "\nsolidflow: %d passed, %d failed\n", p, f }' "$log"
