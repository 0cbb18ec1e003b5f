#!/usr/bin/env bash
# Control-plane benchmark (prints numbers; it is not a test).
#
# With --devices (100,000) devices enrolled, on SQLite and on PostgreSQL:
# requests/s and p50/p99 latency of the device poll endpoint
# (GET /api/v1/device/poll, nothing to do: 204; and with a release assigned:
# 200 + JSON) and of the heartbeat endpoint (POST /api/v1/device/heartbeat),
# under wrk on loopback, next to bare axum handlers that answer with the
# same status and body on the same machine in the same run (the framework
# limit: server/examples/bare.rs). Goal (issue 6): poll >= 0.5x the bare
# handler's requests/s with p99 < 20 ms.
#
# Every request carries another device's credential (bench/server.lua), so
# each one authenticates a different device, as a fleet would; the default
# per-device rate limit stays on. Before a poll row every device polls once
# (a fleet that polls every minute), so the server's poll cache is in its
# steady state; the row shows the share of polls it answered. The release
# is assigned with SQL while the server is stopped, and the server started
# again, before the "release assigned" row.
#
# "Login under attack" (issue 21), per backend: the p50/p99 latency of a
# device poll and of an operator GET (GET /api/v1/releases), each at a
# fixed rate (--attack-rate per s), while --attackers clients hammer
# POST /api/v1/login with wrong passwords (bench/login_attack.py: each
# client on its own loopback address, guessing its own accounts, so every
# guess reaches the password hasher until the per-address throttle stops
# it), and the server's peak RSS. Goal: poll p99 < 50 ms, RSS < 300 MB.
#
# Usage: bench/server.sh [options]     (see --help; bench/README.md)
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/server.sh [options]

  --devices N        devices enrolled (env BENCH_DEVICES, default 100000)
  --duration SECS    measured seconds per endpoint (env BENCH_DURATION, default 10)
  --warmup SECS      unmeasured seconds before each; the server's poll rows
                     warm up in runs of this length until every device
                     polled once (env BENCH_WARMUP, default 3)
  --connections N    concurrent connections (env BENCH_CONNECTIONS, default 64)
  --threads N        wrk threads (env BENCH_THREADS, default 2)
  --backends LIST    "sqlite postgres" (env BENCH_BACKENDS, default both)
  --pg-admin-url URL PostgreSQL to create the benchmark database in
                     (env BENCH_PG_ADMIN_URL,
                     default postgres://postgres@127.0.0.1:5432/postgres)
  --pg-database NAME database (re)created for the run (env BENCH_PG_DATABASE,
                     default kernex_bench; dropped first if it exists)
  --work-dir DIR     data directories and logs (env BENCH_WORK_DIR,
                     default $CARGO_TARGET_DIR or target, /bench-server)
  --profile NAME     cargo profile of the binaries: release, or dev (workspace
                     crates unoptimised, dependencies at opt-level 2; quicker
                     to build) (env BENCH_PROFILE, default release)
  --attack-duration SECS  seconds of "login under attack" per backend, 0 to
                     skip it (env BENCH_ATTACK_DURATION, default 20)
  --attackers N      concurrent wrong-password clients (env BENCH_ATTACKERS,
                     default 256)
  --attack-rate N    legitimate polls and operator GETs per second during
                     the attack, each (env BENCH_ATTACK_RATE, default 10)
  --hash-concurrency N  the server's [login] hash-concurrency (passwords
                     hashed at once; env BENCH_HASH_CONCURRENCY, default:
                     the server's default, 0 = twice the cores)
  --keep             keep the work directory and the benchmark database
  -h, --help         this text

Needs wrk, python3 and psql (scripts/setup installs them: setup.d/45-bench.sh)
and a PostgreSQL that trusts loopback (setup.d/40-server.sh). Builds
kernex-server and the bare handler (server/examples/bare.rs) in release mode.
Devices are seeded with SQL straight into the store the server created
(credentials kxd_bench_000000...), not enrolled over HTTP.
EOF
}

