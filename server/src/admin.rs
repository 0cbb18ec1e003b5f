//! `kernex-server admin ...`: instance administration run on the host,
//! against the database directly (no login: whoever can run it can read
//! the database anyway). Organisations are created, listed, renamed,
//! disabled and re-enabled; an organisation gets an admin with a one-time
//! password (printed once; it must be changed at first login). Every change
//! is in the organisation's audit log, by `host:kernex-server-admin`.
//!
//! A running server sees a change at once, except for devices it has
//! cached: a disabled organisation's devices are refused within the
//! caches' lifetime (10 s).

use anyhow::{Result, anyhow};
use clap::Subcommand;

use crate::audit;
use crate::service::orgs;
use crate::store::Store;

/// What `kernex-server admin` does.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Organisations.
    #[command(subcommand)]
    Org(OrgCommand),
}

/// `kernex-server admin org ...`.
#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// Every organisation: name, state, users, devices.
    List,
    /// Create an organisation, optionally with its first admin.
    Create {
        /// Name: 1-64 characters of letters, digits and ._-
        name: String,
        /// The first admin's email; the one-time password is printed.
        #[arg(long, value_name = "EMAIL")]
        admin_email: Option<String>,
    },
    /// Rename an organisation (its operators log in with the new name).
    Rename {
        /// The current name.
        name: String,
        /// The new name.
        new_name: String,
    },
    /// Disable an organisation: its operators and devices are refused.
    Disable {
        /// Name.
        name: String,
    },
    /// Re-enable a disabled organisation.
    Enable {
        /// Name.
        name: String,
    },
    /// Create an admin in an organisation (one-time password printed).
    AddAdmin {
        /// The organisation's name.
        name: String,
        /// The admin's email.
        email: String,
        /// Also an instance admin (manages organisations in the API and UI).
        #[arg(long)]
        instance_admin: bool,
    },
}

const ACTOR: &str = "host:kernex-server-admin";

async fn record(store: &Store, org_id: &str, action: &str, target: &str) -> Result<()> {
    audit::append(
        store,
        audit::Entry {
            org_id,
            actor: ACTOR,
            action,
            target,
            result: "ok",
            detail: serde_json::json!({}),
        },
    )
    .await
}

fn fail(e: crate::service::Error) -> anyhow::Error {
    anyhow!("{e}")
}

fn print_admin(org: &str, email: &str, password: &str) {
    println!("Created admin {email:?} of organisation {org:?}.");
    println!("One-time password (shown only now; it must be changed at first login): {password}");
}

async fn set_disabled(store: &Store, name: &str, disabled: bool) -> Result<()> {
    let org = orgs::by_name(store, name).await.map_err(fail)?;
    orgs::set_org_disabled(store, &org.id, disabled)
        .await
        .map_err(fail)?;
    let action = if disabled {
        "organization.disable"
    } else {
        "organization.enable"
    };
    record(store, &org.id, action, &format!("organization:{name}")).await?;
    println!(
        "Organisation {name:?} is {}.",
        if disabled { "disabled" } else { "enabled" }
    );
    Ok(())
}

/// Runs an admin command against `store` (migrated).
pub async fn run(store: &Store, cmd: AdminCommand) -> Result<()> {
    let AdminCommand::Org(cmd) = cmd;
    match cmd {
        OrgCommand::List => {
            println!(
                "{:<24} {:<9} {:>6} {:>8}  ID",
                "NAME", "STATE", "USERS", "DEVICES"
            );
            for o in orgs::list_all(store).await.map_err(fail)? {
                let state = if o.disabled != 0 {
                    "disabled"
                } else {
                    "enabled"
                };
                println!(
                    "{:<24} {:<9} {:>6} {:>8}  {}",
                    o.name, state, o.users, o.devices, o.id
                );
            }
        }
        OrgCommand::Create { name, admin_email } => {
            let id = orgs::create_org(store, &name).await.map_err(fail)?;
            record(
                store,
                &id,
                "organization.create",
                &format!("organization:{name}"),
            )
            .await?;
            println!("Created organisation {name:?} ({id}).");
            if let Some(email) = admin_email {
                let (_, password) = orgs::create_org_admin(store, &id, &email, false)
                    .await
                    .map_err(fail)?;
                record(
                    store,
                    &id,
                    "organization.admin.create",
                    &format!("user:{email}"),
                )
                .await?;
                print_admin(&name, &email, &password);
            }
        }
        OrgCommand::Rename { name, new_name } => {
            let org = orgs::by_name(store, &name).await.map_err(fail)?;
            orgs::rename_org(store, &org.id, &new_name)
                .await
                .map_err(fail)?;
            record(
                store,
                &org.id,
                "organization.rename",
                &format!("organization:{name} name={new_name}"),
            )
            .await?;
            println!("Renamed organisation {name:?} to {new_name:?}.");
        }
        OrgCommand::Disable { name } => set_disabled(store, &name, true).await?,
        OrgCommand::Enable { name } => set_disabled(store, &name, false).await?,
        OrgCommand::AddAdmin {
            name,
            email,
            instance_admin,
        } => {
            let org = orgs::by_name(store, &name).await.map_err(fail)?;
            let (_, password) = orgs::create_org_admin(store, &org.id, &email, instance_admin)
                .await
                .map_err(fail)?;
            record(
                store,
                &org.id,
                "organization.admin.create",
                &format!("user:{email}"),
            )
            .await?;
            print_admin(&name, &email, &password);
        }
    }
    Ok(())
}
