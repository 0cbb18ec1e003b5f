//! The boot partition's files (boot script, U-Boot or GRUB env, grub.cfg)
//! and the device's own files in the data partition (system.toml, the slot
//! records), all from `kernex-device`'s and the bootloader's types.

use super::*;

/// Copies the vendor's boot files and writes the profile's generated ones
/// into `stage` (the boot partition's tree). Returns their paths.
pub(super) fn stage_boot_files(
    opts: &CreateOptions,
    placed: &[Placed],
    stage: &Path,
) -> Result<Vec<String>> {
    let board = &opts.board;
    let mut names = Vec::new();
    if let Some(dir) = &opts.boot_files {
        if !dir.is_dir() {
            bail!("--boot-files {} is not a directory", dir.display());
        }
        copy_tree(dir, stage, &mut names, Path::new(""))?;
    }
    let missing: Vec<&str> = board
        .vendor_boot_files
        .iter()
        .filter(|f| !stage.join(f).is_file())
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        bail!(
            "board {} needs these vendor boot files, missing from --boot-files{}: {}",
            board.name,
            opts.boot_files
                .as_ref()
                .map(|d| format!(" {}", d.display()))
                .unwrap_or_else(|| " (not given)".into()),
            missing.join(", ")
        );
    }
    for f in &board.boot_files {
        write_staged(
            stage,
            &f.path,
            f.content.trim_start().as_bytes(),
            &mut names,
        )?;
    }
    match &board.bootloader {
        BootloaderSpec::UBoot { script, .. } => {
            let scr = uimage::script_image(
                script.source().as_bytes(),
                script.arch(),
                "Kernex A/B",
                u32::try_from(opts.timestamp).unwrap_or(u32::MAX),
            );
            write_staged(stage, "boot.scr", &scr, &mut names)?;
        }
        BootloaderSpec::Grub { config_dir, .. } => {
            let cfg = grub_cfg(board, placed)?;
            write_staged(
                stage,
                &format!("{config_dir}/grub.cfg"),
                cfg.as_bytes(),
                &mut names,
            )?;
            write_staged(
                stage,
                &format!("{config_dir}/kernex.cfg"),
                include_str!("../../../bootloader/grub/kernex.cfg").as_bytes(),
                &mut names,
            )?;
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

pub(super) fn copy_tree(src: &Path, dst: &Path, names: &mut Vec<String>, rel: &Path) -> Result<()> {
    let entries = fs::read_dir(src).with_context(|| format!("unable to read {}", src.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("unable to read {}", src.display()))?;
        let path = entry.path();
        let ty = entry
            .file_type()
            .with_context(|| format!("unable to read {}", path.display()))?;
        let target = dst.join(entry.file_name());
        let rel = rel.join(entry.file_name());
        if ty.is_dir() {
            fs::create_dir_all(&target)
                .with_context(|| format!("unable to create {}", target.display()))?;
            copy_tree(&path, &target, names, &rel)?;
        } else if ty.is_file() {
            fs::copy(&path, &target)
                .with_context(|| format!("unable to copy boot file {}", path.display()))?;
            names.push(rel.display().to_string());
        } else {
            bail!(
                "boot file {} is neither a file nor a directory (FAT holds no links)",
                path.display()
            );
        }
    }
    Ok(())
}

pub(super) fn write_staged(
    stage: &Path,
    rel: &str,
    bytes: &[u8],
    names: &mut Vec<String>,
) -> Result<()> {
    let path = stage.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("unable to create {}", parent.display()))?;
    }
    fs::write(&path, bytes).with_context(|| format!("unable to write {}", path.display()))?;
    names.push(rel.to_owned());
    Ok(())
}

/// `kernex_root_X` for a slot: the device path on MBR disks, the
/// PARTUUID on GPT disks (stable whatever the disk is called).
pub(super) fn kernel_root(p: &Placed) -> String {
    match &p.partuuid {
        Some(uuid) => format!("PARTUUID={uuid}"),
        None => p.device.clone(),
    }
}

