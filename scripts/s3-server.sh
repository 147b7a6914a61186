#!/usr/bin/env bash
# Installs the S3-compatible test server (s3s-fs) used by the S3 storage tests and
# benchmarks into <repo>/.tools, if it is not there yet, and prints its path.
#
#   scripts/s3-server.sh            # install if missing, print the binary path
#
# Idempotent: a second run only prints the path. s3s-fs is pinned to 0.14.1 because
# later releases need a newer Rust than the workspace's rust-version.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="$repo/.tools"
bin="$root/bin/s3s-fs"
version="0.14.1"

if [[ -x "$bin" ]] && "$bin" --version 2>/dev/null | grep -q "$version"; then
    echo "$bin"
    exit 0
fi

echo "installing s3s-fs $version into $root (takes a few minutes)..." >&2
cargo install s3s-fs --version "$version" --features binary --locked --root "$root" >&2
echo "$bin"
