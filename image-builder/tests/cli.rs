//! `kernex-image` end to end, as a vendor runs it, with the real peers:
//! the `bita` CLI reads and clones our archives, `openssl cms -verify`
//! checks our signatures, `tar` unpacks our bundles. A missing peer fails
//! the test (scripts/setup installs them).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use sha2::{Digest, Sha256};

fn kernex_image() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kernex-image"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_json(cmd: &mut Command) -> Value {
    serde_json::from_slice(&run(cmd).stdout).expect("JSON output")
}

/// A peer tool from PATH or the setup cache; panics (never skips) if absent.
fn peer(name: &str) -> Command {
    let cache = std::env::var("KERNEX_CACHE").unwrap_or_else(|_| "/var/cache/kernex-ci".into());
    let cached = Path::new(&cache).join("cargo-bin/bin").join(name);
    if cached.exists() {
        return Command::new(cached);
    }
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).exists()))
        .unwrap_or(false);
    assert!(found, "{name} is not installed: run scripts/setup");
    Command::new(name)
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(fs::read(path).unwrap()))
}

struct Release {
    dir: tempfile::TempDir,
}

impl Release {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Keys, a small root filesystem, an ext4 image and a signed bundle.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let r = Release { dir };
        run(kernex_image()
            .args(["keys", "create", "--out"])
            .arg(r.path("keys")));
        let root = r.path("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        fs::write(root.join("etc/agent.conf"), "model=qwen-1.5b\n").unwrap();
        // Some real, compressible-but-not-trivial content.
        for (i, entry) in fs::read_dir("/usr/bin")
            .unwrap()
            .flatten()
            .take(40)
            .enumerate()
        {
            let p = entry.path();
            if p.is_file() && fs::metadata(&p).map(|m| m.len() < 2 << 20).unwrap_or(false) {
                fs::copy(&p, root.join(format!("usr/bin/tool{i}"))).unwrap();
            }
        }
        r.build("1.0.0", "rootfs-1.img", "release-1.kxb");
        r
    }

    fn build(&self, version: &str, image: &str, bundle: &str) {
        run(kernex_image()
            .arg("rootfs")
            .arg(self.path("root"))
            .args(["--fs", "ext4", "--timestamp", "1700000000", "--out"])
            .arg(self.path(image)));
        run(kernex_image()
            .args([
                "bundle",
                "create",
                "--compatible",
                "qemu-aarch64",
                "--version",
                version,
            ])
            .arg("--rootfs")
            .arg(self.path(image))
            .arg("--key")
            .arg(self.path("keys/signing.key"))
            .arg("--cert")
            .arg(self.path("keys/signing.crt"))
            .args(["--meta", "model=qwen-1.5b", "--out"])
            .arg(self.path(bundle)));
    }

    /// `bundle create` of rootfs-1.img into never.kxb, for the failure cases.
    fn create_cmd(&self, compatible: &str, key: &str) -> Command {
        let mut cmd = kernex_image();
        cmd.args([
            "bundle",
            "create",
            "--compatible",
            compatible,
            "--version",
            "1.0.0",
        ])
        .arg("--rootfs")
        .arg(self.path("rootfs-1.img"))
        .arg("--key")
        .arg(self.path(key))
        .arg("--cert")
        .arg(self.path("keys/signing.crt"))
        .arg("--out")
        .arg(self.path("never.kxb"));
        cmd
    }

    fn unpack(&self, bundle: &str) -> PathBuf {
        let out = self.path(&format!("{bundle}.d"));
        fs::create_dir_all(&out).unwrap();
        run(Command::new("tar")
            .arg("-xf")
            .arg(self.path(bundle))
            .arg("-C")
            .arg(&out));
        out
    }
}

