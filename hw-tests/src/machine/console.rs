//! Console plumbing: logs, reader threads, serial devices, power commands.

use super::*;

/// Opens `log` for appending and writes a `===== kernex-hw-tests: WHAT =====` line.
pub(super) fn open_log(log: &Path, what: &str) -> Result<std::fs::File> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let _ = writeln!(f, "\n===== kernex-hw-tests: {what} =====");
    Ok(f)
}

/// Copies what `stream` yields into the console buffer and the log until
/// it ends or `stop` is set. A serial device is read with a 0.5 s timeout
/// (`stty … min 0 time 5`), so a read of 0 bytes there is not the end.
pub(super) fn spawn_reader(
    mut stream: Box<dyn Read + Send>,
    console: &Arc<Mutex<Vec<u8>>>,
    mut logf: std::fs::File,
    stop: Arc<AtomicBool>,
    is_tty: bool,
) {
    let console = Arc::clone(console);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            match stream.read(&mut buf) {
                Ok(0) if is_tty => continue,
                Ok(0) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
                Ok(n) => {
                    let _ = logf.write_all(&buf[..n]);
                    if let Ok(mut c) = console.lock() {
                        c.extend_from_slice(&buf[..n]);
                    }
                }
            }
        }
    });
}

/// Runs a lab power command (`sh -c`); its output goes to the console log.
pub(super) fn run_power(command: &str, what: &str, log: &Path) -> Result<()> {
    let mut logf = open_log(log, &format!("{what}: {command}"))?;
    let out = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run the {what} command {command:?}"))?;
    let _ = logf.write_all(&out.stdout);
    let _ = logf.write_all(&out.stderr);
    if !out.status.success() {
        bail!(
            "the {what} command {command:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A serial device opened for reading and writing, then set (on that open
/// file: `stty` with it as stdin, so no second open and close can hang
/// up a pty) to 115200 8N1, raw, no echo, no flow control, reads returning
/// after 0.5 s without data.
pub(super) fn open_serial(dev: &Path) -> Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .with_context(|| format!("open the serial console {}", dev.display()))?;
    crate::run(
        Command::new("stty")
            .args([
                "115200", "cs8", "-cstopb", "-parenb", "raw", "-echo", "-crtscts", "clocal", "min",
                "0", "time", "5",
            ])
            .stdin(Stdio::from(f.try_clone()?)),
    )
    .with_context(|| format!("set up the serial console {}", dev.display()))?;
    Ok(f)
}

/// Waits (60 s) for a console that appears with the power (a QEMU lab
/// board's socket, a USB-serial adapter powered by the board) and attaches
/// to it.
#[allow(clippy::type_complexity)]
pub(super) fn attach_console(
    path: &Path,
) -> Result<(Box<dyn Read + Send>, Box<dyn Write + Send>, bool)> {
    let started = Instant::now();
    loop {
        let last_error = match std::fs::metadata(path) {
            Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
                Ok(s) => return Ok((Box::new(s.try_clone()?), Box::new(s), false)),
                Err(e) => format!("connect: {e}"),
            },
            Ok(_) => {
                let f = open_serial(path)?;
                return Ok((Box::new(f.try_clone()?), Box::new(f), true));
            }
            Err(e) => e.to_string(),
        };
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "the console {} is not there 60 s after the power-on command: {last_error}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(super) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

pub(super) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
