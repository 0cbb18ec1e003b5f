//! Bundle creation as a library: [`BundleBuilder`] turns filesystem images
//! into a signed bundle.
//!
//! `kernex-image bundle create` is a thin parser over it; the fleet
//! simulator, the tests, the golden-file example and the whole-system tests
//! call it directly. The steps, for each image: cut it into content-defined
//! chunks and compress them into a bita archive (chunk data spooled to a
//! scratch file), then, with older bundles to patch from, encode the chunks
//! this release adds against each older image; then derive the manifest,
//! sign it, and write the container.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use std::path::Path;
//! use kernex_image::bundle::{self, BundleBuilder, Image};
//!
//! let signer = bundle::load_signer(Path::new("keys/signing.key"), Path::new("keys/signing.crt"))?;
//! let keyring = bundle::load_keyring(&[Path::new("keys/ca.crt").to_path_buf()])?;
//! let built = BundleBuilder::new(
//!     "qemu-aarch64",
//!     semver::Version::new(1, 2, 0),
//!     Image::file("rootfs.img"),
//!     &signer,
//! )
//! .metadata("model", "qwen-1.5b")
//! .patch_from("release-1.1.0.kxb")
//! .keyring(&keyring)
//! .build(Path::new("release-1.2.0.kxb"))?;
//! println!("{} bytes", built.size);
//! # Ok(())
//! # }
//! ```

mod load;
mod patch;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Cursor, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kernex_protocol::archive::{self, ArchiveOptions, BuiltArchive};
use kernex_protocol::bundle::{self as format, ImageInput, ReleaseInfo};
use kernex_protocol::manifest::{self, HealthSpec};
use kernex_protocol::patch::BuiltPatch;
use kernex_protocol::signature::{Keyring, Signer, SignerInfo};
use kernex_protocol::{FsType, Manifest, Sha256Digest, SlotClass};

use crate::{fsdetect, progress};

pub use load::{load_keyring, load_signer, open, read_health_spec};

/// The zstd level of patch frames unless [`BundleBuilder::patch_level`]
/// says otherwise: patches are made once per release and fetched by every
/// device on the old release, so they are worth the slow level.
pub const DEFAULT_PATCH_LEVEL: i32 = 19;

/// Bytes to read: a file, or bytes already in memory.
#[derive(Debug, Clone)]
pub enum Input<'a> {
    /// A file.
    File(PathBuf),
    /// Bytes in memory.
    Bytes(&'a [u8]),
}

impl<'a> Input<'a> {
    /// What error messages call it: the path, or "(in memory)".
    fn name(&self) -> String {
        match self {
            Input::File(path) => path.display().to_string(),
            Input::Bytes(_) => "(in memory)".into(),
        }
    }

    /// Its size in bytes (0 when the file cannot be measured: the read
    /// that follows reports the error).
    fn len(&self) -> u64 {
        match self {
            Input::File(path) => fs::metadata(path).map(|m| m.len()).unwrap_or(0),
            Input::Bytes(b) => b.len() as u64,
        }
    }

    /// A reader from the start, buffered for streaming when `buffered`
    /// (not for seeking around). `what` names it in the error.
    fn open(&self, what: &str, buffered: bool) -> Result<Box<dyn ReadSeek + Send + 'a>> {
        Ok(match self {
            Input::File(path) => {
                let file = File::open(path)
                    .with_context(|| format!("unable to open {what} {}", path.display()))?;
                if buffered {
                    Box::new(BufReader::with_capacity(1 << 20, file))
                } else {
                    Box::new(file)
                }
            }
            Input::Bytes(bytes) => Box::new(Cursor::new(*bytes)),
        })
    }
}

impl From<PathBuf> for Input<'_> {
    fn from(path: PathBuf) -> Self {
        Input::File(path)
    }
}

impl From<&Path> for Input<'_> {
    fn from(path: &Path) -> Self {
        Input::File(path.to_path_buf())
    }
}

impl From<&str> for Input<'_> {
    fn from(path: &str) -> Self {
        Input::File(PathBuf::from(path))
    }
}

impl<'a> From<&'a [u8]> for Input<'a> {
    fn from(bytes: &'a [u8]) -> Self {
        Input::Bytes(bytes)
    }
}

impl<'a> From<&'a Vec<u8>> for Input<'a> {
    fn from(bytes: &'a Vec<u8>) -> Self {
        Input::Bytes(bytes)
    }
}

/// Read and seek, boxed.
trait ReadSeek: Read + Seek {}
impl<T: Read + Seek> ReadSeek for T {}