/// The generated `grub.cfg`: slot partitions, settings, then kernex.cfg.
pub(super) fn grub_cfg(board: &BoardProfile, placed: &[Placed]) -> Result<String> {
    let BootloaderSpec::Grub { disk, settings, .. } = &board.bootloader else {
        bail!("board {} does not boot GRUB", board.name);
    };
    let part = |p: &Placed| match board.partition_table {
        TableKind::Gpt => format!("({disk},gpt{})", p.number),
        TableKind::Mbr => format!("({disk},msdos{})", p.number),
    };
    let a = find(placed, Role::RootfsA)?;
    let b = find(placed, Role::RootfsB)?;
    let mut cfg = format!(
        "# Generated by kernex-image disk create for board {}.\n\
         # The slots, then the Kernex A/B selection (kernex.cfg, grubenv beside it).\n\
         set kernex_part_A=\"{}\"\nset kernex_part_B=\"{}\"\n\
         set kernex_root_A=\"{}\"\nset kernex_root_B=\"{}\"\n",
        board.name,
        part(a),
        part(b),
        kernel_root(a),
        kernel_root(b)
    );
    for (k, v) in settings {
        cfg.push_str(&format!("set {k}=\"{v}\"\n"));
    }
    cfg.push_str("source \"${prefix}/kernex.cfg\"\n");
    Ok(cfg)
}

/// Writes the U-Boot env file or the grubenv into the boot stage.
pub(super) fn write_boot_state(
    board: &BoardProfile,
    placed: &[Placed],
    state: &BTreeMap<String, String>,
    stage: &Path,
) -> Result<()> {
    match &board.bootloader {
        BootloaderSpec::UBoot {
            env_file,
            env_size,
            settings,
            ..
        } => {
            let mut env = u_boot_env::Env::new();
            for (k, v) in settings.iter().chain(state) {
                env.set(k, v)
                    .with_context(|| format!("invalid U-Boot variable {k}"))?;
            }
            let a = find(placed, Role::RootfsA)?;
            let b = find(placed, Role::RootfsB)?;
            env.set("kernex_part_A", &a.number.to_string())?;
            env.set("kernex_part_B", &b.number.to_string())?;
            env.set("kernex_root_A", &kernel_root(a))?;
            env.set("kernex_root_B", &kernel_root(b))?;
            let size = usize::try_from(*env_size).context("env-size does not fit")?;
            let image = u_boot_env::encode(&env, size, u_boot_env::Layout::Single, 0)
                .with_context(|| format!("the U-Boot env does not fit in {env_size} bytes"))?;
            let path = stage.join(env_file);
            fs::write(&path, image)
                .with_context(|| format!("unable to write {}", path.display()))?;
        }
        BootloaderSpec::Grub { config_dir, .. } => {
            let mut env = GrubEnv::new();
            for (k, v) in state {
                env.set(k, v)
                    .map_err(|e| anyhow::anyhow!("invalid grubenv variable {k}: {e}"))?;
            }
            let bytes = env
                .to_bytes()
                .map_err(|e| anyhow::anyhow!("unable to encode the grubenv: {e}"))?;
            let dir = stage.join(config_dir);
            fs::create_dir_all(&dir)
                .with_context(|| format!("unable to create {}", dir.display()))?;
            fs::write(dir.join("grubenv"), bytes).context("unable to write the grubenv")?;
        }
    }
    Ok(())
}

