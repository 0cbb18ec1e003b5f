#!/usr/bin/env bash
# Delta install benchmark (prints numbers; it is not a test).
#
# A ~200 MB ext4 rootfs (v1) and three updates: (a) one small file changed,
# (b) ~20 MB of files changed, (c) an OS update: 3-4 Debian packages and one
# binary changed (bench/os_update.py). For each: what a device holding v1
# downloads and how long `kernex-updater install` takes at 2-3 chunk sizes
# (file-backed slots, bundle served over loopback HTTP with Range by
# bench/range_server.py), next to `bita clone --seed v1.img` (defaults and
# 16 KiB chunks) and `casync extract --seed=v1.img` over the same server,
# the `zstd --patch-from` patch size (the near-floor), and `dd` of the image
# to a file; plus one run of (b) through the updater's 1 Mbit/s rate limit.
#
# Usage: bench/delta.sh [--size MB] [--changed MB] [--chunk-sizes "16:4 32:8 64:16"] [--work-dir DIR] [--keep]
set -euo pipefail

die() { echo "bench/delta.sh: error: $*" >&2; exit 1; }
log() { printf '== [%3ds] %s\n' "$SECONDS" "$*" >&2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
size_mb=${BENCH_IMAGE_MB:-200}
changed_mb=${BENCH_CHANGED_MB:-20}
zstd_level=${BENCH_ZSTD_PATCH_LEVEL:-19}
rate=${BENCH_RATE:-125000} # bytes/s: 1 Mbit/s
target_dir=${CARGO_TARGET_DIR:-$repo/target}
work_root=${BENCH_WORK_DIR:-$target_dir/bench-delta}
keep=0
timestamp=1700000000
while (($#)); do
    case $1 in
        --size) size_mb=${2:?}; shift 2 ;;
        --changed) changed_mb=${2:?}; shift 2 ;;
        --chunk-sizes) BENCH_CHUNK_SIZES=${2:?}; shift 2 ;;
        --work-dir) work_root=${2:?}; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
for n in "$size_mb" "$changed_mb" "$zstd_level" "$rate"; do
    [[ $n =~ ^[0-9]+$ ]] || die "not a number: $n"
done
((size_mb >= 32)) || die "--size must be at least 32 (MB)"
# tool -> Debian package that provides it
for tp in jq:jq openssl:openssl tar:tar zstd:zstd dd:coreutils python3:python3 \
    /usr/bin/time:time casync:casync; do
    command -v "${tp%%:*}" >/dev/null ||
        die "${tp%%:*} is missing: install the Debian package ${tp##*:} (apt-get install ${tp##*:})"
done
[[ -x /usr/lib/casync/protocols/casync-http ]] ||
    die "casync has no HTTP helper (/usr/lib/casync/protocols/casync-http): install the Debian package casync"
[[ -d /var/lib/dpkg/info ]] || die "no /var/lib/dpkg/info: the OS-update pair needs a Debian-like host (dpkg)"

log "building kernex-image and kernex-updater (release)"
(cd "$repo" && cargo build --release --quiet -p kernex-image -p kernex-updater) ||
    die "cargo build --release failed"
kx=$target_dir/release/kernex-image
ku=$target_dir/release/kernex-updater
: "${KERNEX_CACHE:=/var/cache/kernex-ci}"
bita=$(command -v bita 2>/dev/null || echo "$KERNEX_CACHE/cargo-bin/bin/bita")
[[ -x $bita ]] || die "bita is not installed: run scripts/setup"
"$bita" compress --help | grep -q zstd || die "$bita has no zstd support: run scripts/setup"
cores=$(nproc)

