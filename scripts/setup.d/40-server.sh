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

# moto in server mode: the S3-compatible server tests/s3.rs runs the S3 blob
# store against. From PyPI, pinned, in a venv under the cache (Debian's
# Python is externally managed).
moto_version=5.2.1
moto_dir=$KERNEX_CACHE/moto
if [[ ! -x $moto_dir/bin/moto_server ]] || ! "$moto_dir/bin/pip" show moto 2>/dev/null | grep -qx "Version: $moto_version"; then
    need_apt python3 python3
    need_apt /usr/share/doc/python3-venv python3-venv
    echo "setup: moto[server] $moto_version into $moto_dir" >&2
    python3 -m venv "$moto_dir"
    "$moto_dir/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$moto_version"
fi
