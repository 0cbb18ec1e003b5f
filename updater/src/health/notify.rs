//! Keeping watchdogs fed while the checks run: a hardware watchdog device
//! (`/dev/watchdog`) and systemd's `sd_notify` datagram protocol
//! (`READY=1`, `WATCHDOG=1`, `STATUS=...` to `$NOTIFY_SOCKET`), spoken
//! directly over a Unix datagram socket.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{UpdateError, io_err};

/// Sends one `sd_notify` message if `NOTIFY_SOCKET` is set (`@name` is an
/// abstract socket). Errors are logged, never fatal: the watchdog works
/// without systemd.
pub fn sd_notify(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = PathBuf::from(path);
    let result = (|| -> std::io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        // Never block on a full receiver (systemd uses MSG_DONTWAIT too).
        socket.set_nonblocking(true)?;
        let bytes = path.as_os_str().as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            socket.send_to_addr(message.as_bytes(), &SocketAddr::from_abstract_name(name)?)?;
        } else {
            socket.send_to(message.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(socket = %path.display(), error = %e, "sd_notify failed");
    }
}

/// Feeds the hardware watchdog and sends `WATCHDOG=1` every interval from
/// its own thread (a check may block for its whole timeout), until stopped
/// or until `until` — after that a hung run lets the hardware reset the
/// device, and the bootloader's counter takes over.
#[derive(Debug)]
pub struct Feeder {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Feeder {
    /// Opens `device` (if any), sends `READY=1` and starts feeding.
    pub fn start(
        device: Option<PathBuf>,
        interval: Duration,
        until: Instant,
    ) -> Result<Self, UpdateError> {
        let mut dev: Option<(PathBuf, File)> = match device {
            Some(path) => {
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err("open watchdog device", &path))?;
                Some((path, file))
            }
            None => None,
        };
        sd_notify("READY=1\nSTATUS=running health checks");
        let (tx, rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            loop {
                if Instant::now() < until {
                    if let Some((path, file)) = &mut dev
                        && let Err(e) = file.write_all(b"k").and_then(|()| file.flush())
                    {
                        tracing::warn!(device = %path.display(), error = %e, "feeding the watchdog failed");
                    }
                    sd_notify("WATCHDOG=1");
                }
                match rx.recv_timeout(interval) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            // Magic close: the run ended on its own, disarm the device.
            if let Some((path, file)) = &mut dev
                && let Err(e) = file.write_all(b"V").and_then(|()| file.flush())
            {
                tracing::warn!(device = %path.display(), error = %e, "disarming the watchdog failed");
            }
        });
        Ok(Self {
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// Stops feeding and disarms the device (magic close `V`).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.shutdown();
    }
}
