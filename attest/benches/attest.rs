//! Attestation figures (prints numbers; not a test). Run by bench/attest.sh.
//!
//! - Quote round trip against a real swtpm: verifier nonce → device quote
//!   (load AK under the EK, TPM2_Quote, PCR_Read) → verifier check.
//! - Enrollment round trip: MakeCredential in software → TPM2_ActivateCredential.
//! - Verifier throughput on one core: `verify_quote` on one quote, repeated.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use kernex_attest::{
    AkPublic, CredentialChallenge, DEFAULT_SLOT_PCR, EkPublic, Tpm, expected_slot_pcr, verify_quote,
};
use kernex_protocol::Sha256Digest;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn stats(label: &str, mut samples: Vec<Duration>) {
    if samples.is_empty() {
        println!("{label:<34} no samples (BENCH_ROUNDS=0)");
        return;
    }
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mean = samples.iter().map(|d| ms(*d)).sum::<f64>() / samples.len() as f64;
    println!(
        "{label:<34} n={:<4} median {:>7.2} ms   p90 {:>7.2} ms   mean {:>7.2} ms",
        samples.len(),
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() * 9 / 10]),
        mean
    );
}

fn main() -> Result<()> {
    let rounds = env_or("BENCH_ROUNDS", 50) as usize;
    let verify_secs = env_or("BENCH_VERIFY_SECS", 3);
    let swtpm = common::Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).context("unable to open swtpm")?;
    let endorsement = tpm.endorsement().context("unable to read the EK")?;
    let ek = EkPublic::parse(&endorsement.public).context("the EK the TPM returned")?;
    let blob = tpm.create_ak().context("unable to create an AK")?;
    let ak = AkPublic::parse(&blob.public).context("the AK the TPM returned")?;
    let measurement = Sha256Digest::of(b"bench rootfs");
    tpm.extend_slot_measurement(DEFAULT_SLOT_PCR, &measurement)
        .context("unable to extend the slot PCR")?;
    let expected = BTreeMap::from([(DEFAULT_SLOT_PCR, expected_slot_pcr(&measurement))]);

    println!("kernex-attest benchmark (swtpm on 127.0.0.1, RSA-2048 EK and AK, one PCR)");
    let mut quote_rt = Vec::new();
    let mut quote = None;
    let mut nonce = [0u8; 32];
    for _ in 0..rounds {
        let start = Instant::now();
        openssl::rand::rand_bytes(&mut nonce).context("no random nonce")?;
        let q = tpm
            .quote(&blob, &nonce, &[DEFAULT_SLOT_PCR])
            .context("quote failed")?;
        verify_quote(&ak, &q, &nonce, &expected).context("the quote does not verify")?;
        quote_rt.push(start.elapsed());
        quote = Some((q, nonce));
    }
    stats("quote round trip, TPM kept open", quote_rt);

    // As `kernex-updater attest quote` does it: a new TPM connection, so the
    // EK is recreated (an RSA-2048 key generation inside the TPM) first.
    let mut cold = Vec::new();
    for _ in 0..rounds.min(20) {
        let start = Instant::now();
        openssl::rand::rand_bytes(&mut nonce).context("no random nonce")?;
        let mut fresh = Tpm::open(&swtpm.tcti()).context("unable to open swtpm")?;
        let q = fresh
            .quote(&blob, &nonce, &[DEFAULT_SLOT_PCR])
            .context("quote failed")?;
        drop(fresh);
        verify_quote(&ak, &q, &nonce, &expected).context("the quote does not verify")?;
        cold.push(start.elapsed());
    }
    stats("quote round trip, new connection", cold);

    let mut activation = Vec::new();
    for _ in 0..rounds.min(20) {
        let start = Instant::now();
        let c = CredentialChallenge::new(&ek, &ak).context("MakeCredential failed")?;
        let answer = tpm
            .activate_credential(&blob, &c.id_object, &c.encrypted_secret)
            .context("ActivateCredential failed")?;
        c.check(&answer).context("the activation answer is wrong")?;
        activation.push(start.elapsed());
    }
    stats("credential activation round trip", activation);

    let (quote, nonce) = quote.context("BENCH_ROUNDS must be at least 1")?;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(verify_secs) {
        for _ in 0..100 {
            verify_quote(&ak, &quote, &nonce, &expected).context("the quote does not verify")?;
        }
        n += 100;
    }
    let per_sec = n as f64 / start.elapsed().as_secs_f64();
    println!(
        "verify_quote on one core            {per_sec:>9.0} quotes/s ({n} in {verify_secs} s)"
    );
    let start = Instant::now();
    let mut m = 0u64;
    while start.elapsed() < Duration::from_secs(verify_secs) {
        CredentialChallenge::new(&ek, &ak).context("MakeCredential failed")?;
        m += 1;
    }
    let per_sec = m as f64 / start.elapsed().as_secs_f64();
    println!("MakeCredential (software) one core  {per_sec:>9.0} challenges/s");
    Ok(())
}
