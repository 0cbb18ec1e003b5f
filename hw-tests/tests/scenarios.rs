//! The whole-system scenarios (hw-tests/README.md): real U-Boot, a real
//! Debian kernel, the factory A/B disk, the real `kernex-updater` in the
//! guest. Scenarios 1-5 run on the arm64 board (QEMU `virt`, Debian's
//! qemu_arm64 U-Boot), 6 and 7 on the x86_64 one (the board with a TPM the
//! guest kernel can drive). Assertions are on what U-Boot prints and on
//! `kernex-updater status --json` in the guest. Console logs are kept under
//! the directory each test prints.
//!
//! Scenarios 1 and 2 are written once for any board (`scenario_1`,
//! `scenario_2` in `kernex_hw_tests::scenarios`) and also run through the
//! runner's lab-board mode (serial console, power by commands, ssh):
//! against a QEMU board treated as lab hardware (`lab_qemu_*`, run in CI;
//! scenario 1 there by the `kernex-hw-run` binary) and, by hand, against a
//! real board (`real_board_*`, `#[ignore]`d: not run in CI).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use kernex_attest::{
    AkPublic, Quote, QuoteError, TpmIdentity, expected_slot_pcr, fresh_nonce, slot_measurement,
    verify_quote,
};
use kernex_hw_tests::arch::Arch;
use kernex_hw_tests::assets::{self, Assets};
use kernex_hw_tests::disk::{self, FactoryEnv};
use kernex_hw_tests::guest::{self, Behaviour, Built, Keys, Release};
use kernex_hw_tests::machine::{Hardware, Lab, Machine, SshTarget, boot_timeout};
use kernex_hw_tests::scenarios::{self, INSTALL_TIMEOUT, Rig, scenario_1, scenario_2};
use kernex_hw_tests::server::ControlPlane;
use kernex_protocol::Sha256Digest;
use kernex_protocol::api::{AttestationState, ReportState};
use serde_json::Value;

struct Fixture {
    arch: Arch,
    dir: PathBuf,
    keys: Keys,
    v1: Built,
    v2: Built,
    v3: Built,
    v4: Built,
}

/// Releases are built once per test run and board, and shared by the
/// scenarios.
fn fixture(arch: Arch) -> &'static Fixture {
    static ARM64: OnceLock<Fixture> = OnceLock::new();
    static X86_64: OnceLock<Fixture> = OnceLock::new();
    let cell = match arch {
        Arch::Arm64 => &ARM64,
        Arch::X86_64 => &X86_64,
    };
    cell.get_or_init(|| {
        let dir = artefacts_root().join(format!("releases-{}", arch.name()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let updater = assets::build_updater(arch).unwrap();
        let assets = Assets::find(arch, updater).unwrap();
        let keys = Keys::create(&dir.join("keys")).unwrap();
        let build = |version: &str, behaviour| {
            guest::build(
                &assets,
                &keys,
                &Release {
                    version: version.into(),
                    behaviour,
                },
                &dir,
            )
            .unwrap()
        };
        Fixture {
            v1: build("1.0.0", Behaviour::Healthy),
            v2: build("2.0.0", Behaviour::Healthy),
            v3: build("3.0.0", Behaviour::AgentCrashLoops),
            v4: build("4.0.0", Behaviour::KernelPanics),
            arch,
            dir,
            keys,
        }
    })
}

/// `<target>/hw-tests` (next to the test binary), or KERNEX_HW_ARTEFACTS.
fn artefacts_root() -> PathBuf {
    if let Some(d) = std::env::var_os("KERNEX_HW_ARTEFACTS") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("hw-tests")
}

/// One scenario's board: its factory disk, a bundles disk, its console log;
/// or a lab board ([`Lab`]: a real one, or QEMU run as one), reached
/// through its serial console, power commands and ssh.
struct Board {
    dir: PathBuf,
    hw: Hardware,
    log: PathBuf,
    lab: Option<Lab>,
}

impl Rig for Board {
    fn power_on(&self) -> anyhow::Result<Machine> {
        match &self.lab {
            Some(lab) => Machine::start_lab(lab, &self.log),
            None => Machine::start(&self.hw, &self.log),
        }
    }
    fn disk_image(&self) -> Option<&Path> {
        self.lab.is_none().then_some(self.hw.disk.as_path())
    }
    fn work_dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Board {
    /// A lab board's power is cut when its scenario is over (the QEMU lab
    /// board's QEMU must not outlive the test).
    fn drop(&mut self) {
        if let Some(lab) = &self.lab
            && let Err(e) = lab.power_off(&self.log)
        {
            eprintln!("hw-tests: cutting the lab board's power failed: {e:#}");
        }
    }
}

impl Board {
    /// A factory-fresh board of `f`'s architecture.
    fn new(f: &Fixture, name: &str, bundles: &[&Built]) -> Board {
        let dir = artefacts_root().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        eprintln!(
            "hw-tests {name} ({} board): console log and disk in {}",
            f.arch.name(),
            dir.display()
        );
        let disk = dir.join("disk.img");
        disk::factory_image(
            f.arch,
            &disk,
            &dir.join("work"),
            &f.v1.image,
            &FactoryEnv::default(),
        )
        .unwrap();
        let bundles = if bundles.is_empty() {
            None
        } else {
            let path = dir.join("bundles.img");
            let files: Vec<&Path> = bundles.iter().map(|b| b.bundle.as_path()).collect();
            disk::bundles_disk(&path, &dir.join("work"), &files).unwrap();
            Some(path)
        };
        let _ = &f.dir;
        Board {
            log: dir.join("console.log"),
            hw: Hardware {
                arch: f.arch,
                disk,
                bundles,
                ..Hardware::default()
            },
            dir,
            lab: None,
        }
    }

    /// The board gets a NIC on QEMU's user network.
    fn with_network(mut self) -> Board {
        self.hw.network = true;
        self
    }

    /// The board gets a TPM (swtpm, its state in `<dir>/tpm`).
    fn with_tpm(mut self) -> Board {
        self.hw.tpm = Some(self.dir.join("tpm"));
        self
    }

    fn power_on(&self) -> Machine {
        Rig::power_on(self).unwrap()
    }

    /// Waits for U-Boot's choice and the guest's shell (or ssh); returns
    /// the status (`scenarios::boots`: a firmware start that failed before
    /// U-Boot's autoboot prompt is retried once).
    fn boots(&self, m: &mut Machine, uboot_says: &str) -> Value {
        scenarios::boots(self, m, uboot_says).unwrap()
    }

    /// The env U-Boot and the updater share, read from the disk image.
    fn env(&self, name: &str) -> Option<String> {
        let env = disk::read_env(&self.hw.disk, &self.dir).unwrap();
        env.get(name).map(str::to_owned)
    }
}

fn slot<'a>(status: &'a Value, name: &str) -> &'a Value {
    scenarios::slot(status, name).unwrap()
}