#[test]
fn create_inspect_verify_round_trip() {
    let r = Release::new();
    let inspect = run_json(
        kernex_image()
            .args(["bundle", "inspect", "--json"])
            .arg(r.path("release-1.kxb")),
    );
    assert_eq!(inspect["verified"], false);
    assert_eq!(inspect["manifest"]["version"], "1.0.0");
    assert_eq!(inspect["manifest"]["compatible"], "qemu-aarch64");
    assert_eq!(inspect["manifest"]["metadata"]["model"], "qwen-1.5b");
    let image = &inspect["manifest"]["images"][0];
    assert_eq!(image["slot-class"], "rootfs");
    assert_eq!(image["filesystem"], "ext4");
    assert_eq!(image["sha256"], sha256_file(&r.path("rootfs-1.img")));
    assert!(inspect["images"][0]["chunks"].as_u64().unwrap() > 10);

    let verify = run_json(
        kernex_image()
            .args(["bundle", "verify", "--json", "--keyring"])
            .arg(r.path("keys/ca.crt"))
            .arg(r.path("release-1.kxb")),
    );
    assert_eq!(verify["verified"], true);
    assert_eq!(
        verify["images"][0]["sha256"],
        sha256_file(&r.path("rootfs-1.img"))
    );

    // Human output too.
    let human = run(kernex_image()
        .args(["bundle", "verify", "--keyring"])
        .arg(r.path("keys/ca.crt"))
        .arg(r.path("release-1.kxb")));
    assert!(String::from_utf8_lossy(&human.stdout).starts_with("OK: "));
}

#[test]
fn bundles_are_reproducible_apart_from_the_signature() {
    let r = Release::new();
    r.build("1.0.0", "rootfs-again.img", "release-again.kxb");
    assert_eq!(
        sha256_file(&r.path("rootfs-1.img")),
        sha256_file(&r.path("rootfs-again.img"))
    );
    let a = r.unpack("release-1.kxb");
    let b = r.unpack("release-again.kxb");
    for member in ["manifest.json", "rootfs.kxi", "rootfs.bita"] {
        assert_eq!(
            sha256_file(&a.join(member)),
            sha256_file(&b.join(member)),
            "{member}"
        );
    }
}

#[test]
fn bita_cli_reads_and_clones_our_archive() {
    let r = Release::new();
    let dir = r.unpack("release-1.kxb");
    let info = run(peer("bita").arg("info").arg(dir.join("rootfs.bita")));
    let text =
        String::from_utf8_lossy(&info.stdout).to_string() + &String::from_utf8_lossy(&info.stderr);
    assert!(
        text.to_lowercase().contains("chunk"),
        "bita info said: {text}"
    );
    let cloned = r.path("cloned.img");
    run(peer("bita")
        .arg("clone")
        .arg(dir.join("rootfs.bita"))
        .arg(&cloned));
    assert_eq!(sha256_file(&cloned), sha256_file(&r.path("rootfs-1.img")));
    // And with the old image as a seed, after a one-file change.
    fs::write(r.path("root/etc/agent.conf"), "model=qwen-1.5b-q5\n").unwrap();
    r.build("1.0.1", "rootfs-2.img", "release-2.kxb");
    let dir2 = r.unpack("release-2.kxb");
    let cloned2 = r.path("cloned-2.img");
    run(peer("bita")
        .arg("clone")
        .arg("--seed")
        .arg(r.path("rootfs-1.img"))
        .arg(dir2.join("rootfs.bita"))
        .arg(&cloned2));
    assert_eq!(sha256_file(&cloned2), sha256_file(&r.path("rootfs-2.img")));
}

