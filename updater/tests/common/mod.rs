//! Test fixtures: real keys, real bundles, a real HTTP server with Range
//! support on 127.0.0.1:0, and a simulated device (slot files, `file` boot
//! backend).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kernex_image::bundle::{BuiltImage, BundleBuilder, Image};
use kernex_image::keys::{self, KeyPair, Usage, Validity};
use kernex_protocol::FsType;
use kernex_protocol::archive::ArchiveOptions;
use kernex_protocol::index::ChunkerParams;
use kernex_protocol::signature::{Keyring, Signer};
use sha2::{Digest, Sha256};

pub struct Keys {
    pub ca_pem: Vec<u8>,
    pub signer: Signer,
    pub stranger: Signer,
}

fn signer(pair: &KeyPair) -> Signer {
    Signer::from_pem(
        &pair.key.private_key_to_pem_pkcs8().unwrap(),
        &pair.cert.to_pem().unwrap(),
    )
    .unwrap()
}

pub fn keys() -> Keys {
    let v = Validity::days_from_now(30);
    let ca = keys::create_ca("Kernex test", v).unwrap();
    let other = keys::create_ca("Somebody else", v).unwrap();
    let good = keys::create_leaf(
        &ca,
        "Kernex test",
        "Kernex test signing",
        Usage::CodeSigning,
        v,
    )
    .unwrap();
    let bad = keys::create_leaf(
        &other,
        "Somebody else",
        "Somebody signing",
        Usage::CodeSigning,
        v,
    )
    .unwrap();
    Keys {
        ca_pem: ca.cert.to_pem().unwrap(),
        signer: signer(&good),
        stranger: signer(&bad),
    }
}

/// A deterministic image of `size` bytes: text, noise and zeros.
pub fn image(size: usize, seed: u64) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ seed;
    let mut out = Vec::with_capacity(size);
    for i in 0..size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(match (i / 16384) % 4 {
            0 => b"kernex test image "[i % 18],
            1 | 2 => x as u8,
            _ => 0,
        });
    }
    out
}

/// `base` with `len` bytes at `at` replaced by other noise: "one small file changed".
pub fn edit(base: &[u8], at: usize, len: usize) -> Vec<u8> {
    let mut out = base.to_vec();
    let noise = image(len + 16384, 77);
    out[at..at + len].copy_from_slice(&noise[16384..16384 + len]);
    out
}

pub struct Built {
    pub bytes: Vec<u8>,
    /// Its rootfs image: archive and patches.
    pub built: BuiltImage,
}

pub fn options() -> ArchiveOptions {
    ArchiveOptions {
        chunker: ChunkerParams::rollsum(8 * 1024, 2 * 1024, 64 * 1024, 64),
        threads: 1,
        ..ArchiveOptions::default()
    }
}

/// A signed bundle of one rootfs image.
pub fn bundle_with(
    img: &[u8],
    version: &str,
    compatible: &str,
    min_updater: &str,
    signer: &Signer,
) -> Built {
    let builder = BundleBuilder::new(
        compatible,
        semver::Version::parse(version).unwrap(),
        Image::bytes(img).filesystem(FsType::Raw),
        signer,
    )
    .min_updater_version(semver::Version::parse(min_updater).unwrap())
    .archive_options(options());
    build(&builder)
}

/// A signed bundle of `img` that also carries a chunk patch from the image
/// of `base_bundle` (verified against `keys`' CA).
pub fn bundle_patched(img: &[u8], version: &str, keys: &Keys, base_bundle: &Built) -> Built {
    let keyring = Keyring::from_pem(&keys.ca_pem).unwrap();
    let builder = BundleBuilder::new(
        "qemu-aarch64",
        semver::Version::parse(version).unwrap(),
        Image::bytes(img).filesystem(FsType::Raw),
        &keys.signer,
    )
    .archive_options(options())
    .patch_from(&base_bundle.bytes)
    .keyring(&keyring);
    let built = build(&builder);
    let patches = &built.built.patches;
    assert!(
        patches.iter().any(|p| p.chunks_patched > 0),
        "nothing patched: {patches:?}"
    );
    built
}

fn build(builder: &BundleBuilder<'_>) -> Built {
    let mut bytes = Vec::new();
    let made = builder.write(&mut bytes).unwrap();
    let built = made.images.into_iter().next().unwrap();
    Built { bytes, built }
}

/// `base` with one byte changed every `every` bytes from `from`: a binary
/// patched in many places, where every chunk changes a little.
pub fn sprinkle(base: &[u8], from: usize, len: usize, every: usize) -> Vec<u8> {
    let mut out = base.to_vec();
    for at in (from..from + len).step_by(every) {
        out[at] ^= 0x5a;
    }
    out
}

