#!/usr/bin/env bash
# Rollout benchmarks (prints numbers; it is not a test).
#
# 1. Preview for N devices (default 100,000) across 3 link classes, 500
#    sites and 4 time zones in a SQLite store: target selection with exact
#    delta bytes from the chunk indexes, diversity order, waves and the
#    projection under caps and windows (server/examples/rollout_bench.rs).
# 2. kernex-sim: M simulated devices (default 1,000; 60 % ethernet, 30 %
#    wifi, 10 % metered 4G) through a 100 % rollout (waves 1 %, 10 %, 50 %,
#    100 %, 300 s soak) against a real kernex-server on loopback with its
#    test clock: wall time, simulated time, peak egress / cap (goal <= 1.00)
#    counted by the devices and by the server's HTTP layer.
# 3. The seed's headline, "deploy to 100 devices in 5 minutes, roll back in
#    < 30 s", on ethernet-class devices (12.5 MB/s, 20 s install, 30 s
#    reboot + health check, 8 s rollback reboot, own poll interval 60 s):
#    waves 10 % then 100 % (canary soak --headline-soak, default 60 s), then
#    a rollback. Run in real time against a server on its real clock with
#    its own scheduler and the default rate limits (the figures are wall
#    seconds), and once more on the test clock (simulated seconds).
#
# Every simulated device speaks the real device API over HTTP (enroll,
# heartbeat, poll, Range downloads of exactly the chunks it lacks, checked
# byte for byte against the bundle, reports); all devices are tasks of one
# kernex-sim process.
#
# Usage: bench/rollout.sh [--devices N] [--sim-devices M] [--headline-devices K]
#          [--headline-soak SECS] [--backend sqlite|postgres] [--pg-admin-url URL]
#          [--skip-preview] [--skip-fleet] [--skip-headline] [--skip-real-time]
#          [--profile release|dev] [--work-dir DIR]
set -euo pipefail

die() { echo "bench/rollout.sh: error: $*" >&2; exit 1; }
log() { printf '== [%3ds] %s (load average %s)\n' "$SECONDS" "$*" "$(cut -d' ' -f1-3 /proc/loadavg)" >&2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
devices=100000
sim_devices=1000
headline_devices=100
headline_soak=60
backend=sqlite
pg_admin_url=${BENCH_PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
skip_preview=0
skip_fleet=0
skip_headline=0
skip_real_time=0
profile=release
target_dir=${CARGO_TARGET_DIR:-$repo/target}
work=""
while (($#)); do
    case $1 in
        --devices) devices=${2:?}; shift 2 ;;
        --sim-devices) sim_devices=${2:?}; shift 2 ;;
        --headline-devices) headline_devices=${2:?}; shift 2 ;;
        --headline-soak) headline_soak=${2:?}; shift 2 ;;
        --backend) backend=${2:?}; shift 2 ;;
        --pg-admin-url) pg_admin_url=${2:?}; shift 2 ;;
        --skip-preview) skip_preview=1; shift ;;
        --skip-fleet) skip_fleet=1; shift ;;
        --skip-headline) skip_headline=1; shift ;;
        --skip-real-time) skip_real_time=1; shift ;;
        --profile) profile=${2:?}; shift 2 ;;
        --work-dir) work=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
command -v python3 >/dev/null || die "python3 is needed to read the JSON summaries (scripts/setup installs it)"
[[ -x /usr/bin/time ]] || die "GNU time (/usr/bin/time) is missing (scripts/setup installs it; or apt-get install time)"
case $profile in
    release) flag=--release; bindir=$target_dir/release ;;
    dev) flag=; bindir=$target_dir/debug ;;
    *) die "--profile is release or dev" ;;
esac
case $backend in
    sqlite) ;;
    postgres)
        command -v psql >/dev/null || die "psql is missing (apt-get install postgresql-client)"
        psql "$pg_admin_url" -qtAc 'SELECT 1' >/dev/null 2>&1 ||
            die "PostgreSQL at $pg_admin_url is unreachable (scripts/setup starts it)"
        ;;
    *) die "--backend is sqlite or postgres" ;;
