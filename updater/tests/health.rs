//! The health watchdog on a simulated device: file-backed slots, the `file`
//! boot backend, the real `kernex-updater health run` binary, real child
//! processes, a real local HTTP server, a real sd_notify socket and a plain
//! file standing in for /dev/watchdog. Slot B is booted on trial (2 of 3
//! attempts left); slot A is committed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kernex_bootloader::{BootFlow, Slot};
use serde_json::Value;

/// The `service` check's systemd mode against a real `systemd --user`
/// (in a directory of its own: a file in tests/ would be a test target).
#[path = "health/systemd.rs"]
mod systemd;

struct Device {
    dir: tempfile::TempDir,
}

impl Device {
    /// What a revert of slot B leaves: one reboot, B with no attempts, A
    /// primary, and the verdict with `reason` in `status`.
    fn assert_reverted_from_b(&self, out: &Value, reason: &str) {
        assert_eq!(out["rebooted"], true, "{out}");
        assert_eq!(self.reboots(), 1);
        assert_eq!(self.left(Slot::B), 0);
        assert_eq!(self.primary(), Some(Slot::A));
        let status = self.status();
        assert_eq!(status["health"]["outcome"], "reverted", "{status}");
        assert_eq!(status["health"]["reason"], reason);
    }

    /// Slot B booted on trial; `health` is the `[health]` TOML table body.
    fn on_trial(health: &str) -> Device {
        let d = Device {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::write(d.path("slot-a.img"), b"A").unwrap();
        std::fs::write(d.path("slot-b.img"), b"B").unwrap();
        d.write_config(health);
        // Install set B to boot next with 3 attempts; the boot script took one.
        d.flow().set_try_next(Slot::B, 2).unwrap();
        d
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self) -> PathBuf {
        self.path("system.toml")
    }

    fn write_config(&self, health: &str) {
        let p = |n: &str| self.path(n).display().to_string();
        let text = format!(
            "compatible = \"qemu-aarch64\"\ndata-dir = \"{}\"\nkeyring = \"{}\"\n\
             reboot-command = [\"sh\", \"-c\", \"echo reboot >> '{}'\"]\n\
             [slots.rootfs]\nA = \"{}\"\nB = \"{}\"\n\
             [bootloader]\nbackend = \"file\"\npath = \"{}\"\nbooted-slot = \"B\"\n\
             [health]\n{health}\n",
            p("data"),
            p("keyring.pem"),
            p("reboots"),
            p("slot-a.img"),
            p("slot-b.img"),
            p("boot-state")
        );
        std::fs::write(self.config(), text).unwrap();
    }

    fn flow(&self) -> Box<dyn BootFlow> {
        kernex_updater::SystemConfig::load(&self.config())
            .unwrap()
            .bootloader
            .open()
            .unwrap()
    }

    fn left(&self, slot: Slot) -> u32 {
        self.flow().state().unwrap().attempts_left(slot)
    }

    fn primary(&self) -> Option<Slot> {
        self.flow().state().unwrap().primary()
    }

    fn reboots(&self) -> usize {
        std::fs::read_to_string(self.path("reboots"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kernex-updater"));
        c.arg("--config").arg(self.config()).args(args);
        c.env("RUST_LOG", "warn").env_remove("NOTIFY_SOCKET");
        c
    }

    fn health_run(&self) -> (Value, Output) {
        let out = self.cmd(&["health", "run", "--json"]).output().unwrap();
        assert!(
            out.status.success(),
            "health run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (serde_json::from_slice(&out.stdout).unwrap(), out)
    }

    fn status(&self) -> Value {
        let out = self.cmd(&["status", "--json"]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// A local HTTP server answering every GET with 200 and `body`.
fn http_server(body: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 4096];
            let mut req = Vec::new();
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}/health")
}

#[test]
fn crash_looping_agent_is_reverted_and_the_reason_reaches_status() {
    let dev = Device::on_trial(
        "deadline = 30\nstability-window = 3\n\
         [[health.checks]]\ntype = \"service\"\nname = \"agent\"\nmode = \"supervise\"\n\
         command = [\"sh\", \"-c\", \"sleep 1; exit 1\"]\nmax-restarts = 3\nwindow = 300\nbackoff-ms = 100\n",
    );
    let started = Instant::now();
    let (out, _) = dev.health_run();
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(out["outcome"], "reverted", "{out}");
    let reason = out["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("service agent restarted 3 times in ")
            && reason.contains("exit status 1"),
        "{reason}"
    );
    dev.assert_reverted_from_b(&out, reason);
    assert_eq!(dev.status()["health"]["slot"], "B");

    // The old slot boots with an attempt counted; its own watchdog run
    // commits it. The revert and its reason stay visible.
    let config = std::fs::read_to_string(dev.config())
        .unwrap()
        .replace("booted-slot = \"B\"", "booted-slot = \"A\"");
    let config = config[..config.find("[health]").unwrap()].to_string()
        + "[health]\ndeadline = 10\nstability-window = 0\n[[health.checks]]\ntype = \"command\"\ncommand = [\"true\"]\n";
    std::fs::write(dev.config(), config).unwrap();
    dev.flow().set_try_next(Slot::A, 2).unwrap();
    let (out, _) = dev.health_run();
    assert_eq!(out["outcome"], "committed", "{out}");
    let status = dev.status();
    assert_eq!(status["health"]["outcome"], "committed", "{status}");
    assert_eq!(status["health"]["slot"], "A");
    assert_eq!(status["last-revert"]["outcome"], "reverted", "{status}");
    assert_eq!(status["last-revert"]["reason"], reason);
    assert_eq!(status["last-revert"]["slot"], "B");
    let human = dev.cmd(&["status"]).output().unwrap();
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("last revert   slot B"), "{human}");
}

#[test]
fn healthy_agent_and_http_probe_commit_after_the_window_feeding_watchdogs() {
    let url = http_server("status: ok");
    let dev = Device::on_trial(&format!(
        "deadline = 20\nstability-window = 2\nwatchdog-device = \"{}\"\nfeed-interval-ms = 100\n\
         [[health.checks]]\ntype = \"service\"\nname = \"agent\"\nmode = \"supervise\"\n\
         command = [\"sleep\", \"30\"]\n\
         [[health.checks]]\ntype = \"http\"\nurl = \"{url}\"\nbody-contains = \"ok\"\ntimeout = 2\n\
         [[health.checks]]\ntype = \"disk\"\npath = \"/\"\nmin-free = 1\n\
         [[health.checks]]\ntype = \"memory\"\nmin-available = 1\n",
        dev_watchdog_placeholder()
    ));
    // The watchdog device: a plain file the run writes its feeds into.
    let wd = dev.path("watchdog");
    std::fs::write(&wd, b"").unwrap();
    let text = std::fs::read_to_string(dev.config()).unwrap();
    std::fs::write(
        dev.config(),
        text.replace(&dev_watchdog_placeholder(), &wd.display().to_string()),
    )
    .unwrap();
    // A real sd_notify socket.
    let sock_path = dev.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut messages = Vec::new();
        let mut buf = [0u8; 512];
        while let Ok(n) = sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            let last = m.starts_with("STATUS=committed");
            messages.push(m);
            if last {
                break;
            }
        }
        messages
    });

    let started = Instant::now();
    let out = dev
        .cmd(&["health", "run", "--json"])
        .env("NOTIFY_SOCKET", &sock_path)
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out["outcome"], "committed", "{out}");
    assert!(
        elapsed >= Duration::from_secs(2),
        "committed before the window: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert_eq!(dev.left(Slot::B), 3);
    assert_eq!(dev.primary(), Some(Slot::B));
    assert_eq!(dev.reboots(), 0);
    assert_eq!(dev.status()["health"]["outcome"], "committed");

    let fed = std::fs::read(&wd).unwrap();
    assert!(fed.iter().filter(|b| **b == b'k').count() >= 10, "{fed:?}");
    assert_eq!(fed.last(), Some(&b'V'), "magic close at the end");

    let messages = reader.join().unwrap();
    assert!(messages[0].starts_with("READY=1\n"), "{messages:?}");
    assert!(
        messages.iter().filter(|m| *m == "WATCHDOG=1").count() >= 10,
        "{messages:?}"
    );
    assert_eq!(
        messages.last().map(String::as_str),
        Some("STATUS=committed")
    );
}

fn dev_watchdog_placeholder() -> String {
    "@WATCHDOG@".into()
}

#[test]
fn a_hanging_check_times_out_and_is_reverted() {
    let dev = Device::on_trial(
        "deadline = 2\nstability-window = 1\n\
         [[health.checks]]\ntype = \"command\"\ncommand = [\"sleep\", \"60\"]\ntimeout = 1\n",
    );
    let started = Instant::now();
    let (out, _) = dev.health_run();
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out["outcome"], "reverted");
    let reason = out["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("deadline 2 s passed: command `sleep 60` did not exit within"),
        "{reason}"
    );
    assert_eq!(dev.left(Slot::B), 0);
    assert_eq!(dev.primary(), Some(Slot::A));
    assert_eq!(dev.reboots(), 1);
}

