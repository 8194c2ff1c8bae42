#!/usr/bin/env bash
# Installs everything Stageflow needs on Debian 12 and installs the extension into the system's
# PostgreSQL 15. Safe to run again: every step is skipped when already done.
#   apt packages -> cargo-pgrx 0.18.1 -> pgrx init -> pgmq's SQL (from the pgmq crate) -> stageflow
# `scripts/setup.sh deps` stops before building the extension. With STAGEFLOW_SETUP_TIER=core
# (what `scripts/test.sh --core` sets) it leaves out what only the geospatial, browser and Python
# tests need: GDAL, PostGIS, Chromium, python3-psycopg, the Python tools venv, the geodata, npm.
# Environment: CARGO_TARGET_DIR (default /var/tmp/stageflow-target), STAGEFLOW_PROFILE=release to
# install an optimised build, PG_CONFIG (default Debian's PostgreSQL 15) to install pgmq and the
# extension into another installation of PostgreSQL 15 (a relocated copy), STAGEFLOW_PGFLOW_DIR
# (default /var/tmp/stageflow-pgflow) for the benchmark's copy of pgflow's SQL.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/stageflow-target}"
PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"
PGRX_VERSION=0.18.1
say() { printf '\033[1m== %s\033[0m\n' "$*"; }

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# chromium: the dashboard's browser test (driven by playwright-core from npm, no browser download).
# libgdal-dev, gdal-bin, python3-gdal: the geospatial job types and GDAL's COG validator.
# postgresql-15-postgis-3: stage_vector / export_geoparquet. python3-venv: the checking tools below.
# postgresql-15-plpgsql-check: the PL/pgSQL linter of scripts/lint.sh (scripts/plpgsql_check.sh).
core_tier=false
[ "${STAGEFLOW_SETUP_TIER:-full}" = core ] && core_tier=true
packages=(postgresql-15 postgresql-server-dev-15 libclang-dev clang pkg-config sudo postgresql-15-plpgsql-check openssl curl)
if ! $core_tier; then
    packages+=(python3-psycopg chromium libgdal-dev gdal-bin python3-gdal postgresql-15-postgis-3 python3-venv)
    command -v npm >/dev/null || packages+=(nodejs npm)
fi
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "apt: installing ${missing[*]}"
    sudo_if_needed apt-get -o DPkg::Lock::Timeout=600 update -qq
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}"
else
    say "apt: packages present"
fi

if cargo pgrx --version 2>/dev/null | grep -q " $PGRX_VERSION\$"; then
    say "cargo-pgrx $PGRX_VERSION present"
else
    say "cargo-pgrx: installing $PGRX_VERSION (about 15 minutes on 2 cores)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

# pgrx-pg-sys rebuilds whenever this file changes: init only when the pg15 line is missing.
if ! grep -q '^pg15 = ' "${PGRX_HOME:-$HOME/.pgrx}/config.toml" 2>/dev/null; then
    say "pgrx: init pg15"
    cargo pgrx init --pg15 "$PG_CONFIG"
fi

# pgmq is pure SQL; its crate ships the extension script and control file.
sharedir="$("$PG_CONFIG" --sharedir)/extension"
if [ -f "$sharedir/pgmq.control" ] && grep -q "default_version = '1.11.1'" "$sharedir/pgmq.control"; then
    say "pgmq 1.11.1 present"
else
    say "pgmq: installing 1.11.1 from the pgmq crate"
    cargo fetch --locked --manifest-path scripts/pgmq/Cargo.toml
    crate_dir=$(cargo metadata --locked --format-version 1 --manifest-path scripts/pgmq/Cargo.toml |
        python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="pgmq").rsplit("/",1)[0])')
    embedded="$crate_dir/src/install/embedded"
    sudo_if_needed install -m 644 "$embedded/pgmq.control" "$sharedir/pgmq.control"
    sudo_if_needed install -m 644 "$embedded/sql/pgmq.sql" "$sharedir/pgmq--1.11.1.sql"
fi

# pgflow, the benchmark's closest peer (`stageflow bench` loads its SQL beside Stageflow's): the
# migrations inside the @pgflow/core npm package, pinned by version and by the registry's sha512,
# checked here, unpacked into a cache so that the benchmark runs offline afterwards.
PGFLOW_VERSION=0.8.1
PGFLOW_INTEGRITY=sha512-ElLPkKGPjttBsjlLJfn4CcMeiFwtuUhUNuFADwhQjdrg+netkeONY12oxcbPSBMqBWXVAuKriLq+1T1dCPEWPQ==
pgflow_dir="${STAGEFLOW_PGFLOW_DIR:-/var/tmp/stageflow-pgflow}/core-$PGFLOW_VERSION"
if [ -d "$pgflow_dir/package/dist/supabase/migrations" ]; then
    say "pgflow $PGFLOW_VERSION present in $pgflow_dir"
