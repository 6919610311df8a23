//! Pruning inside the pipeline: every method end to end, the full budget equal to no pruning, Stage 2 shortening
//! the tail's KV cache, and the position convention, on the committed fixtures.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use nuwa::npy::NpyArray;
use nuwa::pipeline::{Generation, GenerationParams, ImageInput, LoadOptions, Model, Output, Request};
use nuwa::prune::{nuwa_stage1, Amount, Method, PositionPolicy, PruneConfig, METHOD_NAMES};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model(id: &str) -> Arc<Model> {
    Model::load(root().join("models").join(id), &LoadOptions { vision_fp32: true, ..Default::default() }).expect("load")
}

fn image() -> ImageInput {
    ImageInput::Path(root().join("examples/coco-000000000139.jpg"))
}

fn run(model: &Arc<Model>, prune: PruneConfig, tokens: usize) -> (Generation, Output) {
    let req = Request {
        image: image(),
        prompt: "Please provide the bounding box coordinate of the region this sentence describes: the person.".into(),
        params: GenerationParams { max_new_tokens: tokens, prune, record: true, ..Default::default() },
    };
    let mut g = model.generate(&req).expect("generate");
    g.run_to_end(|_| true).expect("decode");
    let out = g.output();
    (g, out)
}

fn cfg(method: Method, amount: Amount) -> PruneConfig {
    PruneConfig { method, amount, positions: None, seed: 7, ..Default::default() }
}

#[test]
fn full_budget_is_identical_to_no_pruning() {
    for id in ["tiny-llava-clip", "tiny-llava-dinov2"] {
        let m = model(id);
        let n = m.manifest().vision.num_tokens();
        let (_, none) = run(&m, PruneConfig::default(), 12);
        for method in [Method::Nuwa, Method::FastV, Method::VisionZip, Method::DivPrune, Method::Dart, Method::Pool, Method::Random] {
            for amount in [Amount::Budget(n), Amount::Keep { keep1: n, keep2: n }] {
                let (_, full) = run(&m, cfg(method, amount), 12);
                assert_eq!(full.tokens, none.tokens, "{id} {method} {amount:?}");
                assert_eq!(full.text, none.text);
                assert_eq!(full.stats.visual_tokens_kept, n);
            }
        }
    }
}

#[test]
fn every_method_runs_with_the_counts_its_budget_resolves_to() {
    let m = model("tiny-llava-clip");
    let v = &m.manifest().vision;
    let n = v.num_tokens();
    for name in METHOD_NAMES {
        let method: Method = name.parse().expect("method");
        let prune = if method == Method::None { PruneConfig::default() } else { cfg(method, Amount::Budget(64)) };
        let r = prune.resolve(v.grid_h, v.grid_w).expect("resolve");
        let (g, out) = run(&m, prune, 4);
        let s = &out.stats;
        assert_eq!(s.method, name);
        assert_eq!(s.visual_tokens_in, n);
        assert_eq!(s.visual_tokens_after_stage1, r.stage1.unwrap_or(n), "{name}");
        assert_eq!(s.visual_tokens_after_stage2, r.stage2.unwrap_or(s.visual_tokens_after_stage1), "{name}");
        assert_eq!(s.kept_stage1.len(), s.visual_tokens_after_stage1);
        assert_eq!(s.kept_stage2.len(), s.visual_tokens_after_stage2);
        assert!(s.kept_stage1.iter().all(|&k| k < n));
        assert!(s.kept_stage2.iter().all(|k| s.kept_stage1.contains(k)), "{name}: stage 2 keeps a subset of stage 1");
        if r.positions == PositionPolicy::Original {
            assert!(s.kept_stage1.windows(2).all(|w| w[0] < w[1]), "{name}: kept indices sorted and unique");
        }
        assert_eq!(out.tokens.len(), 4, "{name}");
        let trace = g.trace().expect("trace");
        assert_eq!(trace.stage1.tokens.nrows(), s.visual_tokens_after_stage1);
        assert_eq!(trace.image_embeds.nrows(), s.visual_tokens_after_stage1);
    }
    assert_eq!(METHOD_NAMES.len(), 8);
}

