//! Organisations, as the instance admin manages them: create, list,
//! rename, disable and re-enable, and create an organisation's first
//! admin (with a one-time password that must be changed at first login).
//! The API checks the instance-admin flag and audits; `kernex-server admin`
//! calls the store-level functions on the host.
//!
//! A disabled organisation's operators are refused on their next request
//! (`auth::authenticate`), its logins fail, and its devices can neither
//! authenticate nor enroll.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::audit::Audited;
use super::{Error, Result};
use crate::AppState;
use crate::auth::{self, Operator, Role};
use crate::store::{Store, is_unique_violation, new_id, new_secret, now_ms};

/// An organisation.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct Organization {
    /// Id.
    pub id: String,
    /// Name (what operators log in with).
    pub name: String,
    /// Disabled (0 or 1 in the store; false or true on the wire).
    #[serde(serialize_with = "as_bool")]
    #[schema(value_type = bool)]
    pub disabled: i64,
    /// Unix ms.
    pub created_at: i64,
    /// Users.
    pub users: i64,
    /// Devices.
    pub devices: i64,
}

fn as_bool<S: serde::Serializer>(v: &i64, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_bool(*v != 0)
}

/// Checks an organisation's name: 1-64 characters of `[A-Za-z0-9._-]`.
pub fn check_org_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(
            "organisation name: 1-64 characters of letters, digits and ._-".into(),
        ))
    }
}

fn require_instance_admin(op: &Operator) -> Result<()> {
    if op.instance_admin {
        Ok(())
    } else {
        Err(Error::Refused(
            "only an instance admin manages organisations".into(),
        ))
    }
}

fn conflict(e: sqlx::Error, name: &str) -> Error {
    if is_unique_violation(&e) {
        Error::Conflict(format!("an organisation named {name} already exists"))
    } else {
        e.into()
    }
}

const ORG_COLUMNS: &str = "o.id, o.name, o.disabled, o.created_at, \
     (SELECT COUNT(*) FROM users u WHERE u.org_id = o.id) AS users, \
     (SELECT COUNT(*) FROM devices d WHERE d.org_id = o.id) AS devices";

/// Every organisation, by name.
pub async fn list_all(store: &Store) -> Result<Vec<Organization>> {
    Ok(sqlx::query_as::<_, Organization>(&format!(
        "SELECT {ORG_COLUMNS} FROM organizations o ORDER BY o.name"
    ))
    .fetch_all(store.pool())
    .await?)
}

/// The organisation named `name`.
pub async fn by_name(store: &Store, name: &str) -> Result<Organization> {
    list_all(store)
        .await?
        .into_iter()
        .find(|o| o.name == name)
        .ok_or(Error::NotFound("no such organisation"))
}

/// The organisation `id`, read through `db` (the pool, or a change's
/// transaction).
async fn by_id<'e>(
    db: impl sqlx::Executor<'e, Database = sqlx::Any>,
    id: &str,
) -> Result<Organization> {
    sqlx::query_as::<_, Organization>(&format!(
        "SELECT {ORG_COLUMNS} FROM organizations o WHERE o.id = $1"
    ))
    .bind(id)
    .fetch_optional(db)
    .await?
    .ok_or(Error::NotFound("no such organisation"))
}

/// Creates an organisation through `conn` (the caller's transaction);
/// returns its id.
pub async fn create_org_in(conn: &mut sqlx::AnyConnection, name: &str) -> Result<String> {
    let id = new_id()?;
    insert_org_in(conn, &id, name).await?;
    Ok(id)
}

/// Creates organisation `id` named `name` through `conn` (the caller's
/// transaction): for a caller that needs the id before the change.
pub async fn insert_org_in(conn: &mut sqlx::AnyConnection, id: &str, name: &str) -> Result<()> {
    check_org_name(name)?;
    let now = now_ms();
    sqlx::query(
        "INSERT INTO organizations (id, name, metadata, created_at, updated_at) VALUES ($1, $2, '{}', $3, $3)",
    )
    .bind(id)
    .bind(name)
    .bind(now)
    .execute(conn)
    .await
    .map_err(|e| conflict(e, name))?;
    Ok(())
}

/// Renames an organisation through `conn` (the caller's transaction);
/// its operators log in with the new name.
pub async fn rename_org_in(conn: &mut sqlx::AnyConnection, id: &str, name: &str) -> Result<()> {
    check_org_name(name)?;
    let done = sqlx::query("UPDATE organizations SET name = $1, updated_at = $2 WHERE id = $3")
        .bind(name)
        .bind(now_ms())
        .bind(id)
        .execute(conn)
        .await
        .map_err(|e| conflict(e, name))?;
    if done.rows_affected() == 0 {
        return Err(Error::NotFound("no such organisation"));
    }
    Ok(())
}

