//! The connection loop: accepts TCP (and TLS) connections and serves HTTP/1
//! on them with the limits of `[limits]`:
//!
//! * `max-connections` connections at once: the loop accepts no more until
//!   one closes (further clients wait in the kernel's listen backlog);
//! * `max-connections-per-address` from one address: more are closed as
//!   soon as they are accepted (counted in `kernex_connections_refused`);
//! * `header-read-timeout-secs`: a request's header must be complete this
//!   long after the connection opened or the previous response went out,
//!   or the connection is closed (a half-sent request, slowloris; an idle
//!   keep-alive connection);
//! * `idle-timeout-secs`: a connection on which no byte moved for this long
//!   is closed (a stalled body, a client that stopped reading);
//! * a TLS handshake must finish within 10 s.
//!
//! Each request carries the peer's address (`ConnectInfo<SocketAddr>`),
//! for the per-address limits of the routes.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tower::Layer;

use crate::limits::Limits as LimitsConfig;

/// The client's address: the TCP peer the connection loop recorded
/// (`ConnectInfo`), or, when that peer is one of `trusted-proxies`, the
/// nearest `X-Forwarded-For` hop that is not. `None` for a request that
/// came through no socket (the router driven in-process).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<IpAddr>);

impl ClientAddr {
    /// The client of a request with these extensions and headers.
    pub fn of(
        extensions: &axum::http::Extensions,
        headers: &axum::http::HeaderMap,
        trusted_proxies: &[IpAddr],
    ) -> Self {
        let Some(peer) = extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
        else {
            return ClientAddr(None);
        };
        if !trusted_proxies.contains(&peer) {
            return ClientAddr(Some(peer));
        }
        // Right to left: each trusted proxy appended the address it saw.
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        for hop in hops.iter().rev() {
            match hop.parse::<IpAddr>() {
                Ok(ip) if trusted_proxies.contains(&ip) => continue,
                Ok(ip) => return ClientAddr(Some(ip)),
                // Garbage past the trusted proxies: the last proxy is the
                // best we know.
                Err(_) => break,
            }
        }
        ClientAddr(Some(peer))
    }
}

impl FromRequestParts<crate::AppState> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &crate::AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self::of(
            &parts.extensions,
            &parts.headers,
            &state.config.limits.trusted_proxies,
        ))
    }
}

/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for open connections to finish their requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The connection limits (from `[limits]`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time to receive a request header.
    pub header_read_timeout: Duration,
    /// Time without any byte read or written.
    pub idle_timeout: Duration,
    /// Connections at once.
    pub max_connections: usize,
    /// Connections at once from one address.
    pub max_per_address: usize,
    /// Counts connections closed for `max_per_address` (`From` makes a
    /// new one; [`Limits::counted_in`] takes the one `/metrics` shows).
    pub refused: Counter,
}

impl Limits {
    /// These limits, counting refusals in `refused` (the counter
    /// `/metrics` shows: `Metrics::refusals.connections`).
    pub fn counted_in(mut self, refused: &Counter) -> Self {
        self.refused = refused.clone();
        self
    }
}

impl From<&LimitsConfig> for Limits {
    fn from(c: &LimitsConfig) -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(c.header_read_timeout_secs.max(1)),
            idle_timeout: Duration::from_secs(c.idle_timeout_secs.max(1)),
            max_connections: c.max_connections.clamp(1, Semaphore::MAX_PERMITS),
            max_per_address: c.max_connections_per_address.max(1),
            refused: Counter::default(),
        }
    }
}

/// Open connections per address; an entry goes when its last connection
/// closes, so the table never holds more than the open connections.
#[derive(Debug, Default)]
struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

/// One connection's place in [`PerAddress`], given back when dropped.
#[derive(Debug)]
struct AddressSlot {
    table: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    fn enter(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut t = self.0.lock().ok()?;
        let n = t.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Ok(mut t) = self.table.0.lock()
            && let Some(n) = t.get_mut(&self.ip)
        {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.ip);
            }
        }
    }
}

/// Serves `app` on `listener` (over TLS with `tls`) within `limits` until
/// `shutdown` resolves; then stops accepting, lets open connections finish
/// their requests (at most 30 s) and returns.
pub async fn run(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let total = Arc::new(Semaphore::new(limits.max_connections));
    let per_address = Arc::new(PerAddress::default());
    let (stop, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = total.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(slot) = per_address.enter(peer.ip(), limits.max_per_address) else {
            tracing::info!(%peer, max = limits.max_per_address, "connection refused: too many from this address");
            limits.refused.inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let stopping = stopping.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let _held = (permit, slot);
            match tls {
                None => connection(stream, peer, app, limits, stopping).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => connection(tls, peer, app, limits, stopping).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = stop.send(true);
    // Every connection holds a permit: all of them back means all closed.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN_TIMEOUT, total.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("connections still open after 30 s: closing them");
    }
    Ok(())
}

/// Serves HTTP/1 on one connection.
async fn connection<I>(
    io: I,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    mut stopping: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let epoch = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let io = Watched {
        inner: io,
        epoch,
        activity: activity.clone(),
    };
    let service = TowerToHyperService::new(axum::Extension(ConnectInfo(peer)).layer(app));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended");
                }
                return;
            }
            _ = stopping.changed(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            () = idle(epoch, &activity, limits.idle_timeout) => {
                tracing::info!(%peer, secs = limits.idle_timeout.as_secs(), "connection idle: closed");
                return;
            }
        }
    }
}

/// Resolves once nothing moved on the connection for `limit`.
async fn idle(epoch: Instant, activity: &AtomicU64, limit: Duration) {
    loop {
        let last = epoch + Duration::from_millis(activity.load(Ordering::Relaxed));
        let deadline = last + limit;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// A connection's I/O that notes when a byte last moved.
struct Watched<I> {
    inner: I,
    epoch: Instant,
    activity: Arc<AtomicU64>,
}

impl<I> Watched<I> {
    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.activity.store(ms, Ordering::Relaxed);
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