/// A failed trial whose revert would boot a release below the
/// anti-rollback floor (here slot A holds an image with no verified
/// record, and the floor is 2): the watchdog does not mark B bad, records
/// nothing, does not reboot, and says why.
#[test]
fn a_revert_below_the_anti_rollback_floor_is_refused() {
    let dev = Device::on_trial(
        "deadline = 1\n[[health.checks]]\ntype = \"command\"\ncommand = [\"false\"]\n",
    );
    let data = kernex_updater::store::DataDir::new(dev.path("data"));
    kernex_updater::floor::Floor::new(&data).raise(2).unwrap();
    let before = std::fs::read(dev.path("boot-state")).unwrap();
    let out = dev.cmd(&["health", "run", "--json"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("but not reverting"), "{err}");
    assert!(
        err.contains("fall back to an unrecorded image (slot A)")
            && err.contains("below this device's anti-rollback floor 2"),
        "{err}"
    );
    assert_eq!(std::fs::read(dev.path("boot-state")).unwrap(), before);
    assert_eq!(dev.left(Slot::B), 2, "still on trial");
    assert_eq!(dev.reboots(), 0);
    assert!(dev.status()["health"].is_null(), "nothing recorded");
}

#[test]
fn a_committed_slot_is_left_alone() {
    let dev = Device::on_trial(
        "deadline = 1\n[[health.checks]]\ntype = \"command\"\ncommand = [\"false\"]\n",
    );
    dev.flow().mark_good(Slot::B).unwrap();
    let before = std::fs::read(dev.path("boot-state")).unwrap();
    let (out, _) = dev.health_run();
    assert_eq!(out["outcome"], "not-on-trial", "{out}");
    assert_eq!(std::fs::read(dev.path("boot-state")).unwrap(), before);
    assert_eq!(dev.reboots(), 0);
    assert!(dev.status()["health"].is_null());
}

#[test]
fn revert_reboots_in_a_row_are_bounded() {
    let dev = Device::on_trial(
        "deadline = 1\nstability-window = 1\nmax-revert-reboots = 2\n\
         [[health.checks]]\ntype = \"command\"\ncommand = [\"false\"]\n",
    );
    for round in 1..=3 {
        dev.flow().set_try_next(Slot::B, 2).unwrap();
        let (out, _) = dev.health_run();
        assert_eq!(out["outcome"], "reverted");
        let reason = out["reason"].as_str().unwrap();
        assert!(
            reason.contains("command `false` failed (exit status 1)"),
            "{reason}"
        );
        if round <= 2 {
            assert_eq!(out["rebooted"], true);
            assert_eq!(dev.reboots(), round);
        } else {
            assert_eq!(out["rebooted"], false);
            assert!(
                reason.contains("not rebooting: already 2 revert reboots in a row"),
                "{reason}"
            );
            assert_eq!(dev.reboots(), 2);
        }
        assert_eq!(dev.left(Slot::B), 0);
    }
    // Booting a committed slot ends the run of reverts.
    dev.flow().mark_good(Slot::B).unwrap();
    assert_eq!(dev.health_run().0["outcome"], "not-on-trial");
    dev.flow().set_try_next(Slot::B, 2).unwrap();
    assert_eq!(dev.health_run().0["rebooted"], true);
    assert_eq!(dev.reboots(), 3);
}

#[test]
fn unknown_health_keys_in_the_config_are_rejected() {
    let dev = Device::on_trial("");
    dev.write_config("deadline = 1\nretries = 3\n");
    let out = dev.cmd(&["health", "run"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("retries"));
    dev.write_config("[[health.checks]]\ntype = \"command\"\ncommand = []\n");
    let out = dev.cmd(&["health", "run"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("health.checks[0].command"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Power cut while committing: abort right after the boot env was written
/// (before the outcome is recorded), and `kill -9` at random moments of
/// runs that commit. After every cut the boot state is consistent: B is
/// committed (3) or still on trial (2), and the primary slot always has
/// attempts left.
#[test]
fn power_cut_during_mark_good_leaves_a_consistent_state() {
    let health = "deadline = 10\nstability-window = 1\n\
                  [[health.checks]]\ntype = \"command\"\ncommand = [\"true\"]\n";
    let dev = Device::on_trial(health);
    let out = dev
        .cmd(&["health", "run"])
        .env("KERNEX_HEALTH_CRASH_AFTER", "mark-good")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the crash point must abort");
    assert_eq!(dev.left(Slot::B), 3, "the env write is atomic and done");
    assert_eq!(dev.primary(), Some(Slot::B));
    assert_eq!(dev.health_run().0["outcome"], "not-on-trial");

    let mut seed = std::process::id() as u64 | 1;
    for _ in 0..8 {
        let dev = Device::on_trial(health);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut child = dev
            .cmd(&["health", "run"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // The commit happens about 1 s in; cut somewhere around it.
        std::thread::sleep(Duration::from_millis(800 + seed % 500));
        let _ = child.kill();
        let _ = child.wait();
        let left = dev.left(Slot::B);
        assert!(left == 2 || left == 3, "B has {left} attempts");
        let primary = dev.primary().unwrap();
        assert!(dev.left(primary) > 0, "primary {primary} has no attempts");
        // The next run finishes the job.
        let (out, _) = dev.health_run();
        assert!(
            out["outcome"] == "committed" || out["outcome"] == "not-on-trial",
            "{out}"
        );
        assert_eq!(dev.left(Slot::B), 3);
    }
}
