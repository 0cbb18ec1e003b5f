//! Every account and organisation change commits with its audit entry or
//! not at all, on SQLite and PostgreSQL: when the entry cannot be written
//! (a trigger refuses it) the change is not made and a failure is
//! recorded; a refused change writes nothing but its failure entry; a
//! change made has both its row and its entry; two admins demoting each
//! other at once leave one admin; `kernex-server admin` changes commit with
//! their entries too, and so does the first start's organisation and
//! admin.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use common::{Db, Harness};
use serde_json::json;

both!(
    a_change_whose_entry_fails_is_not_made,
    a_refused_change_writes_only_its_failure_entry,
    a_change_made_has_its_row_and_its_entry,
    two_admins_demoting_each_other_leave_one,
    the_admin_cli_commits_with_its_entries,
    the_first_start_commits_with_its_entry,
);

const PW: &str = "correct horse battery";

/// The actions whose successful entry the trigger refuses.
const REFUSED: &str = "'user.role', 'user.disable', 'user.delete', 'user.password.change', \
     'user.credential.revoke', 'api_token.create', 'organization.create', 'organization.rename', \
     'organization.admin.create'";

/// Makes the store refuse the audit entry of a successful `REFUSED`
/// action (failure entries still go in).
async fn refuse_ok_entries(h: &Harness) {
    let when = format!("NEW.result = 'ok' AND NEW.action IN ({REFUSED})");
    let statements = match h.db {
        Db::Sqlite => vec![format!(
            "CREATE TRIGGER refuse_ok BEFORE INSERT ON audit_log WHEN {when} \
             BEGIN SELECT RAISE(ABORT, 'audit entry refused'); END"
        )],
        Db::Postgres => vec![
            "CREATE FUNCTION refuse_ok() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'audit entry refused'; END $$"
                .to_string(),
            format!(
                "CREATE TRIGGER refuse_ok BEFORE INSERT ON audit_log FOR EACH ROW \
                 WHEN ({when}) EXECUTE FUNCTION refuse_ok()"
            ),
        ],
    };
    for s in statements {
        sqlx::query(&s).execute(h.state.store.pool()).await.unwrap();
    }
}

/// (action, result, target) of every entry, oldest first.
async fn entries(h: &Harness) -> Vec<(String, String, String)> {
    sqlx::query_as("SELECT action, result, target FROM audit_log ORDER BY at, seq")
        .fetch_all(h.state.store.pool())
        .await
        .unwrap()
}

async fn user_row(h: &Harness, email: &str) -> Option<(String, String, i64)> {
    sqlx::query_as("SELECT id, role, disabled FROM users WHERE email = $1")
        .bind(email)
        .fetch_optional(h.state.store.pool())
        .await
        .unwrap()
}

/// Whether `action` was recorded as failed with `status` and never as ok.
fn only_failed(entries: &[(String, String, String)], action: &str, status: &str) {
    let of: Vec<_> = entries.iter().filter(|e| e.0 == action).collect();
    assert!(!of.is_empty(), "no {action} in {entries:?}");
    assert!(
        of.iter()
            .all(|e| e.1.starts_with(&format!("error: {status}"))),
        "{action}: {of:?}"
    );
}

