//! Power cuts at exact steps: the updater binary stops itself at a
//! failpoint (`KERNEX_TEST_PAUSE_AT`) and the test kills it there.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::Path;

/// Runs `kernex-updater --config CONFIG ARGS...` until it pauses at the
/// failpoint `step` (`KERNEX_TEST_PAUSE_AT`: it stops itself), then cuts
/// its power (`kill -9`). Panics if it exits first or is not stopped
/// within `secs`.
pub fn kill_at_pause(config: &Path, args: &[&str], step: &str, secs: u64) {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let mut child = Command::new(env!("CARGO_BIN_EXE_kernex-updater"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "error")
        .env("KERNEX_TEST_PAUSE_AT", step)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !is_stopped(child.id()) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{step}: the updater never reached the step ({status})");
        }
        assert!(Instant::now() < deadline, "{step}: not stopped in {secs} s");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

/// Whether process `pid` is stopped (state `T` in /proc).
fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st == "T"))
        })
        .unwrap_or(false)
}
