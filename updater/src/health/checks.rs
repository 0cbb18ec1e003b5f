//! The health checks, each polled by the watchdog loop.

use std::collections::VecDeque;
use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kernex_protocol::manifest::{HealthCheck, ServiceMode};

/// What one poll of a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Healthy now.
    Pass,
    /// Not healthy yet (retried until the deadline); names why.
    Fail(String),
    /// Will not get healthy: revert now; names why.
    Terminal(String),
}

/// Seconds between two runs of a check that is polled (`http`, `command`,
/// `disk`, `memory`, systemd `service`).
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Longest supervise-mode restart delay.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest HTTP body read for `body-contains`.
const MAX_BODY: u64 = 1024 * 1024;

/// A check plus its running state.
#[derive(Debug)]
pub struct Probe {
    check: HealthCheck,
    last: Option<(Instant, Verdict)>,
    supervised: Option<Supervised>,
    /// Systemd mode: (when, NRestarts) samples.
    restarts_seen: VecDeque<(Instant, u64)>,
    /// Systemd mode: the `systemctl` to ask (program and arguments).
    systemctl: Vec<String>,
}

/// A process the watchdog runs itself (supervise mode).
#[derive(Debug)]
struct Supervised {
    child: Option<Child>,
    /// When each restart happened.
    restarts: VecDeque<Instant>,
    /// When the next start is due, while waiting out the backoff.
    restart_at: Option<Instant>,
    backoff: Duration,
}

impl Probe {
    /// A probe for `check`; nothing starts before the first poll.
    pub fn new(check: &HealthCheck) -> Self {
        Self {
            check: check.clone(),
            last: None,
            supervised: None,
            restarts_seen: VecDeque::new(),
            systemctl: vec![super::DEFAULT_SYSTEMCTL.to_owned()],
        }
    }

    /// Systemd mode asks `argv` (e.g. `systemctl --user`) instead of
    /// `systemctl`; an empty `argv` keeps `systemctl`.
    pub fn with_systemctl(mut self, argv: &[String]) -> Self {
        if !argv.is_empty() {
            self.systemctl = argv.to_vec();
        }
        self
    }

    /// Polls the check; blocking checks are bounded by their timeout and by
    /// `deadline`.
    pub fn poll(&mut self, deadline: Instant) -> Verdict {
        let check = self.check.clone();
        match &check {
            HealthCheck::Service {
                name,
                mode: ServiceMode::Supervise,
                command,
                max_restarts,
                window,
                backoff_ms,
            } => self.poll_supervised(
                name,
                command,
                max_restarts.unwrap_or(3),
                Duration::from_secs(window.unwrap_or(300)),
                Duration::from_millis(backoff_ms.unwrap_or(1000)),
            ),
            HealthCheck::Llm { .. } => {
                // A smoke test: run once; a pass stays, a failure is final.
                if let Some((_, v)) = &self.last {
                    return v.clone();
                }
                let v = run_llm(&check);
                self.last = Some((Instant::now(), v.clone()));
                v
            }
            _ => {
                if let Some((at, v)) = &self.last
                    && at.elapsed() < POLL_INTERVAL
                {
                    return v.clone();
                }
                let v = match &check {
                    HealthCheck::Service {
                        name,
                        max_restarts,
                        window,
                        ..
                    } => self.poll_systemd(
                        name,
                        max_restarts.unwrap_or(3),
                        Duration::from_secs(window.unwrap_or(300)),
                    ),
                    HealthCheck::Http {
                        url,
                        status,
                        body_contains,
                        timeout,
                    } => http(
                        url,
                        status.unwrap_or(200),
                        body_contains.as_deref(),
                        bounded(timeout.unwrap_or(5), deadline),
                    ),
                    HealthCheck::Command { command, timeout } => {
                        run_command(command, bounded(timeout.unwrap_or(10), deadline))
                    }
                    HealthCheck::Disk { path, min_free } => disk(Path::new(path), *min_free),
                    HealthCheck::Memory { min_available } => memory(*min_available),
                    HealthCheck::Llm { .. } => Verdict::Fail("unreachable".into()),
                };
                self.last = Some((Instant::now(), v.clone()));
                v
            }
        }
    }

