//! Rollout preview benchmark (prints numbers; not a test): N devices across
//! three link classes, sites and time zones in a fresh SQLite store, two
//! real releases, then the preview the API computes — target selection
//! with exact delta bytes from the chunk indexes, diversity ordering, wave
//! split and the projection under cap, concurrency, budgets and windows.
//!
//! cargo run --release -p kernex-server --example rollout_bench -- [DEVICES]

use std::time::Instant;

use anyhow::{Context as _, Result, anyhow};
use kernex_server::config::Config;
use kernex_server::service::rollouts;
use kernex_server::service::rollouts::preview::build_preview;
use kernex_server::service::rollouts::spec::RolloutSpec;
use kernex_server::{AppState, bootstrap};

/// The domain's error as an error chain.
fn api(e: kernex_server::service::Error) -> anyhow::Error {
    anyhow!("{e}")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let n: usize = match std::env::args().nth(1) {
        Some(a) => a
            .parse()
            .with_context(|| format!("DEVICES must be a number, not {a:?}"))?,
        None => 100_000,
    };
    let dir = tempfile::tempdir().context("unable to create a temporary directory")?;
    let state = AppState::open(Config {
        data_dir: dir.path().join("data"),
        ..Config::default()
    })
    .await
    .context("unable to open the store")?;
    bootstrap(&state)
        .await
        .context("unable to create the first organisation")?;
    let made = kernex_sim::releases::make_releases(
        &dir.path().join("rel"),
        "sim-x86",
        &[semver::Version::new(1, 0, 0), semver::Version::new(1, 1, 0)],
        8 << 20,
        0.1,
        1,
    )
    .context("unable to build the two releases")?;
    let org: String = sqlx::query_scalar::<_, String>("SELECT id FROM organizations")
        .fetch_one(state.store.pool())
        .await
        .context("no organisation")?;
    // Releases straight into the store and blob store (the upload path is
    // benchmarked elsewhere).
    let mut ids = Vec::new();
    for (i, path) in made.bundles.iter().enumerate() {
        let bytes =
            std::fs::read(path).with_context(|| format!("unable to read {}", path.display()))?;
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        let key = kernex_server::blobs::bundle_key(&sha);
        state
            .blobs
            .put_file(&key, path)
            .await
            .with_context(|| format!("unable to store {}", path.display()))?;
        let b = kernex_protocol::bundle::Bundle::open(std::io::Cursor::new(bytes.clone()))
            .with_context(|| format!("{} is not a bundle", path.display()))?;
        let m = b.unverified_manifest();
        let id = format!("rel{i}");
        sqlx::query("INSERT INTO releases (id, org_id, version, compatible, manifest, signer, blob_key, size, sha256, unstable, created_by, created_at) VALUES ($1, $2, $3, $4, '{}', 'bench', $5, $6, $7, 0, 'bench', 0)")
            .bind(&id)
            .bind(&org)
            .bind(m.version.to_string())
            .bind(&m.compatible)
            .bind(&key)
            .bind(bytes.len() as i64)
            .bind(&sha)
            .execute(state.store.pool())
            .await
            .context("unable to insert a release")?;
        ids.push(id);
    }
    let t = Instant::now();
    let mut tx = state
        .store
        .begin_write()
        .await
        .context("unable to start a transaction")?;
    let classes = ["ethernet", "wifi", "metered-4g"];
    let zones = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo"];
    for i in 0..n {
        sqlx::query("INSERT INTO devices (id, org_id, device_id, hardware_class, current_version, status, credential_hash, revoked, registered_at, link_class, site, time_zone, last_seen_at) VALUES ($1, $2, $3, 'sim-x86', '1.0.0', 'online', $4, 0, 0, $5, $6, $7, 0)")
            .bind(format!("pk{i:07}"))
            .bind(&org)
            .bind(format!("dev-{i:07}"))
            .bind(format!("h{i}"))
            .bind(classes[i % 3])
            .bind(format!("site-{}", i % 500))
            .bind(zones[i % 4])
            .execute(&mut *tx)
            .await
            .context("unable to insert a device")?;
    }
    tx.commit().await.context("unable to commit the devices")?;
    println!(
        "setup: {n} devices inserted in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let spec: RolloutSpec = serde_json::from_value(serde_json::json!({
        "release_id": ids[1],
        "maintenance_windows": [{"start": "01:00", "end": "05:00"}],
        "bandwidth": {"egress_cap_bytes_per_sec": 125_000_000, "max_concurrent_downloads": 2000}
    }))
    .context("the rollout spec")?;
    let release = rollouts::release(&state, &org, &ids[1])
        .await
        .map_err(api)?;
    // Delta computed once per release pair and kept: warm it, then time.
    let t = Instant::now();
    rollouts::release_delta(&state, Some(&ids[0]), &ids[1])
        .await
        .map_err(api)?;
    println!(
        "delta from the chunk indexes (first time, then cached): {:.3} s",
        t.elapsed().as_secs_f64()
    );
    for round in 0..3 {
        let t0 = Instant::now();
        let targets = rollouts::targets(&state, &org, &spec, &release, None, true)
            .await
            .map_err(api)?;
        let selected = t0.elapsed();
        let t1 = Instant::now();
        let p = build_preview(&spec, &release, &targets, 1_767_225_600_000, true);
        let planned = t1.elapsed();
        println!(
            "preview round {round}: {} devices, {} bytes, metered cost {:.2}, projected {} h: select+order {:.3} s, plan {:.3} s, total {:.3} s",
            p.targets,
            p.total_bytes,
            p.metered_cost,
            p.projected_duration_secs / 3600,
            selected.as_secs_f64(),
            planned.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
