//! The operator web UI: server-rendered HTML (maud templates compiled into
//! the binary), one stylesheet and one small script served by the binary,
//! nothing from elsewhere (operators may be air-gapped).
//!
//! Every page reads and writes through the same services as the JSON API
//! (`crate::service::*`), so roles, validation and the audit log are the
//! API's; the UI runs no SQL and calls no handler (tests/layering.rs).
//! What the UI adds:
//!
//! - the session: the `kernex_session` cookie, honoured here for any method
//!   (the JSON API keeps refusing it for form posts);
//! - CSRF protection: every form and every script mutation carries a token
//!   derived from the session secret (`csrf` field or `X-CSRF-Token`
//!   header), checked before anything runs; the login form, which has no
//!   session yet, uses a double-submit cookie;
//! - HTML error pages for bad input (4xx), never a bare 500;
//! - security headers: a `Content-Security-Policy` that allows only this
//!   origin, no framing, no sniffing, no caching of pages.

mod account;
mod admin;
mod charts;
mod device;
mod devices;
mod enrollment_requests;
mod fleet;
mod format;
mod layout;
mod link;
mod operations;
mod orgs;
mod patch_jobs;
mod people;
mod releases;
mod rollouts;
mod tokens;

use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{Markup, html};
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::auth::{Operator, Role, SESSION_COOKIE};
use crate::http::Error;

/// The cookie that carries the login form's CSRF token (double submit).
const LOGIN_CSRF_COOKIE: &str = "kernex_login_csrf";
/// The header the script sends its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// The form field that carries the CSRF token.
pub const CSRF_FIELD: &str = "csrf";

/// The UI's routes (mounted at `/` and `/ui`).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/assets/{name}", get(asset))
        .route("/ui/login", get(layout::login_page).post(layout::login))
        .route("/ui/logout", post(layout::logout))
        .route("/ui/", get(fleet::overview))
        .route("/ui/live/overview", get(fleet::overview_live))
        .route("/ui/devices", get(devices::devices))
        .route("/ui/devices/bulk", post(devices::bulk))
        .route("/ui/devices/{id}", get(device::device))
        .route("/ui/devices/{id}/live", get(device::device_live))
        .route("/ui/devices/{id}/revoke", post(device::revoke))
        .route("/ui/devices/{id}/tags", post(device::set_tags))
        .route("/ui/devices/{id}/link", post(device::set_link))
        .route("/ui/devices/{id}/link/accept", post(link::accept))
        .route(
            "/ui/enrollment-requests/{id}/approve",
            post(enrollment_requests::approve),
        )
        .route(
            "/ui/enrollment-requests/{id}/reject",
            post(enrollment_requests::reject),
        )
        .route("/ui/releases", get(releases::list))
        .route("/ui/releases/upload", post(releases::upload))
        .route("/ui/releases/delta", get(releases::delta))
        .route("/ui/releases/{id}", get(releases::detail))
        .route("/ui/releases/{id}/delete", post(releases::delete))
        .route(
            "/ui/releases/{id}/patches/{job}/retry",
            post(patch_jobs::retry),
        )
        .route(
            "/ui/deployments",
            get(operations::deployments).post(operations::deploy),
        )
        .route("/ui/deployments/confirm", post(operations::confirm_deploy))
        .route("/ui/deployments/{id}", get(operations::deployment))
        .route(
            "/ui/deployments/{id}/live",
            get(operations::deployment_live),
        )
        .route(
            "/ui/enrollment-tokens",
            get(tokens::tokens).post(tokens::create_token),
        )
        .route(
            "/ui/enrollment-tokens/{id}/revoke",
            post(tokens::revoke_token),
        )
        .route("/ui/rollouts", get(rollouts::list).post(rollouts::create))
        .route("/ui/rollouts/preview", post(rollouts::preview))
        .route("/ui/rollouts/{id}", get(rollouts::detail))
        .route("/ui/rollouts/{id}/live", get(rollouts::live))
        .route("/ui/rollouts/{id}/edit", post(rollouts::edit))
        .route("/ui/rollouts/{id}/{action}", post(rollouts::act))
        .route("/ui/audit", get(admin::audit))
        .route("/ui/users", get(admin::users).post(admin::create_user))
        .route("/ui/users/{id}", get(people::detail).post(people::act))
        .route(
            "/ui/users/{id}/credentials/{credential}/revoke",
            post(account::revoke_credential),
        )
        .route("/ui/account", get(account::page))
        .route(
            PASSWORD_PAGE,
            get(account::password_page).post(account::change_password),
        )
        .route("/ui/account/tokens", post(account::create_token))
        .route("/ui/organizations", get(orgs::list).post(orgs::create))
        .route("/ui/organizations/{id}", post(orgs::act))
        .route("/ui/keyring", get(admin::keyring).post(admin::set_keyring))
        .layer(middleware::from_fn(security_headers))
}

