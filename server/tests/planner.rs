//! The delta planner end to end, on SQLite and PostgreSQL: the server
//! builds chunk patches from the releases its devices run, the preview
//! says per device the method and the exact bytes, and a real updater
//! (`kernex_updater`, over HTTP against the server, with the credential
//! and the poll answer a device gets) fetches exactly that and writes the
//! right image. A corrupted server-made patch costs at most its own bytes;
//! no device starts before its patch exists; patches go when no device
//! runs their base any more.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "../../updater/tests/common/mod.rs"]
mod device;

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use common::Harness;
use device::{
    Built, Device, Keys, bundle, bundle_patched, file_sha256, image, keys, sha256, sprinkle,
};
use kernex_protocol::api::DesiredState;
use kernex_protocol::bundle::Bundle;
use kernex_updater::source::{HttpSource, Link, Source};
use kernex_updater::{InstallOptions, InstallReport};
use serde_json::{Value, json};

const MIB: usize = 1024 * 1024;

both!(
    preview_equals_what_a_real_updater_fetches_full_and_server_patches,
    preview_equals_what_a_real_updater_fetches_bundle_patch,
    a_corrupted_server_made_patch_still_installs_the_right_image,
    no_device_starts_before_its_patch_exists,
    a_failed_patch_job_is_retried_by_an_operator,
    a_deployment_preview_equals_what_each_device_fetches,
    a_server_made_patch_is_the_vendor_s_patch_byte_for_byte,
);

