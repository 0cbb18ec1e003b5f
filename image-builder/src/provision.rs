//! Provisioning one board on a factory line, unattended:
//!
//! 1. read the disk image's record (`etc/kernex/disk.json` on its data
//!    partition, written by `disk create`);
//! 2. read the board's TPM endorsement key, when there is a TPM (`--tpm`);
//! 3. pre-authorise the device with the control plane ([`crate::preauth`]),
//!    and make the board its own single-use enrollment token from the
//!    batch's (`--enroll-token`: same tags, policy and expiry, `max-uses`
//!    1), so that a token read off one board enrolls no other;
//! 4. write the image to the target (a block device or a file) and read it
//!    back: its SHA-256 must equal the image's;
//! 5. write the device's identity into the target's data partition:
//!    `[server]` in `etc/kernex/system.toml` (url, device-id,
//!    enrollment-token-file), `etc/kernex/enrollment-token` (0600, the
//!    board's single-use token, never the batch's) and
//!    `etc/kernex/provisioning.json` (this report).
//!
//! The cheap checks and the server come before the long write, so a
//! rejected token or a missing TPM stops before the target is touched. A
//! failed write or identity step revokes the board's token, withdraws a
//! pre-authorisation this run created, removes a file target and clears
//! the first MiB of a block
//! device, so no half-written board boots. A block device is read back
//! with `O_DIRECT`, from the medium rather than the page cache.
//! Running it again on the same board gives the same result (the server
//! answers 200 for the same device and EK), with a new single-use token:
//! the earlier one, never used, expires with the batch's (or revoke it;
//! its id is in the earlier report).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};

use kernex_device::{ServerConfig, SystemConfig};

use crate::disk::{DISK_RECORD, DiskRecord, SYSTEM_TOML, table, tools};
use crate::preauth::{self, Outcome, PreauthRequest, Preauthorization};
use crate::progress;

/// Where the enrollment token goes on the data partition.
pub const TOKEN_FILE: &str = "/etc/kernex/enrollment-token";
/// Where the report goes on the data partition.
pub const REPORT_FILE: &str = "/etc/kernex/provisioning.json";
/// Longest device id accepted.
pub const MAX_DEVICE_ID: usize = 128;
const BLOCK: usize = 4 << 20;

/// Options of [`provision`].
#[derive(Debug, Clone)]
pub struct ProvisionOptions {
    /// The disk image (`disk create`).
    pub image: PathBuf,
    /// The board's disk, or a file.
    pub target: PathBuf,
    /// The control plane.
    pub server: String,
    /// The factory enrollment token the device enrolls with.
    pub enroll_token: String,
    /// The operator API token for pre-authorisation.
    pub api_token: String,
    /// The device id (serial); derived from the EK when absent and there is
    /// a TPM.
    pub device_id: Option<String>,
    /// TCTI of the board's TPM.
    pub tpm: Option<String>,
    /// No progress bars.
    pub quiet: bool,
}

/// The EK as read from the TPM.
#[derive(Debug, Clone)]
pub struct EkInfo {
    /// Marshalled `TPMT_PUBLIC`.
    pub public: Vec<u8>,
    /// DER certificate, when the TPM has one.
    pub certificate: Option<Vec<u8>>,
}

/// The provisioning report (`--json`; also kept on the data partition).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ProvisionReport {
    /// The device id (serial).
    pub device_id: String,
    /// SHA-256 of the EK public bytes (none without a TPM).
    pub ek_fingerprint: Option<String>,
    /// Whether the TPM carried an EK certificate.
    pub ek_certificate: bool,
    /// The board profile the image was made for.
    pub board: String,
    /// The release in slot A.
    pub image_version: Option<String>,
    /// SHA-256 of slot A's image.
    pub slot_a_sha256: String,
    /// SHA-256 of the whole disk image as written and read back.
    pub image_sha256: String,
    /// Bytes written.
    pub image_size: u64,
    /// The target.
    pub target: PathBuf,
    /// The control plane.
    pub server: String,
    /// The server's pre-authorisation.
    pub preauthorization: Preauthorization,
    /// The id of the board's single-use enrollment token (not its secret).
    pub enrollment_token_id: String,
    /// Created now, or already there (a re-run).
    pub preauthorization_outcome: Outcome,
    /// When (RFC 3339, UTC).
    pub time: String,
    /// How long it took, seconds.
    pub seconds: f64,
}

