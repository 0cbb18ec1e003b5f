//! Reading and writing an environment where `fw_env.config` says it is.

use std::io;
use std::path::{Path, PathBuf};

use crate::image::{self, FLAG_ACTIVE, FLAG_OBSOLETE, FlagScheme, Layout};
use crate::medium::{FileMedium, Medium};
use crate::{Config, DeviceConfig, Env, EnvError};

/// One copy: its medium, where on it, and how large.
#[derive(Debug)]
pub struct StoreCopy {
    /// Name for error messages (the device path).
    pub path: PathBuf,
    /// The storage.
    pub medium: Box<dyn Medium>,
    /// Byte offset on the medium.
    pub offset: u64,
    /// Size of the copy, header included.
    pub env_size: usize,
}

/// What [`Store::read_state`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// The current variables.
    pub env: Env,
    /// Index of the copy they came from (0, or 1 for the second copy).
    pub current: usize,
    /// That copy's flag (redundant environments).
    pub flag: Option<u8>,
    /// For a redundant environment: whether the other copy is valid too.
    pub other_valid: bool,
}

/// An environment on its storage: one copy, or two with a flag byte.
///
/// Writes never touch the current copy of a redundant environment until the
/// new copy is complete and synced, so a power cut at any instant leaves a
/// valid environment (the old or the new one). A single copy in a regular
/// file is replaced by writing a new file and renaming it; a single copy on
/// a block device or flash is written in place and cannot be crash-safe —
/// use two copies there.
///
/// ```
/// use u_boot_env::{Config, DeviceConfig, Env, Store};
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("uboot.env");
/// std::fs::write(&path, vec![0u8; 0x8000])?;
/// let config = Config::redundant(
///     DeviceConfig::new(&path, 0, 0x4000),
///     DeviceConfig::new(&path, 0x4000, 0x4000),
/// );
/// let mut store = Store::open(&config)?;
/// let mut env = Env::new();
/// env.set("BOOT_ORDER", "B A")?;
/// store.write(&env)?;
/// assert_eq!(store.read()?.get("BOOT_ORDER"), Some("B A"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Store {
    copies: Vec<StoreCopy>,
    scheme: FlagScheme,
}

fn open_medium(dev: &DeviceConfig, write: bool) -> Result<Box<dyn Medium>, EnvError> {
    let open_err = |source| EnvError::Open {
        path: dev.device.clone(),
        source,
    };
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::FileTypeExt;
        let meta = std::fs::metadata(&dev.device).map_err(open_err)?;
        let name = dev
            .device
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if meta.file_type().is_char_device() {
            if name.starts_with("mtd") {
                let m = crate::medium::MtdMedium::open(&dev.device, write, dev.sector_size)
                    .map_err(open_err)?;
                return Ok(Box::new(m));
            }
            return Err(EnvError::Unsupported {
                path: dev.device.clone(),
                reason: "character device that is not MTD (UBI volumes are not supported)"
                    .to_owned(),
            });
        }
    }
    Ok(Box::new(
        FileMedium::open(&dev.device, write).map_err(open_err)?,
    ))
}

impl Store {
    /// Opens the devices of `config` for reading and writing.
    pub fn open(config: &Config) -> Result<Self, EnvError> {
        Self::open_with(config, true)
    }

    /// Opens the devices of `config` for reading only.
    pub fn open_read_only(config: &Config) -> Result<Self, EnvError> {
        Self::open_with(config, false)
    }

    /// Loads `fw_env.config` from `path` and opens its devices for writing.
    pub fn from_config_file(path: impl AsRef<Path>) -> Result<Self, EnvError> {
        Self::open(&Config::load(path)?)
    }

