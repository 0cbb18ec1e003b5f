//! The daemon ships its own log lines (info and above) to the server in
//! batches: a `tracing` layer keeps the newest lines in a bounded buffer
//! that the daemon drains into the outbox every cycle. Content of the
//! agent's conversations never goes here: only what the updater logs.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use kernex_protocol::api::{LogLevel, LogLine, MAX_LOG_MESSAGE};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;

/// Lines kept between two drains; older ones are dropped (and counted).
pub const MAX_BUFFERED_LINES: usize = 1000;
/// Longest line kept, bytes: what the server keeps of a line.
pub const MAX_LINE_BYTES: usize = MAX_LOG_MESSAGE;

#[derive(Debug, Default)]
struct Buffer {
    lines: Mutex<VecDeque<LogLine>>,
    enabled: AtomicBool,
    dropped: AtomicU64,
}

fn buffer() -> &'static Buffer {
    static BUFFER: OnceLock<Buffer> = OnceLock::new();
    BUFFER.get_or_init(Buffer::default)
}

/// Starts keeping lines (the daemon calls this; other commands never
/// drain, so they keep nothing).
pub fn enable() {
    buffer().enabled.store(true, Ordering::Relaxed);
}

/// Takes the buffered lines, oldest first, and how many were dropped
/// since the last drain.
pub fn drain() -> (Vec<LogLine>, u64) {
    let b = buffer();
    let lines = match b.lines.lock() {
        Ok(mut l) => l.drain(..).collect(),
        Err(poisoned) => poisoned.into_inner().drain(..).collect(),
    };
    (lines, b.dropped.swap(0, Ordering::Relaxed))
}

/// The layer to install next to the formatter.
#[derive(Debug, Default, Clone, Copy)]
pub struct ShipLayer;

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if self.0.len() > MAX_LINE_BYTES {
            return;
        }
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for ShipLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let b = buffer();
        if !b.enabled.load(Ordering::Relaxed) {
            return;
        }
        let level = match *event.metadata().level() {
            Level::ERROR => LogLevel::Error,
            Level::WARN => LogLevel::Warn,
            Level::INFO => LogLevel::Info,
            _ => return,
        };
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        let mut message = fields.0;
        if message.len() > MAX_LINE_BYTES {
            let mut cut = MAX_LINE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let mut lines = match b.lines.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        if lines.len() >= MAX_BUFFERED_LINES {
            lines.pop_front();
            b.dropped.fetch_add(1, Ordering::Relaxed);
        }
        lines.push_back(LogLine {
            level,
            message,
            at: Some(at),
        });
    }
}
