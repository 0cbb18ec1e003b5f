//! The address a request came from: the TCP peer of the connection (plain
//! or TLS), which `kernex-server` records for every connection
//! (`axum::serve` with connect info). Behind a reverse proxy it is the
//! proxy's address. The enrollment rate limit per source address reads it.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};

use axum::Router;
use axum::extract::FromRequestParts;
use axum::extract::connect_info::{ConnectInfo, Connected, IntoMakeServiceWithConnectInfo};
use axum::http::request::Parts;
use axum::serve::IncomingStream;
use tokio::net::TcpListener;

use crate::tls::TlsListener;

/// `app` as `axum::serve` takes it, recording each connection's [`Peer`].
pub fn make_service(app: Router) -> IntoMakeServiceWithConnectInfo<Router, Peer> {
    app.into_make_service_with_connect_info::<Peer>()
}

/// The TCP peer of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub SocketAddr);

impl Connected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// The source address of a request; none when the router is called
/// without a connection (tests with `oneshot`, unless they set
/// `ConnectInfo<SocketAddr>`).
#[derive(Debug, Clone, Copy)]
pub struct Source(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Source {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let ext = &parts.extensions;
        let addr = ext
            .get::<ConnectInfo<Peer>>()
            .map(|c| c.0.0)
            .or_else(|| ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0));
        Ok(Source(addr.map(|a| a.ip())))
    }
}
