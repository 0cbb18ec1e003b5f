//! The web UI at the HTTP level, on SQLite and PostgreSQL: login through
//! the form, every page renders, CSRF and roles are enforced server-side,
//! bad input gets an error page (never a 500), everything is escaped and
//! every asset is same-origin. The browser tests are in `ui_browser.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode};
use common::{Harness, golden};
use serde_json::json;

/// A browser session: the session cookie and the page's CSRF token.
struct Ui {
    cookie: String,
    csrf: String,
}

fn set_cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| {
            let first = c.split(';').next()?;
            first
                .strip_prefix(name)?
                .strip_prefix('=')
                .map(str::to_string)
        })
}

fn hidden(html: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html
        .find(&marker)
        .unwrap_or_else(|| panic!("no {name} field in {html}"))
        + marker.len();
    html[start..start + html[start..].find('"').unwrap()].to_string()
}

fn form(fields: &[(&str, &str)]) -> Body {
    Body::from(serde_urlencoded::to_string(fields).unwrap())
}

async fn text(
    h: &Harness,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Body,
) -> (StatusCode, HeaderMap, String) {
    let (s, hd, bytes) = h.raw(method, path, None, headers, body).await;
    (s, hd, String::from_utf8(bytes).unwrap())
}

async fn login(h: &Harness, email: &str, password: &str) -> Ui {
    let (s, hd, page) = text(h, Method::GET, "/ui/login", &[], Body::empty()).await;
    assert_eq!(s, StatusCode::OK);
    let pre = set_cookie(&hd, "kernex_login_csrf").expect("login CSRF cookie");
    let csrf = hidden(&page, "csrf");
    assert_eq!(pre, csrf);
    let cookie = format!("kernex_login_csrf={pre}");
    let (s, hd, body) = text(
        h,
        Method::POST,
        "/ui/login",
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("cookie", &cookie),
        ],
        form(&[
            ("csrf", &csrf),
            ("email", email),
            ("password", password),
            ("next", "/ui/devices"),
        ]),
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER, "{body}");
    assert_eq!(hd.get("location").unwrap(), "/ui/devices");
    let raw = hd
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("kernex_session="))
        .unwrap();
    assert!(
        raw.contains("HttpOnly") && raw.contains("SameSite=Strict"),
        "{raw}"
    );
    assert!(!raw.contains("Secure"), "plain HTTP: no Secure flag: {raw}");
    let session = set_cookie(&hd, "kernex_session").unwrap();
    let cookie = format!("kernex_session={session}");
    let (s, _, page) = text(
        h,
        Method::GET,
        "/ui/",
        &[("cookie", &cookie)],
        Body::empty(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    Ui {
        cookie,
        csrf: hidden(&page, "csrf"),
    }
}

async fn get(h: &Harness, ui: &Ui, path: &str) -> (StatusCode, String) {
    let (s, hd, body) = text(
        h,
        Method::GET,
        path,
        &[("cookie", &ui.cookie)],
        Body::empty(),
    )
    .await;
    if s == StatusCode::OK {
        assert!(
            hd.get("content-security-policy")
                .unwrap()
                .to_str()
                .unwrap()
                .contains("default-src 'none'")
        );
    }
    (s, body)
}

async fn post(
    h: &Harness,
    ui: &Ui,
    path: &str,
    fields: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    text(
        h,
        Method::POST,
        path,
        &[
            ("cookie", &ui.cookie),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        form(fields),
    )
    .await
}

/// Every `src`, `href` and `action` in a page is a path on this server.
fn assert_same_origin(page: &str) {
    for attr in ["src=\"", "href=\"", "action=\""] {
        for (i, _) in page.match_indices(attr) {
            let v = &page[i + attr.len()..];
            let v = &v[..v.find('"').unwrap()];
            assert!(
                (v.starts_with('/') && !v.starts_with("//")) || v.starts_with('#'),
                "{attr}{v} is not same-origin"
            );
        }
    }
    assert!(!page.contains("@import") && !page.contains("url(http"));
}

/// Enrolls `n` devices, heartbeats and logs for the first.
async fn fleet(h: &Harness) -> Vec<(String, String)> {
    let (_, enrollment) = h.enrollment_token(&h.admin, &["site-a"]).await;
    let mut out = Vec::new();
    for (i, class) in ["qemu-aarch64", "qemu-aarch64", "raspberrypi4-64"]
        .iter()
        .enumerate()
    {
        let (id, cred) = h.enroll(&enrollment, &format!("dev-{i}"), class).await;
        out.push((id, cred));
    }
    let cred = &out[0].1;
    for cpu in [10.0, 35.5, 20.0] {
        let (s, _) = h
            .call(
                Method::POST,
                "/api/v1/device/heartbeat",
                Some(cred),
                Some(
                    json!({"cpu_percent": cpu, "memory_used_bytes": 400, "memory_total_bytes": 1000,
                    "version": "1.0.0", "booted_slot": "A", "primary_slot": "A"}),
                ),
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT);
    }
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/logs",
            Some(cred),
            Some(json!({"entries": [
                {"level": "info", "message": "agent started"},
                {"level": "error", "message": "inference <b>failed</b>"},
            ]})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // The third device is degraded.
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/heartbeat",
            Some(&out[2].1),
            Some(json!({"memory_used_bytes": 950, "memory_total_bytes": 1000})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    out
}

async fn every_page_renders_for_an_admin(h: Arc<Harness>) {
    let devices = fleet(&h).await;
    let (s, body) = h
        .upload(&h.admin, std::fs::read(golden("valid.kxb")).unwrap())
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let release = body["id"].as_str().unwrap().to_string();
    let password = first_password(&h).await;
    let ui = login(&h, "ui-admin@localhost", &password).await;
    let dev = &devices[0].0;
    let pages = [
        ("/ui/".to_string(), "Fleet overview"),
        ("/ui/live/overview".to_string(), "Devices by status"),
        ("/ui/devices".to_string(), "dev-2"),
        ("/ui/devices?status=degraded".to_string(), "dev-2"),
        (format!("/ui/devices/{dev}"), "agent started"),
        (
            format!("/ui/devices/{dev}?level=error"),
            "inference &lt;b&gt;failed&lt;/b&gt;",
        ),
        (format!("/ui/devices/{dev}/live"), "<polyline"),
        ("/ui/releases".to_string(), "Upload a release"),
        (format!("/ui/releases/{release}"), "Signed manifest"),
        (
            format!("/ui/releases/delta?from={release}&to={release}"),
            "downloaded per device",
        ),
        ("/ui/deployments".to_string(), "New deployment"),
        (
            format!("/ui/deployments?release={release}"),
            "Review deployment",
        ),
        ("/ui/enrollment-tokens".to_string(), "batch 1"),
        ("/ui/audit".to_string(), "hash chain verifies"),
        (
            "/ui/audit?action=release&since=2020-01-01".to_string(),
            "release.upload",
        ),
        ("/ui/users".to_string(), "admin@localhost"),
        ("/ui/keyring".to_string(), "SHA-256 fingerprint"),
    ];
    for (path, expect) in &pages {
        let (s, page) = get(&h, &ui, path).await;
        assert_eq!(s, StatusCode::OK, "{path}: {page}");
        assert!(page.contains(expect), "{path} lacks {expect:?}: {page}");
        assert_same_origin(&page);
    }
    // The error-level filter shows only error lines.
    let (_, page) = get(&h, &ui, &format!("/ui/devices/{dev}?level=error")).await;
    assert!(!page.contains("agent started"));
    // The overview's counts are the API's.
    let (_, page) = get(&h, &ui, "/ui/live/overview").await;
    let (_, api) = h
        .call(Method::GET, "/api/v1/devices", Some(&h.admin), None)
        .await;
    let total = api.as_array().unwrap().len();
    assert!(
        page.contains(&format!(
            "data-count=\"total\"><span class=\"big\">{total}</span>"
        )),
        "{page}"
    );
    let degraded = api
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["status"] == "degraded")
        .count();
    assert_eq!(degraded, 1);
    assert!(
        page.contains(&format!(
            "data-count=\"degraded\"><span class=\"big\">{degraded}</span>"
        )),
        "{page}"
    );
    // A deployment through the confirmation step.
    let (s, _, page) = post(
        &h,
        &ui,
        "/ui/deployments/confirm",
        &[
            ("csrf", &ui.csrf),
            ("release_id", &release),
            ("device", dev),
            ("device", &devices[1].0),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert!(
        page.contains("Deploy now") && page.contains("2 device(s)"),
        "{page}"
    );
    assert_eq!(
        h.count("deployments").await,
        0,
        "the confirmation page deploys nothing"
    );
    let (s, hd, page) = post(
        &h,
        &ui,
        "/ui/deployments",
        &[
            ("csrf", &ui.csrf),
            ("release_id", &release),
            ("device", dev),
            ("device", &devices[1].0),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER, "{page}");
    let location = hd.get("location").unwrap().to_str().unwrap().to_string();
    let (s, page) = get(&h, &ui, &location).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        page.contains("dev-0") && page.contains("assigned"),
        "{page}"
    );
    let (_, api) = h
        .call(Method::GET, "/api/v1/deployments", Some(&h.admin), None)
        .await;
    assert_eq!(api.as_array().unwrap().len(), 1);
    // An enrollment token, shown once, that really enrolls.
    let (s, _, page) = post(
        &h,
        &ui,
        "/ui/enrollment-tokens",
        &[
            ("csrf", &ui.csrf),
            ("label", "line <2>"),
            ("tags", "site-b, metered"),
            ("expires_days", "30"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{page}");
    assert!(page.contains("line &lt;2&gt;") && !page.contains("line <2>"));
    let token = page.split("id=\"new-token\"").nth(1).unwrap();
    let token = &token[token.find("kxe_").unwrap()..];
    let token = &token[..token.find('<').unwrap()];
    h.enroll(token, "dev-from-ui", "qemu-aarch64").await;
    let (_, page) = get(&h, &ui, "/ui/enrollment-tokens").await;
    assert!(!page.contains(token), "the token is shown only once");
    // Logout revokes the session.
    let (s, _, _) = post(&h, &ui, "/ui/logout", &[("csrf", &ui.csrf)]).await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let (s, hd, _) = text(
        &h,
        Method::GET,
        "/ui/devices",
        &[("cookie", &ui.cookie)],
        Body::empty(),
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(hd.get("location").unwrap(), "/ui/login?next=/ui/devices");
}

/// The harness logs the admin in through the API; the UI needs the
/// password, so give the admin a known one through a second admin.
async fn first_password(h: &Harness) -> String {
    let (s, body) = h
        .call(
            Method::POST,
            "/api/v1/users",
            Some(&h.admin),
            Some(json!({"email": "ui-admin@localhost", "password": "a long admin password", "role": "admin"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    "a long admin password".to_string()
}

async fn csrf_is_checked_on_every_mutation(h: Arc<Harness>) {
    let password = first_password(&h).await;
    let ui = login(&h, "ui-admin@localhost", &password).await;
    let other = login(&h, "ui-admin@localhost", &password).await;
    assert_ne!(ui.csrf, other.csrf, "each session has its own token");
    let before = h.count("enrollment_tokens").await;
    for fields in [
        vec![("label", "no token")],
        vec![("label", "wrong token"), ("csrf", "0000")],
        vec![
            ("label", "other session's token"),
            ("csrf", other.csrf.as_str()),
        ],
    ] {
        let (s, _, page) = post(&h, &ui, "/ui/enrollment-tokens", &fields).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{fields:?}: {page}");
        assert!(page.contains("security token"), "{page}");
    }
    for path in ["/ui/logout", "/ui/users", "/ui/keyring", "/ui/deployments"] {
        let (s, _, _) = post(&h, &ui, path, &[("x", "y")]).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}");
    }
    assert_eq!(h.count("enrollment_tokens").await, before);
    // The upload needs the header.
    let bundle = std::fs::read(golden("valid.kxb")).unwrap();
    let (s, _, _) = h
        .raw(
            Method::POST,
            "/ui/releases/upload",
            None,
            &[
                ("cookie", &ui.cookie),
                ("content-type", "application/octet-stream"),
            ],
            Body::from(bundle.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(h.count("releases").await, 0);
    let (s, _, body) = h
        .raw(
            Method::POST,
            "/ui/releases/upload",
            None,
            &[
                ("cookie", &ui.cookie),
                ("content-type", "application/octet-stream"),
                ("x-csrf-token", &ui.csrf),
            ],
            Body::from(bundle),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{}", String::from_utf8_lossy(&body));
    assert_eq!(h.count("releases").await, 1);
    // The login form needs its double-submit cookie.
    let (s, _, _) = text(
        &h,
        Method::POST,
        "/ui/login",
        &[("content-type", "application/x-www-form-urlencoded")],
        form(&[
            ("csrf", "kxl_x"),
            ("email", "ui-admin@localhost"),
            ("password", &password),
        ]),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // The JSON API still refuses the cookie for form posts.
    let (s, _, _) = h
        .raw(
            Method::POST,
            "/api/v1/enrollment-tokens",
            None,
            &[
                ("cookie", &ui.cookie),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            form(&[("label", "x")]),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(h.count("enrollment_tokens").await, before);
}

async fn read_only_sees_no_controls_and_is_refused(h: Arc<Harness>) {
    fleet(&h).await;
    let (s, _) = h
        .upload(&h.admin, std::fs::read(golden("valid.kxb")).unwrap())
        .await;
    assert_eq!(s, StatusCode::CREATED);
    h.user("viewer@localhost", "read_only").await;
    let ui = login(&h, "viewer@localhost", "correct horse battery").await;
    let (_, api) = h
        .call(Method::GET, "/api/v1/devices", Some(&h.admin), None)
        .await;
    let dev = api[0]["id"].as_str().unwrap().to_string();
    for path in [
        "/ui/".to_string(),
        "/ui/devices".to_string(),
        format!("/ui/devices/{dev}"),
        "/ui/releases".to_string(),
        "/ui/deployments".to_string(),
        "/ui/enrollment-tokens".to_string(),
        "/ui/audit".to_string(),
        "/ui/keyring".to_string(),
    ] {
        let (s, page) = get(&h, &ui, &path).await;
        assert_eq!(s, StatusCode::OK, "{path}");
        let posts = page.matches("method=\"post\"").count();
        assert_eq!(posts, 1, "{path}: only the logout form: {page}");
        assert!(page.contains("action=\"/ui/logout\""));
        assert!(!page.contains("type=\"file\""), "{path}");
        assert!(!page.contains("/ui/users"), "{path}: no admin links");
    }
    let (s, _) = get(&h, &ui, "/ui/users").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Forged posts with a valid CSRF token: the role check refuses them.
    let before = (h.count("enrollment_tokens").await, h.count("users").await);
    for (path, fields) in [
        ("/ui/enrollment-tokens", vec![("label", "forged")]),
        (
            "/ui/users",
            vec![
                ("email", "evil@x"),
                ("password", "long enough password"),
                ("role", "admin"),
            ],
        ),
        (&format!("/ui/devices/{dev}/revoke") as &str, vec![]),
        ("/ui/keyring", vec![("pem", "x")]),
    ] {
        let mut fields = fields.clone();
        fields.push(("csrf", &ui.csrf));
        let (s, _, page) = post(&h, &ui, path, &fields).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}: {page}");
    }
    assert_eq!(
        (h.count("enrollment_tokens").await, h.count("users").await),
        before
    );
    let (_, api) = h
        .call(
            Method::GET,
            &format!("/api/v1/devices/{dev}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(api["revoked"], false);
}

async fn bad_input_gets_an_error_page(h: Arc<Harness>) {
    let password = first_password(&h).await;
    let ui = login(&h, "ui-admin@localhost", &password).await;
    for (path, status) in [
        ("/ui/devices?status=sleeping", StatusCode::BAD_REQUEST),
        ("/ui/devices?nonsense=1", StatusCode::BAD_REQUEST),
        ("/ui/devices/nope", StatusCode::NOT_FOUND),
        ("/ui/devices/nope/live", StatusCode::NOT_FOUND),
        ("/ui/audit?since=yesterday", StatusCode::BAD_REQUEST),
        ("/ui/audit?before=x", StatusCode::BAD_REQUEST),
        ("/ui/releases/nope", StatusCode::NOT_FOUND),
        ("/ui/releases/delta?from=a", StatusCode::BAD_REQUEST),
        ("/ui/releases/delta?from=a&to=b", StatusCode::NOT_FOUND),
        ("/ui/deployments/nope", StatusCode::NOT_FOUND),
        ("/ui/assets/secret.txt", StatusCode::NOT_FOUND),
    ] {
        let (s, page) = get(&h, &ui, path).await;
        assert_eq!(s, status, "{path}: {page}");
        assert!(
            page.contains("<h1>") && page.contains("Back to the fleet overview"),
            "{path}: {page}"
        );
    }
    for (path, fields, status) in [
        (
            "/ui/deployments",
            vec![("release_id", "x")],
            StatusCode::BAD_REQUEST,
        ),
        (
            "/ui/deployments",
            vec![("release_id", "x"), ("device", "y")],
            StatusCode::NOT_FOUND,
        ),
        (
            "/ui/enrollment-tokens",
            vec![("label", "x"), ("tags", "bad/tag")],
            StatusCode::BAD_REQUEST,
        ),
        (
            "/ui/enrollment-tokens",
            vec![("label", "x"), ("expires_days", "-1")],
            StatusCode::BAD_REQUEST,
        ),
        ("/ui/enrollment-tokens", vec![], StatusCode::BAD_REQUEST),
        (
            "/ui/users",
            vec![("email", "a@b"), ("password", "short"), ("role", "ops")],
            StatusCode::BAD_REQUEST,
        ),
        (
            "/ui/users",
            vec![
                ("email", "a@b"),
                ("password", "long enough password"),
                ("role", "root"),
            ],
            StatusCode::BAD_REQUEST,
        ),
        (
            "/ui/keyring",
            vec![("pem", "not a certificate")],
            StatusCode::BAD_REQUEST,
        ),
        ("/ui/devices/nope/revoke", vec![], StatusCode::NOT_FOUND),
    ] {
        let mut fields = fields.clone();
        fields.push(("csrf", &ui.csrf));
        let (s, _, page) = post(&h, &ui, path, &fields).await;
        assert_eq!(s, status, "{path} {fields:?}: {page}");
        assert!(page.contains("<h1>"), "{page}");
    }
    // Not a form at all.
    let (s, _, _) = text(
        &h,
        Method::POST,
        "/ui/enrollment-tokens",
        &[("cookie", &ui.cookie), ("content-type", "application/json")],
        Body::from("{}"),
    )
    .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Wrong password: the login page again, 401.
    let (_, hd, page) = text(&h, Method::GET, "/ui/login", &[], Body::empty()).await;
    let pre = set_cookie(&hd, "kernex_login_csrf").unwrap();
    let (s, _, page2) = text(
        &h,
        Method::POST,
        "/ui/login",
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("cookie", &format!("kernex_login_csrf={pre}")),
        ],
        form(&[
            ("csrf", &hidden(&page, "csrf")),
            ("email", "ui-admin@localhost"),
            ("password", "wrong"),
            ("next", "//evil.example/"),
        ]),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(page2.contains("Wrong email, password or organisation"));
    assert!(
        !page2.contains("evil.example"),
        "an outside next is dropped"
    );
    // Not logged in: pages redirect to the login page, posts are refused.
    let (s, hd, _) = text(&h, Method::GET, "/ui/audit?action=x", &[], Body::empty()).await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(
        hd.get("location").unwrap(),
        "/ui/login?next=/ui/audit%3Faction%3Dx"
    );
    let (s, _, _) = text(
        &h,
        Method::POST,
        "/ui/enrollment-tokens",
        &[("content-type", "application/x-www-form-urlencoded")],
        form(&[("label", "x")]),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // HTTPS behind a proxy: Secure cookies.
    let (_, hd, _) = text(
        &h,
        Method::GET,
        "/ui/login",
        &[("x-forwarded-proto", "https")],
        Body::empty(),
    )
    .await;
    let raw = hd.get("set-cookie").unwrap().to_str().unwrap();
    assert!(raw.contains("; Secure"), "{raw}");
    // Assets are served by the binary.
    for asset in [
        "/ui/assets/ui.css",
        "/ui/assets/ui.js",
        "/ui/assets/icon.svg",
    ] {
        let (s, _, body) = text(&h, Method::GET, asset, &[], Body::empty()).await;
        assert_eq!(s, StatusCode::OK);
        let body = body.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
        assert!(
            !body.contains("http://") && !body.contains("https://"),
            "{asset} refers elsewhere"
        );
    }
}

async fn rollouts_through_the_pages(h: Arc<Harness>) {
    let devices = fleet(&h).await;
    let (s, body) = h
        .upload(&h.admin, std::fs::read(golden("valid.kxb")).unwrap())
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let release = body["id"].as_str().unwrap().to_string();
    let password = first_password(&h).await;
    let ui = login(&h, "ui-admin@localhost", &password).await;
    let (s, page) = get(&h, &ui, "/ui/rollouts").await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("New rollout"), "{page}");
    let fields = |waves: &'static str| {
        vec![
            ("release_id", release.clone()),
            ("name", "r1".to_string()),
            ("waves", waves.to_string()),
            ("soak_minutes", "0".to_string()),
            ("promote_max_error_pct", "1".to_string()),
            ("rollback_error_pct", "5".to_string()),
            ("promote_min_committed_pct", "90".to_string()),
            ("egress_cap_mb_s", "125".to_string()),
            ("metered_budget_mb_day", "50".to_string()),
            ("metered_cost_per_gb", "5".to_string()),
            ("csrf", ui.csrf.clone()),
        ]
    };
    // The preview page shows the API's numbers.
    let (s, _, page) = post_owned(&h, &ui, "/ui/rollouts/preview", fields("1, 100%")).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    let (s, api) = h
        .call(Method::POST, "/api/v1/rollouts/preview", Some(&h.admin), Some(json!({
            "release_id": release, "waves": [{"count": 1, "soak_secs": 0}, {"percent": 100.0, "soak_secs": 0}]})))
        .await;
    assert_eq!(s, StatusCode::OK, "{api}");
    let targets = api["targets"].as_u64().unwrap();
    assert!(targets >= 1 && targets < devices.len() as u64, "{api}");
    assert!(
        page.contains(&format!(
            "data-preview=\"bytes\" data-value=\"{}\"",
            api["total_bytes"]
        )),
        "{page}"
    );
    assert!(
        page.contains(&format!(
            "data-preview=\"targets\"><span class=\"big\">{targets}</span>"
        )),
        "{page}"
    );
    assert_eq!(h.count("rollouts").await, 0, "a preview saves nothing");
    // Bad input: a page that names the field.
    for (waves, needle) in [("abc", "Wave \"abc\""), ("", "at least one")] {
        let (s, _, page) = post_owned(&h, &ui, "/ui/rollouts/preview", fields(waves)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
        assert!(page.contains(&needle.replace('"', "&quot;")), "{page}");
    }
    let mut half_window = fields("100%");
    half_window.push(("window_start", "01:00".into()));
    let (s, _, page) = post_owned(&h, &ui, "/ui/rollouts/preview", half_window).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(page.contains("Maintenance window"));
    // Create (requiring attestation), then start, pause, resume, abort.
    let mut attested = fields("1, 100%");
    attested.push(("require_attestation", "1".into()));
    let (s, hd, page) = post_owned(&h, &ui, "/ui/rollouts", attested).await;
    assert_eq!(s, StatusCode::SEE_OTHER, "{page}");
    let location = hd.get("location").unwrap().to_str().unwrap().to_string();
    let id = location.rsplit('/').next().unwrap().to_string();
    let (_, api) = h
        .call(
            Method::GET,
            &format!("/api/v1/rollouts/{id}"),
            Some(&h.admin),
            None,
        )
        .await;
    for wave in api["spec"]["waves"].as_array().unwrap() {
        assert_eq!(wave["gates"]["require_attestation"], true, "{api}");
    }
    // These devices have no TPM: the preview warns, and a start is a 422
    // page that says why (every wave requires attestation).
    let mut attested_preview = fields("1, 100%");
    attested_preview.push(("require_attestation", "1".into()));
    let (s, _, page) = post_owned(&h, &ui, "/ui/rollouts/preview", attested_preview).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert!(page.contains("data-preview=\"warning\""), "{page}");
    assert!(page.contains("cannot be attested"), "{page}");
    let (s, _, page) = post_owned(
        &h,
        &ui,
        &format!("/ui/rollouts/{id}/start"),
        vec![("csrf", ui.csrf.clone())],
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{page}");
    assert!(
        page.contains("have no TPM and every wave requires attestation"),
        "{page}"
    );
    // The lifecycle on a rollout without the gate.
    let (s, hd, page) = post_owned(&h, &ui, "/ui/rollouts", fields("1, 100%")).await;
    assert_eq!(s, StatusCode::SEE_OTHER, "{page}");
    let location = hd.get("location").unwrap().to_str().unwrap().to_string();
    let id = location.rsplit('/').next().unwrap().to_string();
    let (s, page) = get(&h, &ui, &location).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        page.contains("data-action=\"start\"") && page.contains("Preview"),
        "{page}"
    );
    for (action, status) in [
        ("start", "running"),
        ("pause", "paused"),
        ("resume", "running"),
        ("abort", "aborted"),
    ] {
        let (s, _, page) = post_owned(
            &h,
            &ui,
            &format!("/ui/rollouts/{id}/{action}"),
            vec![("csrf", ui.csrf.clone())],
        )
        .await;
        assert_eq!(s, StatusCode::SEE_OTHER, "{action}: {page}");
        let (_, api) = h
            .call(
                Method::GET,
                &format!("/api/v1/rollouts/{id}"),
                Some(&h.admin),
                None,
            )
            .await;
        assert_eq!(api["status"], status, "{action}");
        let (_, page) = get(&h, &ui, &format!("/ui/rollouts/{id}/live")).await;
        assert!(
            page.contains(&format!("data-status=\"{status}\"")),
            "{page}"
        );
    }
    // The targeted device's page lists the rollout.
    let (_, page) = get(&h, &ui, &format!("/ui/devices/{}", devices[1].0)).await;
    assert!(
        page.contains(&format!("href=\"/ui/rollouts/{id}\"")),
        "{page}"
    );
    // A transition the state does not allow is a 409 page.
    let (s, _, page) = post_owned(
        &h,
        &ui,
        &format!("/ui/rollouts/{id}/pause"),
        vec![("csrf", ui.csrf.clone())],
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{page}");
    let explode = format!("/ui/rollouts/{id}/explode");
    let (s, _, _) = post_owned(&h, &ui, &explode, vec![("csrf", ui.csrf.clone())]).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = post_owned(&h, &ui, &explode, vec![]).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "no CSRF token");
    // A read-only operator sees the rollout but no control, and is refused.
    h.user("viewer@localhost", "read_only").await;
    let viewer = login(&h, "viewer@localhost", "correct horse battery").await;
    for path in ["/ui/rollouts".to_string(), format!("/ui/rollouts/{id}")] {
        let (s, page) = get(&h, &viewer, &path).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            page.matches("method=\"post\"").count(),
            1,
            "{path}: only logout"
        );
    }
    let (s, _, _) = post(
        &h,
        &viewer,
        &format!("/ui/rollouts/{id}/rollback"),
        &[("csrf", &viewer.csrf)],
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, _) = post(
        &h,
        &viewer,
        "/ui/rollouts/preview",
        &[
            ("csrf", &viewer.csrf),
            ("release_id", &release),
            ("waves", "100%"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (_, api) = h
        .call(
            Method::GET,
            &format!("/api/v1/rollouts/{id}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(api["status"], "aborted");
}

async fn post_owned(
    h: &Harness,
    ui: &Ui,
    path: &str,
    fields: Vec<(&str, String)>,
) -> (StatusCode, HeaderMap, String) {
    let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    post(h, ui, path, &pairs).await
}

both!(
    every_page_renders_for_an_admin,
    rollouts_through_the_pages,
    csrf_is_checked_on_every_mutation,
    read_only_sees_no_controls_and_is_refused,
    bad_input_gets_an_error_page,
    organisations_and_accounts_pages,
);

/// The instance admin's organisations page, a user's page and the
/// account page, rendered and used through their forms.
async fn organisations_and_accounts_pages(h: Arc<Harness>) {
    let ui = login(&h, "admin@localhost", common::ADMIN_PASSWORD).await;
    for path in ["/ui/organizations", "/ui/account", "/ui/users"] {
        let (s, page) = get(&h, &ui, path).await;
        assert_eq!(s, StatusCode::OK, "{path}: {page}");
        assert_same_origin(&page);
    }
    let (s, _, page) = post(
        &h,
        &ui,
        "/ui/organizations",
        &[
            ("csrf", &ui.csrf),
            ("name", "acme"),
            ("admin_email", "root@acme.example"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{page}");
    let marker = "id=\"one-time-password\">";
    let at = page.find(marker).unwrap_or_else(|| panic!("{page}")) + marker.len();
    let password = &page[at..at + page[at..].find('<').unwrap()];
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/login",
            None,
            Some(
                json!({"organization": "acme", "email": "root@acme.example", "password": password}),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["must_change_password"], true);
    let (_, page) = get(&h, &ui, "/ui/organizations").await;
    assert!(page.contains("data-org=\"acme\""), "{page}");
    // The organisation admin is no instance admin: no such page for them.
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/account/password",
            Some(v["token"].as_str().unwrap()),
            Some(json!({"current_password": password, "new_password": "acme's own password"})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = h
        .call(Method::POST, "/api/v1/users", Some(&h.admin), Some(json!({"email": "plain-admin@localhost", "password": "plain admin password", "role": "admin"})))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let plain = login(&h, "plain-admin@localhost", "plain admin password").await;
    let (s, _) = get(&h, &plain, "/ui/organizations").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (_, page) = get(&h, &plain, "/ui/").await;
    assert!(!page.contains("/ui/organizations"), "no link for them");
    // A user's page, by the admin; and a role change through its form.
    let (_, users) = h
        .call(Method::GET, "/api/v1/users", Some(&h.admin), None)
        .await;
    let id = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["email"] == "plain-admin@localhost")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, page) = get(&h, &ui, &format!("/ui/users/{id}")).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert!(
        page.contains("data-kind=\"session\""),
        "their session is listed: {page}"
    );
    let (s, _, _) = post(
        &h,
        &ui,
        &format!("/ui/users/{id}"),
        &[("csrf", &ui.csrf), ("action", "role"), ("role", "ops")],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let (s, _) = get(&h, &plain, "/ui/users").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "demoted at once");
    // Without the CSRF token nothing happens.
    let (s, _, _) = post(&h, &ui, &format!("/ui/users/{id}"), &[("action", "delete")]).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}
