//! The errors of this crate. Every variant names the value that was wrong.

use std::io;
use std::path::PathBuf;

/// What went wrong reading, decoding, encoding or writing an environment.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnvError {
    /// A variable name is empty.
    #[error("variable name is empty")]
    EmptyName,
    /// A variable name contains `=` or a NUL byte.
    #[error("variable name {name:?} contains {bad:?}, which the env format cannot store in a name")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// The offending character.
        bad: char,
    },
    /// A value contains a NUL byte.
    #[error("value of {name:?} contains a NUL byte, which the env format cannot store")]
    InvalidValue {
        /// The variable whose value was rejected.
        name: String,
    },
    /// The variables do not fit into the data area.
    #[error("environment needs {needed} bytes but the data area holds only {capacity}")]
    TooLarge {
        /// Bytes the variables need, terminator included.
        needed: usize,
        /// Bytes the data area holds.
        capacity: usize,
    },
    /// The environment size is impossible (too small for the header, or above [`crate::MAX_ENV_SIZE`]).
    #[error("environment size {size:#x} is out of range ({min:#x}..={max:#x})")]
    SizeOutOfRange {
        /// The rejected size.
        size: usize,
        /// The smallest size possible for this layout.
        min: usize,
        /// [`crate::MAX_ENV_SIZE`].
        max: usize,
    },
    /// The image has a different length than the configured environment size.
    #[error("environment image is {found} bytes, expected {expected}")]
    Truncated {
        /// The configured size.
        expected: usize,
        /// What was there.
        found: usize,
    },
    /// The CRC32 stored in the header does not match the data area.
    #[error("CRC mismatch: header says {stored:#010x}, data area has {computed:#010x}")]
    Crc {
        /// CRC from the header.
        stored: u32,
        /// CRC computed over the data area.
        computed: u32,
    },
    /// Neither copy of a redundant environment is valid.
    #[error(
        "both copies of the redundant environment are invalid (first: {first}; second: {second})"
    )]
    BothCopiesInvalid {
        /// Why the first copy was rejected.
        first: Box<EnvError>,
        /// Why the second copy was rejected.
        second: Box<EnvError>,
    },
    /// The data area has no terminating empty entry (`\0\0`).
    #[error("data area is not terminated: entry at offset {offset} runs to the end without a NUL")]
    Unterminated {
        /// Offset of the unterminated entry in the data area.
        offset: usize,
    },
    /// An entry in the data area has an empty name (`=value`).
    #[error("entry at offset {offset} of the data area has an empty name")]
    EntryWithoutName {
        /// Offset of the entry in the data area.
        offset: usize,
    },
    /// An entry in the data area is not valid UTF-8.
    #[error("entry at offset {offset} of the data area is not valid UTF-8")]
    NotUtf8 {
        /// Offset of the entry in the data area.
        offset: usize,
    },
    /// A line of a text environment (the `mkenvimage` input format) has no `=`.
    #[error("line {line} of the text environment has no '=': {text:?}")]
    TextLineWithoutEquals {
        /// 1-based line number.
        line: usize,
        /// The line (cut to 80 characters).
        text: String,
    },
    /// The text environment is larger than [`crate::MAX_ENV_SIZE`].
    #[error("text environment is {found} bytes, more than the limit of {limit}")]
    TextTooLarge {
        /// Its size.
        found: usize,
        /// [`crate::MAX_ENV_SIZE`].
        limit: usize,
    },
    /// A device could not be opened.
    #[error("unable to open {path}")]
    Open {
        /// The device or file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading from a device failed (including a device shorter than the configured env).
    #[error("unable to read the environment from {path} at offset {offset:#x}")]
    Read {
        /// The device or file.
        path: PathBuf,
        /// Byte offset of the copy.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing (or erasing, or syncing) a device failed.
    #[error("unable to write the environment to {path} at offset {offset:#x}")]
    Write {
        /// The device or file.
        path: PathBuf,
        /// Byte offset of the copy.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The device is of a kind this crate cannot write.
    #[error("{path}: {reason}")]
    Unsupported {
        /// The device.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The configuration is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// What is wrong with an `fw_env.config`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("unable to read {path}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The config file is larger than [`crate::config::MAX_CONFIG_SIZE`].
    #[error("{path}: config file is larger than {limit} bytes")]
    TooLarge {
        /// The config file.
        path: PathBuf,
        /// The limit.
        limit: u64,
    },
    /// A line has fewer than the three required fields.
    #[error(
        "line {line}: expected 'DEVICE OFFSET ENV-SIZE [SECTOR-SIZE [SECTORS]]', found {text:?}"
    )]
    MissingFields {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A number could not be parsed.
    #[error("line {line}: {field} {text:?} is not a valid {expected} number")]
    BadNumber {
        /// 1-based line number.
        line: usize,
        /// Which column.
        field: &'static str,
        /// What was there.
        text: String,
        /// "hexadecimal" or "C-style (0x.., 0.., decimal)".
        expected: &'static str,
    },
    /// A size is zero or above the limit.
    #[error("line {line}: {field} {value:#x} is out of range (1..={max:#x})")]
    OutOfRange {
        /// 1-based line number.
        line: usize,
        /// Which column.
        field: &'static str,
        /// The value.
        value: u64,
        /// The largest accepted value.
        max: u64,
    },
    /// No device line.
    #[error("no device line (expected one line, or two for a redundant environment)")]
    NoDevice,
    /// More than two device lines.
    #[error("line {line}: a third device line; at most two copies are supported")]
    TooManyDevices {
        /// 1-based line number.
        line: usize,
    },
    /// The two copies of a redundant env have different sizes.
    #[error("the two copies have different environment sizes ({first:#x} and {second:#x})")]
    SizeMismatch {
        /// Size of the first copy.
        first: usize,
        /// Size of the second copy.
        second: usize,
    },
}