die() { echo "bench/server.sh: error: $*" >&2; exit 1; }
log() { printf '== [%3ds] %s\n' "$SECONDS" "$*" >&2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

devices=${BENCH_DEVICES:-100000}
duration=${BENCH_DURATION:-10}
warmup=${BENCH_WARMUP:-3}
connections=${BENCH_CONNECTIONS:-64}
threads=${BENCH_THREADS:-2}
backends=${BENCH_BACKENDS:-"sqlite postgres"}
pg_admin_url=${BENCH_PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
pg_database=${BENCH_PG_DATABASE:-kernex_bench}
target_dir=${CARGO_TARGET_DIR:-$repo/target}
work_root=${BENCH_WORK_DIR:-$target_dir/bench-server}
profile=${BENCH_PROFILE:-release}
attack_duration=${BENCH_ATTACK_DURATION:-20}
attackers=${BENCH_ATTACKERS:-256}
attack_rate=${BENCH_ATTACK_RATE:-10}
hash_concurrency=${BENCH_HASH_CONCURRENCY:-0}
keep=0

while (($#)); do
    case $1 in
        --devices) devices=${2:?--devices needs N}; shift 2 ;;
        --duration) duration=${2:?--duration needs SECS}; shift 2 ;;
        --warmup) warmup=${2:?--warmup needs SECS}; shift 2 ;;
        --connections) connections=${2:?--connections needs N}; shift 2 ;;
        --threads) threads=${2:?--threads needs N}; shift 2 ;;
        --backends) backends=${2:?--backends needs a list}; shift 2 ;;
        --pg-admin-url) pg_admin_url=${2:?--pg-admin-url needs URL}; shift 2 ;;
        --pg-database) pg_database=${2:?--pg-database needs NAME}; shift 2 ;;
        --work-dir) work_root=${2:?--work-dir needs DIR}; shift 2 ;;
        --profile) profile=${2:?--profile needs NAME}; shift 2 ;;
        --attack-duration) attack_duration=${2:?--attack-duration needs SECS}; shift 2 ;;
        --attackers) attackers=${2:?--attackers needs N}; shift 2 ;;
        --attack-rate) attack_rate=${2:?--attack-rate needs N}; shift 2 ;;
        --hash-concurrency) hash_concurrency=${2:?--hash-concurrency needs N}; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
for n in "$devices" "$duration" "$warmup" "$connections" "$threads" "$attack_duration" "$attackers" "$attack_rate" "$hash_concurrency"; do
    [[ $n =~ ^[0-9]+$ ]] || die "not a number: $n"
done
((devices >= 1 && devices <= 1000000)) || die "--devices must be 1 to 1000000"
((duration >= 1 && connections >= 1 && threads >= 1)) || die "--duration, --connections and --threads must be at least 1"
((connections >= threads)) || die "--connections must be at least --threads"
for b in $backends; do
    [[ $b == sqlite || $b == postgres ]] || die "unknown backend $b (sqlite, postgres)"
done
[[ $pg_database =~ ^[a-z_][a-z0-9_]*$ ]] || die "--pg-database: lower-case letters, digits and _"
case $profile in
    release) profile_dir=release ;;
    dev) profile_dir=debug ;;
    *) die "--profile must be release or dev" ;;
esac

: "${KERNEX_CACHE:=/var/cache/kernex-ci}"
export PATH="$KERNEX_CACHE/cargo-bin/bin:$PATH"
for tool in wrk python3 curl; do
    command -v "$tool" >/dev/null || die "$tool is missing (scripts/setup installs it; or apt-get install wrk python3 curl)"
done
if [[ " $backends " == *" postgres "* ]]; then
    command -v psql >/dev/null || die "psql is missing (apt-get install postgresql-client)"
    psql "$pg_admin_url" -qtAc 'SELECT 1' >/dev/null 2>&1 ||
        die "PostgreSQL at $pg_admin_url is unreachable (scripts/setup starts it)"
fi
python3 -c 'import sqlite3' 2>/dev/null || die "python3 has no sqlite3 module"

# ---------------------------------------------------------------- build
log "building kernex-server and the bare handler ($profile)"
(cd "$repo" && cargo build --profile "$profile" --quiet -p kernex-server --bin kernex-server --example bare) ||
    die "cargo build --profile $profile -p kernex-server failed"
