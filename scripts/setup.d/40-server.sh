# The control plane (server/): its tests run the same suite against SQLite
# (embedded, nothing to install) and a real PostgreSQL on 127.0.0.1:5432
# (user postgres, trust auth for 127.0.0.1, database `test`). The server
# tests fail, not skip, when PostgreSQL is unreachable, so this makes sure
# it is installed, trusted on loopback and running.
need_apt pg_ctlcluster postgresql

pg_version=$(ls /etc/postgresql | sort -V | tail -n 1)
pg_hba=/etc/postgresql/$pg_version/main/pg_hba.conf
if ! grep -Eq '^host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$pg_hba"; then
    echo "setup: PostgreSQL $pg_version: trust auth for 127.0.0.1" >&2
    # First matching line wins: put ours first.
    { echo "host all all 127.0.0.1/32 trust"; cat "$pg_hba"; } >"$pg_hba.new"
    mv "$pg_hba.new" "$pg_hba"
    chown postgres:postgres "$pg_hba"
    if pg_isready -q -h 127.0.0.1 -p 5432; then
        pg_ctlcluster --skip-systemctl-redirect "$pg_version" main reload
    fi
fi
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    echo "setup: starting PostgreSQL $pg_version" >&2
    pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start
    for _ in $(seq 1 30); do
        pg_isready -q -h 127.0.0.1 -p 5432 && break
        sleep 1
    done
fi
if ! psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1; then
    psql -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE test" >/dev/null
fi
