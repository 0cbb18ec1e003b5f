//! The `service` check's systemd mode against a real systemd: a user
//! manager (`systemd --user`) each test starts for itself, with its own
//! units, and stops again. The updater asks it with `systemctl --user`
//! (`systemctl-command` in `[health]`), exactly as it would ask a device's
//! manager.
//!
//! The manager runs in a cgroup of its own (created under the test's
//! cgroup, removed afterwards) and in private cgroup and mount namespaces:
//! there it sees only that cgroup (a systemd manager moves every process of
//! its cgroup into `init.scope`, which must never be the host's) and a
//! private `/run` saying "booted with systemd" (`/run/systemd/system`,
//! which a user manager requires). Nothing of the host's changes: no host
//! systemd is needed or touched. This needs root, `unshare` and a cgroup2
//! hierarchy; a missing piece fails the test with what to do, unless
//! `KERNEX_SKIP_SYSTEMD_TESTS=1` opts out.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kernex_bootloader::Slot;

use super::Device;

/// Set to `1` to skip these tests (machines that cannot run a systemd).
const OPT_OUT: &str = "KERNEX_SKIP_SYSTEMD_TESTS";

/// The launcher: joins the cgroup made for this manager (`$KX_CGROUP`),
/// then, in new cgroup and mount namespaces, mounts that cgroup as the
/// whole cgroup2 tree and a fresh `/run`, and becomes `systemd --user`.
const LAUNCHER: &str = r#"set -eu
echo $$ > "$KX_CGROUP/cgroup.procs"
exec unshare --cgroup --mount --propagation private -- sh -euc '
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/systemd/system
exec "$0" --user' "$1"
"#;

/// A running `systemd --user` of the test's own; stopped (SIGTERM, then
/// its cgroup killed) and its cgroup removed when dropped.
pub struct UserManager {
    dir: tempfile::TempDir,
    child: Option<Child>,
    cgroup: PathBuf,
}

impl UserManager {
    /// Starts a manager with `units` (file name, contents) installed as
    /// its user units; `None` only when the tests are opted out.
    pub fn start(units: &[(&str, &str)]) -> Option<UserManager> {
        if std::env::var(OPT_OUT).as_deref() == Ok("1") {
            eprintln!("{OPT_OUT}=1: skipping the test against a real systemd");
            return None;
        }
        let hint = format!(
            "run scripts/setup (setup.d/30-updater.sh installs systemd), or set {OPT_OUT}=1 to skip the tests against a real systemd"
        );
        let systemd = ["/usr/lib/systemd/systemd", "/lib/systemd/systemd"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("systemd is not installed: {hint}"));
        for tool in ["systemctl", "unshare", "mount"] {
            let found = Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok();
            assert!(found, "{tool} is missing: {hint}");
        }
        assert!(
            effective_uid() == Some(0),
            "starting a systemd user manager in its own cgroup and namespaces needs root: run the tests as root, or set {OPT_OUT}=1"
        );

        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let cgroup = own_cgroup().join(format!(
            "kernex-health-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir(&cgroup).unwrap_or_else(|e| {
            panic!(
                "cannot create the cgroup {} for the test's systemd: {e} (a writable cgroup2 hierarchy is needed, or set {OPT_OUT}=1)",
                cgroup.display()
            )
        });
        let dir = tempfile::tempdir().unwrap();
        let mut manager = UserManager {
            dir,
            child: None,
            cgroup,
        };
        let runtime = manager.runtime_dir();
        std::fs::create_dir(&runtime).unwrap();
        std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
        let unit_dir = manager.dir.path().join("config/systemd/user");
        std::fs::create_dir_all(&unit_dir).unwrap();
        std::fs::create_dir(manager.dir.path().join("home")).unwrap();
        for (name, text) in units {
            std::fs::write(unit_dir.join(name), text).unwrap();
        }
        let log = std::fs::File::create(manager.log_path()).unwrap();
        let child = Command::new("sh")
            .args(["-c", LAUNCHER, "kernex-systemd-launcher"])
            .arg(&systemd)
            .env("KX_CGROUP", &manager.cgroup)
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("XDG_CONFIG_HOME", manager.dir.path().join("config"))
            .env("HOME", manager.dir.path().join("home"))
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        manager.child = Some(child);
        manager.wait_running();
        Some(manager)
    }

