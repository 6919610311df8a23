//! `cargo bench --bench decode`: per-token decode time at context 64 and 1024 on the committed fixture.
//!
//! The KV cache is appended in place, so the step time may grow only with the attention over the context, not with
//! a copy of the whole cache. Reports numbers; asserts nothing about speed.

use nuwa::pipeline::{LoadOptions, Model};

fn main() -> anyhow::Result<()> {
    let dir = std::env::var("NUWA_BENCH_MODEL").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-llava-clip").into());
    let steps: usize = std::env::var("NUWA_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(64);
    let model = Model::load(&dir, &LoadOptions::default())?;
    println!("model {} ({})", model.manifest().id, dir);
    for context in [64usize, 1024] {
        model.bench_decode(context, 4)?;
        let r = model.bench_decode(context, steps)?;
        println!(
            "decode @ context {:>5}: median {:.3} ms/token, mean {:.3}, min {:.3} ({} steps), prefill {:.1} ms, KV {:.0} KiB",
            r.context, r.median_ms_per_token, r.mean_ms_per_token, r.min_ms_per_token, r.steps, r.prefill_ms, r.kv_bytes as f64 / 1024.0
        );
    }
    Ok(())
}