/// Disables or re-enables an organisation through `conn` (the caller's
/// transaction).
pub async fn set_org_disabled_in(
    conn: &mut sqlx::AnyConnection,
    id: &str,
    disabled: bool,
) -> Result<()> {
    let done = sqlx::query("UPDATE organizations SET disabled = $1, updated_at = $2 WHERE id = $3")
        .bind(i64::from(disabled))
        .bind(now_ms())
        .bind(id)
        .execute(conn)
        .await?;
    if done.rows_affected() == 0 {
        return Err(Error::NotFound("no such organisation"));
    }
    Ok(())
}

/// A one-time password: 24 random hex digits.
pub fn one_time_password() -> Result<String> {
    let secret = new_secret("pw")?;
    Ok(secret.get(3..27).unwrap_or(&secret).to_string())
}

fn check_email(email: &str) -> Result<()> {
    if email.is_empty() || email.len() > 254 {
        return Err(Error::Invalid("email must have 1 to 254 characters".into()));
    }
    Ok(())
}

/// Creates an admin of organisation `org_id` with a one-time password
/// they must change at first login; returns (user id, password).
pub async fn create_org_admin(
    store: &Store,
    org_id: &str,
    email: &str,
    instance_admin: bool,
) -> Result<(String, String)> {
    let p = host_admin_password(email).await?;
    let mut tx = store.begin_write().await?;
    let id = insert_org_admin(&mut tx, org_id, email, &p.hash, instance_admin).await?;
    tx.commit().await?;
    Ok((id, p.password))
}

/// The first start: creates organisation `name`, its admin `email` (the
/// instance admin, with a one-time password they must change at first
/// login) and the audit entry, in one transaction, so a crash leaves
/// either all of them or none (and the next start tries again). Returns
/// (organisation id, password).
pub async fn bootstrap_first_org(
    store: &Store,
    name: &str,
    email: &str,
) -> Result<(String, String)> {
    let p = host_admin_password(email).await?;
    let mut tx = store.begin_write().await?;
    let org_id = create_org_in(&mut tx, name).await?;
    insert_org_admin(&mut tx, &org_id, email, &p.hash, true).await?;
    let target = format!("user:{email}");
    let entry = crate::audit::Entry {
        org_id: &org_id,
        actor: "system",
        action: "organization.bootstrap",
        target: &target,
        result: "ok",
        detail: serde_json::json!({}),
    };
    crate::audit::append_in(store, &mut tx, &entry).await?;
    tx.commit().await?;
    Ok((org_id, p.password))
}

/// Inserts an admin of organisation `org_id` whose one-time password
/// hashes to `hash`, through `conn` (the caller's transaction); returns
/// the user id.
async fn insert_org_admin(
    conn: &mut sqlx::AnyConnection,
    org_id: &str,
    email: &str,
    hash: &str,
    instance_admin: bool,
) -> Result<String> {
    let id = auth::insert_user_in(&mut *conn, org_id, email, hash, Role::Admin)
        .await
        .map_err(|e| {
            if e.downcast_ref::<sqlx::Error>()
                .is_some_and(is_unique_violation)
            {
                Error::Conflict(format!("user {email} already exists"))
            } else {
                Error::Internal(e)
            }
        })?;
    sqlx::query("UPDATE users SET must_change_password = 1, instance_admin = $1 WHERE id = $2")
        .bind(i64::from(instance_admin))
        .bind(&id)
        .execute(&mut *conn)
        .await?;
    Ok(id)
}

/// Makes a user an instance admin (or not).
pub async fn set_instance_admin(store: &Store, user_id: &str, on: bool) -> Result<()> {
    sqlx::query("UPDATE users SET instance_admin = $1 WHERE id = $2")
        .bind(i64::from(on))
        .bind(user_id)
        .execute(store.pool())
        .await?;
    Ok(())
}

/// A new organisation, optionally with its first admin.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewOrganization {
    /// Name, 1-64 characters of letters, digits and ._-
    pub name: String,
    /// The first admin's email; their one-time password is in the answer.
    pub admin_email: Option<String>,
}

/// An organisation admin just created.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedAdmin {
    /// User id.
    pub id: String,
    /// Email.
    pub email: String,
    /// The organisation's name, to log in with.
    pub organization: String,
    /// One-time password, shown only here; it must be changed at first
    /// login.
    pub password: String,
}

/// A created organisation.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedOrganization {
    /// The organisation.
    pub organization: Organization,
    /// Its first admin, when asked for.
    pub admin: Option<CreatedAdmin>,
}

/// Every organisation (instance admin).
pub async fn list(state: &AppState, op: &Operator) -> Result<Vec<Organization>> {
    require_instance_admin(op)?;
    list_all(&state.store).await
}

/// A one-time password for a new admin and its hash, made before the
/// transaction (hashing is slow).
pub struct AdminPassword {
    password: String,
    hash: String,
}

impl std::fmt::Debug for AdminPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminPassword(..)")
    }
}

async fn admin_password(state: &AppState, email: &str) -> Result<AdminPassword> {
    check_email(email)?;
    let password = one_time_password()?;
    let hash = state.passwords.hash(&password).await?;
    Ok(AdminPassword { password, hash })
}

