//! The GRUB environment block (`grubenv`): a 1024-byte file starting with
//! `# GRUB Environment Block`, `name=value` lines, padded with `#`.

use std::collections::BTreeMap;
use std::path::Path;

use crate::{BootError, Vars};

/// The header line of every environment block.
pub const GRUB_ENV_HEADER: &str = "# GRUB Environment Block\n";
/// The size `grub-editenv create` makes.
pub const GRUB_ENV_SIZE: usize = 1024;
/// Largest block accepted.
pub const MAX_GRUB_ENV_SIZE: usize = 64 * 1024;

/// The variables of a GRUB environment block.
///
/// ```
/// use kernex_bootloader::GrubEnv;
/// let mut env = GrubEnv::new();
/// env.set("BOOT_ORDER", "A B")?;
/// let block = env.to_bytes()?;
/// assert_eq!(block.len(), 1024);
/// assert_eq!(GrubEnv::parse(&block)?.get("BOOT_ORDER"), Some("A B"));
/// # Ok::<(), String>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrubEnv {
    vars: BTreeMap<String, String>,
    size: usize,
}

impl Default for GrubEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl GrubEnv {
    /// An empty 1024-byte block.
    pub fn new() -> Self {
        Self {
            vars: BTreeMap::new(),
            size: GRUB_ENV_SIZE,
        }
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// Sets a variable; names must be non-empty without `=`, `#` at the
    /// start, whitespace or newlines.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        if name.is_empty()
            || name.starts_with('#')
            || name.contains(['=', '\n', '\\', '\0'])
            || name.contains(char::is_whitespace)
        {
            return Err(format!("{name:?} is not a valid GRUB variable name"));
        }
        if value.contains('\0') {
            return Err(format!("value of {name:?} contains a NUL byte"));
        }
        self.vars.insert(name.to_owned(), value.to_owned());
        Ok(())
    }

    /// Removes a variable.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        self.vars.remove(name)
    }

    /// The variables, sorted.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Parses a block as GRUB does: after the header, lines starting with
    /// `#` are skipped, others are `name=value` with `\` escaping the next
    /// character (so `\` + newline is a newline in the value).
    pub fn parse(block: &[u8]) -> Result<Self, String> {
        if block.len() > MAX_GRUB_ENV_SIZE {
            return Err(format!(
                "block is {} bytes, more than {MAX_GRUB_ENV_SIZE}",
                block.len()
            ));
        }
        let Some(body) = block.strip_prefix(GRUB_ENV_HEADER.as_bytes()) else {
            return Err("does not start with \"# GRUB Environment Block\"".to_owned());
        };
        let mut vars = BTreeMap::new();
        let mut i = 0;
        while i < body.len() {
            if body[i] == b'#' {
                while i < body.len() && body[i] != b'\n' {
                    i += 1;
                }
                i += 1;
                continue;
            }
            let start = i;
            let Some(eq) = body[i..].iter().position(|b| *b == b'=' || *b == b'\n') else {
                return Err(format!(
                    "entry at byte {} has no '='",
                    start + GRUB_ENV_HEADER.len()
                ));
            };
            if body[i + eq] != b'=' || eq == 0 {
                return Err(format!(
                    "entry at byte {} is not name=value",
                    start + GRUB_ENV_HEADER.len()
                ));
            }
            let name = &body[i..i + eq];
            i += eq + 1;
            let mut value = Vec::new();
            while i < body.len() && body[i] != b'\n' {
                if body[i] == b'\\' && i + 1 < body.len() {
                    i += 1;
                }
                value.push(body[i]);
                i += 1;
            }
            if i >= body.len() {
                return Err(format!(
                    "entry at byte {} is not terminated by a newline",
                    start + GRUB_ENV_HEADER.len()
                ));
            }
            i += 1;
            let utf8 = |b: &[u8]| {
                String::from_utf8(b.to_vec()).map_err(|_| {
                    format!(
                        "entry at byte {} is not UTF-8",
                        start + GRUB_ENV_HEADER.len()
                    )
                })
            };
            vars.insert(utf8(name)?, utf8(&value)?);
        }
        Ok(Self {
            vars,
            size: block.len().max(GRUB_ENV_SIZE),
        })
    }

    /// The block, padded with `#` to its size (1024 bytes unless it was
    /// read from a larger one).
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        let mut out = GRUB_ENV_HEADER.as_bytes().to_vec();
        for (k, v) in &self.vars {
            out.extend_from_slice(k.as_bytes());
            out.push(b'=');
            for b in v.bytes() {
                if b == b'\\' || b == b'\n' {
                    out.push(b'\\');
                }
                out.push(b);
            }
            out.push(b'\n');
        }
        if out.len() > self.size {
            return Err(format!(
                "variables need {} bytes, the block holds {}",
                out.len(),
                self.size
            ));
        }
        out.resize(self.size, b'#');
        Ok(out)
    }

    /// Reads a grubenv file.
    pub fn load(path: &Path) -> Result<Self, BootError> {
        let bytes = crate::file::read_limited(path, MAX_GRUB_ENV_SIZE as u64)?;
        Self::parse(&bytes).map_err(|reason| BootError::GrubEnv {
            path: path.to_owned(),
            reason,
        })
    }

    /// Writes a grubenv file atomically (new file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), BootError> {
        let bytes = self.to_bytes().map_err(|reason| BootError::GrubEnv {
            path: path.to_owned(),
            reason,
        })?;
        crate::file::write_atomically(path, &bytes)
    }
}

impl Vars for GrubEnv {
    fn var(&self, name: &str) -> Option<&str> {
        self.get(name)
    }
    fn set_var(&mut self, name: &str, value: &str) -> Result<(), BootError> {
        self.set(name, value).map_err(|reason| BootError::GrubEnv {
            path: "grubenv".into(),
            reason,
        })
    }
}
