//! The page frame (header, navigation, skip link), the login page, login
//! and logout.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;

use super::{
    CSRF_FIELD, Form, LOGIN_CSRF_COOKIE, Session, UiError, UiResult, cookie, csrf_field, is_https,
    parse_form, same_token, see_other,
};
use kernex_protocol::api::ReportState;

use crate::AppState;
use crate::auth::{Role, SESSION_COOKIE};
use crate::service::Error as ServiceError;
use crate::service::users::{self, LoginRequest};
use crate::store::new_secret;

/// Which navigation entry is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Overview,
    Devices,
    Releases,
    Deployments,
    Rollouts,
    Tokens,
    Audit,
    Users,
    Keyring,
    Account,
    Orgs,
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · Kernex" }
            link rel="icon" href="/ui/assets/icon.svg" type="image/svg+xml";
            link rel="stylesheet" href="/ui/assets/ui.css";
            script src="/ui/assets/ui.js" defer {}
        }
    }
}

/// A full page for a logged-in operator.
pub fn page(s: &Session, nav: Nav, title: &str, body: Markup) -> Response {
    let entries: [(Nav, &str, &str, Role); 9] = [
        (Nav::Overview, "/ui/", "Overview", Role::ReadOnly),
        (Nav::Devices, "/ui/devices", "Devices", Role::ReadOnly),
        (Nav::Releases, "/ui/releases", "Releases", Role::ReadOnly),
        (Nav::Rollouts, "/ui/rollouts", "Rollouts", Role::ReadOnly),
        (
            Nav::Deployments,
            "/ui/deployments",
            "Deployments",
            Role::ReadOnly,
        ),
        (
            Nav::Tokens,
            "/ui/enrollment-tokens",
            "Enrollment",
            Role::ReadOnly,
        ),
        (Nav::Audit, "/ui/audit", "Audit log", Role::ReadOnly),
        (Nav::Users, "/ui/users", "Users", Role::Admin),
        (Nav::Keyring, "/ui/keyring", "Keyring", Role::Admin),
    ];
    let orgs = s.op.instance_admin;
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/ui/" { (PreEscaped(LOGO)) span { "Kernex" } }
                    nav aria-label="Main" {
                        ul {
                            @for (n, href, label, role) in entries {
                                @if s.can(role) {
                                    li {
                                        @if n == nav {
                                            a href=(href) aria-current="page" { (label) }
                                        } @else {
                                            a href=(href) { (label) }
                                        }
                                    }
                                }
                            }
                            @if orgs {
                                li {
                                    @if nav == Nav::Orgs {
                                        a href="/ui/organizations" aria-current="page" { "Organisations" }
                                    } @else {
                                        a href="/ui/organizations" { "Organisations" }
                                    }
                                }
                            }
                        }
                    }
                    div.who {
                        a #my-account href="/ui/account" aria-current=[(nav == Nav::Account).then_some("page")] { (s.op.email) }
                        span.badge.role { (s.op.role.as_str().replace('_', "-")) }
                        form method="post" action="/ui/logout" {
                            (csrf_field(s))
                            button.link type="submit" { "Log out" }
                        }
                    }
                }
                main #main tabindex="-1" {
                    (body)
                }
                footer { "Kernex control plane · all assets served by this server" }
            }
        }
    };
    html_response(markup)
}

/// A page without navigation (login, errors).
pub fn bare(title: &str, body: Markup) -> Response {
    html_response(html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body.bare {
                header.top {
                    a.brand href="/ui/" { (PreEscaped(LOGO)) span { "Kernex" } }
                }
                main #main tabindex="-1" { (body) }
            }
        }
    })
}

/// An HTML fragment (for the script's live updates).
pub fn fragment(markup: Markup) -> Response {
    html_response(markup)
}

fn html_response(markup: Markup) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        markup.into_string(),
    )
        .into_response()
}

const LOGO: &str = r#"<svg aria-hidden="true" width="22" height="22" viewBox="0 0 24 24"><rect x="2" y="2" width="9" height="20" rx="2" class="logo-a"/><rect x="13" y="2" width="9" height="20" rx="2" class="logo-b"/></svg>"#;

/// Query of the login page.
#[derive(Debug, Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
}

fn login_form(csrf: &str, next: &str, email: &str, error: Option<&str>) -> Markup {
    html! {
        section.login {
            h1 { "Log in to Kernex" }
            @if let Some(e) = error {
                p.error role="alert" { (e) }
            }
            form method="post" action="/ui/login" {
                input type="hidden" name=(CSRF_FIELD) value=(csrf);
                input type="hidden" name="next" value=(next);
                label for="email" { "Email" }
                input #email type="email" name="email" value=(email) autocomplete="username" required autofocus;
                label for="password" { "Password" }
                input #password type="password" name="password" autocomplete="current-password" required;
                details {
                    summary { "Organisation" }
                    label for="organization" { "Organisation (default: the server's)" }
                    input #organization type="text" name="organization" autocomplete="organization";
                }
                button.primary type="submit" { "Log in" }
            }
        }
    }
}

