#!/usr/bin/env bash
# Rollout benchmarks (prints numbers; it is not a test).
#
# 1. Preview for N devices (default 100,000) across 3 link classes, 500
#    sites and 4 time zones in a SQLite store: target selection with exact
#    delta bytes from the chunk indexes, diversity order, waves and the
#    projection under caps and windows (server/examples/rollout_bench.rs).
# 2. kernex-sim: M simulated devices (default 1,000; 60 % ethernet, 30 %
#    wifi, 10 % metered 4G) through a 100 % rollout against a real
#    kernex-server on loopback with its test clock: wall time, simulated
#    time, peak egress / cap.
# 3. The seed's headline on ethernet-class devices: deploy to 100 devices
#    (waves 10 % then 100 %, 60 s soak), then roll back; simulated seconds.
#
# Usage: bench/rollout.sh [--devices N] [--sim-devices M] [--profile release|dev] [--work-dir DIR]
set -euo pipefail

die() { echo "bench/rollout.sh: error: $*" >&2; exit 1; }
log() { printf '== [%3ds] %s\n' "$SECONDS" "$*" >&2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
devices=100000
sim_devices=1000
profile=release
target_dir=${CARGO_TARGET_DIR:-$repo/target}
work=""
while (($#)); do
    case $1 in
        --devices) devices=${2:?}; shift 2 ;;
        --sim-devices) sim_devices=${2:?}; shift 2 ;;
        --profile) profile=${2:?}; shift 2 ;;
        --work-dir) work=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
command -v python3 >/dev/null || die "python3 is needed to read the JSON summaries"
case $profile in
    release) flag=--release; bindir=$target_dir/release ;;
    dev) flag=; bindir=$target_dir/debug ;;
    *) die "--profile is release or dev" ;;
esac
work=${work:-$(mktemp -d)}
mkdir -p "$work"
server_pid=""
cleanup() { [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null || true; }
trap cleanup EXIT

log "building ($profile)"
(cd "$repo" && cargo build $flag -p kernex-server -p kernex-sim --bins --example rollout_bench >&2)

log "1. preview for $devices devices"
"$bindir/examples/rollout_bench" "$devices"

"$bindir/kernex-sim" make-releases --out "$work/rel" --size $((8 << 20)) --change 0.1 >&2
ca=$work/rel/ca.crt
from=$work/rel/sim-x86-1.0.0.kxb
to=$work/rel/sim-x86-1.1.0.kxb

start_server() { # $1: data dir; prints the admin password
    local dir=$1 port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    cat >"$dir.toml" <<EOF
listen = "127.0.0.1:$port"
data-dir = "$dir"
test-clock = true
scheduler-interval-ms = 0
device-requests-per-minute = 0
user-requests-per-minute = 0
EOF
    "$bindir/kernex-server" --config "$dir.toml" >"$dir.out" 2>"$dir.err" &
    server_pid=$!
    for _ in $(seq 100); do
        grep -q listening "$dir.out" 2>/dev/null && break
        sleep 0.1
    done
    grep -q listening "$dir.out" || die "kernex-server did not start: $(cat "$dir.err")"
    url=http://127.0.0.1:$port
    password=$(sed -n 's/.*(shown only now): //p' "$dir.out")
}

summary() { # $1: JSON summary file
    python3 - "$1" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"  status {s['status']}, devices {s['devices']}, wall {s['wall_secs']:.1f} s, simulated {s['sim_secs']} s")
print(f"  waves promoted at (simulated s): {s['waves_promoted_at_secs']}")
print(f"  bytes: preview {s['preview_total_bytes']}, downloaded {s['downloaded_total_bytes']}; preview projected {s['preview_duration_secs']} s")
print(f"  peak egress {s['peak_egress_bytes_per_sec']} B/s / cap {s['egress_cap_bytes_per_sec']} B/s = {s['peak_egress_over_cap']:.3f}")
if s.get('metered_budget_per_day'):
    print(f"  metered: max {s['metered_max_device_day_bytes']} B per device-day / budget {s['metered_budget_per_day']}")
if s.get('all_committed_after_secs') is not None:
    print(f"  every device committed after {s['all_committed_after_secs']} s (simulated)")
if s.get('rollback_secs') is not None:
    print(f"  rollback: every device on its previous version after {s['rollback_secs']} s (simulated)")
EOF
}

log "2. kernex-sim, $sim_devices devices, 100 % rollout"
start_server "$work/srv1"
/usr/bin/time -f '  kernex-sim: %e s wall, %M KB max RSS' "$bindir/kernex-sim" run --server "$url" --password "$password" \
    --ca "$ca" --from "$from" --to "$to" --devices "$sim_devices" --mix 60,30,10 --sites 100 \
    --waves 1%,10%,50%,100% --soak-secs 300 --egress-cap 25000000 --max-concurrent 200 --per-site 3 \
    --poll-secs 60 --json --prefix bench >"$work/sim1.json"
summary "$work/sim1.json"
kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""

log "3. headline: 100 ethernet devices, deploy then roll back"
start_server "$work/srv2"
"$bindir/kernex-sim" run --server "$url" --password "$password" \
    --ca "$ca" --from "$from" --to "$to" --devices 100 --mix 100,0,0 --sites 25 \
    --waves 10%,100% --soak-secs 60 --egress-cap 125000000 --max-concurrent 100 --per-site 4 \
    --poll-secs 15 --install-secs 20 --health-secs 30 --rollback-secs 8 \
    --rollback-after-complete --json --prefix headline >"$work/sim2.json"
summary "$work/sim2.json"
log "done; JSON summaries in $work"
