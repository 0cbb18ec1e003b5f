//! The two boards the scenarios run on, and everything that differs
//! between them. The boot script logic, the env file, the disk layout, the
//! updater and the watchdog are the same code on both.

/// A test board.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Arch {
    /// QEMU's `virt` machine (Cortex-A57) with Debian's `qemu_arm64` U-Boot
    /// and Debian's arm64 kernel: the board of issue #10, a stand-in for a
    /// Raspberry Pi 4 or a Jetson.
    #[default]
    Arm64,
    /// QEMU's `pc` machine with Debian's 32-bit x86 U-Boot and Debian's
    /// amd64 kernel. It has what the arm64 board lacks here: a TPM the
    /// guest kernel can drive (Debian's arm64 kernel has no `tpm_tis`).
    X86_64,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Arm64 => "arm64",
            Arch::X86_64 => "x86_64",
        }
    }

    /// The hardware class written into the bundles and the device's config.
    pub fn compatible(self) -> &'static str {
        match self {
            Arch::Arm64 => "qemu-arm64",
            Arch::X86_64 => "qemu-x86_64",
        }
    }

    /// The QEMU system emulator.
    pub fn qemu(self) -> &'static str {
        match self {
            Arch::Arm64 => "qemu-system-aarch64",
            Arch::X86_64 => "qemu-system-x86_64",
        }
    }

    /// The firmware (Debian's u-boot-qemu). On x86 the 32-bit build: the
    /// 64-bit one (qemu-x86_64) resets the board in zboot before the
    /// kernel prints anything; the 32-bit one boots the same x86_64 bzImage.
    pub fn firmware(self) -> &'static str {
        match self {
            Arch::Arm64 => "/usr/lib/u-boot/qemu_arm64/u-boot.bin",
            Arch::X86_64 => "/usr/lib/u-boot/qemu-x86/u-boot.rom",
        }
    }

    /// The machine, CPU and memory arguments of QEMU.
    pub fn machine_args(self) -> &'static [&'static str] {
        match self {
            Arch::Arm64 => &["-M", "virt", "-cpu", "cortex-a57", "-m", "1024"],
            Arch::X86_64 => &["-M", "pc", "-m", "512"],
        }
    }

    /// `mkimage -A` for the boot script.
    pub fn mkimage_arch(self) -> &'static str {
        match self {
            Arch::Arm64 => "arm64",
            Arch::X86_64 => "x86",
        }
    }

    /// The Debian multiarch directory of the guest's libraries.
    pub fn multiarch(self) -> &'static str {
        match self {
            Arch::Arm64 => "aarch64-linux-gnu",
            Arch::X86_64 => "x86_64-linux-gnu",
        }
    }

    /// The Rust target the guest's updater is built for, when it is not
    /// the host's.
    pub fn rust_target(self) -> Option<&'static str> {
        match self {
            Arch::Arm64 => Some("aarch64-unknown-linux-gnu"),
            Arch::X86_64 => None,
        }
    }

    /// The `strip` that reads this architecture's binaries.
    pub fn strip(self) -> &'static str {
        match self {
            Arch::Arm64 => "aarch64-linux-gnu-strip",
            Arch::X86_64 => "strip",
        }
    }

    /// Whether the guest kernel can drive a TPM on this board.
    pub fn has_tpm(self) -> bool {
        self == Arch::X86_64
    }

    /// Kernel modules the guest loads, in dependency order (Debian builds
    /// virtio-pci, virtio-blk, virtio-net, ext4 and vfat as modules; on
    /// arm64 the virtio core is built in).
    pub fn modules(self) -> &'static [&'static str] {
        match self {
            Arch::Arm64 => &MODULES[2..],
            Arch::X86_64 => MODULES,
        }
    }
}

/// See [`Arch::modules`]; the first two are built into the arm64 kernel.
const MODULES: &[&str] = &[
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/drivers/block/virtio_blk.ko",
    "kernel/lib/crc16.ko",
    "kernel/fs/mbcache.ko",
    "kernel/fs/jbd2/jbd2.ko",
    "kernel/crypto/crc32c_generic.ko",
    "kernel/fs/ext4/ext4.ko",
    "kernel/fs/fat/fat.ko",
    "kernel/fs/fat/vfat.ko",
    "kernel/fs/nls/nls_cp437.ko",
    "kernel/fs/nls/nls_utf8.ko",
    "kernel/fs/nls/nls_ascii.ko",
    // The NIC on QEMU's user network (the daemon scenario).
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
];
