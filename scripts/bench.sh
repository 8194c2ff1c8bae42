#!/usr/bin/env bash
# Builds Stageflow optimised (the extension, installed into the system's PostgreSQL, or the one
# whose pg_config PG_CONFIG names, and the `stageflow` command) and runs `stageflow bench` on a
# private cluster in ./.stageflow-bench (with that PostgreSQL's programs).
# Arguments go to `stageflow bench` (--clients, --quick, --out). Results: bench/results/<date>.json.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/stageflow-target}"
export PATH="$HOME/.cargo/bin:$PATH"
if [ -n "${PG_CONFIG:-}" ]; then
    STAGEFLOW_PG_BINDIR="$("$PG_CONFIG" --bindir)"
    export STAGEFLOW_PG_BINDIR
fi
STAGEFLOW_PROFILE=release "$repo/scripts/setup.sh" >&2
cargo build --quiet --release --manifest-path "$repo/Cargo.toml" -p stageflow-cli --features geo
cd "$repo"
exec "$CARGO_TARGET_DIR/release/stageflow" bench "$@"
