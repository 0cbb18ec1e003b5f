//! Where a release's userland finds its disks and its config
//! ([`GuestLayout`]): the QEMU boards' virtio layout, or a vendor board's
//! (`crate::vendor`), whose factory image `kernex-image disk create` made.

use crate::guest::{BOOT_DEV, BUNDLES_DEV, DATA_DEV};

/// Where a release's userland finds its disks and its config: the QEMU
/// `virt`/`pc` boards' layout ([`GuestLayout::virt`], the constants above)
/// or a vendor board's, whose factory image `kernex-image disk create`
/// made (`crate::vendor`).
#[derive(Debug, Clone)]
pub struct GuestLayout {
    /// The hardware class of the bundles and of the device's config.
    pub compatible: String,
    pub boot_dev: String,
    /// Where the boot partition is mounted (the env file's directory).
    pub boot_mount: String,
    pub data_dev: String,
    /// A second disk carrying the bundles, mounted at /bundles.
    pub bundles_dev: Option<String>,
    /// Or a directory (on the data partition) /bundles links to.
    pub bundles_dir: Option<String>,
    /// The kernel's path in the slot image.
    pub kernel_path: String,
    /// Kernel modules loaded by the init, in dependency order (paths
    /// under `lib/modules/<release>/`).
    pub modules: Vec<String>,
    /// `None`: the release carries its own `/etc/kernex/system.toml`
    /// (health checks included). `Some(path)`: `/etc/kernex/system.toml`
    /// links to this file, written by `kernex-image disk create` on the data
    /// partition; the health checks travel in the bundle's manifest, and
    /// `systemctl reboot` (the config's default reboot command) is a shim
    /// for BusyBox's `reboot -f`.
    pub config_link: Option<String>,
    /// A release whose kernel panics ([`crate::guest::Behaviour::KernelPanics`])
    /// gets an init that loads the modules, then exits: the kernel panics
    /// with its restart handler loaded. `false`: no init at all (the kernel
    /// panics before any module could load). A Pi needs `true`: Debian's
    /// kernel resets it only through `bcm2835_wdt`, a module, and a panic
    /// before it is loaded halts the board ("Reboot failed -- System
    /// halted") until its power is cycled.
    pub panic_after_modules: bool,
}

impl GuestLayout {
    /// The QEMU `virt` (arm64) and `pc` (x86_64) boards: virtio disks.
    pub fn virt(arch: crate::arch::Arch) -> Self {
        GuestLayout {
            compatible: arch.compatible().into(),
            boot_dev: BOOT_DEV.into(),
            boot_mount: "/boot".into(),
            data_dev: DATA_DEV.into(),
            bundles_dev: Some(BUNDLES_DEV.into()),
            bundles_dir: None,
            kernel_path: "boot/vmlinuz".into(),
            modules: arch.modules().iter().map(|m| m.to_string()).collect(),
            config_link: None,
            panic_after_modules: false,
        }
    }

    /// `/etc/kernex-hw.env`, which the init sources.
    pub(crate) fn env(&self) -> String {
        format!(
            "KX_BOOT_DEV={}\nKX_BOOT_MOUNT={}\nKX_DATA_DEV={}\nKX_BUNDLES_DEV={}\nKX_BUNDLES_DIR={}\nKX_CONFIG={}\n",
            self.boot_dev,
            self.boot_mount,
            self.data_dev,
            self.bundles_dev.as_deref().unwrap_or(""),
            self.bundles_dir.as_deref().unwrap_or(""),
            self.config_link.as_deref().unwrap_or(""),
        )
    }
}

/// The health checks of a release whose config is the factory image's
/// (`GuestLayout::config_link`): the same as the virt boards' `system.toml` has, carried
/// in the bundle's manifest.
pub fn manifest_health() -> kernex_protocol::manifest::HealthSpec {
    use kernex_protocol::manifest::{HealthCheck, HealthSpec, ServiceMode};
    HealthSpec {
        deadline: Some(120),
        stability_window: Some(5),
        max_revert_reboots: None,
        checks: Some(vec![HealthCheck::Service {
            name: "agent".into(),
            mode: ServiceMode::Supervise,
            command: vec!["/usr/bin/agent".into()],
            max_restarts: Some(3),
            window: Some(120),
            backoff_ms: Some(200),
        }]),
    }
}

/// `systemctl reboot` for a BusyBox userland (see [`GuestLayout::config_link`]).
pub(crate) const SYSTEMCTL_SHIM: &str = "#!/bin/sh\ncase \"$*\" in\n    reboot*) exec reboot -f ;;\nesac\necho \"systemctl (BusyBox shim): $* is not supported\" >&2\nexit 1\n";

/// The init of a [`crate::guest::Behaviour::KernelPanics`] release on a board
/// with [`GuestLayout::panic_after_modules`].
pub(crate) const PANIC_INIT: &str = "#!/bin/sh\nexport PATH=/bin\nfor m in $(cat /etc/modules.list); do insmod \"/lib/modules/$m\"; done\necho \"KERNEX-HW: this release's init exits: the kernel panics\"\nexit 1\n";