/// A filesystem image to put in a bundle.
#[derive(Debug, Clone)]
pub struct Image<'a> {
    input: Input<'a>,
    filesystem: Option<FsType>,
}

impl<'a> Image<'a> {
    /// The image in the file at `path`.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Image {
            input: Input::File(path.into()),
            filesystem: None,
        }
    }

    /// The image `bytes`.
    pub fn bytes(bytes: &'a [u8]) -> Self {
        Image {
            input: Input::Bytes(bytes),
            filesystem: None,
        }
    }

    /// Records `filesystem` in the manifest instead of recognising it by
    /// its superblock.
    pub fn filesystem(mut self, filesystem: FsType) -> Self {
        self.filesystem = Some(filesystem);
        self
    }
}

/// A signed bundle made by [`BundleBuilder`].
#[derive(Debug, Clone)]
pub struct BuiltBundle {
    /// Bundle size in bytes.
    pub size: u64,
    /// The signed manifest.
    pub manifest: Manifest,
    /// Who signed it.
    pub signer: SignerInfo,
    /// Per image, in manifest order.
    pub images: Vec<BuiltImage>,
}

/// One image of a [`BuiltBundle`].
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// Its slot class.
    pub class: SlotClass,
    /// Its filesystem, as the manifest records it.
    pub filesystem: FsType,
    /// Its archive header and chunk index.
    pub archive: BuiltArchive,
    /// The patches it carries, in the order of the older bundles.
    pub patches: Vec<PatchSummary>,
    /// Older releases with an image of this class that no chunk of this one
    /// resembles: no patch from them.
    pub unpatched: Vec<semver::Version>,
}

/// One patch of a [`BuiltImage`].
#[derive(Debug, Clone)]
pub struct PatchSummary {
    /// The release it patches from.
    pub base_version: semver::Version,
    /// SHA-256 of that release's image.
    pub base_sha256: Sha256Digest,
    /// Chunks of the new image the base lacks.
    pub chunks_new: u64,
    /// Of those, chunks carried as patches.
    pub chunks_patched: u64,
    /// Bytes of the patch (table and frames).
    pub size: u64,
}

impl PatchSummary {
    fn of(patch: &BuiltPatch) -> Self {
        PatchSummary {
            base_version: patch.base_version.clone(),
            base_sha256: patch.base_sha256,
            chunks_new: patch.chunks_new,
            chunks_patched: patch.chunks_patched,
            size: (patch.table.len() + patch.data.len()) as u64,
        }
    }
}

/// Builds and signs one bundle: a root filesystem image, optionally an
/// agent image, the release's facts, and patches from older releases.
#[derive(Debug, Clone)]
pub struct BundleBuilder<'a> {
    release: ReleaseInfo,
    rootfs: Image<'a>,
    agent: Option<Image<'a>>,
    signer: &'a Signer,
    health: Option<HealthSpec>,
    archive: ArchiveOptions,
    patch_from: Vec<Input<'a>>,
    keyring: Option<&'a Keyring>,
    patch_level: i32,
    scratch_dir: Option<PathBuf>,
    progress: progress::Mode,
}

impl<'a> BundleBuilder<'a> {
    /// Release `version` for hardware class `compatible`, of the root
    /// filesystem image `rootfs`, signed by `signer`. Everything else has
    /// the defaults of `kernex-image bundle create`: minimum updater 0.1.0,
    /// no metadata, no health spec, [`ArchiveOptions::default`], no patches,
    /// no progress bars.
    pub fn new(
        compatible: impl Into<String>,
        version: semver::Version,
        rootfs: Image<'a>,
        signer: &'a Signer,
    ) -> Self {
        BundleBuilder {
            release: ReleaseInfo {
                version,
                compatible: compatible.into(),
                min_updater_version: semver::Version::new(0, 1, 0),
                security_version: 0,
                metadata: BTreeMap::new(),
            },
            rootfs,
            agent: None,
            signer,
            health: None,
            archive: ArchiveOptions::default(),
            patch_from: Vec::new(),
            keyring: None,
            patch_level: DEFAULT_PATCH_LEVEL,
            scratch_dir: None,
            progress: progress::Mode::Off,
        }
    }

    /// Adds the agent partition image (models, prompts, tools).
    pub fn agent(mut self, agent: Image<'a>) -> Self {
        self.agent = Some(agent);
        self
    }

    /// The oldest updater version allowed to install the bundle.
    pub fn min_updater_version(mut self, version: semver::Version) -> Self {
        self.release.min_updater_version = version;
        self
    }

