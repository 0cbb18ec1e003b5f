# Bundles and root filesystem images (protocol/, image-builder/).
need_apt pkg-config pkg-config
need_apt /usr/include/openssl/ssl.h libssl-dev
need_apt openssl openssl
need_apt mkfs.ext4 e2fsprogs
need_apt mksquashfs squashfs-tools
need_apt mkfs.erofs erofs-utils
need_apt zstd zstd
need_apt tar tar
# The bita CLI reads and clones the archives kernex-image writes (zstd
# chunks: crates.io's default bita build only has brotli).
need_cargo bita bita 0.15.0 --no-default-features --features zstd-compression
# bench/bundle.sh (not run by the tests): JSON parsing and command timing.
need_apt jq jq
need_apt hyperfine hyperfine
# bench/delta.sh (not run by the tests): casync and GNU time.
need_apt casync casync
need_apt /usr/bin/time time
