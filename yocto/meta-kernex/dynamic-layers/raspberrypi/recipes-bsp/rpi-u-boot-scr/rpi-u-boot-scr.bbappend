# boot.scr for Kernex: the A/B script of bootloader/uboot/boot.cmd (the
# boot-state contract) instead of meta-raspberrypi's single-root one.
# files/boot.cmd.in links to it, so the layer and the contract never drift.
FILESEXTRAPATHS:prepend:kernex := "${THISDIR}/files:"