    /// The manager's `$XDG_RUNTIME_DIR` (its private socket is in there).
    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("runtime")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("manager.log")
    }

    /// `systemctl --user ARGS` against this manager.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        Command::new("systemctl")
            .arg("--user")
            .args(args)
            .env("XDG_RUNTIME_DIR", self.runtime_dir())
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `systemctl --user start UNIT`, which must succeed.
    pub fn start_unit(&self, unit: &str) {
        let out = self.systemctl(&["start", unit]);
        assert!(
            out.status.success(),
            "systemctl --user start {unit}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// One property of `unit`, as `systemctl show` prints it.
    pub fn property(&self, unit: &str, name: &str) -> String {
        let out = self.systemctl(&["show", "--value", &format!("--property={name}"), unit]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn wait_running(&mut self) {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.systemctl(&["show", "--value", "--property=SystemState"]);
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if out.status.success() && (state == "running" || state == "degraded") {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > until {
                panic!(
                    "the test's systemd --user did not come up (exit: {exited:?}, state {state:?}, systemctl: {}); its log:\n{}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for UserManager {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM: the manager stops its units and exits.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let until = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            if child.try_wait().ok().flatten().is_none() {
                let _ = std::fs::write(self.cgroup.join("cgroup.kill"), "1");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // The unit cgroups empty asynchronously after their processes die.
        let until = Instant::now() + Duration::from_secs(5);
        while remove_cgroup_tree(&self.cgroup).is_err() && Instant::now() < until {
            let _ = std::fs::write(self.cgroup.join("cgroup.kill"), "1");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Removes a cgroup and the cgroups below it (children first).
fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    std::fs::remove_dir(dir)
}

/// The effective user id, from /proc/self/status.
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// This process's cgroup in the cgroup2 hierarchy, as a directory.
fn own_cgroup() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    // `ID PARENT MAJ:MIN ROOT MOUNT-POINT OPTIONS... - FSTYPE SOURCE ...`
    let (root, mount_point) = mountinfo
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let f: Vec<&str> = left.split_whitespace().collect();
            Some((f.get(3)?.to_string(), PathBuf::from(f.get(4)?)))
        })
        .unwrap_or_else(|| {
            panic!(
                "no cgroup2 hierarchy is mounted: the test's systemd needs one (or set {OPT_OUT}=1)"
            )
        });
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let own = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("/proc/self/cgroup has no cgroup2 entry: {cgroups}"));
    let relative = own
        .strip_prefix(root.as_str())
        .unwrap_or(own)
        .trim_start_matches('/');
    mount_point.join(relative)
}

/// A unit that crash-loops: its process exits 1 after a second, and
/// systemd restarts it at once, without a start limit.
const CRASH_LOOP_UNIT: &str = "[Unit]
Description=Kernex test agent that crash-loops
StartLimitIntervalSec=0

[Service]
ExecStart=/bin/sh -c 'sleep 1; exit 1'
Restart=always
RestartSec=100ms
";

/// A unit that stays up.
const HEALTHY_UNIT: &str = "[Unit]
Description=Kernex test agent that stays up

[Service]
ExecStart=/bin/sleep 600
Restart=always
RestartSec=100ms
";

/// The `[health]` body checking `unit` through the user manager.
fn systemd_health(deadline: u64, window: u64, unit: &str) -> String {
    format!(
        "deadline = {deadline}\nstability-window = {window}\n\
         systemctl-command = [\"systemctl\", \"--user\"]\n\
         [[health.checks]]\ntype = \"service\"\nname = \"{unit}\"\nmode = \"systemd\"\n\
         max-restarts = 3\nwindow = 300\n"
    )
}

/// `health run --json` with the manager's runtime dir in the environment.
fn health_run(dev: &Device, manager: &UserManager) -> serde_json::Value {
    let out = dev
        .cmd(&["health", "run", "--json"])
        .env("XDG_RUNTIME_DIR", manager.runtime_dir())
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "health run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn crash_looping_systemd_unit_is_reverted_and_the_reason_names_the_restarts() {
    let Some(manager) = UserManager::start(&[("kx-crash.service", CRASH_LOOP_UNIT)]) else {
        return;
    };
    manager.start_unit("kx-crash.service");
    // A stability window longer than three restarts take: a commit
    // between two crashes is impossible, the restart count decides.
    let dev = Device::on_trial(&systemd_health(30, 10, "kx-crash.service"));
    let started = Instant::now();
    let out = health_run(&dev, &manager);
    let elapsed = started.elapsed();
    assert_eq!(out["outcome"], "reverted", "{out}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    let reason = out["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("service kx-crash.service restarted 3 times in "),
        "{reason}"
    );
    // systemd agrees: the unit restarted at least that often.
    let restarts: u64 = manager
        .property("kx-crash.service", "NRestarts")
        .parse()
        .unwrap();
    assert!(restarts >= 3, "NRestarts {restarts}");
    dev.assert_reverted_from_b(&out, reason);
}

#[test]
fn healthy_systemd_unit_is_committed_after_the_window() {
    let Some(manager) = UserManager::start(&[("kx-agent.service", HEALTHY_UNIT)]) else {
        return;
    };
    manager.start_unit("kx-agent.service");
    let dev = Device::on_trial(&systemd_health(20, 2, "kx-agent.service"));
    let started = Instant::now();
    let out = health_run(&dev, &manager);
    let elapsed = started.elapsed();
    assert_eq!(out["outcome"], "committed", "{out}");
    assert!(
        elapsed >= Duration::from_secs(2),
        "committed before the window: {elapsed:?}"
    );
    assert_eq!(dev.left(Slot::B), 3);
    assert_eq!(dev.primary(), Some(Slot::B));
    assert_eq!(dev.reboots(), 0);
    assert_eq!(dev.status()["health"]["outcome"], "committed");
    assert_eq!(
        manager.property("kx-agent.service", "ActiveState"),
        "active"
    );
    assert_eq!(manager.property("kx-agent.service", "NRestarts"), "0");
}

#[test]
fn a_stopped_systemd_unit_is_reverted_at_the_deadline() {
    let Some(manager) = UserManager::start(&[("kx-agent.service", HEALTHY_UNIT)]) else {
        return;
    };
    // Installed, never started: inactive.
    let dev = Device::on_trial(&systemd_health(3, 1, "kx-agent.service"));
    let out = health_run(&dev, &manager);
    assert_eq!(out["outcome"], "reverted", "{out}");
    assert_eq!(
        out["reason"],
        "deadline 3 s passed: service kx-agent.service is \"inactive\", not active"
    );
    assert_eq!(dev.primary(), Some(Slot::A));
}
