//! A server that holds under attack (issue 21): login throttling, the
//! per-address limit of the unauthenticated routes, bounded metrics labels,
//! early refusal of oversize bodies, heavy work kept from read-only users,
//! the counts of every refusal in `/metrics`, and the connection loop's
//! timeouts and caps (and the request timeout) on real sockets. On SQLite
//! and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use common::Harness;
use http_body_util::BodyExt;
use kernex_server::config::Config;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tower::ServiceExt;

const PASSWORD: &str = "correct horse battery";

/// A request as if from `ip` (the connection loop records the peer).
async fn from(
    h: &Harness,
    ip: [u8; 4],
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, HeaderMap, Value) {
    from_with(h, ip, &[], method, path, token, body).await
}

async fn from_with(
    h: &Harness,
    ip: [u8; 4],
    headers: &[(&str, &str)],
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, HeaderMap, Value) {
    let mut req = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let mut req = req.body(body).unwrap();
    req.extensions_mut()
        .insert(ConnectInfo(SocketAddr::from((ip, 40000))));
    let r = h.app.clone().oneshot(req).await.unwrap();
    let (status, headers) = (r.status(), r.headers().clone());
    let bytes = r.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, v)
}

async fn login(h: &Harness, ip: [u8; 4], email: &str, password: &str) -> (StatusCode, HeaderMap) {
    let (s, hd, _) = from(
        h,
        ip,
        Method::POST,
        "/api/v1/login",
        None,
        Some(json!({"email": email, "password": password})),
    )
    .await;
    (s, hd)
}

