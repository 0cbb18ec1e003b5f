# Factory disk images and provisioning (`kernex-image disk create`,
# `kernex-image provision`, image-builder/tests/disk.rs and provision.rs):
# the real peers the disk image is checked against.
# - fdisk: sfdisk (writes nothing here: dumps and checks the MBR/GPT we write).
# - gdisk: sgdisk -v (GPT: both headers, CRCs, overlaps).
# - dosfstools: mkfs.vfat --offset builds the boot partition inside the
#   image file, fsck.vfat -n checks it.
# - mtools: mcopy/mdir -i disk.img@@OFFSET copy into and read the FAT.
# - e2fsprogs (10-bundle.sh): mkfs.ext4 -d / -E offset=, e2fsck -fn, debugfs.
# - libubootenv-tool: fw_printenv (20-bootloader.sh too) reads the env file.
# - grub-common: grub-editenv lists the grubenv (20-bootloader.sh too).
# - swtpm/swtpm-tools and libtss2-dev (60-tpm.sh): provision --tpm.
need_apt sfdisk fdisk
need_apt sgdisk gdisk
need_apt mkfs.vfat dosfstools
need_apt mcopy mtools
need_apt fw_printenv libubootenv-tool
need_apt grub-editenv grub-common
# - u-boot-tools: mkimage, the reference the boot.scr we write is compared with.
need_apt mkimage u-boot-tools
# meta-kernex (yocto/): oelint-adv lints the layer (yocto/tests/lint.sh).
# From PyPI, pinned, in a venv under the cache (Debian's Python is
# externally managed). bitbake itself is not packaged for Debian 12.
oelint_version=9.11.2
oelint_dir=$KERNEX_CACHE/oelint
if [[ ! -x $oelint_dir/bin/oelint-adv ]] || ! "$oelint_dir/bin/pip" show oelint-adv 2>/dev/null | grep -qx "Version: $oelint_version"; then
    need_apt python3 python3
    need_apt /usr/share/doc/python3-venv python3-venv
    echo "setup: oelint-adv $oelint_version into $oelint_dir" >&2
    python3 -m venv "$oelint_dir"
    "$oelint_dir/bin/pip" install --quiet --disable-pip-version-check "oelint-adv==$oelint_version"
fi
