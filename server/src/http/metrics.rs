//! Prometheus metrics at `/metrics`: request counts and latency per route
//! and status, the poll cache's hits and misses, and what the server
//! refused to protect itself (`service::refusals`). With `metrics-token`
//! set, only `Authorization: Bearer <token>` reads them.

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::AppState;
use crate::service::refusals::Refusals;

/// The route a request matched (`unmatched` when none): the router's own
/// shared string, so labelling a request allocates nothing.
#[derive(Debug, Clone)]
struct Route(Option<MatchedPath>);

impl Route {
    fn as_str(&self) -> &str {
        self.0.as_ref().map_or("unmatched", MatchedPath::as_str)
    }
}

impl PartialEq for Route {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Route {}

impl std::hash::Hash for Route {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

/// The methods labelled by name; any other (a client can send any token
/// as a method) is `other`, so that clients cannot add series.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// `method`, `route` and, for the request counter, `status`. Every label
/// has a bounded set of values: known methods or `other`, the router's
/// routes or `unmatched`, status codes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Labels {
    method: &'static str,
    route: Route,
    status: Option<u16>,
}

impl EncodeLabelSet for Labels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> std::fmt::Result {
        ("method", self.method).encode(encoder.encode_label())?;
        ("route", self.route.as_str()).encode(encoder.encode_label())?;
        if let Some(status) = self.status {
            ("status", status).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// The registry and the request metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
    /// Polls answered from the poll cache.
    pub poll_cache_hits: Counter,
    /// Polls that read the store.
    pub poll_cache_misses: Counter,
    /// What the server refused to protect itself (throttles, caps).
    pub refusals: Refusals,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers the metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kernex");
        let requests = Family::<Labels, Counter>::default();
        let latency = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register("http_requests", "HTTP requests handled", requests.clone());
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency",
            latency.clone(),
        );
        let poll_cache_hits = Counter::default();
        let poll_cache_misses = Counter::default();
        registry.register(
            "poll_cache_hits",
            "Device polls answered from the poll cache",
            poll_cache_hits.clone(),
        );
        registry.register(
            "poll_cache_misses",
            "Device polls that read the store",
            poll_cache_misses.clone(),
        );
        let refusals = Refusals::default();
        refusals.register(&mut registry);
        Metrics {
            registry,
            refusals,
            requests,
            latency,
            poll_cache_hits,
            poll_cache_misses,
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Middleware: counts and times every request by matched route.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let mut labels = Labels {
        method: method_label(req.method()),
        route: Route(req.extensions().get::<MatchedPath>().cloned()),
        status: None,
    };
    let start = Instant::now();
    let response = next.run(req).await;
    let elapsed = start.elapsed().as_secs_f64();
    state
        .metrics
        .latency
        .get_or_create(&labels)
        .observe(elapsed);
    labels.status = Some(response.status().as_u16());
    state.metrics.requests.get_or_create(&labels).inc();
    response
}

/// Routes.
pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

async fn metrics(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    if let Some(token) = &state.config.metrics_token {
        let sent = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        let ok = sent.is_some_and(|t| {
            openssl::memcmp::eq(
                crate::store::secret_hash(t).as_bytes(),
                crate::store::secret_hash(token).as_bytes(),
            )
        });
        if !ok {
            return crate::http::Error::Unauthorized.into_response();
        }
    }
    let mut r = state.metrics.render().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}