    fn poll_supervised(
        &mut self,
        name: &str,
        command: &[String],
        max_restarts: u32,
        window: Duration,
        first_backoff: Duration,
    ) -> Verdict {
        let sup = self.supervised.get_or_insert_with(|| Supervised {
            child: None,
            restarts: VecDeque::new(),
            restart_at: Some(Instant::now()),
            backoff: first_backoff,
        });
        let now = Instant::now();
        if let Some(child) = &mut sup.child {
            match child.try_wait() {
                Ok(None) => return Verdict::Pass,
                Ok(Some(status)) => {
                    sup.child = None;
                    while sup
                        .restarts
                        .front()
                        .is_some_and(|t| now.duration_since(*t) > window)
                    {
                        sup.restarts.pop_front();
                    }
                    if sup.restarts.len() as u32 >= max_restarts {
                        let span = sup
                            .restarts
                            .front()
                            .map(|t| now.duration_since(*t).as_secs_f64())
                            .unwrap_or(0.0);
                        return Verdict::Terminal(format!(
                            "service {name} restarted {} times in {span:.0} s and exited again ({})",
                            sup.restarts.len(),
                            exit_text(status)
                        ));
                    }
                    sup.restart_at = Some(now + sup.backoff);
                    let reason = format!(
                        "service {name} exited ({}); restarting in {} ms",
                        exit_text(status),
                        sup.backoff.as_millis()
                    );
                    sup.backoff = (sup.backoff * 2).min(MAX_BACKOFF);
                    tracing::warn!("{reason}");
                    return Verdict::Fail(reason);
                }
                Err(e) => return Verdict::Terminal(format!("service {name}: wait failed: {e}")),
            }
        }
        match sup.restart_at {
            Some(at) if now >= at => {
                let first = sup.restarts.is_empty() && sup.backoff == first_backoff;
                let Some((program, args)) = command.split_first() else {
                    return Verdict::Terminal(format!("service {name}: no command"));
                };
                match Command::new(program)
                    .args(args)
                    .stdin(Stdio::null())
                    .process_group(0)
                    .spawn()
                {
                    Ok(child) => {
                        if !first {
                            sup.restarts.push_back(now);
                        }
                        sup.child = Some(child);
                        sup.restart_at = None;
                        Verdict::Pass
                    }
                    Err(e) => {
                        Verdict::Terminal(format!("service {name}: unable to start {program}: {e}"))
                    }
                }
            }
            _ => Verdict::Fail(format!("service {name} is waiting to restart")),
        }
    }

