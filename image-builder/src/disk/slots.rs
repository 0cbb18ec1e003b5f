//! Writing the slots: each image of the release into its partition,
//! checked against the verified manifest.

use super::*;

/// Extracts (or copies) the images into their slots. Returns the release,
/// each class's digest, and the updater's slot records to stage.
pub(super) fn write_slots(
    opts: &CreateOptions,
    placed: &[Placed],
    disk: &mut File,
) -> Result<(
    Option<ReleaseRecord>,
    BTreeMap<SlotClass, Written>,
    SlotRecords,
)> {
    let board = &opts.board;
    let mut written = BTreeMap::new();
    let mut records = Vec::new();
    match &opts.source {
        Source::Bundle { path, keyring } => {
            let keyring = Keyring::from_pem(keyring).context("unable to load the keyring")?;
            let file = File::open(path)
                .with_context(|| format!("unable to open bundle {}", path.display()))?;
            let mut bundle = Bundle::open(BufReader::new(file))
                .with_context(|| format!("{} is not a valid bundle", path.display()))?;
            let verified = bundle
                .verify(&keyring, VerifyOptions::default())
                .with_context(|| format!("signature of {} does not verify", path.display()))?;
            check_release(board, placed, &verified)?;
            let classes: Vec<SlotClass> = verified.images.iter().map(|i| i.slot_class).collect();
            for class in classes {
                let w = extract_into(&mut bundle, &verified, class, placed, disk, opts)?;
                written.insert(class, w);
            }
            let signature = hex::encode(bundle.signature());
            let manifest = String::from_utf8(bundle.manifest_bytes().to_vec())
                .context("the manifest is not UTF-8")?;
            let record = SlotRecord {
                manifest,
                signature,
                verified: true,
                installed_at: opts.timestamp,
            };
            let record = serde_json::to_vec_pretty(&record)?;
            let slots: &[Slot] = if opts.fill_b {
                &[Slot::A, Slot::B]
            } else {
                &[Slot::A]
            };
            let data_path = |rel: PathBuf| Path::new(DATA_DIR).join(rel).display().to_string();
            for &slot in slots {
                for image in &verified.images {
                    let class = image.slot_class;
                    let index = bundle
                        .read_index(verified.manifest(), class)
                        .with_context(|| format!("unable to read the {class} index"))?
                        .encode();
                    if Sha256Digest::of(&index) != image.index.sha256 {
                        bail!(
                            "the {class} index does not re-encode to the bytes the manifest names"
                        );
                    }
                    records.push((data_path(layout::slot_index(slot, class)), index));
                }
                records.push((data_path(layout::slot_record(slot)), record.clone()));
            }
            let release = ReleaseRecord {
                version: verified.version.clone(),
                compatible: verified.compatible.clone(),
                signer: verified.signer().to_string(),
                manifest_sha256: Sha256Digest::of(bundle.manifest_bytes()),
            };
            Ok((Some(release), written, records))
        }
        Source::Images(images) => {
            if !images.iter().any(|(c, _)| *c == SlotClass::Rootfs) {
                bail!("--image rootfs=PATH is required");
            }
            for (class, path) in images {
                let w = copy_into(path, *class, placed, disk, opts)?;
                if written.insert(*class, w).is_some() {
                    bail!("--image {class}= is given twice");
                }
            }
            check_agent_slots(board, written.contains_key(&SlotClass::Agent))?;
            Ok((None, written, records))
        }
    }
}

pub(super) fn check_agent_slots(board: &BoardProfile, has_agent: bool) -> Result<()> {
    let board_agent = board.partition(Role::AgentA).is_some();
    match (has_agent, board_agent) {
        (true, false) => bail!(
            "the release has an agent image but board {} has no agent-a/agent-b partitions",
            board.name
        ),
        (false, true) => bail!(
            "board {} has agent slots but the release has no agent image",
            board.name
        ),
        _ => Ok(()),
    }
}