elif ! command -v npm >/dev/null; then
    say "pgflow: npm missing, not fetched (stageflow bench skips its pgflow lines)"
else
    say "pgflow: fetching @pgflow/core@$PGFLOW_VERSION into $pgflow_dir"
    rm -rf "$pgflow_dir.tmp" && mkdir -p "$pgflow_dir.tmp"
    (cd "$pgflow_dir.tmp" && npm pack --silent "@pgflow/core@$PGFLOW_VERSION" >/dev/null)
    tarball="$pgflow_dir.tmp/pgflow-core-$PGFLOW_VERSION.tgz"
    got="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
    if [ "$got" != "$PGFLOW_INTEGRITY" ]; then
        echo "pgflow: $tarball has $got, expected $PGFLOW_INTEGRITY" >&2
        exit 1
    fi
    tar -xzf "$tarball" -C "$pgflow_dir.tmp" && mv "$pgflow_dir.tmp" "$pgflow_dir"
fi

if $core_tier; then
    say "core tier: no geodata, Python tools or browser test packages"
else
# Real geodata that installs offline, unpacked from Debian packages without installing R or
# geopandas: a Landsat 7 scene and an elevation model (r-cran-stars), North Carolina counties
# (r-cran-sf, GeoPackage), London cycle-hire points (r-cran-spdata, GeoJSON), Natural Earth
# countries and cities (python3-geopandas, Shapefile).
geodata=/var/tmp/stageflow-geodata
fetch_deb() { # package, directory, a file it must contain
    [ -f "$geodata/$2/$3" ] && return 0
    say "geodata: fetching $1"
    mkdir -p "$geodata"
    (cd "$geodata" && rm -f "$1"_*.deb && { apt-get download "$1" 2>/dev/null \
        || { sudo_if_needed apt-get -o DPkg::Lock::Timeout=600 update -qq && apt-get download "$1" 2>/dev/null; }; } \
        && dpkg-deb -x "$1"_*.deb "$2")
}
fetch_deb r-cran-stars stars usr/lib/R/site-library/stars/tif/L7_ETMs.tif
fetch_deb r-cran-sf sf usr/lib/R/site-library/sf/gpkg/nc.gpkg
fetch_deb r-cran-spdata spdata usr/lib/R/site-library/spData/shapes/cycle_hire.geojson
fetch_deb python3-geopandas geopandas usr/lib/python3/dist-packages/geopandas/datasets/naturalearth_lowres/naturalearth_lowres.shp
say "geodata present in $geodata"

# Independent checkers the tests run on our outputs (PyPI, in a private venv): rio-cogeo (COGs),
# pyarrow + geopandas (GeoParquet), moto's S3 server (container_inventory), standardwebhooks (the
# reference implementation that verifies our webhook signatures).
pytools=/var/tmp/stageflow-pytools
if "$pytools/bin/python" -c 'import rio_cogeo, pyarrow, geopandas, moto, standardwebhooks' 2>/dev/null; then
    say "python tools present"
else
    say "python tools: installing rio-cogeo, pyarrow, geopandas, moto[server], standardwebhooks into $pytools"
    /usr/bin/python3 -m venv "$pytools"
    "$pytools/bin/pip" install -q --disable-pip-version-check rio-cogeo pyarrow geopandas 'moto[server]' standardwebhooks
fi

browser_tests=crates/stageflow-http/tests/browser
if [ -d "$browser_tests/node_modules/playwright-core" ]; then
    say "npm: playwright-core present"
else
    say "npm: installing the browser test's playwright-core"
    npm ci --prefix "$browser_tests" --no-audit --no-fund --loglevel=error
fi
fi

[ "${1:-}" = deps ] && exit 0

say "stageflow: building and installing the extension"
profile_flag=()
[ "${STAGEFLOW_PROFILE:-debug}" = release ] && profile_flag=(--release)
# cargo pgrx copies the .so over the installed one in place, which would crash a running cluster
# that mapped it: unlinking it first leaves such a cluster on its old copy.
sudo_if_needed rm -f "$("$PG_CONFIG" --pkglibdir)/stageflow.so"
sudo_if_needed env "PATH=$PATH" "CARGO_TARGET_DIR=$CARGO_TARGET_DIR" "HOME=$HOME" \
    cargo pgrx install --pg-config "$PG_CONFIG" "${profile_flag[@]}"
# The install scripts of earlier versions (sql/versions/), beside the current one and the upgrade
# scripts pgrx copied: `CREATE EXTENSION stageflow VERSION '0.1.0'` then `ALTER EXTENSION stageflow
# UPDATE` is how the upgrade tests start.
current_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
for script in sql/versions/stageflow--*.sql; do
    [ "$script" = "sql/versions/stageflow--$current_version.sql" ] && continue
    sudo_if_needed install -m 644 "$script" "$("$PG_CONFIG" --sharedir)/extension/"
done
