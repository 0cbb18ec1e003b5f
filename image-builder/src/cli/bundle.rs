//! `kernex-image bundle`: create, inspect, verify and compare bundles.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use kernex_protocol::archive::{self, ArchiveOptions, BuiltArchive};
use kernex_protocol::bundle::{self, Bundle, ImageInput, ReleaseInfo};
use kernex_protocol::container;
use kernex_protocol::index::ChunkerParams;
use kernex_protocol::manifest::HealthSpec;
use kernex_protocol::patch::{self, BuiltPatch};
use kernex_protocol::signature::{self, Keyring, Signer, VerifyOptions};
use kernex_protocol::{FsType, Manifest, SlotClass};
use serde::Serialize;

use crate::{fsdetect, progress};

/// Bundle commands.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum BundleCommand {
    /// Build and sign a bundle from filesystem images.
    #[command(long_about = "Build and sign a bundle from filesystem images.\n\n\
Each image is cut into content-defined chunks (RollSum, 32 KiB average by default), \
compressed with zstd into a bita archive, and indexed in the compact Kernex chunk index \
devices use to fetch only the chunks they lack. The manifest binds the image (size and \
SHA-256), the index and the archive header by digest, and is signed with a detached \
CMS signature. With --patch-from OLD.kxb the bundle also carries, per image, a patch \
from OLD's image: the chunks this release adds, each as a zstd frame against the part of \
the old image it resembles, so a device running OLD fetches a few bytes per changed chunk \
instead of the chunk. The bundle is written to a temporary file and renamed into place, so \
a failed build never leaves a partial bundle at --out.")]
    Create(CreateArgs),
    /// Show a bundle's manifest, signer and layout (without verifying it).
    #[command(long_about = "Show a bundle's manifest, signer and layout.\n\n\
Inspect checks the bundle's structure but NOT its signature: use `bundle verify` for that. \
With --json the output is the machine interface (manifest, unverified signer, member layout, \
index statistics per image).")]
    Inspect(InspectArgs),
    /// Verify a bundle exactly as a device will: signature, then every byte.
    #[command(long_about = "Verify a bundle exactly as a device will.\n\n\
Checks the signature against the keyring (signer chain, expiry, codeSigning usage), then \
every image: index and archive header digests, every chunk's hash, and the whole image's \
SHA-256. Exits 0 only if everything verifies; otherwise prints what failed and exits 1.")]
    Verify(VerifyArgs),
    /// Show what a device running one release downloads to update to another.
    #[command(
        long_about = "Show what a device running OLD downloads to install NEW.\n\n\
For each image: the index head, the index pages and the compressed chunks the device does \
not already hold, plus the manifest, signature and container headers. Neither bundle's \
signature is checked."
    )]
    Delta(DeltaArgs),
}

