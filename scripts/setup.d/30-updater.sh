# The updater's health watchdog (updater/src/health/): the `llm` check links
# llama.cpp through the `llama-cpp-2` crate, whose build script runs cmake
# and bindgen (libclang). Debian 12 ships libclang for LLVM 14.
need_apt cmake cmake
need_apt /usr/lib/llvm-14/lib/libclang.so libclang-dev