server_bin=$target_dir/$profile_dir/kernex-server
bare_bin=$target_dir/$profile_dir/examples/bare
[[ -x $server_bin && -x $bare_bin ]] || die "$server_bin or $bare_bin was not built"

# ---------------------------------------------------------------- work dir
mkdir -p "$work_root"
work=$(mktemp -d "$work_root/run.XXXXXX")
pids=()
cleanup() {
    local rc=$? pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; done
    if ((keep)); then
        echo "kept: $work${pg_dropped:+ and database $pg_database}" >&2
    else
        rm -rf "$work"
        if [[ -n ${pg_dropped:-} ]]; then
            psql "$pg_admin_url" -qc "DROP DATABASE IF EXISTS $pg_database WITH (FORCE)" >/dev/null 2>&1 || true
        fi
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The server's configuration: the defaults, but for --hash-concurrency.
server_config=$work/server.toml
printf '[login]\nhash-concurrency = %d\n' "$hash_concurrency" >"$server_config"

cores=$(nproc)
cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
load_before=$(cut -d' ' -f1 /proc/loadavg)
awk -v l="$load_before" -v c="$cores" 'BEGIN {exit !(l > c / 2)}' &&
    echo "warning: load average $load_before on $cores cores: other work is running, numbers will be noisy" >&2

# start NAME COMMAND...: starts a server in the background, waits for its
# "listening on http://ADDR" line and sets $addr.
start() {
    local name=$1; shift
    "$@" >"$work/$name.out" 2>"$work/$name.err" &
    local pid=$!
    pids+=("$pid")
    addr=
    for _ in $(seq 1 300); do
        addr=$(sed -n 's|.*listening on http://\([0-9.:]*\).*|\1|p' "$work/$name.out" | head -n1)
        [[ -n $addr ]] && break
        kill -0 "$pid" 2>/dev/null || die "$name exited: $(tail -n 5 "$work/$name.err")"
        sleep 0.1
    done
    [[ -n $addr ]] || die "$name did not start listening within 30 s"
    server_pid=$pid
}

stop() {
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
}

# The heartbeat every device sends: what `kernex-updater daemon` sends.
cat >"$work/heartbeat.json" <<'EOF'
{"cpu_percent":12.5,"memory_used_bytes":734003200,"memory_total_bytes":4294967296,"disk_used_bytes":2147483648,"disk_total_bytes":15032385536,"temperature_celsius":51.2,"uptime_secs":86400,"booted_slot":"A","primary_slot":"A","version":"1.0.0","updater_version":"0.1.0"}
EOF

results=$work/results.tsv
: >"$results"
attack_results=$work/attack.jsonl
: >"$attack_results"

# cache_counts URL: "HITS MISSES" of the server's poll cache (0 0 for the
# bare handler, which has no /metrics).
cache_counts() {
    curl -s "$1/metrics" 2>/dev/null | awk '
        /^kernex_poll_cache_hits_total / {h = $2}
        /^kernex_poll_cache_misses_total / {m = $2}
        END {printf "%d %d\n", h, m}'
}

# measure LABEL SERVER URL METHOD PATH [BODY-FILE]: a warm-up (--warmup
# seconds; for the server's poll, until every device polled once), then
# the measured run; appends a row to $results (with the poll cache's hit
# rate during the measured seconds).
measure() {
    local label=$1 server=$2 url=$3 method=$4 path=$5 body=${6:-}
    local out json before after
    if [[ $server != bare && $path == /api/v1/device/poll ]]; then
        # Every device polls once before the measured seconds, as in a
        # fleet whose devices poll every minute: runs of --warmup seconds,
        # each going on where the last stopped, until each thread walked
        # its share of the devices.
        local offset=0 share=$(((devices + threads - 1) / threads)) n
        while ((offset < share)); do
            out=$(KX_WRK_OFFSET=$offset wrk -t "$threads" -c "$connections" -d "$((warmup > 0 ? warmup : 1))s" \
                -s "$here/server.lua" "$url" -- "$method" "$path" "$devices" "$threads")
            n=$(sed -n 's/^{"requests":\([0-9]*\).*/\1/p' <<<"$out")
            ((${n:-0} > 0)) || die "the warm-up of $label on $server made no request:
$out"
            offset=$((offset + n / threads))
        done
    elif ((warmup > 0)); then
        wrk -t "$threads" -c "$connections" -d "${warmup}s" -s "$here/server.lua" "$url" \
            -- "$method" "$path" "$devices" "$threads" ${body:+"$body"} >/dev/null
    fi
    before=$(cache_counts "$url")
    out=$(wrk -t "$threads" -c "$connections" -d "${duration}s" --timeout 10s -s "$here/server.lua" "$url" \
        -- "$method" "$path" "$devices" "$threads" ${body:+"$body"})
    after=$(cache_counts "$url")
    json=$(grep '^{"requests"' <<<"$out") || die "wrk printed no result for $label on $server:
$out"
    python3 - "$label" "$server" "$json" "$before" "$after" >>"$results" <<'EOF'
import json, sys
label, server, j = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
(h0, m0), (h1, m1) = (map(int, a.split()) for a in sys.argv[4:6])
hits, misses = h1 - h0, m1 - m0
cache = f"{100 * hits / (hits + misses):.1f} %" if hits + misses else ""
rps = j["requests"] / (j["duration_us"] / 1e6)
errors = j["connect_errors"] + j["read_errors"] + j["write_errors"] + j["timeouts"]
print("\t".join([label, server, f"{rps:.0f}", f"{j['p50_us'] / 1000:.2f}",
                 f"{j['p99_us'] / 1000:.2f}", str(j["status_errors"]), str(errors), cache]))
EOF
    log "$label on $server: $(tail -n1 "$results" | cut -f3) req/s"
}

# sql BACKEND STATEMENTS: runs SQL against the benchmark store.
sql() {
    case $1 in
        sqlite) python3 - "$data/kernex.db" "$2" <<'EOF'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=30)
