# hw-tests/: the runner's real-board ("lab board") mode and the CI test that
# proves it against a QEMU board treated as lab hardware (hw-tests/README.md,
# "On a real Raspberry Pi 4"). What they need:
#
# - openssh-client: `ssh` runs the scenarios' commands on the board and
#   copies bundles to it (`ssh … 'cat >FILE'`); `ssh-keygen` makes the key
#   the QEMU lab board lets in.
# - dropbear-bin: the QEMU lab board's ssh server. Its `dropbear` binary and
#   the libraries `ldd` lists (libtomcrypt1, libtommath1, libgmp10, zlib,
#   libcrypt1: pulled in as its dependencies) are copied into the x86_64
#   guest's initramfs; `dropbearkey` makes the guest's host key at build
#   time. Installing the package does not start a server on the host
#   (that is the `dropbear` package, not `dropbear-bin`).
# - coreutils' `stty` sets a serial console to 115200 8N1 raw (always there).
need_apt ssh openssh-client
need_apt dropbearkey dropbear-bin
# - socat: the QEMU lab board of lab_qemu_board_s2 gets a serial device as
#   console (a pty bridged to QEMU's console socket), set up with `stty`
#   as a USB-serial adapter is.
need_apt socat socat
