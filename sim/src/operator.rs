//! The operator side of a run: what an operator (or the quickstart) does
//! through the operator API before and during a rollout — log in, install
//! the keyring, upload releases, create an enrollment token, create,
//! preview, start, resume and roll back the rollout, read it, and step the
//! server's test clock.
//!
//! The enrollment token is part of the device and factory contract
//! ([`kernex_protocol::api`]); the rest is the operator API (JSON as the
//! web UI and the OpenAPI document describe it).

use anyhow::{Context, Result, bail};
use kernex_protocol::api::{self, EnrollmentToken, NewEnrollmentToken};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde_json::{Value, json};

use crate::releases::LocalRelease;

/// Operator API paths the simulator uses (the device and factory ones are
/// in [`api::paths`]).
mod paths {
    pub const LOGIN: &str = "/api/v1/login";
    pub const KEYRING: &str = "/api/v1/org/keyring";
    pub const RELEASES: &str = "/api/v1/releases";
    pub const ROLLOUTS: &str = "/api/v1/rollouts";
    pub const ROLLOUT_EGRESS: &str = "/api/v1/rollouts/egress";
    pub const TEST_CLOCK: &str = "/api/v1/test/clock";
}

/// An operator logged in to one server.
#[derive(Debug, Clone)]
pub struct Operator {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Operator {
    /// Logs in as `email` in `organization`.
    pub async fn login(
        http: reqwest::Client,
        server: &str,
        organization: &str,
        email: &str,
        password: &str,
    ) -> Result<Self> {
        let base = server.trim_end_matches('/').to_string();
        let login = http
            .post(format!("{base}{}", paths::LOGIN))
            .json(&json!({"organization": organization, "email": email, "password": password}))
            .send()
            .await
            .with_context(|| format!("unable to reach {server}"))?;
        if !login.status().is_success() {
            bail!("login as {email} failed: {}", login.status());
        }
        let answer = login.json::<Value>().await?;
        if answer["must_change_password"] == true {
            bail!(
                "{email} logged in with a one-time password that must be changed first \
                 (the web UI asks, or POST /api/v1/account/password); then pass the new one"
            );
        }
        let token = answer["token"]
            .as_str()
            .context("login answered without a token")?
            .to_string();
        Ok(Self { http, base, token })
    }

    /// Uses an operator API token instead of logging in.
    pub fn with_token(http: reqwest::Client, server: &str, token: &str) -> Self {
        Self {
            http,
            base: server.trim_end_matches('/').to_string(),
            token: token.to_string(),
        }
    }

    /// The server's base URL, without a trailing slash.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Points at another server URL (a restarted server, same store).
    pub fn set_server(&mut self, server: &str) {
        self.base = server.trim_end_matches('/').to_string();
    }

    /// One call: the status and the answer (JSON, the text as a string, or
    /// null when empty).
    pub async fn call<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(StatusCode, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{path}: request failed"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, value))
    }

    /// A call that must succeed (2xx); its answer.
    pub async fn call_ok<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Value> {
        let (s, v) = self.call(method, path, body).await?;
        if !s.is_success() {
            bail!("{path}: {s}: {v}");
        }
        Ok(v)
    }

    async fn get(&self, path: &str) -> Result<Value> {
        self.call_ok::<Value>(Method::GET, path, None).await
    }

    async fn post_empty(&self, path: &str) -> Result<Value> {
        self.call_ok::<Value>(Method::POST, path, None).await
    }

    /// The server's test clock, unix ms.
    pub async fn clock(&self) -> Result<i64> {
        let clock = self.get(paths::TEST_CLOCK).await.context(
            "the server has no test clock: start it with `test-clock = true` in its configuration (or run in real time)",
        )?;
        clock["now_ms"].as_i64().context("clock without now_ms")
    }

