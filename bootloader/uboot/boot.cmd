# Kernex A/B boot script for U-Boot (build: mkimage -A arm64 -T script -C none -d boot.cmd boot.scr).
#
# The boot-state contract (the variables RAUC's U-Boot integration uses):
#   BOOT_ORDER   slots to try, in order ("A B")
#   BOOT_A_LEFT  boot attempts left for slot A (default 3)
#   BOOT_B_LEFT  boot attempts left for slot B (default 3)
# This script takes the first slot of BOOT_ORDER with attempts left,
# decrements its counter, saves the env and boots it with kernex.slot=<slot>.
# If no slot has attempts left it resets both counters to 3 and boots the
# first slot of BOOT_ORDER (the primary), so a device never ends up with
# nothing to boot. The updater (kernex-updater) writes BOOT_ORDER and the
# counters from Linux through fw_env.config; see bootloader/README.md.
#
# Board settings (set them in uboot-env.txt, the env defaults):
#   kernex_dev      interface and device, e.g. "mmc 0"
#   kernex_part_A   partition of slot A on kernex_dev, e.g. 2
#   kernex_part_B   partition of slot B, e.g. 3
#   kernex_root_A   root= for slot A, e.g. /dev/mmcblk0p2
#   kernex_root_B   root= for slot B, e.g. /dev/mmcblk0p3
#   kernex_kernel   kernel path inside a slot, e.g. /boot/Image
#   kernex_initrd   initrd path inside a slot (optional)
#   kernex_fdtfile  device tree path inside a slot (optional; otherwise the
#                   one U-Boot or the firmware provides, ${fdt_addr} or
#                   ${fdtcontroladdr})
#   kernex_bootargs extra kernel arguments, e.g. "console=ttyAMA0,115200 rootwait"

# >>> kernex-select (tested against real U-Boot: bootloader/tests/uboot_qemu.rs)
test -n "${BOOT_ORDER}" || setenv BOOT_ORDER "A B"
test -n "${BOOT_A_LEFT}" || setenv BOOT_A_LEFT 3
test -n "${BOOT_B_LEFT}" || setenv BOOT_B_LEFT 3

setenv kernex_slot
setenv kernex_fallback
for BOOT_SLOT in ${BOOT_ORDER}; do
  if test -n "${kernex_slot}"; then
    true
  elif test "${BOOT_SLOT}" = "A"; then
    if test ${BOOT_A_LEFT} -gt 0; then
      setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1
      setenv kernex_slot A
    fi
  elif test "${BOOT_SLOT}" = "B"; then
    if test ${BOOT_B_LEFT} -gt 0; then
      setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1
      setenv kernex_slot B
    fi
  fi
done

if test -z "${kernex_slot}"; then
  echo "Kernex: no slot has attempts left; resetting the counters and booting the primary slot"
  setenv kernex_fallback 1
  setenv BOOT_A_LEFT 3
  setenv BOOT_B_LEFT 3
  for BOOT_SLOT in ${BOOT_ORDER}; do
    if test -z "${kernex_slot}"; then
      setenv kernex_slot ${BOOT_SLOT}
    fi
  done
  if test "${kernex_slot}" = "B"; then
    setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1
  else
    setenv kernex_slot A
    setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1
  fi
fi

echo "Kernex: booting slot ${kernex_slot} (A left ${BOOT_A_LEFT}, B left ${BOOT_B_LEFT})"
saveenv
# <<< kernex-select

if test "${kernex_slot}" = "A"; then
  setenv kernex_part ${kernex_part_A}
  setenv kernex_root ${kernex_root_A}
else
  setenv kernex_part ${kernex_part_B}
  setenv kernex_root ${kernex_root_B}
fi
setenv bootargs "${kernex_bootargs} root=${kernex_root} kernex.slot=${kernex_slot}"

if load ${kernex_dev}:${kernex_part} ${kernel_addr_r} ${kernex_kernel}; then
  setenv kernex_rd -
  if test -n "${kernex_initrd}"; then
    if load ${kernex_dev}:${kernex_part} ${ramdisk_addr_r} ${kernex_initrd}; then
      setenv kernex_rd ${ramdisk_addr_r}:${filesize}
    fi
  fi
  if test -n "${kernex_fdtfile}"; then
    load ${kernex_dev}:${kernex_part} ${fdt_addr_r} ${kernex_fdtfile}
    setenv kernex_fdt ${fdt_addr_r}
  elif test -n "${fdt_addr}"; then
    setenv kernex_fdt ${fdt_addr}
  else
    setenv kernex_fdt ${fdtcontroladdr}
  fi
  booti ${kernel_addr_r} ${kernex_rd} ${kernex_fdt}
fi

# Loading or booting failed: this attempt is already counted, so resetting
# tries the slot again until its counter runs out, then the other slot.
echo "Kernex: unable to boot slot ${kernex_slot}; resetting"
reset
