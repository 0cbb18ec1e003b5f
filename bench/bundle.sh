#!/usr/bin/env bash
# Bundle benchmark (prints numbers; it is not a test).
#
# On a generated ext4 root filesystem image:
#   1. times `kernex-image bundle create` against `bita compress` with the same
#      chunking (RollSum, same avg/min/max chunk size and window, same hash
#      length, zstd at the same level, all cores) and compares time and size;
#   2. changes one small config file, rebuilds the image and prints what a
#      device holding the old release downloads for the new one
#      (`kernex-image bundle delta`) next to what a plain bita client needs
#      (its archive header alone, and header + chunks with `bita clone --seed`);
#   3. repeats 2. for a few chunk sizes, and prints a Markdown summary.
#
# Usage: bench/bundle.sh [options]     (see --help; bench/README.md)
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/bundle.sh [options]

  --size MB          image size for the timing runs and the first delta run
                     (env BENCH_IMAGE_MB, default 200)
  --delta-sizes LIST image sizes (MB) for the one-small-file delta, e.g. "200 370"
                     (env BENCH_DELTA_MB, default: --size)
  --chunk-sizes LIST avg:min chunk sizes in KiB for the delta table
                     (env BENCH_CHUNK_SIZES, default "16:4 32:8 64:16")
  --runs N           timed runs per tool, median reported (env BENCH_RUNS, default 3)
  --threads N        worker threads for both tools, 0 = all cores
                     (env BENCH_THREADS, default 0)
  --work-dir DIR     where the temporary tree, images and bundles go
                     (env BENCH_WORK_DIR, default $CARGO_TARGET_DIR or target, /bench-bundle)
  --keep             keep the temporary files (printed at the end)
  -h, --help         this text

Fixed parameters of the timing run (kernex-image's defaults): avg 32 KiB,
min 8 KiB, max 4 MiB, 64-byte RollSum window, 16-byte chunk hashes, zstd 9
(BENCH_AVG_KIB, BENCH_MIN_KIB, BENCH_MAX_KIB, BENCH_HASH_LENGTH, BENCH_ZSTD_LEVEL
override them). Uses hyperfine when installed, else `date` timing.
EOF
}

die() { echo "bench/bundle.sh: error: $*" >&2; exit 1; }
log() { printf '== [%3ds] %s\n' "$SECONDS" "$*" >&2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

size_mb=${BENCH_IMAGE_MB:-200}
delta_sizes=${BENCH_DELTA_MB:-}
chunk_sizes=${BENCH_CHUNK_SIZES:-"16:4 32:8 64:16"}
runs=${BENCH_RUNS:-3}
threads=${BENCH_THREADS:-0}
avg_kib=${BENCH_AVG_KIB:-32}
min_kib=${BENCH_MIN_KIB:-8}
max_kib=${BENCH_MAX_KIB:-4096}
hash_len=${BENCH_HASH_LENGTH:-16}
level=${BENCH_ZSTD_LEVEL:-9}
target_dir=${CARGO_TARGET_DIR:-$repo/target}
work_root=${BENCH_WORK_DIR:-$target_dir/bench-bundle}
keep=0
timestamp=1700000000 # of every file and of the filesystem

while (($#)); do
    case $1 in
        --size) size_mb=${2:?--size needs MB}; shift 2 ;;
        --delta-sizes) delta_sizes=${2:?--delta-sizes needs a list}; shift 2 ;;
        --chunk-sizes) chunk_sizes=${2:?--chunk-sizes needs a list}; shift 2 ;;
        --runs) runs=${2:?--runs needs N}; shift 2 ;;
        --threads) threads=${2:?--threads needs N}; shift 2 ;;
        --work-dir) work_root=${2:?--work-dir needs DIR}; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
delta_sizes=${delta_sizes:-$size_mb}
for n in "$size_mb" $delta_sizes "$runs" "$threads" "$avg_kib" "$min_kib" "$max_kib" "$hash_len" "$level"; do
    [[ $n =~ ^[0-9]+$ ]] || die "not a number: $n"
done
((size_mb >= 32)) || die "--size must be at least 32 (MB)"
((runs >= 1)) || die "--runs must be at least 1"
for cs in $chunk_sizes; do
    [[ $cs =~ ^[0-9]+:[0-9]+$ ]] || die "chunk size $cs is not AVG:MIN (KiB), e.g. 32:8"
