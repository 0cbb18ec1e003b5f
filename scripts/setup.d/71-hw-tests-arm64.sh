# hw-tests/, the arm64 board (qemu-system-aarch64 -M virt, installed by
# 20-bootloader.sh, with Debian's qemu_arm64 U-Boot). What it needs besides:
#
# - gcc-aarch64-linux-gnu and libc6-dev-arm64-cross: the C cross compiler
#   and linker (Debian's cross toolchain) and the arm64 glibc under
#   /usr/aarch64-linux-gnu, which the guest also gets as its libc and
#   dynamic loader.
# - A Rust compiler with an aarch64 standard library. The machine's rustup
#   toolchain has only x86_64 and rustup cannot fetch another target here, so
#   the board's kernex-updater is built with Debian's rustc-web (bookworm's
#   security suite, 1.96, the same Rust Debian builds Firefox and Chromium
#   with) and its `libstd-rust-web-dev:arm64` (the aarch64 std, Multi-Arch:
#   same). They are unpacked (dpkg-deb -x) into $KERNEX_CACHE/hw-tests-arm64/
#   rust, not installed: Debian's /usr/bin/rustc and cargo would otherwise
#   sit on PATH beside rustup's. The machine's cargo drives it (RUSTC), the
#   compiler finds its own libraries through LD_LIBRARY_PATH
#   (hw-tests/src/assets.rs).
# - The arm64 libraries kernex-updater links: libssl-dev:arm64 and
#   libssl3:arm64, unpacked into $KERNEX_CACHE/hw-tests-arm64/sysroot.
# - Debian's arm64 kernel (linux-image-6.1.0-N-arm64: an uncompressed
#   `Image` that U-Boot's booti loads, virtio/ext4/vfat as modules) and
#   busybox-static:arm64, unpacked into $KERNEX_CACHE/hw-tests-arm64/root.
#
# The arm64 packages come through apt with arm64 added for this download
# only: a private package list directory (the machine's own sources, plus
# arm64), so the machine's dpkg architectures and lists are left untouched.
# `apt-get download` checks every .deb against the signed Release files;
# versions and SHA-256s land in $KERNEX_CACHE/hw-tests-arm64/PINNED.
need_apt aarch64-linux-gnu-gcc gcc-aarch64-linux-gnu
# The arm64 glibc headers (a Recommends of the cross compiler, which
# --no-install-recommends leaves out).
need_apt /usr/aarch64-linux-gnu/include/stdio.h libc6-dev-arm64-cross

hw_arm="$KERNEX_CACHE/hw-tests-arm64"
if [[ ! -s $hw_arm/PINNED ]]; then
    hw_arm_apt=(-o "Dir::State::Lists=$hw_arm.lists"
                -o "APT::Architectures::=amd64" -o "APT::Architectures::=arm64"
                -o "APT::Sandbox::User=root")
    mkdir -p "$hw_arm.lists/partial"
    echo "setup: apt-get update (private lists, + arm64) for the arm64 hw-tests board" >&2
    apt-get update -qq "${hw_arm_apt[@]}"
    hw_arm_kernel=$(apt-cache "${hw_arm_apt[@]}" depends linux-image-arm64:arm64 |
        awk '/Depends: linux-image-[0-9].*-arm64/ {sub(/:arm64$/, "", $2); print $2; exit}')
    [[ -n $hw_arm_kernel ]] || { echo "setup: no linux-image-*-arm64 behind linux-image-arm64" >&2; exit 1; }
    hw_arm_rust=$(apt-cache "${hw_arm_apt[@]}" policy rustc-web | awk '/Candidate:/ {print $2}')
    [[ -n $hw_arm_rust && $hw_arm_rust != "(none)" ]] || { echo "setup: no rustc-web candidate" >&2; exit 1; }
    hw_arm_rust_abi=$(echo "$hw_arm_rust" | sed -E 's/^([0-9]+\.[0-9]+).*/\1/')
    hw_arm_llvm=$(apt-cache "${hw_arm_apt[@]}" show "libstd-rust-web-$hw_arm_rust_abi=$hw_arm_rust" |
        awk '/^Depends:/ && !found {if (match($0, /libllvm[0-9]+/)) {print substr($0, RSTART, RLENGTH); found = 1}}')
    [[ -n $hw_arm_llvm ]] || { echo "setup: which libllvm does rustc-web $hw_arm_rust use?" >&2; exit 1; }
    echo "setup: fetching $hw_arm_kernel, busybox-static, libssl (arm64) and rustc-web $hw_arm_rust for hw-tests" >&2
    rm -rf "$hw_arm.tmp"
    mkdir -p "$hw_arm.tmp/debs/root" "$hw_arm.tmp/debs/sysroot" "$hw_arm.tmp/debs/rust"
    (cd "$hw_arm.tmp/debs/root" &&
        apt-get download -qq "${hw_arm_apt[@]}" "$hw_arm_kernel:arm64" busybox-static:arm64)
    (cd "$hw_arm.tmp/debs/sysroot" &&
        apt-get download -qq "${hw_arm_apt[@]}" libssl-dev:arm64 libssl3:arm64)
    (cd "$hw_arm.tmp/debs/rust" &&
        apt-get download -qq "${hw_arm_apt[@]}" "rustc-web=$hw_arm_rust" \
            "libstd-rust-web-dev:amd64=$hw_arm_rust" "libstd-rust-web-dev:arm64=$hw_arm_rust" \
            "libstd-rust-web-$hw_arm_rust_abi:amd64=$hw_arm_rust" "$hw_arm_llvm:amd64")
    for part in root sysroot rust; do
        mkdir -p "$hw_arm.tmp/$part"
        for deb in "$hw_arm.tmp/debs/$part"/*.deb; do
            dpkg-deb -x "$deb" "$hw_arm.tmp/$part"
        done
    done
    hw_arm_kver=${hw_arm_kernel#linux-image-}
    [[ -f $hw_arm.tmp/root/boot/vmlinuz-$hw_arm_kver ]] || { echo "setup: $hw_arm_kernel has no /boot/vmlinuz-$hw_arm_kver" >&2; exit 1; }
    [[ -x $hw_arm.tmp/root/bin/busybox ]] || { echo "setup: busybox-static:arm64 has no /bin/busybox" >&2; exit 1; }
    [[ -d $hw_arm.tmp/rust/usr/lib/rustlib/aarch64-unknown-linux-gnu/lib ]] || { echo "setup: no aarch64 std in libstd-rust-web-dev:arm64" >&2; exit 1; }
    LD_LIBRARY_PATH="$hw_arm.tmp/rust/usr/lib/x86_64-linux-gnu" "$hw_arm.tmp/rust/usr/bin/rustc" --version >&2 \
        || { echo "setup: the unpacked rustc-web does not run" >&2; exit 1; }
    {
        echo "kernel-release $hw_arm_kver"
        echo "rustc $hw_arm_rust"
        for deb in "$hw_arm.tmp"/debs/*/*.deb; do
            echo "deb $(dpkg-deb -f "$deb" Package):$(dpkg-deb -f "$deb" Architecture) $(dpkg-deb -f "$deb" Version) sha256:$(sha256sum "$deb" | cut -d' ' -f1)"
        done
    } >"$hw_arm.tmp/PINNED.new"
    rm -rf "$hw_arm.tmp/debs"
    mv "$hw_arm.tmp/PINNED.new" "$hw_arm.tmp/PINNED"
    rm -rf "$hw_arm"
    mv "$hw_arm.tmp" "$hw_arm"
fi