pub fn bundle(img: &[u8], version: &str, signer: &Signer) -> Built {
    bundle_with(img, version, "qemu-aarch64", "0.1.0", signer)
}

/// A signed bundle of one rootfs image with a manifest `security-version`.
pub fn bundle_secure(img: &[u8], version: &str, security_version: u64, signer: &Signer) -> Built {
    let builder = BundleBuilder::new(
        "qemu-aarch64",
        semver::Version::parse(version).unwrap(),
        Image::bytes(img).filesystem(FsType::Raw),
        signer,
    )
    .security_version(security_version)
    .archive_options(options());
    build(&builder)
}

pub fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn file_sha256(path: &Path) -> String {
    sha256(&std::fs::read(path).unwrap_or_default())
}

/// How the test server misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Flip a bit of the byte at this bundle offset in every response.
    Corrupt(u64),
    /// Flip that bit only in the first response that covers the byte.
    CorruptOnce(u64),
    /// Close each connection after this many body bytes.
    CloseEvery(u64),
    /// Ignore Range: always 200 with the whole body.
    NoRange,
}

/// A real HTTP/1.1 server on 127.0.0.1:0 serving one file with Range
/// support, keep-alive, and a count of every body byte it sent.
pub struct Server {
    pub url: String,
    pub served: Arc<AtomicU64>,
    pub requests: Arc<AtomicU64>,
    /// (first byte, bytes sent) of every response body.
    log: Arc<Mutex<Vec<(u64, u64)>>>,
    /// Responses being written: a client can hold a whole body before the
    /// server thread has counted it, so readers wait for this to be 0.
    busy: Arc<AtomicU64>,
    /// The most responses ever written at once.
    max_busy: Arc<AtomicU64>,
}

/// Counts one response in [`Server::busy`] while it is alive.
struct Busy<'a>(&'a AtomicU64);

