//! `kernex-updater rollback`.

use anyhow::{Context as _, Result};

use super::Context;

/// Makes the other slot boot next.
pub fn run(ctx: &mut Context) -> Result<()> {
    // Asked for on the device itself: going back to an older version is the
    // point, but never below the anti-rollback floor.
    let slot = crate::boot::rollback(&ctx.config, ctx.flow.as_mut(), true)
        .context("unable to roll back")?;
    println!("slot {slot} boots next (reboot to roll back)");
    Ok(())
}
