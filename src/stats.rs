//! Per-request timings, token counts and memory figures.

use serde::Serialize;

/// What one request cost, stage by stage.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Execution provider running the sessions.
    pub provider: String,
    /// Pruning method.
    pub method: String,
    /// Position convention of the kept visual tokens.
    pub positions: String,
    /// Image decoding and preprocessing.
    pub preprocess_ms: f64,
    /// Vision tower.
    pub vision_ms: f64,
    /// Stage-1 pruning (near 0 without pruning: only the copy of the features).
    pub stage1_ms: f64,
    /// Projector.
    pub projector_ms: f64,
    /// Prompt prefill through head and tail, Stage 2 included.
    pub prefill_ms: f64,
    /// Stage-2 pruning (near 0 without in-decoder pruning).
    pub stage2_ms: f64,
    /// First decoder layer that sees only the Stage-2 (or FastV) selection; None when no in-decoder pruning ran.
    pub stage2_layer: Option<usize>,
    /// From the first sampled token to the end: every decoder run on a generated token, and the sampling.
    pub decode_ms: f64,
    /// `decode_ms` per decoder run on a generated token (each token fed back to the model; a generation that ends
    /// by EOS or a stop fed back all of its tokens, one ended by the limit or the context all but the last).
    pub decode_ms_per_token: f64,
    /// From the start of the request to the first sampled token.
    pub ttft_ms: f64,
    /// Visual tokens the vision tower produced.
    pub visual_tokens_in: usize,
    /// Visual tokens after Stage 1 (what the decoder head sees).
    pub visual_tokens_after_stage1: usize,
    /// Visual tokens after Stage 2 (what the decoder tail sees).
    pub visual_tokens_after_stage2: usize,
    /// Visual tokens the last decoder layer attends to.
    pub visual_tokens_kept: usize,
    /// Original raster indices of the tokens Stage 1 kept (what the decoder head sees), in sequence order.
    pub kept_stage1: Vec<usize>,
    /// Original raster indices of the tokens Stage 2 kept (what the decoder tail sees).
    pub kept_stage2: Vec<usize>,
    /// Prompt tokens, visual tokens included, as the decoder head sees them.
    pub prompt_tokens: usize,
    /// Tokens generated (the end-of-sequence token excluded).
    pub generated_tokens: usize,
    /// KV cache bytes held by the head layers at the end of the request.
    pub kv_bytes_head: usize,
    /// KV cache bytes held by the tail layers at the end of the request.
    pub kv_bytes_tail: usize,
    /// KV bytes per head layer.
    pub kv_bytes_per_head_layer: usize,
    /// KV bytes per tail layer.
    pub kv_bytes_per_tail_layer: usize,
    /// Peak resident memory of the process (Linux: VmHWM), if known.
    pub peak_rss_mb: Option<f64>,
}

/// Peak resident set size of this process in MiB (Linux only).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Milliseconds since `t`.
pub fn ms_since(t: std::time::Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