/// The data partition of a disk image and its record.
#[derive(Debug, Clone)]
pub struct DataPartition {
    /// Its first byte.
    pub start: u64,
    /// What `disk create` recorded.
    pub record: DiskRecord,
}

/// Finds the data partition of a `disk create` image: the ext4 partition
/// holding `etc/kernex/disk.json`.
pub fn find_data_partition(image: &Path) -> Result<DataPartition> {
    let mut file =
        File::open(image).with_context(|| format!("unable to open {}", image.display()))?;
    let (_, parts) = table::read(&mut file)
        .with_context(|| format!("unable to read the partition table of {}", image.display()))?;
    for p in parts {
        let mut magic = [0u8; 2];
        file.seek(SeekFrom::Start(p.start + 1024 + 56))
            .and_then(|_| file.read_exact(&mut magic))
            .with_context(|| format!("unable to read partition {}", p.number))?;
        if u16::from_le_bytes(magic) != 0xEF53 {
            continue;
        }
        let Some(bytes) = tools::ext4_read(image, p.start, DISK_RECORD)? else {
            continue;
        };
        let record: DiskRecord = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{DISK_RECORD} on partition {} is not a disk record",
                p.number
            )
        })?;
        return Ok(DataPartition {
            start: p.start,
            record,
        });
    }
    bail!(
        "{} is not a Kernex disk image: no partition holds {DISK_RECORD} (make it with `kernex-image disk create`)",
        image.display()
    )
}

#[cfg(feature = "tpm")]
fn read_ek(tcti: &str) -> Result<EkInfo> {
    let mut tpm = kernex_attest::Tpm::open(tcti)?;
    let e = tpm
        .endorsement()
        .with_context(|| format!("unable to read the endorsement key through {tcti}"))?;
    Ok(EkInfo {
        public: e.public,
        certificate: e.certificate,
    })
}

#[cfg(not(feature = "tpm"))]
fn read_ek(tcti: &str) -> Result<EkInfo> {
    bail!(
        "--tpm {tcti}: this kernex-image was built without TPM support (build it with `--features tpm`, which links libtss2)"
    )
}

fn check_device_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > MAX_DEVICE_ID
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    {
        bail!(
            "device id {id:?} must be 1 to {MAX_DEVICE_ID} characters of A-Z, a-z, 0-9, '-', '_', '.', ':'"
        );
    }
    Ok(())
}