#[test]
fn nuwa_budget_presets_prune_both_stages_and_shorten_the_tail_cache() {
    let m = model("tiny-llava-clip");
    let d = &m.manifest().decoder;
    let row_bytes = 2 * d.num_key_value_heads * d.head_dim * 4;
    let (_, none) = run(&m, PruneConfig::default(), 6);
    let mut previous = 0;
    for budget in [64, 128, 192] {
        let (g, out) = run(&m, cfg(Method::Nuwa, Amount::Budget(budget)), 6);
        let s = &out.stats;
        assert!(s.visual_tokens_after_stage1 < s.visual_tokens_in, "budget {budget}");
        assert!(s.visual_tokens_after_stage2 < s.visual_tokens_after_stage1, "budget {budget}");
        assert!(s.visual_tokens_after_stage1 > previous, "larger budgets keep more");
        previous = s.visual_tokens_after_stage1;
        // The head holds every Stage-1 token; the tail only the Stage-2 survivors.
        let trace = g.trace().expect("trace");
        let cached = trace.layout.len() + out.tokens.len() - 1;
        assert_eq!(s.kv_bytes_per_head_layer, cached * row_bytes);
        let tail_cached = cached - (s.visual_tokens_after_stage1 - s.visual_tokens_after_stage2);
        assert_eq!(s.kv_bytes_per_tail_layer, tail_cached * row_bytes);
        assert!(s.kv_bytes_per_tail_layer < s.kv_bytes_per_head_layer);
        assert!(s.kv_bytes_per_head_layer < none.stats.kv_bytes_per_head_layer, "stage 1 shortens the head cache too");
        // Pillars and aggregated anchors are both present.
        let pillars = trace.stage1.pillar.as_ref().expect("pillar flags");
        assert!(pillars.iter().any(|&p| p) && pillars.iter().any(|&p| !p));
    }
}

#[test]
fn pruned_tokens_keep_original_positions_and_text_continues_as_if_unpruned() {
    let m = model("tiny-llava-clip");
    let n = m.manifest().vision.num_tokens();
    let (g, out) = run(&m, cfg(Method::Nuwa, Amount::Budget(64)), 3);
    let t = g.trace().expect("trace");
    let span = t.layout.image_span.clone();
    for (k, &raster) in out.stats.kept_stage1.iter().enumerate() {
        assert_eq!(t.layout.positions[span.start + k], (span.start + raster) as i64);
    }
    let after = t.layout.positions[span.end];
    assert_eq!(after, (span.start + n) as i64, "text after the image starts where it would without pruning");
    let unpruned = t.layout.len() - span.len() + n;
    assert_eq!(t.layout.next_position, unpruned as i64, "decoding continues at the unpruned prompt length");

    // The contiguous policy (VisionZip's) re-indexes instead.
    let prune = PruneConfig { positions: Some(PositionPolicy::Contiguous), ..cfg(Method::Nuwa, Amount::Budget(64)) };
    let (g, _) = run(&m, prune, 3);
    let t = g.trace().expect("trace");
    let span = t.layout.image_span.clone();
    let expected: Vec<i64> = (0..t.layout.len() as i64).collect();
    assert_eq!(t.layout.positions, expected);
    assert_eq!(t.layout.next_position, t.layout.len() as i64);
    assert!(span.len() < n);
}

#[test]
fn stage1_in_the_pipeline_is_the_pure_function_on_the_vision_signals() {
    let m = model("tiny-llava-clip");
    let v = &m.manifest().vision;
    let prune = cfg(Method::Nuwa, Amount::Budget(128));
    let r = prune.resolve(v.grid_h, v.grid_w).expect("resolve");
    let (g, _) = run(&m, prune, 2);
    let t = g.trace().expect("trace");
    let plan = nuwa::prune::PrunePlan { top_n: r.top_n, keep1: r.stage1.expect("stage 1"), keep2: 1 };
    let out = nuwa_stage1(
        t.vision.cls_attention.as_deref().expect("cls"),
        t.vision.similarity.view(),
        t.vision.features.view(),
        v.grid_h,
        v.grid_w,
        &plan.stage1_config(v.grid_h, v.grid_w),
    )
    .expect("stage 1");
    assert_eq!(out.kept, t.stage1.kept);
    assert_eq!(out.tokens, t.stage1.tokens);
    // Stage 2 is the top of the attention row over the image span.
    let rel = t.stage2.as_ref().expect("stage 2 ran");
    let row = &t.attention_row[t.layout.image_span.clone()];
    let worst_kept = rel.iter().map(|&k| row[k]).fold(f32::INFINITY, f32::min);
    let best_dropped = (0..row.len()).filter(|k| !rel.contains(k)).map(|k| row[k]).fold(f32::NEG_INFINITY, f32::max);
    assert!(worst_kept >= best_dropped);
}

