# hw-tests/: whole-system tests (real U-Boot + a real Linux kernel + an A/B
# disk under QEMU). What they need:
#
# - qemu-system-x86 (qemu-system-x86_64) from bookworm-backports, so it
#   matches the qemu-utils 10.x the machine already has (Debian 12's own 7.2
#   conflicts with it). Same private apt configuration as 20-bootloader.sh
#   (its own sources file and package lists under $KERNEX_CACHE).
#   --no-install-recommends: no SeaBIOS/iPXE ROMs are needed, U-Boot is the
#   firmware (-bios) and the NIC, if any, gets `romfile=`.
# - u-boot-qemu (installed by 20-bootloader.sh): /usr/lib/u-boot/qemu-x86_64/u-boot.rom.
# - mtools + dosfstools: the FAT boot partition is built in a file (mkfs.vfat
#   --offset, mcopy -i img@@offset), fdisk's sfdisk writes the partition
#   table into the disk image file: no root, no loop devices.
# - binutils: strip (the guest gets a stripped kernex-updater).
# - swtpm, tpm2-tools, libtss2-dev (installed by 60-tpm.sh): the board's TPM
#   in scenario 6, the host-side tpm2_checkquote, and the tpm2-tss libraries
#   the guest's kernex-updater (built with `tpm`) links and dlopens.
# - A Debian amd64 kernel (linux-image-6.1.0-N-amd64, N = what the
#   linux-image-amd64 metapackage points at) and busybox-static (amd64),
#   fetched with `apt-get download` (apt checks each .deb against the signed
#   Release files) and unpacked into $KERNEX_CACHE/hw-tests/. The versions
#   and the SHA-256 of every .deb land in $KERNEX_CACHE/hw-tests/PINNED; the
#   tests read the kernel and modules from there (KERNEX_HW_ASSETS
#   overrides the directory).
need_apt mcopy mtools
need_apt mkfs.vfat dosfstools
need_apt sfdisk fdisk
need_apt strip binutils
need_apt xz xz-utils

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    hw_bpo_dir="$KERNEX_CACHE/apt-backports"
    mkdir -p "$hw_bpo_dir/lists/partial"
    if [[ ! -s $hw_bpo_dir/sources.list ]]; then
        echo "deb http://deb.debian.org/debian bookworm-backports main" >"$hw_bpo_dir/sources.list"
    fi
    hw_bpo_apt=(-o "Dir::Etc::SourceList=$hw_bpo_dir/sources.list"
                -o "Dir::State::Lists=$hw_bpo_dir/lists")
    echo "setup: apt-get update (private, bookworm-backports)" >&2
    apt-get update -qq "${hw_bpo_apt[@]}"
    echo "setup: installing qemu-system-x86 from bookworm-backports" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${hw_bpo_apt[@]}" -t bookworm-backports qemu-system-x86 >/dev/null
fi

hw_assets="$KERNEX_CACHE/hw-tests"
if [[ ! -s $hw_assets/PINNED ]]; then
    if [[ $apt_updated == 0 ]]; then
        echo "setup: apt-get update" >&2
        apt-get update -qq
        apt_updated=1
    fi
    hw_kernel_pkg=$(apt-cache depends linux-image-amd64 |
        awk '/Depends: linux-image-[0-9].*-amd64$/ {print $2; exit}')
    [[ -n $hw_kernel_pkg ]] || { echo "setup: no linux-image-*-amd64 behind linux-image-amd64" >&2; exit 1; }
    echo "setup: fetching $hw_kernel_pkg and busybox-static for hw-tests" >&2
    rm -rf "$hw_assets.tmp"
    mkdir -p "$hw_assets.tmp/debs" "$hw_assets.tmp/root"
    (cd "$hw_assets.tmp/debs" && apt-get download -qq -o APT::Sandbox::User=root "$hw_kernel_pkg:amd64" busybox-static:amd64)
    for deb in "$hw_assets.tmp"/debs/*.deb; do
        dpkg-deb -x "$deb" "$hw_assets.tmp/root"
    done
    hw_kver=${hw_kernel_pkg#linux-image-}
    [[ -f $hw_assets.tmp/root/boot/vmlinuz-$hw_kver ]] || { echo "setup: $hw_kernel_pkg has no /boot/vmlinuz-$hw_kver" >&2; exit 1; }
    [[ -x $hw_assets.tmp/root/bin/busybox ]] || { echo "setup: busybox-static has no /bin/busybox" >&2; exit 1; }
    {
        echo "kernel-release $hw_kver"
        for deb in "$hw_assets.tmp"/debs/*.deb; do
            echo "deb $(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version) sha256:$(sha256sum "$deb" | cut -d' ' -f1)"
        done
    } >"$hw_assets.tmp/PINNED.new"
    rm -rf "$hw_assets.tmp/debs"
    mv "$hw_assets.tmp/PINNED.new" "$hw_assets.tmp/PINNED"
    rm -rf "$hw_assets"
    mv "$hw_assets.tmp" "$hw_assets"
fi
