#!/usr/bin/env bash
# Delta install benchmark on a real OS-update pair (prints numbers; it is
# not a test, and CI does not run it).
#
# The pair is built from real Debian packages with debootstrap, once, and
# cached (bench/os_update.py patches the rebuilt binary):
#   v1   a minbase root of the host's Debian suite;
#   v2   the same root plus a few packages (BENCH_ADD_PACKAGES) and one
#        rebuilt binary: the "monthly OS update";
#   v1c  v1 with one config file changed: the "one config file" update.
# Each becomes a reproducible ext4 image (`kernex-image rootfs`: mkfs.ext4 -d
# of a sorted staging tree, fixed UUID and hash seed, E2FSPROGS_FAKE_TIME and
# every inode time pinned to one timestamp).
#
# For each update, a device holding v1 installs it over HTTP with Range from
# bench/range_server.py (bytes and requests counted by the server), with
# Kernex plain chunks and with a bundle made by `bundle create --patch-from
# v1` (the stand-in for the server planner's choice), next to `bita clone
# --seed`, `casync extract --seed`, and the `zstd -19 --long --patch-from`
# (the floor) and `xdelta3 -9` sizes; over three links: loopback, a 4G
# profile (100 ms RTT, 10 Mbit/s) and the same with 1 % loss, emulated
# between two network namespaces this script creates (tc netem on a veth
# pair, or bench/link_emu.py on a TUN pair when the kernel has no netem).
# Plus: full bundle vs `zstd -19 --long`, `bundle create` vs `bita compress`
# time, `--patch-from` peak RSS, full local install vs `dd conv=fsync`; and
# the issue #22 goals with PASS/MISS.
#
# Usage: bench/delta.sh [--quick] [--links "lo 4g 4g-loss"] [--work-dir DIR] [--keep] [--pair-only] [--report FILE]
#   --quick      loopback and 4G only (no 1 % loss run)
#   --pair-only  build (or find) the cached OS-update pair and stop
#   --report F   print the report again from the figures a run saved in F
#                ($CARGO_TARGET_DIR/bench-delta/results-*.sh)
# Environment: KERNEX_CACHE (pair cache; default the cargo target dir),
#   BENCH_DEBIAN_SUITE, BENCH_DEBIAN_MIRROR (default: the host's apt source),
#   BENCH_ADD_PACKAGES, BENCH_PROFILE (release|debug), BENCH_WORK_DIR.
set -euo pipefail

die() { echo "bench/delta.sh: error: $*" >&2; exit 1; }
log() { printf '== [%4ds] %s\n' "$SECONDS" "$*" >&2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$repo/target}
cache_root=${KERNEX_CACHE:-$target_dir}/bench-os-pair
work_root=${BENCH_WORK_DIR:-$target_dir/bench-delta}
profile=${BENCH_PROFILE:-release}
links="lo 4g 4g-loss"
add_pkgs=${BENCH_ADD_PACKAGES:-"curl ca-certificates openssh-client less procps iproute2 xz-utils"}
epoch=1700000000
rtt_ms=100
rate_bit=10000000
loss_pct=1
keep=0
pair_only=0
report_from=
while (($#)); do
    case $1 in
        --quick) links="lo 4g"; shift ;;
        --links) links=${2:?}; shift 2 ;;
        --work-dir) work_root=${2:?}; shift 2 ;;
        --keep) keep=1; shift ;;
        --pair-only) pair_only=1; shift ;;
        --report) report_from=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
for l in $links; do [[ $l =~ ^(lo|4g|4g-loss)$ ]] || die "unknown link $l (lo, 4g, 4g-loss)"; done
[[ $profile =~ ^(release|debug)$ ]] || die "BENCH_PROFILE must be release or debug"
((EUID == 0)) || die "run as root (debootstrap, network namespaces)"
# tool -> Debian package that provides it
for tp in debootstrap:debootstrap dpkg:dpkg jq:jq tar:tar zstd:zstd xdelta3:xdelta3 dd:coreutils \
    python3:python3 /usr/bin/time:time casync:casync ip:iproute2 tc:iproute2 flock:util-linux; do
    command -v "${tp%%:*}" >/dev/null ||
        die "${tp%%:*} is missing: run scripts/setup (or apt-get install ${tp##*:})"
