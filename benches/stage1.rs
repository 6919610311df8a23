//! `cargo bench --bench stage1`: Nüwa Stage-1 time on LLaVA-1.5-sized inputs (576 tokens, 1024-wide features) for
//! each budget, next to the vision encoder time it saves on.
//!
//! The encoder timed is `NUWA_BENCH_VISION=path.onnx`, else the demo model's tower (the real DINOv2-small int8 at
//! 336 px, 576 tokens, committed under models/nuwa-demo), else the fixture's. Reports numbers; asserts nothing
//! about speed.

use std::path::PathBuf;
use std::time::Instant;

use ndarray::Array2;
use nuwa::prune::{nuwa_stage1, Budget};
use nuwa::runtime::{Runtime, SessionOptions};
use ort::session::SessionInputValue;
use ort::value::Tensor;

/// Deterministic pseudo-random values in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let (gh, gw, d) = (24usize, 24usize, 1024usize);
    let n = gh * gw;
    let metric: Vec<f32> = noise(n, 1).iter().map(|x| x.abs()).collect();
    let similarity = Array2::from_shape_vec((n, d), noise(n * d, 2))?;
    let features = Array2::from_shape_vec((n, d), noise(n * d, 3))?;
    let runs = 20;
    let mut stage1 = Vec::new();
    for budget in [Budget::B64, Budget::B128, Budget::B192] {
        let plan = budget.plan(gh, gw)?;
        let cfg = plan.stage1_config(gh, gw);
        nuwa_stage1(&metric, similarity.view(), features.view(), gh, gw, &cfg)?;
        let mut times: Vec<f64> = (0..runs)
            .map(|_| {
                let t = Instant::now();
                let out = nuwa_stage1(&metric, similarity.view(), features.view(), gh, gw, &cfg);
                std::hint::black_box(out).map(|_| t.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<_, _>>()?;
        let m = nuwa::bench::median(&mut times);
        println!("stage 1, budget {budget} (keep {} of {n}, {d}-wide): median {m:.3} ms over {runs} runs", plan.keep1);
        stage1.push((budget, m));
    }

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let vision = std::env::var_os("NUWA_BENCH_VISION")
        .map(PathBuf::from)
        // The demo model's tower is the real DINOv2-small int8 at 336 px (576 tokens), committed with the repository.
        .or_else(|| Some(root.join("models/nuwa-demo/vision.int8.onnx")).filter(|p| p.is_file()))
        .unwrap_or_else(|| root.join("models/tiny-llava-clip/vision.int8.onnx"));
    let rt = Runtime::get(None, None)?;
    let mut opened = rt.open("vision", &vision, "bench vision graph", &SessionOptions::default())?;
    let input = opened.session.inputs()[0].name().to_string();
    let dims: Vec<usize> = opened.session.inputs()[0]
        .dtype()
        .tensor_shape()
        .map(|s| s.iter().map(|&x| x.max(1) as usize).collect())
        .unwrap_or_default();
    let pixels = Tensor::from_array((dims.clone(), noise(dims.iter().product(), 4)))?;
    let mut times = Vec::new();
    for i in 0..12 {
        let t = Instant::now();
        let out = opened.session.run(vec![(input.as_str(), SessionInputValue::from(&pixels))])?;
        drop(out);
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let enc = nuwa::bench::median(&mut times);
    println!("vision encoder {} on {dims:?}: median {enc:.2} ms", vision.display());
    for (budget, m) in stage1 {
        println!("stage 1 at budget {budget} = {:.2}% of the encoder time", 100.0 * m / enc);
    }
    Ok(())
}
