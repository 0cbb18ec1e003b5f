# kernex-bundle.bbclass: turn an image into a signed Kernex bundle (.kxb)
# and a factory disk image (.kxdisk.img), with kernex-image-native.
#
# In an image recipe (or local.conf: IMAGE_CLASSES += "kernex-bundle"):
#
#   inherit kernex-bundle
#   IMAGE_FSTYPES += "kxb kxdisk"
#   KERNEX_SIGNING_KEY = "/secure/path/signing.key"    # PEM, never in the layer
#   KERNEX_SIGNING_CERT = "/secure/path/signing.crt"
#   KERNEX_KEYRING = "/secure/path/ca.crt"             # also installed as the device keyring
#
# The bundle is built from the image's ext4 root filesystem: `kernex-image
# bundle create --compatible ${KERNEX_COMPATIBLE} --version ${KERNEX_VERSION}`.
# The disk image is `kernex-image disk create --board ${KERNEX_BOARD}` from
# that bundle, verified against KERNEX_KEYRING, with the boot files listed in
# KERNEX_BOOT_FILES ("SOURCE:DEST" pairs, SOURCE relative to
# DEPLOY_DIR_IMAGE, DEST the path on the boot partition).

# The hardware class bundles are for, and the disk profile (a built-in name
# of `kernex-image disk boards` or a profile file).
KERNEX_COMPATIBLE ??= "${MACHINE}"
KERNEX_BOARD ??= "${KERNEX_COMPATIBLE}"
KERNEX_VERSION ??= "${DISTRO_VERSION}"
KERNEX_SIGNING_KEY ??= ""
KERNEX_SIGNING_CERT ??= ""
KERNEX_KEYRING ??= ""
# Extra arguments, e.g. "--meta model=qwen-1.5b --health ${THISDIR}/health.toml".
KERNEX_BUNDLE_ARGS ??= ""
# Extra arguments of disk create, e.g. "--fill-b --size 16GiB".
KERNEX_DISK_ARGS ??= ""

# Raspberry Pi 4 (meta-raspberrypi): firmware, device tree and U-Boot.
KERNEX_BOOT_FILES ??= ""
KERNEX_BOOT_FILES:raspberrypi4-64 ??= "bootfiles/start4.elf:start4.elf \
                                        bootfiles/fixup4.dat:fixup4.dat \
                                        bcm2711-rpi-4-b.dtb:bcm2711-rpi-4-b.dtb \
                                        u-boot.bin:u-boot.bin"

IMAGE_TYPES += "kxb kxdisk"
# nooelint: oelint.vars.specific - kxb is an image type, not a machine
IMAGE_TYPEDEP:kxb = "ext4"
# nooelint: oelint.vars.specific - kxdisk is an image type, not a machine
IMAGE_TYPEDEP:kxdisk = "kxb"
do_image_kxb[depends] += "kernex-image-native:do_populate_sysroot"
do_image_kxdisk[depends] += " \
    kernex-image-native:do_populate_sysroot \
    dosfstools-native:do_populate_sysroot \
    mtools-native:do_populate_sysroot \
    e2fsprogs-native:do_populate_sysroot \
"
do_image_kxdisk[depends] += "${@' '.join(sorted(set(d.getVar('KERNEX_BOOT_DEPENDS').split())))}"
KERNEX_BOOT_DEPENDS ??= ""
KERNEX_BOOT_DEPENDS:raspberrypi4-64 ??= "rpi-bootfiles:do_deploy virtual/bootloader:do_deploy virtual/kernel:do_deploy"

python kernex_check_keys() {
    for var in ("KERNEX_SIGNING_KEY", "KERNEX_SIGNING_CERT", "KERNEX_KEYRING"):
        path = d.getVar(var)
        if not path:
            bb.fatal("kernex-bundle: set %s (see meta-kernex/README.md)" % var)
        if not os.path.isfile(path):
            bb.fatal("kernex-bundle: %s = %s: no such file" % (var, path))
}
do_image_kxb[prefuncs] += "kernex_check_keys"
do_image_kxdisk[prefuncs] += "kernex_check_keys"

IMAGE_CMD:kxb() {
    kernex-image bundle create \
        --compatible "${KERNEX_COMPATIBLE}" \
        --version "${KERNEX_VERSION}" \
        --rootfs "${IMGDEPLOYDIR}/${IMAGE_NAME}.ext4" \
        --key "${KERNEX_SIGNING_KEY}" \
        --cert "${KERNEX_SIGNING_CERT}" \
        --meta "image=${IMAGE_BASENAME}" \
        --meta "machine=${MACHINE}" \
        ${KERNEX_BUNDLE_ARGS} \
        --out "${IMGDEPLOYDIR}/${IMAGE_NAME}.kxb"
    kernex-image bundle verify --keyring "${KERNEX_KEYRING}" \
        "${IMGDEPLOYDIR}/${IMAGE_NAME}.kxb"
}

IMAGE_CMD:kxdisk() {
    bootdir="${WORKDIR}/kernex-boot-files"
    rm -rf "$bootdir"
    mkdir -p "$bootdir"
    for pair in ${KERNEX_BOOT_FILES}; do
        src="${pair%%:*}"
        dst="${pair#*:}"
        mkdir -p "$bootdir/$(dirname "$dst")"
        cp -L "${DEPLOY_DIR_IMAGE}/$src" "$bootdir/$dst"
    done
    kernex-image disk create \
        --board "${KERNEX_BOARD}" \
        --bundle "${IMGDEPLOYDIR}/${IMAGE_NAME}.kxb" \
        --keyring "${KERNEX_KEYRING}" \
        --boot-files "$bootdir" \
        ${KERNEX_DISK_ARGS} \
        --output "${IMGDEPLOYDIR}/${IMAGE_NAME}.kxdisk.img"
}