/// [`AdminPassword`] on the host (`kernex-server admin`, no running
/// server's hasher): default argon2 parameters, on a blocking thread.
pub async fn host_admin_password(email: &str) -> Result<AdminPassword> {
    check_email(email)?;
    let password = one_time_password()?;
    let hash = {
        let password = password.clone();
        tokio::task::spawn_blocking(move || auth::hash_password(&password))
            .await
            .map_err(|e| Error::Internal(e.into()))?
            .map_err(Error::Internal)?
    };
    Ok(AdminPassword { password, hash })
}

/// Creates an organisation and optionally its first admin (instance admin).
pub async fn create(
    state: &AppState,
    op: &Operator,
    req: NewOrganization,
) -> Result<CreatedOrganization> {
    let label = format!("organization:{}", req.name);
    let audit = Audited::new(state, op, "organization.create", &label);
    let prepare = async {
        require_instance_admin(op)?;
        check_org_name(&req.name)?;
        match &req.admin_email {
            Some(email) => Ok(Some(admin_password(state, email).await?)),
            None => Ok(None),
        }
    };
    let password = match prepare.await {
        Ok(prepared) => prepared,
        Err(e) => return audit.fail(e).await,
    };
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        let id = create_org_in(&mut tx, &req.name).await?;
        let admin = match (&req.admin_email, password) {
            (Some(email), Some(p)) => {
                Some(new_admin(&mut tx, &id, &req.name, email, p, false).await?)
            }
            _ => None,
        };
        let organization = by_id(&mut *tx, &id).await?;
        Ok((
            CreatedOrganization {
                organization,
                admin,
            },
            String::new(),
        ))
    }
    .await;
    audit.finish(tx, outcome).await
}

/// Creates an admin of organisation `org_id` (named `org_name`) with the
/// one-time `password` through `tx` (the caller's transaction).
pub async fn new_admin(
    tx: &mut sqlx::AnyConnection,
    org_id: &str,
    org_name: &str,
    email: &str,
    password: AdminPassword,
    instance_admin: bool,
) -> Result<CreatedAdmin> {
    let id = insert_org_admin(tx, org_id, email, &password.hash, instance_admin).await?;
    Ok(CreatedAdmin {
        id,
        email: email.to_string(),
        organization: org_name.to_string(),
        password: password.password,
    })
}

/// An instance admin's change to an organisation; absent fields stay.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrganizationUpdate {
    /// The new name.
    pub name: Option<String>,
    /// Disable (its operators and devices are refused) or re-enable.
    pub disabled: Option<bool>,
}

/// Renames, disables or re-enables an organisation (instance admin; not
/// your own organisation's disabling).
pub async fn update(
    state: &AppState,
    op: &Operator,
    id: &str,
    req: OrganizationUpdate,
) -> Result<Organization> {
    require_instance_admin(op)?;
    let org = by_id(state.store.pool(), id).await?;
    let label = format!("organization:{}", org.name);
    if let Some(name) = &req.name {
        let audit = Audited::new(state, op, "organization.rename", &label);
        let mut tx = audit.begin().await?;
        let outcome: Result<_> = async {
            rename_org_in(&mut tx, id, name).await?;
            Ok(((), format!("{label} name={name}")))
        }
        .await;
        audit.finish(tx, outcome).await?;
    }
    if let Some(disabled) = req.disabled {
        let action = if disabled {
            "organization.disable"
        } else {
            "organization.enable"
        };
        let audit = Audited::new(state, op, action, &label);
        let mut tx = audit.begin().await?;
        let outcome: Result<_> = async {
            if disabled && id == op.org_id {
                return Err(Error::Conflict(
                    "you cannot disable your own organisation".into(),
                ));
            }
            set_org_disabled_in(&mut tx, id, disabled).await?;
            Ok(((), String::new()))
        }
        .await;
        audit.finish(tx, outcome).await?;
        if disabled {
            // Its devices' cached credentials and poll answers go, once
            // the change is committed.
            state.credentials.forget_org(id);
            crate::poll_cache::forget_all(state).await;
        }
    }
    by_id(state.store.pool(), id).await
}

/// A new admin for an organisation.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewOrgAdmin {
    /// Email.
    pub email: String,
}

/// Creates an admin in an organisation, with a one-time password
/// (instance admin).
pub async fn add_admin(
    state: &AppState,
    op: &Operator,
    id: &str,
    req: NewOrgAdmin,
) -> Result<CreatedAdmin> {
    require_instance_admin(op)?;
    let org = by_id(state.store.pool(), id).await?;
    let label = format!("organization:{} user:{}", org.name, req.email);
    let audit = Audited::new(state, op, "organization.admin.create", &label);
    let password = match admin_password(state, &req.email).await {
        Ok(p) => p,
        Err(e) => return audit.fail(e).await,
    };
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        Ok((
            new_admin(&mut tx, id, &org.name, &req.email, password, false).await?,
            String::new(),
        ))
    }
    .await;
    audit.finish(tx, outcome).await
}