    /// Sets the server's test clock to `ms`; with `tick`, its scheduler
    /// runs once at the new time.
    pub async fn set_clock(&self, ms: i64, tick: bool) -> Result<()> {
        let (s, v) = self
            .call(
                Method::POST,
                paths::TEST_CLOCK,
                Some(&json!({"set_ms": ms, "tick": tick})),
            )
            .await?;
        if !s.is_success() {
            bail!("stepping the server clock: {s}: {v}");
        }
        Ok(())
    }

    /// Installs `pem` as the organisation's keyring.
    pub async fn set_keyring(&self, pem: &str) -> Result<()> {
        self.call_ok(Method::PUT, paths::KEYRING, Some(&json!({"pem": pem})))
            .await
            .map(drop)
    }

    /// Uploads a release; its id (the existing one when the server already
    /// has this version).
    pub async fn upload(&self, release: &LocalRelease) -> Result<String> {
        let resp = self
            .http
            .post(format!("{}{}", self.base, paths::RELEASES))
            .bearer_auth(&self.token)
            .header("content-type", "application/octet-stream")
            .body(release.bytes.clone())
            .send()
            .await?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if status == StatusCode::CREATED {
            return Ok(v["id"].as_str().context("release without id")?.to_string());
        }
        if status != StatusCode::CONFLICT {
            bail!("uploading release {}: {status}: {v}", release.version);
        }
        let list = self.get(paths::RELEASES).await?;
        list.as_array()
            .and_then(|a| a.iter().find(|r| r["version"] == release.version.as_str()))
            .and_then(|r| r["id"].as_str())
            .map(str::to_string)
            .with_context(|| format!("release {} exists but is not listed", release.version))
    }

    /// Creates an enrollment token; the answer carries its secret.
    pub async fn enrollment_token(&self, new: &NewEnrollmentToken) -> Result<EnrollmentToken> {
        let v = self
            .call_ok(Method::POST, api::paths::ENROLLMENT_TOKENS, Some(new))
            .await?;
        serde_json::from_value(v).context("the enrollment token answer is not the contract's")
    }

    /// Accepts what device `pk` claimed as its link class, site and time
    /// zone (a device's claim is only a hint until an operator accepts
    /// it).
    pub async fn accept_link(&self, pk: &str) -> Result<()> {
        self.post_empty(&format!("/api/v1/devices/{pk}/link/accept"))
            .await?;
        Ok(())
    }

    /// Creates a rollout from `spec`; the created rollout.
    pub async fn create_rollout(&self, spec: &Value) -> Result<Value> {
        self.call_ok(Method::POST, paths::ROLLOUTS, Some(spec))
            .await
    }

    /// A rollout's preview: targets, bytes, metered cost, duration.
    pub async fn preview(&self, id: &str) -> Result<Value> {
        self.get(&format!("{}/{id}/preview", paths::ROLLOUTS)).await
    }

    /// Starts a rollout.
    pub async fn start(&self, id: &str) -> Result<()> {
        self.post_empty(&format!("{}/{id}/start", paths::ROLLOUTS))
            .await
            .map(drop)
    }

    /// Rolls a rollout back.
    pub async fn rollback(&self, id: &str) -> Result<()> {
        self.post_empty(&format!("{}/{id}/rollback", paths::ROLLOUTS))
            .await
            .map(drop)
    }

    /// Resumes a paused rollout.
    pub async fn resume(&self, id: &str) -> Result<()> {
        self.post_empty(&format!("{}/{id}/resume", paths::ROLLOUTS))
            .await
            .map(drop)
    }

    /// A rollout's summary, with its per-device records when `devices`.
    pub async fn rollout(&self, id: &str, devices: bool) -> Result<Value> {
        if devices {
            self.get(&format!("{}/{id}", paths::ROLLOUTS)).await
        } else {
            self.get(&format!("{}/{id}?devices=false", paths::ROLLOUTS))
                .await
        }
    }

    /// The server's own count of rollout egress since `since_ms`.
    pub async fn egress(&self, since_ms: i64) -> Result<Value> {
        self.get(&format!("{}?since_ms={since_ms}", paths::ROLLOUT_EGRESS))
            .await
    }
}