db.executescript(sys.argv[2])
db.commit()
EOF
        ;;
        postgres) psql "$pg_url" -v ON_ERROR_STOP=1 -qc "$2" >/dev/null ;;
    esac
}

# seed BACKEND: $devices devices straight into the store the server made
# (one organisation, the one bootstrap created), credentials
# kxd_bench_NNNNNN (the store keeps their SHA-256), plus one release for
# the assigned-poll run.
seed() {
    local backend=$1 t0=$SECONDS
    local release_sql="INSERT INTO releases (id, org_id, version, compatible, manifest, signer, blob_key, size, sha256, created_by, created_at)
        SELECT 'bench0000000000000000000000release', id, '2.0.0', 'bench-x86_64', '{}', 'bench', 'releases/bench', 123456789,
               'a3f1c2d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90', 'bench', 0 FROM organizations;"
    case $backend in
        sqlite)
            python3 - "$data/kernex.db" "$devices" <<'EOF'
import hashlib, sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=30)
n = int(sys.argv[2])
(org,) = db.execute("SELECT id FROM organizations").fetchone()
now = int(time.time() * 1000)
rows = ((f"bench{i:027d}", org, f"bench-{i:06d}",
         hashlib.sha256(f"kxd_bench_{i:06d}".encode()).hexdigest(), now)
        for i in range(n))
db.executemany(
    "INSERT INTO devices (id, org_id, device_id, hardware_class, hardware_metadata, status,"
    " credential_hash, revoked, registered_at) VALUES (?, ?, ?, 'bench-x86_64', '{}', 'offline', ?, 0, ?)",
    rows)
db.commit()
db.execute("ANALYZE")
db.commit()
EOF
            ;;
        postgres)
            sql postgres "INSERT INTO devices (id, org_id, device_id, hardware_class, hardware_metadata, status, credential_hash, revoked, registered_at)
                SELECT 'bench' || lpad(i::text, 27, '0'), o.id, 'bench-' || lpad(i::text, 6, '0'), 'bench-x86_64', '{}', 'offline',
                       encode(sha256(convert_to('kxd_bench_' || lpad(i::text, 6, '0'), 'UTF8')), 'hex'), 0,
                       (extract(epoch from now()) * 1000)::bigint
                FROM generate_series(0, $((devices - 1))) AS i, organizations o;
                ANALYZE;"
            ;;
    esac
    sql "$backend" "$release_sql"
    log "$backend: seeded $devices devices in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------- backends