#[test]
fn openssl_cms_verifies_our_signature_and_rejects_a_tampered_manifest() {
    let r = Release::new();
    let dir = r.unpack("release-1.kxb");
    let verify = |content: &Path| {
        peer("openssl")
            .args([
                "cms", "-verify", "-binary", "-inform", "DER", "-purpose", "any", "-in",
            ])
            .arg(dir.join("manifest.sig"))
            .arg("-content")
            .arg(content)
            .arg("-CAfile")
            .arg(r.path("keys/ca.crt"))
            .args(["-out", "/dev/null"])
            .output()
            .unwrap()
    };
    let ok = verify(&dir.join("manifest.json"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let tampered = r.path("tampered.json");
    let text = fs::read_to_string(dir.join("manifest.json"))
        .unwrap()
        .replace("1.0.0", "9.0.0");
    fs::write(&tampered, text).unwrap();
    assert!(!verify(&tampered).status.success());
}

#[test]
fn one_small_file_change_costs_a_small_delta() {
    let r = Release::new();
    fs::write(r.path("root/etc/agent.conf"), "model=qwen-1.5b-q5\n").unwrap();
    r.build("1.0.1", "rootfs-2.img", "release-2.kxb");
    let delta = run_json(
        kernex_image()
            .args(["bundle", "delta", "--json"])
            .arg(r.path("release-1.kxb"))
            .arg(r.path("release-2.kxb")),
    );
    let total = delta["total-bytes"].as_u64().unwrap();
    let full = delta["full-bundle-bytes"].as_u64().unwrap();
    let image = &delta["images"][0];
    assert!(image["chunks-reused"].as_u64().unwrap() > 0, "{delta}");
    assert!(
        total * 10 < full,
        "delta {total} of a {full}-byte bundle: {delta}"
    );
}

#[test]
fn a_patch_from_the_previous_release_carries_a_patched_binary_in_few_bytes() {
    let r = Release::new();
    // A binary patched in many places (every one of its chunks changes a
    // little) and a config edit.
    let tool = fs::read_dir(r.path("root/usr/bin"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .max_by_key(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .unwrap();
    let mut bytes = fs::read(&tool).unwrap();
    assert!(bytes.len() > 64 * 1024, "{} is too small", tool.display());
    for at in (0..bytes.len()).step_by(4096) {
        bytes[at] ^= 0x5a;
    }
    fs::write(&tool, &bytes).unwrap();
    fs::write(r.path("root/etc/agent.conf"), "model=qwen-1.5b-q5\n").unwrap();
    r.build("1.0.1", "rootfs-2.img", "release-2.kxb");
    let create = |extra: &[&str], out: &str| {
        let mut cmd = kernex_image();
        cmd.args([
            "bundle",
            "create",
            "--compatible",
            "qemu-aarch64",
            "--version",
            "1.0.1",
        ])
        .arg("--rootfs")
        .arg(r.path("rootfs-2.img"))
        .arg("--key")
        .arg(r.path("keys/signing.key"))
        .arg("--cert")
        .arg(r.path("keys/signing.crt"))
        .args(extra)
        .arg("--out")
        .arg(r.path(out));
        cmd
    };
    let release1 = r.path("release-1.kxb").display().to_string();
    let keyring = r.path("keys/ca.crt").display().to_string();
    run(&mut create(
        &["--patch-from", &release1, "--keyring", &keyring],
        "release-2p.kxb",
    ));
    let delta = |new: &str| {
        run_json(
            kernex_image()
                .args(["bundle", "delta", "--json"])
                .arg(r.path("release-1.kxb"))
                .arg(r.path(new)),
        )
    };
    let plain = delta("release-2.kxb");
    let patched = delta("release-2p.kxb");
    let image = &patched["images"][0];
    assert!(image["chunks-patched"].as_u64().unwrap() > 0, "{patched}");
    assert!(
        image["patch-table-bytes"].as_u64().unwrap() > 0,
        "{patched}"
    );
    let (p, q) = (
        plain["total-bytes"].as_u64().unwrap(),
        patched["total-bytes"].as_u64().unwrap(),
    );
    assert!(q * 3 < p, "with the patch {q} bytes, without {p}");
    // The bundle verifies (the patch table is checked too), lists the
    // patch, and unpacks with tar into the documented member.
    run(kernex_image()
        .args(["bundle", "verify", "--keyring"])
        .arg(r.path("keys/ca.crt"))
        .arg(r.path("release-2p.kxb")));
    let inspect = run(kernex_image()
        .args(["bundle", "inspect"])
        .arg(r.path("release-2p.kxb")));
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(text.contains("patch       from 1.0.0"), "{text}");
    let base = sha256_file(&r.path("rootfs-1.img"));
    let dir = r.unpack("release-2p.kxb");
    assert!(dir.join(format!("rootfs.from-{base}.kxp")).is_file());
    // A device on 1.0.1 (or anything else) gets nothing from it.
    let from_itself = run_json(
        kernex_image()
            .args(["bundle", "delta", "--json"])
            .arg(r.path("release-2.kxb"))
            .arg(r.path("release-2p.kxb")),
    );
    assert_eq!(from_itself["images"][0]["patch-table-bytes"], 0);

    // --patch-from needs a keyring; a base for other hardware is refused.
    let out = create(&["--patch-from", &release1], "never.kxb")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--keyring"));
    let out = r.create_cmd("raspberrypi4-64", "keys/signing.key");
    let mut out = out;
    let out = out
        .args(["--patch-from", &release1, "--keyring", &keyring])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("never used"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!r.path("never.kxb").exists());
}

#[test]
fn bad_input_fails_with_a_named_reason_and_exit_code_1() {
    let r = Release::new();
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../protocol/tests/golden");
    let cases = [
        ("truncated.kxb", "truncated"),
        ("tampered-manifest.kxb", "does not verify"),
        ("bitflip-chunk.kxb", "is corrupt"),
        ("unsigned.kxb", "not signed"),
        ("unknown-ca.kxb", "unable to get local issuer certificate"),
        ("expired-signer.kxb", "not valid at the verification time"),
        ("wrong-usage.kxb", "codeSigning"),
        ("unknown-field.kxb", "reboot-policy"),
        ("oversized-manifest.kxb", "more than the limit"),
    ];
    for (file, reason) in cases {
        let out = kernex_image()
            .args(["bundle", "verify", "--keyring"])
            .arg(golden.join("ca.crt"))
            .arg(golden.join(file))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {stderr}");
        assert!(
            stderr.contains(reason),
            "{file}: expected {reason:?} in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{file}: {stderr}");
    }
    // A key that does not belong to the certificate.
    let out = r
        .create_cmd("qemu-aarch64", "keys/ca.key")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not belong to the certificate"));
    assert!(!r.path("never.kxb").exists());
    // Keys are not overwritten by accident.
    let out = kernex_image()
        .args(["keys", "create", "--out"])
        .arg(r.path("keys"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    // A bad compatible string.
    let out = r
        .create_cmd("Bad Board!", "keys/signing.key")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("compatible"));
}

/// `bundle create --health`: the spec lands in the signed manifest, where
/// the device's watchdog reads it; a bad spec stops the build with the
/// field it names, and no bundle is written.
#[test]
fn health_spec_lands_in_the_signed_manifest() {
    let r = Release::new();
    fs::write(
        r.path("health.toml"),
        r#"deadline = 300
stability-window = 60
max-revert-reboots = 2

[[checks]]
type = "http"
url = "http://127.0.0.1:8080/health"
status = 200
body-contains = "ok"

[[checks]]
type = "llm"
model = "/opt/agent/model.gguf"
prompt = "The capital of France is"
tokens = 8
min-tokens-per-second = 5
max-rss = 1073741824
expect = "Paris"
"#,
    )
    .unwrap();
    let created = run_json(
        r.create_cmd("qemu-aarch64", "keys/signing.key")
            .arg("--health")
            .arg(r.path("health.toml"))
            .arg("--json"),
    );
    assert_eq!(created["manifest"]["health"]["deadline"], 300);
    let inspect = run_json(
        kernex_image()
            .args(["bundle", "inspect", "--json"])
            .arg(r.path("never.kxb")),
    );
    let health = &inspect["manifest"]["health"];
    assert_eq!(health["stability-window"], 60);
    assert_eq!(health["max-revert-reboots"], 2);
    assert_eq!(health["checks"][0]["type"], "http");
    assert_eq!(health["checks"][0]["body-contains"], "ok");
    assert_eq!(health["checks"][1]["type"], "llm");
    assert_eq!(health["checks"][1]["tokens"], 8);
    assert_eq!(health["checks"][1]["max-rss"], 1073741824u64);
    assert_eq!(health["checks"][1]["expect"], "Paris");
    // It is in the manifest the signature covers.
    let verify = run_json(
        kernex_image()
            .args(["bundle", "verify", "--json", "--keyring"])
            .arg(r.path("keys/ca.crt"))
            .arg(r.path("never.kxb")),
    );
    assert_eq!(verify["verified"], true);
    let manifest: Value =
        serde_json::from_slice(&fs::read(r.unpack("never.kxb").join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["health"], *health);
    let human = run(kernex_image()
        .args(["bundle", "inspect"])
        .arg(r.path("never.kxb")));
    assert!(
        String::from_utf8_lossy(&human.stdout)
            .contains("health:       2 checks (http, llm), deadline 300 s, stability window 60 s"),
        "{}",
        String::from_utf8_lossy(&human.stdout)
    );
    // The same spec as JSON.
    fs::write(r.path("health.json"), serde_json::to_vec(&health).unwrap()).unwrap();
    fs::remove_file(r.path("never.kxb")).unwrap();
    let created = run_json(
        r.create_cmd("qemu-aarch64", "keys/signing.key")
            .arg("--health")
            .arg(r.path("health.json"))
            .arg("--json"),
    );
    assert_eq!(created["manifest"]["health"], *health);
    fs::remove_file(r.path("never.kxb")).unwrap();

    // Bad specs: the reason names the field; nothing is written.
    let cases = [
        (
            "unknown-key.toml",
            "deadline = 10\nretries = 3\n",
            "retries",
        ),
        (
            "zero-tokens.toml",
            "[[checks]]\ntype = \"llm\"\nmodel = \"m.gguf\"\nprompt = \"hi\"\ntokens = 0\nmin-tokens-per-second = 1\nmax-rss = 1\n",
            "health.checks[0].tokens",
        ),
        ("zero-deadline.toml", "deadline = 0\n", "health.deadline"),
        ("not-toml.toml", "deadline = = 3\n", "invalid health spec"),
        ("missing.toml", "", "unable to read health spec"),
    ];
    for (file, text, reason) in cases {
        if !text.is_empty() {
            fs::write(r.path(file), text).unwrap();
        }
        let out = r
            .create_cmd("qemu-aarch64", "keys/signing.key")
            .arg("--health")
            .arg(r.path(file))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {stderr}");
        assert!(
            stderr.contains(reason),
            "{file}: expected {reason:?} in {stderr}"
        );
        assert!(!r.path("never.kxb").exists(), "{file}");
    }
}

#[test]
fn private_keys_are_not_world_readable() {
    use std::os::unix::fs::PermissionsExt;
    let r = Release::new();
    for key in ["ca.key", "signing.key"] {
        let mode = fs::metadata(r.path("keys").join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{key} has mode {mode:o}");
    }
}

#[test]
fn help_reads_like_a_man_page() {
    let out = run(kernex_image().arg("--help"));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in ["EXAMPLES:", "EXIT STATUS:", "bundle create", "keys create"] {
        assert!(text.contains(needle), "--help lacks {needle:?}");
    }
    for sub in [
        &["bundle", "create", "--help"][..],
        &["bundle", "verify", "--help"],
        &["rootfs", "--help"],
        &["keys", "create", "--help"],
    ] {
        let out = run(kernex_image().args(sub));
        assert!(out.stdout.len() > 400, "{sub:?} help is too thin");
    }
}