#[test]
fn s1_factory_image_boots_slot_a_and_commits_it() {
    scenario_1(&Board::new(fixture(Arch::Arm64), "s1-factory", &[])).unwrap();
}

/// The slot PCR (attest/README.md).
const PCR: u8 = 14;

/// Installs `bundle` in the guest; checks it succeeded.
fn install(m: &mut Machine, bundle: &Built) {
    scenarios::install_file(m, &bundle.bundle).unwrap();
}

/// A committed factory board (slot A committed, as after scenario 1).
fn factory_booted(board: &Board, m: &mut Machine) {
    scenarios::factory_booted(board, m).unwrap();
}

#[test]
fn s2_update_to_v2_boots_b_on_trial_commits_and_stays_on_b() {
    let f = fixture(Arch::Arm64);
    let board = Board::new(f, "s2-update", &[&f.v2]);
    scenario_2(&board, &f.v2.bundle, &f.v2.release.version).unwrap();
}

#[test]
fn s3_agent_crash_loop_in_v3_is_reverted_to_a_with_the_reason() {
    let f = fixture(Arch::Arm64);
    let board = Board::new(f, "s3-crash-loop", &[&f.v3]);
    let mut m = board.power_on();
    factory_booted(&board, &mut m);
    install(&mut m, &f.v3);
    m.reboot().unwrap();
    // B on trial; its agent crash-loops; the watchdog marks B bad (counter
    // 0, last in BOOT_ORDER) and reboots: U-Boot goes straight back to A
    // (B left 0, not 1: the watchdog reverted, the counter did not run out).
    m.wait_for(
        "Kernex: booting slot B (A left 3, B left 2)",
        boot_timeout(),
    )
    .unwrap();
    m.wait_for("KERNEX-HW: up version=3.0.0", boot_timeout())
        .unwrap();
    m.wait_for(
        "Kernex: booting slot A (A left 2, B left 0)",
        boot_timeout(),
    )
    .unwrap();
    let verdict = m
        .wait_for("KERNEX-HW: previous health verdict: ", boot_timeout())
        .map(|_| m.wait_for("\n", Duration::from_secs(30)).unwrap())
        .unwrap();
    let verdict: Value = serde_json::from_str(verdict.trim()).unwrap();
    assert_eq!(verdict["outcome"], "reverted", "{verdict}");
    assert_eq!(verdict["slot"], "B", "{verdict}");
    assert_eq!(verdict["version"], "3.0.0", "{verdict}");
    let reason = verdict["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("service agent restarted 3 times") && reason.contains("exit status 1"),
        "{reason}"
    );
    m.wait_for_shell().unwrap();
    let st = m.status().unwrap();
    assert_eq!(st["booted-slot"], "A", "{st}");
    assert_eq!(st["primary-slot"], "A", "{st}");
    assert_eq!(st["committed"], true, "{st}");
    assert_eq!(slot(&st, "B")["attempts-left"], 0, "{st}");
    assert_eq!(
        st["boot-state"]["order"],
        serde_json::json!(["A", "B"]),
        "{st}"
    );
}

#[test]
fn s4_v4_kernel_never_comes_up_and_u_boot_falls_back_to_a() {
    let f = fixture(Arch::Arm64);
    let board = Board::new(f, "s4-kernel-panic", &[&f.v4]);
    let mut m = board.power_on();
    factory_booted(&board, &mut m);
    install(&mut m, &f.v4);
    m.reboot().unwrap();
    // Three attempts at B, each a kernel panic (no userspace, no watchdog),
    // then U-Boot moves on to A by itself.
    for left in [2, 1, 0] {
        m.wait_for(
            &format!("Kernex: booting slot B (A left 3, B left {left})"),
            boot_timeout(),
        )
        .unwrap();
        m.wait_for("Kernel panic", boot_timeout()).unwrap();
    }
    let st = board.boots(&mut m, "Kernex: booting slot A (A left 2, B left 0)");
    assert!(!m.console().contains("KERNEX-HW: up version=4.0.0"));
    assert_eq!(st["booted-slot"], "A", "{st}");
    assert_eq!(st["committed"], true, "{st}");
    assert_eq!(slot(&st, "B")["attempts-left"], 0, "{st}");
}

