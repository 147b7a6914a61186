#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need (the pinned
# Python venv with dask/distributed, the s3s-fs S3 test server), checks formatting,
# lints, docs, and runs every test against real processes.
#
#   scripts/test.sh
#
# Needs: cargo (rustup toolchain), python3 with venv, network access to crates.io and PyPI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "Python venv with pinned dask + distributed"
SOLIDFLOW_PYTHON="$(scripts/python-env.sh)"
export SOLIDFLOW_PYTHON

step "S3-compatible test server (s3s-fs)"
SOLIDFLOW_S3S_FS="$(scripts/s3-server.sh)"
export SOLIDFLOW_S3S_FS

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
