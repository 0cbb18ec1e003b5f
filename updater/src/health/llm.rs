//! The `llm` check (cargo feature `llm`): load a GGUF model with llama.cpp
//! (`llama-cpp-2`), generate tokens for a prompt greedily, and hold the
//! generation speed, the peak RSS and the output against the spec.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use kernex_protocol::manifest::HealthCheck;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;

/// Why the `llm` check failed.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// The check is not an `llm` check.
    #[error("not an llm check")]
    NotLlm,
    /// llama.cpp could not be initialised.
    #[error("llm: llama.cpp backend: {0}")]
    Backend(String),
    /// The model file is missing or unreadable.
    #[error("llm {model}: {reason}")]
    Model {
        /// The model path.
        model: String,
        /// What failed.
        reason: String,
    },
    /// Inference ran but missed the spec.
    #[error("llm {model}: {reason}")]
    Spec {
        /// The model path.
        model: String,
        /// What was measured against what was required.
        reason: String,
    },
}

/// What a passing check measured.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmReport {
    /// Tokens generated.
    pub tokens: u32,
    /// Generation speed (tokens after the prompt, per second).
    pub tokens_per_second: f64,
    /// Peak RSS of this process during the check, bytes.
    pub peak_rss: u64,
    /// Seconds to load the model.
    pub load_seconds: f64,
    /// The generated text.
    pub output: String,
}

impl std::fmt::Display for LlmReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tokens at {:.1} tokens/s, peak RSS {} MiB, loaded in {:.2} s: {:?}",
            self.tokens,
            self.tokens_per_second,
            self.peak_rss / (1024 * 1024),
            self.load_seconds,
            self.output
        )
    }
}

fn backend() -> Result<&'static LlamaBackend, LlmError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| LlmError::Backend(e.clone()))
}

/// Resets this process's peak RSS (`VmHWM`) so the check measures its own
/// peak (Linux: `5` to `/proc/self/clear_refs`).
fn reset_peak_rss() {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        tracing::warn!(error = %e, "unable to reset the peak RSS; measuring the process's");
    }
}

/// Peak RSS of this process (`VmHWM`), bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

/// Runs an `llm` check.
pub fn check(check: &HealthCheck) -> Result<LlmReport, LlmError> {
    let HealthCheck::Llm {
        model,
        prompt,
        tokens,
        min_tokens_per_second,
        max_rss,
        expect,
    } = check
    else {
        return Err(LlmError::NotLlm);
    };
    let model_err = |reason: String| LlmError::Model {
        model: model.clone(),
        reason,
    };
    let spec_err = |reason: String| LlmError::Spec {
        model: model.clone(),
        reason,
    };
    let path = Path::new(model);
    let meta = std::fs::metadata(path).map_err(|e| model_err(format!("unable to read: {e}")))?;
    let backend = backend()?;
    reset_peak_rss();
    let load_start = Instant::now();
    let params = LlamaModelParams::default();
    let llama = LlamaModel::load_from_file(backend, path, &params).map_err(|e| {
        model_err(format!(
            "llama.cpp could not load the model ({} bytes; corrupt or truncated GGUF?): {e}",
            meta.len()
        ))
    })?;
    let load_seconds = load_start.elapsed().as_secs_f64();
    let vocab = llama.vocab();
    let prompt_tokens = vocab.tokenize(prompt.as_bytes(), true, false);
    if prompt_tokens.is_empty() {
        return Err(spec_err("the prompt tokenizes to nothing".into()));
    }
    let n_ctx = prompt_tokens.len() as u32 + *tokens + 8;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get() as i32)
        .unwrap_or(1);
    let ctx_params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(n_ctx)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = llama
        .new_context(backend, ctx_params)
        .map_err(|e| model_err(format!("unable to create a context: {e}")))?;
    let mut batch = LlamaBatch::new(n_ctx as usize, 1);
    let last = prompt_tokens.len() - 1;
    for (i, t) in prompt_tokens.iter().enumerate() {
        batch
            .add(*t, i as i32, &[0], i == last)
            .map_err(|e| spec_err(format!("prompt batch: {e}")))?;
    }
    ctx.decode(&mut batch)
        .map_err(|e| model_err(format!("prompt evaluation failed: {e}")))?;
    let mut sampler = LlamaSampler::greedy();
    let mut out = Vec::new();
    let mut generated = 0u32;
    let mut pos = prompt_tokens.len() as i32;
    let gen_start = Instant::now();
    while generated < *tokens {
        let token = sampler.sample(&ctx, batch.n_tokens() - 1);
        sampler.accept(token);
        generated += 1;
        if vocab.is_eog(token) {
            break;
        }
        out.extend_from_slice(&vocab.token_to_piece(token, false, None));
        batch.clear();
        batch
            .add(token, pos, &[0], true)
            .map_err(|e| spec_err(format!("batch: {e}")))?;
        pos += 1;
        ctx.decode(&mut batch)
            .map_err(|e| model_err(format!("decoding failed after {generated} tokens: {e}")))?;
    }
    let secs = gen_start.elapsed().as_secs_f64().max(1e-9);
    let tokens_per_second = f64::from(generated) / secs;
    let peak = peak_rss().unwrap_or(0);
    let report = LlmReport {
        tokens: generated,
        tokens_per_second,
        peak_rss: peak,
        load_seconds,
        output: String::from_utf8_lossy(&out).into_owned(),
    };
    if tokens_per_second < f64::from(*min_tokens_per_second) {
        return Err(spec_err(format!(
            "{tokens_per_second:.1} tokens/s, below the minimum of {min_tokens_per_second} tokens/s ({generated} tokens in {secs:.2} s)"
        )));
    }
    if peak > *max_rss {
        return Err(spec_err(format!(
            "peak RSS {peak} bytes, above the maximum of {max_rss}"
        )));
    }
    if let Some(want) = expect
        && !report.output.contains(want.as_str())
    {
        return Err(spec_err(format!(
            "output {:?} does not contain {want:?}",
            report.output
        )));
    }
    Ok(report)
}
