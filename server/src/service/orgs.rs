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

use super::audit::audited;
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

/// Every organisation, by name.
pub async fn list_all(store: &Store) -> Result<Vec<Organization>> {
    Ok(sqlx::query_as::<_, Organization>(
        "SELECT o.id, o.name, o.disabled, o.created_at, \
         (SELECT COUNT(*) FROM users u WHERE u.org_id = o.id) AS users, \
         (SELECT COUNT(*) FROM devices d WHERE d.org_id = o.id) AS devices \
         FROM organizations o ORDER BY o.name",
    )
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

async fn by_id(store: &Store, id: &str) -> Result<Organization> {
    list_all(store)
        .await?
        .into_iter()
        .find(|o| o.id == id)
        .ok_or(Error::NotFound("no such organisation"))
}

/// Creates an organisation; returns its id.
pub async fn create_org(store: &Store, name: &str) -> Result<String> {
    check_org_name(name)?;
    let id = new_id()?;
    let now = now_ms();
    sqlx::query(
        "INSERT INTO organizations (id, name, metadata, created_at, updated_at) VALUES ($1, $2, '{}', $3, $3)",
    )
    .bind(&id)
    .bind(name)
    .bind(now)
    .execute(store.pool())
    .await
    .map_err(|e| conflict(e, name))?;
    Ok(id)
}

/// Renames an organisation (its operators log in with the new name).
pub async fn rename_org(store: &Store, id: &str, name: &str) -> Result<()> {
    check_org_name(name)?;
    let done = sqlx::query("UPDATE organizations SET name = $1, updated_at = $2 WHERE id = $3")
        .bind(name)
        .bind(now_ms())
        .bind(id)
        .execute(store.pool())
        .await
        .map_err(|e| conflict(e, name))?;
    if done.rows_affected() == 0 {
        return Err(Error::NotFound("no such organisation"));
    }
    Ok(())
}

/// Disables or re-enables an organisation.
pub async fn set_org_disabled(store: &Store, id: &str, disabled: bool) -> Result<()> {
    let done = sqlx::query("UPDATE organizations SET disabled = $1, updated_at = $2 WHERE id = $3")
        .bind(i64::from(disabled))
        .bind(now_ms())
        .bind(id)
        .execute(store.pool())
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

/// Creates an admin of organisation `org_id` with a one-time password
/// they must change at first login; returns (user id, password).
pub async fn create_org_admin(
    store: &Store,
    org_id: &str,
    email: &str,
    instance_admin: bool,
) -> Result<(String, String)> {
    if email.is_empty() || email.len() > 254 {
        return Err(Error::Invalid("email must have 1 to 254 characters".into()));
    }
    let password = one_time_password()?;
    let id = auth::create_user(store, org_id, email, &password, Role::Admin)
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
        .execute(store.pool())
        .await?;
    Ok((id, password))
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

/// Creates an organisation and optionally its first admin (instance admin).
pub async fn create(
    state: &AppState,
    op: &Operator,
    req: NewOrganization,
) -> Result<CreatedOrganization> {
    let label = format!("organization:{}", req.name);
    audited(state, op, "organization.create", &label, async {
        require_instance_admin(op)?;
        let id = create_org(&state.store, &req.name).await?;
        let admin = match &req.admin_email {
            Some(email) => Some(new_admin(state, &id, &req.name, email).await?),
            None => None,
        };
        let organization = by_id(&state.store, &id).await?;
        Ok((
            CreatedOrganization {
                organization,
                admin,
            },
            String::new(),
        ))
    })
    .await
}

async fn new_admin(
    state: &AppState,
    org_id: &str,
    org_name: &str,
    email: &str,
) -> Result<CreatedAdmin> {
    let (id, password) = create_org_admin(&state.store, org_id, email, false).await?;
    Ok(CreatedAdmin {
        id,
        email: email.to_string(),
        organization: org_name.to_string(),
        password,
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
    let org = by_id(&state.store, id).await?;
    let label = format!("organization:{}", org.name);
    if let Some(name) = &req.name {
        audited(state, op, "organization.rename", &label, async {
            rename_org(&state.store, id, name).await?;
            Ok(((), format!("{label} name={name}")))
        })
        .await?;
    }
    if let Some(disabled) = req.disabled {
        let action = if disabled {
            "organization.disable"
        } else {
            "organization.enable"
        };
        audited(state, op, action, &label, async {
            if disabled && id == op.org_id {
                return Err(Error::Conflict(
                    "you cannot disable your own organisation".into(),
                ));
            }
            set_org_disabled(&state.store, id, disabled).await?;
            if disabled {
                // Its devices' cached credentials and poll answers go now.
                state.credentials.forget_org(id);
                crate::poll_cache::forget_all(state).await;
            }
            Ok(((), String::new()))
        })
        .await?;
    }
    by_id(&state.store, id).await
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
    let org = by_id(&state.store, id).await?;
    let label = format!("organization:{} user:{}", org.name, req.email);
    audited(state, op, "organization.admin.create", &label, async {
        Ok((
            new_admin(state, id, &org.name, &req.email).await?,
            String::new(),
        ))
    })
    .await
}
