//! `kernex-image disk`: factory disk images.

use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use kernex_protocol::SlotClass;

use crate::board::{BUILT_IN, BoardProfile, Size};
use crate::disk::{self, CreateOptions, Source};

/// Disk image commands.
#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Write a complete, flashable disk image for a board.
    #[command(long_about = "Write a complete, flashable disk image for a board.\n\n\
The board profile (--board: a built-in name or a TOML file, see image-builder/boards/README.md) \
names the partition table (MBR or GPT), the partitions, the boot files and the bootloader. \
The image gets: the partition table; a FAT boot partition with the vendor's boot files \
(--boot-files), the profile's generated files (config.txt, grub.cfg), the boot script and the \
initial boot state (a U-Boot env file or a grubenv) saying boot slot A (BOOT_ORDER=A B, \
BOOT_A_LEFT=3, BOOT_B_LEFT=0, or 3 with --fill-b); slot A holding the release's root \
filesystem (from a bundle whose signature verified against --keyring and whose compatible \
matches the board, every chunk and the whole image checked); slot B empty, or the same \
release with --fill-b; an ext4 data partition holding the updater's config \
(etc/kernex/system.toml, fw_env.config), the record of what the slots hold, and \
etc/kernex/disk.json, which `provision` reads.\n\n\
No root privileges and no loop devices: the filesystems are made on offsets inside the image \
file with mkfs.vfat --offset, mcopy -i FILE@@OFFSET and mkfs.ext4 -E offset= (dosfstools, \
mtools, e2fsprogs). The image is written to a temporary file beside --output and renamed into \
place only when everything succeeded: a failure leaves nothing at --output.")]
    Create(CreateArgs),
    /// List the built-in board profiles.
    Boards(BoardsArgs),
}

/// Arguments of `disk create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Board profile: a built-in name (`kernex-image disk boards`) or the
    /// path of a profile file.
    #[arg(long, value_name = "PROFILE")]
    pub board: String,
    /// Signed bundle whose images go into slot A.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "image",
        required_unless_present = "image"
    )]
    pub bundle: Option<PathBuf>,
    /// Trusted CA certificates (PEM) the bundle must verify against; repeatable.
    #[arg(long, value_name = "PEM", requires = "bundle")]
    pub keyring: Vec<PathBuf>,
    /// A plain image instead of a bundle (development; nothing is verified):
    /// rootfs=PATH, and agent=PATH for boards with agent slots. Repeatable.
    #[arg(long, value_name = "CLASS=PATH", value_parser = parse_image)]
    pub image: Vec<(SlotClass, PathBuf)>,
    /// Directory of vendor boot files (firmware, U-Boot, GRUB EFI binary)
    /// copied to the boot partition as they are laid out in it.
    #[arg(long, value_name = "DIR")]
    pub boot_files: Option<PathBuf>,
    /// Output disk image (replaced atomically).
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    /// Write the release into slot B too (BOOT_B_LEFT=3).
    #[arg(long)]
    pub fill_b: bool,
    /// Total disk size, e.g. 8GiB (default: what the profile needs); the
    /// profile's `grow` partition takes the rest.
    #[arg(long, value_name = "SIZE")]
    pub size: Option<Size>,
    /// Time stamp for the boot script header and slot records (Unix
    /// seconds); defaults to $SOURCE_DATE_EPOCH, else 0.
    #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0)]
    pub timestamp: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `disk boards`.
#[derive(Debug, Args)]
pub struct BoardsArgs {
    /// Print JSON (the parsed profiles).
    #[arg(long)]
    pub json: bool,
}

fn parse_image(s: &str) -> Result<(SlotClass, PathBuf), String> {
    let (class, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not CLASS=PATH (e.g. rootfs=rootfs.img)"))?;
    let class = match class {
        "rootfs" => SlotClass::Rootfs,
        "agent" => SlotClass::Agent,
        other => return Err(format!("unknown slot class {other:?} (rootfs or agent)")),
    };
    Ok((class, PathBuf::from(path)))
}

/// Runs a disk command.
pub fn run(cmd: DiskCommand) -> Result<()> {
    match cmd {
        DiskCommand::Create(args) => create(args),
        DiskCommand::Boards(args) => boards(args),
    }
}

fn create(args: CreateArgs) -> Result<()> {
    let board = BoardProfile::load(&args.board)?;
    let source = match &args.bundle {
        Some(path) => {
            if args.keyring.is_empty() {
                bail!("--keyring is required with --bundle: the bundle's signature is checked");
            }
            let mut pem = Vec::new();
            for k in &args.keyring {
                let mut data = fs::read(k)
                    .with_context(|| format!("unable to read keyring {}", k.display()))?;
                pem.push(b'\n');
                pem.append(&mut data);
            }
            Source::Bundle {
                path: path.clone(),
                keyring: pem,
            }
        }
        None => Source::Images(args.image.clone()),
    };
    let opts = CreateOptions {
        board,
        source,
        boot_files: args.boot_files.clone(),
        output: args.output.clone(),
        fill_b: args.fill_b,
        size: args.size.map(|s| s.0),
        timestamp: args.timestamp,
        quiet: args.json,
    };
    let report = disk::create(&opts).with_context(|| {
        format!(
            "unable to create a {} disk image at {}",
            opts.board.name,
            args.output.display()
        )
    })?;
    if args.json {
        return super::print_json(&report);
    }
    let r = &report.record;
    let release = r
        .release
        .as_ref()
        .map(|rel| format!("release {} signed by {}", rel.version, rel.signer))
        .unwrap_or_else(|| "unsigned image".into());
    println!(
        "{}: {} disk for {}, {} bytes, {}; slot A sha256 {}; slot B {}",
        report.output.display(),
        r.partition_table.as_str(),
        r.board,
        r.size,
        release,
        r.slot_a_sha256,
        if r.slot_b_filled { "filled" } else { "empty" }
    );
    for p in &r.partitions {
        println!(
            "  {} {:<9} start {:>12} size {:>12}  {}",
            p.number, p.role, p.start, p.size, p.device
        );
    }
    Ok(())
}

fn boards(args: BoardsArgs) -> Result<()> {
    let mut profiles = Vec::new();
    for (name, _) in BUILT_IN {
        profiles.push(BoardProfile::load(name)?);
    }
    if args.json {
        return super::print_json(&profiles);
    }
    for p in &profiles {
        println!("{:<18} {}", p.name, p.description);
    }
    Ok(())
}
