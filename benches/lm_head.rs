//! `cargo bench --bench lm_head`: the tied lm_head applied from a `q8_row` embedding table (what the runtime does
//! for a tail with `decoder.tail.final_hidden`), on SmolLM2's vocabulary at the hidden widths of the demo model
//! (256), session 23's wider decoder (384) and SmolLM2-135M (576), on the calling thread alone and with one worker.
//!
//! The table is read whole for every token (49153 x (4 + hidden) bytes), so the numbers are mostly memory
//! bandwidth. Reports numbers; asserts nothing about speed.

use std::time::Instant;

use nuwa::embeddings::{lm_head_workers, Embeddings};
use nuwa::manifest::{EmbeddingDtype, EmbeddingSpec};

const VOCAB: usize = 49153;

fn main() -> anyhow::Result<()> {
    let steps: usize = std::env::var("NUWA_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).filter(|&n| n > 0).unwrap_or(200);
    let dir = std::env::temp_dir().join(format!("nuwa-bench-lm-head-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for cols in [256usize, 384, 576] {
        let row = 4 + cols;
        let mut bytes = Vec::with_capacity(VOCAB * row);
        let mut x = 1u32;
        for r in 0..VOCAB {
            bytes.extend_from_slice(&(0.01 + 1e-6 * r as f32).to_le_bytes());
            for _ in 0..cols {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                bytes.push((x >> 24) as u8);
            }
        }
        let path = dir.join(format!("table-{cols}.bin"));
        std::fs::write(&path, &bytes)?;
        let spec = EmbeddingSpec { file: path.display().to_string(), offset: 0, dtype: EmbeddingDtype::Q8Row, rows: VOCAB, cols };
        let table = Embeddings::open(&path, &spec)?;
        let hidden: Vec<f32> = (0..cols).map(|c| ((c * 37 % 101) as f32 - 50.0) / 20.0).collect();
        let mut logits = vec![0.0f32; VOCAB];
        let workers = lm_head_workers(2, VOCAB)?;
        for (label, pool) in [("1 thread ", None), ("2 threads", workers.as_ref())] {
            for _ in 0..10 {
                table.logits_into(&hidden, &mut logits, pool)?;
            }
            let mut times = Vec::with_capacity(steps);
            for _ in 0..steps {
                let t = Instant::now();
                table.logits_into(&hidden, &mut logits, pool)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            let median = nuwa::bench::median(&mut times);
            println!(
                "lm_head {VOCAB} x {cols:>3} q8_row, {label}: median {median:.3} ms/token, min {:.3} ({steps} runs), {:.1} GB/s of table",
                times[0],
                bytes.len() as f64 / (median * 1e-3) / 1e9
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
