//! `kernex-server admin ...`: instance administration run on the host,
//! against the database directly (no login: whoever can run it can read
//! the database anyway). Organisations are created, listed, renamed,
//! disabled and re-enabled; an organisation gets an admin with a one-time
//! password (printed once; it must be changed at first login). Every change
//! is in the organisation's audit log, by `host:kernex-server-admin`, in
//! the change's own transaction (`service::audit::Audited`): both commit
//! or neither does.
//!
//! A running server sees a change at once, except for devices it has
//! cached: a disabled organisation's devices are refused within the
//! caches' lifetime (10 s).

use anyhow::{Result, anyhow};
use clap::Subcommand;

use crate::service::{self, audit::Audited, orgs};
use crate::store::{Store, new_id};

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

fn fail(e: crate::service::Error) -> anyhow::Error {
    anyhow!("{e}")
}

fn print_admin(org: &str, email: &str, password: &str) {
    println!("Created admin {email:?} of organisation {org:?}.");
    println!("One-time password (shown only now; it must be changed at first login): {password}");
}

/// Creates organisation `name` and, optionally, its first admin, with
/// their entries, in one transaction: all of it or nothing. A failure is
/// not recorded (the organisation's log is what was not made).
async fn create(store: &Store, name: &str, admin_email: Option<&str>) -> Result<()> {
    let password = match admin_email {
        Some(email) => Some(orgs::host_admin_password(email).await.map_err(fail)?),
        None => None,
    };
    let id = new_id()?;
    let label = format!("organization:{name}");
    let audit = Audited::by(store, &id, ACTOR, "organization.create", &label).failures_unrecorded();
    let mut tx = audit.begin().await.map_err(fail)?;
    let outcome: service::Result<_> = async {
        orgs::insert_org_in(&mut tx, &id, name).await?;
        let admin = match (admin_email, password) {
            (Some(email), Some(p)) => {
                let admin = orgs::new_admin(&mut tx, &id, name, email, p, false).await?;
                let target = format!("user:{email}");
                audit
                    .also(&mut tx, "organization.admin.create", &target)
                    .await?;
                Some(admin)
            }
            _ => None,
        };
        Ok((admin, String::new()))
    }
    .await;
    let admin = audit.finish(tx, outcome).await.map_err(fail)?;
    println!("Created organisation {name:?} ({id}).");
    if let Some(a) = admin {
        print_admin(name, &a.email, &a.password);
    }
    Ok(())
}

/// Renames, disables or re-enables organisation `name` and records it, in
/// one transaction; a failure is recorded in its log.
async fn change(store: &Store, name: &str, change: Change<'_>) -> Result<()> {
    let org = orgs::by_name(store, name).await.map_err(fail)?;
    let label = format!("organization:{name}");
    let (action, target) = match change {
        Change::Rename(new_name) => ("organization.rename", format!("{label} name={new_name}")),
        Change::Disabled(true) => ("organization.disable", label),
        Change::Disabled(false) => ("organization.enable", label),
    };
    let audit = Audited::by(store, &org.id, ACTOR, action, &target);
    let mut tx = audit.begin().await.map_err(fail)?;
    let outcome: service::Result<_> = async {
        match change {
            Change::Rename(new_name) => orgs::rename_org_in(&mut tx, &org.id, new_name).await?,
            Change::Disabled(d) => orgs::set_org_disabled_in(&mut tx, &org.id, d).await?,
        }
        Ok(((), String::new()))
    }
    .await;
    audit.finish(tx, outcome).await.map_err(fail)?;
    match change {
        Change::Rename(new_name) => println!("Renamed organisation {name:?} to {new_name:?}."),
        Change::Disabled(d) => println!(
            "Organisation {name:?} is {}.",
            if d { "disabled" } else { "enabled" }
        ),
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Change<'a> {
    Rename(&'a str),
    Disabled(bool),
}

/// Creates an admin in organisation `name` and records it, in one
/// transaction; a failure is recorded in its log.
async fn add_admin(store: &Store, name: &str, email: &str, instance_admin: bool) -> Result<()> {
    let org = orgs::by_name(store, name).await.map_err(fail)?;
    let target = format!("user:{email}");
    let audit = Audited::by(store, &org.id, ACTOR, "organization.admin.create", &target);
    let password = match orgs::host_admin_password(email).await {
        Ok(p) => p,
        Err(e) => return audit.fail(e).await.map_err(fail),
    };
    let mut tx = audit.begin().await.map_err(fail)?;
    let outcome: service::Result<_> = async {
        let admin =
            orgs::new_admin(&mut tx, &org.id, name, email, password, instance_admin).await?;
        Ok((admin, String::new()))
    }
    .await;
    let admin = audit.finish(tx, outcome).await.map_err(fail)?;
    print_admin(name, &admin.email, &admin.password);
    Ok(())
}

/// Runs an admin command against `store` (migrated). Every change and its
/// audit entry commit together or not at all.
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
            create(store, &name, admin_email.as_deref()).await?;
        }
        OrgCommand::Rename { name, new_name } => {
            change(store, &name, Change::Rename(&new_name)).await?;
        }
        OrgCommand::Disable { name } => change(store, &name, Change::Disabled(true)).await?,
        OrgCommand::Enable { name } => change(store, &name, Change::Disabled(false)).await?,
        OrgCommand::AddAdmin {
            name,
            email,
            instance_admin,
        } => add_admin(store, &name, &email, instance_admin).await?,
    }
    Ok(())
}