/// Headers on every UI response: only this origin may supply scripts,
/// styles, images, form targets and connections; no framing.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

const CSS: &str = include_str!("../../assets/ui.css");
const JS: &str = include_str!("../../assets/ui.js");
const ICON: &str = include_str!("../../assets/icon.svg");

async fn asset(Path(name): Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "ui.css" => (CSS, "text/css; charset=utf-8"),
        "ui.js" => (JS, "text/javascript; charset=utf-8"),
        "icon.svg" => (ICON, "image/svg+xml"),
        _ => return UiError::not_found("no such asset").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// A logged-in operator, from the session cookie.
#[derive(Debug, Clone)]
pub struct Session {
    /// The operator, authenticated exactly as the API does it.
    pub op: Operator,
    /// This session's CSRF token.
    pub csrf: String,
}

impl Session {
    /// May the operator do what `role` may?
    pub fn can(&self, role: Role) -> bool {
        self.op.role >= role
    }
}

/// The CSRF token of a session: SHA-256 over a label and the session
/// secret. Only someone holding the (HttpOnly) cookie can compute it; it
/// changes with every login.
pub fn csrf_token(session_secret: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"kernex-ui-csrf\0");
    h.update(session_secret.as_bytes());
    hex::encode(h.finalize())
}

/// Compares two tokens in constant time.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && openssl::memcmp::eq(a.as_bytes(), b.as_bytes())
}

/// A cookie's value from the request.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(name)?.strip_prefix('='))
        .filter(|v| !v.is_empty())
}

/// Is the request served over TLS (directly or behind a proxy that says
/// so)? Cookies are then `Secure`.
pub fn is_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

impl FromRequestParts<AppState> for Session {
    type Rejection = UiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, UiError> {
        let login = || {
            if parts.method == Method::GET {
                UiError::Login {
                    next: parts
                        .uri
                        .path_and_query()
                        .map(|p| p.as_str().to_string())
                        .unwrap_or_default(),
                }
            } else {
                UiError::page(
                    StatusCode::UNAUTHORIZED,
                    "Not logged in",
                    "Your session has ended. Log in again.",
                )
            }
        };
        let Some(secret) = cookie(&parts.headers, SESSION_COOKIE) else {
            return Err(login());
        };
        // Authenticate exactly as the API does it: the store, every request.
        let op = match crate::auth::authenticate(&state.store, secret).await {
            Ok(op) => op,
            Err(crate::service::Error::Unauthorized) => return Err(login()),
            Err(e) => return Err(e.into()),
        };
        state.limits.check(
            &format!("user:{}", op.user_id),
            state.config.user_requests_per_minute,
        )?;
        if op.must_change_password && !PASSWORD_GATE_OPEN.contains(&parts.uri.path()) {
            return Err(if parts.method == Method::GET {
                UiError::Redirect(PASSWORD_PAGE.to_string())
            } else {
                UiError::page(
                    StatusCode::FORBIDDEN,
                    "Change your password",
                    "You must change your password before anything else.",
                )
            });
        }
        let csrf = csrf_token(secret);
        if parts.method != Method::GET && parts.method != Method::HEAD {
            // Mutations that are not forms (the upload) carry the header;
            // forms are checked by `Form` once the body is read.
            if let Some(sent) = parts.headers.get(CSRF_HEADER) {
                if !sent.to_str().is_ok_and(|s| same_token(s, &csrf)) {
                    return Err(UiError::csrf());
                }
                parts.extensions.insert(CsrfChecked);
            }
        }
        Ok(Session { op, csrf })
    }
}

