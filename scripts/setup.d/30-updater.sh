# The updater's health watchdog (updater/src/health/): the `llm` check (a
# default feature: every build of kernex-updater has it, the release builds
# of scripts/quickstart and bench/ too) links llama.cpp through the
# `llama-cpp-2` crate, whose build script runs cmake and bindgen (libclang).
# Debian 12 ships libclang for LLVM 14.
need_apt cmake cmake
need_apt /usr/lib/llvm-14/lib/libclang.so libclang-dev
# The `service` check's systemd mode is tested against a real systemd
# (updater/tests/health/systemd.rs starts a `systemd --user` of its own in
# private cgroup and mount namespaces; `unshare` and `mount` are in
# util-linux and mount, always there). Only the package: no systemd runs as
# PID 1 and none is started by installing it.
need_apt /lib/systemd/systemd systemd