/// Arguments of `bundle create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Hardware class the release is for, e.g. raspberrypi4-64.
    #[arg(long)]
    pub compatible: String,
    /// Release version (semver), e.g. 1.2.0.
    #[arg(long)]
    pub version: semver::Version,
    /// Root filesystem image.
    #[arg(long, value_name = "IMAGE")]
    pub rootfs: PathBuf,
    /// Optional agent partition image (models, prompts, tools).
    #[arg(long, value_name = "IMAGE")]
    pub agent: Option<PathBuf>,
    /// Signing private key (PEM).
    #[arg(long, value_name = "PEM")]
    pub key: PathBuf,
    /// Signing certificate (PEM); further certificates in the file are
    /// intermediates included in the signature.
    #[arg(long, value_name = "PEM")]
    pub cert: PathBuf,
    /// Output bundle file.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Oldest updater version allowed to install this bundle.
    #[arg(long, default_value = "0.1.0")]
    pub min_updater_version: semver::Version,
    /// Free-form metadata, repeatable: --meta model=qwen-1.5b --meta quant=Q4_K_M.
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_meta)]
    pub metadata: Vec<(String, String)>,
    /// Health spec for the device's watchdog after it boots this release on
    /// trial: a TOML file with the keys of system.toml's `[health]` table at
    /// the top level (deadline, stability-window, max-revert-reboots,
    /// [[checks]] with type = service/http/command/llm/disk/memory), or the
    /// same as JSON when the name ends in .json. Checked against the
    /// protocol's limits before anything is built.
    #[arg(long, value_name = "FILE")]
    pub health: Option<PathBuf>,
    /// Average chunk size in bytes (rounded down to a power of two).
    #[arg(long, default_value_t = 32 * 1024)]
    pub avg_chunk_size: u32,
    /// Minimum chunk size in bytes.
    #[arg(long, default_value_t = 8 * 1024)]
    pub min_chunk_size: u32,
    /// Maximum chunk size in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_chunk_size: u32,
    /// Truncated chunk hash length in bytes (12 to 64).
    #[arg(long, default_value_t = 16)]
    pub hash_length: u8,
    /// zstd compression level (1 to 22).
    #[arg(long, default_value_t = 9)]
    pub compression_level: i32,
    /// Worker threads for hashing and compression (default: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Also encode the chunks this release adds against the images of an
    /// older release (repeatable: one patch per release devices may run).
    /// A device running that release then downloads each such chunk as a
    /// small zstd patch against its own slot instead of the whole chunk.
    /// The older bundle must verify against --keyring.
    #[arg(long, value_name = "OLD.kxb", requires = "keyring")]
    pub patch_from: Vec<PathBuf>,
    /// Keyring (PEM CA certificates) the --patch-from bundles must verify
    /// against.
    #[arg(long, value_name = "PEM")]
    pub keyring: Option<PathBuf>,
    /// zstd level of the patch frames (1 to 22; patches are made once per
    /// release and fetched by every device on the old release).
    #[arg(long, default_value_t = 19)]
    pub patch_level: i32,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// Arguments of `bundle inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The bundle.
    pub bundle: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `bundle verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The bundle.
    pub bundle: PathBuf,
    /// Trusted CA certificates (PEM); repeatable.
    #[arg(long, value_name = "PEM", required = true)]
    pub keyring: Vec<PathBuf>,
    /// Check certificate validity at this Unix time instead of now.
    #[arg(long, value_name = "UNIX-SECONDS")]
    pub at_time: Option<i64>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `bundle delta`.
#[derive(Debug, Args)]
pub struct DeltaArgs {
    /// The release the device runs now.
    pub old: PathBuf,
    /// The release to install.
    pub new: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs a bundle command.
pub fn run(cmd: BundleCommand) -> Result<()> {
    match cmd {
        BundleCommand::Create(args) => create(args),
        BundleCommand::Inspect(args) => inspect(args),
        BundleCommand::Verify(args) => verify(args),
        BundleCommand::Delta(args) => delta(args),
    }
}

/// Summary printed by `bundle create`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CreateSummary {
    /// Bundle path.
    pub bundle: PathBuf,
    /// Bundle size.
    pub size: u64,
    /// The manifest.
    pub manifest: Manifest,
    /// Signer.
    pub signer: signature::SignerInfo,
}

/// One line about a health spec: its checks by type and its timings.
fn describe_health(health: &HealthSpec) -> String {
    let checks = health.checks.as_deref().unwrap_or_default();
    let types: Vec<String> = checks
        .iter()
        .map(|c| {
            serde_json::to_value(c)
                .ok()
                .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
                .unwrap_or_else(|| "?".into())
        })
        .collect();
    let mut line = format!("{} checks ({})", checks.len(), types.join(", "));
    if let Some(d) = health.deadline {
        line.push_str(&format!(", deadline {d} s"));
    }
    if let Some(w) = health.stability_window {
        line.push_str(&format!(", stability window {w} s"));
    }
    line
}

/// Reads and checks a health spec file (`bundle create --health`).
pub fn read_health_spec(path: &Path) -> Result<HealthSpec> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("unable to read health spec {}", path.display()))?;
    let spec: HealthSpec = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text)
            .with_context(|| format!("invalid health spec {} (JSON)", path.display()))?
    } else {
        toml::from_str(&text)
            .with_context(|| format!("invalid health spec {} (TOML)", path.display()))?
    };
    spec.validate()
        .with_context(|| format!("invalid health spec {}", path.display()))?;
    Ok(spec)
}

fn create(args: CreateArgs) -> Result<()> {
    let health = args.health.as_deref().map(read_health_spec).transpose()?;
    let key = fs::read(&args.key)
        .with_context(|| format!("unable to read signing key {}", args.key.display()))?;
    let cert = fs::read(&args.cert)
        .with_context(|| format!("unable to read signing certificate {}", args.cert.display()))?;
    let signer = Signer::from_pem(&key, &cert).with_context(|| {
        format!(
            "unable to load signing key {} with certificate {}",
            args.key.display(),
            args.cert.display()
        )
    })?;
    let options = ArchiveOptions {
        chunker: ChunkerParams::rollsum(
            args.avg_chunk_size,
            args.min_chunk_size,
            args.max_chunk_size,
            64,
        ),
        hash_len: args.hash_length,
        zstd_level: args.compression_level,
        threads: args.threads,
    };
    let release = ReleaseInfo {
        version: args.version.clone(),
        compatible: args.compatible.clone(),
        min_updater_version: args.min_updater_version.clone(),
        metadata: args.metadata.iter().cloned().collect::<BTreeMap<_, _>>(),
    };
    kernex_protocol::manifest::check_compatible(&release.compatible)?;
    let out_dir = match args.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut sources = vec![(SlotClass::Rootfs, args.rootfs.clone())];
    if let Some(agent) = &args.agent {
        sources.push((SlotClass::Agent, agent.clone()));
    }
    let image_paths: Vec<PathBuf> = sources.iter().map(|(_, p)| p.clone()).collect();
    let mut built: Vec<(SlotClass, FsType, BuiltArchive)> = Vec::new();
    let mut files: Vec<File> = Vec::new();
    for (class, path) in sources {
        let filesystem = fsdetect::detect(&path)?;
        let (archive, data) = build_image(&path, class, &out_dir, &options, args.json)?;
        built.push((class, filesystem, archive));
        files.push(data);
    }
    let mut patches: Vec<Vec<BuiltPatch>> = Vec::new();
    for ((class, _, archive), path) in built.iter().zip(&image_paths) {
        patches.push(build_patches(&args, &release, *class, archive, path)?);
    }
    let inputs: Vec<ImageInput<'_>> = built
        .iter()
        .zip(&patches)
        .map(|((class, filesystem, archive), patches)| ImageInput {
            class: *class,
            filesystem: *filesystem,
            built: archive,
            patches,
        })
        .collect();
    let mut manifest = bundle::manifest_for(&release, &inputs)?;
    manifest.health = health;
    let manifest_bytes = manifest.to_vec()?;
    let sig = signer.sign(&manifest_bytes)?;

    let mut tmp = tempfile::Builder::new()
        .prefix(".kernex-bundle-")
        .tempfile_in(&out_dir)
        .with_context(|| format!("unable to create a temporary file in {}", out_dir.display()))?;
    let size = {
        let mut data: Vec<(ImageInput<'_>, &mut dyn std::io::Read)> = Vec::new();
        for f in files.iter_mut() {
            f.seek(SeekFrom::Start(0))
                .context("unable to rewind chunk data")?;
        }
        for (input, file) in inputs.into_iter().zip(files.iter_mut()) {
            data.push((input, file as &mut dyn std::io::Read));
        }
        let mut out = BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
        let size = bundle::write_bundle(&mut out, &manifest_bytes, &sig, &mut data)?;
        out.flush().context("unable to write the bundle")?;
        size
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
    tmp.persist(&args.out).with_context(|| {
        format!(
            "unable to move the bundle into place at {}",
            args.out.display()
        )
    })?;
    let summary = CreateSummary {
        bundle: args.out.clone(),
        size,
        manifest,
        signer: signer.info(),
    };
    if args.json {
        return super::print_json(&summary);
    }
    println!(
        "{}: release {} for {}, {} bytes, signed by {}",
        args.out.display(),
        summary.manifest.version,
        summary.manifest.compatible,
        size,
        summary.signer.subject
    );
    if let Some(health) = &summary.manifest.health {
        println!("  health {}", describe_health(health));
    }
    for (image, patches) in summary.manifest.images.iter().zip(&patches) {
        println!(
            "  {:<6} {:>12} bytes {:<8} sha256 {}  archive {} bytes",
            image.slot_class.as_str(),
            image.size,
            image.filesystem.as_str(),
            image.sha256,
            image.archive.size
        );
        for p in patches {
            println!(
                "         patch from {}: {} of {} new chunks patched, {} bytes",
                p.base_version,
                p.chunks_patched,
                p.chunks_new,
                p.table.len() + p.data.len()
            );
        }
    }
    Ok(())
}

/// The patches of one image from each `--patch-from` bundle that carries
/// an image of its class.
fn build_patches(
    args: &CreateArgs,
    release: &ReleaseInfo,
    class: SlotClass,
    built: &BuiltArchive,
    image: &Path,
) -> Result<Vec<BuiltPatch>> {
    let mut out: Vec<BuiltPatch> = Vec::new();
    if args.patch_from.is_empty() {
        return Ok(out);
    }
    let keyring_path = args
        .keyring
        .as_ref()
        .context("--patch-from needs --keyring")?;
    let keyring = load_keyring(std::slice::from_ref(keyring_path))?;
    for old_path in &args.patch_from {
        let mut old = open(old_path)?;
        let verified = old
            .verify(&keyring, VerifyOptions::default())
            .with_context(|| format!("{} does not verify", old_path.display()))?;
        if verified.compatible != release.compatible {
            bail!(
                "{} is for {:?}, this release for {:?}: a patch between them is never used",
                old_path.display(),
                verified.compatible,
                release.compatible
            );
        }
        let Some(entry) = verified.image(class).cloned() else {
            continue;
        };
        if entry.sha256 == built.image_sha256 {
            continue; // the same image: nothing to patch
        }
        if out.iter().any(|p| p.base_sha256 == entry.sha256) {
            continue; // two old releases with the same image
        }
        let base_len = usize::try_from(entry.size).context("base image too large")?;
        let mut base: Vec<u8> = Vec::with_capacity(base_len);
        let bar = progress::bytes(
            entry.size,
            &format!("{class} from {}", verified.version),
            args.json,
        );
        old.extract_image(&verified, class, &mut base, &|n| bar.set_position(n))
            .with_context(|| {
                format!("unable to read the {class} image of {}", old_path.display())
            })?;
        bar.finish_and_clear();
        let base_index = old.read_index(verified.manifest(), class)?;
        let mut file = File::open(image)
            .with_context(|| format!("unable to open {class} image {}", image.display()))?;
        let read_chunk = |at: u64, len: u32| -> std::io::Result<Vec<u8>> {
            use std::io::Read;
            file.seek(SeekFrom::Start(at))?;
            let mut buf = vec![0u8; len as usize];
            file.read_exact(&mut buf)?;
            Ok(buf)
        };
        let threads = match args.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let (table, data, chunks_new) = patch::build_patch(
            &base,
            &base_index,
            &built.index,
            read_chunk,
            args.patch_level,
            threads,
        )
        .with_context(|| {
            format!(
                "unable to build the {class} patch from {}",
                old_path.display()
            )
        })?;
        if table.entries.is_empty() {
            if !args.json {
                eprintln!(
                    "note: no chunk of the {class} image resembles {}'s: no patch from it",
                    verified.version
                );
            }
            continue;
        }
        out.push(BuiltPatch {
            base_version: verified.version.clone(),
            base_sha256: entry.sha256,
            table: table.encode(),
            chunks_patched: table.entries.len() as u64,
            data,
            chunks_new,
        });
    }
    Ok(out)
}

fn build_image(
    path: &Path,
    class: SlotClass,
    out_dir: &Path,
    options: &ArchiveOptions,
    quiet: bool,
) -> Result<(BuiltArchive, File)> {
    let file = File::open(path)
        .with_context(|| format!("unable to open {class} image {}", path.display()))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut data = tempfile::tempfile_in(out_dir)
        .with_context(|| format!("unable to create a temporary file in {}", out_dir.display()))?;
    let bar = progress::bytes(len, class.as_str(), quiet);
    let built = {
        let mut writer = BufWriter::with_capacity(1 << 20, &mut data);
        let built = archive::build_archive(
            BufReader::with_capacity(1 << 20, file),
            &mut writer,
            options,
            &|n| bar.set_position(n),
        )
        .with_context(|| {
            format!(
                "unable to build the {class} archive from {}",
                path.display()
            )
        })?;
        writer.flush().context("unable to write chunk data")?;
        built
    };
    bar.finish_and_clear();
    Ok((built, data))
}

/// Index statistics shown by `inspect`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct IndexStats {
    /// Slot class.
    pub slot_class: SlotClass,
    /// Chunker parameters.
    pub chunker: ChunkerParams,
    /// Hash length.
    pub hash_length: u8,
    /// Chunks in image order.
    pub chunks: u64,
    /// Distinct stored chunks.
    pub stored_chunks: u64,
    /// Bytes of compressed chunk data.
    pub chunk_data_bytes: u64,
    /// Index pages.
    pub index_pages: u64,
    /// Index head size.
    pub index_head_bytes: u64,
}

/// Output of `inspect`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct InspectOutput {
    /// Always false: inspect does not check the signature.
    pub verified: bool,
    /// The manifest.
    pub manifest: Manifest,
    /// Signer named in the signature (not checked).
    pub signer: Option<signature::SignerInfo>,
    /// Why the signer could not be read, if it could not.
    pub signer_error: Option<String>,
    /// Member layout.
    pub layout: container::BundleLayout,
    /// Per-image index statistics.
    pub images: Vec<IndexStats>,
}

fn open(path: &Path) -> Result<Bundle<BufReader<File>>> {
    let file =
        File::open(path).with_context(|| format!("unable to open bundle {}", path.display()))?;
    Bundle::open(BufReader::new(file))
        .with_context(|| format!("{} is not a valid bundle", path.display()))
}

fn inspect(args: InspectArgs) -> Result<()> {
    let mut b = open(&args.bundle)?;
    let manifest = b.unverified_manifest().clone();
    let (signer, signer_error) = match signature::signer_of(b.signature()) {
        Ok(s) => (Some(s), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let mut images = Vec::new();
    for image in &manifest.images {
        let index = b.read_index(&manifest, image.slot_class).with_context(|| {
            format!(
                "unable to read the {} index of {}",
                image.slot_class,
                args.bundle.display()
            )
        })?;
        images.push(IndexStats {
            slot_class: image.slot_class,
            chunker: *index.params(),
            hash_length: index.hash_len(),
            chunks: index.chunk_count(),
            stored_chunks: index.stored_chunks().len() as u64,
            chunk_data_bytes: index.archive_data_size(),
            index_pages: index.head().pages.len() as u64,
            index_head_bytes: index.head().head_size(),
        });
    }
    let out = InspectOutput {
        verified: false,
        manifest,
        signer,
        signer_error,
        layout: b.layout().clone(),
        images,
    };
    if args.json {
        return super::print_json(&out);
    }
    let m = &out.manifest;
    println!("bundle:       {}", args.bundle.display());
    println!("version:      {}", m.version);
    println!("compatible:   {}", m.compatible);
    println!("min updater:  {}", m.min_updater_version);
    match (&out.signer, &out.signer_error) {
        (Some(s), _) => println!("signed by:    {s} (NOT verified; use `bundle verify`)"),
        (None, Some(e)) => println!("signed by:    unreadable signature: {e}"),
        _ => {}
    }
    for (k, v) in &m.metadata {
        println!("meta:         {k} = {v}");
    }
    if let Some(health) = &m.health {
        println!("health:       {}", describe_health(health));
    }
    for (image, stats) in m.images.iter().zip(&out.images) {
        println!("image {}:", image.slot_class);
        println!("  filesystem  {}", image.filesystem);
        println!("  size        {} bytes", image.size);
        println!("  sha256      {}", image.sha256);
        println!(
            "  chunks      {} ({} stored, {} bytes compressed, avg target {} bytes)",
            stats.chunks,
            stats.stored_chunks,
            stats.chunk_data_bytes,
            stats.chunker.average_chunk_size()
        );
        println!(
            "  index       {} bytes ({} pages, head {} bytes, {}-byte hashes)",
            image.index.size, stats.index_pages, stats.index_head_bytes, stats.hash_length
        );
        println!(
            "  archive     {} bytes (header {} bytes)",
            image.archive.size, image.archive.header_size
        );
        for p in &image.patches {
            println!(
                "  patch       from {} (image sha256 {}): {} bytes (table {} bytes)",
                p.base_version, p.base_sha256, p.size, p.table_size
            );
        }
    }
    Ok(())
}

/// Output of `verify`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VerifyOutput {
    /// True: the command fails otherwise.
    pub verified: bool,
    /// Release version.
    pub version: semver::Version,
    /// Hardware class.
    pub compatible: String,
    /// Who signed.
    pub signer: signature::SignerInfo,
    /// Per-image results.
    pub images: Vec<bundle::ImageReport>,
}

/// The CA certificates of every PEM file in `paths`, as one keyring.
fn load_keyring(paths: &[PathBuf]) -> Result<Keyring> {
    let mut pem = Vec::new();
    for path in paths {
        let mut data =
            fs::read(path).with_context(|| format!("unable to read keyring {}", path.display()))?;
        pem.push(b'\n');
        pem.append(&mut data);
    }
    Keyring::from_pem(&pem).context("unable to load the keyring")
}

fn verify(args: VerifyArgs) -> Result<()> {
    let keyring = load_keyring(&args.keyring)?;
    let mut b = open(&args.bundle)?;
    let verified = b
        .verify(
            &keyring,
            VerifyOptions {
                at_time: args.at_time,
            },
        )
        .with_context(|| format!("signature of {} does not verify", args.bundle.display()))?;
    let total: u64 = verified.images.iter().map(|i| i.size).sum();
    let bar = progress::bytes(total, "verify", args.json);
    let images = b
        .verify_contents(&verified, &|n| bar.set_position(n))
        .with_context(|| format!("contents of {} do not verify", args.bundle.display()))?;
    bar.finish_and_clear();
    let out = VerifyOutput {
        verified: true,
        version: verified.version.clone(),
        compatible: verified.compatible.clone(),
        signer: verified.signer().clone(),
        images,
    };
    if args.json {
        return super::print_json(&out);
    }
    println!(
        "OK: {} release {} for {}, signed by {}",
        args.bundle.display(),
        out.version,
        out.compatible,
        out.signer
    );
    for image in &out.images {
        println!(
            "  {:<6} {} bytes, {} chunks verified, sha256 {}",
            image.slot_class.as_str(),
            image.size,
            image.stored_chunks,
            image.sha256
        );
    }
    Ok(())
}

fn delta(args: DeltaArgs) -> Result<()> {
    let mut old = open(&args.old)?;
    let mut new = open(&args.new)?;
    let out = new.delta_from(Some(&mut old)).with_context(|| {
        format!(
            "unable to compare {} with {}",
            args.new.display(),
            args.old.display()
        )
    })?;
    if out.images.is_empty() {
        bail!("{} carries no image", args.new.display());
    }
    if args.json {
        return super::print_json(&out);
    }
    let from = out
        .from
        .as_ref()
        .map_or_else(|| "nothing".to_string(), ToString::to_string);
    println!(
        "{from} -> {}: a device downloads {} bytes (full bundle: {} bytes)",
        out.to, out.total_bytes, out.full_bundle_bytes
    );
    println!(
        "  manifest + signature + headers: {} bytes",
        out.manifest_bytes
    );
    for i in &out.images {
        println!(
            "  {:<6} index head {} B, {} index pages {} B, {} chunks {} B ({} chunks reused); bita header alone: {} B",
            i.slot_class.as_str(),
            i.delta.index_head_bytes,
            i.delta.index_pages_fetched,
            i.delta.index_page_bytes,
            i.delta.chunks_fetched,
            i.delta.chunk_bytes,
            i.delta.chunks_reused,
            i.bita_header_bytes
        );
        if i.delta.patch_table_bytes > 0 {
            println!(
                "         patch from {from}: table {} B, {} chunks as patches {} B",
                i.delta.patch_table_bytes, i.delta.chunks_patched, i.delta.patch_bytes
            );
        }
    }
    Ok(())
}