/// The page where an operator who must change the password is sent.
pub const PASSWORD_PAGE: &str = "/ui/account/password";

/// What such an operator may still open.
const PASSWORD_GATE_OPEN: &[&str] = &[PASSWORD_PAGE, "/ui/logout"];

/// Marks a request whose CSRF header was checked.
#[derive(Debug, Clone, Copy)]
struct CsrfChecked;

/// Requires the CSRF header (for non-form mutations).
#[derive(Debug)]
pub struct CsrfHeader;

impl FromRequestParts<AppState> for CsrfHeader {
    type Rejection = UiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, UiError> {
        if parts.extensions.get::<CsrfChecked>().is_some() {
            return Ok(CsrfHeader);
        }
        Session::from_request_parts(parts, state).await?;
        if parts.extensions.get::<CsrfChecked>().is_some() {
            Ok(CsrfHeader)
        } else {
            Err(UiError::csrf())
        }
    }
}

/// A submitted form (`application/x-www-form-urlencoded`) of a logged-in
/// operator whose CSRF token matched. Repeated fields are kept.
#[derive(Debug)]
pub struct Form {
    /// The operator.
    pub session: Session,
    fields: Vec<(String, String)>,
}

impl Form {
    /// The first value of `name`, trimmed; empty counts as absent.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// Every non-empty value of `name`.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.fields
            .iter()
            .filter(|(k, v)| k == name && !v.trim().is_empty())
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }

    /// The value of `name`, or a 400 page naming the field.
    pub fn required(&self, name: &str, label: &str) -> Result<&str, UiError> {
        self.get(name).ok_or_else(|| {
            UiError::page(
                StatusCode::BAD_REQUEST,
                "Missing field",
                format!("{label} is required."),
            )
        })
    }
}

/// Parses a form body; a body that is not a form is a 400 page.
pub fn parse_form(headers: &HeaderMap, body: &[u8]) -> Result<Vec<(String, String)>, UiError> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return Err(UiError::page(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Not a form",
            "Expected a form submission (application/x-www-form-urlencoded).",
        ));
    }
    serde_urlencoded::from_bytes(body).map_err(|e| {
        UiError::page(
            StatusCode::BAD_REQUEST,
            "Malformed form",
            format!("The form could not be read: {e}."),
        )
    })
}

impl FromRequest<AppState> for Form {
    type Rejection = UiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, UiError> {
        let (mut parts, body) = req.into_parts();
        let session = Session::from_request_parts(&mut parts, state).await?;
        let bytes = axum::body::to_bytes(body, state.config.max_json_bytes)
            .await
            .map_err(|_| {
                UiError::page(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Form too large",
                    "The form is larger than the server accepts.",
                )
            })?;
        let fields = parse_form(&parts.headers, &bytes)?;
        let sent = fields
            .iter()
            .find(|(k, _)| k == CSRF_FIELD)
            .map(|(_, v)| v.as_str());
        let header_ok = parts.extensions.get::<CsrfChecked>().is_some();
        if !header_ok && !sent.is_some_and(|s| same_token(s, &session.csrf)) {
            return Err(UiError::csrf());
        }
        Ok(Form { session, fields })
    }
}

/// What a UI handler fails with: a redirect to the login page or an HTML
/// error page.
#[derive(Debug)]
pub enum UiError {
    /// Not logged in: go to the login page, then back to `next`.
    Login {
        /// Where to return.
        next: String,
    },
    /// Go elsewhere first (e.g. the forced password change).
    Redirect(String),
    /// An error page.
    Page {
        /// Status.
        status: StatusCode,
        /// Title.
        title: String,
        /// What went wrong and what to do.
        detail: String,
    },
}

