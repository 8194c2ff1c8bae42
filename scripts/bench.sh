#!/usr/bin/env bash
# Builds Stageflow optimised (the extension, installed into the system's PostgreSQL, and the
# `stageflow` command) and runs `stageflow bench` on a private cluster in ./.stageflow-bench.
# Arguments go to `stageflow bench` (--clients, --quick, --out). Results: bench/results/<date>.json.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/stageflow-target}"
export PATH="$HOME/.cargo/bin:$PATH"
STAGEFLOW_PROFILE=release "$repo/scripts/setup.sh" >&2
cargo build --quiet --release --manifest-path "$repo/Cargo.toml" -p stageflow-cli --features geo
cd "$repo"
exec "$CARGO_TARGET_DIR/release/stageflow" bench "$@"