mkdir -p "$work_root"
work=$(mktemp -d "$work_root/run.XXXXXX")
server_pid=
cleanup() {
    local rc=$?
    [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null
    if ((keep)); then echo "kept: $work" >&2; else rm -rf "$work"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log "work dir $work"
load_before=$(cut -d' ' -f1 /proc/loadavg)

"$kx" keys create --out "$work/keys" >"$work/keys.log" 2>&1 || die "kernex-image keys create failed"
key=$work/keys/signing.key
cert=$work/keys/signing.crt
ca=$work/keys/ca.crt
[[ -f $key && -f $cert && -f $ca ]] || die "kernex-image keys create did not write $work/keys/{ca.crt,signing.key,signing.crt}"

# ------------------------------------------------------------ images
# Same recipe as bench/bundle.sh: ~72 % of the image sampled from this
# machine's /usr and /etc, 8 % deterministic pseudo-random blobs.
prandom() {
    local k
    k=$(printf 'kernex-bench %s' "$2" | sha256sum | cut -c1-32)
    head -c "$1" /dev/zero | openssl enc -aes-128-ctr -K "$k" -iv 00000000000000000000000000000000
}
copy_sample() {
    local budget=$1 dest=$2; shift 2
    local roots=() d
    for d in "$@"; do [[ -d /$d ]] && roots+=("/$d"); done
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
        }' "$work/candidates" >"$work/picked"
    tar -C / --no-recursion -cf - -T "$work/picked" 2>/dev/null | tar -C "$dest" -xf -
}
make_tree() {
    local dir=$1 bytes=$(($2 * 1024 * 1024 * 72 / 100)) i
    mkdir -p "$dir"/{etc,lib/firmware,var/lib/assets,tmp,root}
    copy_sample $((bytes * 60 / 100)) "$dir" usr/bin usr/sbin usr/lib/x86_64-linux-gnu usr/libexec
    copy_sample $((bytes * 12 / 100)) "$dir" usr/include usr/lib/python3 usr/share/perl usr/share/perl5 etc
    copy_sample $((bytes * 12 / 100)) "$dir" usr/share/doc usr/share/man usr/share/locale
    for i in 1 2 3 4; do prandom $((bytes * 8 / 100 / 8)) "firmware-$i" >"$dir/lib/firmware/blob-$i.bin"; done
    for i in 1 2 3 4; do prandom $((bytes * 8 / 100 / 8)) "asset-$i" >"$dir/var/lib/assets/asset-$i.pak"; done
    printf 'server = "https://updates.example.com"\nlog-level = "info"\n' >"$dir/etc/agent.conf"
}
make_image() {
    "$kx" rootfs "$1" --fs ext4 --size $((size_mb * 1024 * 1024)) --timestamp "$timestamp" \
        --label rootfs --out "$2" >/dev/null || die "kernex-image rootfs failed for $1"
}

log "generating the ${size_mb} MB v1 image"
make_tree "$work/tree" "$size_mb"
# The packages the OS-update pair (c) changes, complete in v1.
python3 "$here/os_update.py" add "$work/tree" $((size_mb * 1024 * 1024)) "$work/os.plan" >&2 ||
    die "os_update.py add failed"
make_image "$work/tree" "$work/v1.img"
cp -a "$work/tree" "$work/tree-c"

log "v2c: the OS-update pair (3-4 packages and one binary changed)"
os_summary=$(python3 "$here/os_update.py" change "$work/tree-c" "$work/os.plan") ||
    die "os_update.py change failed"
make_image "$work/tree-c" "$work/v2c.img"
rm -rf "$work/tree-c"

log "v2a: one small file changed"
sed -i 's/"info"/"debug"/' "$work/tree/etc/agent.conf"
make_image "$work/tree" "$work/v2a.img"

log "v2b: ~${changed_mb} MB of files changed"
# Binaries and libraries, in path order from the middle of the list, each
# rewritten as a new build would (same size, different bytes: the first
# half kept, the second half new), until changed_mb MB of files changed.
budget=$((changed_mb * 1024 * 1024))
(cd "$work/tree" && find usr -type f -size +64k -printf '%s %p\n' | LC_ALL=C sort -k2) >"$work/files"
total_files=$(wc -l <"$work/files")
changed=0
nfiles=0
while read -r sz path; do
    ((changed >= budget)) && break
    half=$((sz / 2))
    { head -c "$half" "$work/tree/$path"; prandom $((sz - half)) "v2-$path"; } >"$work/tmpfile"
    cat "$work/tmpfile" >"$work/tree/$path"
    changed=$((changed + sz))
    nfiles=$((nfiles + 1))
done < <(tail -n +$((total_files / 3)) "$work/files")
make_image "$work/tree" "$work/v2b.img"
img_bytes=$(stat -c %s "$work/v1.img")

# ------------------------------------------------------------ bundles, archives
# kernex bundles at each chunk size (avg:min KiB; 32:8 is kernex-image's
# default), bita archives at bita's default chunking (avg 64 KiB, min 16 KiB)
# and at 16 KiB (min 4 KiB), both zstd; casync blob index + chunk store at
# casync's defaults (avg 64 KiB).
cases="v2a v2b v2c"
declare -A patched_create_time
chunk_sizes=${BENCH_CHUNK_SIZES:-"16:4 32:8 64:16"}
default_cs=32:8
[[ " $chunk_sizes " == *" $default_cs "* ]] || die "--chunk-sizes must include the default $default_cs"
mkdir -p "$work/srv"
for cs in $chunk_sizes; do
    log "bundles at avg:min ${cs} KiB"
    for v in v1 $cases; do
        ver=1.0.0; [[ $v == v2a ]] && ver=2.0.0; [[ $v == v2b ]] && ver=2.1.0; [[ $v == v2c ]] && ver=2.2.0
        "$kx" bundle create --compatible bench-x86_64 --version $ver --rootfs "$work/$v.img" \
            --avg-chunk-size $((${cs%%:*} * 1024)) --min-chunk-size $((${cs##*:} * 1024)) \
            --key "$key" --cert "$cert" --out "$work/srv/$v-$cs.kxb" --json >/dev/null ||
            die "bundle create $v ($cs) failed"
    done
done
log "bundles with a patch from v1 (default chunking, bundle create --patch-from)"
for v in $cases; do
    ver=2.0.0; [[ $v == v2b ]] && ver=2.1.0; [[ $v == v2c ]] && ver=2.2.0
    t0=$(date +%s.%N)
    "$kx" bundle create --compatible bench-x86_64 --version $ver --rootfs "$work/$v.img" \
        --patch-from "$work/srv/v1-$default_cs.kxb" --keyring "$ca" \
        --key "$key" --cert "$cert" --out "$work/srv/$v-patched.kxb" --json >"$work/create-$v-patched.json" ||
        die "bundle create $v --patch-from failed"
    t1=$(date +%s.%N)
    patched_create_time[$v]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
done
log "bita archives and casync stores"
for v in $cases; do
    "$bita" compress -f --input "$work/$v.img" --compression zstd "$work/srv/$v-default.bita" >/dev/null 2>&1 ||
        die "bita compress $v failed"
    "$bita" compress -f --input "$work/$v.img" --compression zstd --avg-chunk-size 16KiB \
        --min-chunk-size 4KiB "$work/srv/$v-16k.bita" >/dev/null 2>&1 || die "bita compress $v (16 KiB) failed"
    casync make --store="$work/srv/$v.castr" "$work/srv/$v.caibx" "$work/$v.img" >/dev/null 2>&1 ||
        die "casync make $v failed"
done
full_zstd=$(zstd -19 -T0 --long=27 -c "$work/v2b.img" 2>/dev/null | wc -c)

# ------------------------------------------------------------ server
: >"$work/server.log"
python3 "$here/range_server.py" "$work/srv" "$work/server.log" >"$work/port" &
server_pid=$!
for _ in $(seq 50); do [[ -s $work/port ]] && break; sleep 0.1; done
port=$(cat "$work/port")
[[ -n $port ]] || die "range server did not start"
url=http://127.0.0.1:$port
# served PREFIX: body bytes and responses for paths starting with PREFIX.
served() { awk -v p="$1" 'index($1, p) == 1 { s += $3; n++ } END { printf "%d %d\n", s, n }' "$work/server.log"; }

# ------------------------------------------------------------ the device
# Slot B gets v1 by a full local install (timed: the dd comparison), then B
# is booted and committed, so v1 and its index are the seed for every update.
# One such device state per chunk size (the seed index has the same chunking).
dev=$work/dev
write_config() {
    cat >"$dev/system.toml" <<EOT
compatible = "bench-x86_64"
data-dir = "$dev/data"
keyring = "$dev/keyring.pem"
[slots.rootfs]
A = "$dev/slot-a.img"
B = "$dev/slot-b.img"
[bootloader]
backend = "file"
path = "$dev/boot-state"
booted-slot = "$1"
[link]
$2
EOT
}
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
for cs in $chunk_sizes; do
    log "full local install of v1 ($cs, no seed)"
    rm -rf "$dev"
    mkdir -p "$dev"
    cp "$ca" "$dev/keyring.pem"
    write_config A ""
    : >"$dev/slot-a.img"
    sync
    t0=$(now)
    "$ku" --config "$dev/system.toml" install "$work/srv/v1-$cs.kxb" --json >"$work/full-$cs.json" ||
        die "install v1 ($cs) failed"
    t1=$(now)
    [[ $cs == "$default_cs" ]] && full_time=$(secs "$t0" "$t1")
    write_config B ""
    "$ku" --config "$dev/system.toml" mark-good >/dev/null || die "mark-good failed"
    cp -a "$dev" "$work/dev-v1-$cs" # the state every update at this chunk size starts from
done

log "dd of the image to a file"
sync
t0=$(now)
dd if="$work/v2b.img" of="$work/dd.img" bs=4M conv=fsync status=none
t1=$(now)
dd_time=$(secs "$t0" "$t1")
rm -f "$work/dd.img"

# kernex_run CASE CHUNK-SIZE LINK-LINES TAG [BUNDLE]: kernex-updater install
# over HTTP of BUNDLE.kxb (default CASE-CHUNK-SIZE) on the v1 device state.
declare -A kx_bytes kx_req kx_time kx_rss
kernex_run() {
    local v=$1 cs=$2 link=$3 tag=$4 name=${5:-$1-$2}
    rm -rf "$dev" && cp -a "$work/dev-v1-$cs" "$dev"
    write_config B "$link"
    : >"$work/server.log"
    sync
    local t0 t1
    t0=$(now)
    /usr/bin/time -v -o "$work/time-$tag" "$ku" --config "$dev/system.toml" install "$url/$name.kxb" --json \
        >"$work/install-$tag.json" || die "install $v ($tag) failed"
    t1=$(now)
    kx_time[$tag]=$(secs "$t0" "$t1")
    read -r kx_bytes[$tag] kx_req[$tag] < <(served "/$name.kxb")
    kx_rss[$tag]=$(awk -F': ' '/Maximum resident/ { print $2 }' "$work/time-$tag")
    cmp -s "$dev/slot-a.img" "$work/$v.img" || die "slot A does not hold $v after the install ($tag)"
}

declare -A bita_bytes bita_req bita_time ca_bytes ca_req ca_time patch_bytes full_bytes
for v in $cases; do
    for cs in $chunk_sizes; do
        log "$v: kernex-updater install over HTTP ($cs)"
        kernex_run "$v" "$cs" "" "$v-$cs"
    done
    log "$v: kernex-updater install over HTTP, bundle with a patch from v1 ($default_cs)"
    kernex_run "$v" "$default_cs" "" "$v-patched" "$v-patched"
    full_bytes[$v]=$(stat -c %s "$work/srv/$v-$default_cs.kxb")
    for b in default 16k; do
        log "$v: bita clone --seed v1.img ($b)"
        : >"$work/server.log"
        sync
        t0=$(now)
        "$bita" clone -f --seed "$work/v1.img" "$url/$v-$b.bita" "$work/bita-out.img" >/dev/null 2>&1 ||
            die "bita clone $v ($b) failed"
        t1=$(now)
        bita_time[$v-$b]=$(secs "$t0" "$t1")
        read -r bita_bytes[$v-$b] bita_req[$v-$b] < <(served "/$v-$b.bita")
        cmp -s "$work/bita-out.img" "$work/$v.img" || die "bita clone $v ($b) produced a different image"
        rm -f "$work/bita-out.img"
    done
    log "$v: casync extract --seed=v1.img"
    : >"$work/server.log"
    sync
    t0=$(now)
    casync extract --store="$url/$v.castr" --seed="$work/v1.img" "$url/$v.caibx" "$work/casync-out.img" \
        >"$work/casync-$v.log" 2>&1 || die "casync extract $v failed (see $work/casync-$v.log)"
    t1=$(now)
    ca_time[$v]=$(secs "$t0" "$t1")
    read -r ca_bytes[$v] ca_req[$v] < <(served "/$v.ca")
    cmp -s "$work/casync-out.img" "$work/$v.img" || die "casync extract $v produced a different image"
    rm -f "$work/casync-out.img"
    log "$v: zstd -$zstd_level --long --patch-from=v1.img"
    patch_bytes[$v]=$(zstd -q -"$zstd_level" --long=28 -T0 --patch-from="$work/v1.img" -c "$work/$v.img" | wc -c)
done
if ((rate > 0)); then
    log "v2b through the updater's ${rate} B/s link rate limit"
    kernex_run v2b "$default_cs" "rate-limit = $rate" limited
fi
load_after=$(cut -d' ' -f1 /proc/loadavg)

# ------------------------------------------------------------ report
mib() { awk -v b="$1" 'BEGIN { if (b >= 1048576) printf "%.1f MiB", b / 1048576; else printf "%.1f KiB", b / 1024 }'; }
x() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
pct() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f %%", 100 * a / b }'; }
mbps() { awk -v b="$1" -v t="$2" 'BEGIN { printf "%.1f MB/s", b / t / 1e6 }'; }
busy() { awk -v l="$1" -v c="$cores" 'BEGIN { exit !(l > c / 2) }'; }
note=""
if busy "$load_before" || busy "$load_after"; then note=" — BUSY MACHINE: timings are noisy"; fi
((rate > 0)) && limited_rate=$(awk -v b="${kx_bytes[limited]}" -v t="${kx_time[limited]}" 'BEGIN { printf "%.0f", b / t }')
# row LABEL CELL-FUNCTION: one table row, the function called per case.
row() { local label=$1 f=$2 v line; line="| $label |"; for v in $cases; do line+=" $(eval "$f") |"; done; echo "$line"; }
frac() { echo "$(mib "$1") ($(pct "$1" "${full_bytes[$2]}"))"; }

echo
echo "## Delta install: kernex-updater vs bita clone vs casync vs zstd --patch-from"
echo
echo "v1: ${size_mb} MiB ext4 ($img_bytes bytes) from \`kernex-image rootfs\`, a tree sampled from this machine's /usr and /etc. (a) one small file changed; (b) $nfiles files, $(mib "$changed") changed (second half of each rewritten); (c) OS update: $os_summary"
echo "kernex-image bundles (RollSum, zstd 9) at avg:min $chunk_sizes KiB, $default_cs the default; bita 0.15 at its default chunking (avg 64 KiB, min 16 KiB) and at avg 16 KiB, min 4 KiB, zstd both; casync 2 at its defaults (avg 64 KiB, one HTTP request per chunk file); $cores cores; load average $load_before before, $load_after after$note"
echo "bytes = response body bytes counted by the HTTP server (bench/range_server.py, loopback, Range + keep-alive): kernex manifest, signature, index and chunks; bita header and chunks; casync index (.caibx) and chunk files; % = of the full download (the v2 kernex bundle at $default_cs); times are wall clock, one run each"
echo
echo "| | (a) one small file | (b) ~${changed_mb} MB of files | (c) OS update: packages + one binary |"
echo "| --- | ---: | ---: | ---: |"
row "full download: kernex bundle ($default_cs)" 'eval mib ${full_bytes[$v]}'
for cs in $chunk_sizes; do
    d=""; [[ $cs == "$default_cs" ]] && d=", default"
    row "kernex-updater install, avg:min $cs KiB$d: bytes" "eval frac \${kx_bytes[\$v-$cs]} \$v"
    row "… HTTP requests" "eval echo \${kx_req[\$v-$cs]}"
    if [[ $cs == "$default_cs" ]]; then
        row "… time" "eval echo \${kx_time[\$v-$cs]} s"
        row "… peak RSS" "eval echo \${kx_rss[\$v-$cs]} KiB"
    fi
done
row "**kernex-updater install, bundle with a patch from v1 ($default_cs): bytes**" 'eval frac ${kx_bytes[$v-patched]} $v'
row "… HTTP requests" 'eval echo ${kx_req[$v-patched]}'
row "… time" 'eval echo ${kx_time[$v-patched]} s'
row "… peak RSS" 'eval echo ${kx_rss[$v-patched]} KiB'
row "… bundle create --patch-from time" 'eval echo ${patched_create_time[$v]} s'
row "… bundle size (with the patch)" 'eval mib $(stat -c %s "$work/srv/$v-patched.kxb")'
for b in default 16k; do
    l="bita clone --seed v1.img, defaults (64 KiB)"; [[ $b == 16k ]] && l="bita clone --seed v1.img, 16 KiB"
    row "$l: bytes" "eval frac \${bita_bytes[\$v-$b]} \$v"
    row "… HTTP requests" "eval echo \${bita_req[\$v-$b]}"
    row "… time" "eval echo \${bita_time[\$v-$b]} s"
done
row "casync extract --seed=v1.img: bytes" 'eval frac ${ca_bytes[$v]} $v'
row "… HTTP requests" 'eval echo ${ca_req[$v]}'
row "… time" 'eval echo ${ca_time[$v]} s'
row "zstd -$zstd_level --long --patch-from=v1.img: patch" 'eval frac ${patch_bytes[$v]} $v'
row "kernex ($default_cs, no patch) ÷ bita default" "eval x \${kx_bytes[\$v-$default_cs]} \${bita_bytes[\$v-default]}"
row "kernex ($default_cs, no patch) ÷ zstd patch" "eval x \${kx_bytes[\$v-$default_cs]} \${patch_bytes[\$v]}"
row "**kernex with a patch from v1 ÷ bita default (goal ≤ 0.6)**" 'eval x ${kx_bytes[$v-patched]} ${bita_bytes[$v-default]}'
row "**kernex with a patch from v1 ÷ zstd patch (goal ≤ 1.5)**" 'eval x ${kx_bytes[$v-patched]} ${patch_bytes[$v]}' 
echo
echo "| full image | |"
echo "| --- | ---: |"
echo "| zstd -19 --long of the whole v2b image | $full_zstd ($(mib "$full_zstd")) |"
echo "| full local install of v1 (kernex-updater, bundle file, no seed) | $full_time s ($(mbps "$img_bytes" "$full_time")) |"
echo "| dd bs=4M conv=fsync of the image to a file | $dd_time s ($(mbps "$img_bytes" "$dd_time")) |"
echo "| full install / dd throughput (goal ≥ 0.8) | $(x "$dd_time" "$full_time") |"
if ((rate > 0)); then
    echo "| (b) through the updater's $rate B/s link rate limit | ${kx_time[limited]} s for ${kx_bytes[limited]} bytes: $limited_rate B/s ($(x "$limited_rate" "$rate") of the limit) |"
else
    echo "| (b) through the updater's link rate limit | not run (BENCH_RATE=0) |"
fi
