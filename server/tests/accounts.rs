//! Accounts with a lifecycle and organisations, through the API, each test
//! on SQLite and PostgreSQL: password change (other sessions revoked),
//! the must-change-password gate, disable / re-enable / delete, role
//! changes taking effect on the next request, sessions and API tokens
//! listed and revoked by an admin, API tokens' role cap and expiry, and
//! organisations created and isolated by the instance admin.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use common::{Harness, golden};
use serde_json::{Value, json};

both!(
    change_password_revokes_other_sessions,
    disabled_user_is_refused_on_the_next_request,
    role_downgrade_takes_effect_at_once,
    deleted_user_is_gone,
    admin_lists_and_revokes_sessions_and_tokens,
    api_token_role_cap_and_expiry,
    must_change_password_gate,
    organisations_are_created_and_isolated_by_the_instance_admin,
    disabled_organisation_refuses_operators_and_devices,
    account_changes_are_audited,
    openapi_describes_accounts_and_organisations,
);

const PW: &str = "correct horse battery";

async fn user_id(h: &Harness, email: &str) -> String {
    let (s, list) = h
        .call(Method::GET, "/api/v1/users", Some(&h.admin), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    list.as_array()
        .unwrap()
        .iter()
        .find(|u| u["email"] == email)
        .unwrap_or_else(|| panic!("no {email} in {list}"))["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn me(h: &Harness, token: &str) -> (StatusCode, Value) {
    h.call(Method::GET, "/api/v1/me", Some(token), None).await
}

async fn patch_user(h: &Harness, id: &str, body: Value) -> (StatusCode, Value) {
    h.call(
        Method::PATCH,
        &format!("/api/v1/users/{id}"),
        Some(&h.admin),
        Some(body),
    )
    .await
}

async fn change_password_revokes_other_sessions(h: Arc<Harness>) {
    let first = h.user("op@localhost", "ops").await;
    let second = h.login("default", "op@localhost", PW).await;
    let change =
        |current: &str, new: &str| json!({"current_password": current, "new_password": new});

    // The current password is required, and the new one is checked.
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/account/password",
            Some(&first),
            Some(change("wrong password!!", "a brand new password")),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("current password"),
        "{v}"
    );
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/account/password",
            Some(&first),
            Some(change(PW, "short")),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        me(&h, &second).await.0,
        StatusCode::OK,
        "nothing changed yet"
    );

    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/account/password",
            Some(&first),
            Some(change(PW, "a brand new password")),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    // The other session is revoked; this one stays.
    assert_eq!(me(&h, &second).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(me(&h, &first).await.0, StatusCode::OK);
    // The old password no longer logs in; the new one does.
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/login",
            None,
            Some(json!({"email": "op@localhost", "password": PW})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    h.login("default", "op@localhost", "a brand new password")
        .await;
}

async fn disabled_user_is_refused_on_the_next_request(h: Arc<Harness>) {
    let token = h.user("leaver@localhost", "ops").await;
    let id = user_id(&h, "leaver@localhost").await;
    assert_eq!(me(&h, &token).await.0, StatusCode::OK);

    let (s, v) = patch_user(&h, &id, json!({"disabled": true})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["disabled"], true);
    // Their existing session is refused on the very next request, and
    // they cannot log in.
    assert_eq!(me(&h, &token).await.0, StatusCode::UNAUTHORIZED);
    let (s, _) = h
        .call(Method::GET, "/api/v1/devices", Some(&token), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/login",
            None,
            Some(json!({"email": "leaver@localhost", "password": PW})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // Re-enabled: a new login works; the old session stays revoked.
    let (s, v) = patch_user(&h, &id, json!({"disabled": false})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let fresh = h.login("default", "leaver@localhost", PW).await;
    assert_eq!(me(&h, &fresh).await.0, StatusCode::OK);
    assert_eq!(me(&h, &token).await.0, StatusCode::UNAUTHORIZED);

    // An admin cannot disable themselves, nor a non-admin disable anyone.
    let admin_id = user_id(&h, "admin@localhost").await;
    let (s, _) = patch_user(&h, &admin_id, json!({"disabled": true})).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = h
        .call(
            Method::PATCH,
            &format!("/api/v1/users/{admin_id}"),
            Some(&fresh),
            Some(json!({"disabled": true})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(me(&h, &h.admin).await.0, StatusCode::OK);
}

async fn role_downgrade_takes_effect_at_once(h: Arc<Harness>) {
    let token = h.user("deployer@localhost", "ops").await;
    let id = user_id(&h, "deployer@localhost").await;
    let make = json!({"label": "line 1", "expires_in_secs": 3600});
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&token),
            Some(make.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);

    let (s, v) = patch_user(&h, &id, json!({"role": "read_only"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["role"], "read_only");
    // The same session, the next request: read-only.
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&token),
            Some(make.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(me(&h, &token).await.1["role"], "read_only");
    let (s, _) = h
        .call(Method::GET, "/api/v1/devices", Some(&token), None)
        .await;
    assert_eq!(s, StatusCode::OK, "reading still works");

    // Up again.
    let (s, _) = patch_user(&h, &id, json!({"role": "admin"})).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = h
        .call(Method::GET, "/api/v1/users", Some(&token), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    // The last enabled admin cannot be demoted.
    let (s, _) = patch_user(&h, &id, json!({"role": "ops"})).await;
    assert_eq!(s, StatusCode::OK);
    let admin_id = user_id(&h, "admin@localhost").await;
    let (s, v) = h
        .call(
            Method::PATCH,
            &format!("/api/v1/users/{admin_id}"),
            Some(&h.admin),
            Some(json!({"role": "ops"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    // Unknown user, unknown role.
    let (s, _) = patch_user(&h, "nope", json!({"role": "ops"})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = patch_user(&h, &id, json!({"role": "root"})).await;
    assert!(s.is_client_error(), "{s}");
}

async fn deleted_user_is_gone(h: Arc<Harness>) {
    let token = h.user("temp@localhost", "read_only").await;
    let id = user_id(&h, "temp@localhost").await;
    let (s, _) = h
        .call(
            Method::DELETE,
            &format!("/api/v1/users/{id}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "not their own admin");
    let (s, v) = h
        .call(
            Method::DELETE,
            &format!("/api/v1/users/{id}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    assert_eq!(me(&h, &token).await.0, StatusCode::UNAUTHORIZED);
    let (_, list) = h
        .call(Method::GET, "/api/v1/users", Some(&h.admin), None)
        .await;
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|u| u["email"] != "temp@localhost")
    );
    let (s, _) = h
        .call(
            Method::GET,
            &format!("/api/v1/users/{id}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The email can be used again; self-deletion is refused.
    h.user("temp@localhost", "read_only").await;
    let admin_id = user_id(&h, "admin@localhost").await;
    let (s, _) = h
        .call(
            Method::DELETE,
            &format!("/api/v1/users/{admin_id}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
}

async fn admin_lists_and_revokes_sessions_and_tokens(h: Arc<Harness>) {
    let session = h.user("ci@localhost", "ops").await;
    let id = user_id(&h, "ci@localhost").await;
    let (s, created) = h
        .call(
            Method::POST,
            "/api/v1/account/tokens",
            Some(&session),
            Some(json!({"name": "CI upload", "expires_in_days": 30})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let api = created["token"].as_str().unwrap().to_string();
    assert!(api.starts_with("kxk_"), "{created}");
    assert_eq!(me(&h, &api).await.0, StatusCode::OK);

    // The admin sees both, never a secret.
    let path = format!("/api/v1/users/{id}/credentials");
    let (s, list) = h.call(Method::GET, &path, Some(&h.admin), None).await;
    assert_eq!(s, StatusCode::OK, "{list}");
    let list = list.as_array().unwrap().clone();
    assert_eq!(list.len(), 2, "{list:?}");
    let text = serde_json::to_string(&list).unwrap();
    assert!(!text.contains(&api) && !text.contains(&session), "{text}");
    assert!(
        !text.contains(&kernex_server::store::secret_hash(&api)),
        "{text}"
    );
    let token_row = list.iter().find(|c| c["kind"] == "api_token").unwrap();
    assert_eq!(token_row["name"], "CI upload");
    assert_eq!(token_row["id"], created["id"]);
    let session_row = list.iter().find(|c| c["kind"] == "session").unwrap();
    // The secret is stored only as a hash.
    let stored: Vec<(String,)> = sqlx::query_as("SELECT token_hash FROM api_tokens")
        .fetch_all(h.state.store.pool())
        .await
        .unwrap();
    assert!(stored.iter().all(|(t,)| t != &api && !t.contains("kxk_")));

    // Someone else (not admin) may not look.
    let other = h.user("other@localhost", "ops").await;
    let (s, _) = h.call(Method::GET, &path, Some(&other), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = h
        .call(
            Method::DELETE,
            &format!("{path}/{}", token_row["id"].as_str().unwrap()),
            Some(&other),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // The admin revokes the token, then the session: each stops at once.
    let (s, _) = h
        .call(
            Method::DELETE,
            &format!("{path}/{}", token_row["id"].as_str().unwrap()),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(me(&h, &api).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(me(&h, &session).await.0, StatusCode::OK);
    let (s, _) = h
        .call(
            Method::DELETE,
            &format!("{path}/{}", session_row["id"].as_str().unwrap()),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(me(&h, &session).await.0, StatusCode::UNAUTHORIZED);
    let (s, _) = h
        .call(
            Method::DELETE,
            &format!("{path}/{}", session_row["id"].as_str().unwrap()),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "already revoked");
    let (_, list) = h.call(Method::GET, &path, Some(&h.admin), None).await;
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");

    // A user lists and revokes their own.
    let (s, mine) = h
        .call(Method::GET, "/api/v1/account/tokens", Some(&other), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let mine = mine.as_array().unwrap().clone();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0]["current"], true);
    let (s, _) = h
        .call(
            Method::DELETE,
            &format!("/api/v1/account/tokens/{}", mine[0]["id"].as_str().unwrap()),
            Some(&other),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(me(&h, &other).await.0, StatusCode::UNAUTHORIZED);
}

async fn api_token_role_cap_and_expiry(h: Arc<Harness>) {
    let ops = h.user("ops@localhost", "ops").await;
    let new = |body: Value| {
        let h = h.clone();
        let ops = ops.clone();
        async move {
            h.call(
                Method::POST,
                "/api/v1/account/tokens",
                Some(&ops),
                Some(body),
            )
            .await
        }
    };
    // No higher than the creator's role.
    let (s, v) = new(json!({"name": "too much", "role": "admin", "expires_in_days": 7})).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // An expiry is required, and bounded; so is the name.
    let (s, _) = new(json!({"name": "forever", "role": "ops"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    for days in [0, 367] {
        let (s, _) = new(json!({"name": "x", "expires_in_days": days})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{days}");
    }
    let (s, _) = new(json!({"name": "", "expires_in_days": 1})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // A read-only token of an ops user reads, and is refused ops work.
    let (s, v) = new(json!({"name": "dashboard", "role": "read_only", "expires_in_days": 7})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["role"], "read_only");
    let ro = v["token"].as_str().unwrap().to_string();
    let (s, _) = h
        .call(Method::GET, "/api/v1/devices", Some(&ro), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&ro),
            Some(json!({"label": "no"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(me(&h, &ro).await.1["role"], "read_only");

    // An ops token uploads a release (what CI does).
    let (s, v) = new(json!({"name": "CI", "expires_in_days": 30})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let ci = v["token"].as_str().unwrap().to_string();
    let (s, r) = h
        .upload(&ci, std::fs::read(golden("valid.kxb")).unwrap())
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    // A token cannot mint tokens, nor change the password.
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/account/tokens",
            Some(&ci),
            Some(json!({"name": "child", "expires_in_days": 366})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/account/password",
            Some(&ci),
            Some(json!({"current_password": PW, "new_password": "something else 123"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // The creator demoted: the token acts with at most their new role.
    let id = user_id(&h, "ops@localhost").await;
    let (s, _) = patch_user(&h, &id, json!({"role": "read_only"})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(me(&h, &ci).await.1["role"], "read_only");
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&ci),
            Some(json!({"label": "no"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // Expired: refused. (The expiry moved into the past in the store, as
    // the clock would after 30 days.)
    let (s, list) = h
        .call(
            Method::GET,
            &format!("/api/v1/users/{id}/credentials"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let ci_id = list
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "CI")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "CI")
            .unwrap()["expires_at"]
            .as_i64()
            .unwrap()
            > kernex_server::store::now_ms() + 29 * 86_400_000
    );
    sqlx::query("UPDATE api_tokens SET expires_at = $1 WHERE substr(token_hash, 1, 24) = $2")
        .bind(kernex_server::store::now_ms() - 1)
        .bind(&ci_id)
        .execute(h.state.store.pool())
        .await
        .unwrap();
    assert_eq!(me(&h, &ci).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(me(&h, &ro).await.0, StatusCode::OK);
}

/// The instance admin creates organisation `name` with an admin; returns
/// (org id, the admin's one-time password).
async fn new_org(h: &Harness, name: &str, email: &str) -> (String, String) {
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/instance/organizations",
            Some(&h.admin),
            Some(json!({"name": name, "admin_email": email})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["organization"]["name"], name);
    assert_eq!(v["admin"]["organization"], name);
    (
        v["organization"]["id"].as_str().unwrap().to_string(),
        v["admin"]["password"].as_str().unwrap().to_string(),
    )
}

/// Logs in as an organisation's new admin and changes the one-time
/// password; returns the session.
async fn first_login(h: &Harness, org: &str, email: &str, password: &str) -> String {
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/login",
            None,
            Some(json!({"organization": org, "email": email, "password": password})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["must_change_password"], true);
    let token = v["token"].as_str().unwrap().to_string();
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/account/password",
            Some(&token),
            Some(json!({"current_password": password, "new_password": "their own password"})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    token
}

async fn must_change_password_gate(h: Arc<Harness>) {
    let (_, password) = new_org(&h, "acme", "root@acme.example").await;
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
    let token = v["token"].as_str().unwrap().to_string();
    // Every other operator call: 403 with a clear message.
    for (method, path, body) in [
        (Method::GET, "/api/v1/me", None),
        (Method::GET, "/api/v1/devices", None),
        (Method::GET, "/api/v1/users", None),
        (Method::GET, "/api/v1/account/tokens", None),
        (
            Method::POST,
            "/api/v1/account/tokens",
            Some(json!({"name": "x", "expires_in_days": 1})),
        ),
        (
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(json!({"label": "x"})),
        ),
        (
            Method::PUT,
            "/api/v1/org/keyring",
            Some(json!({"pem": "x"})),
        ),
    ] {
        let (s, v) = h.call(method.clone(), path, Some(&token), body).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{method} {path}: {v}");
        assert!(
            v["detail"]
                .as_str()
                .unwrap()
                .contains("change your password"),
            "{v}"
        );
    }
    // The change itself is allowed; then everything is.
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/account/password",
            Some(&token),
            Some(json!({"current_password": password, "new_password": "their own password"})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(me(&h, &token).await.0, StatusCode::OK);
    let (s, v) = h
        .call(Method::POST, "/api/v1/login", None, Some(json!({"organization": "acme", "email": "root@acme.example", "password": "their own password"})))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["must_change_password"], false);
    // The one-time password is dead.
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/login",
            None,
            Some(
                json!({"organization": "acme", "email": "root@acme.example", "password": password}),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Logout is allowed under the gate too.
    let (_, second) = new_org(&h, "beta", "root@beta.example").await;
    let (_, v) = h
        .call(
            Method::POST,
            "/api/v1/login",
            None,
            Some(json!({"organization": "beta", "email": "root@beta.example", "password": second})),
        )
        .await;
    let t = v["token"].as_str().unwrap().to_string();
    let (s, _) = h.call(Method::POST, "/api/v1/logout", Some(&t), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
}

async fn organisations_are_created_and_isolated_by_the_instance_admin(h: Arc<Harness>) {
    // The default organisation: a device and a release.
    let (_, enroll) = h.enrollment_token(&h.admin, &["site-a"]).await;
    let (device, _) = h.enroll(&enroll, "edge-01", "qemu-aarch64").await;
    let (s, r) = h
        .upload(&h.admin, std::fs::read(golden("valid.kxb")).unwrap())
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    let release = r["id"].as_str().unwrap().to_string();

    let (acme_id, password) = new_org(&h, "acme", "root@acme.example").await;
    let (s, list) = h
        .call(
            Method::GET,
            "/api/v1/instance/organizations",
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme", "default"]);
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/instance/organizations",
            Some(&h.admin),
            Some(json!({"name": "acme"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/instance/organizations",
            Some(&h.admin),
            Some(json!({"name": "no spaces"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    let acme = first_login(&h, "acme", "root@acme.example", &password).await;
    // The second organisation's admin sees nothing of the first's.
    for path in [
        "/api/v1/devices",
        "/api/v1/releases",
        "/api/v1/deployments",
        "/api/v1/enrollment-tokens",
    ] {
        let (s, v) = h.call(Method::GET, path, Some(&acme), None).await;
        assert_eq!(s, StatusCode::OK, "{path}: {v}");
        assert_eq!(v.as_array().unwrap().len(), 0, "{path}: {v}");
    }
    for path in [
        format!("/api/v1/devices/{device}"),
        format!("/api/v1/releases/{release}"),
    ] {
        let (s, _) = h.call(Method::GET, &path, Some(&acme), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
    }
    let (s, _) = h
        .call(
            Method::POST,
            &format!("/api/v1/devices/{device}/revoke"),
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, users) = h
        .call(Method::GET, "/api/v1/users", Some(&acme), None)
        .await;
    let emails: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["email"].as_str().unwrap())
        .collect();
    assert_eq!(emails, ["root@acme.example"]);
    let default_admin = user_id(&h, "admin@localhost").await;
    let (s, _) = h
        .call(
            Method::PATCH,
            &format!("/api/v1/users/{default_admin}"),
            Some(&acme),
            Some(json!({"disabled": true})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "another organisation's user");
    let (s, _) = h
        .call(
            Method::GET,
            &format!("/api/v1/users/{default_admin}/credentials"),
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, audit) = h
        .call(Method::GET, "/api/v1/audit", Some(&acme), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["actor"] != "user:admin@localhost"),
        "{audit}"
    );
    // An organisation admin is no instance admin.
    let (s, _) = h
        .call(
            Method::GET,
            "/api/v1/instance/organizations",
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/instance/organizations",
            Some(&acme),
            Some(json!({"name": "evil"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // The same email may exist in both organisations, apart.
    let (s, v) = h
        .call(
            Method::POST,
            &format!("/api/v1/instance/organizations/{acme_id}/admins"),
            Some(&h.admin),
            Some(json!({"email": "admin@localhost"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let other_pw = v["password"].as_str().unwrap();
    let twin = first_login(&h, "acme", "admin@localhost", other_pw).await;
    let (_, v) = me(&h, &twin).await;
    assert_eq!(v["organization_id"], acme_id.as_str());
    let (_, v) = h
        .call(Method::GET, "/api/v1/devices", Some(&twin), None)
        .await;
    assert_eq!(v.as_array().unwrap().len(), 0);

    // Renamed: its operators log in with the new name.
    let (s, v) = h
        .call(
            Method::PATCH,
            &format!("/api/v1/instance/organizations/{acme_id}"),
            Some(&h.admin),
            Some(json!({"name": "acme-corp"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["name"], "acme-corp");
    h.login("acme-corp", "root@acme.example", "their own password")
        .await;
    // The instance admin cannot disable their own organisation.
    let (_, me_v) = me(&h, &h.admin).await;
    let own = me_v["organization_id"].as_str().unwrap().to_string();
    let (s, _) = h
        .call(
            Method::PATCH,
            &format!("/api/v1/instance/organizations/{own}"),
            Some(&h.admin),
            Some(json!({"disabled": true})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
}

async fn disabled_organisation_refuses_operators_and_devices(h: Arc<Harness>) {
    let (acme_id, password) = new_org(&h, "acme", "root@acme.example").await;
    let acme = first_login(&h, "acme", "root@acme.example", &password).await;
    let (_, enroll) = h.enrollment_token(&acme, &[]).await;
    let (_, credential) = h.enroll(&enroll, "acme-01", "qemu-aarch64").await;
    let beat = json!({"cpu_percent": 1.0});
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/heartbeat",
            Some(&credential),
            Some(beat.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = h
        .call(Method::GET, "/api/v1/device/poll", Some(&credential), None)
        .await;
    assert!(s.is_success(), "{s}");

    let path = format!("/api/v1/instance/organizations/{acme_id}");
    let (s, v) = h
        .call(
            Method::PATCH,
            &path,
            Some(&h.admin),
            Some(json!({"disabled": true})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["disabled"], true);
    // Its operator: refused on the next request, and at login.
    let (s, v) = me(&h, &acme).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("disabled"), "{v}");
    let (s, _) = h
        .call(Method::POST, "/api/v1/login", None, Some(json!({"organization": "acme", "email": "root@acme.example", "password": "their own password"})))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Its devices: refused, polls too; no new enrollment.
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/heartbeat",
            Some(&credential),
            Some(beat.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = h
        .call(Method::GET, "/api/v1/device/poll", Some(&credential), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = h
        .call(Method::POST, "/api/v1/device/enroll", None, Some(json!({"enrollment_token": enroll, "device_id": "acme-02", "hardware_class": "qemu-aarch64"})))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // The default organisation is untouched.
    assert_eq!(me(&h, &h.admin).await.0, StatusCode::OK);

    // Re-enabled: back.
    let (s, _) = h
        .call(
            Method::PATCH,
            &path,
            Some(&h.admin),
            Some(json!({"disabled": false})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(me(&h, &acme).await.0, StatusCode::OK);
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/heartbeat",
            Some(&credential),
            Some(beat),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
}

async fn account_changes_are_audited(h: Arc<Harness>) {
    let token = h.user("audited@localhost", "ops").await;
    let id = user_id(&h, "audited@localhost").await;
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/account/tokens",
            Some(&token),
            Some(json!({"name": "ci", "expires_in_days": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    patch_user(&h, &id, json!({"role": "read_only"})).await;
    patch_user(&h, &id, json!({"disabled": true})).await;
    patch_user(&h, &id, json!({"disabled": false})).await;
    h.call(
        Method::DELETE,
        &format!("/api/v1/users/{id}"),
        Some(&h.admin),
        None,
    )
    .await;
    new_org(&h, "acme", "root@acme.example").await;
    // A refused attempt is recorded too.
    let (s, _) = patch_user(
        &h,
        &user_id(&h, "admin@localhost").await,
        json!({"disabled": true}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (_, page) = h
        .call(Method::GET, "/api/v1/audit", Some(&h.admin), None)
        .await;
    let entries = page["entries"].as_array().unwrap();
    let find = |action: &str| {
        entries
            .iter()
            .find(|e| e["action"] == action)
            .unwrap_or_else(|| panic!("no {action} in {page}"))
            .clone()
    };
    assert_eq!(find("api_token.create")["actor"], "user:audited@localhost");
    assert!(
        find("user.role")["target"]
            .as_str()
            .unwrap()
            .contains("role=read_only")
    );
    assert_eq!(find("user.enable")["result"], "ok");
    assert_eq!(find("user.delete")["target"], "user:audited@localhost");
    assert_eq!(find("organization.create")["target"], "organization:acme");
    let refused = find("user.disable");
    assert!(
        refused["result"]
            .as_str()
            .unwrap()
            .starts_with("error: 409"),
        "{refused}"
    );
    assert!(page["chain_broken_at"].is_null());
}

async fn openapi_describes_accounts_and_organisations(h: Arc<Harness>) {
    let (s, doc) = h
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    assert_eq!(s, StatusCode::OK);
    for (path, method) in [
        ("/api/v1/account/password", "post"),
        ("/api/v1/account/tokens", "get"),
        ("/api/v1/account/tokens", "post"),
        ("/api/v1/account/tokens/{id}", "delete"),
        ("/api/v1/users/{id}", "patch"),
        ("/api/v1/users/{id}", "delete"),
        ("/api/v1/users/{id}/credentials", "get"),
        ("/api/v1/users/{id}/credentials/{credential}", "delete"),
        ("/api/v1/instance/organizations", "get"),
        ("/api/v1/instance/organizations", "post"),
        ("/api/v1/instance/organizations/{id}", "patch"),
        ("/api/v1/instance/organizations/{id}/admins", "post"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing"
        );
    }
    let schemas = &doc["components"]["schemas"];
    for name in [
        "NewApiToken",
        "CreatedApiToken",
        "Credential",
        "PasswordChange",
        "UserUpdate",
        "Organization",
    ] {
        assert!(schemas[name].is_object(), "schema {name} missing");
    }
    assert!(schemas["LoginResponse"]["properties"]["must_change_password"].is_object());
}
