# Kernex devices mount the data partition (updater state, provisioned
# config) and the boot partition (U-Boot env or grubenv) by label, as
# `kernex-image disk create` labels them. The boot partition is mounted
# with `sync`: a vfat directory cannot be fsynced, and the env file must
# reach the disk before a reboot. Active with the `kernex` override
# (conf/distro/include/kernex.inc).
do_install:append:kernex() {
    install -d ${D}${KERNEX_DATA_MOUNT} ${D}${KERNEX_BOOT_MOUNT}
    printf 'LABEL=%s\t%s\text4\tdefaults,noatime\t0\t2\n' "${KERNEX_DATA_LABEL}" "${KERNEX_DATA_MOUNT}" >> ${D}${sysconfdir}/fstab
    printf 'LABEL=%s\t%s\tvfat\tdefaults,sync\t0\t0\n' "${KERNEX_BOOT_LABEL}" "${KERNEX_BOOT_MOUNT}" >> ${D}${sysconfdir}/fstab
}

FILES:${PN}:append:kernex = " ${KERNEX_DATA_MOUNT} ${KERNEX_BOOT_MOUNT}"