/// The updater's config for this board (`kernex-device`'s
/// [`SystemConfig`]): its slots, boot-state backend and data dir, without
/// `[server]` (`provision` adds it).
pub fn system_config(board: &BoardProfile, placed: &[Placed]) -> Result<SystemConfig> {
    let data_mount = &board.device.data_mount;
    let slot = |role| find(placed, role).map(|p| PathBuf::from(&p.device));
    let pair = |a, b| -> Result<SlotPair> { Ok(SlotPair::new(slot(a)?, slot(b)?)) };
    let agent = match board.partition(Role::AgentA) {
        Some(_) => Some(pair(Role::AgentA, Role::AgentB)?),
        None => None,
    };
    let mut bootloader = BootloaderConfig {
        backend: Backend::UBoot,
        fw_env_config: None,
        grubenv: None,
        path: None,
        cmdline: None,
        booted_slot: None,
    };
    match &board.bootloader {
        BootloaderSpec::UBoot { .. } => {
            bootloader.fw_env_config =
                Some(format!("{data_mount}/etc/kernex/fw_env.config").into());
        }
        BootloaderSpec::Grub { config_dir, .. } => {
            bootloader.backend = Backend::Grub;
            bootloader.grubenv =
                Some(format!("{}/{config_dir}/grubenv", board.device.boot_mount).into());
        }
    }
    Ok(SystemConfig::new(
        board.compatible.clone(),
        format!("{data_mount}/{DATA_DIR}"),
        KEYRING,
        Slots {
            rootfs: pair(Role::RootfsA, Role::RootfsB)?,
            agent,
        },
        bootloader,
    ))
}

/// `config` as the text of `system.toml`, after a comment saying who wrote
/// it for which board.
pub fn system_toml(board: &BoardProfile, config: &SystemConfig) -> Result<String> {
    let body = toml::to_string(config).context("unable to write system.toml")?;
    Ok(format!(
        "# /etc/kernex/system.toml, written by kernex-image disk create for board {}.\n\
         # It lives on the data partition ({}/etc/kernex/system.toml); the\n\
         # image links /etc/kernex/system.toml to it. See updater/system.example.toml.\n\
         {body}",
        board.name, board.device.data_mount,
    ))
}

/// `fw_env.config` for a U-Boot board: the env file on the mounted boot
/// partition.
pub fn fw_env_config(board: &BoardProfile) -> Option<String> {
    match &board.bootloader {
        BootloaderSpec::UBoot {
            env_file, env_size, ..
        } => Some(format!(
            "# Written by kernex-image disk create for board {}: U-Boot's env is the\n\
             # file {env_file} on the FAT boot partition, mounted at {}.\n\
             # device  offset  env-size\n\
             {}/{env_file}  0x0000  {env_size:#x}\n",
            board.name, board.device.boot_mount, board.device.boot_mount,
        )),
        BootloaderSpec::Grub { .. } => None,
    }
}

/// Every file and directory below `dir`, as absolute paths in the
/// filesystem made from it.
pub(super) fn staged_paths(dir: &Path, rel: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("unable to read {}", dir.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("unable to read {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = rel.join(e.file_name());
        out.push(path.display().to_string());
        if e.path().is_dir() {
            out.extend(staged_paths(&e.path(), &path)?);
        }
    }
    Ok(out)
}

pub(super) fn stage_data(
    board: &BoardProfile,
    placed: &[Placed],
    record: &DiskRecord,
    slot_records: &SlotRecords,
    stage: &Path,
) -> Result<()> {
    let mut names = Vec::new();
    let rel = |p: &str| p.trim_start_matches('/').to_owned();
    write_staged(
        stage,
        &rel(DISK_RECORD),
        &serde_json::to_vec_pretty(record)?,
        &mut names,
    )?;
    write_staged(
        stage,
        &rel(SYSTEM_TOML),
        system_toml(board, &system_config(board, placed)?)?.as_bytes(),
        &mut names,
    )?;
    if let Some(cfg) = fw_env_config(board) {
        write_staged(
            stage,
            "etc/kernex/fw_env.config",
            cfg.as_bytes(),
            &mut names,
        )?;
    }
    fs::create_dir_all(stage.join(DATA_DIR)).context("unable to stage the data directory")?;
    for (path, bytes) in slot_records {
        write_staged(stage, path, bytes, &mut names)?;
    }
    Ok(())
}
