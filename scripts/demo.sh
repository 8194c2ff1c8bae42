#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh), builds the `stageflow` command and runs
# `stageflow demo` in the current directory: hello_world on a private cluster in ./.stageflow,
# created on the first run and reused after. Arguments go to `stageflow demo` (--n, --workers, --stop;
# `geo` or --geo runs process_raster on a Landsat scene and a generated 8192 x 8192 raster, built with GDAL).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/stageflow-target}"
export PATH="$HOME/.cargo/bin:$PATH"
stageflow="$CARGO_TARGET_DIR/debug/stageflow"

if [ "${1:-}" = --stop ] && [ -x "$stageflow" ]; then
    exec "$stageflow" demo --stop
fi
# The demo cluster preloads the extension's .so, which installing overwrites: stop it first (its
# data stays; the demo starts it again).
[ -x "$stageflow" ] && "$stageflow" demo --stop >/dev/null 2>&1 || true
"$repo/scripts/setup.sh" >&2
features=()
case " $* " in *" --geo "* | *" geo "*) features=(--features geo) ;; esac
cargo build --quiet --manifest-path "$repo/Cargo.toml" -p stageflow-cli "${features[@]}"
exec "$stageflow" demo "$@"