/// Starts `install` of v2 in the background with the updater told to stop
/// itself (SIGSTOP) at `step` (`KERNEX_TEST_PAUSE_AT`, compiled in with the
/// `failpoints` feature, which the guest's build has), and waits until it
/// has stopped there.
fn install_until(m: &mut Machine, step: &str) {
    let (out, code) = m
        .sh(
            &format!(
                "KERNEX_TEST_PAUSE_AT={step} kernex-updater install /bundles/release-2.0.0.kxb >/tmp/install.log 2>&1 & p=$!; \
                 i=0; while [ $i -lt 3000 ] && [ -d /proc/$p ] && ! grep -q '^State:.*stopped' /proc/$p/status; do sleep 0.2; i=$((i+1)); done; \
                 grep '^State' /proc/$p/status || cat /tmp/install.log"
            ),
            INSTALL_TIMEOUT,
        )
        .unwrap();
    assert_eq!(code, 0, "{step}: {out}");
    assert!(
        out.contains("stopped"),
        "{step}: the install never reached the step:\n{out}"
    );
}

/// After a cut: the board boots A again, A is primary, B not bootable.
fn after_cut_boots_a(board: &Board, what: &str) -> (Machine, Value) {
    let mut m = board.power_on();
    let st = board.boots(&mut m, "Kernex: booting slot A (A left 2, B left 0)");
    assert_eq!(st["booted-slot"], "A", "{what}: {st}");
    assert_eq!(st["primary-slot"], "A", "{what}: {st}");
    assert_eq!(st["committed"], true, "{what}: {st}");
    assert_eq!(slot(&st, "B")["attempts-left"], 0, "{what}: {st}");
    (m, st)
}

#[test]
fn s5_power_cuts_at_five_moments_of_an_install_each_leave_a_booting_device() {
    let f = fixture(Arch::Arm64);
    let board = Board::new(f, "s5-power-cut", &[&f.v2]);
    let mut m = board.power_on();
    factory_booted(&board, &mut m);

    // Cut 1: a second after the install started (reading the bundle,
    // checking its signature; little or nothing written).
    m.send("kernex-updater install /bundles/release-2.0.0.kxb >/tmp/install.log 2>&1 &")
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    m.power_off().unwrap();
    let (mut m, _) = after_cut_boots_a(&board, "cut 1 (start)");

    // Cut 2: in the middle of the clone, in the middle of the third journal
    // write (a torn record on disk after chunks already journaled).
    install_until(&mut m, "journal-write:3");
    m.power_off().unwrap();
    let (mut m, st) = after_cut_boots_a(&board, "cut 2 (torn journal write)");
    assert!(!st["pending-install"].is_null(), "cut 2: {st}");

    // Cut 3: every chunk written and journaled, the final SHA-256 check of
    // slot B starting.
    install_until(&mut m, "verify");
    m.power_off().unwrap();
    let (mut m, st) = after_cut_boots_a(&board, "cut 3 (final check)");
    assert!(!st["pending-install"].is_null(), "cut 3: {st}");

    // Cut 4: B verified and recorded, just before the boot env is told to
    // try it (BOOT_ORDER still "A B").
    install_until(&mut m, "slot-record");
    m.power_off().unwrap();
    assert_eq!(board.env("BOOT_ORDER").as_deref(), Some("A B"));
    let (mut m, st) = after_cut_boots_a(&board, "cut 4 (before the BOOT_ORDER flip)");
    assert!(!st["pending-install"].is_null(), "cut 4: {st}");

    // The re-run completes: B is tried next.
    install(&mut m, &f.v2);
    let st = m.status().unwrap();
    assert_eq!(st["primary-slot"], "B", "{st}");
    assert_eq!(slot(&st, "B")["version"], "2.0.0", "{st}");
    assert_eq!(slot(&st, "B")["verified"], true, "{st}");
    assert!(st["pending-install"].is_null(), "{st}");

    // Cut 5: right after the install returned (BOOT_ORDER flipped; no sync,
    // no clean shutdown): the flip survived, U-Boot tries B, it commits.
    m.power_off().unwrap();
    assert_eq!(board.env("BOOT_ORDER").as_deref(), Some("B A"));
    let mut m = board.power_on();
    let st = board.boots(&mut m, "Kernex: booting slot B (A left 3, B left 2)");
    assert_eq!(st["booted-slot"], "B", "{st}");
    assert_eq!(st["committed"], true, "{st}");
    assert_eq!(slot(&st, "B")["version"], "2.0.0", "{st}");
}

/// `kernex-updater <args>` in the guest, its JSON output parsed.
fn updater_json<T: serde::de::DeserializeOwned>(m: &mut Machine, args: &str) -> T {
    let (out, code) = m
        .sh(&format!("kernex-updater {args}"), Duration::from_secs(180))
        .unwrap();
    assert_eq!(code, 0, "kernex-updater {args} failed:\n{out}");
    let start = out
        .find('{')
        .unwrap_or_else(|| panic!("no JSON from {args}:\n{out}"));
    serde_json::from_str(&out[start..]).unwrap_or_else(|e| panic!("{args}: {e}:\n{out}"))
}

