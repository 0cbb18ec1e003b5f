# Kernex A/B boot script for U-Boot builds that keep their env where Linux
# cannot reach it (build: mkimage -A x86 -T script -C none -d boot-x86.cmd
# boot.scr; -A arm64 for an arm64 board).
#
# The same boot-state contract as boot.cmd (BOOT_ORDER, BOOT_A_LEFT,
# BOOT_B_LEFT, kernex.slot= on the kernel command line). Written for Debian's
# x86 U-Boot (u-boot-qemu: /usr/lib/u-boot/qemu-x86/u-boot.rom), and used
# as well for Debian's qemu_arm64 U-Boot, whose env lives in NOR flash that
# Debian's arm64 kernel has no driver for (no CONFIG_MTD_CFI). It differs
# from boot.cmd in three ways:
#
# - The env is not where Linux can write it (x86: CONFIG_ENV_IS_NOWHERE, so
#   saveenv cannot work at all; arm64 QEMU: CFI flash). The contract's
#   variables are kept in a file on the boot partition instead,
#   `uboot.env`, in the checksummed U-Boot env format (CRC32 + data, the
#   format of `env export -c` and of mkenvimage / fw_setenv). This script
#   imports it with `env import -c`, and writes it back with `env export -c`
#   + `fatwrite`; Linux reads and writes the same file through
#   fw_env.config ("/boot/uboot.env 0x0 0x4000"), exactly like a Raspberry
#   Pi's uboot.env on its FAT partition. Only BOOT_ORDER, BOOT_A_LEFT and
#   BOOT_B_LEFT are written back (other variables in the file are read, not
#   kept). A file whose CRC does not match is ignored (the defaults below
#   apply), as U-Boot does with a bad env.
# - No setexpr on x86 (CONFIG_CMD_SETEXPR is off): the counter is
#   decremented by a lookup over 1..9 (counts are single digits in the
#   contract anyway).
# - The kernel is booted with its initrd by zboot (x86: a bzImage) or booti
#   (arm64: an Image, with the device tree U-Boot runs on, which on QEMU's
#   virt machine is QEMU's own).
#
# It runs from distro_bootcmd (the default bootcmd), which finds boot.scr on
# the bootable partition and sets devtype, devnum and distro_bootpart.
#
# Board settings (defaults below, by U-Boot's ${arch}; the env file may
# override them):
#   kernex_part_A   partition of slot A on the boot device (default 2)
#   kernex_part_B   partition of slot B (default 3)
#   kernex_kernel   kernel path inside a slot (default /boot/vmlinuz)
#   kernex_initrd   initrd path inside a slot (default /boot/initrd.img)
#   kernex_bootargs kernel arguments (default "console=ttyS0,115200 panic=5
#                   loglevel=4"; arm: console=ttyAMA0,115200)
#   kernex_initrd_addr where the initrd is loaded (x86 default 0x10000000,
#                   256 MiB: U-Boot's ramdisk_addr_r, 64 MiB, lies inside the
#                   decompression buffer of a Debian 6.1 kernel, 0x1000000 +
#                   init_size 0x3f98000, which then overwrites the initrd
#                   while it unpacks itself; arm default ${ramdisk_addr_r})
#   kernex_boot     zboot (x86 default) or booti (arm default)
#   kernex_envfile  env file on the boot partition (default uboot.env)
#   kernex_envsize  its size (default 0x4000)

test -n "${kernex_envfile}" || setenv kernex_envfile uboot.env
test -n "${kernex_envsize}" || setenv kernex_envsize 0x4000
if load ${devtype} ${devnum}:${distro_bootpart} ${loadaddr} ${kernex_envfile}; then
  env import -c ${loadaddr} ${kernex_envsize} || echo "Kernex: ${kernex_envfile} is not a valid env; using the defaults"
fi
test -n "${kernex_part_A}" || setenv kernex_part_A 2
test -n "${kernex_part_B}" || setenv kernex_part_B 3
test -n "${kernex_kernel}" || setenv kernex_kernel /boot/vmlinuz
test -n "${kernex_initrd}" || setenv kernex_initrd /boot/initrd.img
if test "${arch}" = "arm"; then
  test -n "${kernex_initrd_addr}" || setenv kernex_initrd_addr ${ramdisk_addr_r}
  test -n "${kernex_bootargs}" || setenv kernex_bootargs "console=ttyAMA0,115200 panic=5 loglevel=4"
  test -n "${kernex_boot}" || setenv kernex_boot booti
else
  test -n "${kernex_initrd_addr}" || setenv kernex_initrd_addr 0x10000000
  test -n "${kernex_bootargs}" || setenv kernex_bootargs "console=ttyS0,115200 panic=5 loglevel=4"
  test -n "${kernex_boot}" || setenv kernex_boot zboot
fi

# >>> kernex-select
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
      setenv kernex_slot A
    fi
  elif test "${BOOT_SLOT}" = "B"; then
    if test ${BOOT_B_LEFT} -gt 0; then
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
  test "${kernex_slot}" = "B" || setenv kernex_slot A
fi

# Count this attempt: decrement the chosen slot's counter (1..9 -> 0..8).
if test "${kernex_slot}" = "B"; then
  setenv kernex_left ${BOOT_B_LEFT}
else
  setenv kernex_left ${BOOT_A_LEFT}
fi
setenv kernex_prev 0
setenv kernex_new 0
for kernex_n in 1 2 3 4 5 6 7 8 9; do
  if test "${kernex_left}" = "${kernex_n}"; then
    setenv kernex_new ${kernex_prev}
  fi
  setenv kernex_prev ${kernex_n}
done
if test "${kernex_slot}" = "B"; then
  setenv BOOT_B_LEFT ${kernex_new}
else
  setenv BOOT_A_LEFT ${kernex_new}
fi

echo "Kernex: booting slot ${kernex_slot} (A left ${BOOT_A_LEFT}, B left ${BOOT_B_LEFT})"
env export -c -s ${kernex_envsize} ${loadaddr} BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT
fatwrite ${devtype} ${devnum}:${distro_bootpart} ${loadaddr} ${kernex_envfile} ${kernex_envsize} || echo "Kernex: could not save ${kernex_envfile}"
# <<< kernex-select

if test "${kernex_slot}" = "A"; then
  setenv kernex_part ${kernex_part_A}
else
  setenv kernex_part ${kernex_part_B}
fi
setenv bootargs "${kernex_bootargs} kernex.slot=${kernex_slot}"

if load ${devtype} ${devnum}:${kernex_part} ${kernel_addr_r} ${kernex_kernel}; then
  setenv kernex_kernel_size ${filesize}
  if load ${devtype} ${devnum}:${kernex_part} ${kernex_initrd_addr} ${kernex_initrd}; then
    if test "${kernex_boot}" = "booti"; then
      booti ${kernel_addr_r} ${kernex_initrd_addr}:${filesize} ${fdtcontroladdr}
    else
      zboot ${kernel_addr_r} ${kernex_kernel_size} ${kernex_initrd_addr} ${filesize}
    fi
  fi
fi

# Loading or booting failed: this attempt is already counted, so resetting
# tries the slot again until its counter runs out, then the other slot.
echo "Kernex: unable to boot slot ${kernex_slot}; resetting"
reset
