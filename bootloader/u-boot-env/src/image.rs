//! One environment copy as bytes: `crc32 (LE) [flag] data`.

use crate::{Env, EnvError, MAX_ENV_SIZE};

/// Flag byte U-Boot writes into the copy that is current (boolean scheme).
pub const FLAG_ACTIVE: u8 = 1;
/// Flag byte U-Boot writes into the copy that is stale (boolean scheme).
pub const FLAG_OBSOLETE: u8 = 0;

/// Whether a copy has the redundant-env flag byte after its CRC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `crc32 data` — one copy, as `mkenvimage` writes without `-r`.
    Single,
    /// `crc32 flag data` — one of two copies, as `mkenvimage -r` writes.
    Redundant,
}

impl Layout {
    /// Bytes before the data area.
    pub fn header_len(self) -> usize {
        match self {
            Layout::Single => 4,
            Layout::Redundant => 5,
        }
    }
}

/// How the flag bytes of a redundant pair tell which copy is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagScheme {
    /// The new copy gets the old copy's flag plus one (wrapping 0xff to 0).
    /// U-Boot and fw_setenv use it for files, block devices, NAND and UBI.
    Incremental,
    /// The new copy gets [`FLAG_ACTIVE`], then the old copy's flag byte is
    /// overwritten with [`FLAG_OBSOLETE`]. Used on NOR flash, where clearing
    /// bits needs no erase.
    Boolean,
}

/// A decoded copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The variables.
    pub env: Env,
    /// The flag byte (redundant layout only).
    pub flag: Option<u8>,
}

fn check_size(size: usize, layout: Layout) -> Result<(), EnvError> {
    let min = layout.header_len() + 1;
    if size < min || size > MAX_ENV_SIZE {
        return Err(EnvError::SizeOutOfRange {
            size,
            min,
            max: MAX_ENV_SIZE,
        });
    }
    Ok(())
}

/// Encodes `env` as one copy of `size` bytes (header included).
///
/// ```
/// use u_boot_env::{decode, encode, Env, Layout};
///
/// let mut env = Env::new();
/// env.set("bootdelay", "0")?;
/// let image = encode(&env, 0x4000, Layout::Redundant, 7)?;
/// let copy = decode(&image, Layout::Redundant)?;
/// assert_eq!((copy.env, copy.flag), (env, Some(7)));
/// # Ok::<(), u_boot_env::EnvError>(())
/// ```
pub fn encode(env: &Env, size: usize, layout: Layout, flag: u8) -> Result<Vec<u8>, EnvError> {
    check_size(size, layout)?;
    let data = env.to_data(size - layout.header_len())?;
    let mut image = Vec::with_capacity(size);
    image.extend_from_slice(&crc32fast::hash(&data).to_le_bytes());
    if layout == Layout::Redundant {
        image.push(flag);
    }
    image.extend_from_slice(&data);
    Ok(image)
}

/// Decodes one copy; `image.len()` is the environment size.
pub fn decode(image: &[u8], layout: Layout) -> Result<Decoded, EnvError> {
    check_size(image.len(), layout)?;
    let (crc, rest) = image.split_at(4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let (flag, data) = match layout {
        Layout::Single => (None, rest),
        Layout::Redundant => (Some(rest[0]), &rest[1..]),
    };
    let computed = crc32fast::hash(data);
    if stored != computed {
        return Err(EnvError::Crc { stored, computed });
    }
    Ok(Decoded {
        env: Env::from_data(data)?,
        flag,
    })
}

/// Which of two valid copies is current, by their flags, exactly as U-Boot
/// decides (`env_check_redund`). Returns 0 for the first copy, 1 for the second.
pub fn current_copy(first_flag: u8, second_flag: u8) -> usize {
    match (first_flag, second_flag) {
        (FLAG_ACTIVE, FLAG_OBSOLETE) => 0,
        (FLAG_OBSOLETE, FLAG_ACTIVE) => 1,
        (0xff, 0) => 1,
        (0, 0xff) => 0,
        (a, b) if b > a => 1,
        _ => 0,
    }
}

/// The outcome of reading both copies of a redundant environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedundantRead {
    /// The current copy's variables.
    pub env: Env,
    /// Index (0 or 1) of the current copy.
    pub current: usize,
    /// The current copy's flag.
    pub flag: u8,
    /// Whether the other copy is valid too.
    pub other_valid: bool,
}

/// Picks the current copy of a redundant pair; fails only if both are invalid.
pub fn decode_redundant(first: &[u8], second: &[u8]) -> Result<RedundantRead, EnvError> {
    match (
        decode(first, Layout::Redundant),
        decode(second, Layout::Redundant),
    ) {
        (Err(a), Err(b)) => Err(EnvError::BothCopiesInvalid {
            first: Box::new(a),
            second: Box::new(b),
        }),
        (Ok(a), Err(_)) => Ok(RedundantRead {
            env: a.env,
            current: 0,
            flag: a.flag.unwrap_or(FLAG_ACTIVE),
            other_valid: false,
        }),
        (Err(_), Ok(b)) => Ok(RedundantRead {
            env: b.env,
            current: 1,
            flag: b.flag.unwrap_or(FLAG_ACTIVE),
            other_valid: false,
        }),
        (Ok(a), Ok(b)) => {
            let (fa, fb) = (a.flag.unwrap_or(0), b.flag.unwrap_or(0));
            if current_copy(fa, fb) == 0 {
                Ok(RedundantRead {
                    env: a.env,
                    current: 0,
                    flag: fa,
                    other_valid: true,
                })
            } else {
                Ok(RedundantRead {
                    env: b.env,
                    current: 1,
                    flag: fb,
                    other_valid: true,
                })
            }
        }
    }
}
