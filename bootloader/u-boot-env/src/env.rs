//! The variables of an environment, and the two ways they are serialised:
//! the binary data area (`name=value\0...\0\0`) and the text format that
//! `mkenvimage` reads (one `name=value` per line).

use std::collections::BTreeMap;

use crate::{EnvError, MAX_ENV_SIZE};

/// The variables of a U-Boot environment.
///
/// Names are kept sorted, as U-Boot's `saveenv` writes them. Setting a
/// variable to the empty string removes it, as `setenv NAME` and
/// `fw_setenv NAME` do (U-Boot never stores an empty value).
///
/// ```
/// use u_boot_env::Env;
///
/// let mut env = Env::new();
/// env.set("BOOT_ORDER", "A B")?;
/// env.set("BOOT_A_LEFT", "3")?;
/// assert_eq!(env.get("BOOT_ORDER"), Some("A B"));
/// assert!(env.set("BAD=NAME", "x").is_err());
/// # Ok::<(), u_boot_env::EnvError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

/// Checks that `name` can be stored as a variable name.
pub fn validate_name(name: &str) -> Result<(), EnvError> {
    if name.is_empty() {
        return Err(EnvError::EmptyName);
    }
    if let Some(bad) = name.chars().find(|c| *c == '=' || *c == '\0') {
        return Err(EnvError::InvalidName {
            name: name.to_owned(),
            bad,
        });
    }
    Ok(())
}

impl Env {
    /// An empty environment.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// Sets `name` to `value`; an empty `value` removes the variable.
    ///
    /// Fails if the name is empty or contains `=` or NUL, or the value
    /// contains NUL.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), EnvError> {
        validate_name(name)?;
        if value.contains('\0') {
            return Err(EnvError::InvalidValue {
                name: name.to_owned(),
            });
        }
        if value.is_empty() {
            self.vars.remove(name);
        } else {
            self.vars.insert(name.to_owned(), value.to_owned());
        }
        Ok(())
    }

    /// Removes `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        self.vars.remove(name)
    }

    /// The variables, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of variables.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// True if there are no variables.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// Bytes the variables take in a data area, terminator included.
    pub fn encoded_len(&self) -> usize {
        self.vars
            .iter()
            .map(|(k, v)| k.len() + 1 + v.len() + 1)
            .sum::<usize>()
            + 1
    }

    /// Parses a data area: `name=value\0` entries up to an empty entry.
    ///
    /// Bytes after the terminating empty entry (padding) are ignored. As in
    /// U-Boot, an entry `name` or `name=` deletes `name`, and a later entry
    /// for the same name replaces an earlier one.
    pub fn from_data(data: &[u8]) -> Result<Self, EnvError> {
        let mut env = Env::new();
        let mut pos = 0;
        loop {
            let rest = data.get(pos..).unwrap_or_default();
            let Some(len) = rest.iter().position(|b| *b == 0) else {
                return Err(EnvError::Unterminated { offset: pos });
            };
            if len == 0 {
                return Ok(env);
            }
            let entry = &rest[..len];
            let text = std::str::from_utf8(entry).map_err(|_| EnvError::NotUtf8 { offset: pos })?;
            let (name, value) = text.split_once('=').unwrap_or((text, ""));
            if name.is_empty() {
                return Err(EnvError::EntryWithoutName { offset: pos });
            }
            if value.is_empty() {
                env.vars.remove(name);
            } else {
                env.vars.insert(name.to_owned(), value.to_owned());
            }
            pos += len + 1;
            if pos == data.len() {
                // The last entry ends exactly at the end of the area: U-Boot
                // stops there too.
                return Ok(env);
            }
        }
    }

    /// Serialises into a data area of exactly `capacity` bytes, padded with
    /// 0xff after the terminating NUL.
    pub fn to_data(&self, capacity: usize) -> Result<Vec<u8>, EnvError> {
        let needed = self.encoded_len();
        if needed > capacity {
            return Err(EnvError::TooLarge { needed, capacity });
        }
        let mut data = Vec::with_capacity(capacity);
        for (k, v) in &self.vars {
            data.extend_from_slice(k.as_bytes());
            data.push(b'=');
            data.extend_from_slice(v.as_bytes());
            data.push(0);
        }
        data.push(0);
        data.resize(capacity, 0xff);
        Ok(data)
    }

    /// Parses the text format `mkenvimage` reads: one `name=value` per line;
    /// empty lines and lines starting with `#` are skipped; a line ending in
    /// `\` continues on the next line, the newline becoming part of the value.
    ///
    /// ```
    /// let env = u_boot_env::Env::from_text("# defaults\nBOOT_ORDER=A B\nscript=echo 1\\\necho 2\n")?;
    /// assert_eq!(env.get("script"), Some("echo 1\necho 2"));
    /// # Ok::<(), u_boot_env::EnvError>(())
    /// ```
    pub fn from_text(text: &str) -> Result<Self, EnvError> {
        if text.len() > MAX_ENV_SIZE {
            return Err(EnvError::TextTooLarge {
                found: text.len(),
                limit: MAX_ENV_SIZE,
            });
        }
        let mut env = Env::new();
        let mut pending = String::new();
        let mut start_line = 0;
        for (i, line) in text.split('\n').enumerate() {
            if pending.is_empty() {
                start_line = i + 1;
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
            }
            if let Some(head) = line.strip_suffix('\\') {
                pending.push_str(head);
                pending.push('\n');
                continue;
            }
            pending.push_str(line);
            let entry = std::mem::take(&mut pending);
            let Some((name, value)) = entry.split_once('=') else {
                return Err(EnvError::TextLineWithoutEquals {
                    line: start_line,
                    text: entry.chars().take(80).collect(),
                });
            };
            env.set(name, value)?;
        }
        if !pending.is_empty() {
            // A trailing backslash on the last line: keep what we have.
            let entry = std::mem::take(&mut pending);
            let entry = entry.strip_suffix('\n').unwrap_or(&entry);
            let Some((name, value)) = entry.split_once('=') else {
                return Err(EnvError::TextLineWithoutEquals {
                    line: start_line,
                    text: entry.chars().take(80).collect(),
                });
            };
            env.set(name, value)?;
        }
        Ok(env)
    }

    /// Writes the text format [`Env::from_text`] reads (and `mkenvimage`).
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.vars {
            out.push_str(k);
            out.push('=');
            out.push_str(&v.replace('\n', "\\\n"));
            out.push('\n');
        }
        out
    }
}

impl<'a> IntoIterator for &'a Env {
    type Item = (&'a str, &'a str);
    type IntoIter = Box<dyn Iterator<Item = (&'a str, &'a str)> + 'a>;
    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}
