//! `mark-good`, `mark-bad` and `rollback` through the `BootFlow`.

use kernex_bootloader::{BootFlow, Slot};

use crate::config::SystemConfig;
use crate::error::UpdateError;
use crate::install::TRY_ATTEMPTS;
use crate::store::DataDir;

/// Commits the booted slot (its counter back to 3).
pub fn mark_good(flow: &mut dyn BootFlow) -> Result<Slot, UpdateError> {
    let booted = flow.booted_slot()?;
    flow.mark_good(booted)?;
    Ok(booted)
}

/// Marks the booted slot bad (counter 0, last in the order): the next boot
/// goes to the other slot.
pub fn mark_bad(flow: &mut dyn BootFlow) -> Result<Slot, UpdateError> {
    let booted = flow.booted_slot()?;
    flow.mark_bad(booted)?;
    Ok(booted)
}

/// Makes the other slot boot next, if its record says it holds a verified
/// image and its images still hash to what that record's manifest says
/// (the previous release must be intact before switching). No download;
/// takes effect on the next boot.
pub fn rollback(config: &SystemConfig, flow: &mut dyn BootFlow) -> Result<Slot, UpdateError> {
    let data = DataDir::new(&config.data_dir);
    let other = flow.booted_slot()?.other();
    if data.pending()?.is_some_and(|p| p.target == other) {
        return Err(UpdateError::SlotState(format!(
            "slot {other} is being written by an install in progress; it holds no complete image"
        )));
    }
    match data.slot_record(other)? {
        Some(r) if r.verified => {
            let manifest = r.manifest()?;
            crate::install::verify_images(config, &manifest.images, other)?;
            flow.set_try_next(other, TRY_ATTEMPTS)?;
            Ok(other)
        }
        _ => Err(UpdateError::SlotState(format!(
            "slot {other} has no record of a verified image; refusing to boot it"
        ))),
    }
}