    /// The release's anti-rollback generation (default 0): devices that
    /// committed a release of a higher security version refuse this one.
    pub fn security_version(mut self, security_version: u64) -> Self {
        self.release.security_version = security_version;
        self
    }

    /// Adds one free-form metadata entry (model name, quantisation, notes).
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.release.metadata.insert(key.into(), value.into());
        self
    }

    /// The health spec the device's watchdog runs after booting the release
    /// on trial (see [`read_health_spec`]).
    pub fn health(mut self, health: HealthSpec) -> Self {
        self.health = Some(health);
        self
    }

    /// How images are cut into chunks and compressed; `threads` also
    /// bounds the patch workers.
    pub fn archive_options(mut self, options: ArchiveOptions) -> Self {
        self.archive = options;
        self
    }

    /// Also carries, per image, a patch from the image of the older bundle
    /// `old` (repeatable: one per release devices may run). The older
    /// bundle must verify against [`BundleBuilder::keyring`] and be for the
    /// same hardware class.
    pub fn patch_from(mut self, old: impl Into<Input<'a>>) -> Self {
        self.patch_from.push(old.into());
        self
    }

    /// The keyring the [`BundleBuilder::patch_from`] bundles must verify
    /// against.
    pub fn keyring(mut self, keyring: &'a Keyring) -> Self {
        self.keyring = Some(keyring);
        self
    }

    /// zstd level of the patch frames (1 to 22; default
    /// [`DEFAULT_PATCH_LEVEL`]).
    pub fn patch_level(mut self, level: i32) -> Self {
        self.patch_level = level;
        self
    }

    /// Where chunk data is spooled while the images are archived (default:
    /// the output's directory for [`BundleBuilder::build`], the system's
    /// temporary directory for [`BundleBuilder::write`]).
    pub fn scratch_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.scratch_dir = Some(dir.into());
        self
    }

    /// Shows progress bars on a terminal's stderr (default: no).
    pub fn progress(mut self, show: bool) -> Self {
        self.progress = if show {
            progress::Mode::Bar
        } else {
            progress::Mode::Off
        };
        self
    }

    /// How progress is reported: bars on a terminal, JSON lines on stderr
    /// (`bundle create --json`), or nothing.
    pub fn progress_mode(mut self, mode: progress::Mode) -> Self {
        self.progress = mode;
        self
    }

    /// Builds the bundle into the file `out`: written to a temporary file
    /// beside it (mode 0644), synced, and renamed into place, so a failed
    /// build never leaves a partial bundle at `out`.
    pub fn build(&self, out: &Path) -> Result<BuiltBundle> {
        let out_dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let scratch = self.scratch_dir.clone().unwrap_or_else(|| out_dir.clone());
        let prepared = self.prepare(Some(&scratch))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".kernex-bundle-")
            .tempfile_in(&out_dir)
            .with_context(|| {
                format!("unable to create a temporary file in {}", out_dir.display())
            })?;
        let built = {
            let mut writer = BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
            let built = prepared.write(&mut writer)?;
            writer.flush().context("unable to write the bundle")?;
            built
        };
        {
            use std::os::unix::fs::PermissionsExt;
            tmp.as_file()
                .set_permissions(fs::Permissions::from_mode(0o644))
                .context("unable to set the bundle's permissions")?;
        }
        tmp.as_file()
            .sync_all()
            .context("unable to sync the bundle")?;
        tmp.persist(out).with_context(|| {
            format!("unable to move the bundle into place at {}", out.display())
        })?;
        Ok(built)
    }

    /// Builds the bundle and writes it to `out` (e.g. a `Vec<u8>`).
    pub fn write(&self, out: &mut dyn Write) -> Result<BuiltBundle> {
        self.prepare(self.scratch_dir.as_deref())?.write(out)
    }

    /// Everything but the container: archives, patches, the signed
    /// manifest. Chunk data is spooled into anonymous files in `scratch`
    /// (the system's temporary directory when `None`).
    fn prepare(&self, scratch: Option<&Path>) -> Result<Prepared> {
        manifest::check_compatible(&self.release.compatible)?;
        if !self.patch_from.is_empty() && self.keyring.is_none() {
            bail!("patches from older bundles need a keyring to verify them against");
        }
        let mut images = Vec::new();
        for (class, image) in self.images() {
            let filesystem = match (&image.filesystem, &image.input) {
                (Some(known), _) => *known,
                (None, Input::File(path)) => fsdetect::detect(path)?,
                (None, Input::Bytes(bytes)) => {
                    fsdetect::detect_in(Cursor::new(*bytes)).context("unable to read the image")?
                }
            };
            let (archive, data) = self.archive_image(&image.input, class, scratch)?;
            images.push(PreparedImage {
                class,
                filesystem,
                archive,
                data,
                patches: Vec::new(),
                unpatched: Vec::new(),
            });
        }
        for (prepared, (_, image)) in images.iter_mut().zip(self.images()) {
            let (patches, unpatched) =
                patch::build(self, prepared.class, &prepared.archive, &image.input)?;
            prepared.patches = patches;
            prepared.unpatched = unpatched;
        }
        let inputs: Vec<ImageInput<'_>> = images.iter().map(PreparedImage::input).collect();
        let mut manifest = format::manifest_for(&self.release, &inputs)?;
        manifest.health = self.health.clone();
        let manifest_bytes = manifest.to_vec()?;
        let signature = self.signer.sign(&manifest_bytes)?;
        Ok(Prepared {
            manifest,
            manifest_bytes,
            signature,
            signer: self.signer.info(),
            images,
        })
    }

    /// The images in bundle order.
    fn images(&self) -> impl Iterator<Item = (SlotClass, &Image<'a>)> {
        std::iter::once((SlotClass::Rootfs, &self.rootfs))
            .chain(self.agent.as_ref().map(|agent| (SlotClass::Agent, agent)))
    }

    /// Cuts and compresses one image; returns the archive and the file its
    /// chunk data went to.
    fn archive_image(
        &self,
        input: &Input<'_>,
        class: SlotClass,
        scratch: Option<&Path>,
    ) -> Result<(BuiltArchive, File)> {
        let reader = input.open(&format!("{class} image"), true)?;
        let mut data = match scratch {
            Some(dir) => tempfile::tempfile_in(dir).with_context(|| {
                format!("unable to create a temporary file in {}", dir.display())
            })?,
            None => tempfile::tempfile().context("unable to create a temporary file")?,
        };
        let bar = progress::Step::new(
            self.progress,
            progress::Unit::Bytes,
            input.len(),
            class.as_str(),
        );
        let built = {
            let mut writer = BufWriter::with_capacity(1 << 20, &mut data);
            let built = archive::build_archive(reader, &mut writer, &self.archive, &|n| {
                bar.set_position(n)
            })
            .with_context(|| {
                format!("unable to build the {class} archive from {}", input.name())
            })?;
            writer.flush().context("unable to write chunk data")?;
            built
        };
        bar.finish();
        Ok((built, data))
    }
}

