# hw-tests/, the Raspberry Pi 4 and Jetson Orin Nano boards (hw-tests/src/boards/).
# What they need besides the arm64 board's kernel, BusyBox and cross-built
# updater (71-hw-tests-arm64.sh; the kernel package also carries the Pi
# device trees, /usr/lib/linux-image-*/broadcom/bcm2711-rpi-4-b.dtb and
# bcm2837-rpi-3-b.dtb):
#
# - u-boot-rpi:arm64: /usr/lib/u-boot/rpi_4/u-boot.bin (Pi 4) and
#   rpi_arm64/u-boot.bin (Pi 3 and 4), the U-Boot the Pi firmware loads as
#   its "kernel" (config.txt: kernel=u-boot.bin). Built with its env in
#   uboot.env on the FAT boot partition (CONFIG_ENV_IS_IN_FAT).
# - grub-efi-arm64-bin:arm64: GRUB's arm64-efi modules, from which the
#   Jetson board's EFI/BOOT/BOOTAA64.EFI is made with grub-mkimage
#   (grub-common, installed by 20-bootloader.sh).
# - qemu-efi-aarch64 (Architecture: all, installed): AAVMF, the UEFI
#   firmware the Jetson board boots in place of NVIDIA's.
#
# The two arm64 packages come the way 71-hw-tests-arm64.sh fetches its own:
# apt-get download with arm64 added in a private package list directory
# (the machine's dpkg architectures are left alone), checked against the
# signed Release files, unpacked (dpkg-deb -x) into
# $KERNEX_CACHE/hw-tests-rpi/root; versions and SHA-256s in
# $KERNEX_CACHE/hw-tests-rpi/PINNED.
need_apt /usr/share/AAVMF/AAVMF_CODE.fd qemu-efi-aarch64
need_apt grub-mkimage grub-common

hw_rpi="$KERNEX_CACHE/hw-tests-rpi"
if [[ ! -s $hw_rpi/PINNED ]]; then
    hw_rpi_apt=(-o "Dir::State::Lists=$hw_rpi.lists"
                -o "APT::Architectures::=amd64" -o "APT::Architectures::=arm64"
                -o "APT::Sandbox::User=root")
    mkdir -p "$hw_rpi.lists/partial"
    echo "setup: apt-get update (private lists, + arm64) for the Pi and Jetson hw-tests boards" >&2
    apt-get update -qq "${hw_rpi_apt[@]}"
    echo "setup: fetching u-boot-rpi and grub-efi-arm64-bin (arm64) for hw-tests" >&2
    rm -rf "$hw_rpi.tmp"
    mkdir -p "$hw_rpi.tmp/debs" "$hw_rpi.tmp/root"
    (cd "$hw_rpi.tmp/debs" &&
        apt-get download -qq "${hw_rpi_apt[@]}" u-boot-rpi:arm64 grub-efi-arm64-bin:arm64)
    for deb in "$hw_rpi.tmp"/debs/*.deb; do
        dpkg-deb -x "$deb" "$hw_rpi.tmp/root"
    done
    for f in usr/lib/u-boot/rpi_4/u-boot.bin usr/lib/u-boot/rpi_arm64/u-boot.bin \
             usr/lib/grub/arm64-efi/normal.mod; do
        [[ -f $hw_rpi.tmp/root/$f ]] || { echo "setup: the fetched packages have no /$f" >&2; exit 1; }
    done
    {
        for deb in "$hw_rpi.tmp"/debs/*.deb; do
            echo "deb $(dpkg-deb -f "$deb" Package):$(dpkg-deb -f "$deb" Architecture) $(dpkg-deb -f "$deb" Version) sha256:$(sha256sum "$deb" | cut -d' ' -f1)"
        done
    } >"$hw_rpi.tmp/PINNED.new"
    rm -rf "$hw_rpi.tmp/debs"
    mv "$hw_rpi.tmp/PINNED.new" "$hw_rpi.tmp/PINNED"
    rm -rf "$hw_rpi"
    mv "$hw_rpi.tmp" "$hw_rpi"
fi
