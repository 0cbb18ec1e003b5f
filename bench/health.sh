#!/usr/bin/env bash
# Health watchdog benchmark (prints numbers; it is not a test).
#
# Wall time and peak RSS of `kernex-updater health run` on a simulated
# device whose booted slot is on trial, with (1) only the `llm` check
# (SmolLM2-135M Q4_1 from scripts/setup.d/31-llm-model.sh: load, 32 tokens),
# (2) every other check (supervised agent, HTTP probe, command, disk,
# memory) and no llm, (3) all of them together, each stability window 0 so
# the time is the checks' own. Median of --runs runs; peak RSS from
# /usr/bin/time. The updater is a release build (the `llm` feature is a
# default one); BENCH_PROFILE=debug measures the test build instead.
#
# Usage: bench/health.sh [--runs N] [--tokens N]
set -euo pipefail

die() { echo "bench/health.sh: error: $*" >&2; exit 1; }
log() { printf '== [%3ds] %s\n' "$SECONDS" "$*" >&2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
runs=5
tokens=32
while (($#)); do
    case $1 in
        --runs) runs=${2:?}; shift 2 ;;
        --tokens) tokens=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
: "${KERNEX_CACHE:=/var/cache/kernex-ci}"
model=${KERNEX_LLM_MODEL:-$KERNEX_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf}
[[ -f $model ]] || die "no model at $model (run scripts/setup)"
[[ -x /usr/bin/time ]] || die "/usr/bin/time missing (apt-get install time)"
command -v python3 >/dev/null || die "python3 missing"

target_dir=${CARGO_TARGET_DIR:-$repo/target}
# BENCH_PROFILE=debug reuses the test build (dependencies and llama.cpp are
# optimised in it too; only the updater's own code is not).
profile=${BENCH_PROFILE:-release}
case $profile in
    release) flags=(--release) ;;
    debug) flags=() ;;
    *) die "BENCH_PROFILE must be release or debug" ;;
esac
log "building kernex-updater ($profile, default features: llm)"
(cd "$repo" && cargo build "${flags[@]}" --locked -p kernex-updater >&2)
updater=$target_dir/$profile/kernex-updater

work=$(mktemp -d)
cleanup() { [[ -n ${http_pid:-} ]] && kill "$http_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/www"
echo ok > "$work/www/health"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server "$port" --bind 127.0.0.1 --directory "$work/www" >/dev/null 2>&1 &
http_pid=$!
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done

truncate -s 1M "$work/slot-a.img" "$work/slot-b.img"
touch "$work/keyring.pem"

llm_check="[[health.checks]]
type = \"llm\"
model = \"$model\"
prompt = \"The capital of France is\"
tokens = $tokens
min-tokens-per-second = 1
max-rss = 4294967296
"
other_checks="[[health.checks]]
type = \"service\"
name = \"agent\"
mode = \"supervise\"
command = [\"sleep\", \"60\"]
[[health.checks]]
type = \"http\"
url = \"http://127.0.0.1:$port/health\"
body-contains = \"ok\"
[[health.checks]]
type = \"command\"
command = [\"true\"]
[[health.checks]]
type = \"disk\"
path = \"/\"
min-free = 1
[[health.checks]]
type = \"memory\"
min-available = 1
"

config() { # CHECKS
    cat > "$work/system.toml" <<TOML
compatible = "qemu-aarch64"
data-dir = "$work/data"
keyring = "$work/keyring.pem"
reboot-command = ["true"]

[slots.rootfs]
A = "$work/slot-a.img"
B = "$work/slot-b.img"

[bootloader]
backend = "file"
path = "$work/boot-state"
booted-slot = "B"

[health]
deadline = 120
stability-window = 0
$1
TOML
}

# run_case NAME CHECKS: prints "median_s peak_rss_mib"
run_case() {
    local name=$1 checks=$2 times=() rss=()
    config "$checks"
    for i in $(seq "$runs"); do
        # B booted once after an install: on trial.
        printf 'BOOT_ORDER=B A\nBOOT_A_LEFT=3\nBOOT_B_LEFT=2\n' > "$work/boot-state"
        rm -rf "$work/data"
        /usr/bin/time -f '%e %M' -o "$work/time" \
            "$updater" --config "$work/system.toml" health run --json > "$work/out.json" 2>"$work/err" \
            || die "$name: health run failed: $(cat "$work/err")"
        grep -q '"outcome":"committed"' "$work/out.json" || die "$name: not committed: $(cat "$work/out.json")"
        read -r t m < "$work/time"
        times+=("$t"); rss+=("$m")
        log "$name run $i: ${t} s, $((m / 1024)) MiB"
    done
    local median_t median_m
    median_t=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    median_m=$(printf '%s\n' "${rss[@]}" | sort -n | awk '{a[NR]=$1} END {printf "%.1f", a[int((NR+1)/2)]/1024}')
    echo "$median_t $median_m"
}

read -r llm_t llm_m < <(run_case "llm only" "$llm_check")
read -r oth_t oth_m < <(run_case "other checks" "$other_checks")
read -r all_t all_m < <(run_case "all checks" "$llm_check$other_checks")

echo
echo "kernex-updater health run ($profile build), median of $runs, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%F)"
echo "model: $(basename "$model") ($(( $(stat -c %s "$model") / 1048576 )) MiB), $tokens tokens"
echo
printf '| %-44s | %8s | %13s |\n' "checks" "time" "peak RSS"
printf '|%s|%s|%s|\n' "----------------------------------------------" "---------:" "--------------:"
printf '| %-44s | %6s s | %9s MiB |\n' "llm (load + $tokens tokens)" "$llm_t" "$llm_m"
printf '| %-44s | %6s s | %9s MiB |\n' "service, http, command, disk, memory" "$oth_t" "$oth_m"
printf '| %-44s | %6s s | %9s MiB |\n' "all of them" "$all_t" "$all_m"