/// PCR `pcr` (SHA-256 bank) as the guest kernel's TPM driver reads it
/// (`/sys/class/tpm/tpm0/pcr-sha256/N`): a reader independent of the
/// updater and of tpm2-tss.
fn kernel_pcr(m: &mut Machine, pcr: u8) -> Sha256Digest {
    let (out, code) = m
        .sh(
            &format!("cat /sys/class/tpm/tpm0/pcr-sha256/{pcr}"),
            Duration::from_secs(30),
        )
        .unwrap();
    assert_eq!(code, 0, "{out}");
    let hex = out.lines().last().unwrap_or_default().trim().to_lowercase();
    Sha256Digest(hex::decode(&hex).unwrap().try_into().unwrap())
}

/// The slot PCR a device running `release` must show (recomputed from its
/// signed manifest, as the server does).
fn expected_pcr(release: &Built) -> Sha256Digest {
    let manifest = release.manifest(&fixture(Arch::X86_64).keys).unwrap();
    expected_slot_pcr(&slot_measurement(&manifest).unwrap())
}

#[test]
fn s6_tpm_the_booted_slots_pcr_matches_its_release_and_the_quote_verifies() {
    let f = fixture(Arch::X86_64);
    let board = Board::new(f, "s6-attest", &[&f.v2]).with_tpm();
    let mut m = board.power_on();
    factory_booted(&board, &mut m);
    // The factory slot has no recorded release: nothing was measured.
    let (out, _) = m
        .sh("cat /tmp/measure.json", Duration::from_secs(30))
        .unwrap();
    assert!(out.contains("nothing to measure"), "{out}");
    assert_eq!(kernel_pcr(&mut m, PCR), Sha256Digest([0; 32]));
    let identity: TpmIdentity = updater_json(&mut m, "attest identity");
    let ak = AkPublic::parse(&identity.ak_public).unwrap();

    install(&mut m, &f.v2);
    m.reboot().unwrap();
    let st = board.boots(&mut m, "Kernex: booting slot B (A left 3, B left 2)");
    assert_eq!(st["booted-slot"], "B", "{st}");
    assert_eq!(st["committed"], true, "{st}");

    // Measured once, early in this boot, by the updater in the guest.
    let (out, _) = m
        .sh("cat /tmp/measure.json", Duration::from_secs(30))
        .unwrap();
    let measured: Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    assert_eq!(measured["slot"], "B", "{measured}");
    assert_eq!(measured["version"], "2.0.0", "{measured}");
    assert_eq!(measured["already"], false, "{measured}");
    let v2 = expected_pcr(&f.v2);
    assert_eq!(measured["value"], v2.to_hex(), "{measured}");
    // What the TPM holds, read by the kernel: v2's value, no other release's.
    let pcr = kernel_pcr(&mut m, PCR);
    assert_eq!(pcr, v2);
    for other in [&f.v1, &f.v3] {
        assert_ne!(pcr, expected_pcr(other), "{}", other.release.version);
    }
    // A second measure in the same boot extends nothing.
    let again: Value = updater_json(&mut m, "attest measure --json");
    assert_eq!(again["already"], true, "{again}");
    assert_eq!(kernel_pcr(&mut m, PCR), v2);

    // A quote over a fresh nonce, verified here with the enrolled AK.
    let nonce = fresh_nonce().unwrap();
    let quote: Quote = updater_json(&mut m, &format!("attest quote {}", hex::encode(nonce)));
    let expect = |d: Sha256Digest| BTreeMap::from([(PCR, d)]);
    let verified = verify_quote(&ak, &quote, &nonce, &expect(v2)).unwrap();
    assert_eq!(verified.pcrs[&PCR], v2);
    // ...and it proves v2, not another release, and answers only this nonce.
    let err = verify_quote(&ak, &quote, &nonce, &expect(expected_pcr(&f.v1))).unwrap_err();
    assert!(
        matches!(err, QuoteError::PcrMismatch { pcr: PCR, .. }),
        "{err:?}"
    );
    let other_nonce = fresh_nonce().unwrap();
    let err = verify_quote(&ak, &quote, &other_nonce, &expect(v2)).unwrap_err();
    assert!(matches!(err, QuoteError::NonceMismatch { .. }), "{err:?}");

    // The independent verifier agrees: tpm2_checkquote with the AK in PEM.
    let dir = board.dir.join("quote");
    std::fs::create_dir_all(&dir).unwrap();
    let path = |name: &str| dir.join(name).display().to_string();
    std::fs::write(path("ak.pem"), ak.to_pem().unwrap()).unwrap();
    std::fs::write(path("quote.msg"), &quote.attest).unwrap();
    std::fs::write(path("quote.sig"), &quote.signature).unwrap();
    std::fs::write(path("v2.pcrs"), v2.0).unwrap();
    std::fs::write(path("v1.pcrs"), expected_pcr(&f.v1).0).unwrap();
    let checkquote = |pcrs: &str, nonce: &[u8]| {
        std::process::Command::new("tpm2_checkquote")
            .args(["-u", &path("ak.pem"), "-m", &path("quote.msg")])
            .args(["-s", &path("quote.sig"), "-f", &path(pcrs)])
            .args(["-l", &format!("sha256:{PCR}"), "-g", "sha256"])
            .args(["-q", &hex::encode(nonce)])
            .output()
            .expect("tpm2_checkquote (tpm2-tools; scripts/setup.d/60-tpm.sh)")
    };
    let out = checkquote("v2.pcrs", &nonce);
    assert!(
        out.status.success(),
        "tpm2_checkquote rejected the guest's quote: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!checkquote("v1.pcrs", &nonce).status.success());
    assert!(!checkquote("v2.pcrs", &other_nonce).status.success());
}

/// Polls `f` every half second until it gives a value or `timeout` passes.
fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let started = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Sets its flag when dropped (also while a panic unwinds).
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn s7_daemon_enrolls_with_a_real_server_over_the_network_installs_reboots_and_commits() {
    let f = fixture(Arch::X86_64);
    let board = Board::new(f, "s7-daemon", &[]).with_network().with_tpm();
    let server_bin = assets::build_server().unwrap();
    let cp = ControlPlane::start(&server_bin, &board.dir.join("server"), &f.keys.ca()).unwrap();
    eprintln!(
        "hw-tests s7-daemon: kernex-server at {} (log {})",
        cp.url,
        cp.log.display()
    );
    let release = cp.upload(&f.v2.bundle).unwrap();
    // Devices must enroll with their TPM identity.
    let token = cp.enrollment_token(true).unwrap();

    let mut m = board.power_on();
    factory_booted(&board, &mut m);
    // Provision the device for the control plane, as the factory would.
    let (out, code) = m
        .sh(
            &format!(
                "mkdir -p /data/kernex-hw && printf '%s\\n' '[server]' 'url = \"{}\"' 'enrollment-token = \"{token}\"' 'device-id = \"qemu-hw-1\"' 'poll-interval = 2' >/data/kernex-hw/server.toml && sync && kernex-hw-daemon",
                cp.guest_url()
            ),
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(code, 0, "{out}");

    // It enrolls over QEMU's user network, its TPM identity proven by
    // credential activation, and heartbeats from slot A.
    let device = poll("the guest to enroll", INSTALL_TIMEOUT, || {
        cp.device("qemu-hw-1")
            .unwrap()
            .filter(|d| d["status"] == "online" && d["booted_slot"] == "A")
    });
    assert_eq!(device["hardware_class"], f.arch.compatible(), "{device}");
    assert_eq!(
        device["attestation"]["ek_fingerprint"]
            .as_str()
            .map(str::len),
        Some(64),
        "{device}"
    );
    let id = device["id"].as_str().unwrap().to_owned();

    // The operator assigns v2; the daemon downloads it from the server,
    // installs it into slot B and reboots; U-Boot tries B; the daemon,
    // started again by the init, runs the watchdog and commits.
    let deployment = cp.deploy(&release, &id).unwrap();
    // Sampled from the server every 300 ms while it happens: the
    // deployment's device state, and the slot and uptime of the device's
    // latest heartbeat.
    let done = std::sync::atomic::AtomicBool::new(false);
    let (states, beats) = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut states: Vec<String> = Vec::new();
            let mut beats: Vec<(std::time::Instant, String, u64)> = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(d) = cp.deployment(&deployment) {
                    let state = d["devices"][0]["state"].as_str().unwrap_or("").to_owned();
                    if states.last() != Some(&state) {
                        states.push(state);
                    }
                }
                if let Ok(d) = cp.call_expecting(200, "GET", &format!("/api/v1/devices/{id}"), None)
                {
                    let inv = &d["inventory"];
                    if let (Some(slot), Some(up)) =
                        (inv["booted_slot"].as_str(), inv["uptime_secs"].as_u64())
                    {
                        beats.push((std::time::Instant::now(), slot.to_owned(), up));
                    }
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            (states, beats)
        });
        // A failed wait below must stop the watcher too, or the scope
        // would wait for it forever instead of failing the test.
        let _stop = StopOnDrop(&done);
        m.wait_for(
            "Kernex: booting slot B (A left 3, B left 2)",
            INSTALL_TIMEOUT,
        )
        .unwrap();
        m.wait_for("KERNEX-HW: up version=2.0.0", boot_timeout())
            .unwrap();
        m.wait_for("KERNEX-HW: daemon started", boot_timeout())
            .unwrap();
        m.wait_for_shell().unwrap();
        poll("the deployment to succeed", INSTALL_TIMEOUT, || {
            cp.deployment(&deployment)
                .ok()
                .filter(|d| d["status"] == "success")
        });
        // One more heartbeat from B.
        std::thread::sleep(Duration::from_secs(5));
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        watcher.join().unwrap()
    });
    // The server saw the install, then the commit. (The daemon queues its
    // `rebooted` report at boot and delivers it with `committed` once the
    // watchdog has decided, so `rebooted` is seen only by luck.)
    let pos = |s: ReportState| {
        states
            .iter()
            .position(|x| x == s.as_str())
            .unwrap_or_else(|| panic!("the server never saw {s:?}: {states:?}"))
    };
    let (installed, committed) = (pos(ReportState::Installed), pos(ReportState::Committed));
    assert!(installed < committed, "{states:?}");
    if let Some(r) = states
        .iter()
        .position(|x| x == ReportState::Rebooted.as_str())
    {
        assert!(installed < r && r < committed, "{states:?}");
    }
    // ...and, from the heartbeats, that the device restarted in between.
    // Uptime only grows: had B's first heartbeat (uptime `b_up`) come from
    // the same boot as A's last one (`a_up`, first sampled at `a_first`),
    // then `b_up >= a_up + W`, W being the time from `a_first` to the last
    // sample before B's heartbeat showed up.
    let b_index = beats
        .iter()
        .position(|(_, s, _)| s == "B")
        .unwrap_or_else(|| panic!("no heartbeat from B: {beats:?}"));
    let (_, _, b_up) = &beats[b_index];
    let (_, _, a_up) = beats[..b_index]
        .iter()
        .rev()
        .find(|(_, s, _)| s == "A")
        .unwrap_or_else(|| panic!("no heartbeat from A before B's: {beats:?}"));
    let (a_first, _, _) = beats
        .iter()
        .find(|(_, s, up)| s == "A" && up == a_up)
        .unwrap();
    let (b_prev, _, _) = &beats[b_index - 1];
    let w = b_prev.duration_since(*a_first).as_secs();
    assert!(
        *b_up < a_up + w,
        "no restart between A's heartbeat (uptime {a_up} s) and B's (uptime {b_up} s, {w} s later)"
    );
    let dep = cp.deployment(&deployment).unwrap();
    assert_eq!(
        dep["devices"][0]["state"],
        ReportState::Committed.as_str(),
        "{dep}"
    );
    let fetched = dep["devices"][0]["bytes_done"].as_i64().unwrap();
    let size = std::fs::metadata(&f.v2.bundle).unwrap().len() as i64;
    assert!(
        fetched > 0 && fetched <= size,
        "fetched {fetched} of {size}"
    );
    let d = poll(
        "the device record to show 2.0.0 on B",
        Duration::from_secs(120),
        || {
            cp.device("qemu-hw-1")
                .unwrap()
                .filter(|d| d["current_version"] == "2.0.0" && d["booted_slot"] == "B")
        },
    );
    assert_eq!(d["status"], "online", "{d}");
    // Committed · attested: the server asked for a quote with a fresh nonce,
    // and the guest's TPM showed PCR 14 holding v2's measurement (extended by
    // the guest at boot) under the AK that credential activation bound.
    let d = poll(
        "the server to attest 2.0.0",
        Duration::from_secs(180),
        || {
            cp.device("qemu-hw-1")
                .unwrap()
                .filter(|d| d["attestation"]["state"] == AttestationState::Attested.as_str())
        },
    );
    assert_eq!(d["attestation"]["version"], "2.0.0", "{d}");
    // The device agrees.
    let st = m.status().unwrap();
    assert_eq!(st["booted-slot"], "B", "{st}");
    assert_eq!(st["committed"], true, "{st}");
    assert_eq!(st["server"]["enrolled-as"], id.as_str(), "{st}");
    assert_eq!(slot(&st, "B")["version"], "2.0.0", "{st}");
    // The daemon's log reaches the disk image kept as the artefact.
    m.sh("sync", Duration::from_secs(60)).unwrap();
}