esac
work=${work:-$(mktemp -d)}
mkdir -p "$work"
server_pid=""
databases=()
cleanup() {
    if [[ -n $server_pid ]]; then kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null; fi
    local db
    for db in "${databases[@]}"; do
        psql "$pg_admin_url" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT

log "building ($profile)"
examples=(--example rollout_bench)
((skip_preview)) && examples=()
(cd "$repo" && cargo build $flag -p kernex-server -p kernex-sim --bins "${examples[@]}" >&2)

if ((!skip_preview)); then
    log "1. preview for $devices devices"
    "$bindir/examples/rollout_bench" "$devices" | tee "$work/preview.txt"
fi

"$bindir/kernex-sim" make-releases --out "$work/rel" --size $((8 << 20)) --change 0.1 >&2
ca=$work/rel/ca.crt
from=$work/rel/sim-x86-1.0.0.kxb
to=$work/rel/sim-x86-1.1.0.kxb

stop_server() {
    if [[ -n $server_pid ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=""
    fi
}

start_server() { # $1: data dir, $2: test (test clock, no rate limits) or real
    local dir=$1 mode=$2 port db_line=""
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    if [[ $backend == postgres ]]; then
        local db
        db=kernex_bench_rollout_$$_${#databases[@]}
        psql "$pg_admin_url" -v ON_ERROR_STOP=1 -qc "CREATE DATABASE $db" >/dev/null
        databases+=("$db")
        db_line="database-url = \"${pg_admin_url%/*}/$db\""
    fi
    if [[ $mode == test ]]; then
        cat >"$dir.toml" <<EOF
listen = "127.0.0.1:$port"
data-dir = "$dir"
$db_line
test-clock = true
scheduler-interval-ms = 0
device-requests-per-minute = 0
user-requests-per-minute = 0
[limits]
enrollments-per-token-per-minute = 0
enrollments-per-address-per-minute = 0
# Every simulated device enrolls from 127.0.0.1.
unauthenticated-per-address-per-minute = 0
EOF
    else
        # The defaults: real clock, a scheduler pass every 5 s, rate limits
        # (but a whole simulated fleet enrolls from one address at once).
        cat >"$dir.toml" <<EOF
listen = "127.0.0.1:$port"
data-dir = "$dir"
$db_line
[limits]
enrollments-per-token-per-minute = 0
enrollments-per-address-per-minute = 0
unauthenticated-per-address-per-minute = 0
EOF
    fi
    "$bindir/kernex-server" --config "$dir.toml" >"$dir.out" 2>"$dir.err" &
    server_pid=$!
    for _ in $(seq 300); do
        grep -q listening "$dir.out" 2>/dev/null && break
        sleep 0.1
    done
    grep -q listening "$dir.out" || die "kernex-server did not start: $(cat "$dir.err")"
    url=http://127.0.0.1:$port
    # The bootstrap password must be changed before anything else.
    local one_time token
    one_time=$(sed -n 's/.*(shown only now): //p' "$dir.out")
    password=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
    token=$(curl -sS --fail-with-body "$url/api/v1/login" -H 'content-type: application/json' \
        -d "{\"email\":\"admin@localhost\",\"password\":\"$one_time\"}" | jq -r .token)
    curl -sS --fail-with-body "$url/api/v1/account/password" -H "authorization: Bearer $token" \
        -H 'content-type: application/json' \
        -d "{\"current_password\":\"$one_time\",\"new_password\":\"$password\"}" >/dev/null ||
        die "unable to change the bootstrap password"
}

summary() { # $1: JSON summary file
    python3 - "$1" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
unit = "real" if s.get('real_time') else "simulated"
print(f"  status {s['status']}, devices {s['devices']}, wall {s['wall_secs']:.1f} s, {unit} {s['sim_secs']} s")
print(f"  waves promoted at ({unit} s): {s['waves_promoted_at_secs']}")
print(f"  bytes: preview {s['preview_total_bytes']}, downloaded {s['downloaded_total_bytes']}; preview projected {s['preview_duration_secs']} s")
print(f"  peak egress (devices' count) {s['peak_egress_bytes_per_sec']} B/s / cap {s['egress_cap_bytes_per_sec']} B/s = {s['peak_egress_over_cap']:.3f}")
print(f"  peak egress (server's count) {s['server_peak_egress_bytes_per_sec']} B/s / cap = {s['server_peak_egress_over_cap']:.3f}")
if s.get('metered_budget_per_day'):
    print(f"  metered: max {s['metered_max_device_day_bytes']} B per device-day / budget {s['metered_budget_per_day']}")
if s.get('all_committed_after_secs') is not None:
    print(f"  every device committed after {s['all_committed_after_secs']} s ({unit})")
if s.get('rollback_secs') is not None:
    print(f"  rollback: every device on its previous version after {s['rollback_secs']} s ({unit})")
print(f"  versions at the end: {s['versions']}")
EOF
}

headline() { # $1: test|real, $2: output name
    local mode=$1 name=$2 rt=()
    [[ $mode == real ]] && rt=(--real-time)
    start_server "$work/srv-$name" "$mode"
    "$bindir/kernex-sim" run --server "$url" --password "$password" \
        --ca "$ca" --from "$from" --to "$to" --devices "$headline_devices" --mix 100,0,0 --sites 25 \
        --waves 10%,100% --soak-secs "$headline_soak" --egress-cap 125000000 --max-concurrent 100 --per-site 4 \
        --poll-secs 60 --install-secs 20 --health-secs 30 --rollback-secs 8 \
        --rollback-after-complete --max-sim-secs 3600 "${rt[@]}" --json --prefix "$name" >"$work/$name.json"
    summary "$work/$name.json"
    stop_server
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
if ((!skip_fleet)); then
    log "2. kernex-sim, $sim_devices devices, 100 % rollout ($backend, test clock)"
    start_server "$work/srv-fleet" test
    /usr/bin/time -f '  kernex-sim: %e s wall, %M KB max RSS' "$bindir/kernex-sim" run --server "$url" --password "$password" \
        --ca "$ca" --from "$from" --to "$to" --devices "$sim_devices" --mix 60,30,10 --sites 100 \
        --waves 1%,10%,50%,100% --soak-secs 300 --egress-cap 25000000 --max-concurrent 200 --per-site 3 \
        --poll-secs 60 --json --prefix fleet >"$work/fleet.json"
    summary "$work/fleet.json"
    stop_server
fi

if ((!skip_headline)); then
    if ((!skip_real_time)); then
        log "3a. headline: $headline_devices ethernet devices, deploy then roll back ($backend, REAL TIME)"
        headline real headline-real
    fi
    log "3b. headline: $headline_devices ethernet devices, deploy then roll back ($backend, test clock)"
    headline test headline-test
fi
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$work" "$backend" "$load_before" "$load_after" "$(nproc)" <<'EOF'
import json, os, sys
work, backend, before, after, cores = sys.argv[1:6]
def load(name):
    p = os.path.join(work, name + ".json")
    return json.load(open(p)) if os.path.exists(p) else None
def ok(good):
    return "met" if good else "MISSED"
rows = []
f = load("fleet")
if f:
    rows.append((f"{f['devices']} devices, 100 % rollout: wall time", "-",
                 f"{f['wall_secs']:.1f} s wall for {f['sim_secs']} simulated s ({f['status']}; {f['versions']})"))
    rows.append(("... peak egress / cap, devices' count", "<= 1.00",
                 f"{f['peak_egress_over_cap']:.3f} ({f['peak_egress_bytes_per_sec']} / {f['egress_cap_bytes_per_sec']} B/s) {ok(f['peak_egress_over_cap'] <= 1.0)}"))
    rows.append(("... peak egress / cap, server's HTTP count", "<= 1.00",
                 f"{f['server_peak_egress_over_cap']:.3f} ({f['server_peak_egress_bytes_per_sec']} B/s) {ok(f['server_peak_egress_over_cap'] <= 1.0)}"))
    rows.append(("... bytes downloaded / previewed", "1.00",
                 f"{f['downloaded_total_bytes'] / max(f['preview_total_bytes'], 1):.4f} ({f['downloaded_total_bytes']} / {f['preview_total_bytes']})"))
for name, label in (("headline-real", "real s"), ("headline-test", "simulated s")):
    h = load(name)
    if not h:
        continue
    c, r = h.get("all_committed_after_secs"), h.get("rollback_secs")
    rows.append((f"{h['devices']} ethernet devices: start -> all committed ({label})", "<= 300 s",
                 f"{c} s {ok(c is not None and c <= 300)}" if c is not None else f"never ({h['status']}) MISSED"))
    rows.append((f"... roll back -> all on the previous release ({label})", "< 30 s",
                 f"{r} s {ok(r is not None and r < 30)}" if r is not None else "not measured MISSED"))
    rows.append(("... wall time of the run / versions at the end", "-", f"{h['wall_secs']:.1f} s / {h['versions']}"))
print()
print(f"### Rollout benchmarks ({backend}; {cores} cores; load average {before} before, {after} after)")
print()
print("| benchmark | goal | measured |")
print("| --- | --- | --- |")
for r in rows:
    print("| " + " | ".join(r) + " |")
EOF
log "done; JSON summaries in $work"
