//! The boot-state contract itself: `BOOT_ORDER`, `BOOT_A_LEFT`, `BOOT_B_LEFT`.

use crate::{BootError, Slot};

/// The order used when `BOOT_ORDER` is not set.
pub const DEFAULT_ORDER: [Slot; 2] = [Slot::A, Slot::B];
/// Attempts a slot gets when it is marked good, and when a counter is not
/// set; also what a slot holding a release gets on a factory disk
/// (`kernex-image disk create`). The one definition of "3 attempts".
pub const DEFAULT_ATTEMPTS: u32 = 3;
/// Most attempts a slot can be given: the boot scripts count single digits
/// (U-Boot's `setexpr` is hexadecimal, `test -gt` decimal; GRUB cannot do
/// arithmetic at all).
pub const MAX_ATTEMPTS: u32 = 9;
/// The variable with the slots to try, in order.
pub const BOOT_ORDER: &str = "BOOT_ORDER";

/// The variables the boot-state contract reads and writes, decoded.
///
/// Missing variables take the defaults the boot scripts also use:
/// `BOOT_ORDER="A B"`, 3 attempts each.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BootState {
    /// `BOOT_ORDER`: slots to try, first first.
    pub order: Vec<Slot>,
    /// `BOOT_A_LEFT`.
    pub a_left: u32,
    /// `BOOT_B_LEFT`.
    pub b_left: u32,
}

/// The slot a boot chose ([`BootState::select_boot`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootSelection {
    /// The slot booted.
    pub slot: Slot,
    /// No slot had attempts left: the counters were reset.
    pub fallback: bool,
}

/// Read/write access to a bootloader's variables.
pub trait Vars {
    /// The value of `name`, if set.
    fn var(&self, name: &str) -> Option<&str>;
    /// Sets `name` to `value`.
    fn set_var(&mut self, name: &str, value: &str) -> Result<(), BootError>;
}

impl Vars for u_boot_env::Env {
    fn var(&self, name: &str) -> Option<&str> {
        self.get(name)
    }
    fn set_var(&mut self, name: &str, value: &str) -> Result<(), BootError> {
        Ok(self.set(name, value)?)
    }
}

/// Variables collected in a map: what a new environment (a factory disk's
/// U-Boot env or grubenv) should hold, before it is encoded.
impl Vars for std::collections::BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
    fn set_var(&mut self, name: &str, value: &str) -> Result<(), BootError> {
        self.insert(name.to_owned(), value.to_owned());
        Ok(())
    }
}

fn parse_order(value: &str) -> Result<Vec<Slot>, BootError> {
    let mut order = Vec::new();
    for word in value.split_ascii_whitespace() {
        let slot = match word {
            "A" => Slot::A,
            "B" => Slot::B,
            _ => {
                return Err(BootError::InvalidOrder {
                    value: value.chars().take(80).collect(),
                });
            }
        };
        if order.contains(&slot) {
            return Err(BootError::InvalidOrder {
                value: value.chars().take(80).collect(),
            });
        }
        order.push(slot);
    }
    if order.is_empty() {
        return Ok(DEFAULT_ORDER.to_vec());
    }
    Ok(order)
}

fn parse_counter(vars: &dyn Vars, slot: Slot) -> Result<u32, BootError> {
    let name = slot.left_var();
    match vars.var(name) {
        None => Ok(DEFAULT_ATTEMPTS),
        Some(v) => v
            .trim()
            .parse::<u32>()
            .map_err(|_| BootError::InvalidCounter {
                name: name.to_owned(),
                value: v.chars().take(40).collect(),
            }),
    }
}

impl Default for BootState {
    fn default() -> Self {
        Self {
            order: DEFAULT_ORDER.to_vec(),
            a_left: DEFAULT_ATTEMPTS,
            b_left: DEFAULT_ATTEMPTS,
        }
    }
}