// ---------------------------------------------------------------------------
// Lab boards: the runner's real-board mode (hw-tests/README.md, "On a real
// Raspberry Pi 4"). The console is a serial device or socket, the power is
// cut and restored by shell commands, Linux is reached over ssh, bundles
// are copied over ssh.

/// The releases of the QEMU lab board: the x86_64 board's v1 and v2 with an
/// ssh server (dropbear) that lets in the key the fixture makes. x86_64,
/// not arm64: the guest's dropbear and its libraries are then the host's
/// own Debian copies (`dropbear-bin`, found with `ldd`, like the updater's),
/// and the x86_64 board already has the NIC scenario 7 uses.
struct LabFixture {
    v1: Built,
    v2: Built,
    /// The private key the runner logs in with.
    ssh_key: PathBuf,
}

fn lab_fixture() -> &'static LabFixture {
    static LAB: OnceLock<LabFixture> = OnceLock::new();
    LAB.get_or_init(|| {
        let arch = Arch::X86_64;
        let dir = artefacts_root().join("releases-lab");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ssh_key = dir.join("ssh/id_ed25519");
        std::fs::create_dir_all(dir.join("ssh")).unwrap();
        kernex_hw_tests::run(
            std::process::Command::new("ssh-keygen")
                .args([
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "kernex-hw-tests",
                    "-f",
                ])
                .arg(&ssh_key),
        )
        .expect("ssh-keygen (openssh-client; scripts/setup.d/72-hw-tests-lab.sh)");
        let public = std::fs::read_to_string(ssh_key.with_extension("pub")).unwrap();
        let updater = assets::build_updater(arch).unwrap();
        let assets = Assets::find(arch, updater)
            .unwrap()
            .with_ssh(&public, &dir.join("ssh"))
            .unwrap();
        let keys = Keys::create(&dir.join("keys")).unwrap();
        let build = |version: &str| {
            guest::build(
                &assets,
                &keys,
                &Release {
                    version: version.into(),
                    behaviour: Behaviour::Healthy,
                },
                &dir,
            )
            .unwrap()
        };
        LabFixture {
            v1: build("1.0.0"),
            v2: build("2.0.0"),
            ssh_key,
        }
    })
}