done
[[ -x /usr/lib/casync/protocols/casync-http ]] ||
    die "casync has no HTTP helper (/usr/lib/casync/protocols/casync-http): apt-get install casync"
: "${KERNEX_CACHE:=/var/cache/kernex-ci}"
bita=$(command -v bita 2>/dev/null || echo "$KERNEX_CACHE/cargo-bin/bin/bita")

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# ------------------------------------------------------------ report
# report: the Markdown report, from the variables a run sets (or --report FILE).
report() {
    fmt_b() { awk -v b="$1" 'BEGIN {
        if (b >= 1e6) printf "%.2f MB", b / 1e6; else if (b >= 1e3) printf "%.1f KB", b / 1e3; else printf "%d B", b }'; }
    x() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
    mbps() { awk -v b="$1" -v t="$2" 'BEGIN { printf "%.1f MB/s", b / t / 1e6 }'; }
    ideal() { awk -v b="$1" -v r="$rate_bit" -v rtt="$rtt_ms" 'BEGIN { printf "%.2f", b * 8 / r + rtt / 1000 }'; }
    # verdict A OP B: PASS when A OP B (OP: le or ge), else MISS.
    verdict() { awk -v a="$1" -v op="$2" -v b="$3" 'BEGIN { ok = op == "le" ? a <= b : a >= b; print ok ? "PASS" : "MISS" }'; }
    busy() { awk -v l="$1" -v c="$cores" 'BEGIN { exit !(l > c / 2) }'; }
    ran() { [[ " $links " == *" $1 "* ]]; }
    note=""
    if busy "$load_before" || busy "$load_after"; then note=" — BUSY MACHINE: timings are noisy"; fi
    declare -A link_name=([lo]="loopback" [4g]="4G: ${rtt_ms} ms RTT, $((rate_bit / 1000000)) Mbit/s" [4g-loss]="4G + ${loss_pct} % loss")
    # cell LINK TAG: the wall time over LINK, with the bytes when they differ from loopback's.
    cell() {
        local l=$1 t=$2
        ran "$l" || { echo "not run"; return; }
        local c="${wall[$l-$t]} s"
        if ran lo && [[ $l != lo && ${bytes[$l-$t]} != "${bytes[lo-$t]}" ]]; then c+=" ($(fmt_b "${bytes[$l-$t]}"))"; fi
        echo "$c"
    }
    first=${links%% *}
    row() { # LABEL TAG: one method's row (bytes and requests of the first link).
        local t=$2 l line
        line="| $1 | $(fmt_b "${bytes[$first-$t]}") | ${reqs[$first-$t]} |"
        for l in lo 4g 4g-loss; do line+=" $(cell "$l" "$t") |"; done
        echo "$line"
    }
    table() { # UPDATE TITLE
        local u=$1 l line
        echo "### $2"
        echo
        echo "| method | bytes | requests | ${link_name[lo]} | ${link_name[4g]} | ${link_name[4g-loss]} |"
        echo "| --- | ---: | ---: | ---: | ---: | ---: |"
        row "Kernex, plain chunks" "$u-plain"
        row "Kernex, bundle made with \`--patch-from v1\` (stand-in for the planner's choice)" "$u-patch"
        row "\`bita clone --seed v1.img\` (bita defaults, zstd)" "$u-bita"
        row "\`casync extract --seed=v1.img\`" "$u-casync"
        echo "| \`zstd -19 --long --patch-from=v1.img\` (the floor; size only) | $(fmt_b "${zpatch[$u]}") | | | | |"
        echo "| \`xdelta3 -9 -s v1.img\` (size only) | $(fmt_b "${xpatch[$u]}") | | | | |"
        line="| ideal for Kernex \`--patch-from\`: bytes ÷ link rate + one RTT | | | |"
        for l in 4g 4g-loss; do
            if ran "$l"; then line+=" $(ideal "${bytes[$l-$u-patch]}") s |"; else line+=" |"; fi
        done
        echo "$line"
        echo
    }
    # goal LABEL TARGET-TEXT VALUE OP LIMIT
    goal() { echo "| $1 | $2 | $3 | $(verdict "$3" "$4" "$5") |"; }

    added=$(wc -l <"$pair/added-packages.txt")
    echo
    echo "## Kernex delta benchmark (\`bench/delta.sh\`, $(date -u +%Y-%m-%d))"
    echo
    echo "OS-update pair from Debian $suite ($arch) packages, debootstrap --variant=minbase, $img_mb MiB ext4 images (\`kernex-image rootfs\`, timestamp $epoch):"
    echo "v1 = minbase; v2 = v1 + $added packages ($(tr '\n' ' ' <"$pair/added-packages.txt" | sed 's/ $//')) and one rebuilt binary ($(cat "$pair/rebuilt.txt")); v1c = v1 + one config file ($(cat "$pair/config.txt"))."
    echo "kernex-image / kernex-updater $profile build of $(git -C "$repo" rev-parse --short HEAD); bita $("$bita" --version 2>/dev/null | awk '{ print $NF }'); $(casync --version 2>/dev/null | head -n1); zstd $(zstd --version | grep -o "v[0-9.]*" | head -n1); $cores cores; load average $load_before before, $load_after after$note."
    echo "Bytes and requests: response bodies and responses counted by bench/range_server.py (HTTP/1.1, Range, keep-alive). Times: wall clock, one run each, the device's install including its writes and checks."
    if [[ -n ${link_desc:-} ]]; then echo "Emulated links: two network namespaces made by this run; $link_desc."; fi
    echo "\`--patch-from\` is today's stand-in for what the server planner will choose and serve (issue #22): the vendor built the bundle with a patch from v1."
    echo
    table os "Monthly OS update (v1 → v2: $added packages added, one binary rebuilt)"
    table cfg "One config file (v1 → v1c)"
    echo "### Full image, bundle creation, memory"
    echo
    echo "| | measured |"
    echo "| --- | ---: |"
    echo "| full v2 bundle (\`bundle create\` defaults) | $(fmt_b "$full_bundle") |"
    echo "| \`zstd -19 --long\` of the v2 image | $(fmt_b "$full_zstd") |"
    echo "| \`bundle create\` of v2 | $create_time s |"
    echo "| \`bita compress --compression zstd\` of v2 | $bita_compress_time s |"
    echo "| \`bundle create --patch-from v1.kxb\` of v2: time, peak RSS | $patch_create_time s, $patch_rss MiB |"
    echo "| kernex-updater with that bundle (loopback): peak RSS | ${rss[$first-os-patch]} MiB |"
    echo "| full local install of v1 (\`kernex-updater install v1.kxb\`, no seed) | $full_time s ($(mbps "$img_bytes" "$full_time")) |"
    echo "| \`dd bs=4M conv=fsync\` of the v1 image to a file | $dd_time s ($(mbps "$img_bytes" "$dd_time")) |"
    echo
    echo "### Goals (issue #22)"
    echo
    echo "| goal | target | measured | |"
    echo "| --- | ---: | ---: | --- |"
    goal "OS update bytes ÷ \`zstd --patch-from\`, Kernex \`--patch-from\`" "≤ 1.10" "$(x "${bytes[$first-os-patch]}" "${zpatch[os]}")" le 1.10
    goal "… Kernex plain chunks (no vendor flag)" "≤ 1.10" "$(x "${bytes[$first-os-plain]}" "${zpatch[os]}")" le 1.10
    if ran lo; then
        goal "OS update wall ÷ \`bita clone\` on loopback, Kernex \`--patch-from\`" "≤ 0.80" "$(x "${wall[lo-os-patch]}" "${wall[lo-os-bita]}")" le 0.80
        goal "… Kernex plain chunks" "≤ 0.80" "$(x "${wall[lo-os-plain]}" "${wall[lo-os-bita]}")" le 0.80
    fi
    if ran 4g; then
        goal "OS update wall on 4G ÷ (bytes ÷ rate + RTT), Kernex \`--patch-from\`" "≤ 1.20" "$(x "${wall[4g-os-patch]}" "$(ideal "${bytes[4g-os-patch]}")")" le 1.20
        goal "… Kernex plain chunks" "≤ 1.20" "$(x "${wall[4g-os-plain]}" "$(ideal "${bytes[4g-os-plain]}")")" le 1.20
    fi
    goal "Full local install throughput ÷ \`dd conv=fsync\`" "≥ 0.90" "$(x "$dd_time" "$full_time")" ge 0.90
    goal "Full bundle ÷ \`zstd -19 --long\`" "≤ 1.05" "$(x "$full_bundle" "$full_zstd")" le 1.05
    goal "\`bundle create\` time ÷ \`bita compress\`" "≤ 2.00" "$(x "$create_time" "$bita_compress_time")" le 2.00
    goal "One config file, Kernex \`--patch-from\`: bytes" "≤ 10000" "${bytes[$first-cfg-patch]}" le 10000
    goal "… Kernex plain chunks: bytes" "≤ 10000" "${bytes[$first-cfg-plain]}" le 10000
    goal "\`--patch-from\` peak RSS (MiB)" "≤ 256" "$patch_rss" le 256
}

