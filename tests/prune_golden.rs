//! Stage-1/Stage-2 pruning against the numpy reference's goldens (tests/golden/prune/, written by
//! `onnx/reference/make_prune_goldens.py`): kept indices and pillar flags exactly equal, aggregated tokens within
//! 1e-5 (relative above magnitude 1, for the real model's larger features).

use std::path::{Path, PathBuf};

use ndarray::Array2;
use nuwa::npy::NpyArray;
use nuwa::prune::{default_radius_sq, nuwa_stage1, nuwa_stage2, Budget, Stage1Config};
use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/prune")
}

fn read(rel: &Value) -> NpyArray {
    let rel = rel.as_str().expect("file path in index.json");
    NpyArray::read(dir().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn f32s(rel: &Value) -> Vec<f32> {
    read(rel).to_f32().iter().copied().collect()
}

fn matrix(rel: &Value) -> Array2<f32> {
    let a = read(rel);
    let (rows, cols) = (a.shape[0], a.shape.get(1).copied().unwrap_or(1));
    a.to_f32().into_shape_with_order((rows, cols)).expect("2-D golden")
}

fn indices(rel: &Value) -> Vec<usize> {
    read(rel).to_i64().expect("integer golden").into_iter().map(|v| v as usize).collect()
}

fn usize_of(v: &Value) -> usize {
    v.as_u64().expect("integer in index.json") as usize
}

#[test]
fn prune_goldens_match_the_reference() {
    let index: Value = serde_json::from_str(&std::fs::read_to_string(dir().join("index.json")).expect("index.json"))
        .expect("index.json parses");
    let cases = index["cases"].as_array().expect("cases");
    assert!(cases.len() >= 12, "expected the full golden set, found {} cases", cases.len());
    for c in cases {
        let name = c["name"].as_str().expect("name");
        let (h, w) = (usize_of(&c["grid_h"]), usize_of(&c["grid_w"]));
        let cfg = Stage1Config {
            pillar_quantile: c["pillar_quantile"].as_f64().expect("quantile"),
            ..Stage1Config::new(h, w, usize_of(&c["top_n"]), usize_of(&c["keep"]))
        };
        let radius = c["radius_sq"].as_f64().expect("radius");
        assert!((cfg.proximity_radius_sq - radius).abs() < 1e-9, "{name}: radius rule differs from the reference");
        assert_eq!(default_radius_sq(h, w), cfg.proximity_radius_sq);

        let metric = f32s(&c["metric"]);
        let (sim, feat) = (matrix(&c["similarity"]), matrix(&c["features"]));
        let out = nuwa_stage1(&metric, sim.view(), feat.view(), h, w, &cfg).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(out.kept, indices(&c["kept"]), "{name}: kept indices");
        let pillar: Vec<bool> = indices(&c["pillar"]).into_iter().map(|p| p != 0).collect();
        assert_eq!(out.pillar, pillar, "{name}: pillar flags");
        let want = matrix(&c["tokens"]);
        assert_eq!(out.tokens.dim(), want.dim(), "{name}: token shape");
        let mut worst = 0.0f32;
        for (a, b) in out.tokens.iter().zip(want.iter()) {
            worst = worst.max((a - b).abs() / b.abs().max(1.0));
        }
        assert!(worst <= 1e-5, "{name}: aggregated tokens differ by {worst:e}");

        let s2 = &c["stage2"];
        let row = f32s(&s2["attention_row"]);
        let span = s2["span"].as_array().expect("span");
        let span = usize_of(&span[0])..usize_of(&span[1]);
        let kept2 = nuwa_stage2(&row, span, usize_of(&s2["keep"])).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(kept2, indices(&s2["kept"]), "{name}: stage-2 kept");
        println!("{name}: ok ({} kept, worst relative error {worst:e})", out.kept.len());
    }
}

#[test]
fn budget_cases_use_the_presets() {
    for (b, name) in [(Budget::B64, "budget64"), (Budget::B128, "budget128"), (Budget::B192, "budget192")] {
        let plan = b.plan(24, 24).expect("plan");
        let index: Value =
            serde_json::from_str(&std::fs::read_to_string(dir().join("index.json")).expect("index.json"))
                .expect("json");
        let c = index["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .find(|c| c["name"].as_str().is_some_and(|n| n.starts_with(name)))
            .expect("budget case");
        assert_eq!(plan.top_n, usize_of(&c["top_n"]));
        assert_eq!(plan.keep1, usize_of(&c["keep"]));
        assert_eq!(plan.keep2, usize_of(&c["stage2"]["keep"]));
    }
}