/// Provisions one board; see the module docs.
pub fn provision(opts: &ProvisionOptions) -> Result<ProvisionReport> {
    let started = Instant::now();
    if opts.enroll_token.trim().is_empty() || opts.enroll_token.contains(['\n', '\r']) {
        bail!("the enrollment token is empty or spans lines");
    }
    if opts.api_token.trim().is_empty() {
        bail!("an operator API token is required (--api-token or KERNEX_API_TOKEN)");
    }
    if !(opts.server.starts_with("http://") || opts.server.starts_with("https://")) {
        bail!(
            "--server {:?} is not an http:// or https:// URL",
            opts.server
        );
    }
    if let (Ok(image), Ok(target)) = (opts.image.canonicalize(), opts.target.canonicalize())
        && image == target
    {
        bail!("--target {} is the image itself", opts.target.display());
    }
    let data = find_data_partition(&opts.image)?;
    let image_size = std::fs::metadata(&opts.image)
        .with_context(|| format!("unable to read {}", opts.image.display()))?
        .len();
    if image_size != data.record.size {
        bail!(
            "{} is {image_size} bytes, its record says {}: not the image disk create wrote",
            opts.image.display(),
            data.record.size
        );
    }

    // A mistyped, revoked or expired token must not go onto the board.
    let token =
        preauth::check_enrollment_token(&opts.server, &opts.api_token, opts.enroll_token.trim())
            .with_context(|| {
                format!("unable to check the enrollment token with {}", opts.server)
            })?;
    tracing::debug!(token = %token.id, label = %token.label, "enrollment token accepted");
    let ek = opts.tpm.as_deref().map(read_ek).transpose()?;
    let request = PreauthRequest {
        device_id: String::new(),
        ek_public: ek.as_ref().map(|e| hex::encode(&e.public)),
        ek_certificate: ek
            .as_ref()
            .and_then(|e| e.certificate.as_ref().map(hex::encode)),
    };
    let fingerprint = request.ek_fingerprint();
    let device_id = match (&opts.device_id, &fingerprint) {
        (Some(id), _) => id.clone(),
        (None, Some(fp)) => format!("ek-{}", &fp[..16]),
        (None, None) => bail!("--device-id is required for a board without a TPM (--tpm)"),
    };
    check_device_id(&device_id)?;
    let request = PreauthRequest {
        device_id: device_id.clone(),
        ..request
    };
    let (outcome, preauthorization) =
        preauth::preauthorize(&opts.server, &opts.api_token, &request).with_context(|| {
            format!(
                "unable to pre-authorise device {device_id} with {}",
                opts.server
            )
        })?;

    // From here on a failure must not leave the server expecting a board
    // that was never made: withdraw a pre-authorisation this run created.
    let undo = |e: anyhow::Error| -> anyhow::Error {
        if outcome != Outcome::Created {
            return e;
        }
        match preauth::withdraw(&opts.server, &opts.api_token, &device_id) {
            Ok(()) => e.context(format!(
                "the pre-authorisation of {device_id} made by this run was withdrawn"
            )),
            Err(w) => e.context(format!(
                "the pre-authorisation of {device_id} made by this run could not be withdrawn ({w}): remove it with DELETE {}/{device_id}",
                preauth::PATH
            )),
        }
    };
    let board_token = preauth::device_token(&opts.server, &opts.api_token, &token, &device_id)
        .with_context(|| {
            format!(
                "unable to make device {device_id}'s enrollment token with {}",
                opts.server
            )
        })
        .map_err(undo)?;
    let secret = board_token.token.clone().unwrap_or_default();
    tracing::debug!(token = %board_token.id, "single-use enrollment token made");
    let undo = |e: anyhow::Error| -> anyhow::Error {
        let e = match preauth::revoke_token(&opts.server, &opts.api_token, &board_token.id) {
            Ok(()) => e.context(format!(
                "the enrollment token {} made for {device_id} was revoked",
                board_token.id
            )),
            Err(r) => e.context(format!(
                "the enrollment token {} made for {device_id} could not be revoked ({r}): revoke it with DELETE {}",
                board_token.id,
                kernex_protocol::api::paths::enrollment_token(&board_token.id)
            )),
        };
        undo(e)
    };
    let image_sha256 =
        write_target(&opts.image, &opts.target, image_size, opts.quiet).map_err(undo)?;

    let mut report = ProvisionReport {
        device_id: device_id.clone(),
        ek_fingerprint: fingerprint,
        ek_certificate: ek.as_ref().is_some_and(|e| e.certificate.is_some()),
        board: data.record.board.clone(),
        image_version: data.record.release.as_ref().map(|r| r.version.to_string()),
        slot_a_sha256: data.record.slot_a_sha256.to_string(),
        image_sha256,
        image_size,
        target: opts.target.clone(),
        server: opts.server.clone(),
        preauthorization,
        enrollment_token_id: board_token.id.clone(),
        preauthorization_outcome: outcome,
        time: now_rfc3339(),
        seconds: 0.0,
    };
    report.seconds = started.elapsed().as_secs_f64();
    write_identity(opts, &data, &device_id, &secret, &report).map_err(undo)?;
    Ok(report)
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".into())
}

/// Writes `image` to `target` and reads it back; returns the SHA-256.
///
/// On failure nothing half-written stays bootable: a file target is
/// removed, and a block device gets its first MiB (the partition table and
/// boot sector) cleared.
fn write_target(image: &Path, target: &Path, size: u64, quiet: bool) -> Result<String> {
    let block_device = std::fs::metadata(target)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    let mut touched = false;
    let outcome = write_and_verify(image, target, size, quiet, block_device, &mut touched);
    let Err(e) = outcome else {
        return outcome;
    };
    if !touched {
        return Err(e);
    }
    if block_device {
        match clear_head(target) {
            Ok(()) => Err(e.context(format!(
                "the first MiB of {} was cleared, so it does not boot a partial image",
                target.display()
            ))),
            Err(c) => Err(e.context(format!(
                "clearing the first MiB of {} failed too ({c:#}): do not boot it",
                target.display()
            ))),
        }
    } else {
        // This run created or truncated it.
        match std::fs::remove_file(target) {
            Ok(()) => Err(e.context(format!("{} was removed", target.display()))),
            Err(r) => Err(e.context(format!(
                "{} is partly written and could not be removed ({r}): do not use it",
                target.display()
            ))),
        }
    }
}