impl<'a> Busy<'a> {
    fn enter(busy: &'a AtomicU64, max: &AtomicU64) -> Self {
        let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
        max.fetch_max(now, Ordering::SeqCst);
        Busy(busy)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Called with (first byte, end) of each response before it is sent.
pub type Observer = Arc<dyn Fn(u64, u64) + Send + Sync>;

impl Server {
    pub fn start(body: Vec<u8>, fault: Fault) -> Server {
        Self::observed(body, fault, Arc::new(|_, _| {}))
    }

    /// [`Server::start`], calling `observer` before each response (what
    /// the device holds while a given range is being fetched).
    pub fn observed(body: Vec<u8>, fault: Fault, observer: Observer) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/release.kxb", listener.local_addr().unwrap());
        let served = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let body = Arc::new(body);
        let corrupted = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(AtomicU64::new(0));
        let max_busy = Arc::new(AtomicU64::new(0));
        let (s, r, l, b) = (served.clone(), requests.clone(), log.clone(), busy.clone());
        let m = max_busy.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (body, s, r, l, b) = (body.clone(), s.clone(), r.clone(), l.clone(), b.clone());
                let m = m.clone();
                let corrupted = corrupted.clone();
                let observer = observer.clone();
                std::thread::spawn(move || {
                    let counters = Counters {
                        served: &s,
                        requests: &r,
                        log: &l,
                        busy: &b,
                        max_busy: &m,
                        observer: &*observer,
                    };
                    let _ = handle(conn, &body, fault, &corrupted, &counters);
                });
            }
        });
        Server {
            url,
            served,
            requests,
            log,
            busy,
            max_busy,
        }
    }

    /// The most responses that were ever being written at once.
    pub fn max_in_flight(&self) -> u64 {
        self.max_busy.load(Ordering::SeqCst)
    }

    /// Waits (up to 10 s) until no response is being written, so the
    /// counts include everything a client has received.
    fn settle(&self) {
        let started = std::time::Instant::now();
        while self.busy.load(Ordering::SeqCst) > 0
            && started.elapsed() < std::time::Duration::from_secs(10)
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    pub fn served(&self) -> u64 {
        self.settle();
        self.served.load(Ordering::SeqCst)
    }

    /// (first byte, bytes sent) of every response body so far.
    pub fn log(&self) -> Vec<(u64, u64)> {
        self.settle();
        self.log.lock().unwrap().clone()
    }

    pub fn take_log(&self) -> Vec<(u64, u64)> {
        self.settle();
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

/// What a connection's thread counts.
struct Counters<'a> {
    served: &'a AtomicU64,
    requests: &'a AtomicU64,
    log: &'a Mutex<Vec<(u64, u64)>>,
    busy: &'a AtomicU64,
    max_busy: &'a AtomicU64,
    observer: &'a (dyn Fn(u64, u64) + Send + Sync),
}

fn handle(
    conn: TcpStream,
    body: &[u8],
    fault: Fault,
    corrupted: &AtomicBool,
    counters: &Counters<'_>,
) -> std::io::Result<()> {
    let Counters {
        served,
        requests,
        log,
        busy,
        max_busy,
        observer,
    } = counters;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    let mut sent_on_conn = 0u64;
    loop {
        let mut range: Option<(u64, Option<u64>)> = None;
        let mut first = true;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let line = line.trim_end();
            if line.is_empty() {
                if first {
                    continue;
                }
                break;
            }
            first = false;
            if let Some(v) = line
                .split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("range"))
                .map(|(_, v)| v.trim().to_string())
                && let Some(spec) = v.strip_prefix("bytes=")
                && let Some((a, b)) = spec.split_once('-')
            {
                range = Some((a.parse().unwrap(), b.parse().ok()));
            }
        }
        let _busy = Busy::enter(busy, max_busy);
        requests.fetch_add(1, Ordering::SeqCst);
        let len = body.len() as u64;
        let (status, start, end) = match range {
            Some((a, b)) if fault != Fault::NoRange => {
                if a >= len {
                    write!(
                        out,
                        "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\n\r\n"
                    )?;
                    continue;
                }
                let e = b.map(|b| (b + 1).min(len)).unwrap_or(len);
                (206, a, e)
            }
            _ => (200, 0, len),
        };
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\n",
            status,
            if status == 206 {
                "Partial Content"
            } else {
                "OK"
            },
            end - start
        );
        if status == 206 {
            head.push_str(&format!(
                "Content-Range: bytes {}-{}/{len}\r\n",
                start,
                end - 1
            ));
        }
        head.push_str("\r\n");
        observer(start, end);
        out.write_all(head.as_bytes())?;
        let mut data = body[start as usize..end as usize].to_vec();
        if let Fault::Corrupt(at) = fault
            && (start..end).contains(&at)
        {
            data[(at - start) as usize] ^= 0x10;
        }
        if let Fault::CorruptOnce(at) = fault
            && (start..end).contains(&at)
            && !corrupted.swap(true, Ordering::SeqCst)
        {
            data[(at - start) as usize] ^= 0x10;
        }
        let mut allowed = data.len() as u64;
        let mut close = false;
        if let Fault::CloseEvery(n) = fault
            && sent_on_conn + allowed > n
        {
            allowed = n.saturating_sub(sent_on_conn);
            close = true;
        }
        let mut sent = 0u64;
        for piece in data[..allowed as usize].chunks(16 * 1024) {
            if out.write_all(piece).is_err() {
                break;
            }
            sent += piece.len() as u64;
        }
        served.fetch_add(sent, Ordering::SeqCst);
        sent_on_conn += sent;
        log.lock().unwrap().push((start, sent));
        if close || sent < allowed {
            return Ok(());
        }
    }
}

/// A simulated device: slot files, keyring, config, boot-state file.
pub struct Device {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Device {
    /// Slot A holds `booted_image`; slot B is empty; booted slot `booted`.
    pub fn new(keys: &Keys, booted_image: &[u8]) -> Device {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keyring.pem"), &keys.ca_pem).unwrap();
        std::fs::write(dir.path().join("slot-a.img"), booted_image).unwrap();
        let config = dir.path().join("system.toml");
        let d = Device { dir, config };
        d.write_config("A", "");
        d
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Rewrites the config: booted slot and extra `[link]` lines.
    pub fn write_config(&self, booted: &str, link: &str) {
        let p = |n: &str| self.path(n).display().to_string();
        let text = format!(
            "compatible = \"qemu-aarch64\"\ndata-dir = \"{}\"\nkeyring = \"{}\"\nreboot-command = [\"true\"]\n\
             [slots.rootfs]\nA = \"{}\"\nB = \"{}\"\n\
             [bootloader]\nbackend = \"file\"\npath = \"{}\"\nbooted-slot = \"{booted}\"\n\
             [link]\n{link}\n",
            p("data"),
            p("keyring.pem"),
            p("slot-a.img"),
            p("slot-b.img"),
            p("boot-state")
        );
        std::fs::write(&self.config, text).unwrap();
    }

    pub fn load(&self) -> kernex_updater::SystemConfig {
        kernex_updater::SystemConfig::load(&self.config).unwrap()
    }

    pub fn flow(&self) -> Box<dyn kernex_bootloader::BootFlow> {
        self.load().bootloader.open().unwrap()
    }

    pub fn write_bundle(&self, name: &str, bytes: &[u8]) -> String {
        let p = self.path(name);
        std::fs::write(&p, bytes).unwrap();
        p.display().to_string()
    }
}
