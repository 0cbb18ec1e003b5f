# U-Boot for Kernex on Raspberry Pi: the env is uboot.env on the FAT boot
# partition (what `kernex-image disk create` writes and the updater changes
# through fw_env.config), and setexpr for the boot script's counters.
FILESEXTRAPATHS:prepend:kernex := "${THISDIR}/files:"
SRC_URI:append:kernex = " file://kernex-env.cfg"