impl BootState {
    /// Decodes the contract's variables.
    pub fn from_vars(vars: &dyn Vars) -> Result<Self, BootError> {
        Ok(Self {
            order: match vars.var(BOOT_ORDER) {
                Some(v) => parse_order(v)?,
                None => DEFAULT_ORDER.to_vec(),
            },
            a_left: parse_counter(vars, Slot::A)?,
            b_left: parse_counter(vars, Slot::B)?,
        })
    }

    /// Writes the contract's variables (and only those).
    pub fn to_vars(&self, vars: &mut dyn Vars) -> Result<(), BootError> {
        let order: Vec<&str> = self.order.iter().map(|s| s.name()).collect();
        vars.set_var(BOOT_ORDER, &order.join(" "))?;
        vars.set_var(Slot::A.left_var(), &self.a_left.to_string())?;
        vars.set_var(Slot::B.left_var(), &self.b_left.to_string())?;
        Ok(())
    }

    /// Attempts left for `slot`.
    pub fn attempts_left(&self, slot: Slot) -> u32 {
        match slot {
            Slot::A => self.a_left,
            Slot::B => self.b_left,
        }
    }

    fn set_left(&mut self, slot: Slot, n: u32) {
        match slot {
            Slot::A => self.a_left = n,
            Slot::B => self.b_left = n,
        }
    }

    /// The slot the bootloader will boot next: the first in `BOOT_ORDER`
    /// with attempts left; `None` if none has any (the boot script then
    /// resets the counters and boots the first slot of `BOOT_ORDER`).
    pub fn primary(&self) -> Option<Slot> {
        self.order
            .iter()
            .copied()
            .find(|s| self.attempts_left(*s) > 0)
    }

    /// Try `slot` first on the next boots, `attempts` times (1..=9).
    pub fn set_try_next(&mut self, slot: Slot, attempts: u32) -> Result<(), BootError> {
        if attempts == 0 || attempts > MAX_ATTEMPTS {
            return Err(BootError::InvalidAttempts {
                slot,
                attempts,
                max: MAX_ATTEMPTS,
            });
        }
        self.order.retain(|s| *s != slot);
        self.order.insert(0, slot);
        if !self.order.contains(&slot.other()) {
            self.order.push(slot.other());
        }
        self.set_left(slot, attempts);
        Ok(())
    }

    /// `slot` booted and is healthy: its counter goes back to the default.
    pub fn mark_good(&mut self, slot: Slot) {
        self.set_left(slot, DEFAULT_ATTEMPTS);
        if !self.order.contains(&slot) {
            self.order.push(slot);
        }
    }

    /// What the boot script (`uboot/boot.cmd`, the `kernex-select` part,
    /// and `grub/grub.cfg`) does at power-on: take the first slot of
    /// `BOOT_ORDER` with attempts left and count one attempt; if none has
    /// any, reset both counters and boot the first slot of `BOOT_ORDER`,
    /// counting that attempt too. Simulated devices "boot" through this;
    /// `tests/uboot_qemu.rs` checks real U-Boot makes the same choices.
    pub fn select_boot(&mut self) -> BootSelection {
        if let Some(slot) = self.primary() {
            self.set_left(slot, self.attempts_left(slot) - 1);
            return BootSelection {
                slot,
                fallback: false,
            };
        }
        self.a_left = DEFAULT_ATTEMPTS;
        self.b_left = DEFAULT_ATTEMPTS;
        let slot = self.order.first().copied().unwrap_or(Slot::A);
        self.set_left(slot, DEFAULT_ATTEMPTS - 1);
        BootSelection {
            slot,
            fallback: true,
        }
    }

    /// `slot` is broken: no attempts left, and last in `BOOT_ORDER`.
    pub fn mark_bad(&mut self, slot: Slot) {
        self.set_left(slot, 0);
        self.order.retain(|s| *s != slot);
        self.order.push(slot);
    }
}