    fn poll_systemd(&mut self, unit: &str, max_restarts: u32, window: Duration) -> Verdict {
        let shown = self.systemctl.join(" ");
        let Some((program, args)) = self.systemctl.split_first() else {
            return Verdict::Terminal(format!("service {unit}: no systemctl command"));
        };
        let out = match Command::new(program)
            .args(args)
            .args([
                "show",
                "--property=ActiveState",
                "--property=NRestarts",
                "--",
                unit,
            ])
            .stdin(Stdio::null())
            .output()
        {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
            Ok(o) => {
                let stderr = String::from_utf8_lossy(&o.stderr);
                return Verdict::Fail(format!(
                    "service {unit}: `{shown} show` failed ({}): {}",
                    exit_text(o.status),
                    stderr.lines().next().unwrap_or("no message").trim()
                ));
            }
            Err(e) => {
                return Verdict::Fail(format!("service {unit}: unable to run {program}: {e}"));
            }
        };
        let value = |key: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::trim)
                .unwrap_or("")
                .to_owned()
        };
        let active = value("ActiveState");
        let now = Instant::now();
        if let Ok(n) = value("NRestarts").parse::<u64>() {
            self.restarts_seen.push_back((now, n));
            while self
                .restarts_seen
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > window)
            {
                self.restarts_seen.pop_front();
            }
            if let Some((t0, n0)) = self.restarts_seen.front()
                && n.saturating_sub(*n0) >= u64::from(max_restarts)
            {
                return Verdict::Terminal(format!(
                    "service {unit} restarted {} times in {:.0} s",
                    n - n0,
                    now.duration_since(*t0).as_secs_f64()
                ));
            }
        }
        if active == "active" {
            Verdict::Pass
        } else {
            Verdict::Fail(format!("service {unit} is {active:?}, not active"))
        }
    }

    /// Stops what the probe started (supervised processes, their group).
    pub fn stop(&mut self) {
        if let Some(sup) = &mut self.supervised
            && let Some(mut child) = sup.child.take()
        {
            let group = format!("-{}", child.id());
            let _ = Command::new("kill")
                .args(["-KILL", "--", &group])
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn exit_text(status: ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exit status {code}"),
        None => status.to_string(),
    }
}

fn bounded(timeout_s: u64, deadline: Instant) -> Duration {
    Duration::from_secs(timeout_s)
        .min(deadline.saturating_duration_since(Instant::now()))
        .max(Duration::from_millis(100))
}

fn http(url: &str, want: u16, body_contains: Option<&str>, timeout: Duration) -> Verdict {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = match agent.get(url).call() {
        Ok(r) => r,
        Err(e) => return Verdict::Fail(format!("http {url}: {e}")),
    };
    let status = response.status().as_u16();
    if status != want {
        return Verdict::Fail(format!("http {url}: status {status}, expected {want}"));
    }
    if let Some(needle) = body_contains {
        let mut body = Vec::new();
        if let Err(e) = response
            .body_mut()
            .as_reader()
            .take(MAX_BODY)
            .read_to_end(&mut body)
        {
            return Verdict::Fail(format!("http {url}: reading the body: {e}"));
        }
        if !String::from_utf8_lossy(&body).contains(needle) {
            return Verdict::Fail(format!("http {url}: body does not contain {needle:?}"));
        }
    }
    Verdict::Pass
}

fn run_command(argv: &[String], timeout: Duration) -> Verdict {
    let shown = argv.join(" ");
    let Some((program, args)) = argv.split_first() else {
        return Verdict::Terminal("command: empty".into());
    };
    let mut child = match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Verdict::Fail(format!("command `{shown}`: unable to start: {e}")),
    };
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Verdict::Pass,
            Ok(Some(status)) => {
                return Verdict::Fail(format!("command `{shown}` failed ({})", exit_text(status)));
            }
            Ok(None) if started.elapsed() >= timeout => {
                let group = format!("-{}", child.id());
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &group])
                    .stderr(Stdio::null())
                    .status();
                let _ = child.kill();
                let _ = child.wait();
                return Verdict::Fail(format!(
                    "command `{shown}` did not exit within {:.1} s (killed)",
                    timeout.as_secs_f64()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Verdict::Fail(format!("command `{shown}`: wait failed: {e}")),
        }
    }
}

fn disk(path: &Path, min_free: u64) -> Verdict {
    let disks = sysinfo::Disks::new_with_refreshed_list();
    let Some(d) = disks
        .list()
        .iter()
        .filter(|d| path.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
    else {
        return Verdict::Fail(format!(
            "disk {}: no mounted filesystem holds it",
            path.display()
        ));
    };
    let free = d.available_space();
    if free >= min_free {
        Verdict::Pass
    } else {
        Verdict::Fail(format!(
            "disk {}: {free} bytes free on {}, need {min_free}",
            path.display(),
            d.mount_point().display()
        ))
    }
}

fn memory(min_available: u64) -> Verdict {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    let available = sys.available_memory();
    if available >= min_available {
        Verdict::Pass
    } else {
        Verdict::Fail(format!(
            "memory: {available} bytes available, need {min_available}"
        ))
    }
}

#[cfg(feature = "llm")]
fn run_llm(check: &HealthCheck) -> Verdict {
    match super::llm::check(check) {
        Ok(report) => {
            tracing::info!(%report, "llm check passed");
            Verdict::Pass
        }
        Err(e) => Verdict::Terminal(e.to_string()),
    }
}

#[cfg(not(feature = "llm"))]
fn run_llm(check: &HealthCheck) -> Verdict {
    let model = match check {
        HealthCheck::Llm { model, .. } => model.as_str(),
        _ => "",
    };
    Verdict::Terminal(format!(
        "llm {model}: this kernex-updater was built without the `llm` feature"
    ))
}