fn login_response(
    status: StatusCode,
    headers: &HeaderMap,
    body: impl Fn(&str) -> Markup,
) -> UiResult {
    // Double-submit token: a random value in an HttpOnly, SameSite=Strict
    // cookie and the same in the form. A cross-site page can neither read
    // nor set it.
    let token = new_secret("kxl")?;
    let mut response = (status, bare("Log in", body(&token))).into_response();
    let cookie = format!(
        "{LOGIN_CSRF_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/ui/login; Max-Age=3600{}",
        if is_https(headers) { "; Secure" } else { "" }
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(response)
}

fn safe_next(next: Option<&str>) -> String {
    match next {
        // Only our own pages: no `//host`, no scheme, no login loop.
        Some(n)
            if n.starts_with("/ui/")
                && !n.starts_with("/ui/login")
                && !n.contains("//")
                && !n.contains('\\') =>
        {
            n.to_string()
        }
        _ => "/ui/".to_string(),
    }
}

/// `GET /ui/login`.
pub async fn login_page(
    headers: HeaderMap,
    query: Result<Query<LoginQuery>, axum::extract::rejection::QueryRejection>,
) -> UiResult {
    let next = safe_next(query.ok().and_then(|q| q.0.next).as_deref());
    login_response(StatusCode::OK, &headers, |csrf| {
        login_form(csrf, &next, "", None)
    })
}

/// `POST /ui/login`: checks the double-submit token, then logs in through
/// the API's login (same password check, same token table) and sets the
/// session cookie.
pub async fn login(
    State(state): State<AppState>,
    crate::serve::ClientAddr(from): crate::serve::ClientAddr,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> UiResult {
    let fields = parse_form(&headers, &body)?;
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let expected = cookie(&headers, LOGIN_CSRF_COOKIE);
    let sent = field(CSRF_FIELD);
    match (expected, sent) {
        (Some(e), Some(s)) if same_token(e, &s) => {}
        _ => return Err(UiError::csrf()),
    }
    let next = safe_next(field("next").as_deref());
    let email = field("email").unwrap_or_default();
    let password = fields
        .iter()
        .find(|(k, _)| k == "password")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let request = LoginRequest {
        organization: field("organization"),
        email: email.clone(),
        password,
    };
    let fail = |message: &'static str| {
        login_response(StatusCode::UNAUTHORIZED, &headers, |csrf| {
            login_form(csrf, &next, &email, Some(message))
        })
    };
    if request.email.is_empty() || request.password.is_empty() {
        return fail("Enter your email and password.");
    }
    let (token, must_change) =
        match crate::service::login_throttle::login(&state, request, from).await {
            Ok(session) => (session.token, session.must_change_password),
            Err(ServiceError::Unauthorized) => {
                return fail("Wrong email, password or organisation.");
            }
            Err(e) => return Err(e.into()),
        };
    let mut response = see_other(if must_change {
        super::PASSWORD_PAGE
    } else {
        &next
    });
    let secure = if is_https(&headers) { "; Secure" } else { "" };
    let session = format!(
        "{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
        state.config.token_ttl_secs
    );
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&session) {
        h.append(header::SET_COOKIE, v);
    }
    h.append(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "kernex_login_csrf=; HttpOnly; SameSite=Strict; Path=/ui/login; Max-Age=0",
        ),
    );
    Ok(response)
}

/// `POST /ui/logout`: revokes the session token (the API's logout).
pub async fn logout(State(state): State<AppState>, form: Form) -> UiResult {
    users::logout(&state, &form.session.op).await?;
    let mut response = see_other("/ui/login");
    response.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_static("kernex_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    Ok(response)
}

/// A page heading with optional actions on the right.
pub fn heading(title: &str, subtitle: Option<Markup>) -> Markup {
    html! {
        div.heading {
            h1 { (title) }
            @if let Some(s) = subtitle { p.sub { (s) } }
        }
    }
}

/// A status badge.
pub fn status_badge(status: &str) -> Markup {
    let class = match ReportState::parse(status) {
        // What a device reported about an install (deployment and rollout
        // records keep the report's state).
        Some(state) => super::charts::report_class(state),
        None => match status {
            "online" | "success" | "ok" | "done" | "completed" | "attested" => "good",
            "updating" | "rebooting" | "assigned" | "in_progress" | "pending" | "running"
            | "current" | "scheduled" | "rolling_back" => "busy",
            "degraded" | "offline" | "paused" | "expired" | "stale" => "warn",
            "error" | "revoked" | "unstable" | "aborted" | "mismatch" => "bad",
            _ => "neutral",
        },
    };
    html! { span class={ "badge " (class) } { (status.replace('_', " ")) } }
}