/// Single-quotes `s` for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Board {
    /// A QEMU board the runner treats as lab hardware: it knows only what a
    /// real board's operator would give it — a console path (a Unix socket
    /// here, where a Pi has /dev/ttyUSB0), power-off and power-on *commands*
    /// (scripts written here that kill QEMU and start it in the background,
    /// where a Pi has a relay), `ssh://root@127.0.0.1:PORT` (QEMU's user
    /// network forwards the port to the guest's dropbear) and a key. The
    /// factory image is "flashed" by writing the disk image before the first
    /// power-on; the board has no bundles disk.
    ///
    /// With `pty`, the console is a serial device as on a real board: a
    /// pseudo-terminal `<dir>/ttyUSB0` that socat, started by the power-on
    /// command, bridges to QEMU's socket (`wait-slave`: the board starts
    /// once the runner has opened it), set up by the runner with `stty`
    /// like a USB-serial adapter.
    fn qemu_lab(f: &LabFixture, name: &str, pty: bool) -> Board {
        let dir = artefacts_root().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        eprintln!(
            "hw-tests {name} (x86_64 QEMU board as a lab board): console log, ssh log and disk in {}",
            dir.display()
        );
        let disk = dir.join("disk.img");
        disk::factory_image(
            Arch::X86_64,
            &disk,
            &dir.join("work"),
            &f.v1.image,
            &FactoryEnv::default(),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let hw = Hardware {
            arch: Arch::X86_64,
            disk,
            network: true,
            ssh_forward: Some(port),
            ..Hardware::default()
        };
        let socket = dir.join("serial.sock");
        assert!(
            socket.as_os_str().len() < 100,
            "{} is too long for a Unix socket: set KERNEX_HW_ARTEFACTS to a shorter directory",
            socket.display()
        );
        let qemu = assets::which(hw.arch.qemu()).unwrap();
        let args: Vec<String> = kernex_hw_tests::machine::qemu_args(&hw)
            .iter()
            .map(|a| sh_quote(a))
            .collect();
        let d = sh_quote(&dir.display().to_string());
        // The serial console waits for its client (`wait=on`): QEMU starts
        // the board once the runner is attached, as a USB-serial adapter is
        // plugged in before the power comes on.
        let tty = dir.join("ttyUSB0");
        let socat = if pty {
            let socat = assets::which("socat")
                .expect("socat (scripts/setup.d/72-hw-tests-lab.sh) bridges the pty console");
            format!(
                "{socat} PTY,link={tty},rawer,wait-slave UNIX-CONNECT:{sock} </dev/null >>socat.log 2>&1 &\n\
                 echo $! >socat.pid\n\
                 i=0\n\
                 while [ ! -e {tty} ]; do\n\
                 \x20   i=$((i+1)); [ $i -lt 600 ] || {{ echo 'socat made no pty in 60 s'; cat socat.log; exit 1; }}\n\
                 \x20   sleep 0.1\n\
                 done\n",
                socat = sh_quote(&socat.display().to_string()),
                tty = sh_quote(&tty.display().to_string()),
                sock = sh_quote(&socket.display().to_string()),
            )
        } else {
            String::new()
        };
        let power_on = format!(
            "#!/bin/sh\n\
             # Power-on of the QEMU lab board: QEMU in the background, its serial\n\
             # console on a Unix socket.\n\
             set -e\n\
             cd {d}\n\
             rm -f serial.sock\n\
             {qemu} {args} -display none -monitor none \\\n  \
             -chardev socket,id=s0,path={sock},server=on,wait=on -serial chardev:s0 \\\n  \
             </dev/null >>qemu.log 2>&1 &\n\
             echo $! >qemu.pid\n\
             i=0\n\
             while [ ! -S serial.sock ]; do\n\
             \x20   kill -0 \"$(cat qemu.pid)\" 2>/dev/null || {{ echo 'QEMU exited:'; tail -5 qemu.log; exit 1; }}\n\
             \x20   i=$((i+1)); [ $i -lt 600 ] || {{ echo 'QEMU made no serial.sock in 60 s'; exit 1; }}\n\
             \x20   sleep 0.1\n\
             done\n\
             {socat}",
            qemu = sh_quote(&qemu.display().to_string()),
            args = args.join(" "),
            sock = sh_quote(&socket.display().to_string()),
        );
        let power_off = format!(
            "#!/bin/sh\n\
             # Power cut of the QEMU lab board: SIGKILL, no sync, no shutdown.\n\
             cd {d}\n\
             if [ -f qemu.pid ]; then\n\
             \x20   pid=$(cat qemu.pid)\n\
             \x20   kill -9 \"$pid\" 2>/dev/null || true\n\
             \x20   i=0\n\
             \x20   while [ -e /proc/$pid ] && ! grep -q '^State:.*Z' /proc/$pid/status 2>/dev/null; do\n\
             \x20       i=$((i+1)); [ $i -lt 100 ] || {{ echo \"QEMU $pid survived SIGKILL\"; exit 1; }}\n\
             \x20       sleep 0.1\n\
             \x20   done\n\
             fi\n\
             if [ -f socat.pid ]; then kill \"$(cat socat.pid)\" 2>/dev/null || true; fi\n\
             rm -f qemu.pid serial.sock socat.pid ttyUSB0\n"
        );
        std::fs::write(dir.join("power-on.sh"), power_on).unwrap();
        std::fs::write(dir.join("power-off.sh"), power_off).unwrap();
        let lab = Lab {
            ssh: SshTarget {
                identity: Some(f.ssh_key.clone()),
                ..SshTarget::parse(&format!("ssh://root@127.0.0.1:{port}")).unwrap()
            },
            console: if pty { tty } else { socket },
            power_off: format!(
                "sh {}",
                sh_quote(&dir.join("power-off.sh").display().to_string())
            ),
            power_on: format!(
                "sh {}",
                sh_quote(&dir.join("power-on.sh").display().to_string())
            ),
            bundle_dir: kernex_hw_tests::machine::DEFAULT_BUNDLE_DIR.to_owned(),
        };
        Board {
            log: dir.join("console.log"),
            hw,
            dir,
            lab: Some(lab),
        }
    }

    /// The real board the environment names (`Lab::from_env`).
    fn real(name: &str) -> Board {
        let lab = Lab::from_env().unwrap();
        let dir = artefacts_root().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        eprintln!(
            "hw-tests {name} (real board {}, console {}): console log and ssh log in {}",
            lab.ssh,
            lab.console.display(),
            dir.display()
        );
        Board {
            log: dir.join("console.log"),
            hw: Hardware::default(),
            dir,
            lab: Some(lab),
        }
    }
}