pub(super) fn check_release(
    board: &BoardProfile,
    placed: &[Placed],
    verified: &VerifiedManifest,
) -> Result<()> {
    if verified.compatible != board.compatible {
        bail!(
            "the bundle is for {:?}, board {} runs {:?}",
            verified.compatible,
            board.name,
            board.compatible
        );
    }
    check_agent_slots(board, verified.image(SlotClass::Agent).is_some())?;
    for image in &verified.images {
        let (a, _) = slot_roles(image.slot_class);
        let slot = find(placed, a)?;
        if image.size > slot.size {
            bail!(
                "the {} image is {} bytes, larger than its {}-byte slot (partition {})",
                image.slot_class,
                image.size,
                slot.size,
                slot.number
            );
        }
    }
    Ok(())
}

/// A writer into one partition of the disk that refuses to run past it.
pub(super) struct PartitionWriter<'a> {
    out: BufWriter<&'a mut File>,
    left: u64,
}

impl Write for PartitionWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(std::io::Error::other("the image is larger than its slot"));
        }
        let n = self.out.write(buf)?;
        self.left -= n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

pub(super) fn partition_writer<'a>(
    disk: &'a mut File,
    slot: &Placed,
) -> Result<PartitionWriter<'a>> {
    disk.seek(SeekFrom::Start(slot.start))
        .with_context(|| format!("unable to seek to partition {}", slot.number))?;
    Ok(PartitionWriter {
        out: BufWriter::with_capacity(1 << 20, disk),
        left: slot.size,
    })
}

pub(super) fn extract_into(
    bundle: &mut Bundle<BufReader<File>>,
    verified: &VerifiedManifest,
    class: SlotClass,
    placed: &[Placed],
    disk: &mut File,
    opts: &CreateOptions,
) -> Result<Written> {
    let (a, b) = slot_roles(class);
    let size = verified.image(class).map(|i| i.size).unwrap_or(0);
    let bar = progress::bytes(size, &format!("{class} A"), opts.quiet);
    let slot_a = find(placed, a)?;
    let report = {
        let mut w = partition_writer(disk, slot_a)?;
        let report = bundle
            .extract_image(verified, class, &mut w, &|n| bar.set_position(n))
            .with_context(|| format!("the {class} image of the bundle does not verify"))?;
        w.flush()
            .with_context(|| format!("unable to write slot A ({class})"))?;
        report
    };
    bar.finish_and_clear();
    if opts.fill_b {
        let slot_b = find(placed, b)?;
        copy_range(disk, slot_a.start, slot_b.start, report.size)
            .with_context(|| format!("unable to copy slot A into slot B ({class})"))?;
    }
    Ok(Written {
        sha256: report.sha256,
        size: report.size,
    })
}

pub(super) fn copy_into(
    path: &Path,
    class: SlotClass,
    placed: &[Placed],
    disk: &mut File,
    opts: &CreateOptions,
) -> Result<Written> {
    let (a, b) = slot_roles(class);
    let slot_a = find(placed, a)?;
    let mut src = File::open(path)
        .with_context(|| format!("unable to open {class} image {}", path.display()))?;
    let size = src
        .metadata()
        .with_context(|| format!("unable to read {}", path.display()))?
        .len();
    if size > slot_a.size {
        bail!(
            "the {class} image {} is {size} bytes, larger than its {}-byte slot (partition {})",
            path.display(),
            slot_a.size,
            slot_a.number
        );
    }
    let bar = progress::bytes(size, &format!("{class} A"), opts.quiet);
    let mut hasher = Sha256::new();
    {
        let mut w = partition_writer(disk, slot_a)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        loop {
            let n = std::io::Read::read(&mut src, &mut buf)
                .with_context(|| format!("unable to read {}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            w.write_all(&buf[..n])
                .with_context(|| format!("unable to write slot A ({class})"))?;
            done += n as u64;
            bar.set_position(done);
        }
        w.flush()
            .with_context(|| format!("unable to write slot A ({class})"))?;
    }
    bar.finish_and_clear();
    if opts.fill_b {
        let slot_b = find(placed, b)?;
        copy_range(disk, slot_a.start, slot_b.start, size)?;
    }
    Ok(Written {
        sha256: Sha256Digest::from_hasher(hasher),
        size,
    })
}

pub(super) fn copy_range(disk: &mut File, from: u64, to: u64, len: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        disk.read_exact_at(&mut buf[..n], from + done)
            .context("unable to read the disk image")?;
        disk.write_all_at(&buf[..n], to + done)
            .context("unable to write the disk image")?;
        done += n as u64;
    }
    Ok(())
}