/// Zeroes the first MiB of a block device (best effort after a failed
/// write).
fn clear_head(target: &Path) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .open(target)
        .with_context(|| format!("unable to open {}", target.display()))?;
    f.write_all_at(&vec![0u8; 1 << 20], 0)
        .with_context(|| format!("unable to write {}", target.display()))?;
    f.sync_all()
        .with_context(|| format!("unable to sync {}", target.display()))
}

fn write_and_verify(
    image: &Path,
    target: &Path,
    size: u64,
    quiet: bool,
    block_device: bool,
    touched: &mut bool,
) -> Result<String> {
    // A card that is not inserted must not turn /dev/sdX into a file in
    // devtmpfs (RAM) and a "successful" provisioning.
    if !block_device && target.starts_with("/dev") {
        bail!(
            "{} is not a block device (is the card or disk inserted?)",
            target.display()
        );
    }
    let out = if block_device {
        let mut f = OpenOptions::new()
            .write(true)
            .read(true)
            .open(target)
            .with_context(|| format!("unable to open {}", target.display()))?;
        let capacity = f
            .seek(SeekFrom::End(0))
            .with_context(|| format!("unable to read the size of {}", target.display()))?;
        check_capacity(target, capacity, size)?;
        *touched = true;
        f
    } else {
        let f = OpenOptions::new()
            .write(true)
            .read(true)
            .create(true)
            .truncate(true)
            .open(target)
            .with_context(|| format!("unable to create {}", target.display()))?;
        *touched = true;
        f.set_len(size)
            .with_context(|| format!("unable to size {} to {size} bytes", target.display()))?;
        f
    };
    let mut src =
        File::open(image).with_context(|| format!("unable to open {}", image.display()))?;
    let bar = progress::bytes(size, "write", quiet);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BLOCK];
    let mut done = 0u64;
    while done < size {
        let n = (size - done).min(BLOCK as u64) as usize;
        src.read_exact(&mut buf[..n])
            .with_context(|| format!("unable to read {}", image.display()))?;
        hasher.update(&buf[..n]);
        // A fresh file is all zeros already: leave its holes.
        if block_device || buf[..n].iter().any(|b| *b != 0) {
            out.write_all_at(&buf[..n], done)
                .with_context(|| format!("unable to write {} at byte {done}", target.display()))?;
        }
        done += n as u64;
        bar.set_position(done);
    }
    out.sync_all()
        .with_context(|| format!("unable to sync {}", target.display()))?;
    bar.finish_and_clear();
    let written = hex::encode(hasher.finalize());
    drop(out);

    let read_back = hash_prefix(target, size, quiet, block_device)?;
    if read_back != written {
        bail!(
            "{} reads back with SHA-256 {read_back}, the image has {written}: the write did not stick",
            target.display()
        );
    }
    Ok(written)
}

/// Fails when a target device is smaller than the image.
pub fn check_capacity(target: &Path, capacity: u64, size: u64) -> Result<()> {
    if capacity < size {
        bail!(
            "{} holds {capacity} bytes, the image needs {size}",
            target.display()
        );
    }
    Ok(())
}

/// Alignment of direct reads (a multiple of any logical block size).
const DIRECT_ALIGN: usize = 4096;

