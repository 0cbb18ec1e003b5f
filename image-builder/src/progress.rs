//! Progress of long steps: a bar on a terminal's stderr, or JSON lines on
//! stderr (`--json`, so stdout keeps the one JSON report), or nothing.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// A byte-count progress bar, hidden when stderr is not a terminal or when
/// `quiet` is set (e.g. with `--json`).
pub fn bytes(total: u64, message: &str, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message.to_string());
    bar
}

/// How a long job reports its steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Nothing.
    #[default]
    Off,
    /// Bars on stderr when it is a terminal (bytes or items, rate, ETA).
    Bar,
    /// One JSON object per line on stderr ([`Event`]), at most
    /// [`JSON_EVERY`] apart per step and once when a step ends.
    Json,
}

/// Shortest time between two JSON progress lines of one step.
pub const JSON_EVERY: Duration = Duration::from_millis(500);

/// What a step counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unit {
    /// Bytes.
    Bytes,
    /// Chunks.
    Chunks,
}

/// One JSON progress line.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Event<'a> {
    /// Always "progress".
    pub event: &'static str,
    /// The step ("rootfs", "rootfs from 1.1.0", ...).
    pub step: &'a str,
    /// What `done` and `total` count.
    pub unit: Unit,
    /// Done so far.
    pub done: u64,
    /// To do in all (0: not known yet).
    pub total: u64,
    /// Units per second since the step started.
    pub rate: f64,
    /// Seconds left at that rate (absent when unknown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    /// Seconds since the step started.
    pub elapsed_seconds: f64,
    /// True on the step's last line.
    pub finished: bool,
}

struct JsonState {
    step: String,
    unit: Unit,
    started: Instant,
    last: Option<Instant>,
    done: u64,
    total: u64,
}

/// One step's progress, reported the way its [`Mode`] says.
pub struct Step {
    bar: ProgressBar,
    json: Option<Mutex<JsonState>>,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step")
            .field("json", &self.json.is_some())
            .finish()
    }
}

impl Step {
    /// A step of `total` units (0 when not known yet) named `step`.
    pub fn new(mode: Mode, unit: Unit, total: u64, step: &str) -> Self {
        let bar = match (mode, unit) {
            (Mode::Bar, Unit::Bytes) => bytes(total, step, false),
            (Mode::Bar, Unit::Chunks) if std::io::stderr().is_terminal() => {
                let bar = ProgressBar::new(total);
                if let Ok(style) = ProgressStyle::with_template(
                    "{msg:>12} [{bar:30}] {pos}/{len} chunks {per_sec} eta {eta}",
                ) {
                    bar.set_style(style.progress_chars("=> "));
                }
                bar.set_message(step.to_string());
                bar
            }
            _ => ProgressBar::hidden(),
        };
        let json = (mode == Mode::Json).then(|| {
            Mutex::new(JsonState {
                step: step.to_string(),
                unit,
                started: Instant::now(),
                last: None,
                done: 0,
                total,
            })
        });
        Step { bar, json }
    }

    /// Sets the total (when it is learnt late).
    pub fn set_length(&self, total: u64) {
        self.bar.set_length(total);
        if let Some(state) = &self.json
            && let Ok(mut s) = state.lock()
        {
            s.total = total;
        }
    }

    /// Sets what is done so far.
    pub fn set_position(&self, done: u64) {
        self.bar.set_position(done);
        if let Some(state) = &self.json
            && let Ok(mut s) = state.lock()
        {
            s.done = done;
            let now = Instant::now();
            if s.last.is_none_or(|last| now - last >= JSON_EVERY) {
                s.last = Some(now);
                emit(&s, false);
            }
        }
    }

    /// Ends the step: clears the bar, writes the last JSON line.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
        if let Some(state) = &self.json
            && let Ok(s) = state.lock()
        {
            emit(&s, true);
        }
    }
}

fn emit(s: &JsonState, finished: bool) {
    let elapsed = s.started.elapsed().as_secs_f64();
    let rate = if elapsed > 0.0 {
        s.done as f64 / elapsed
    } else {
        0.0
    };
    let eta_seconds =
        (rate > 0.0 && s.total >= s.done && s.total > 0).then(|| (s.total - s.done) as f64 / rate);
    let event = Event {
        event: "progress",
        step: &s.step,
        unit: s.unit,
        done: s.done,
        total: s.total,
        rate: (rate * 10.0).round() / 10.0,
        eta_seconds: eta_seconds.map(|e| (e * 10.0).round() / 10.0),
        elapsed_seconds: (elapsed * 1000.0).round() / 1000.0,
        finished,
    };
    if let Ok(line) = serde_json::to_string(&event) {
        // Progress is best effort: a closed stderr does not fail the job.
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialise_as_one_kebab_case_line() {
        let e = Event {
            event: "progress",
            step: "rootfs",
            unit: Unit::Bytes,
            done: 10,
            total: 40,
            rate: 5.0,
            eta_seconds: Some(6.0),
            elapsed_seconds: 2.0,
            finished: false,
        };
        let line = serde_json::to_string(&e).unwrap();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["unit"], "bytes");
        assert_eq!(v["eta-seconds"], 6.0);
        assert_eq!(v["done"], 10);
    }
}