if [[ -n $report_from ]]; then
    # shellcheck source=/dev/null
    source "$report_from"
    report
    exit 0
fi

# ------------------------------------------------------------ the OS-update pair
# shellcheck source=/dev/null
suite=${BENCH_DEBIAN_SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-}")}
[[ -n $suite ]] || die "no Debian suite: set BENCH_DEBIAN_SUITE"
arch=$(dpkg --print-architecture)
# The host's own Debian mirror (its apt sources), unless BENCH_DEBIAN_MIRROR.
apt_mirror() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] && grep -hE '^(deb |URIs:)' "$f"
    done | tr ' ' '\n' | grep -E '^https?://' | grep -v -- '-security' | sed -n 1p || true
}
mirror=${BENCH_DEBIAN_MIRROR:-$(apt_mirror)}
[[ -n $mirror ]] || die "no Debian mirror in the apt sources: set BENCH_DEBIAN_MIRROR"
pair_key=$({
    echo "recipe 1 $suite $arch minbase $epoch"
    echo "$add_pkgs"
    cat "$here/os_update.py"
} | sha256sum | cut -c1-16)
pair=$cache_root/$suite-$arch-$pair_key

# Unmounts whatever debootstrap left mounted under $1 (it mounts /proc and
# /sys while it configures), so nothing outside the tree is ever removed.
unmount_under() {
    local m
    while read -r m; do
        umount -l "$m" || true
    done < <(awk -v d="$1/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r)
}
# slim DIR: what an image build drops from a root (logs, caches, apt lists,
# the host's resolver and name), so both roots differ only in what changed.
slim() {
    local d=$1
    unmount_under "$d"
    rm -rf --one-file-system "${d:?}"/{dev,proc,sys,run,tmp}/* "$d"/var/log/* "$d"/var/cache/apt/*.bin \
        "$d"/var/cache/apt/archives/*.deb "$d"/var/lib/apt/lists/* "$d"/var/cache/ldconfig/aux-cache \
        "$d"/var/lib/dpkg/*-old "$d"/var/cache/debconf/*-old "$d"/etc/resolv.conf "$d"/debootstrap
    echo kernex-bench >"$d/etc/hostname"
}
bootstrap_root() { # DIR [PACKAGES,...]
    local dir=$1 include=${2:-}
    log "debootstrap --variant=minbase $suite ${include:+(+ $include)}"
    debootstrap --variant=minbase --arch="$arch" --components=main --cache-dir="$cache_root/debs" \
        ${include:+--include="$include"} "$suite" "$dir" "$mirror" >"$dir.log" 2>&1 || {
        unmount_under "$dir"
        die "debootstrap failed (last lines of $dir.log below)$(echo; tail -n 15 "$dir.log")"
    }
    slim "$dir"
}
pkg_list() { awk '/^Package:/ { p = $2 } /^Status: install ok installed/ { print p }' "$1/var/lib/dpkg/status" | sort; }
build_pair() {
    [[ -f $pair/done ]] && return 0
    mkdir -p "$cache_root/debs"
    exec 9>"$cache_root/.lock"
    flock 9
    [[ -f $pair/done ]] && return 0
    local t=$pair.tmp
    if [[ -d $t ]]; then unmount_under "$t"; rm -rf --one-file-system "$t"; fi
    mkdir -p "$t"
    bootstrap_root "$t/v1"
    bootstrap_root "$t/v2" "$(echo "$add_pkgs" | tr ' ' ',')"
    log "v2: one rebuilt binary"
    python3 "$here/os_update.py" rebuild "$t/v1" "$t/v2" >"$t/rebuilt.txt" || die "os_update.py rebuild failed"
    log "v1c: one config file changed"
    cp -a "$t/v1" "$t/v1c"
    python3 "$here/os_update.py" config "$t/v1c" >"$t/config.txt" || die "os_update.py config failed"
    comm -13 <(pkg_list "$t/v1") <(pkg_list "$t/v2") >"$t/added-packages.txt"
    local v
    for v in v1 v2 v1c; do
        tar -C "$t/$v" --sort=name --numeric-owner --mtime=@"$epoch" -cf "$t/$v.tar" . ||
            die "tar of $v failed"
    done
    {
        echo "suite=$suite arch=$arch"
        echo "added=$(wc -l <"$t/added-packages.txt") packages: $(tr '\n' ' ' <"$t/added-packages.txt")"
        echo "changed_v2=$(diff -rq --no-dereference "$t/v1" "$t/v2" 2>/dev/null | wc -l) files or directories differ (v1 -> v2)"
        echo "rebuilt=$(cat "$t/rebuilt.txt")"
        echo "config=$(cat "$t/config.txt")"
    } >"$t/summary.txt"
    rm -rf --one-file-system "${t:?}"/v1 "$t"/v2 "$t"/v1c
    mv "$t" "$pair"
    touch "$pair/done"
    flock -u 9
}
log "OS-update pair: $pair"
build_pair
cat "$pair/summary.txt" >&2
((pair_only)) && exit 0

# ------------------------------------------------------------ tools and images
# Without kernex-updater's default `llm` feature (llama.cpp: minutes of C++
# build): the install path does not use it.
log "building kernex-image and kernex-updater ($profile, no llm feature)"
build_flags=(--locked --quiet -p kernex-image -p kernex-updater --no-default-features)
[[ $profile == release ]] && build_flags+=(--release)
(cd "$repo" && nice -n 5 cargo build "${build_flags[@]}") || die "cargo build failed"
kx=$target_dir/$profile/kernex-image
ku=$target_dir/$profile/kernex-updater
[[ -x $bita ]] || die "bita is not installed: run scripts/setup"
"$bita" compress --help | grep -q zstd || die "$bita has no zstd support: run scripts/setup"

# All three images have one size: v2's content plus 30 %, in 16 MiB steps.
tar_bytes=$(stat -c %s "$pair/v2.tar")
img_mb=${BENCH_IMAGE_MB:-$(((tar_bytes * 13 / 10 / 1048576 + 15) / 16 * 16))}
[[ $img_mb =~ ^[0-9]+$ ]] || die "BENCH_IMAGE_MB is not a number: $img_mb"
imgs=$pair/ext4-${img_mb}m
if [[ ! -f $imgs/done ]]; then
    mkdir -p "$imgs"
    for v in v1 v2 v1c; do
        log "$v.img: kernex-image rootfs --fs ext4 --size ${img_mb} MiB --timestamp $epoch"
        "$kx" rootfs "$pair/$v.tar" --fs ext4 --size $((img_mb * 1048576)) --timestamp "$epoch" \
            --label rootfs --out "$imgs/$v.img" >"$imgs/$v.log" 2>&1 ||
            die "kernex-image rootfs $v failed: $(tail -n 5 "$imgs/$v.log")"
    done
    touch "$imgs/done"
fi
v1img=$imgs/v1.img
img_bytes=$(stat -c %s "$v1img")
declare -A image=([os]=$imgs/v2.img [cfg]=$imgs/v1c.img)
cores=$(nproc)
updates="os cfg"

mkdir -p "$work_root"
work=$(mktemp -d "$work_root/run.XXXXXX")
srv=$work/srv
mkdir -p "$srv"
server_pid=
emu_pid=
ns_c=kxbc$$
ns_s=kxbs$$
link_down() {
    local p
    for p in $server_pid $emu_pid; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    server_pid=
    emu_pid=
    ip netns del "$ns_c" 2>/dev/null || true
    ip netns del "$ns_s" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    link_down
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
rss_mib() { awk -F': ' '/Maximum resident/ { printf "%.0f", $2 / 1024 }' "$1"; }

# ------------------------------------------------------------ bundles, archives, patches
# bundle NAME VERSION IMAGE [ARGS...]: kernex-image bundle create at its defaults.
bundle() {
    local name=$1 ver=$2 img=$3
    shift 3
    "$kx" bundle create --compatible bench-x86_64 --version "$ver" --rootfs "$img" \
        --key "$key" --cert "$cert" --out "$srv/$name.kxb" --json "$@" >"$work/create-$name.json" ||
        die "bundle create $name failed"
}
log "bundles: v1, v2 (timed), v1c"
bundle v1 1.0.0 "$v1img"
t0=$(now)
bundle os 1.1.0 "${image[os]}"
t1=$(now)
create_time=$(secs "$t0" "$t1")
bundle cfg 1.0.1 "${image[cfg]}"
log "bundles with a patch from v1 (bundle create --patch-from v1.kxb, peak RSS)"
t0=$(now)
/usr/bin/time -v -o "$work/time-create-os-patched" "$kx" bundle create --compatible bench-x86_64 --version 1.1.0 \
    --rootfs "${image[os]}" --key "$key" --cert "$cert" --out "$srv/os-patched.kxb" --json \
    --patch-from "$srv/v1.kxb" --keyring "$ca" >"$work/create-os-patched.json" ||
    die "bundle create --patch-from (v2) failed"
t1=$(now)
patch_create_time=$(secs "$t0" "$t1")
patch_rss=$(rss_mib "$work/time-create-os-patched")
bundle cfg-patched 1.0.1 "${image[cfg]}" --patch-from "$srv/v1.kxb" --keyring "$ca"

log "bita compress (timed) and casync make"
t0=$(now)
"$bita" compress -f --input "${image[os]}" --compression zstd "$srv/os.bita" >"$work/bita-compress.log" 2>&1 ||
    die "bita compress v2 failed"
t1=$(now)
bita_compress_time=$(secs "$t0" "$t1")
"$bita" compress -f --input "${image[cfg]}" --compression zstd "$srv/cfg.bita" >/dev/null 2>&1 ||
    die "bita compress v1c failed"
for u in $updates; do
    casync make --store="$srv/$u.castr" "$srv/$u.caibx" "${image[$u]}" >/dev/null 2>&1 || die "casync make $u failed"
done

# zstd's window must cover the old image (the dictionary) and the new one.
wlog=$(awk -v b="$img_bytes" 'BEGIN { w = 10; while (2 ^ w < b) w++; print w + 1 }')
declare -A zpatch xpatch
for u in $updates; do
    log "$u: zstd -19 --long=$wlog --patch-from=v1.img, xdelta3 -9"
    zpatch[$u]=$(zstd -q -19 --long="$wlog" -T0 --patch-from="$v1img" -c "${image[$u]}" 2>"$work/zstd-$u.log" | wc -c)
    xdelta3 -e -9 -f -B $((1 << wlog)) -s "$v1img" "${image[$u]}" "$work/xdelta" || die "xdelta3 $u failed"
    xpatch[$u]=$(stat -c %s "$work/xdelta")
    rm -f "$work/xdelta"
done
log "zstd -19 --long of the whole v2 image"
full_zstd=$(zstd -q -19 --long -T0 -c "${image[os]}" | wc -c)
full_bundle=$(stat -c %s "$srv/os.kxb")

# ------------------------------------------------------------ the device
# Slot B gets v1 by a full local install (timed: the dd comparison), then B
# is booted and committed: v1 and its index are the seed of every update.
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
EOT
}
log "full local install of v1 (no seed) and dd of the image"
mkdir -p "$dev"
cp "$ca" "$dev/keyring.pem"
write_config A
: >"$dev/slot-a.img"
sync
t0=$(now)
"$ku" --config "$dev/system.toml" install "$srv/v1.kxb" --json >"$work/full-install.json" 2>"$work/full-install.log" ||
    die "full install of v1 failed: $(tail -n 5 "$work/full-install.log")"
t1=$(now)
full_time=$(secs "$t0" "$t1")
cmp -s "$dev/slot-b.img" "$v1img" || die "slot B does not hold v1 after the full install"
write_config B
"$ku" --config "$dev/system.toml" mark-good >/dev/null 2>&1 || die "mark-good failed"
mv "$dev" "$work/dev-v1"
sync
t0=$(now)
dd if="$v1img" of="$work/dd.img" bs=4M conv=fsync status=none
t1=$(now)
dd_time=$(secs "$t0" "$t1")
rm -f "$work/dd.img"

# ------------------------------------------------------------ the links
url=
pre=()
link_kind=loopback
# link_up lo|4g|4g-loss: a range server reachable at $url by "${pre[@]}" CMD.
link_up() {
    local l=$1 loss=0 if_c=kxbc$$ if_s=kxbs$$ half=$((rtt_ms / 2)) a_c=10.213.0.1 a_s=10.213.0.2
    : >"$work/server.log"
    : >"$work/port"
    if [[ $l == lo ]]; then
        pre=()
        python3 "$here/range_server.py" "$srv" "$work/server.log" >"$work/port" &
        server_pid=$!
        host=127.0.0.1
    else
        [[ $l == 4g-loss ]] && loss=$loss_pct
        ip netns add "$ns_c" || die "ip netns add $ns_c failed"
        ip netns add "$ns_s" || die "ip netns add $ns_s failed"
        ip -n "$ns_c" link set lo up
        ip -n "$ns_s" link set lo up
        local netem=(delay "${half}ms" rate "${rate_bit}bit" limit 1000)
        ((loss > 0)) && netem+=(loss "${loss}%")
        ip link add "$if_c" netns "$ns_c" type veth peer name "$if_s" netns "$ns_s" ||
            die "ip link add (veth) failed"
        if ip netns exec "$ns_c" tc qdisc add dev "$if_c" root netem "${netem[@]}" 2>/dev/null &&
            ip netns exec "$ns_s" tc qdisc add dev "$if_s" root netem "${netem[@]}"; then
            link_kind="tc netem on a veth pair (${netem[*]}, both ends)"
            ip -n "$ns_c" addr add "$a_c/30" dev "$if_c"
            ip -n "$ns_s" addr add "$a_s/30" dev "$if_s"
        else
            # No sch_netem in this kernel: the same link in user space.
            ip -n "$ns_c" link del "$if_c"
            link_kind="bench/link_emu.py on a TUN pair (no sch_netem in this kernel): delay ${half}ms each way, rate ${rate_bit} bit/s each way, limit 1000 packets, loss per packet as stated"
            : >"$work/emu.out"
            python3 "$here/link_emu.py" "$if_c" "$if_s" "$half" "$rate_bit" "$loss" 1000 >"$work/emu.out" &
            emu_pid=$!
            for _ in $(seq 50); do [[ -s $work/emu.out ]] && break; sleep 0.1; done
            [[ -s $work/emu.out ]] || die "link_emu.py did not start"
            ip link set "$if_c" netns "$ns_c" || die "moving $if_c into $ns_c failed"
            ip link set "$if_s" netns "$ns_s" || die "moving $if_s into $ns_s failed"
            ip -n "$ns_c" addr add "$a_c" peer "$a_s" dev "$if_c"
            ip -n "$ns_s" addr add "$a_s" peer "$a_c" dev "$if_s"
        fi
        ip -n "$ns_c" link set "$if_c" up
        ip -n "$ns_s" link set "$if_s" up
        pre=(ip netns exec "$ns_c")
        ip netns exec "$ns_s" python3 "$here/range_server.py" "$srv" "$work/server.log" "$a_s" >"$work/port" &
        server_pid=$!
        host=$a_s
    fi
    for _ in $(seq 50); do [[ -s $work/port ]] && break; sleep 0.1; done
    [[ -s $work/port ]] || die "range server did not start"
    url=http://$host:$(cat "$work/port")
}
# served PREFIX: body bytes and responses for paths starting with PREFIX.
served() { awk -v p="$1" 'index($1, p) == 1 { s += $3; n++ } END { printf "%d %d\n", s, n }' "$work/server.log"; }

declare -A bytes reqs wall rss
# kernex_run LINK UPDATE METHOD BUNDLE: kernex-updater install over HTTP on the v1 device.
kernex_run() {
    local l=$1 u=$2 m=$3 name=$4 f t0 t1 tag=$1-$2-$3
    rm -rf "$dev"
    mkdir -p "$dev"
    for f in "$work/dev-v1"/*; do
        if [[ ${f##*/} == slot-b.img ]]; then ln "$f" "$dev/slot-b.img"; else cp -a "$f" "$dev/"; fi
    done
    : >"$dev/slot-a.img"
    : >"$work/server.log"
    sync
    t0=$(now)
    "${pre[@]}" /usr/bin/time -v -o "$work/time-$tag" "$ku" --config "$dev/system.toml" install "$url/$name.kxb" \
        --json >"$work/install-$tag.json" 2>"$work/install-$tag.log" ||
        die "install $name over $l failed: $(tail -n 5 "$work/install-$tag.log")"
    t1=$(now)
    wall[$tag]=$(secs "$t0" "$t1")
    read -r "bytes[$tag]" "reqs[$tag]" < <(served "/$name.kxb")
    rss[$tag]=$(rss_mib "$work/time-$tag")
    cmp -s "$dev/slot-a.img" "${image[$u]}" || die "slot A does not hold the $u image after the install ($tag)"
}
other_run() { # LINK UPDATE METHOD PREFIX CMD...
    local l=$1 u=$2 m=$3 prefix=$4 t0 t1 tag=$1-$2-$3
    shift 4
    : >"$work/server.log"
    rm -f "$work/out.img"
    sync
    t0=$(now)
    "${pre[@]}" "$@" >"$work/$tag.log" 2>&1 || die "$m $u over $l failed: $(tail -n 5 "$work/$tag.log")"
    t1=$(now)
    wall[$tag]=$(secs "$t0" "$t1")
    read -r "bytes[$tag]" "reqs[$tag]" < <(served "$prefix")
    cmp -s "$work/out.img" "${image[$u]}" || die "$m $u over $l produced a different image"
    rm -f "$work/out.img"
}
link_desc=
for l in $links; do
    link_up "$l"
    log "link $l: $url ($link_kind)"
    [[ $l != lo ]] && link_desc=$link_kind
    for u in $updates; do
        log "$l/$u: kernex-updater install, plain chunks"
        kernex_run "$l" "$u" plain "$u"
        log "$l/$u: kernex-updater install, bundle with --patch-from v1"
        kernex_run "$l" "$u" patch "$u-patched"
        log "$l/$u: bita clone --seed v1.img"
        other_run "$l" "$u" bita "/$u.bita" "$bita" clone -f --seed "$v1img" "$url/$u.bita" "$work/out.img"
        log "$l/$u: casync extract --seed=v1.img"
        other_run "$l" "$u" casync "/$u.ca" casync extract --store="$url/$u.castr" --seed="$v1img" \
            "$url/$u.caibx" "$work/out.img"
    done
    link_down
done
cmp -s "$work/dev-v1/slot-b.img" "$v1img" || die "the seed slot changed during the updates"
load_after=$(cut -d' ' -f1 /proc/loadavg)


# Every figure, for `--report FILE` (the same report without re-measuring).
declare -p rate_bit rtt_ms loss_pct links cores load_before load_after wall bytes reqs rss zpatch xpatch \
    pair suite arch img_mb epoch profile link_desc full_bundle full_zstd create_time bita_compress_time \
    patch_create_time patch_rss full_time img_bytes dd_time >"$work_root/results-$(date -u +%Y%m%dT%H%M%S).sh"
report