#[test]
fn lab_qemu_board_s1_by_kernex_hw_run_factory_boot_commits_a_and_a_power_cut_by_command_keeps_it() {
    let f = lab_fixture();
    let board = Board::qemu_lab(f, "lab-s1-factory", false);
    // Scenario 1 run by the operator's tool, `kernex-hw-run`, given only
    // what it would be given for a real board.
    let lab = board.lab.as_ref().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kernex-hw-run"))
        .arg("--target")
        .arg(lab.ssh.to_string())
        .arg("--identity")
        .arg(lab.ssh.identity.as_ref().unwrap())
        .arg("--console")
        .arg(&lab.console)
        .args(["--power-off", &lab.power_off, "--power-on", &lab.power_on])
        .arg("--out")
        .arg(&board.dir)
        .arg("s1")
        .env_remove("KERNEX_HW_BUNDLE_DIR")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprint!("{stderr}");
    assert!(out.status.success(), "kernex-hw-run s1 failed: {stderr}");
    assert!(stderr.contains("kernex-hw-run: passed"), "{stderr}");
    // The power comes back through the power-on command: U-Boot read the
    // committed counter (3, decremented for this attempt), not the factory's.
    let mut m = board.power_on();
    let st = board.boots(&mut m, "Kernex: booting slot A (A left 2, B left 0)");
    assert_eq!(st["booted-slot"], "A", "{st}");
    assert_eq!(st["committed"], true, "{st}");
    // Everything ran over the lab link: the console never had a command
    // typed into it, the guest's shell there was never used.
    assert!(
        !m.console().contains("@@KX"),
        "a command went over the console"
    );
    let ssh_log = std::fs::read_to_string(board.dir.join("ssh.log")).unwrap();
    assert!(
        ssh_log.contains("$ kernex-updater status --json"),
        "{ssh_log}"
    );
    m.power_off().unwrap();
}

