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