impl UiError {
    /// An error page.
    pub fn page(status: StatusCode, title: &str, detail: impl Into<String>) -> Self {
        UiError::Page {
            status,
            title: title.to_string(),
            detail: detail.into(),
        }
    }

    /// 400 for a bad parameter.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::page(StatusCode::BAD_REQUEST, "Bad request", detail)
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::page(StatusCode::NOT_FOUND, "Not found", detail)
    }

    /// 403 for a missing or wrong CSRF token.
    pub fn csrf() -> Self {
        Self::page(
            StatusCode::FORBIDDEN,
            "Request refused",
            "The form's security token is missing or does not match your session. \
             Reload the page and try again.",
        )
    }

    /// 403 for a role that does not allow the page.
    pub fn forbidden() -> Self {
        Self::page(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "Your role does not allow this.",
        )
    }
}

impl From<Error> for UiError {
    fn from(e: Error) -> Self {
        match e {
            Error::BadRequest(d) => UiError::bad_request(d),
            Error::Unauthorized => UiError::page(
                StatusCode::UNAUTHORIZED,
                "Not logged in",
                "Your session has ended. Log in again.",
            ),
            Error::Forbidden => UiError::forbidden(),
            Error::Refused(d) => UiError::page(StatusCode::FORBIDDEN, "Refused", d),
            Error::NotFound(what) => UiError::not_found(capitalise(what)),
            Error::Conflict(d) => UiError::page(StatusCode::CONFLICT, "Conflict", d),
            Error::TooLarge(limit) => UiError::page(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Too large",
                if limit > 0 {
                    format!("The limit is {}.", format::bytes(limit))
                } else {
                    "The request is larger than the server accepts.".into()
                },
            ),
            Error::OverLimit(d) => UiError::page(StatusCode::PAYLOAD_TOO_LARGE, "Too large", d),
            Error::TooManyRequests(secs) => UiError::page(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many requests",
                format!("Try again in {secs} s."),
            ),
            Error::RangeNotSatisfiable(_) => {
                UiError::bad_request("The requested range cannot be served.")
            }
            Error::Unprocessable(d) => {
                UiError::page(StatusCode::UNPROCESSABLE_ENTITY, "Rejected", d)
            }
            Error::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "internal error in the web UI");
                UiError::page(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Internal error",
                    "The server failed to do this; the cause is in its log.",
                )
            }
        }
    }
}

impl From<crate::service::Error> for UiError {
    fn from(e: crate::service::Error) -> Self {
        Error::from(e).into()
    }
}

impl From<anyhow::Error> for UiError {
    fn from(e: anyhow::Error) -> Self {
        Error::Internal(e).into()
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        match self {
            UiError::Login { next } => {
                let target = if next.starts_with("/ui/") && !next.starts_with("/ui/login") {
                    format!("/ui/login?next={}", format::url_encode(&next))
                } else {
                    "/ui/login".to_string()
                };
                Redirect::to(&target).into_response()
            }
            UiError::Redirect(to) => Redirect::to(&to).into_response(),
            UiError::Page {
                status,
                title,
                detail,
            } => {
                let body = html! {
                    section.error-page role="alert" {
                        h1 { (status.as_u16()) " · " (title) }
                        p { (detail) }
                        p { a href="/ui/" { "Back to the fleet overview" } }
                    }
                };
                (status, layout::bare(&title, body)).into_response()
            }
        }
    }
}

/// A UI handler's result.
pub type UiResult<T = Response> = Result<T, UiError>;

/// A hidden input with the session's CSRF token.
pub fn csrf_field(s: &Session) -> Markup {
    html! { input type="hidden" name=(CSRF_FIELD) value=(s.csrf); }
}

/// 303 to `to` (after a successful form post).
pub fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}