/// One image archived, with its patches, ready to be written.
struct PreparedImage {
    class: SlotClass,
    filesystem: FsType,
    archive: BuiltArchive,
    data: File,
    patches: Vec<BuiltPatch>,
    unpatched: Vec<semver::Version>,
}

impl PreparedImage {
    fn input(&self) -> ImageInput<'_> {
        ImageInput {
            class: self.class,
            filesystem: self.filesystem,
            built: &self.archive,
            patches: &self.patches,
        }
    }
}

/// A signed manifest and its images, ready to be written.
struct Prepared {
    manifest: Manifest,
    manifest_bytes: Vec<u8>,
    signature: Vec<u8>,
    signer: SignerInfo,
    images: Vec<PreparedImage>,
}

impl Prepared {
    fn write(mut self, out: &mut dyn Write) -> Result<BuiltBundle> {
        for image in &mut self.images {
            image
                .data
                .seek(SeekFrom::Start(0))
                .context("unable to rewind chunk data")?;
        }
        let size = {
            let mut data: Vec<(ImageInput<'_>, &mut dyn Read)> = self
                .images
                .iter_mut()
                .map(|image| {
                    let PreparedImage {
                        class,
                        filesystem,
                        archive,
                        data,
                        patches,
                        ..
                    } = image;
                    let input = ImageInput {
                        class: *class,
                        filesystem: *filesystem,
                        built: archive,
                        patches: patches.as_slice(),
                    };
                    (input, data as &mut dyn Read)
                })
                .collect();
            format::write_bundle(out, &self.manifest_bytes, &self.signature, &mut data)?
        };
        Ok(BuiltBundle {
            size,
            manifest: self.manifest,
            signer: self.signer,
            images: self
                .images
                .into_iter()
                .map(|image| BuiltImage {
                    class: image.class,
                    filesystem: image.filesystem,
                    patches: image.patches.iter().map(PatchSummary::of).collect(),
                    archive: image.archive,
                    unpatched: image.unpatched,
                })
                .collect(),
        })
    }
}
