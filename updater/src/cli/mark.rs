//! `kernex-updater mark-good` and `mark-bad`.

use anyhow::{Context as _, Result};

use super::Context;

/// Commits the booted slot.
pub fn good(ctx: &mut Context) -> Result<()> {
    let slot = crate::boot::mark_good(&ctx.config, ctx.flow.as_mut())
        .context("unable to mark the booted slot good")?;
    println!("slot {slot} marked good");
    Ok(())
}

/// Marks the booted slot bad.
pub fn bad(ctx: &mut Context) -> Result<()> {
    let slot = crate::boot::mark_bad(&ctx.config, ctx.flow.as_mut())
        .context("unable to mark the booted slot bad")?;
    println!(
        "slot {slot} marked bad; the next boot goes to slot {}",
        slot.other()
    );
    Ok(())
}