/// SHA-256 of the first `size` bytes of `path`. `direct` (a block device):
/// read with `O_DIRECT`, from the medium, not from the page cache the
/// write just filled.
fn hash_prefix(path: &Path, size: u64, quiet: bool, direct: bool) -> Result<String> {
    let mut options = OpenOptions::new();
    options.read(true);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    let f = options
        .open(path)
        .with_context(|| format!("unable to open {} to read it back", path.display()))?;
    let bar = progress::bytes(size, "verify", quiet);
    let mut hasher = Sha256::new();
    // Direct reads need an aligned buffer, offset and length.
    let mut raw = vec![0u8; BLOCK + DIRECT_ALIGN];
    let start = match raw.as_ptr().align_offset(DIRECT_ALIGN) {
        n if n < DIRECT_ALIGN => n,
        _ => bail!("unable to align a read buffer"),
    };
    let buf = &mut raw[start..start + BLOCK];
    let mut done = 0u64;
    while done < size {
        let left = (size - done).min(BLOCK as u64) as usize;
        let want = left.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let n = f
            .read_at(&mut buf[..want], done)
            .with_context(|| format!("unable to read {} back at byte {done}", path.display()))?;
        if n == 0 {
            bail!(
                "{} ends at byte {done} while reading it back, the image has {size}",
                path.display()
            );
        }
        let take = n.min(left);
        hasher.update(&buf[..take]);
        done += take as u64;
        bar.set_position(done);
    }
    bar.finish_and_clear();
    Ok(hex::encode(hasher.finalize()))
}

/// `system.toml` (`base`) with this device's identity in its `[server]`
/// table: the control plane's `server` URL, `device_id` and the enrollment
/// token in the file `token_path`. The other keys of an earlier `[server]`
/// table stay; so do the comment lines `base` begins with.
pub fn with_server_table(
    base: &str,
    server: &str,
    device_id: &str,
    token_path: &str,
) -> Result<String> {
    let mut config = SystemConfig::from_toml(base, Path::new(SYSTEM_TOML))?;
    let mut table = config
        .server
        .take()
        .unwrap_or_else(|| ServerConfig::new(server));
    table.url = server.to_owned();
    table.device_id = Some(device_id.to_owned());
    table.enrollment_token = None;
    table.enrollment_token_file = Some(token_path.into());
    config.server = Some(table);
    let header: String = base
        .lines()
        .take_while(|l| l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let body = toml::to_string(&config).context("unable to write system.toml")?;
    Ok(format!("{header}{body}"))
}

fn write_identity(
    opts: &ProvisionOptions,
    data: &DataPartition,
    device_id: &str,
    token: &str,
    report: &ProvisionReport,
) -> Result<()> {
    let target = &opts.target;
    let base = tools::ext4_read(target, data.start, SYSTEM_TOML)?
        .with_context(|| format!("{SYSTEM_TOML} is missing from the target's data partition"))?;
    let base = String::from_utf8(base).context("system.toml is not UTF-8")?;
    let token_path = format!("{}{TOKEN_FILE}", data.record.data_mount);
    let system = with_server_table(&base, &opts.server, device_id, &token_path)?;
    let stage = tempfile::tempdir().context("unable to create a temporary directory")?;
    let files: [(&str, Vec<u8>, &str); 3] = [
        (SYSTEM_TOML, system.into_bytes(), "0100644"),
        (
            TOKEN_FILE,
            format!("{}\n", token.trim()).into_bytes(),
            "0100600",
        ),
        (REPORT_FILE, serde_json::to_vec_pretty(report)?, "0100644"),
    ];
    let mut requests = String::new();
    for (i, (path, bytes, mode)) in files.iter().enumerate() {
        let local = stage.path().join(format!("f{i}"));
        std::fs::write(&local, bytes)
            .with_context(|| format!("unable to stage {}", local.display()))?;
        if tools::ext4_read(target, data.start, path)?.is_some() {
            requests.push_str(&format!("rm {path}\n"));
        }
        requests.push_str(&format!(
            "write {} {path}\nsif {path} mode {mode}\nsif {path} uid 0\nsif {path} gid 0\n",
            local.display()
        ));
    }
    tools::debugfs(target, data.start, &requests, true).with_context(|| {
        format!(
            "unable to write the device's identity into the data partition of {}",
            target.display()
        )
    })?;
    // Read back what the device will read.
    for (path, bytes, _) in &files {
        let found = tools::ext4_read(target, data.start, path)?;
        if found.as_deref() != Some(bytes.as_slice()) {
            bail!("{path} on the target's data partition does not read back as written");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
