//! The test harness: one server per test, on a fresh SQLite file or a fresh
//! PostgreSQL database (dropped at the end). `both!` runs a test body
//! against each backend. PostgreSQL being unreachable fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use kernex_protocol::device_key::DeviceKey;
use kernex_server::config::Config;
use kernex_server::{AppState, bootstrap, http};
use serde_json::{Value, json};
use tower::ServiceExt;

/// Which database a test runs on.
#[derive(Debug, Clone, Copy)]
pub enum Db {
    Sqlite,
    Postgres,
}

pub fn postgres_admin_url() -> String {
    std::env::var("KERNEX_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../protocol/tests/golden")
        .join(name)
}

/// A running app and its admin.
pub struct Harness {
    pub app: Router,
    pub state: AppState,
    pub dir: tempfile::TempDir,
    pub admin: String,
    pub db: Db,
    pg_database: Option<String>,
    /// The poll cache's change listener (PostgreSQL), as `kernex-server`
    /// runs it.
    listener: tokio::task::JoinHandle<()>,
    /// Each enrolled device id's key, as the device keeps it.
    keys: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<DeviceKey>>>,
}

/// The admin's password once the harness changed the bootstrap one.
pub const ADMIN_PASSWORD: &str = "harness admin password";

static COUNTER: AtomicU32 = AtomicU32::new(0);

async fn pg_admin() -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(&postgres_admin_url())
        .await
        .expect("PostgreSQL must be reachable at 127.0.0.1:5432 (run scripts/setup)")
}

impl Harness {
    pub async fn new(db: Db) -> Harness {
        Self::with_config(db, |_| {}).await
    }