fn retry_after(h: &HeaderMap) -> u64 {
    h.get("retry-after")
        .expect("429 without Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Rapid wrong passwords: free attempts, then 429 with `Retry-After`
/// (the 50th certainly), without checking the password, so even the right
/// one waits; after the backoff the right password works.
async fn rapid_wrong_logins_back_off(h: Arc<Harness>) {
    h.user("victim@example.com", "admin").await;
    let ip = [10, 0, 0, 1];
    let mut statuses = Vec::new();
    let mut last = HeaderMap::new();
    for _ in 0..50 {
        let (s, hd) = login(&h, ip, "victim@example.com", "wrong password!").await;
        statuses.push(s.as_u16());
        last = hd;
    }
    assert!(
        statuses[..5].iter().all(|s| *s == 401),
        "five free attempts: {statuses:?}"
    );
    assert_eq!(statuses[49], 429, "{statuses:?}");
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    let wait = retry_after(&last);
    assert!((1..=2).contains(&wait), "first backoff step: {wait} s");
    // The right password does not skip the backoff.
    let (s, hd) = login(&h, ip, "victim@example.com", PASSWORD).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    tokio::time::sleep(Duration::from_secs(retry_after(&hd))).await;
    let (s, _) = login(&h, ip, "victim@example.com", PASSWORD).await;
    assert_eq!(s, StatusCode::OK);
    // Success starts the pair over.
    let (s, _) = login(&h, ip, "victim@example.com", "wrong password!").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

fn fast_lockout(c: &mut Config) {
    c.login.free_attempts = 2;
    c.login.lockout_after = 4;
    c.login.backoff_base_ms = 10;
    c.login.lockout_secs = 3;
}

/// Fails from `ip` until the pair is locked; answers the lockout's
/// Retry-After.
async fn lock_out(h: &Harness, ip: [u8; 4], email: &str) -> u64 {
    let mut failures = 0;
    for _ in 0..200 {
        let (s, hd) = login(h, ip, email, "wrong password!").await;
        match s {
            StatusCode::UNAUTHORIZED => failures += 1,
            StatusCode::TOO_MANY_REQUESTS if failures >= 4 => return retry_after(&hd),
            StatusCode::TOO_MANY_REQUESTS => tokio::time::sleep(Duration::from_millis(30)).await,
            other => panic!("{other}"),
        }
    }
    panic!("never locked out");
}

/// An admin locked out from one address: the lockout holds there only,
/// another admin clears it at once, and it ends by itself.
async fn an_admins_lockout_clears(h: Arc<Harness>) {
    let id = {
        let (s, u) = h
            .call(
                Method::POST,
                "/api/v1/users",
                Some(&h.admin),
                Some(json!({"email": "boss@example.com", "password": PASSWORD, "role": "admin"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{u}");
        u["id"].as_str().unwrap().to_string()
    };
    let attacker = [10, 0, 0, 66];
    let secs = lock_out(&h, attacker, "boss@example.com").await;
    assert!((2..=3).contains(&secs), "the lockout: {secs} s");
    assert_eq!(
        login(&h, attacker, "boss@example.com", PASSWORD).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // The real admin, elsewhere, is not locked out.
    assert_eq!(
        login(&h, [10, 0, 0, 7], "boss@example.com", PASSWORD)
            .await
            .0,
        StatusCode::OK
    );
    // A read-only user cannot clear; an admin can.
    let ro = h.user("ro@example.com", "read_only").await;
    let path = format!("/api/v1/users/{id}/login-throttle");
    let (s, _) = h.call(Method::DELETE, &path, Some(&ro), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = h.call(Method::DELETE, &path, Some(&h.admin), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(
        login(&h, attacker, "boss@example.com", PASSWORD).await.0,
        StatusCode::OK
    );
    let (s, _) = h
        .call(
            Method::DELETE,
            "/api/v1/users/nope/login-throttle",
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, log) = h
        .call(Method::GET, "/api/v1/audit", Some(&h.admin), None)
        .await;
    let log = log.to_string();
    assert!(
        log.contains("user.login_throttle.clear") && log.contains("user:boss@example.com"),
        "{log}"
    );
    // Locked again: it ends by itself after lockout-secs.
    let secs = lock_out(&h, attacker, "boss@example.com").await;
    tokio::time::sleep(Duration::from_secs(secs)).await;
    assert_eq!(
        login(&h, attacker, "boss@example.com", PASSWORD).await.0,
        StatusCode::OK
    );
}

/// One address may call login, enroll and activate so often in all; other
/// addresses have their own budget.
async fn unauthenticated_routes_are_limited_per_address(h: Arc<Harness>) {
    let ip = [10, 1, 0, 1];
    for n in 0..5 {
        let (s, _) = login(&h, ip, &format!("nobody{n}@example.com"), "wrong password!").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    let (s, hd, _) = from(
        &h,
        ip,
        Method::POST,
        "/api/v1/device/enroll",
        None,
        Some(json!({"enrollment_token": "kxe_nope", "device_id": "d", "hardware_class": "x"})),
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert!(retry_after(&hd) >= 1);
    let (s, _) = login(&h, ip, "nobody9@example.com", "wrong password!").await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    let (s, _) = login(&h, [10, 1, 0, 2], "nobody9@example.com", "wrong password!").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Through a trusted proxy, X-Forwarded-For names the client.
    let body = json!({"email": "nobody9@example.com", "password": "wrong password!"});
    let proxy = [10, 1, 0, 200];
    for (xff, want) in [
        ("10.1.0.1", StatusCode::TOO_MANY_REQUESTS),
        ("10.1.0.3, 10.1.0.200", StatusCode::UNAUTHORIZED),
        ("10.1.0.1, 10.1.0.3", StatusCode::UNAUTHORIZED),
    ] {
        let (s, _, _) = from_with(
            &h,
            proxy,
            &[("x-forwarded-for", xff)],
            Method::POST,
            "/api/v1/login",
            None,
            Some(body.clone()),
        )
        .await;
        assert_eq!(s, want, "{xff}");
    }
    // From an untrusted peer the header is ignored: the peer is counted.
    for _ in 0..5 {
        from_with(
            &h,
            [10, 1, 0, 4],
            &[("x-forwarded-for", "10.1.0.5")],
            Method::POST,
            "/api/v1/login",
            None,
            Some(body.clone()),
        )
        .await;
    }
    let (s, _, _) = from_with(
        &h,
        [10, 1, 0, 4],
        &[("x-forwarded-for", "10.1.0.6")],
        Method::POST,
        "/api/v1/login",
        None,
        Some(body.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
}

fn series(metrics: &str) -> usize {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count()
}

async fn scrape(h: &Harness, token: Option<&str>) -> (StatusCode, String) {
    let (s, _, body) = h
        .raw(Method::GET, "/metrics", token, &[], Body::empty())
        .await;
    (s, String::from_utf8(body).unwrap())
}

/// 300 requests with made-up methods to made-up and real paths add no
/// series; `/metrics` needs its token when one is set.
async fn metrics_labels_are_bounded(h: Arc<Harness>) {
    let (s, _) = scrape(&h, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = scrape(&h, Some("wrong")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let send = |method: String, path: String| {
        let h = h.clone();
        async move {
            let m = Method::from_bytes(method.as_bytes()).unwrap();
            h.raw(m, &path, None, &[], Body::empty()).await.0
        }
    };
    // One of each kind first: the `other` and `unmatched` series exist.
    send("BREW".into(), "/no/such/path".into()).await;
    send("BREW".into(), "/api/v1/me".into()).await;
    send("GET".into(), "/no/such/path/0".into()).await;
    let (s, _) = scrape(&h, Some("metrics-secret")).await;
    assert_eq!(s, StatusCode::OK);
    let (_, before) = scrape(&h, Some("metrics-secret")).await;
    for n in 0..300 {
        let path = match n % 3 {
            0 => format!("/made/up/{n}"),
            1 => "/api/v1/me".to_string(),
            _ => format!("/api/v1/releases/{n}/nothing"),
        };
        let s = send(format!("X{n}METHOD"), path).await;
        assert!(s.is_client_error(), "{s}");
        send("GET".into(), format!("/no/such/path/{n}")).await;
    }
    let (_, after) = scrape(&h, Some("metrics-secret")).await;
    assert_eq!(series(&after), series(&before), "new series:\n{after}");
    assert!(after.contains("method=\"other\""), "{after}");
    assert!(!after.contains("X1METHOD"), "{after}");
    assert!(!after.contains("/made/up"), "{after}");
}

/// The value of one series (`name` or `name{labels}`) in a scrape.
fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

fn counting(c: &mut Config) {
    // A pair is locked at its second failure; an account backs off after
    // three failures from anywhere, an address after four on any
    // account; every backoff is a minute, so each refusal is certain.
    c.login.free_attempts = 2;
    c.login.lockout_after = 2;
    c.login.lockout_secs = 600;
    c.login.backoff_base_ms = 60_000;
    c.login.account_free_attempts = 3;
    c.login.account_max_backoff_secs = 60;
    c.login.address_free_attempts = 4;
    c.limits.unauthenticated_per_address_per_minute = 8;
}

/// Every refusal is counted in `/metrics`, by its reason: logins the
/// throttle refused (lockout, account, address), unauthenticated requests
/// over their address's limit, and Idempotency-Key conflicts (in
/// progress, another request). Connection-cap refusals: in
/// `connections_are_capped`.
async fn refusals_are_counted(h: Arc<Harness>) {
    let (_, m) = scrape(&h, None).await;
    for series in [
        "kernex_login_throttled_total{reason=\"account\"}",
        "kernex_login_throttled_total{reason=\"address\"}",
        "kernex_login_throttled_total{reason=\"lockout\"}",
        "kernex_unauthenticated_rate_limited_total",
        "kernex_connections_refused_total",
        "kernex_idempotency_conflicts_total{kind=\"in_progress\"}",
        "kernex_idempotency_conflicts_total{kind=\"mismatch\"}",
    ] {
        assert_eq!(value(&m, series), 0.0, "{series}");
    }
    h.user("a@example.com", "ops").await;
    h.user("b@example.com", "ops").await;
    let wrong = "wrong password!";
    // Lockout: two failures lock the pair; two more attempts are refused.
    for want in [401, 401, 429, 429] {
        assert_eq!(
            login(&h, [10, 2, 0, 1], "a@example.com", wrong).await.0,
            want
        );
    }
    // Account: three failures from two addresses; a third address backs off.
    for (ip, want) in [(3, 401), (3, 401), (4, 401), (5, 429)] {
        assert_eq!(
            login(&h, [10, 2, 0, ip], "b@example.com", wrong).await.0,
            want
        );
    }
    // Address: four failures on four accounts; a fifth account backs off.
    for n in 0..5 {
        let want = if n < 4 { 401 } else { 429 };
        let email = format!("nobody{n}@example.com");
        assert_eq!(login(&h, [10, 2, 0, 6], &email, wrong).await.0, want);
    }
    // The unauthenticated routes' limit: 8 a minute from one address.
    for n in 0..10 {
        let (s, _, _) = from(
            &h,
            [10, 2, 0, 7],
            Method::POST,
            "/api/v1/device/enroll",
            None,
            Some(json!({"enrollment_token": "kxe_nope", "device_id": "d", "hardware_class": "x"})),
        )
        .await;
        assert_eq!(s == StatusCode::TOO_MANY_REQUESTS, n >= 8, "{n}: {s}");
    }
    // Idempotency: a key whose request is in progress, and a key reused for
    // another request.
    let create = |email: &str| {
        let h = h.clone();
        let body = json!({"email": email, "password": PASSWORD, "role": "ops"}).to_string();
        async move {
            let headers = [
                ("content-type", "application/json"),
                ("idempotency-key", "user-1"),
            ];
            let admin = h.admin.clone();
            h.raw(
                Method::POST,
                "/api/v1/users",
                Some(&admin),
                &headers,
                Body::from(body),
            )
            .await
            .0
        }
    };
    assert_eq!(create("c@example.com").await, StatusCode::CREATED);
    assert_eq!(
        create("d@example.com").await,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    sqlx::query("UPDATE idempotency_keys SET status = 0, body = '' WHERE idem_key = 'user-1'")
        .execute(h.state.store.pool())
        .await
        .unwrap();
    assert_eq!(create("c@example.com").await, StatusCode::CONFLICT);

    let (_, m) = scrape(&h, None).await;
    for (series, want) in [
        ("kernex_login_throttled_total{reason=\"lockout\"}", 2.0),
        ("kernex_login_throttled_total{reason=\"account\"}", 1.0),
        ("kernex_login_throttled_total{reason=\"address\"}", 1.0),
        ("kernex_unauthenticated_rate_limited_total", 2.0),
        (
            "kernex_idempotency_conflicts_total{kind=\"in_progress\"}",
            1.0,
        ),
        ("kernex_idempotency_conflicts_total{kind=\"mismatch\"}", 1.0),
        ("kernex_connections_refused_total", 0.0),
    ] {
        assert_eq!(value(&m, series), want, "{series}:\n{m}");
    }
}

/// A claimed body over the limit is refused before a byte of it is read.
async fn oversize_content_length_is_refused_up_front(h: Arc<Harness>) {
    let polled = Arc::new(AtomicBool::new(false));
    let p = polled.clone();
    // A body that never ends; the server must not read it.
    let body = Body::from_stream(futures_util::stream::poll_fn(move |_| {
        p.store(true, Ordering::SeqCst);
        std::task::Poll::<Option<Result<bytes::Bytes, std::io::Error>>>::Pending
    }));
    let claimed = (20u64 << 30).to_string();
    let headers = [
        ("content-type", "application/octet-stream"),
        ("content-length", claimed.as_str()),
    ];
    let req = h.raw(
        Method::POST,
        "/api/v1/releases",
        Some(&h.admin),
        &headers,
        body,
    );
    let (s, _, body) = tokio::time::timeout(Duration::from_secs(10), req)
        .await
        .expect("the upload was not refused up front");
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["detail"]["limit"], 8u64 << 30, "{v}");
    assert!(!polled.load(Ordering::SeqCst), "the body was read");
    let spooled = std::fs::read_dir(&h.state.spool).unwrap().count();
    assert_eq!(spooled, 0, "nothing spooled");
    // JSON routes: their own limit, also from the header.
    let (s, _, _) = h
        .raw(
            Method::POST,
            "/api/v1/login",
            None,
            &[
                ("content-type", "application/json"),
                ("content-length", "1000000"),
            ],
            Body::from_stream(futures_util::stream::pending::<
                Result<bytes::Bytes, std::io::Error>,
            >()),
        )
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
}

/// Read-only users cannot preview a rollout spec; the delta page works
/// for them, from the indexes, with no copy of the bundles: here the spool
/// directory cannot even be written to.
async fn heavy_work_is_kept_from_read_only_users(h: Arc<Harness>) {
    let ids = common::upload_sim_releases(&h).await;
    let ro = h.user("reader@example.com", "read_only").await;
    let spec = json!({"release_id": ids[1], "waves": [{"percent": 100.0, "soak_secs": 0}]});
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/rollouts/preview",
            Some(&ro),
            Some(spec.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, p) = h
        .call(
            Method::POST,
            "/api/v1/rollouts/preview",
            Some(&h.admin),
            Some(spec),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");

    let spool = &h.state.spool;
    std::fs::remove_dir_all(spool).unwrap();
    std::fs::write(spool, b"not a directory").unwrap();
    let cookie = format!("kernex_session={ro}");
    let (s, _, page) = h
        .raw(
            Method::GET,
            &format!("/ui/releases/delta?from={}&to={}", ids[0], ids[1]),
            None,
            &[("cookie", &cookie)],
            Body::empty(),
        )
        .await;
    let page = String::from_utf8(page).unwrap();
    std::fs::remove_file(spool).unwrap();
    std::fs::create_dir(spool).unwrap();
    assert_eq!(s, StatusCode::OK, "{page}");
    let total: u64 = page
        .split("data-delta-total=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .parse()
        .unwrap();
    let full = std::fs::metadata(&common::sim_releases(&h).bundles[1])
        .unwrap()
        .len();
    assert!(total > 0 && total < full / 2, "{total} of {full}");
}

both!(
    rapid_wrong_logins_back_off,
    heavy_work_is_kept_from_read_only_users,
    slow_clients_are_cut_off,
    connections_are_capped,
);

mod lockout {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_sqlite() {
        common::run_with(common::Db::Sqlite, fast_lockout, an_admins_lockout_clears).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_postgres() {
        common::run_with(common::Db::Postgres, fast_lockout, an_admins_lockout_clears).await;
    }
}

mod counted {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_sqlite() {
        common::run_with(common::Db::Sqlite, counting, refusals_are_counted).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_postgres() {
        common::run_with(common::Db::Postgres, counting, refusals_are_counted).await;
    }
}

mod limits {
    use super::*;

    fn config(c: &mut Config) {
        c.limits.unauthenticated_per_address_per_minute = 5;
        c.limits.trusted_proxies = vec![IpAddr::from([10, 1, 0, 200])];
        c.metrics_token = Some("metrics-secret".into());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_on_sqlite() {
        common::run_with(common::Db::Sqlite, config, metrics_labels_are_bounded).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_on_postgres() {
        common::run_with(common::Db::Postgres, config, metrics_labels_are_bounded).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversize_on_sqlite() {
        common::run_with(
            common::Db::Sqlite,
            config,
            oversize_content_length_is_refused_up_front,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversize_on_postgres() {
        common::run_with(
            common::Db::Postgres,
            config,
            oversize_content_length_is_refused_up_front,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn per_address_on_sqlite() {
        common::run_with(
            common::Db::Sqlite,
            config,
            unauthenticated_routes_are_limited_per_address,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn per_address_on_postgres() {
        common::run_with(
            common::Db::Postgres,
            config,
            unauthenticated_routes_are_limited_per_address,
        )
        .await;
    }
}

// ---- The connection loop, on real sockets. ----

/// Serves `h`'s app on a loopback port with `limits`; answers its address.
async fn serve(h: &Harness, limits: kernex_server::serve::Limits) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = h.app.clone();
    tokio::spawn(async move {
        kernex_server::serve::run(listener, None, app, limits, std::future::pending()).await
    });
    addr
}

/// A connection from the loopback address `127.0.0.<n>`.
async fn connect_from(n: u8, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::from((IpAddr::from([127, 0, 0, n]), 0)))
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// Reads until EOF (or `within`); answers what came and when it ended
/// (None: still open at `within`).
async fn read_to_close(s: &mut TcpStream, within: Duration) -> (Vec<u8>, Option<Duration>) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, Some(start.elapsed())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (got, None),
        }
    }
}

const GET: &[u8] =
    b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: kernex\r\nConnection: close\r\n\r\n";

fn limits(
    header: u64,
    idle: u64,
    total: usize,
    per_address: usize,
) -> kernex_server::serve::Limits {
    kernex_server::serve::Limits {
        header_read_timeout: Duration::from_secs(header),
        idle_timeout: Duration::from_secs(idle),
        max_connections: total,
        max_per_address: per_address,
        refused: Default::default(),
    }
}

/// Slowloris: a half-sent request, even trickled a byte at a time, is
/// closed within the header timeout; a stalled body within the idle
/// timeout.
async fn slow_clients_are_cut_off(h: Arc<Harness>) {
    let addr = serve(&h, limits(1, 2, 64, 16)).await;
    let mut s = connect_from(1, addr).await;
    s.write_all(b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: kern")
        .await
        .unwrap();
    let start = Instant::now();
    let trickle = async {
        for b in b"ex\r\nX-Slow: yes" {
            tokio::time::sleep(Duration::from_millis(150)).await;
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
        }
    };
    trickle.await;
    let (_, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "a half-sent request was kept open");
    let closed = start.elapsed();
    assert!(
        closed < Duration::from_millis(2500),
        "a half-sent request stayed open {closed:?}"
    );
    // A whole request is answered.
    let mut s = connect_from(1, addr).await;
    s.write_all(GET).await.unwrap();
    let (got, _) = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // A body that stops coming: closed after the idle timeout.
    let mut s = connect_from(2, addr).await;
    s.write_all(
        b"POST /api/v1/login HTTP/1.1\r\nHost: kernex\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"email\":",
    )
    .await
    .unwrap();
    let start = Instant::now();
    let (_, closed) = read_to_close(&mut s, Duration::from_secs(8)).await;
    assert!(closed.is_some(), "a stalled body kept its connection");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

/// A request whose body keeps coming, slowly enough that the connection
/// is never idle, is answered 503 at the request timeout, long before its
/// body would be complete; a quick request on the same server is served.
async fn slow_requests_time_out(h: Arc<Harness>) {
    let secs = h.state.config.limits.request_timeout_secs;
    assert_eq!(secs, 2);
    let addr = serve(&h, limits(30, 30, 64, 16)).await;
    let s = connect_from(20, addr).await;
    let (mut rx, mut tx) = s.into_split();
    // 100 bytes of body, one every 100 ms: 10 s to send it all.
    tx.write_all(
        b"POST /api/v1/login HTTP/1.1\r\nHost: kernex\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n",
    )
    .await
    .unwrap();
    let start = Instant::now();
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if tx.write_all(b" ").await.is_err() {
                break;
            }
        }
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(8), rx.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!("no answer within 8 s: {other:?}"),
        }
    }
    let took = start.elapsed();
    trickle.abort();
    let head = String::from_utf8_lossy(&got).to_string();
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(6),
        "answered after {took:?}, the timeout is {secs} s"
    );
    let mut s = connect_from(21, addr).await;
    s.write_all(GET).await.unwrap();
    let (got, _) = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
}

mod request_timeout {
    use super::*;

    fn config(c: &mut Config) {
        c.limits.request_timeout_secs = 2;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_sqlite() {
        common::run_with(common::Db::Sqlite, config, slow_requests_time_out).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_postgres() {
        common::run_with(common::Db::Postgres, config, slow_requests_time_out).await;
    }
}

/// At most `max_per_address` connections from one address (more are
/// closed at once) and `max_connections` in all (more wait until one
/// closes).
async fn connections_are_capped(h: Arc<Harness>) {
    let addr = serve(
        &h,
        limits(30, 30, 3, 2).counted_in(&h.state.metrics.refusals.connections),
    )
    .await;
    let mut a1 = connect_from(10, addr).await;
    let _a2 = connect_from(10, addr).await;
    // Give the loop time to accept both.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut a3 = connect_from(10, addr).await;
    let (_, closed) = read_to_close(&mut a3, Duration::from_secs(3)).await;
    assert!(
        closed.is_some(),
        "a third connection from one address was kept"
    );
    let (_, m) = scrape(&h, None).await;
    assert_eq!(value(&m, "kernex_connections_refused_total"), 1.0, "{m}");
    // The first two still work.
    a1.write_all(b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: kernex\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    a1.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");

    // The third connection in all, from elsewhere; the fourth waits.
    let b1 = connect_from(11, addr).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c1 = connect_from(12, addr).await;
    c1.write_all(GET).await.unwrap();
    let (early, _) = read_to_close(&mut c1, Duration::from_millis(1000)).await;
    assert!(
        early.is_empty(),
        "a fourth connection was served over the cap"
    );
    drop(b1);
    let (got, _) = read_to_close(&mut c1, Duration::from_secs(10)).await;
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "served once a connection closed: {}",
        String::from_utf8_lossy(&got)
    );
}
