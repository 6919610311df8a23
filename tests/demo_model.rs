//! The trained demo model (models/nuwa-demo) end to end through the real binary, on images no training item used
//! (val2017 backgrounds). These check the model's behaviour, not the runtime's parity (tests/parity.rs does that on
//! the fixtures). The bars sit below what was measured on the held-out set (README, results/nuwa-demo.md: grounding
//! Acc@0.5 0.731 and VQA 0.787 unpruned for phase y with the table lm_head of session 24, 0.727 / 0.787 before; on
//! the slice below 0.711, mean IoU 0.572 (0.576 before), VQA 0.773) and above
//! what earlier or broken weights reach (grounding on the slice: 0.207 for phase g, 0.322 for phase i, 0.405 for
//! phase j, 0.488 for phase k, 0.570 for phase o, 0.628 for phase t, 0.653 for phase u, 0.686 for phase v, 0.694 for
//! phase w; 0.003 for the session-2 weights). VQA at the answer prior, where phase o still was (every count "1",
//! existence at chance), scores 0.41 on the whole set; phase r reached 0.580 on the slice, t 0.622, u 0.672, v 0.714,
//! w 0.723.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn nuwa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nuwa")).current_dir(root()).args(args).output().expect("run nuwa")
}

fn json(o: &Output) -> Value {
    assert!(o.status.success(), "nuwa failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

const MODEL: &str = "models/nuwa-demo";
/// The answer words the demo model is trained on for colour questions (onnx/demo/make_data.py COLORS).
const COLOURS: [&str; 8] = ["red", "green", "blue", "yellow", "purple", "orange", "pink", "white"];
/// 481x640, see examples/README.md. Portrait: LLaVA's expand-to-square pastes it into a 640x640 square at x = 79
/// (`(640 - 481) // 2`, an integer paste offset, as PIL's `paste` takes).
const IMAGE: &str = "examples/shapes-tennis.jpg";
const REC: &str = "Please provide the bounding box coordinate of the region this sentence describes: the purple circle.";

fn run(prompt: &str, extra: &[&str]) -> Value {
    let mut args = vec!["run", "--model", MODEL, "--image", IMAGE, "--prompt", prompt, "--json"];
    args.extend_from_slice(extra);
    json(&nuwa(&args))
}

/// The four numbers of a `[x1, y1, x2, y2]` answer.
fn numbers(text: &str) -> Vec<f64> {
    text.trim().trim_start_matches('[').trim_end_matches(']').split(',').map(|x| x.trim().parse::<f64>().unwrap_or(f64::NAN)).collect()
}

#[test]
fn a_grounding_answer_is_a_box_mapped_back_to_the_original_pixels() {
    let mut last = Value::Null;
    for extra in [&["--prune", "none"][..], &["--prune", "nuwa", "--budget", "64"][..]] {
        let v = run(REC, extra);
        let text = v["text"].as_str().expect("text");
        let n = numbers(text);
        assert!(n.len() == 4 && n.iter().all(|x| (0.0..=1.0).contains(x)), "{extra:?}: not a normalised box: {text:?}");
        assert!(n[0] < n[2] && n[1] < n[3], "{extra:?}: corners out of order: {text:?}");
        assert_eq!(v["finish_reason"], "eos", "{extra:?}: {v}");
        // pad: x = nx * 640 - 79 and y = ny * 640, clamped to the photo.
        let b: Vec<f64> = v["boxes"][0].as_array().expect("a box").iter().map(|x| x.as_f64().expect("number")).collect();
        let want = [n[0] * 640.0 - 79.0, n[1] * 640.0, n[2] * 640.0 - 79.0, n[3] * 640.0].map(|x| x.clamp(0.0, 640.0));
        let want = [want[0].min(481.0), want[1], want[2].min(481.0), want[3]];
        for (got, want) in b.iter().zip(want) {
            assert!((got - want).abs() < 0.05, "{extra:?}: box {b:?} vs {want:?} from {text:?}");
        }
        last = v;
    }
    let s = &last["stats"]; // the Nüwa 64 run
    assert_eq!((s["visual_tokens_in"].as_u64(), s["visual_tokens_after_stage1"].as_u64(), s["visual_tokens_after_stage2"].as_u64()), (Some(576), Some(112), Some(16)), "{s}");
}

#[test]
fn vqa_answers_come_in_the_trained_formats() {
    for (q, ok) in [
        ("Is there a purple circle in the image? Answer the question using a single word or phrase.", &["yes", "no"][..]),
        ("Is there a red star in the image?", &["yes", "no"][..]),
        // The image's one triangle (yellow; phase y answers "yellow", w "blue", a word of the format). Its circle
        // (purple) gets "red0 no" from phases u and v, "red no" from w and "red yes purple" from y (without the
        // suffix; "green" with it): the malformed answers held_out_accuracy_on_a_slice counts (3 of 194 held-out
        // colour answers for y: " purple no" twice, " pink no"; w 4).
        ("What color is the triangle? Answer the question using a single word or phrase.", &COLOURS[..]),
        ("How many squares are there in the image?", &["0", "1", "2", "3", "4"][..]),
    ] {
        let v = run(q, &[]);
        let a = v["text"].as_str().expect("text").trim().to_lowercase();
        assert!(ok.contains(&a.as_str()), "{q:?}: {a:?} is none of {ok:?}");
        assert_eq!(v["finish_reason"], "eos", "{q:?}: {v}");
    }
}

#[test]
fn held_out_accuracy_on_a_slice() {
    // The first 240 held-out items (seed 7, val2017 backgrounds): 121 grounding + 119 VQA.
    let preds = std::env::temp_dir().join(format!("nuwa-demo-slice-{}.jsonl", std::process::id()));
    let preds_arg = preds.to_str().expect("UTF-8 temp path");
    let v = json(&nuwa(&["eval", "--model", MODEL, "--data", "data/heldout/heldout.jsonl", "--limit", "240", "--json", "--quiet", "--predictions", preds_arg]));
    let lines = std::fs::read_to_string(&preds).expect("--predictions file");
    let _ = std::fs::remove_file(&preds);
    assert_eq!(v["unreadable"].as_u64(), Some(0), "{v}");
    assert_eq!((v["n_grounding"].as_u64(), v["n_vqa"].as_u64()), (Some(121), Some(119)), "{v}");
    assert_eq!(v["grounding_no_box"].as_u64(), Some(0), "every grounding answer is a box: {v}");
    let g = v["grounding_acc"].as_f64().expect("grounding_acc");
    let iou = v["grounding_mean_iou"].as_f64().expect("grounding_mean_iou");
    assert!(g >= 0.56, "grounding Acc@0.5 {g:.3} < 0.56 (measured 0.711 for phase y; w 0.694, v 0.686, u 0.653, t 0.628, o 0.570, k 0.488): {v}");
    assert!(iou >= 0.47, "grounding mean IoU {iou:.3} < 0.47 (measured 0.572 for phase y; w 0.560, v 0.563, u 0.542, t 0.536, o 0.459, k 0.390): {v}");
    let q = v["vqa_acc"].as_f64().expect("vqa_acc");
    assert!(q >= 0.60, "VQA accuracy {q:.3} < 0.60 (measured 0.773 for phase y, 0.723 for w, 0.714 for v, 0.672 for u, 0.622 for t, 0.580 for r; answer prior ~0.41): {v}");
    // Answer formats: one word, yes / no, a count or a colour. Phase y writes a stray word after 3 of its 194
    // held-out colour answers (" purple no"; w 4, v, u and t 3), 2 of them in this slice.
    let words: Vec<&str> = ["yes", "no", "0", "1", "2", "3", "4"].into_iter().chain(COLOURS).collect();
    let mut vqa = 0;
    let mut malformed = Vec::new();
    for line in lines.lines() {
        let p: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("--predictions line not JSON ({e}): {line}"));
        if p["kind"] == "vqa" {
            vqa += 1;
            let text = p["text"].as_str().expect("text");
            if !words.contains(&text.trim().to_lowercase().as_str()) {
                malformed.push(text.to_string());
            }
        }
    }
    assert_eq!(vqa, 119, "VQA predictions in the file");
    assert!(malformed.len() <= 4, "{} of 119 VQA answers outside the trained formats: {malformed:?}", malformed.len());
}

#[test]
fn bench_with_its_defaults_runs_on_the_demo_and_checks_every_context_first() {
    // The demo has 1024 positions: the default 1024-token context did not fit, and --json lost the 64 row.
    let model = root().join("models/nuwa-demo");
    let m = model.to_str().expect("utf8");
    let o = nuwa(&["bench", "--model", m, "--steps", "2", "--json"]);
    let v = json(&o);
    let contexts: Vec<u64> = v["decode"].as_array().expect("rows").iter().map(|r| r["context"].as_u64().expect("context")).collect();
    assert_eq!(contexts, [64, 1022], "the longest context the model allows with 2 steps");
    // The last position is usable: 1000 + 24 = 1024.
    assert!(nuwa(&["bench", "--model", m, "--contexts", "1000", "--steps", "24"]).status.success());
    for bad in [["--contexts", "64,2000"], ["--steps", "18446744073709551615"]] {
        let o = nuwa(&[&["bench", "--model", m][..], &bad[..], &["--json"]].concat());
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{bad:?}: {stderr}");
        assert!(stderr.contains("at most the model's 1024 positions") && o.stdout.is_empty(), "{bad:?}: {stderr}");
    }
}