async fn a_change_whose_entry_fails_is_not_made(h: Arc<Harness>) {
    let session = h.user("victim@localhost", "ops").await;
    let (id, _, _) = user_row(&h, "victim@localhost").await.unwrap();
    let (s, created) = h
        .call(
            Method::POST,
            "/api/v1/account/tokens",
            Some(&session),
            Some(json!({"name": "kept", "expires_in_days": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let credential = created["id"].as_str().unwrap().to_string();
    let api = created["token"].as_str().unwrap().to_string();
    let (s, org) = h
        .call(
            Method::POST,
            "/api/v1/instance/organizations",
            Some(&h.admin),
            Some(json!({"name": "before"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{org}");
    let org_id = org["organization"]["id"].as_str().unwrap().to_string();
    let tokens = h.count("api_tokens").await;
    let users = h.count("users").await;
    let orgs = h.count("organizations").await;
    let before = entries(&h).await.len();
    refuse_ok_entries(&h).await;

    let user = format!("/api/v1/users/{id}");
    let calls = [
        (Method::PATCH, user.clone(), json!({"role": "read_only"})),
        (Method::PATCH, user.clone(), json!({"disabled": true})),
        (Method::DELETE, user.clone(), json!(null)),
        (
            Method::DELETE,
            format!("{user}/credentials/{credential}"),
            json!(null),
        ),
        (
            Method::POST,
            "/api/v1/instance/organizations".into(),
            json!({"name": "acme", "admin_email": "root@acme.example"}),
        ),
        (
            Method::PATCH,
            format!("/api/v1/instance/organizations/{org_id}"),
            json!({"name": "after"}),
        ),
        (
            Method::POST,
            format!("/api/v1/instance/organizations/{org_id}/admins"),
            json!({"email": "boss@before.example"}),
        ),
    ];
    for (method, path, body) in calls {
        let body = (!body.is_null()).then_some(body);
        let (s, v) = h.call(method, &path, Some(&h.admin), body).await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{path}: {v}");
    }
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/account/tokens",
            Some(&session),
            Some(json!({"name": "lost", "expires_in_days": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/account/password",
            Some(&session),
            Some(json!({"current_password": PW, "new_password": "a brand new password"})),
        )
        .await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{v}");

    // Nothing changed.
    assert_eq!(
        user_row(&h, "victim@localhost").await,
        Some((id, "ops".into(), 0))
    );
    assert_eq!(h.count("api_tokens").await, tokens);
    assert_eq!(h.count("users").await, users);
    assert_eq!(h.count("organizations").await, orgs);
    let names: Vec<(String,)> = sqlx::query_as("SELECT name FROM organizations WHERE id = $1")
        .bind(&org_id)
        .fetch_all(h.state.store.pool())
        .await
        .unwrap();
    assert_eq!(names, vec![("before".to_string(),)]);
    let (s, _) = h.call(Method::GET, "/api/v1/me", Some(&api), None).await;
    assert_eq!(s, StatusCode::OK, "the API token must still work");
    let (s, _) = h
        .call(Method::GET, "/api/v1/me", Some(&session), None)
        .await;
    assert_eq!(s, StatusCode::OK, "the session must still work");
    h.login("default", "victim@localhost", PW).await;

    // Each attempt is recorded as a failure, none as done.
    let log = entries(&h).await.split_off(before);
    for action in [
        "user.role",
        "user.disable",
        "user.delete",
        "user.credential.revoke",
        "organization.rename",
        "organization.admin.create",
        "api_token.create",
        "user.password.change",
    ] {
        only_failed(&log, action, "500");
    }
    assert!(
        log.iter().any(|e| e.0 == "organization.create"
            && e.2 == "organization:acme"
            && e.1 == "error: 500"),
        "{log:?}"
    );
}

async fn a_refused_change_writes_only_its_failure_entry(h: Arc<Harness>) {
    let (admin_id, _, _) = user_row(&h, "admin@localhost").await.unwrap();
    let before = entries(&h).await.len();
    // The admin may not demote, disable or delete themselves.
    let path = format!("/api/v1/users/{admin_id}");
    for body in [json!({"role": "ops"}), json!({"disabled": true})] {
        let (s, v) = h
            .call(Method::PATCH, &path, Some(&h.admin), Some(body))
            .await;
        assert_eq!(s, StatusCode::CONFLICT, "{v}");
    }
    let (s, v) = h.call(Method::DELETE, &path, Some(&h.admin), None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(
        user_row(&h, "admin@localhost").await,
        Some((admin_id, "admin".into(), 0))
    );
    let log = entries(&h).await.split_off(before);
    assert_eq!(log.len(), 3, "{log:?}");
    for action in ["user.role", "user.disable", "user.delete"] {
        only_failed(&log, action, "409");
    }
}

async fn a_change_made_has_its_row_and_its_entry(h: Arc<Harness>) {
    h.user("demoted@localhost", "ops").await;
    let (id, _, _) = user_row(&h, "demoted@localhost").await.unwrap();
    let (s, v) = h
        .call(
            Method::PATCH,
            &format!("/api/v1/users/{id}"),
            Some(&h.admin),
            Some(json!({"role": "read_only", "disabled": true})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        user_row(&h, "demoted@localhost").await,
        Some((id, "read_only".into(), 1))
    );
    let log = entries(&h).await;
    assert!(
        log.contains(&(
            "user.role".into(),
            "ok".into(),
            "user:demoted@localhost role=read_only".into()
        )),
        "{log:?}"
    );
    assert!(
        log.contains(&(
            "user.disable".into(),
            "ok".into(),
            "user:demoted@localhost".into()
        )),
        "{log:?}"
    );
}

async fn two_admins_demoting_each_other_leave_one(h: Arc<Harness>) {
    let (first, _, _) = user_row(&h, "admin@localhost").await.unwrap();
    for round in 0..8 {
        let email = format!("admin{round}@localhost");
        let other = h.user(&email, "admin").await;
        let (second, _, _) = user_row(&h, &email).await.unwrap();
        let demote = |token: String, id: String| {
            let h = h.clone();
            tokio::spawn(async move {
                h.call(
                    Method::PATCH,
                    &format!("/api/v1/users/{id}"),
                    Some(&token),
                    Some(json!({"role": "ops"})),
                )
                .await
                .0
            })
        };
        let a = demote(h.admin.clone(), second.clone());
        let b = demote(other, first.clone());
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        let admins: Vec<(String,)> =
            sqlx::query_as("SELECT id FROM users WHERE role = 'admin' AND disabled = 0")
                .fetch_all(h.state.store.pool())
                .await
                .unwrap();
        assert_eq!(admins.len(), 1, "round {round}: {a} {b}");
        // One demotion wins; the other is refused: 409 (it would leave no
        // admin) or, when the winner committed before the loser was even
        // authenticated, 403 (the loser is no admin any more).
        let refused = [StatusCode::CONFLICT, StatusCode::FORBIDDEN];
        assert!(
            (a == StatusCode::OK && refused.contains(&b))
                || (b == StatusCode::OK && refused.contains(&a)),
            "round {round}: {a} {b}"
        );
        // The next round starts from the first admin alone.
        sqlx::query("UPDATE users SET role = CASE WHEN id = $1 THEN 'admin' ELSE 'ops' END")
            .bind(&first)
            .execute(h.state.store.pool())
            .await
            .unwrap();
    }
}

/// Makes the store refuse every entry by `kernex-server admin`; answers
/// the statement that undoes it.
async fn refuse_host_entries(h: &Harness) -> &'static str {
    let when = "NEW.actor = 'host:kernex-server-admin'";
    let (statements, undo) = match h.db {
        Db::Sqlite => (
            vec![format!(
                "CREATE TRIGGER refuse_host BEFORE INSERT ON audit_log WHEN {when} \
                 BEGIN SELECT RAISE(ABORT, 'audit entry refused'); END"
            )],
            "DROP TRIGGER refuse_host",
        ),
        Db::Postgres => (
            vec![
                "CREATE FUNCTION refuse_host() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'audit entry refused'; END $$"
                    .to_string(),
                format!(
                    "CREATE TRIGGER refuse_host BEFORE INSERT ON audit_log FOR EACH ROW \
                     WHEN ({when}) EXECUTE FUNCTION refuse_host()"
                ),
            ],
            "DROP TRIGGER refuse_host ON audit_log",
        ),
    };
    for s in statements {
        sqlx::query(&s).execute(h.state.store.pool()).await.unwrap();
    }
    undo
}

/// (name, disabled) of every organisation, by name.
async fn orgs(h: &Harness) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT name, disabled FROM organizations ORDER BY name")
        .fetch_all(h.state.store.pool())
        .await
        .unwrap()
}

/// `kernex-server admin org ...`: when its entry cannot be written, no
/// change is made (not an organisation, not its admin, not a rename or a
/// disabling); with the entries allowed, each change has its entry.
async fn the_admin_cli_commits_with_its_entries(h: Arc<Harness>) {
    use kernex_server::admin::{AdminCommand, OrgCommand};
    let run = |cmd: OrgCommand| {
        let h = h.clone();
        async move { kernex_server::admin::run(&h.state.store, AdminCommand::Org(cmd)).await }
    };
    let create = |name: &str, admin: Option<&str>| OrgCommand::Create {
        name: name.into(),
        admin_email: admin.map(String::from),
    };
    let add_admin = |email: &str| OrgCommand::AddAdmin {
        name: "cli-org".into(),
        email: email.into(),
        instance_admin: false,
    };
    run(create("cli-org", None)).await.unwrap();
    let before_orgs = orgs(&h).await;
    let users = h.count("users").await;
    let before = entries(&h).await.len();
    let undo = refuse_host_entries(&h).await;
    for cmd in [
        create("cli-new", Some("first@cli.example")),
        create("cli-bare", None),
        OrgCommand::Rename {
            name: "cli-org".into(),
            new_name: "cli-renamed".into(),
        },
        OrgCommand::Disable {
            name: "cli-org".into(),
        },
        add_admin("boss@cli.example"),
    ] {
        let what = format!("{cmd:?}");
        let e = run(cmd).await.expect_err(&what);
        assert!(format!("{e:#}").contains("internal"), "{what}: {e:#}");
    }
    assert_eq!(orgs(&h).await, before_orgs, "no change was made");
    assert_eq!(h.count("users").await, users, "no admin was made");
    assert_eq!(entries(&h).await.len(), before, "no entry was written");

    sqlx::query(undo)
        .execute(h.state.store.pool())
        .await
        .unwrap();
    // A refused change writes its failure entry only.
    let bad = OrgCommand::Rename {
        name: "cli-org".into(),
        new_name: "not a name!".into(),
    };
    assert!(run(bad).await.is_err());
    assert_eq!(orgs(&h).await, before_orgs);
    run(create("cli-new", Some("first@cli.example")))
        .await
        .unwrap();
    run(OrgCommand::Rename {
        name: "cli-org".into(),
        new_name: "cli-renamed".into(),
    })
    .await
    .unwrap();
    run(OrgCommand::Disable {
        name: "cli-renamed".into(),
    })
    .await
    .unwrap();
    let log: Vec<_> = entries(&h).await.split_off(before);
    let ok =
        |action: &str, target: &str| (action.to_string(), "ok".to_string(), target.to_string());
    assert_eq!(
        log,
        vec![
            (
                "organization.rename".into(),
                "error: 400 organisation name: 1-64 characters of letters, digits and ._-".into(),
                "organization:cli-org name=not a name!".into()
            ),
            ok("organization.admin.create", "user:first@cli.example"),
            ok("organization.create", "organization:cli-new"),
            ok(
                "organization.rename",
                "organization:cli-org name=cli-renamed"
            ),
            ok("organization.disable", "organization:cli-renamed"),
        ]
    );
    let users_of_new: Vec<(String,)> = sqlx::query_as(
        "SELECT u.email FROM users u JOIN organizations o ON o.id = u.org_id WHERE o.name = 'cli-new'",
    )
    .fetch_all(h.state.store.pool())
    .await
    .unwrap();
    assert_eq!(users_of_new, vec![("first@cli.example".to_string(),)]);
}

/// The first start (`bootstrap`): when its entry cannot be written, neither
/// the organisation nor its admin is made (the next start tries again);
/// with the entry allowed, all three are.
async fn the_first_start_commits_with_its_entry(h: Arc<Harness>) {
    use kernex_server::service::orgs::bootstrap_first_org;
    let statements = match h.db {
        Db::Sqlite => vec![
            "CREATE TRIGGER refuse_boot BEFORE INSERT ON audit_log \
             WHEN NEW.action = 'organization.bootstrap' \
             BEGIN SELECT RAISE(ABORT, 'audit entry refused'); END"
                .to_string(),
        ],
        Db::Postgres => vec![
            "CREATE FUNCTION refuse_boot() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'audit entry refused'; END $$"
                .to_string(),
            "CREATE TRIGGER refuse_boot BEFORE INSERT ON audit_log FOR EACH ROW \
             WHEN (NEW.action = 'organization.bootstrap') EXECUTE FUNCTION refuse_boot()"
                .to_string(),
        ],
    };
    for s in &statements {
        sqlx::query(s).execute(h.state.store.pool()).await.unwrap();
    }
    let before_orgs = orgs(&h).await;
    let users = h.count("users").await;
    let before = entries(&h).await.len();
    let store = &h.state.store;
    bootstrap_first_org(store, "first-start", "root@first.example")
        .await
        .expect_err("the entry is refused");
    assert_eq!(orgs(&h).await, before_orgs, "no organisation was made");
    assert_eq!(h.count("users").await, users, "no admin was made");
    assert_eq!(entries(&h).await.len(), before, "no entry was written");

    let undo = match h.db {
        Db::Sqlite => "DROP TRIGGER refuse_boot",
        Db::Postgres => "DROP TRIGGER refuse_boot ON audit_log",
    };
    sqlx::query(undo).execute(store.pool()).await.unwrap();
    let (org, password) = bootstrap_first_org(store, "first-start", "root@first.example")
        .await
        .unwrap();
    assert_eq!(password.len(), 24);
    assert_eq!(orgs(&h).await.len(), before_orgs.len() + 1);
    assert_eq!(h.count("users").await, users + 1);
    let (action, result, target) = entries(&h).await.pop().unwrap();
    assert_eq!(
        (action.as_str(), result.as_str(), target.as_str()),
        ("organization.bootstrap", "ok", "user:root@first.example")
    );
    let n: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE org_id = $1 AND instance_admin = 1")
            .bind(&org)
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(n, 1, "the first admin is the organisation's instance admin");
}