poll_body=$work/poll-200.json
for backend in $backends; do
    data=$work/$backend
    mkdir -p "$data"
    case $backend in
        sqlite) db_url="sqlite://$data/kernex.db?mode=rwc" ;;
        postgres)
            psql "$pg_admin_url" -v ON_ERROR_STOP=1 -qc "DROP DATABASE IF EXISTS $pg_database WITH (FORCE)" >/dev/null
            psql "$pg_admin_url" -v ON_ERROR_STOP=1 -qc "CREATE DATABASE $pg_database" >/dev/null
            pg_dropped=1
            pg_url="${pg_admin_url%/*}/$pg_database"
            db_url=$pg_url
            ;;
    esac
    log "$backend: starting kernex-server"
    start "kernex-server-$backend" "$server_bin" --config "$server_config" --data-dir "$data" --database-url "$db_url" --listen 127.0.0.1:0
    url="http://$addr"
    admin_password=$(sed -n 's/^One-time admin password (shown only now): //p' "$work/kernex-server-$backend.out")
    seed "$backend"

    # The answers are what they should be before anything is measured.
    code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer kxd_bench_000000' "$url/api/v1/device/poll")
    [[ $code == 204 ]] || die "$backend: poll of a seeded device answered $code, not 204"

    measure "poll, nothing to do (204)" "$backend" "$url" GET /api/v1/device/poll
    measure "heartbeat (204)" "$backend" "$url" POST /api/v1/device/heartbeat "$work/heartbeat.json"
    # Assigned with SQL, not through the API (which would drop the poll
    # cache): with the server stopped, then started again.
    stop
    sql "$backend" "UPDATE devices SET desired_release_id = 'bench0000000000000000000000release';"
    start "kernex-server-$backend" "$server_bin" --config "$server_config" --data-dir "$data" --database-url "$db_url" --listen 127.0.0.1:0
    url="http://$addr"
    code=$(curl -s -o "$work/poll-$backend.json" -w '%{http_code}' \
        -H 'Authorization: Bearer kxd_bench_000000' "$url/api/v1/device/poll")
    [[ $code == 200 ]] || die "$backend: poll with a release assigned answered $code, not 200"
    [[ -s $poll_body ]] || cp "$work/poll-$backend.json" "$poll_body"
    measure "poll, release assigned (200)" "$backend" "$url" GET /api/v1/device/poll
    if ((attack_duration > 0)); then
        [[ -n $admin_password ]] || die "$backend: no admin password was printed at first start"
        token=$(curl -s -H 'Content-Type: application/json' \
            -d "{\"email\": \"admin@localhost\", \"password\": \"$admin_password\"}" "$url/api/v1/login" |
            python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])') ||
            die "$backend: the admin could not log in"
        log "$backend: login under attack ($attackers clients, ${attack_duration} s)"
        python3 "$here/login_attack.py" --url "$url" --pid "$server_pid" --token "$token" \
            --devices "$devices" --attackers "$attackers" --duration "$attack_duration" --rate "$attack_rate" |
            python3 -c 'import json, sys; d = json.load(sys.stdin); d["server"] = sys.argv[1]; print(json.dumps(d))' "$backend" \
            >>"$attack_results" || die "$backend: login_attack.py failed"
    fi
    heartbeats=$(case $backend in
        sqlite) python3 -c 'import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("SELECT COUNT(*) FROM heartbeats").fetchone()[0])' "$data/kernex.db" ;;
        postgres) psql "$pg_url" -qtAc 'SELECT COUNT(*) FROM heartbeats' ;;
    esac)
    log "$backend: $heartbeats heartbeat rows stored"
    stop
done

# ---------------------------------------------------------------- bare axum
[[ -s $poll_body ]] || die "no poll answer was captured"
log "bare axum handlers"
start bare "$bare_bin" --listen 127.0.0.1:0 --body-file "$poll_body"
url="http://$addr"
measure "poll, nothing to do (204)" bare "$url" GET /api/v1/device/poll
measure "heartbeat (204)" bare "$url" POST /api/v1/device/heartbeat "$work/heartbeat.json"
measure "poll, release assigned (200)" bare "$url" GET /api/v1/device/poll-body
stop
load_after=$(cut -d' ' -f1 /proc/loadavg)