done

for tool in jq openssl tar cmp od; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install jq openssl tar diffutils coreutils)"
done

# ---------------------------------------------------------------- tools
log "building kernex-image (release)"
(cd "$repo" && cargo build --release --quiet -p kernex-image) ||
    die "cargo build --release -p kernex-image failed"
kx=$target_dir/release/kernex-image
[[ -x $kx ]] || die "$kx was not built"

: "${KERNEX_CACHE:=/var/cache/kernex-ci}"
if ! bita=$(command -v bita 2>/dev/null); then
    bita=$KERNEX_CACHE/cargo-bin/bin/bita
    [[ -x $bita ]] || die "bita is not installed (not on PATH nor in $KERNEX_CACHE/cargo-bin/bin): run scripts/setup"
fi
bita_version=$("$bita" --version)
[[ $bita_version == "bita 0.15."* ]] || echo "warning: expected bita 0.15, found $bita_version" >&2
# crates.io's default bita build has brotli only; scripts/setup builds it with zstd.
"$bita" compress --help | grep -q 'zstd' || die "$bita has no zstd support: run scripts/setup"

hyperfine=$(command -v hyperfine || true)
cores=$(nproc)

# ---------------------------------------------------------------- work dir
mkdir -p "$work_root"
work=$(mktemp -d "$work_root/run.XXXXXX")
cleanup() {
    local rc=$?
    if ((keep)); then
        echo "kept: $work" >&2
    else
        rm -rf "$work"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log "work dir $work"

"$kx" keys create --out "$work/keys" >"$work/keys.log" 2>&1 ||
    { cat "$work/keys.log" >&2; die "kernex-image keys create failed"; }
key=$work/keys/signing.key
cert=$work/keys/signing.crt
[[ -f $key && -f $cert ]] || die "kernex-image keys create did not write $key and $cert"

# ---------------------------------------------------------------- the rootfs tree
# copy_sample BUDGET_BYTES DEST DIR...: copies regular, readable, single-link
# files (no static libraries or bytecode, none over 8 MiB) from the host's
# DIRs (relative to /) into DEST, keeping their paths. Files are taken in path
# order, every k-th one with k = total / budget, in further passes with a
# shifted start until the budget is met, so the sample spreads evenly over
# all DIRs in proportion to their size.
copy_sample() {
    local budget=$1 dest=$2; shift 2
    local roots=() d
    for d in "$@"; do [[ -d /$d ]] && roots+=("/$d"); done
    ((${#roots[@]})) || die "none of $* exists on this machine"
    find "${roots[@]}" -xdev -type f -links 1 -readable -size -8M \
        ! -name '*.a' ! -name '*.o' ! -name '*.pyc' -printf '%s %p\n' 2>/dev/null |
        LC_ALL=C sort -k2 >"$work/candidates" || true
    awk -v budget="$budget" '
        { size[NR] = $1; path[NR] = substr($0, length($1) + 3); total += $1 }
        END {
            k = int(total / budget); if (k < 1) k = 1
            for (j = 0; j < k && sum < budget * 0.99; j++)
                for (i = 1 + j; i <= NR; i += k)
                    if (!(i in taken) && sum + size[i] <= budget) { taken[i] = 1; sum += size[i] }
            for (i = 1; i <= NR; i++) if (i in taken) print path[i]
            if (sum < budget * 0.9)
                printf "warning: only %d of %d bytes available under the sampled directories\n", sum, budget > "/dev/stderr"
        }' "$work/candidates" >"$work/picked"
    tar -C / --no-recursion -cf - -T "$work/picked" 2>/dev/null | tar -C "$dest" -xf - ||
        die "copying sampled files from $* failed"
}

# prandom BYTES LABEL: deterministic pseudo-random bytes (AES-CTR keystream
# with a fixed key derived from LABEL), so every run builds the same data.
prandom() {
    local key
    key=$(printf 'kernex-bench %s' "$2" | sha256sum | cut -c1-32)
    head -c "$1" /dev/zero | openssl enc -aes-128-ctr -K "$key" -iv 00000000000000000000000000000000
}

agent_conf() {
    cat <<EOF
# Kernex agent configuration
server = "https://updates.example.com/api/v1"
poll-interval = 3600
log-level = "$1"
[health-check]
timeout = 90
EOF
}

# make_tree DIR MB: a root filesystem tree of about MB * 0.72 megabytes
# (the rest of the image is ext4 metadata, journal and free space):
# 60% ELF binaries and libraries, 12% text (headers, Python, Perl, /etc),
# 12% docs (man pages, /usr/share/doc, locales), 8% pseudo-random blobs
# (firmware, compressed assets), plus a small /etc.
make_tree() {
    local dir=$1 mb=$2
    local bytes=$((mb * 1024 * 1024 * 72 / 100))
    mkdir -p "$dir"/{etc,lib/firmware,var/lib/assets,tmp,proc,sys,dev,run,root}
    copy_sample $((bytes * 60 / 100)) "$dir" usr/bin usr/sbin usr/lib/x86_64-linux-gnu usr/libexec
    copy_sample $((bytes * 12 / 100)) "$dir" usr/include usr/lib/python3 usr/share/perl usr/share/perl5 etc
    copy_sample $((bytes * 12 / 100)) "$dir" usr/share/doc usr/share/man usr/share/locale
    local blob=$((bytes * 8 / 100 / 8)) i
    for i in 1 2 3 4; do prandom "$blob" "firmware-$i" >"$dir/lib/firmware/blob-$i.bin"; done
    for i in 1 2 3 4; do prandom "$blob" "asset-$i" >"$dir/var/lib/assets/asset-$i.pak"; done
    agent_conf info >"$dir/etc/agent.conf"
    echo "kernex-bench" >"$dir/etc/hostname"
    printf 'ID=kernex-bench\nVERSION_ID=1.0.0\n' >"$dir/etc/os-release"
}

# make_image TREE MB OUT: reproducible ext4 image of exactly MB MiB, built the
# way a release pipeline would (UUID and hash seed left to kernex-image).
make_image() {
    "$kx" rootfs "$1" --fs ext4 --size $(($2 * 1024 * 1024)) --timestamp "$timestamp" \
        --label rootfs --out "$3" >/dev/null ||
        die "kernex-image rootfs failed for $1 (is the tree larger than $2 MB?)"
}

# ---------------------------------------------------------------- helpers
# bundle OUT IMAGE VERSION AVG_KIB MIN_KIB
bundle() {
    "$kx" bundle create --compatible bench-x86_64 --version "$3" --rootfs "$2" \
        --key "$key" --cert "$cert" --out "$1" \
        --avg-chunk-size $(($4 * 1024)) --min-chunk-size $(($5 * 1024)) \
        --max-chunk-size $((max_kib * 1024)) --hash-length "$hash_len" \
        --compression-level "$level" --threads "$threads" --json >/dev/null
}

# bita_archive OUT IMAGE AVG_KIB MIN_KIB HASH_LEN
bita_archive() {
    "$bita" compress -f --input "$2" --compression zstd --compression-level "$level" \
        --hash-chunking RollSum --rolling-window-size 64 \
        --avg-chunk-size $(($3 * 1024)) --min-chunk-size $(($4 * 1024)) \
        --max-chunk-size $((max_kib * 1024)) --hash-length "$5" "$1" >/dev/null 2>&1
}

# bita_header_size ARCHIVE: magic (6) + dictionary size (8) + dictionary +
# data offset (8) + BLAKE2b checksum (64).
bita_header_size() {
    local dict
    dict=$(od -An -t u8 -j 6 -N 8 "$1" | tr -d ' ')
    echo $((dict + 86))
}

size_of() { stat -c %s "$1"; }
kib() { awk -v b="$1" 'BEGIN { printf "%.1f KiB", b / 1024 }'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }

# median_time NAME SHELL-COMMAND: median wall time in seconds over $runs runs.
median_time() {
    local name=$1 cmd=$2
    if [[ -n $hyperfine ]]; then
        "$hyperfine" --runs "$runs" --style basic --export-json "$work/$name.json" \
            --command-name "$name" "$cmd" >"$work/$name.hyperfine" 2>&1 ||
            { cat "$work/$name.hyperfine" >&2; die "$name failed"; }
        jq -r '.results[0].median' "$work/$name.json"
    else
        local i t0 t1 times=()
        for ((i = 0; i < runs; i++)); do
            t0=$(date +%s.%N)
            bash -c "$cmd" || die "$name failed: $cmd"
            t1=$(date +%s.%N)
            times+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }')")
        done
        printf '%s\n' "${times[@]}" | sort -g | awk '{ t[NR] = $1 } END { print (NR % 2) ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2 }'
    fi
}

q() { printf '%q' "$1"; }

# ---------------------------------------------------------------- 1. time and size
log "generating a ${size_mb} MB rootfs tree and ext4 image"
tree=$work/tree-$size_mb
make_tree "$tree" "$size_mb"
tree_bytes=$(du -sb "$tree" | cut -f1)
img=$work/old-$size_mb.img
make_image "$tree" "$size_mb" "$img"
img_bytes=$(size_of "$img")
cat "$img" >/dev/null # page cache: both tools read it warm

load_before=$(cut -d' ' -f1 /proc/loadavg)
busy() { awk -v l="$1" -v c="$cores" 'BEGIN { exit !(l > c / 2) }'; }
busy "$load_before" &&
    echo "warning: load average $load_before on $cores cores: other work is running, timings will be noisy" >&2
log "timing bundle create vs bita compress ($runs runs each, $cores cores)"
kx_cmd="$(q "$kx") bundle create --compatible bench-x86_64 --version 1.0.0 --rootfs $(q "$img") \
--key $(q "$key") --cert $(q "$cert") --out $(q "$work/time.kxb") \
--avg-chunk-size $((avg_kib * 1024)) --min-chunk-size $((min_kib * 1024)) \
--max-chunk-size $((max_kib * 1024)) --hash-length $hash_len --compression-level $level \
--threads $threads --json >/dev/null"
bita_threads=()
((threads > 0)) && bita_threads=(--buffered-chunks $((threads * 2)))
bita_cmd="$(q "$bita") compress -f --input $(q "$img") --compression zstd --compression-level $level \
--hash-chunking RollSum --rolling-window-size 64 \
--avg-chunk-size $((avg_kib * 1024)) --min-chunk-size $((min_kib * 1024)) \
--max-chunk-size $((max_kib * 1024)) --hash-length $hash_len ${bita_threads[*]} $(q "$work/time.bita") >/dev/null 2>&1"
kx_time=$(median_time kernex "$kx_cmd")
bita_time=$(median_time bita "$bita_cmd")
load_after=$(cut -d' ' -f1 /proc/loadavg)
kx_bytes=$(size_of "$work/time.kxb")
kx_archive_bytes=$("$kx" bundle inspect "$work/time.kxb" --json | jq '.manifest.images[0].archive.size')
bita_bytes=$(size_of "$work/time.bita")
time_ratio=$(ratio "$kx_time" "$bita_time")
size_ratio=$(ratio "$kx_bytes" "$bita_bytes")
verdict() { awk -v r="$1" -v g="$2" 'BEGIN { print (r <= g) ? "ok" : "MISSED" }'; }

echo
echo "## bundle create vs bita compress"
echo
echo "image: ${size_mb} MiB ext4 ($img_bytes bytes, tree $(mib "$tree_bytes")); $cores cores; median of $runs runs"
echo "chunking: RollSum window 64, avg $avg_kib KiB, min $min_kib KiB, max $max_kib KiB, $hash_len-byte hashes, zstd $level"
timer="date +%s.%N"
[[ -n $hyperfine ]] && timer=$("$hyperfine" --version)
echo "timing: $timer; $bita_version; $("$kx" --version 2>/dev/null || echo kernex-image)"
note=""
busy "$load_before" || busy "$load_after" && note=" (BUSY MACHINE: timings are noisy)"
echo "load average: $load_before before, $load_after after the timing runs$note"
echo
printf '%-24s %12s %16s\n' "" "time (s)" "size (bytes)"
printf '%-24s %12.2f %16s\n' "kernex-image (bundle)" "$kx_time" "$kx_bytes"
printf '%-24s %12s %16s\n' "  of which rootfs.bita" "" "$kx_archive_bytes"
printf '%-24s %12.2f %16s\n' "bita compress" "$bita_time" "$bita_bytes"
printf '%-24s %12s %16s\n' "kernex / bita" "${time_ratio}x" "${size_ratio}x"
printf '%-24s %12s %16s\n' "goal" "<= 1.0x ($(verdict "$time_ratio" 1.0))" "<= 1.02x ($(verdict "$size_ratio" 1.02))"

# ---------------------------------------------------------------- 2./3. one-small-file delta
# run_delta MB AVG_KIB MIN_KIB: one-small-file delta on MB images; appends a
# row (TSV) to delta_rows.
declare -A made=()
delta_rows=()
run_delta() {
    local mb=$1 avg=$2 min=$3
    local t=$work/tree-$mb old=$work/old-$mb.img new=$work/new-$mb.img
    if [[ -z ${made[$mb]:-} ]]; then
        if [[ ! -f $old ]]; then
            log "generating a ${mb} MB rootfs tree and ext4 image"
            make_tree "$t" "$mb"
            make_image "$t" "$mb" "$old"
        fi
        log "changing /etc/agent.conf and rebuilding the ${mb} MB image"
        agent_conf debug >"$t/etc/agent.conf"
        make_image "$t" "$mb" "$new"
        agent_conf info >"$t/etc/agent.conf"
        made[$mb]=1
    fi
    log "delta at ${mb} MB, avg $avg KiB / min $min KiB"
    local a=$work/d-old.kxb b=$work/d-new.kxb t0 t1
    bundle "$a" "$old" 1.0.0 "$avg" "$min"
    t0=$(date +%s.%N)
    bundle "$b" "$new" 1.0.1 "$avg" "$min"
    t1=$(date +%s.%N)
    local d info
    d=$("$kx" bundle delta "$a" "$b" --json) || die "kernex-image bundle delta failed"
    info=$("$kx" bundle inspect "$b" --json) || die "kernex-image bundle inspect failed"
    # A plain bita client: its own archive with bita's default 64-byte hashes,
    # cloned with the old image as seed; it reads the header, then fetches the
    # chunks the seed lacks.
    local ba=$work/d-new.bita
    bita_archive "$ba" "$new" "$avg" "$min" 64 || die "bita compress failed on $new"
    local clone_log
    clone_log=$("$bita" clone -f --seed "$old" "$ba" "$work/d-clone.img" 2>&1) ||
        { echo "$clone_log" >&2; die "bita clone failed"; }
    cmp -s "$new" "$work/d-clone.img" || die "bita clone did not rebuild the new image"
    rm -f "$work/d-clone.img"
    local bita_hdr bita_fetched
    bita_hdr=$(bita_header_size "$ba")
    bita_fetched=$(printf '%s\n' "$clone_log" | bita_fetched_bytes)
    [[ $bita_fetched =~ ^[0-9]+$ ]] ||
        { echo "$clone_log" >&2; die "no \"Fetched ... (N bytes)\" summary in bita clone's output"; }
    bita_fetched=$((bita_hdr + bita_fetched))
    local changed
    changed=$(cmp -l "$old" "$new" | wc -l || true)
    delta_rows+=("$(jq -r --arg mb "$mb" --arg avg "$avg" --arg min "$min" \
        --arg changed "$changed" --arg bh "$bita_hdr" --arg bf "$bita_fetched" \
        --arg bundle "$(size_of "$b")" --arg secs "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')" \
        --argjson info "$info" '
        .images[0] as $i |
        [$mb, "\($avg)K/\($min)K", ."manifest-bytes", $i."index-head-bytes",
         "\($i."index-page-bytes") (\($i."index-pages-fetched"))",
         "\($i."chunk-bytes") (\($i."chunks-fetched"))", ."total-bytes",
         $i."bita-header-bytes", $bh, $bf, $changed,
         $bundle, $info.manifest.images[0].index.size, $secs, $info.images[0].chunks] | @tsv' <<<"$d")")
}

# bita_fetched_bytes < clone log: compressed chunk bytes bita fetched from
# the archive ("Fetched 3.2 KiB (3254 bytes) from archive ..."); 0 when it
# fetched none, "?" when the log has no summary at all (another bita version).
bita_fetched_bytes() {
    awk '
        /^Fetched / && match($0, /\([0-9]+ bytes\)/) { v = substr($0, RSTART + 1, RLENGTH - 8) }
        /^Successfully cloned/ { ok = 1 }
        END { print (v != "") ? v : (ok ? 0 : "?") }'
}

for mb in $delta_sizes; do
    for cs in $chunk_sizes; do
        [[ $cs =~ ^([0-9]+):([0-9]+)$ ]]
        run_delta "$mb" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"
    done
done

echo
echo "## one-small-file change (/etc/agent.conf: log-level \"info\" -> \"debug\")"
echo
echo "Bytes a device holding release 1.0.0 downloads for 1.0.1 (bundle delta), against"
echo "bita: header of the kernex bundle's rootfs.bita ($hash_len-byte hashes), header of a"
echo "plain bita archive (64-byte hashes), and what \`bita clone --seed old\` fetched."
echo
header="| image MB | avg/min chunk | manifest+sig | index head | index pages (n) | chunks (n) | **kernex total** | bita hdr ($hash_len B) | bita hdr (64 B) | bita clone fetched | changed bytes |"
echo "$header"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for row in "${delta_rows[@]}"; do
    IFS=$'\t' read -r -a f <<<"$row"
    printf '| %s | %s | %s | %s | %s | %s | **%s** | %s | %s | %s | %s |\n' "${f[@]:0:11}"
done

# ---------------------------------------------------------------- summary
default_row=""
for row in "${delta_rows[@]}"; do
    IFS=$'\t' read -r -a f <<<"$row"
    [[ ${f[0]} == "$size_mb" && ${f[1]} == "${avg_kib}K/${min_kib}K" ]] && default_row=$row
done

echo
echo "## README"
echo
echo "Generated ${size_mb} MiB ext4 root filesystem, $cores cores ($(uname -m)), median of $runs runs$note;"
echo "RollSum avg $avg_kib KiB / min $min_kib KiB / max $max_kib KiB, $hash_len-byte hashes, zstd $level for both tools."
echo
echo "| | kernex-image bundle create | bita compress | kernex / bita | goal |"
echo "|---|---:|---:|---:|---:|"
printf '| time | %.2f s | %.2f s | %s× | ≤ 1.0× |\n' "$kx_time" "$bita_time" "$time_ratio"
printf '| size | %s | %s | %s× | ≤ 1.02× |\n' "$(mib "$kx_bytes")" "$(mib "$bita_bytes")" "$size_ratio"
if [[ -n $default_row ]]; then
    IFS=$'\t' read -r -a f <<<"$default_row"
    printf '| one-small-file update download | %s | %s (header %s) | %s× | < 64 KiB |\n' \
        "$(kib "${f[6]}")" "$(kib "${f[9]}")" "$(kib "${f[8]}")" "$(ratio "${f[6]}" "${f[9]}")"
fi
echo
echo "By chunk size (max $max_kib KiB, $hash_len-byte hashes, zstd $level): bundle create time (one run),"
echo "bundle size, the whole index a fresh device downloads, and the one-small-file update download"
echo "(kernex: manifest + signature + index + chunks; bita: header with 64-byte hashes + the chunks"
echo "\`bita clone --seed old\` fetched):"
echo
echo "| image | avg/min chunk | chunks | create | bundle | full index | update: kernex | update: bita |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
for row in "${delta_rows[@]}"; do
    IFS=$'\t' read -r -a f <<<"$row"
    printf '| %s MiB | %s | %s | %s s | %s | %s | %s | %s |\n' "${f[0]}" "${f[1]}" "${f[14]}" "${f[13]}" \
        "$(mib "${f[11]}")" "$(kib "${f[12]}")" "$(kib "${f[6]}")" "$(kib "${f[9]}")"
done
echo
cmd="bench/bundle.sh"
[[ $size_mb != 200 ]] && cmd+=" --size $size_mb"
[[ $delta_sizes != "$size_mb" ]] && cmd+=" --delta-sizes \"$delta_sizes\""
[[ $chunk_sizes != "16:4 32:8 64:16" ]] && cmd+=" --chunk-sizes \"$chunk_sizes\""
[[ $runs != 3 ]] && cmd+=" --runs $runs"
[[ $threads != 0 ]] && cmd+=" --threads $threads"
echo "Reproduce: \`$cmd\`"
