#!/usr/bin/env bash
# The short fuzz run CI does: `run-ci.sh [SECONDS]` (default 20) runs the
# env_parse target for that long and fails on any crash.
#
# cargo fuzz passes -Z flags (sanitizers) to rustc, which only nightly
# accepts; the machine has the stable toolchain only, so RUSTC_BOOTSTRAP=1
# lets stable rustc take them. cargo-fuzz itself comes from scripts/setup
# (cached in $KERNEX_CACHE), or is installed here the same way.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
seconds=${1:-20}

: "${KERNEX_CACHE:=/var/cache/kernex-ci}"
export PATH="$KERNEX_CACHE/cargo-bin/bin:$PATH"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    CARGO_TARGET_DIR="$KERNEX_CACHE/cargo-install-target" \
        cargo install --locked --root "$KERNEX_CACHE/cargo-bin" cargo-fuzz --version 0.13.2
fi

export RUSTC_BOOTSTRAP=1
# Build outside the clone so later runs reuse it and the tree stays clean.
export CARGO_TARGET_DIR="$KERNEX_CACHE/fuzz-target"
# Whatever flags an outer cargo set are not for this build.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/corpus" "$work/artifacts"

cd "$here"
# New inputs go to the scratch corpus (first directory); the checked-in
# seeds are only read.
cargo fuzz run env_parse "$work/corpus" "$here/seeds" -- \
    -max_total_time="$seconds" -max_len=70000 -artifact_prefix="$work/artifacts/" \
    -print_final_stats=1