fn nuwa_cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nuwa")).args(args).output().expect("run nuwa")
}

#[test]
fn cli_dump_and_viz_write_what_the_request_used() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("dump-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let viz = dir.join("viz.png");
    let model_dir = root().join("models/tiny-llava-clip");
    let img = root().join("examples/coco-000000000139.jpg");
    let out = nuwa_cli(&[
        "run", "--model", model_dir.to_str().expect("utf8"), "--image", img.to_str().expect("utf8"), "--prompt", "Describe the image.",
        "--max-tokens", "3", "--prune", "nuwa", "--budget", "64", "--json", "--dump", dir.to_str().expect("utf8"), "--viz", viz.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let s = &v["stats"];
    for key in ["visual_tokens_after_stage1", "visual_tokens_after_stage2", "stage1_ms", "stage2_ms", "kept_stage1", "kept_stage2"] {
        assert!(s.get(key).is_some(), "missing stats.{key}");
    }
    let kept1: Vec<i64> = s["kept_stage1"].as_array().expect("array").iter().map(|x| x.as_i64().expect("int")).collect();
    assert_eq!(NpyArray::read(dir.join("stage1_kept.npy")).expect("npy").to_i64(), Some(kept1));
    let kept2: Vec<i64> = s["kept_stage2"].as_array().expect("array").iter().map(|x| x.as_i64().expect("int")).collect();
    assert_eq!(NpyArray::read(dir.join("stage2_kept.npy")).expect("npy").to_i64(), Some(kept2));
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).expect("index")).expect("json");
    for name in ["pixel_values", "vision_features", "vision_cls_attention", "vision_similarity", "stage1_pillar", "stage1_tokens", "image_embeds", "stage2_attention_row", "prompt_positions"] {
        let file = index["arrays"][name]["file"].as_str().unwrap_or_else(|| panic!("index lacks {name}"));
        assert!(dir.join(file).is_file(), "{file}");
    }
    // The arrays hold what the request used, not only the right names: Stage 1's pillars are the tower's features
    // at their anchors unchanged and its collectors are not; the projector output has one row per kept token.
    let npy = |name: &str| NpyArray::read(dir.join(format!("{name}.npy"))).expect(name);
    let (features, tokens, embeds) = (npy("vision_features").to_f32(), npy("stage1_tokens").to_f32(), npy("image_embeds").to_f32());
    let pillar = npy("stage1_pillar");
    let pillar: Vec<bool> = match &pillar.data {
        nuwa::npy::NpyData::U8(v) => v.iter().map(|&b| b == 1).collect(),
        other => panic!("pillar flags are u8, not {other:?}"),
    };
    let kept1 = NpyArray::read(dir.join("stage1_kept.npy")).expect("npy").to_i64().expect("i64");
    assert_eq!(features.shape(), &[s["visual_tokens_in"].as_u64().expect("n") as usize, features.shape()[1]]);
    assert_eq!(tokens.shape(), &[kept1.len(), features.shape()[1]]);
    assert_eq!(embeds.shape()[0], kept1.len());
    assert_ne!(embeds, tokens, "the projector's output, not its input");
    assert!(pillar.iter().any(|p| *p) && pillar.iter().any(|p| !p));
    for (r, (&k, &p)) in kept1.iter().zip(&pillar).enumerate() {
        let same = (0..features.shape()[1]).all(|c| tokens[[r, c]] == features[[k as usize, c]]);
        assert_eq!(same, p, "row {r} (patch {k}): pillar {p}");
    }
    assert_eq!(npy("prompt_positions").shape, npy("prompt_ids").shape);

    // The visualisation is the photo with the pruned cells dimmed and the kept ones framed, not the photo.
    let png = image::open(&viz).expect("viz png").to_rgb8();
    assert_eq!((png.width(), png.height()), (400, 266), "drawn on the original image");
    let photo = image::open(&img).expect("photo").to_rgb8();
    let brightness = |im: &image::RgbImage| im.pixels().map(|p| p.0.iter().map(|&c| f64::from(c)).sum::<f64>()).sum::<f64>();
    assert!(brightness(&png) < 0.8 * brightness(&photo), "16 of 81 cells kept: most of the image is dimmed");
    let yellow = |im: &image::RgbImage| im.pixels().filter(|p| p.0[0] > 220 && p.0[1] > 200 && p.0[2] < 60).count();
    assert!(yellow(&png) > yellow(&photo) + 100, "pillar frames: {} yellow pixels against {}", yellow(&png), yellow(&photo));

    // The same directory again, unpruned, from an image whose path is not UTF-8 (before: a panic after the
    // answer, and the pruned run's stage1_pillar.npy left beside the new arrays).
    use std::os::unix::ffi::OsStrExt;
    let odd = dir.join(std::ffi::OsStr::from_bytes(b"t\xffiny.jpg"));
    std::fs::copy(&img, &odd).expect("copy");
    std::fs::write(dir.join("notes.txt"), "mine").expect("write");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_nuwa"));
    cmd.args(["run", "--model", model_dir.to_str().expect("utf8"), "--prompt", "Describe the image.", "--max-tokens", "2", "--dump"]);
    let out = cmd.arg(&dir).arg("--image").arg(&odd).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).expect("index")).expect("json");
    assert!(index["request"]["image"].as_str().expect("image").ends_with("t\u{fffd}iny.jpg"), "{}", index["request"]);
    assert!(index["arrays"].get("stage1_pillar").is_none() && !dir.join("stage1_pillar.npy").exists(), "stale array left");
    assert!(dir.join("stage1_kept.npy").is_file() && dir.join("notes.txt").is_file() && viz.is_file(), "only the old arrays go");
}