    fn open_with(config: &Config, write: bool) -> Result<Self, EnvError> {
        let mut copies = Vec::new();
        let mut nor = false;
        for dev in config.copies() {
            let mut medium = open_medium(dev, write)?;
            nor |= medium.is_nor_flash();
            let offset = if dev.offset < 0 {
                let size = medium.size().map_err(|source| EnvError::Read {
                    path: dev.device.clone(),
                    offset: 0,
                    source,
                })?;
                size.checked_sub(dev.offset.unsigned_abs())
                    .ok_or_else(|| EnvError::Read {
                        path: dev.device.clone(),
                        offset: 0,
                        source: io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!(
                                "offset {} is before the start of the device ({size} bytes)",
                                dev.offset
                            ),
                        ),
                    })?
            } else {
                dev.offset.unsigned_abs()
            };
            copies.push(StoreCopy {
                path: dev.device.clone(),
                medium,
                offset,
                env_size: dev.env_size,
            });
        }
        let scheme = if nor {
            FlagScheme::Boolean
        } else {
            FlagScheme::Incremental
        };
        Self::new(copies, scheme)
    }

    /// A store over media you provide (one copy, or two for redundant).
    pub fn new(copies: Vec<StoreCopy>, scheme: FlagScheme) -> Result<Self, EnvError> {
        if copies.is_empty() {
            return Err(crate::ConfigError::NoDevice.into());
        }
        if copies.len() > 2 {
            return Err(crate::ConfigError::TooManyDevices { line: 3 }.into());
        }
        if let [a, b] = copies.as_slice()
            && a.env_size != b.env_size
        {
            return Err(crate::ConfigError::SizeMismatch {
                first: a.env_size,
                second: b.env_size,
            }
            .into());
        }
        let layout = if copies.len() == 2 {
            Layout::Redundant
        } else {
            Layout::Single
        };
        for c in &copies {
            let min = layout.header_len() + 1;
            if c.env_size < min || c.env_size > crate::MAX_ENV_SIZE {
                return Err(EnvError::SizeOutOfRange {
                    size: c.env_size,
                    min,
                    max: crate::MAX_ENV_SIZE,
                });
            }
        }
        Ok(Self { copies, scheme })
    }

    /// The flag scheme writes use.
    pub fn flag_scheme(&self) -> FlagScheme {
        self.scheme
    }

    /// Overrides the flag scheme (the default is boolean on NOR flash,
    /// incremental everywhere else, as U-Boot's tools do).
    pub fn set_flag_scheme(&mut self, scheme: FlagScheme) {
        self.scheme = scheme;
    }

    /// Whether there are two copies.
    pub fn is_redundant(&self) -> bool {
        self.copies.len() == 2
    }

    fn layout(&self) -> Layout {
        if self.is_redundant() {
            Layout::Redundant
        } else {
            Layout::Single
        }
    }

    /// The raw bytes of copy `index`; a device too short for it is an
    /// invalid copy, not an I/O error.
    fn read_raw(&mut self, index: usize) -> Result<Result<Vec<u8>, EnvError>, EnvError> {
        let Some(copy) = self.copies.get_mut(index) else {
            return Ok(Err(EnvError::Truncated {
                expected: 0,
                found: 0,
            }));
        };
        let mut buf = vec![0u8; copy.env_size];
        match copy.medium.read_at(copy.offset, &mut buf) {
            Ok(()) => Ok(Ok(buf)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                let size = copy.medium.size().unwrap_or(0);
                Ok(Err(EnvError::Truncated {
                    expected: copy.env_size,
                    found: size.saturating_sub(copy.offset) as usize,
                }))
            }
            Err(source) => Err(EnvError::Read {
                path: copy.path.clone(),
                offset: copy.offset,
                source,
            }),
        }
    }

    /// Reads the current environment and where it came from.
    pub fn read_state(&mut self) -> Result<State, EnvError> {
        if !self.is_redundant() {
            let raw = self.read_raw(0)??;
            let d = image::decode(&raw, Layout::Single)?;
            return Ok(State {
                env: d.env,
                current: 0,
                flag: None,
                other_valid: false,
            });
        }
        let first = self.read_raw(0)?;
        let second = self.read_raw(1)?;
        let r = match (first, second) {
            (Ok(a), Ok(b)) => image::decode_redundant(&a, &b)?,
            (Ok(a), Err(e)) => pick_one(&a, 0, e)?,
            (Err(e), Ok(b)) => pick_one(&b, 1, e)?,
            (Err(a), Err(b)) => {
                return Err(EnvError::BothCopiesInvalid {
                    first: Box::new(a),
                    second: Box::new(b),
                });
            }
        };
        Ok(State {
            env: r.env,
            current: r.current,
            flag: Some(r.flag),
            other_valid: r.other_valid,
        })
    }

    /// Reads the current environment.
    pub fn read(&mut self) -> Result<Env, EnvError> {
        Ok(self.read_state()?.env)
    }

    /// Writes `env` as the new current environment.
    ///
    /// Redundant: the copy that is not current gets the new content and the
    /// next flag, is synced, and only then (boolean scheme) is the old copy's
    /// flag cleared. If neither copy is valid the first is written.
    pub fn write(&mut self, env: &Env) -> Result<(), EnvError> {
        let layout = self.layout();
        if layout == Layout::Single {
            let image = image::encode(env, self.copies[0].env_size, layout, 0)?;
            return self.write_copy(0, &image, true);
        }
        // Check that it fits before looking at the device.
        image::encode(env, self.copies[0].env_size, layout, 0)?;
        let (target, flag, obsolete) = match self.read_state() {
            Ok(s) => {
                let target = 1 - s.current;
                let old = s.flag.unwrap_or(FLAG_OBSOLETE);
                match self.scheme {
                    FlagScheme::Incremental => (target, old.wrapping_add(1), None),
                    FlagScheme::Boolean => (target, FLAG_ACTIVE, Some(s.current)),
                }
            }
            Err(EnvError::BothCopiesInvalid { .. }) => (0, FLAG_ACTIVE, None),
            Err(e) => return Err(e),
        };
        let image = image::encode(env, self.copies[target].env_size, layout, flag)?;
        self.write_copy(target, &image, false)?;
        if let Some(old) = obsolete {
            let copy = &mut self.copies[old];
            let werr = |source| EnvError::Write {
                path: copy.path.clone(),
                offset: copy.offset,
                source,
            };
            copy.medium
                .write_at(copy.offset + 4, &[FLAG_OBSOLETE])
                .map_err(werr)?;
            copy.medium.sync().map_err(|source| EnvError::Write {
                path: copy.path.clone(),
                offset: copy.offset,
                source,
            })?;
        }
        Ok(())
    }

    /// Reads, lets `f` change the variables, and writes the result (also
    /// when the environment could not be read, starting from an empty one,
    /// as `fw_setenv` does).
    pub fn update<F>(&mut self, f: F) -> Result<Env, EnvError>
    where
        F: FnOnce(&mut Env) -> Result<(), EnvError>,
    {
        let mut env = match self.read() {
            Ok(env) => env,
            Err(
                EnvError::Crc { .. }
                | EnvError::BothCopiesInvalid { .. }
                | EnvError::Truncated { .. }
                | EnvError::Unterminated { .. },
            ) => Env::new(),
            Err(e) => return Err(e),
        };
        f(&mut env)?;
        self.write(&env)?;
        Ok(env)
    }

    fn write_copy(&mut self, index: usize, image: &[u8], single: bool) -> Result<(), EnvError> {
        let copy = &mut self.copies[index];
        let path = copy.path.clone();
        let offset = copy.offset;
        let werr = |source| EnvError::Write {
            path: path.clone(),
            offset,
            source,
        };
        if let Some(es) = copy.medium.erase_block_size() {
            // Flash: read the erase blocks the copy spans, patch, erase, write.
            let start = offset - offset % es;
            let end_raw = offset + image.len() as u64;
            let end = end_raw.div_ceil(es) * es;
            let mut span = vec![0u8; (end - start) as usize];
            copy.medium.read_at(start, &mut span).map_err(werr)?;
            let at = (offset - start) as usize;
            span[at..at + image.len()].copy_from_slice(image);
            copy.medium.erase(start, end - start).map_err(werr)?;
            copy.medium.write_at(start, &span).map_err(werr)?;
            copy.medium.sync().map_err(werr)?;
            return Ok(());
        }
        if single
            && copy
                .medium
                .replace_atomically(offset, image)
                .map_err(werr)?
        {
            return Ok(());
        }
        copy.medium.write_at(offset, image).map_err(werr)?;
        copy.medium.sync().map_err(werr)?;
        Ok(())
    }
}

fn pick_one(raw: &[u8], index: usize, other: EnvError) -> Result<image::RedundantRead, EnvError> {
    match image::decode(raw, Layout::Redundant) {
        Ok(d) => Ok(image::RedundantRead {
            env: d.env,
            current: index,
            flag: d.flag.unwrap_or(FLAG_ACTIVE),
            other_valid: false,
        }),
        Err(e) => {
            let (first, second) = if index == 0 { (e, other) } else { (other, e) };
            Err(EnvError::BothCopiesInvalid {
                first: Box::new(first),
                second: Box::new(second),
            })
        }
    }
}
