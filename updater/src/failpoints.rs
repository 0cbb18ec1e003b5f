//! Test hooks, compiled in only with the `failpoints` cargo feature, which
//! only tests turn on (the updater's dev-dependency on itself, hw-tests'
//! guest build). A build without it, as shipped, has no hook: the
//! [`failpoint!`] macro expands to nothing and this module is empty
//! (`tests/footprint.rs` checks that the hooks' names are not in the
//! binary).
//!
//! Two hooks, both driven by the environment of the process under test:
//!
//! * `KERNEX_TEST_PAUSE_AT=<step>[:N]`: at the N-th (default first) pass
//!   of a pause point named `step`, the process stops itself (SIGSTOP), so a
//!   power-cut test can SIGKILL it exactly there. Pause points: `verify`
//!   (every chunk written and journaled, the slot check next),
//!   `slot-record`, `env-write`, and `journal-write` (half a batch of
//!   journal records and a torn one on disk); and in raising the
//!   anti-rollback floor (`crate::floor`): `floor-raise` (the slot is
//!   committed, neither copy written), `floor-copy-a` (copy A new, copy B
//!   old), `floor-copy-b` (both new).
//! * `KERNEX_HEALTH_CRASH_AFTER=<step>`: the process aborts right after
//!   the crash point `step` (`mark-good`: the watchdog committed the slot,
//!   its record is not written yet).

/// A test hook (see the module docs); nothing without the `failpoints`
/// feature.
///
/// * `failpoint!(pause "step")`: stop here if `KERNEX_TEST_PAUSE_AT` asks.
/// * `failpoint!(pause "step" => { ... })`: run the block (which stops the
///   process itself) if `KERNEX_TEST_PAUSE_AT` asks.
/// * `failpoint!(crash "step")`: abort here if `KERNEX_HEALTH_CRASH_AFTER`
///   asks.
macro_rules! failpoint {
    (pause $step:literal) => {
        #[cfg(feature = "failpoints")]
        {
            if $crate::failpoints::pause_requested($step) {
                $crate::failpoints::stop_self();
            }
        }
    };
    (pause $step:literal => $hook:block) => {
        #[cfg(feature = "failpoints")]
        {
            if $crate::failpoints::pause_requested($step) $hook
        }
    };
    (crash $step:literal) => {
        #[cfg(feature = "failpoints")]
        {
            if $crate::failpoints::crash_requested($step) {
                std::process::abort();
            }
        }
    };
}
pub(crate) use failpoint;

/// Whether `KERNEX_TEST_PAUSE_AT` names this pass of `step` (`step` for
/// its first pass, `step:N` for its N-th).
#[cfg(feature = "failpoints")]
pub(crate) fn pause_requested(step: &str) -> bool {
    use std::sync::atomic::{AtomicU32, Ordering};
    static HITS: AtomicU32 = AtomicU32::new(0);
    let Ok(want) = std::env::var("KERNEX_TEST_PAUSE_AT") else {
        return false;
    };
    let (name, nth) = match want.split_once(':') {
        Some((name, n)) => (name, n.parse().unwrap_or(1)),
        None => (want.as_str(), 1),
    };
    name == step && HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth
}

/// Stops this process (SIGSTOP, through `kill`, as the crate has no
/// unsafe code); carries on if it is continued instead.
#[cfg(feature = "failpoints")]
pub(crate) fn stop_self() {
    tracing::warn!("KERNEX_TEST_PAUSE_AT: stopping");
    // Sent to this thread's id: the kernel then wakes this thread to take
    // the stop, which stops every thread. Sent to the process id, it may
    // go to a thread busy in a long syscall (an `fdatasync` on the
    // install's own thread) while this one runs on past the pause point.
    let id = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| std::process::id().to_string());
    if let Err(e) = std::process::Command::new("kill")
        .args(["-STOP", &id])
        .status()
    {
        tracing::warn!("unable to stop: {e}");
    }
    // Whichever thread takes the stop, this one stops with the others
    // before it goes on (it goes on only if the process is continued).
    std::thread::sleep(std::time::Duration::from_millis(200));
}

/// Whether `KERNEX_HEALTH_CRASH_AFTER` names `step`.
#[cfg(feature = "failpoints")]
pub(crate) fn crash_requested(step: &str) -> bool {
    std::env::var("KERNEX_HEALTH_CRASH_AFTER").as_deref() == Ok(step)
}
