# The boot-state contract (bootloader/): the real peers its tests run against.
#
# - u-boot-tools: mkenvimage (env images with and without -r), mkimage (boot.scr).
# - libubootenv-tool: fw_printenv / fw_setenv. On Debian 12 this is the only
#   fw_printenv: u-boot-tools 2023.01 no longer ships the classic one, and the
#   two packages do not conflict (libubootenv-tool only conflicts with
#   u-boot-tools << 2019.10).
# - u-boot-qemu: /usr/lib/u-boot/qemu_arm64/u-boot.bin, the real U-Boot the
#   boot-script test boots.
# - qemu-system-arm (qemu-system-aarch64) from bookworm-backports, so it matches
#   the qemu-utils 10.x the machine already has. The backports suite is added
#   in a private apt configuration under $KERNEX_CACHE (its own sources file
#   and its own package lists), so the machine's apt setup is left untouched.
# - grub-common: grub-editenv (grubenv round trips) and grub-script-check
#   (the GRUB snippet); make: bootloader/uboot/Makefile.
# - cargo-fuzz: the fuzz target under bootloader/u-boot-env/fuzz (run on the
#   stable toolchain with RUSTC_BOOTSTRAP=1, see its run-ci.sh).
need_apt mkenvimage u-boot-tools
need_apt mkimage u-boot-tools
need_apt fw_printenv libubootenv-tool
need_apt /usr/lib/u-boot/qemu_arm64/u-boot.bin u-boot-qemu
need_apt grub-editenv grub-common
need_apt make make
# libFuzzer (built by cargo fuzz) needs a C++ compiler.
need_apt g++ g++

if ! command -v qemu-system-aarch64 >/dev/null 2>&1; then
    bpo_dir="$KERNEX_CACHE/apt-backports"
    mkdir -p "$bpo_dir/lists/partial"
    # Use the mirror the machine already uses for Debian (deb822 or one-line
    # sources), falling back to deb.debian.org.
    bpo_mirror=$(
        { grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
          grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
              awk '{for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}'
        } | grep -E '/debian/?$' | head -n1
    ) || true
    bpo_mirror=${bpo_mirror:-http://deb.debian.org/debian}
    echo "deb ${bpo_mirror%/} bookworm-backports main" >"$bpo_dir/sources.list"
    bpo_apt=(-o "Dir::Etc::SourceList=$bpo_dir/sources.list"
             -o "Dir::State::Lists=$bpo_dir/lists")
    echo "setup: apt-get update (private, + bookworm-backports from ${bpo_mirror%/})" >&2
    apt-get update -qq "${bpo_apt[@]}"
    echo "setup: installing qemu-system-arm from bookworm-backports" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${bpo_apt[@]}" -t bookworm-backports qemu-system-arm >/dev/null
fi

need_cargo cargo-fuzz cargo-fuzz 0.13.2
