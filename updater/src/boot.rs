//! `mark-good`, `mark-bad` and `rollback` through the `BootFlow`.

use kernex_bootloader::{BootFlow, Slot};
use kernex_protocol::{Keyring, VerifyOptions};

use crate::config::SystemConfig;
use crate::error::UpdateError;
use crate::floor::Floor;
use crate::install::TRY_ATTEMPTS;
use crate::store::DataDir;

/// Commits the booted slot (its counter back to 3), then raises the
/// anti-rollback floor to the security version its record carries. A cut
/// between the two is caught up by [`raise_floor_to_booted`], which the
/// health watchdog runs on every boot of a committed slot.
pub fn mark_good(config: &SystemConfig, flow: &mut dyn BootFlow) -> Result<Slot, UpdateError> {
    let booted = flow.booted_slot()?;
    flow.mark_good(booted)?;
    raise_floor_to_booted(config, booted)?;
    Ok(booted)
}

/// Raises the floor to the security version of the release recorded in
/// the booted (committed) slot; returns the floor in force.
pub fn raise_floor_to_booted(config: &SystemConfig, booted: Slot) -> Result<u64, UpdateError> {
    let data = DataDir::new(&config.data_dir);
    let floor = Floor::for_device(config);
    match data.slot_record(booted)? {
        Some(record) if record.verified => floor.raise(record.manifest()?.security_version),
        _ => floor.get(),
    }
}

/// Marks the booted slot bad (counter 0, last in the order): the next boot
/// goes to the other slot. Refused when that would boot a release below
/// the anti-rollback floor ([`check_fallback`]).
pub fn mark_bad(config: &SystemConfig, flow: &mut dyn BootFlow) -> Result<Slot, UpdateError> {
    let booted = flow.booted_slot()?;
    check_fallback(config, booted.other())?;
    flow.mark_bad(booted)?;
    Ok(booted)
}

/// Refuses to make `other` boot next when the release recorded in it is
/// below the anti-rollback floor. A slot with no record of a verified
/// image (a factory image, or one an install left incomplete) has no
/// known security version: it passes only while the floor is 0.
pub fn check_fallback(config: &SystemConfig, other: Slot) -> Result<(), UpdateError> {
    let floor = Floor::for_device(config);
    let data = DataDir::new(&config.data_dir);
    let what = |version: &str| format!("fall back to {version} (slot {other})");
    match data.slot_record(other)? {
        Some(record) if record.verified => {
            let manifest = record.manifest()?;
            floor.check(
                manifest.security_version,
                &what(&manifest.version.to_string()),
            )
        }
        _ => floor.check(0, &what("an unrecorded image")),
    }
}

/// The keyring bundles must verify against.
pub fn keyring(config: &SystemConfig) -> Result<Keyring, UpdateError> {
    let pem = crate::store::read_limited(&config.keyring, 4 * 1024 * 1024)?;
    Keyring::from_pem(&pem).map_err(|e| UpdateError::Config {
        path: config.keyring.clone(),
        reason: format!("keyring: {e}"),
    })
}

/// Makes the other slot boot next, if its record says it holds a verified
/// image, the recorded manifest's signature still verifies against the
/// keyring, its security version is not below the anti-rollback floor, its
/// version is not lower than the booted one's unless `allow_downgrade`, and
/// its images still hash to what that manifest says (the previous release
/// must be intact before switching). No download; takes effect on the next
/// boot.
pub fn rollback(
    config: &SystemConfig,
    flow: &mut dyn BootFlow,
    allow_downgrade: bool,
) -> Result<Slot, UpdateError> {
    let data = DataDir::new(&config.data_dir);
    let booted = flow.booted_slot()?;
    let other = booted.other();
    if data.pending()?.is_some_and(|p| p.target == other) {
        return Err(UpdateError::SlotState(format!(
            "slot {other} is being written by an install in progress; it holds no complete image"
        )));
    }
    let record = match data.slot_record(other)? {
        Some(r) if r.verified => r,
        _ => {
            return Err(UpdateError::SlotState(format!(
                "slot {other} has no record of a verified image; refusing to boot it"
            )));
        }
    };
    let signature = hex::decode(&record.signature).map_err(|e| {
        UpdateError::Bundle(format!("slot {other}: recorded signature is not hex: {e}"))
    })?;
    // Checked now, or else at the time it was installed: a signer
    // certificate that has expired since does not strand the previous
    // release (the signature itself must verify either way).
    let keyring = keyring(config)?;
    let verify = |at_time| {
        kernex_protocol::signature::verify_manifest(
            &keyring,
            record.manifest.as_bytes(),
            &signature,
            VerifyOptions { at_time },
        )
    };
    let manifest = verify(None)
        .or_else(|e| match i64::try_from(record.installed_at) {
            Ok(at) if at > 0 => verify(Some(at)).map_err(|_| e),
            _ => Err(e),
        })
        .map_err(|e| {
            UpdateError::Bundle(format!(
                "slot {other}: recorded manifest does not verify against the keyring: {e}"
            ))
        })?;
    if manifest.compatible != config.compatible {
        return Err(UpdateError::Refused(format!(
            "slot {other} holds a release for {:?}, this device is {:?}",
            manifest.compatible, config.compatible
        )));
    }
    Floor::for_device(config).check(
        manifest.security_version,
        &format!("roll back to {} (slot {other})", manifest.version),
    )?;
    if !allow_downgrade
        && let Some(r) = data.slot_record(booted)?
        && r.verified
        && let Ok(booted_manifest) = r.manifest()
        && manifest.version < booted_manifest.version
    {
        return Err(UpdateError::Refused(format!(
            "rolling back to {} (slot {other}) would downgrade from the booted {} and allow-downgrade is false",
            manifest.version, booted_manifest.version
        )));
    }
    crate::install::verify_images(config, &manifest.images, other)?;
    flow.set_try_next(other, TRY_ATTEMPTS)?;
    Ok(other)
}
