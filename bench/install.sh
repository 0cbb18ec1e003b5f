#!/usr/bin/env bash
# Full local install against dd (prints numbers; it is not a test).
#
# An image of --size MiB (default 352): a quarter random, a quarter text
# (base64 of random: compresses about 4:3), half zeros, in 1 MiB blocks
# interleaved like a filesystem's. `kernex-image bundle create` bundles it;
# then, --runs times (default 3) and alternating so both see the same
# machine: `kernex-updater install BUNDLE` into a file-backed slot (no seed:
# every chunk read from the bundle, decompressed, hash-checked, written,
# then the slot synced and checked) and `dd if=IMAGE of=FILE bs=4M
# conv=fsync`. Prints each run and the ratio of the throughputs
# (install ÷ dd; the goal of issue 22 is ≥ 0.9).
#
# Usage: bench/install.sh [--size MiB] [--runs N] [--concurrency N] [--work-dir DIR]
set -euo pipefail

die() { echo "bench/install.sh: error: $*" >&2; exit 1; }
log() { printf '== [%3ds] %s\n' "$SECONDS" "$*" >&2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
size_mb=352
runs=3
concurrency=""
target_dir=${CARGO_TARGET_DIR:-$repo/target}
work=${BENCH_WORK_DIR:-$target_dir/bench-install}
while (($#)); do
    case $1 in
        --size) size_mb=${2:?}; shift 2 ;;
        --runs) runs=${2:?}; shift 2 ;;
        --concurrency) concurrency=${2:?}; shift 2 ;;
        --work-dir) work=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
[[ $size_mb =~ ^[0-9]+$ && $runs =~ ^[0-9]+$ ]] || die "--size and --runs take numbers"

if [[ -z ${KX:-} || -z ${KU:-} ]]; then
    log "building kernex-image and kernex-updater (release)"
    (cd "$repo" && cargo build --release --locked --quiet -p kernex-updater --no-default-features &&
        cargo build --release --locked --quiet -p kernex-image) || die "cargo build --release failed"
fi
kx=${KX:-$target_dir/release/kernex-image}
ku=${KU:-$target_dir/release/kernex-updater}

rm -rf "$work"
mkdir -p "$work/dev"
log "image: $size_mb MiB"
for ((i = 0; i < size_mb; i++)); do
    case $((i % 4)) in
        0) head -c 1048576 /dev/urandom ;;
        1) head -c 786432 /dev/urandom | base64 -w 0 ;;
        *) head -c 1048576 /dev/zero ;;
    esac
done >"$work/image.img"
"$kx" keys create --out "$work/keys" >/dev/null 2>&1 || die "kernex-image keys create failed"
log "bundle create"
"$kx" bundle create --compatible bench-x86_64 --version 1.0.0 --rootfs "$work/image.img" \
    --key "$work/keys/signing.key" --cert "$work/keys/signing.crt" --out "$work/image.kxb" \
    --json >/dev/null || die "bundle create failed"
cp "$work/keys/ca.crt" "$work/dev/keyring.pem"
link=""
[[ -n $concurrency ]] && link="fetch-concurrency = $concurrency"
cat >"$work/dev/system.toml" <<EOT
compatible = "bench-x86_64"
data-dir = "$work/dev/data"
keyring = "$work/dev/keyring.pem"
[slots.rootfs]
A = "$work/dev/slot-a.img"
B = "$work/dev/slot-b.img"
[bootloader]
backend = "file"
path = "$work/dev/boot-state"
booted-slot = "A"
[link]
$link
EOT
: >"$work/dev/slot-a.img"
now() { date +%s.%N; }
bytes=$(stat -c %s "$work/image.img")
bundle_bytes=$(stat -c %s "$work/image.kxb")
# Both inputs in the page cache, as for a bundle just downloaded.
cat "$work/image.img" "$work/image.kxb" >/dev/null

printf '\n%s MiB image (%s bytes), bundle %s bytes; %s, load %s\n\n' "$size_mb" "$bytes" "$bundle_bytes" \
    "$(nproc) cores" "$(cut -d' ' -f1-3 /proc/loadavg)"
echo "| run | kernex-updater install (s) | MiB/s | dd bs=4M conv=fsync (s) | MiB/s | install ÷ dd |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
sum_ratio=0
for ((r = 1; r <= runs; r++)); do
    rm -rf "$work/dev/data" "$work/dev/slot-b.img" "$work/dev/boot-state" "$work/dd.img"
    sync
    t0=$(now)
    "$ku" --config "$work/dev/system.toml" install "$work/image.kxb" >/dev/null || die "install failed"
    t1=$(now)
    cmp -s <(head -c "$bytes" "$work/dev/slot-b.img") "$work/image.img" || die "slot B is not the image"
    sync
    t2=$(now)
    dd if="$work/image.img" of="$work/dd.img" bs=4M conv=fsync status=none
    t3=$(now)
    awk -v r="$r" -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" -v n="$bytes" 'BEGIN {
        i = b - a; k = d - c; m = n / 1048576
        printf "| %d | %.2f | %.0f | %.2f | %.0f | %.2f× |\n", r, i, m / i, k, m / k, k / i }' |
        tee -a "$work/runs.md"
done
# On a busy machine each time is the work plus whatever else ran: the
# fastest run of each is the least disturbed one.
awk -F'|' -v n="$bytes" '{ i = $3 + 0; k = $5 + 0
    if (bi == 0 || i < bi) bi = i; if (bk == 0 || k < bk) bk = k }
    END { m = n / 1048576
        printf "| best | %.2f | %.0f | %.2f | %.0f | %.2f× |\n", bi, m / bi, bk, m / bk, bk / bi }' "$work/runs.md"
rm -rf "$work/dd.img"
