#!/usr/bin/env bash
# The short fuzz run CI does: `run-ci.sh [SECONDS]` (default 35) splits that
# time evenly over every target in Cargo.toml and fails on any crash, leak,
# timeout or out-of-memory, or if a target does not run.
#
# Seeds are cut at run time from the golden bundles in ../tests/golden (the
# whole bundles, and their manifests, signatures, indexes, bita headers and
# member headers), plus chunks cut from golden/image.bin; nothing binary is
# checked in here.
#
# cargo fuzz passes -Z flags (sanitizers) to rustc, which only nightly
# accepts; the machine has the stable toolchain only, so RUSTC_BOOTSTRAP=1
# lets stable rustc take them. cargo-fuzz itself comes from scripts/setup
# (cached in $KERNEX_CACHE), or is installed here the same way.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
seconds=${1:-35}
golden="$here/../tests/golden"

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
cd "$here"
targets=$(cargo fuzz list)
[ -n "$targets" ] || { echo "run-ci.sh: no fuzz targets" >&2; exit 1; }
for t in $targets; do
    mkdir -p "$work/corpus/$t" "$work/seeds/$t"
done

# --- seeds -----------------------------------------------------------------
seeds="$work/seeds"
bundles=("$golden"/*.kxb)
[ -f "${bundles[0]}" ] || { echo "run-ci.sh: no golden bundles in $golden" >&2; exit 1; }
le_u64() { od -An -t u8 -j "$2" -N 8 "$1" | tr -d ' '; }
for kxb in "${bundles[@]}"; do
    name=$(basename "$kxb" .kxb)
    cp "$kxb" "$seeds/bundle/$name"
    head -c 512 "$kxb" >"$seeds/container_header/$name-manifest"
    x="$work/unpacked/$name"
    mkdir -p "$x"
    # Corrupt and truncated bundles unpack only in part; take what there is.
    tar -xf "$kxb" -C "$x" 2>/dev/null || true
    if [ -f "$x/manifest.json" ]; then
        cp "$x/manifest.json" "$seeds/manifest/$name"
        m=$(stat -c %s "$x/manifest.json")
        dd if="$kxb" of="$seeds/container_header/$name-signature" status=none \
            bs=512 skip=$((1 + (m + 511) / 512)) count=1
    fi
    if [ -f "$x/manifest.sig" ]; then cp "$x/manifest.sig" "$seeds/signature/$name"; fi
    for kxi in "$x"/*.kxi; do
        if [ -f "$kxi" ]; then cp "$kxi" "$seeds/index/$name-$(basename "$kxi")"; fi
    done
    for bita in "$x"/*.bita; do
        if [ -f "$bita" ] && [ "$(stat -c %s "$bita")" -ge 14 ]; then
            header_size=$(($(le_u64 "$bita" 6) + 14 + 8 + 64))
            head -c "$header_size" "$bita" >"$seeds/archive_header/$name-$(basename "$bita")"
        fi
    done
done
# Chunks (see fuzz_targets/chunk.rs): hash length byte 4 (= 16 bytes),
# source size, BLAKE2b-512 truncated to 16 bytes, then zstd or raw bytes.
le_u32_bytes() { printf "\\x$(printf %02x $(($1 & 255)))\\x$(printf %02x $(($1 >> 8 & 255)))\\x$(printf %02x $(($1 >> 16 & 255)))\\x$(printf %02x $(($1 >> 24 & 255)))"; }
chunk_seed() { # SOURCE-FILE OUT [zstd]
    local size
    size=$(stat -c %s "$1")
    {
        printf '\x04'
        le_u32_bytes "$size"
        b2sum -l 512 "$1" | cut -c1-32 | xxd -r -p
        if [ "${3:-}" = zstd ]; then zstd -q -c "$1"; else cat "$1"; fi
    } >"$2"
}
for at in 0 8192 204800; do
    head -c $((at + 4096)) "$golden/image.bin" | tail -c 4096 >"$work/chunk-$at"
    chunk_seed "$work/chunk-$at" "$seeds/chunk/zstd-$at" zstd
    chunk_seed "$work/chunk-$at" "$seeds/chunk/raw-$at"
done
# Patch tables (see fuzz_targets/patch.rs, the layout in src/patch.rs): one
# entry of one range, and two entries; and a zstd frame.
le_u64_bytes() { le_u32_bytes $(($1 & 0xffffffff)); le_u32_bytes $(($1 >> 32)); }
{
    printf 'KXPATCH1'; le_u64_bytes 1048576; le_u32_bytes 1; le_u32_bytes 0
    le_u32_bytes 0; le_u32_bytes 16; printf '\x01\x00\x00\x00'; le_u64_bytes 4096; le_u32_bytes 8192
} >"$seeds/patch/one"
{
    printf 'KXPATCH1'; le_u64_bytes 1048576; le_u32_bytes 2; le_u32_bytes 0
    le_u32_bytes 3; le_u32_bytes 10; printf '\x01\x00\x00\x00'; le_u64_bytes 0; le_u32_bytes 100
    le_u32_bytes 9; le_u32_bytes 20; printf '\x02\x00\x00\x00'; le_u64_bytes 4096; le_u32_bytes 8192
    le_u64_bytes 1048566; le_u32_bytes 10
} >"$seeds/patch/two"
zstd -q -c "$work/chunk-8192" >"$seeds/patch/frame"
for t in $targets; do
    if [ -z "$(ls -A "$seeds/$t")" ]; then
        echo "run-ci.sh: no seeds for target $t" >&2
        exit 1
    fi
done

# --- run -------------------------------------------------------------------
cargo fuzz build
count=$(wc -w <<<"$targets")
per=$((seconds / count))
[ "$per" -ge 1 ] || per=1
mkdir -p "$work/artifacts"
for t in $targets; do
    case $t in
        bundle) max_len=262144 ;;   # the golden bundles are ~100-180 KB
        manifest) max_len=70000 ;;  # past MAX_MANIFEST_SIZE
        *) max_len=16384 ;;
    esac
    echo "run-ci.sh: fuzzing $t for ${per}s" >&2
    # New inputs go to the scratch corpus (first directory); the seeds are
    # only read. A crash input is kept under $KERNEX_CACHE to reproduce with
    # `cargo fuzz run $t <file>`.
    if ! cargo fuzz run "$t" "$work/corpus/$t" "$seeds/$t" -- \
        -max_total_time="$per" -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$work/artifacts/" -print_final_stats=1; then
        kept="$KERNEX_CACHE/fuzz-artifacts/protocol"
        mkdir -p "$kept"
        cp -r "$work/artifacts/." "$kept/"
        echo "run-ci.sh: target $t failed; crash inputs kept in $kept" >&2
        exit 1
    fi
done
