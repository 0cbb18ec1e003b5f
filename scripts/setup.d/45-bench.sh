# bench/server.sh (not run by the tests): wrk, the HTTP load generator
# (Debian's, with LuaJIT: its Lua script sends every request with another
# device's credential), and the clients that seed the databases directly
# (psql; python3's sqlite3 module for SQLite).
need_apt wrk wrk
need_apt psql postgresql-client
need_apt python3 python3
# bench/rollout.sh (not run by the tests): GNU time for kernex-sim's peak
# RSS, python3 for the JSON summaries, psql for --backend postgres.
need_apt /usr/bin/time time
# bench/delta.sh (not run by the tests): debootstrap builds its OS-update
# pair from Debian packages (downloaded when the bench runs, not here),
# xdelta3 and zstd are size references, iproute2 makes its network
# namespaces and links; casync is a peer it measures (bita comes from
# 10-bundle.sh).
need_apt debootstrap debootstrap
need_apt xdelta3 xdelta3
need_apt ip iproute2
need_apt casync casync
need_apt flock util-linux