# ---------------------------------------------------------------- report
body_bytes=$(wc -c <"$poll_body")
echo
echo "## kernex-server device API under wrk ($(date -u +%Y-%m-%d), $profile build, $cores cores: $cpu)"
echo
echo "$devices devices, wrk -t $threads -c $connections, ${duration} s per row after ${warmup} s warm-up,"
echo "every request another device's credential; poll 200 body $body_bytes bytes (same bytes from the bare handler)."
echo "Load average before/after: $load_before / $load_after (the benchmark's own load included)."
echo
python3 - "$results" "$backends" <<'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
backends = sys.argv[2].split()
names = {"sqlite": "SQLite", "postgres": "PostgreSQL", "bare": "bare axum"}
by = {(r[0], r[1]): r for r in rows}
labels = []
for r in rows:
    if r[0] not in labels:
        labels.append(r[0])
print("| endpoint | server | req/s | p50 ms | p99 ms | ÷ bare req/s | goal (poll: ≥ 0.5×, p99 < 20 ms) | 4xx/5xx | socket errors | poll cache hits |")
print("|---|---|---:|---:|---:|---:|---|---:|---:|---:|")
for label in labels:
    bare = by.get((label, "bare"))
    for server in ["bare"] + backends:
        r = by.get((label, server))
        if not r:
            continue
        ratio, goal = "", ""
        if server != "bare" and bare:
            x = float(r[2]) / float(bare[2])
            ratio = f"{x:.2f}×"
            if label.startswith("poll"):
                ok = x >= 0.5 and float(r[4]) < 20
                goal = "✔" if ok else "✘"
        print(f"| {label} | {names[server]} | {r[2]} | {r[3]} | {r[4]} | {ratio} | {goal} | {r[5]} | {r[6]} | {r[7]} |")
EOF
if [[ -s $attack_results ]]; then
    echo
    echo "### Login under attack"
    echo
    python3 - "$attack_results" "$hash_concurrency" <<'EOF'
import json, sys
names = {"sqlite": "SQLite", "postgres": "PostgreSQL"}
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
r0 = rows[0]
hc = int(sys.argv[2])
print(f"{r0['attackers']} clients hammering POST /api/v1/login with wrong passwords for {r0['duration_secs']:.0f} s;")
print(f"hash-concurrency = {hc}" + (" (twice the cores)." if hc == 0 else "."))
print(f"legitimate polls and operator GETs at {r0['rate']:.0f}/s each. Goal: poll p99 < 50 ms, RSS < 300 MB.")
print()
print("| server | phase | poll p50 / p99 ms | operator GET p50 / p99 ms | legit errors | RSS max MB | login answers | goal |")
print("|---|---|---:|---:|---:|---:|---|---|")
for r in rows:
    for phase in ("baseline", "attack"):
        p = r[phase]
        f = lambda v: "-" if v is None else f"{v:.1f}"
        answers = ", ".join(f"{k}: {v}" for k, v in p["login_answers"].items()) or "-"
        goal = ""
        if phase == "attack":
            ok = (p["poll_p99_ms"] or 1e9) < 50 and r["vmhwm_mb"] < 300
            goal = ("✔" if ok else "✘") + f" (peak RSS {r['vmhwm_mb']:.0f} MB)"
        print(f"| {names.get(r['server'], r['server'])} | {phase} | {f(p['poll_p50_ms'])} / {f(p['poll_p99_ms'])} | "
              f"{f(p['operator_p50_ms'])} / {f(p['operator_p99_ms'])} | {p['poll_errors'] + p['operator_errors']} | "
              f"{f(p['rss_max_mb'])} | {answers} | {goal} |")
EOF
fi
echo
echo "Reproduce: bench/server.sh --devices $devices --duration $duration --connections $connections --threads $threads --profile $profile --attack-duration $attack_duration --attackers $attackers --attack-rate $attack_rate --hash-concurrency $hash_concurrency"