#[test]
fn lab_qemu_board_s2_update_copied_over_ssh_boots_b_commits_and_stays_after_a_power_cut() {
    let f = lab_fixture();
    // The console as a serial device (a pty set up with stty).
    let board = Board::qemu_lab(f, "lab-s2-update", true);
    scenario_2(&board, &f.v2.bundle, &f.v2.release.version).unwrap();
    // The bundle was copied over ssh to the data partition, not read from
    // a second disk (the lab board has none).
    let ssh_log = std::fs::read_to_string(board.dir.join("ssh.log")).unwrap();
    assert!(
        ssh_log.contains("kernex-updater install /data/kernex-hw/bundles/release-2.0.0.kxb"),
        "{ssh_log}"
    );
    // Power restored by command after the cut: B, committed, still primary.
    let mut m = board.power_on();
    let st = board.boots(&mut m, "Kernex: booting slot B (A left 3, B left 2)");
    assert_eq!(st["booted-slot"], "B", "{st}");
    assert_eq!(st["primary-slot"], "B", "{st}");
    assert_eq!(st["committed"], true, "{st}");
    assert_eq!(slot(&st, "B")["version"], "2.0.0", "{st}");
    m.power_off().unwrap();
}

/// Scenario 1 on a real board (a Raspberry Pi 4 flashed with the factory
/// image): run by hand, never in CI — `cargo test … real_board -- --ignored`
/// with the environment of hw-tests/README.md.
#[test]
#[ignore = "needs a real board: KERNEX_HW_TARGET, KERNEX_HW_CONSOLE, KERNEX_HW_POWER_OFF, KERNEX_HW_POWER_ON (hw-tests/README.md)"]
fn real_board_s1_factory_image_boots_slot_a_and_commits_it() {
    scenario_1(&Board::real("real-s1-factory")).unwrap();
}

/// Scenario 2 on a real board: `KERNEX_HW_BUNDLE` is the vendor's signed
/// bundle of the next release (`KERNEX_HW_BUNDLE_VERSION`, default 2.0.0).
#[test]
#[ignore = "needs a real board and KERNEX_HW_BUNDLE (hw-tests/README.md)"]
fn real_board_s2_update_boots_b_on_trial_commits_and_stays_on_b() {
    let bundle = std::env::var_os("KERNEX_HW_BUNDLE")
        .map(PathBuf::from)
        .expect(
            "KERNEX_HW_BUNDLE=<the next release's signed bundle> is not set (hw-tests/README.md)",
        );
    let version = std::env::var("KERNEX_HW_BUNDLE_VERSION").unwrap_or_else(|_| "2.0.0".to_owned());
    scenario_2(&Board::real("real-s2-update"), &bundle, &version).unwrap();
}