#[test]
fn cli_rejects_unknown_methods_and_invalid_budgets() {
    let model_dir = root().join("models/tiny-llava-clip");
    let img = root().join("examples/coco-000000000139.jpg");
    let base = ["run", "--model", model_dir.to_str().expect("utf8"), "--image", img.to_str().expect("utf8"), "--prompt", "Hi"];
    let cases: [(&[&str], &str); 12] = [
        (&["--prune", "fastest", "--budget", "64"], "unknown pruning method"),
        (&["--prune", "nuwa", "--budget", "50"], "64, 128 and 192"),
        (&["--prune", "nuwa"], "--budget"),
        (&["--prune", "nuwa", "--keep1", "4", "--keep2", "9"], "--keep2"),
        // Checked on the counts as typed: before, 200/300 on the 81-token grid clamped to 81/81 and ran unpruned.
        (&["--prune", "nuwa", "--keep1", "200", "--keep2", "300"], "--keep2 300 exceeds --keep1 200"),
        // A count the method does not use is refused: before, FastV ran 81 -> 3 and DivPrune 81 -> 10.
        (&["--prune", "fastv", "--keep1", "10", "--keep2", "3"], "FastV has no Stage 1"),
        (&["--prune", "divprune", "--keep1", "10", "--keep2", "3"], "--keep2 must equal --keep1"),
        (&["--prune", "fastv", "--budget", "64", "--stage2-select", "random"], "Nüwa options"),
        (&["--prune", "random", "--budget", "64", "--no-region-separation"], "Nüwa options"),
        (&["--prune", "nuwa", "--budget", "64", "--stage2-select", "best"], "unknown Stage-2 selection"),
        // Nothing pruned, nothing to renumber: before, the option was accepted and had no effect.
        (&["--positions", "contiguous"], "needs a pruning method"),
        (&["--prune", "none", "--positions", "original"], "needs a pruning method"),
    ];
    for (extra, needle) in cases {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let out = nuwa_cli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} succeeded");
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn vision_fp32_loads_the_named_graph_or_is_refused() {
    // Before, the demo (int8 tower only) ran quantised without a word, and `info` named the int8 graph on a
    // fixture whose fp32 graph had been loaded.
    let demo = root().join("models/nuwa-demo");
    let img = root().join("examples/shapes-tennis.jpg");
    let out = nuwa_cli(&["run", "--model", demo.to_str().expect("utf8"), "--image", img.to_str().expect("utf8"), "--prompt", "Hi", "--vision-fp32"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("names no vision.fp32_file") && stderr.contains("vision.int8.onnx"), "{stderr}");
    let fixture = root().join("models/tiny-llava-clip");
    for (extra, file) in [(None, "vision.int8.onnx"), (Some("--vision-fp32"), "vision.onnx")] {
        let mut args = vec!["info", "--model", fixture.to_str().expect("utf8")];
        args.extend(extra);
        let out = nuwa_cli(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.lines().any(|l| l.starts_with("vision ") && l.contains(&format!(" {file} ("))), "{extra:?}: {stdout}");
    }
}

#[test]
fn a_prepared_image_serves_many_requests_with_the_same_results() {
    let m = model("tiny-llava-clip");
    let limits = nuwa::image::ImageLimits::default();
    let prepared = m.prepare(&image(), &limits).expect("prepare");
    for (prompt, prune) in [
        ("Describe the image.", PruneConfig::default()),
        ("What is on the table?", cfg(Method::Nuwa, Amount::Budget(64))),
        ("Describe the image.", cfg(Method::VisionZip, Amount::Budget(128))),
    ] {
        let params = GenerationParams { max_new_tokens: 5, prune: prune.clone(), ..Default::default() };
        let mut a = m.generate_prepared(&prepared, prompt, &params).expect("prepared");
        a.run_to_end(|_| true).expect("decode");
        let req = Request { image: image(), prompt: prompt.into(), params };
        let mut b = m.generate(&req).expect("full request");
        b.run_to_end(|_| true).expect("decode");
        let (a, b) = (a.output(), b.output());
        assert_eq!(a.tokens, b.tokens, "{prompt} {prune:?}");
        assert_eq!(a.stats.kept_stage2, b.stats.kept_stage2);
        assert!(a.stats.ttft_ms >= a.stats.vision_ms, "ttft counts the preparation");
    }
}

#[test]
fn one_image_prefix_serves_many_prompts_like_fresh_requests() {
    // The prefix's KV is forked per request: reusing it (in any order) must give exactly what a request with its
    // own prefix gets, logits included, and leave it unchanged for the next prompt.
    let limits = nuwa::image::ImageLimits::default();
    let prompts = [
        "Please provide the bounding box coordinate of the region this sentence describes: the person.",
        "What is on the table?",
        "Please provide the bounding box coordinate of the region this sentence describes: the person.",
    ];
    for id in ["tiny-llava-clip", "tiny-llava-dinov2"] {
        let m = model(id);
        let segments = m.segments().len();
        let prepared = m.prepare(&image(), &limits).expect("prepare");
        for prune in [
            PruneConfig::default(),
            cfg(Method::Nuwa, Amount::Budget(64)),
            cfg(Method::FastV, Amount::Budget(64)),
            cfg(Method::VisionZip, Amount::Budget(128)),
        ] {
            let prefix = m.image_prefix(&prepared, &prune).expect("prefix");
            assert!(prefix.shared_tokens() > 0, "{id} {prune:?}: the LLaVA template shares BOS + USER + image");
            let in_decoder = matches!(prune.method, Method::Nuwa | Method::FastV);
            if in_decoder {
                assert!(prefix.shared_segments() < segments, "{id} {prune:?}: layers after the pruning point differ per prompt");
            } else {
                assert_eq!(prefix.shared_segments(), segments, "{id} {prune:?}: nothing prunes inside the decoder");
            }
            for prompt in prompts {
                let params = GenerationParams { max_new_tokens: 6, prune: prune.clone(), ..Default::default() };
                let mut shared = m.generate_with_prefix(&prefix, prompt, &params).expect("shared");
                let mut fresh = m.generate_prepared(&prepared, prompt, &params).expect("fresh");
                let (ls, lf) = (shared.peek_logits().unwrap().to_vec(), fresh.peek_logits().unwrap().to_vec());
                assert_eq!(ls, lf, "{id} {prune:?} {prompt}: first logits");
                shared.run_to_end(|_| true).expect("decode");
                fresh.run_to_end(|_| true).expect("decode");
                let (a, b) = (shared.output(), fresh.output());
                assert_eq!(a.tokens, b.tokens, "{id} {prune:?} {prompt}");
                assert_eq!(a.stats.kept_stage2, b.stats.kept_stage2);
                assert_eq!(a.stats.prompt_tokens, b.stats.prompt_tokens);
            }
        }
        let other = m.image_prefix(&prepared, &cfg(Method::Pool, Amount::Budget(64))).expect("prefix");
        let params = GenerationParams { prune: PruneConfig::default(), ..Default::default() };
        let err = m.generate_with_prefix(&other, prompts[0], &params).err().expect("mismatched setting").to_string();
        assert!(err.contains("image prefix was built for"), "{err}");
    }
}

#[test]
fn fastv_prunes_at_its_early_cut_and_nuwa_at_the_split() {
    // tiny-llava-dinov2 is exported with a FastV cut: head [0,1), middle [1,3), tail [3,4).
    let m = model("tiny-llava-dinov2");
    let d = &m.manifest().decoder;
    assert_eq!((d.head_end(), d.split_layer, d.num_layers), (1, 3, 4));
    let row = 2 * d.num_key_value_heads * d.head_dim * 4;
    let n = m.manifest().vision.num_tokens();

    let (g, out) = run(&m, cfg(Method::FastV, Amount::Budget(64)), 4);
    let s = &out.stats;
    let full = g.trace().expect("trace").layout.len() + out.tokens.len() - 1;
    let dropped = n - s.visual_tokens_after_stage2;
    assert!(dropped > 0);
    assert_eq!(s.stage2_layer, Some(1));
    // Layer 0 holds every token; layers 1 and 2 (head group) and layer 3 (tail) only FastV's survivors.
    assert_eq!(s.kv_bytes_head, (full + 2 * (full - dropped)) * row);
    assert_eq!(s.kv_bytes_tail, (full - dropped) * row);
    assert_eq!(g.trace().expect("trace").attention_row.len(), full - out.tokens.len() + 1, "the layer-0 row over the prompt");

    let (g, out) = run(&m, cfg(Method::Nuwa, Amount::Budget(64)), 4);
    let s = &out.stats;
    let full = g.trace().expect("trace").layout.len() + out.tokens.len() - 1;
    let dropped2 = s.visual_tokens_after_stage1 - s.visual_tokens_after_stage2;
    assert!(dropped2 > 0);
    assert_eq!(s.stage2_layer, Some(3));
    // Nüwa: Stage 1 already shortened the prompt; Stage 2 acts only at the split (layer 3).
    assert_eq!(s.kv_bytes_head, 3 * full * row);
    assert_eq!(s.kv_bytes_tail, (full - dropped2) * row);
}

#[test]
fn a_caller_that_stops_early_is_told_stopped_not_max_tokens() {
    use nuwa::pipeline::{FinishReason, Step};
    let m = model("tiny-llava-clip");
    let req = |max_new_tokens| Request {
        image: image(),
        prompt: "Describe the image.".into(),
        params: GenerationParams { max_new_tokens, ..Default::default() },
    };
    let mut full = m.generate(&req(8)).expect("generate");
    full.run_to_end(|_| true).expect("decode");
    let full = full.output();
    assert!(full.tokens.len() >= 3, "the fixture should generate a few tokens: {:?}", full.finish_reason);

    // Pull two tokens, then stop.
    let mut g = m.generate(&req(8)).expect("generate");
    for _ in 0..2 {
        assert!(matches!(g.step().expect("step"), Step::Token { .. }));
    }
    assert!(matches!(g.stop().expect("stop"), Step::Finished { reason: FinishReason::Stopped, .. }));
    assert!(g.is_finished());
    assert_eq!(g.step().expect("step"), Step::Finished { reason: FinishReason::Stopped, text: String::new() });
    let out = g.output();
    assert_eq!(out.finish_reason, Some(FinishReason::Stopped));
    assert_eq!(out.tokens, full.tokens[..2]);
    assert_eq!(out.stats.generated_tokens, 2, "stats are final");

    // A sink that refuses the first piece of text.
    let mut g = m.generate(&req(8)).expect("generate");
    g.run_to_end(|_| false).expect("decode");
    let out = g.output();
    assert_eq!(out.finish_reason, Some(FinishReason::Stopped));
    assert!(out.tokens.len() < full.tokens.len() && full.tokens.starts_with(&out.tokens));

    // Stopping a generation that already ended keeps its reason.
    let mut g = m.generate(&req(1)).expect("generate");
    g.run_to_end(|_| true).expect("decode");
    let before = g.output().finish_reason;
    assert!(before.is_some());
    assert_eq!(g.stop().expect("stop"), Step::Finished { reason: before.unwrap(), text: String::new() });
    assert_eq!(g.output().finish_reason, before);
}

#[test]
fn a_model_serves_generations_from_several_threads_with_the_same_results() {
    fn shareable<T: Send + Sync>() {}
    fn movable<T: Send>() {}
    shareable::<Model>();
    shareable::<nuwa::pipeline::PreparedImage>();
    shareable::<nuwa::pipeline::ImagePrefix>();
    movable::<Generation>();

    let m = model("tiny-llava-clip");
    let settings = [PruneConfig::default(), cfg(Method::Nuwa, Amount::Keep { keep1: 40, keep2: 12 }), cfg(Method::FastV, Amount::Keep { keep1: 81, keep2: 20 })];
    let alone: Vec<Output> = settings.iter().map(|p| run(&m, p.clone(), 10).1).collect();
    // The same requests at once, each on its own thread, twice over; a generation started on one thread and
    // finished on another too.
    let together: Vec<Output> = std::thread::scope(|s| {
        let handles: Vec<_> = settings.iter().chain(settings.iter()).map(|p| s.spawn(|| run(&m, p.clone(), 10).1)).collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    for (i, out) in together.iter().enumerate() {
        let want = &alone[i % settings.len()];
        assert_eq!((&out.tokens, &out.text, &out.boxes), (&want.tokens, &want.text, &want.boxes), "setting {}", i % settings.len());
    }
    let req = Request {
        image: image(),
        prompt: "Please provide the bounding box coordinate of the region this sentence describes: the person.".into(),
        params: GenerationParams { max_new_tokens: 10, prune: settings[1].clone(), ..Default::default() },
    };
    let mut g = m.generate(&req).expect("generate");
    g.step().expect("first token here");
    let out = std::thread::spawn(move || {
        g.run_to_end(|_| true).expect("decode there");
        g.output()
    })
    .join()
    .expect("thread");
    assert_eq!(out.tokens, alone[1].tokens);
}

#[test]
fn a_generation_whose_step_failed_keeps_failing_instead_of_finishing() {
    use nuwa::pipeline::FinishReason;
    // tiny-llava-dinov2 with every embedding row NaN but the prompt's: the prefill runs, and the first generated
    // token's row is refused when it is read (the table's values are checked where a row is read).
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("nan-embeddings-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let from = root().join("models").join("tiny-llava-dinov2");
    for entry in std::fs::read_dir(&from).expect("fixture") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_file() {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy");
        }
    }
    let prompt = "Describe the image.";
    let clean = Model::load(&dir, &LoadOptions::default()).expect("load");
    let n = clean.manifest().vision.num_tokens();
    let all: Vec<usize> = (0..n).collect();
    let ids = nuwa::prompt::layout(clean.tokenizer(), clean.manifest(), prompt, &all, n).expect("layout").ids;
    let (cols, offset) = (clean.manifest().embeddings.cols, clean.manifest().embeddings.offset as usize);
    drop(clean);
    let table = dir.join("embed_tokens.f16.bin");
    let mut bytes = std::fs::read(&table).expect("table");
    let rows = (bytes.len() - offset) / (2 * cols);
    for r in (0..rows).filter(|&r| !ids.contains(&(r as u32))) {
        let at = offset + r * 2 * cols;
        bytes[at..at + 2 * cols].copy_from_slice(&half::f16::NAN.to_le_bytes().repeat(cols));
    }
    std::fs::write(&table, bytes).expect("write");
    let m = Model::load(&dir, &LoadOptions::default()).expect("load");
    let params = GenerationParams { max_new_tokens: 16, ..Default::default() };
    let mut g = m.generate(&Request { image: image(), prompt: prompt.into(), params }).expect("generate");
    let first = loop {
        match g.step() {
            Err(e) => break e.to_string(),
            Ok(_) => assert!(!g.is_finished(), "finished without reading a poisoned row"),
        }
    };
    assert!(first.contains("NaN") && first.contains("embedding row"), "{first}");
    assert!(g.is_finished());
    // Before, the next pull reported a normal end (max_tokens) with no tokens.
    for again in [g.step().expect_err("step after a failure"), g.stop().expect_err("stop after a failure")] {
        let e = again.to_string();
        assert!(e.contains("failed earlier") && e.contains(&first), "{e}");
    }
    let out = g.output();
    assert_eq!(out.finish_reason, None::<FinishReason>);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn prepared_images_and_prefixes_stay_with_their_model_and_ignore_an_unread_seed() {
    let limits = nuwa::image::ImageLimits::default();
    let (clip, dino) = (model("tiny-llava-clip"), model("tiny-llava-dinov2"));
    // Same feature width, other tower, preprocessing and resize: before, this ran and mapped boxes with the wrong
    // geometry.
    let prepared = dino.prepare(&image(), &limits).expect("prepare");
    let params = GenerationParams { max_new_tokens: 2, ..Default::default() };
    let e = clip.generate_prepared(&prepared, "What is this?", &params).err().expect("another model's image").to_string();
    assert!(e.contains("prepared by model \"tiny-llava-dinov2\"") && e.contains("\"tiny-llava-clip\""), "{e}");
    let prefix = dino.image_prefix(&prepared, &PruneConfig::default()).expect("prefix");
    let e = clip.generate_with_prefix(&prefix, "What is this?", &params).err().expect("another model's prefix").to_string();
    assert!(e.contains("prepared by model"), "{e}");

    // The seed belongs to `random` alone: a prefix serves another seed for every other method, not for random.
    let prepared = clip.prepare(&image(), &limits).expect("prepare");
    for method in [Method::Nuwa, Method::FastV, Method::Pool, Method::Random] {
        let prune = cfg(method, Amount::Budget(64));
        let prefix = clip.image_prefix(&prepared, &prune).expect("prefix");
        let params = GenerationParams { max_new_tokens: 2, prune: PruneConfig { seed: prune.seed + 1, ..prune.clone() }, ..Default::default() };
        let r = clip.generate_with_prefix(&prefix, "What is this?", &params);
        assert_eq!(r.is_ok(), method != Method::Random, "{method}: {:?}", r.err());
    }
}

#[test]
fn a_huge_token_limit_reserves_only_what_the_context_allows() {
    // Before, the KV caches reserved prompt + max_new_tokens rows up front: 10^9 aborted the process on allocation.
    let m = model("tiny-llava-clip");
    for max_new_tokens in [1_000_000_000, usize::MAX] {
        let params = GenerationParams { max_new_tokens, ..Default::default() };
        let mut g = m.generate(&Request { image: image(), prompt: "Describe the image.".into(), params }).expect("generate");
        for _ in 0..3 {
            g.step().expect("step");
        }
        g.stop().expect("stop");
    }
}

#[test]
fn decode_time_per_token_divides_by_the_decoder_runs() {
    use nuwa::pipeline::FinishReason;
    let m = model("tiny-llava-clip");
    let req = |max_new_tokens| Request { image: image(), prompt: "Describe the image.".into(), params: GenerationParams { max_new_tokens, ..Default::default() } };
    // Ended by the limit: 5 tokens, the last not fed back, 4 decoder runs.
    let mut g = m.generate(&req(5)).expect("generate");
    g.run_to_end(|_| true).expect("decode");
    let out = g.output();
    assert_eq!((out.finish_reason, out.tokens.len()), (Some(FinishReason::MaxTokens), 5));
    let runs = out.stats.decode_ms / out.stats.decode_ms_per_token;
    assert!((runs - 4.0).abs() < 1e-6, "{runs}");
    // Stopped after 3 tokens: each was fed back, 3 runs (before: divided by 2).
    let mut g = m.generate(&req(50)).expect("generate");
    for _ in 0..3 {
        g.step().expect("step");
    }
    g.stop().expect("stop");
    let out = g.output();
    assert_eq!((out.finish_reason, out.tokens.len()), (Some(FinishReason::Stopped), 3));
    let runs = out.stats.decode_ms / out.stats.decode_ms_per_token;
    assert!((runs - 3.0).abs() < 1e-6, "{runs}");
}

#[test]
fn nuwa_ablations_run_through_the_pipeline() {
    use nuwa::prune::Stage2Select;
    let m = model("tiny-llava-clip");
    let published = cfg(Method::Nuwa, Amount::Budget(128));
    let (_, a) = run(&m, published.clone(), 3);
    let (_, r) = run(&m, PruneConfig { stage2_select: Some(Stage2Select::Random), ..published.clone() }, 3);
    // Random Stage 2: Stage 1 as published, as many Stage-2 tokens, drawn from Stage 1's, not the attention's.
    assert_eq!(r.stats.kept_stage1, a.stats.kept_stage1);
    assert_eq!(r.stats.kept_stage2.len(), a.stats.kept_stage2.len());
    assert!(r.stats.kept_stage2.iter().all(|k| a.stats.kept_stage1.contains(k)));
    assert_ne!(r.stats.kept_stage2, a.stats.kept_stage2);
    // No region separation: as many anchors, chosen otherwise on this image.
    let (_, g) = run(&m, PruneConfig { regions: Some(false), ..published }, 3);
    assert_eq!(g.stats.kept_stage1.len(), a.stats.kept_stage1.len());
    assert_ne!(g.stats.kept_stage1, a.stats.kept_stage1);
}