/// Serves the harness's app on 127.0.0.1 (the updater speaks HTTP).
async fn serve(h: &Harness) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = kernex_server::http::app(h.state.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

/// Three releases: 1.0.0, 1.1.0 (a binary patched in many places) and
/// 2.0.0 (more of them), none carrying a vendor patch.
struct Releases {
    keys: Keys,
    images: Vec<Vec<u8>>,
    bundles: Vec<Built>,
    ids: Vec<String>,
}

async fn releases(h: &Harness, vendor_patch_last: bool) -> Releases {
    let keys = keys();
    let v1 = image(4 * MIB, 1);
    let v2 = sprinkle(&v1, MIB, MIB, 3000);
    let v3 = sprinkle(&v2, 2 * MIB + 77, MIB, 2500);
    let b1 = bundle(&v1, "1.0.0", &keys.signer);
    let b2 = bundle(&v2, "1.1.0", &keys.signer);
    let b3 = if vendor_patch_last {
        bundle_patched(&v3, "2.0.0", &keys, &b2)
    } else {
        bundle(&v3, "2.0.0", &keys.signer)
    };
    let pem = String::from_utf8(keys.ca_pem.clone()).unwrap();
    let (s, v) = h
        .call(
            Method::PUT,
            "/api/v1/org/keyring",
            Some(&h.admin),
            Some(json!({ "pem": pem })),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let mut ids = Vec::new();
    for b in [&b1, &b2, &b3] {
        let (s, r) = h.upload(&h.admin, b.bytes.clone()).await;
        assert_eq!(s, StatusCode::CREATED, "{r}");
        ids.push(r["id"].as_str().unwrap().to_string());
    }
    Releases {
        keys,
        images: vec![v1, v2, v3],
        bundles: vec![b1, b2, b3],
        ids,
    }
}

/// A device with its server identity.
struct Dev {
    name: String,
    id: String,
    cred: String,
    device: Device,
}

/// A device enrolled with the server that runs release `on` (installed
/// from the bundle file, booted, committed), or its factory image (no
/// record: nothing to seed from).
async fn device(h: &Harness, r: &Releases, enrollment: &str, name: &str, on: Option<usize>) -> Dev {
    let dev = Device::new(&r.keys, &image(4 * MIB, 99));
    if let Some(k) = on {
        let path = dev.write_bundle("release.kxb", &r.bundles[k].bytes);
        let config = dev.load();
        tokio::task::block_in_place(|| {
            let mut flow = config.bootloader.open().unwrap();
            let mut src = kernex_updater::source::open(&path, Link::unlimited()).unwrap();
            kernex_updater::install(
                &config,
                flow.as_mut(),
                src.as_mut(),
                &InstallOptions::default(),
            )
            .unwrap();
            dev.write_config("B", "");
            kernex_updater::boot::mark_good(&dev.load(), dev.flow().as_mut()).unwrap();
        });
    }
    let (id, cred) = h.enroll(enrollment, name, "qemu-aarch64").await;
    let version = on.map(|k| ["1.0.0", "1.1.0", "2.0.0"][k]);
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/device/heartbeat",
            Some(&cred),
            Some(json!({ "version": version })),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    Dev {
        name: name.into(),
        id,
        cred,
        device: dev,
    }
}

/// The device's poll answer (None: 204).
async fn poll(h: &Harness, dev: &Dev) -> Option<DesiredState> {
    let (s, v) = h
        .call(Method::GET, "/api/v1/device/poll", Some(&dev.cred), None)
        .await;
    match s {
        StatusCode::NO_CONTENT => None,
        StatusCode::OK => Some(serde_json::from_value(v).unwrap()),
        other => panic!("poll: {other} {v}"),
    }
}

/// Installs what `desired` says with the real updater over HTTP, as the
/// daemon does: the bundle and the offered patches, with the device's
/// credential.
async fn install(url: &str, dev: &Dev, desired: &DesiredState) -> InstallReport {
    let config = dev.device.load();
    tokio::task::block_in_place(|| {
        let mut flow = config.bootloader.open().unwrap();
        let mut bundle = HttpSource::new(&format!("{url}{}", desired.url), Link::unlimited())
            .with_bearer(&dev.cred);
        let offers: Vec<(kernex_protocol::api::ServerPatch, Box<dyn Source>)> = desired
            .patches
            .iter()
            .map(|p| {
                let src = HttpSource::new(&format!("{url}{}", p.url), Link::unlimited())
                    .with_bearer(&dev.cred);
                (p.clone(), Box::new(src) as Box<dyn Source>)
            })
            .collect();
        kernex_updater::install::server_patch::install_offered(
            &config,
            flow.as_mut(),
            &mut bundle,
            offers,
            &InstallOptions::default(),
            &|_| {},
        )
        .unwrap()
    })
}

/// Creates a rollout of `release` to every device in one wave.
async fn rollout(h: &Harness, release: &str) -> String {
    rollout_with(h, release, json!({})).await
}

/// Creates a rollout of `release` to the devices `selector` picks, in one
/// wave.
async fn rollout_with(h: &Harness, release: &str, selector: Value) -> String {
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/rollouts",
            Some(&h.admin),
            Some(json!({"name": "planner", "release_id": release, "selector": selector, "waves": [{"percent": 100, "soak_secs": 0}]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// Waits (60 s at most) until no patch job of `release` is pending or
/// building; the jobs.
async fn built(h: &Harness, release: &str) -> Vec<Value> {
    for _ in 0..600 {
        let (s, v) = h
            .call(
                Method::GET,
                &format!("/api/v1/releases/{release}/patches"),
                Some(&h.admin),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let jobs = v.as_array().unwrap().clone();
        if jobs
            .iter()
            .all(|j| j["status"] != "pending" && j["status"] != "building")
        {
            return jobs;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("patch jobs of {release} not built within 60 s");
}

/// The saved rollout's preview, per device id: (method, bytes).
async fn preview(h: &Harness, rollout: &str) -> std::collections::BTreeMap<String, (String, u64)> {
    let (s, v) = h
        .call(
            Method::GET,
            &format!("/api/v1/rollouts/{rollout}/preview"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["patches_building"], 0, "{v}");
    v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device_id"].as_str().unwrap().to_string(),
                (
                    d["method"].as_str().unwrap().to_string(),
                    d["bytes"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

async fn start(h: &Harness, rollout: &str) {
    let (s, v) = h
        .call(
            Method::POST,
            &format!("/api/v1/rollouts/{rollout}/start"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

async fn tick(h: &Harness) {
    assert!(
        kernex_server::service::rollouts::scheduler::tick(&h.state)
            .await
            .unwrap()
    );
}

/// Polls `dev` after scheduler passes until it is told to install.
async fn desired(h: &Harness, dev: &Dev) -> DesiredState {
    for _ in 0..50 {
        tick(h).await;
        if let Some(d) = poll(h, dev).await {
            return d;
        }
    }
    panic!("{} was never given its release", dev.name);
}

/// What a device running `from` fetches for `to` by the chunk delta alone
/// (no server patch), from the bundles.
fn chunk_delta(from: Option<&Built>, to: &Built) -> u64 {
    let open = |b: &Built| Bundle::open(std::io::Cursor::new(b.bytes.clone())).unwrap();
    let mut new = open(to);
    match from {
        Some(f) => new.delta_from(Some(&mut open(f))),
        None => new.delta_from::<std::io::Cursor<Vec<u8>>>(None),
    }
    .unwrap()
    .total_bytes
}

async fn preview_equals_what_a_real_updater_fetches_full_and_server_patches(h: Arc<Harness>) {
    let url = serve(&h).await;
    let r = releases(&h, false).await;
    let (_, enrollment) = h.enrollment_token(&h.admin, &["lab"]).await;
    let devs = vec![
        device(&h, &r, &enrollment, "factory", None).await,
        device(&h, &r, &enrollment, "on-1.0.0", Some(0)).await,
        device(&h, &r, &enrollment, "on-1.1.0", Some(1)).await,
    ];
    let id = rollout(&h, &r.ids[2]).await;
    // Two old releases: a server-made patch from each.
    let jobs = built(&h, &r.ids[2]).await;
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    for j in &jobs {
        assert_eq!(j["status"], "ready", "{j}");
        assert_eq!(j["done_bytes"], j["total_bytes"], "{j}");
    }
    let planned = preview(&h, &id).await;
    assert_eq!(planned["factory"].0, "full", "{planned:?}");
    assert_eq!(planned["on-1.0.0"].0, "server-patch", "{planned:?}");
    assert_eq!(planned["on-1.1.0"].0, "server-patch", "{planned:?}");
    // Cheaper than the chunk delta, as planned.
    assert!(planned["on-1.0.0"].1 < chunk_delta(Some(&r.bundles[0]), &r.bundles[2]));
    assert!(planned["on-1.1.0"].1 < chunk_delta(Some(&r.bundles[1]), &r.bundles[2]));
    assert_eq!(planned["factory"].1, chunk_delta(None, &r.bundles[2]));
    start(&h, &id).await;
    for dev in &devs {
        let d = desired(&h, dev).await;
        let (method, bytes) = planned[&dev.name].clone();
        assert_eq!(
            d.patches.len(),
            usize::from(method == "server-patch"),
            "{d:?}"
        );
        let report = install(&url, dev, &d).await;
        eprintln!("{}: {method} planned {bytes} B; {report:?}", dev.name);
        assert_eq!(report.bytes_fetched, bytes, "{}: bytes", dev.name);
        if method == "server-patch" {
            assert!(report.chunks_patched > 0, "{report:?}");
            assert_eq!(report.patch_failures, 0, "{report:?}");
        }
        let slot = if dev.name == "factory" {
            "slot-b.img"
        } else {
            "slot-a.img"
        };
        assert_eq!(file_sha256(&dev.device.path(slot)), sha256(&r.images[2]));
    }
    // Garbage collection: kept while devices run the bases...
    assert_eq!(
        kernex_server::service::patches::gc(&h.state).await.unwrap(),
        0
    );
    let (s, v) = h
        .call(
            Method::POST,
            &format!("/api/v1/rollouts/{id}/abort"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let blobs = h.blob_files();
    for dev in &devs {
        let (s, _) = h
            .call(
                Method::POST,
                "/api/v1/device/heartbeat",
                Some(&dev.cred),
                Some(json!({ "version": "2.0.0" })),
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT);
    }
    // ...and gone when none does: rows and blobs.
    assert_eq!(
        kernex_server::service::patches::gc(&h.state).await.unwrap(),
        2
    );
    assert_eq!(h.count("server_patches").await, 0);
    assert_eq!(h.blob_files(), blobs - 2);
}

async fn preview_equals_what_a_real_updater_fetches_bundle_patch(h: Arc<Harness>) {
    let url = serve(&h).await;
    // 2.0.0 carries the vendor's patch from 1.1.0: no server patch from
    // it; one from 1.0.0.
    let r = releases(&h, true).await;
    let (_, enrollment) = h.enrollment_token(&h.admin, &["lab"]).await;
    let dev = device(&h, &r, &enrollment, "on-1.1.0", Some(1)).await;
    let id = rollout(&h, &r.ids[2]).await;
    let jobs = built(&h, &r.ids[2]).await;
    assert!(jobs.is_empty(), "{jobs:?}");
    let planned = preview(&h, &id).await;
    assert_eq!(planned["on-1.1.0"].0, "bundle-patch", "{planned:?}");
    assert_eq!(
        planned["on-1.1.0"].1,
        chunk_delta(Some(&r.bundles[1]), &r.bundles[2])
    );
    start(&h, &id).await;
    let d = desired(&h, &dev).await;
    assert!(d.patches.is_empty(), "{d:?}");
    let report = install(&url, &dev, &d).await;
    assert_eq!(report.bytes_fetched, planned["on-1.1.0"].1, "{report:?}");
    assert!(report.chunks_patched > 0, "{report:?}");
    assert_eq!(
        file_sha256(&dev.device.path("slot-a.img")),
        sha256(&r.images[2])
    );
}

async fn a_corrupted_server_made_patch_still_installs_the_right_image(h: Arc<Harness>) {
    let url = serve(&h).await;
    let r = releases(&h, false).await;
    let (_, enrollment) = h.enrollment_token(&h.admin, &["lab"]).await;
    let dev = device(&h, &r, &enrollment, "on-1.0.0", Some(0)).await;
    let id = rollout(&h, &r.ids[2]).await;
    let jobs = built(&h, &r.ids[2]).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let size = jobs[0]["size"].as_u64().unwrap();
    // Corrupt the stored patch's frames (its table stays right: the
    // worst case, every frame fetched and failing).
    let (key, table_size): (String, i64) =
        sqlx::query_as("SELECT blob_key, table_size FROM server_patches")
            .fetch_one(h.state.store.pool())
            .await
            .unwrap();
    let path = h.state.config.blob_dir().join(&key);
    let mut bytes = std::fs::read(&path).unwrap();
    for b in bytes.iter_mut().skip(table_size as usize).step_by(7) {
        *b ^= 0xa5;
    }
    std::fs::write(&path, &bytes).unwrap();
    start(&h, &id).await;
    let d = desired(&h, &dev).await;
    assert_eq!(d.patches.len(), 1, "{d:?}");
    let report = install(&url, &dev, &d).await;
    eprintln!("corrupted patch of {size} B: {report:?}");
    assert!(report.patch_failures > 0, "{report:?}");
    assert_eq!(report.chunks_patched, 0, "{report:?}");
    assert_eq!(
        file_sha256(&dev.device.path("slot-a.img")),
        sha256(&r.images[2])
    );
    // Bytes wasted on the bad patch: at most its size.
    let plain = chunk_delta(Some(&r.bundles[0]), &r.bundles[2]);
    assert!(
        report.bytes_fetched <= plain + size,
        "fetched {} > chunk delta {plain} + patch {size}",
        report.bytes_fetched
    );
}

async fn no_device_starts_before_its_patch_exists(h: Arc<Harness>) {
    let url = serve(&h).await;
    let r = releases(&h, false).await;
    let (_, waves) = h.enrollment_token(&h.admin, &["wave"]).await;
    let (_, lab) = h.enrollment_token(&h.admin, &["lab"]).await;
    let in_rollout = device(&h, &r, &waves, "rollout", Some(0)).await;
    let deployed = device(&h, &r, &lab, "deployment", Some(1)).await;
    // Another replica is building both patches (and does not finish).
    for (from, image, version) in [
        (&r.ids[0], &r.images[0], "1.0.0"),
        (&r.ids[1], &r.images[1], "1.1.0"),
    ] {
        sqlx::query(
            "INSERT INTO server_patches (id, org_id, to_release_id, from_release_id, slot_class, base_sha256, base_version, status, claimed_by, claimed_until, created_at, updated_at) \
             SELECT $1, org_id, $2, $3, 'rootfs', $4, $5, 'building', 'another replica', $6, 0, 0 FROM releases WHERE id = $2",
        )
        .bind(format!("held-{from}"))
        .bind(&r.ids[2])
        .bind(from)
        .bind(sha256(image))
        .bind(version)
        .bind(i64::MAX)
        .execute(h.state.store.pool())
        .await
        .unwrap();
    }
    let id = rollout_with(&h, &r.ids[2], json!({"tags": ["wave"]})).await;
    start(&h, &id).await;
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/deployments",
            Some(&h.admin),
            Some(json!({"release_id": r.ids[2], "devices": [deployed.id]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    for _ in 0..5 {
        tick(&h).await;
        assert!(
            poll(&h, &in_rollout).await.is_none(),
            "started before its patch"
        );
        assert!(
            poll(&h, &deployed).await.is_none(),
            "started before its patch"
        );
    }
    let (s, v) = h
        .call(
            Method::GET,
            &format!("/api/v1/rollouts/{id}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The other replica is gone: its claim lapses, this one builds.
    sqlx::query("UPDATE server_patches SET claimed_until = 0")
        .execute(h.state.store.pool())
        .await
        .unwrap();
    tick(&h).await;
    let jobs = built(&h, &r.ids[2]).await;
    assert!(jobs.iter().all(|j| j["status"] == "ready"), "{jobs:?}");
    for dev in [&in_rollout, &deployed] {
        let d = desired(&h, dev).await;
        assert_eq!(d.patches.len(), 1, "{}: {d:?}", dev.name);
        let report = install(&url, dev, &d).await;
        assert!(report.chunks_patched > 0, "{report:?}");
        assert_eq!(
            file_sha256(&dev.device.path("slot-a.img")),
            sha256(&r.images[2])
        );
    }
}

/// The base release's bundle is missing from the blob store when its job
/// runs: the job fails, its pair is planned as the chunk delta, and an
/// operator's retry (audited; 404/409/403 where it does not apply) builds
/// the patch once the bundle is back, after which the device is planned
/// and fetches the server patch, to the byte.
async fn a_failed_patch_job_is_retried_by_an_operator(h: Arc<Harness>) {
    let url = serve(&h).await;
    let r = releases(&h, false).await;
    let (_, enrollment) = h.enrollment_token(&h.admin, &["lab"]).await;
    let dev = device(&h, &r, &enrollment, "on-1.0.0", Some(0)).await;
    let (key,): (String,) = sqlx::query_as("SELECT blob_key FROM releases WHERE id = $1")
        .bind(&r.ids[0])
        .fetch_one(h.state.store.pool())
        .await
        .unwrap();
    h.state.blobs.delete(&key).await.unwrap();
    let id = rollout(&h, &r.ids[2]).await;
    let jobs = built(&h, &r.ids[2]).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["status"], "failed", "{jobs:?}");
    assert!(
        jobs[0]["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{jobs:?}"
    );
    let job = jobs[0]["id"].as_str().unwrap().to_string();
    // The bundle is back (the preview reads its index too): the pair is
    // planned as the chunk delta.
    let spool = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(spool.path(), &r.bundles[0].bytes).unwrap();
    h.state.blobs.put_file(&key, spool.path()).await.unwrap();
    let plain = chunk_delta(Some(&r.bundles[0]), &r.bundles[2]);
    assert_eq!(
        preview(&h, &id).await["on-1.0.0"],
        ("chunk-delta".to_string(), plain)
    );
    let retry = |job: String, token: String| {
        let h = h.clone();
        let release = r.ids[2].clone();
        async move {
            h.call(
                Method::POST,
                &format!("/api/v1/releases/{release}/patches/{job}/retry"),
                Some(&token),
                None,
            )
            .await
        }
    };
    // A viewer may not; an unknown job is not found.
    let viewer = h.user("viewer@example.com", "read_only").await;
    assert_eq!(retry(job.clone(), viewer).await.0, StatusCode::FORBIDDEN);
    assert_eq!(
        retry("nope".into(), h.admin.clone()).await.0,
        StatusCode::NOT_FOUND
    );
    // The retry builds the patch.
    let (s, v) = retry(job.clone(), h.admin.clone()).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let jobs = built(&h, &r.ids[2]).await;
    assert_eq!(jobs[0]["status"], "ready", "{jobs:?}");
    assert!(jobs[0]["error"].is_null(), "{jobs:?}");
    // Only a failed job is retried.
    assert_eq!(
        retry(job.clone(), h.admin.clone()).await.0,
        StatusCode::CONFLICT
    );
    let planned = preview(&h, &id).await;
    let (method, bytes) = planned["on-1.0.0"].clone();
    assert_eq!(method, "server-patch", "{planned:?}");
    assert!(bytes < plain, "{bytes} >= {plain}");
    let (s, v) = h
        .call(Method::GET, "/api/v1/audit?limit=50", Some(&h.admin), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let retries: Vec<&Value> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "release.patch.retry")
        .collect();
    // The unknown job (404), the retry and the refused one (409); the
    // viewer's 403 is refused before anything is attempted, unaudited.
    let results: Vec<&str> = retries
        .iter()
        .rev()
        .map(|e| e["result"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(results.len(), 3, "{retries:?}");
    assert!(results[0].starts_with("error"), "{results:?}");
    assert_eq!(results[1], "ok", "{results:?}");
    assert!(results[2].starts_with("error"), "{results:?}");
    start(&h, &id).await;
    let d = desired(&h, &dev).await;
    assert_eq!(d.patches.len(), 1, "{d:?}");
    let report = install(&url, &dev, &d).await;
    assert_eq!(report.bytes_fetched, bytes, "{report:?}");
    assert!(report.chunks_patched > 0, "{report:?}");
    assert_eq!(
        file_sha256(&dev.device.path("slot-a.img")),
        sha256(&r.images[2])
    );
}

/// Per device (method, bytes, building) of a deployment preview.
fn per_device(v: &Value) -> std::collections::BTreeMap<String, (String, u64, bool)> {
    v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device_id"].as_str().unwrap().to_string(),
                (
                    d["method"].as_str().unwrap().to_string(),
                    d["bytes"].as_u64().unwrap(),
                    d["patch_building"].as_bool().unwrap(),
                ),
            )
        })
        .collect()
}

/// A deployment's preview, before it is made (patches to be built: the
/// chunk delta meanwhile) and after (final), equals what each device
/// fetches, to the byte, for every method.
async fn a_deployment_preview_equals_what_each_device_fetches(h: Arc<Harness>) {
    let url = serve(&h).await;
    let r = releases(&h, false).await;
    let (_, enrollment) = h.enrollment_token(&h.admin, &["lab"]).await;
    let devs = vec![
        device(&h, &r, &enrollment, "factory", None).await,
        device(&h, &r, &enrollment, "on-1.0.0", Some(0)).await,
        device(&h, &r, &enrollment, "on-1.1.0", Some(1)).await,
    ];
    let ids: Vec<String> = devs.iter().map(|d| d.id.clone()).collect();
    let body = json!({"release_id": r.ids[2], "devices": ids});
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/deployments/preview",
            Some(&h.admin),
            Some(body.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let before = per_device(&v);
    let plain = |k: usize| chunk_delta(Some(&r.bundles[k]), &r.bundles[2]);
    assert_eq!(
        before["factory"],
        ("full".into(), chunk_delta(None, &r.bundles[2]), false)
    );
    assert_eq!(before["on-1.0.0"], ("chunk-delta".into(), plain(0), true));
    assert_eq!(before["on-1.1.0"], ("chunk-delta".into(), plain(1), true));
    assert_eq!(v["patches_building"], 2, "{v}");
    assert_eq!(h.count("deployments").await, 0, "a preview makes nothing");
    // Bad input: an unknown release, a device of another hardware class.
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/deployments/preview",
            Some(&h.admin),
            Some(json!({"release_id": "nope", "devices": [devs[0].id]})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (other, _) = h.enroll(&enrollment, "other-class", "x86_64-efi").await;
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/deployments/preview",
            Some(&h.admin),
            Some(json!({"release_id": r.ids[2], "devices": [other]})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    // Made: the server builds both patches, and the preview is final.
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/deployments",
            Some(&h.admin),
            Some(body),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let deployment = v["id"].as_str().unwrap().to_string();
    let jobs = built(&h, &r.ids[2]).await;
    assert!(jobs.iter().all(|j| j["status"] == "ready"), "{jobs:?}");
    let (s, v) = h
        .call(
            Method::GET,
            &format!("/api/v1/deployments/{deployment}/preview"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["patches_building"], 0, "{v}");
    assert_eq!(v["methods"]["server-patch"], 2, "{v}");
    let after = per_device(&v);
    assert!(after["on-1.0.0"].1 < plain(0), "{after:?}");
    assert!(after["on-1.1.0"].1 < plain(1), "{after:?}");
    assert_eq!(
        v["total_bytes"].as_u64().unwrap(),
        after.values().map(|p| p.1).sum::<u64>()
    );
    for dev in &devs {
        let (method, bytes, building) = after[&dev.name].clone();
        assert!(!building);
        let d = desired(&h, dev).await;
        assert_eq!(
            d.patches.len(),
            usize::from(method == "server-patch"),
            "{d:?}"
        );
        let report = install(&url, dev, &d).await;
        assert_eq!(report.bytes_fetched, bytes, "{}: {method}", dev.name);
        let slot = if dev.name == "factory" {
            "slot-b.img"
        } else {
            "slot-a.img"
        };
        assert_eq!(file_sha256(&dev.device.path(slot)), sha256(&r.images[2]));
    }
}

/// The server builds its patch with the protocol's builder at the level
/// `kernex-image bundle create --patch-from` uses: the patch a device gets
/// from the server is the one the vendor would have put in the bundle,
/// byte for byte (so `bench/delta.sh`'s `--patch-from` row is the
/// planner's bytes).
async fn a_server_made_patch_is_the_vendor_s_patch_byte_for_byte(h: Arc<Harness>) {
    let r = releases(&h, false).await;
    let (_, enrollment) = h.enrollment_token(&h.admin, &["lab"]).await;
    let _dev = device(&h, &r, &enrollment, "on-1.1.0", Some(1)).await;
    let _id = rollout(&h, &r.ids[2]).await;
    let jobs = built(&h, &r.ids[2]).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["status"], "ready", "{jobs:?}");
    let (key, size): (String, i64) =
        sqlx::query_as("SELECT blob_key, size FROM server_patches WHERE id = $1")
            .bind(jobs[0]["id"].as_str().unwrap())
            .fetch_one(h.state.store.pool())
            .await
            .unwrap();
    let server_made = kernex_server::service::patches::build::read_blob(
        &h.state,
        &key,
        0..u64::try_from(size).unwrap(),
    )
    .await
    .unwrap();
    let vendor = bundle_patched(&r.images[2], "2.0.0", &r.keys, &r.bundles[1]);
    let b = Bundle::open(std::io::Cursor::new(vendor.bytes.clone())).unwrap();
    let (_, span) = b.layout().images[0].patches[0];
    let member = &vendor.bytes[span.offset as usize..span.end() as usize];
    assert_eq!(server_made.len(), member.len());
    assert!(
        server_made == member,
        "the server-made patch differs from the vendor's"
    );
}