    pub async fn with_config(db: Db, edit: impl FnOnce(&mut Config)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            data_dir: dir.path().join("data"),
            // The bad-bundle tests upload a dozen files in a few seconds;
            // rate limits are tested on their own.
            uploads_per_minute: 0,
            // Fleets enroll with one token; the enrollment limits are
            // tested on their own.
            limits: kernex_server::limits::Limits {
                enrollments_per_token_per_minute: 0,
                ..Default::default()
            },
            // Tests count device audit entries; coalescing is tested on its
            // own (audit_chain.rs).
            audit_device_coalesce_secs: 0,
            ..Config::default()
        };
        let mut pg_database = None;
        if let Db::Postgres = db {
            let name = format!(
                "kx_test_{}_{}_{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::SeqCst),
                &kernex_server::store::new_id().unwrap()[..8]
            );
            let admin = pg_admin().await;
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&admin)
                .await
                .unwrap();
            admin.close().await;
            let base = postgres_admin_url();
            let (prefix, _) = base.rsplit_once('/').unwrap();
            config.database_url = Some(format!("{prefix}/{name}"));
            pg_database = Some(name);
        }
        edit(&mut config);
        let state = AppState::open(config).await.unwrap();
        let first = bootstrap(&state).await.unwrap().expect("first start");
        assert!(
            bootstrap(&state).await.unwrap().is_none(),
            "bootstrap only once"
        );
        let listener = start_poll_cache_listener(&state).await;
        let app = http::app(state.clone());
        let mut h = Harness {
            app,
            state,
            dir,
            admin: String::new(),
            db,
            pg_database,
            listener,
            keys: Default::default(),
        };
        // The bootstrap password must be changed before anything else.
        let (s, body) = h
            .call(
                Method::POST,
                "/api/v1/login",
                None,
                Some(json!({"organization": "default", "email": first.email, "password": first.password})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(body["must_change_password"], true, "{body}");
        h.admin = body["token"].as_str().unwrap().to_string();
        let (s, body) = h
            .call(
                Method::POST,
                "/api/v1/account/password",
                Some(&h.admin.clone()),
                Some(json!({"current_password": first.password, "new_password": ADMIN_PASSWORD})),
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
        let ca = std::fs::read_to_string(golden("ca.crt")).unwrap();
        let (s, _) = h
            .call(
                Method::PUT,
                "/api/v1/org/keyring",
                Some(&h.admin.clone()),
                Some(json!({"pem": ca})),
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        h
    }

    pub async fn finish(self) {
        self.listener.abort();
        self.state.store.close().await;
        if let Some(name) = self.pg_database {
            let admin = pg_admin().await;
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&admin)
                .await
                .unwrap();
            admin.close().await;
        }
    }

    pub async fn login(&self, org: &str, email: &str, password: &str) -> String {
        let (s, body) = self
            .call(
                Method::POST,
                "/api/v1/login",
                None,
                Some(json!({"organization": org, "email": email, "password": password})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        body["token"].as_str().unwrap().to_string()
    }

    /// Creates a user in the admin's organisation and logs in.
    pub async fn user(&self, email: &str, role: &str) -> String {
        let (s, body) = self
            .call(
                Method::POST,
                "/api/v1/users",
                Some(&self.admin),
                Some(json!({"email": email, "password": "correct horse battery", "role": role})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        self.login("default", email, "correct horse battery").await
    }

    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Body,
    ) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let response = self
            .app
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, headers, bytes)
    }

    /// A JSON call; the response body parsed (Null when empty).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (headers, body) = match body {
            Some(v) => (
                vec![("content-type", "application/json")],
                Body::from(v.to_string()),
            ),
            None => (vec![], Body::empty()),
        };
        let (s, h, bytes) = self.raw(method, path, token, &headers, body).await;
        let is_json = h
            .get("content-type")
            .is_some_and(|c| c.to_str().unwrap_or("").starts_with("application/json"));
        let value = if bytes.is_empty() || (s.is_success() && !is_json) {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                panic!(
                    "{s}: not JSON ({:?}): {}",
                    h.get("content-type"),
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        if !s.is_success() {
            assert!(
                value["error"].is_string(),
                "{s}: error without a JSON error body: {value}"
            );
        }
        (s, value)
    }

    pub async fn upload(&self, token: &str, bytes: Vec<u8>) -> (StatusCode, Value) {
        let (s, _, body) = self
            .raw(
                Method::POST,
                "/api/v1/releases",
                Some(token),
                &[("content-type", "application/octet-stream")],
                Body::from(bytes),
            )
            .await;
        (s, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    pub async fn enrollment_token(&self, token: &str, tags: &[&str]) -> (String, String) {
        let (s, body) = self
            .call(
                Method::POST,
                "/api/v1/enrollment-tokens",
                Some(token),
                Some(json!({"label": "batch 1", "tags": tags, "expires_in_secs": 86_400})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        (
            body["id"].as_str().unwrap().to_string(),
            body["token"].as_str().unwrap().to_string(),
        )
    }

    /// The key of device `device_id` (made the first time), as the device
    /// keeps it.
    pub fn device_key(&self, device_id: &str) -> std::sync::Arc<DeviceKey> {
        self.keys
            .lock()
            .unwrap()
            .entry(device_id.to_string())
            .or_insert_with(|| std::sync::Arc::new(DeviceKey::generate().unwrap()))
            .clone()
    }

    /// A fresh server nonce.
    pub async fn nonce(&self) -> String {
        let (s, body) = self
            .call(Method::POST, "/api/v1/device/challenge", None, None)
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        body["nonce"].as_str().unwrap().to_string()
    }

    /// The proof that the holder of `key` is `device_id`, on a fresh nonce.
    pub async fn proof(&self, key: &DeviceKey, device_id: &str) -> Value {
        let nonce = self.nonce().await;
        serde_json::to_value(key.proof(device_id, &nonce).unwrap()).unwrap()
    }

    /// Device `id` (internal) signs a fresh nonce with `key`: the answer.
    pub async fn authenticate(&self, key: &DeviceKey, id: &str) -> (StatusCode, Value) {
        let nonce = self.nonce().await;
        let auth = key.auth(id, &nonce).unwrap();
        self.call(
            Method::POST,
            "/api/v1/device/auth",
            None,
            Some(serde_json::to_value(auth).unwrap()),
        )
        .await
    }

    /// Enrolls a device with its key ([`Harness::device_key`]); returns
    /// (internal id, access token).
    pub async fn enroll(&self, enrollment: &str, device_id: &str, class: &str) -> (String, String) {
        let key = self.device_key(device_id);
        let proof = self.proof(&key, device_id).await;
        let (s, body) = self
            .call(
                Method::POST,
                "/api/v1/device/enroll",
                None,
                Some(json!({"enrollment_token": enrollment, "device_id": device_id, "hardware_class": class, "key": proof})),
            )
            .await;
        assert!(
            s == StatusCode::CREATED || s == StatusCode::OK,
            "{s}: {body}"
        );
        (
            body["id"].as_str().unwrap().to_string(),
            body["credential"].as_str().unwrap().to_string(),
        )
    }

    pub async fn count(&self, table: &str) -> i64 {
        use sqlx::Row;
        sqlx::query(&format!("SELECT COUNT(*) AS n FROM {table}"))
            .fetch_one(self.state.store.pool())
            .await
            .unwrap()
            .try_get("n")
            .unwrap()
    }

    /// Files under the blob directory.
    pub fn blob_files(&self) -> usize {
        fn walk(p: &std::path::Path) -> usize {
            std::fs::read_dir(p)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| {
                            let p = e.path();
                            if p.is_dir() { walk(&p) } else { 1 }
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        walk(&self.state.config.blob_dir())
    }
}

/// Starts `state`'s poll cache listener and waits until it listens (on
/// PostgreSQL; on SQLite the cache is on from the start).
pub async fn start_poll_cache_listener(state: &AppState) -> tokio::task::JoinHandle<()> {
    let listener = tokio::spawn(kernex_server::poll_cache::listen(state.clone()));
    for _ in 0..400 {
        if state.poll_cache.is_enabled() {
            return listener;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the poll cache's listener did not connect within 10 s");
}

/// Two signed releases of hardware class `sim-x86` (1.0.0, 1.1.0, 1 MiB
/// images, a quarter changed) made by the fleet simulator's builder.
pub fn sim_releases(h: &Harness) -> kernex_sim::releases::MadeReleases {
    let v = |s: &str| semver::Version::parse(s).unwrap();
    kernex_sim::releases::make_releases(
        &h.dir.path().join("releases"),
        "sim-x86",
        &[v("1.0.0"), v("1.1.0")],
        1 << 20,
        0.25,
        7,
    )
    .unwrap()
}

/// The org's keyring set to the simulator's CA and both [`sim_releases`]
/// uploaded: their ids, old then new.
pub async fn upload_sim_releases(h: &Harness) -> Vec<String> {
    upload_releases(h, &sim_releases(h)).await
}

/// The org's keyring set to `made`'s CA and its bundles uploaded: their
/// ids, in order.
pub async fn upload_releases(
    h: &Harness,
    made: &kernex_sim::releases::MadeReleases,
) -> Vec<String> {
    let pem = std::fs::read_to_string(&made.ca_pem).unwrap();
    let (s, _) = h
        .call(
            Method::PUT,
            "/api/v1/org/keyring",
            Some(&h.admin.clone()),
            Some(json!({"pem": pem})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let mut ids = Vec::new();
    for bundle in &made.bundles {
        let (s, r) = h.upload(&h.admin, std::fs::read(bundle).unwrap()).await;
        assert_eq!(s, StatusCode::CREATED, "{r}");
        ids.push(r["id"].as_str().unwrap().to_string());
    }
    ids
}

/// Runs `body` on a fresh harness for `db`, then drops the database, even
/// when the body panics (the panic is re-raised).
pub async fn run<F, Fut>(db: Db, body: F)
where
    F: FnOnce(std::sync::Arc<Harness>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    run_with(db, |_| {}, body).await
}

/// As [`run`], with the server configuration edited first.
pub async fn run_with<F, Fut>(db: Db, edit: impl FnOnce(&mut Config), body: F)
where
    F: FnOnce(std::sync::Arc<Harness>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let h = std::sync::Arc::new(Harness::with_config(db, edit).await);
    let outcome = tokio::spawn(body(h.clone())).await;
    // Tasks the body spawned may still hold the harness for a moment.
    let mut h = h;
    for _ in 0..400 {
        match std::sync::Arc::try_unwrap(h) {
            Ok(owned) => {
                owned.finish().await;
                break;
            }
            Err(shared) => {
                h = shared;
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
        }
    }
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// `both!(name)` makes `name_sqlite` and `name_postgres` tests that run
/// `async fn name(h: Arc<Harness>)`.
#[macro_export]
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::run($crate::common::Db::Sqlite, super::$name).await;
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::run($crate::common::Db::Postgres, super::$name).await;
                }
            )*
        }
    };
}
