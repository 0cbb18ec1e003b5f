# fw_printenv / fw_setenv on Kernex devices: where U-Boot's env is. The
# default is the Raspberry Pi arrangement (uboot.env on the FAT boot
# partition); a machine directory under files/ overrides it. Active with
# the `kernex` override (conf/distro/include/kernex.inc).
FILESEXTRAPATHS:prepend:kernex := "${THISDIR}/files:"
SRC_URI:append:kernex = " file://fw_env.config"

do_install:append:kernex() {
    install -d ${D}${sysconfdir}
    # UNPACKDIR from styhead on, WORKDIR before.
    install -m 0644 ${@d.getVar('UNPACKDIR') or d.getVar('WORKDIR')}/fw_env.config ${D}${sysconfdir}/fw_env.config
}
