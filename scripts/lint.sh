#!/usr/bin/env bash
# The linters of the field, run by .ci/run before the tests:
#   1. rustfmt        cargo fmt --all -- --check (rustfmt.toml: 120 wide)
#   2. clippy         every crate and target, the workspace's [lints] table, warnings as errors
#   3. plpgsql_check  every PL/pgSQL function of the extension (scripts/plpgsql_check.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/stageflow-target}"
say() { printf '\033[1m== %s\033[0m\n' "$*"; }

# What a fresh clone lacks first: clippy builds every crate (GDAL's, pgrx's bindings) and
# plpgsql_check needs this checkout's extension installed (scripts/setup.sh, as scripts/test.sh).
scripts/setup.sh
if command -v rustup >/dev/null; then rustup component add rustfmt clippy >/dev/null 2>&1 || true; fi

say "rustfmt"
cargo fmt --all -- --check

say "clippy"
cargo clippy --workspace --all-targets --features stageflow-cli/geo -- -D warnings

say "plpgsql_check"
# Every PL/pgSQL function of the extension through plpgsql_check, all its warnings on, in a
# throwaway cluster of its own (scripts/plpgsql_check.sh). The extension must be installed first:
# scripts/setup.sh (above) installed it (postgresql-15-plpgsql-check among the apt packages).
scripts/plpgsql_check.sh
