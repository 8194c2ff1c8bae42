#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh), builds the `stageflow` command, puts it on the PATH
# (a link ~/.cargo/bin/stageflow to the build in $CARGO_TARGET_DIR, so it follows every rebuild)
# and runs `stageflow demo` in the current directory: hello_world on a private cluster in
# ./.stageflow, created on the first run and reused after. Arguments go to `stageflow demo` (--n,
# --workers, --stop; `geo` or --geo runs process_raster on a Landsat scene and a generated
# 8192 x 8192 raster, built with GDAL).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/stageflow-target}"
user_path="$PATH"
bindir="$HOME/.cargo/bin"
export PATH="$bindir:$PATH"
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

# The commands the demo suggests at its end (`stageflow jobs`, `stageflow status JOB`) need
# `stageflow` on the PATH. A file there that is not a link (a `cargo install`) is left alone.
link="$bindir/stageflow"
if [ -L "$link" ] || [ ! -e "$link" ]; then
    mkdir -p "$bindir"
    ln -sfn "$stageflow" "$link"
    on_path="Linked $link -> $stageflow"
else
    on_path="$link is not a link this script made: left as it is (the demo's build is $stageflow)"
fi
found="$(PATH="$user_path"; hash -r; command -v stageflow || true)"
if [ "$found" = "$link" ]; then
    on_path="$on_path: \`stageflow\` is on your PATH."
elif [ -z "$found" ]; then
    on_path="$on_path, but $bindir is not on your PATH: export PATH=\"$bindir:\$PATH\""
else
    on_path="$on_path, but your PATH finds $found first."
fi

status=0
"$stageflow" demo "$@" || status=$?
printf '\n%s\n' "$on_path"
echo "stageflow finds the demo cluster through ./.stageflow: run it from $PWD (or pass --database-url)."
exit "$status"
