//! `nuwa eval`: the instrument, not the model. The fixtures have random weights (accuracy ~0), so scoring, parsing
//! and the table arithmetic are tested on synthetic answers, and the command end to end on tests/data/eval/mini.jsonl
//! for its counts, fields and files.
//!
//! mini.jsonl: lines 1 and 6 grounding, 2 and 8 VQA, 9 VQA on a file that is not an image (fails at run time);
//! 3 malformed JSON, 4 a missing image, 5 blank, 7 an inverted box.

use std::path::{Path, PathBuf};
use std::process::{Command, Output as ProcessOutput};

use nuwa::eval::progress::{format_duration, render};
use nuwa::eval::{
    check_box_in_image, data::parse_line, iou, kept_share, label, metrics::vqa_correct, normalize_answer, parse_sweep, retention, score, Dataset,
    Expected, ItemKind, ItemResult, RunResult, Score, Summary, Table, Unreadable, DEFAULT_SWEEP, target_cells,
};
use nuwa::prune::{Amount, Method, PositionPolicy, PruneConfig, METHOD_NAMES};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn mini() -> PathBuf {
    root().join("tests/data/eval/mini.jsonl")
}

fn tmp(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    dir.join(name)
}

fn nuwa(args: &[&str]) -> ProcessOutput {
    Command::new(env!("CARGO_BIN_EXE_nuwa")).current_dir(root()).args(args).output().expect("run nuwa")
}

fn stderr(o: &ProcessOutput) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json_stdout(o: &ProcessOutput) -> Value {
    assert!(o.status.success(), "nuwa failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

fn lines_of(v: &Value) -> Vec<u64> {
    v.as_array().expect("array").iter().map(|u| u["line"].as_u64().expect("line")).collect()
}

// ---------------------------------------------------------------- scoring

#[test]
fn iou_of_known_boxes() {
    let a = [0.0, 0.0, 10.0, 10.0];
    assert_eq!(iou(a, a), 1.0);
    assert_eq!(iou(a, [20.0, 20.0, 30.0, 30.0]), 0.0);
    assert_eq!(iou(a, [10.0, 0.0, 20.0, 10.0]), 0.0, "touching edges do not overlap");
    assert!((iou(a, [5.0, 0.0, 15.0, 10.0]) - 50.0 / 150.0).abs() < 1e-12);
    assert!((iou(a, [0.0, 0.0, 5.0, 10.0]) - 0.5).abs() < 1e-12, "a half inside");
    assert_eq!(iou(a, [2.0, 2.0, 2.0, 8.0]), 0.0, "an empty box");
    assert_eq!(iou([0.0; 4], [0.0; 4]), 0.0, "two empty boxes: no division by zero");
    assert_eq!(iou(a, [f64::NAN, 0.0, 5.0, 5.0]), 0.0);
    assert_eq!(iou(a, [0.0, 0.0, f64::INFINITY, 10.0]), 0.0);
    assert_eq!(iou([3.0, 1.0, 9.0, 4.0], [1.0, 2.0, 5.0, 8.0]), iou([1.0, 2.0, 5.0, 8.0], [3.0, 1.0, 9.0, 4.0]));
}

#[test]
fn target_cells_of_a_box_on_the_grid() {
    // 336 px input, 24x24 grid of 14 px cells: a box over cells x 2..=4, y 1..=2 (centres 35, 49, 63 / 21, 35).
    assert_eq!(target_cells([28.0, 14.0, 70.0, 42.0], 336, 336, 24, 24), [26, 27, 28, 50, 51, 52]);
    // Too small to hold a centre: the cell under its centre.
    assert_eq!(target_cells([15.0, 15.0, 18.0, 18.0], 336, 336, 24, 24), [25]);
    // The whole input; reversed corners are ordered; outside or NaN gives nothing.
    assert_eq!(target_cells([0.0, 0.0, 336.0, 336.0], 336, 336, 24, 24).len(), 576);
    assert_eq!(target_cells([70.0, 42.0, 28.0, 14.0], 336, 336, 24, 24).len(), 6);
    assert!(target_cells([400.0, 400.0, 401.0, 401.0], 336, 336, 24, 24).is_empty());
    assert!(target_cells([f32::NAN, 0.0, 10.0, 10.0], 336, 336, 24, 24).is_empty());
    assert_eq!(kept_share(&[26, 27, 28, 50], &[1, 27, 50, 100]), Some(0.5));
    assert_eq!(kept_share(&[26, 27, 28, 50], &[100, 50, 27, 1]), Some(0.5), "kept in any order");
    assert_eq!(kept_share(&[], &[1]), None);
    // A grid whose size overflows (a caller's garbage) used to panic on the index arithmetic.
    assert!(target_cells([100.0, 290.0, 101.0, 291.0], 336, 336, usize::MAX / 2, 3).is_empty());
}

#[test]
fn answers_are_normalised() {
    assert_eq!(normalize_answer("Yes."), "yes");
    assert_eq!(normalize_answer("  Two   RED-circles!\n"), "2 red circles");
    assert_eq!(normalize_answer("It's blue."), "it s blue");
    assert_eq!(normalize_answer("\"Zero\"; ten, twenty, twentyone"), "0 10 20 twentyone");
    assert_eq!(normalize_answer("ÉTÉ"), "été");
    assert_eq!(normalize_answer("...?!"), "");
    assert_eq!(normalize_answer(""), "");
}

#[test]
fn vqa_matching_rules() {
    // yes/no: the first word of the answer only.
    assert!(vqa_correct("yes", "Yes, there is a red circle.").0);
    assert!(vqa_correct("No", "no").0);
    assert!(!vqa_correct("yes", "no, yes").0);
    assert!(!vqa_correct("yes", "").0);
    assert!(!vqa_correct("no", "There is no red circle.").0, "the first word is what counts");
    // other answers: the whole normalised answer.
    assert!(vqa_correct("red", "Red.").0);
    assert!(!vqa_correct("red", "red circle").0);
    assert!(vqa_correct("dark blue", "Dark-blue").0);
    // number words on both sides.
    assert!(vqa_correct("two", "2").0);
    assert!(vqa_correct("2", "Two.").0);
    assert!(!vqa_correct("2", "3").0);
    let (_, got) = vqa_correct("yes", "YES! It is.");
    assert_eq!(got, "yes");
}

#[test]
fn grounding_scores_the_first_box_only() {
    let bbox = [100.0, 100.0, 200.0, 200.0];
    let e = Expected::Grounding { bbox };
    let good = [100.0, 100.0, 200.0, 200.0];
    let bad = [300.0, 300.0, 400.0, 400.0];
    let s = score(&e, "no box here", &[]);
    assert_eq!(s, Score { correct: false, iou: None, predicted_box: None, normalized: None });
    assert!(score(&e, "", &[good, bad]).correct);
    let s = score(&e, "", &[bad, good]);
    assert!(!s.correct);
    assert_eq!(s.iou, Some(0.0));
    // Exactly 0.5 is correct; just below is not.
    assert!(score(&e, "", &[[100.0, 100.0, 150.0, 200.0]]).correct);
    assert!(!score(&e, "", &[[100.0, 100.0, 149.0, 200.0]]).correct);
    // The text is irrelevant for grounding, the boxes for VQA.
    let v = Expected::Vqa { answer: "yes".into() };
    assert!(!score(&v, "no", &[good]).correct);
    assert!(score(&v, "yes", &[]).correct);
}

/// The scoring path from generated text, through the runtime's box mapping (padding to a square, 126 px model
/// input), to a verdict, with a synthetic `Output` standing in for a model that answers well.
#[test]
fn a_synthetic_output_is_scored_through_the_box_mapping() {
    let m = nuwa::manifest::Manifest::load(root().join("models/tiny-llava-clip")).expect("manifest");
    // coco-000000000139.jpg is 400x266: padded to 400x400, 67 px on top, so the image spans y in [67, 333] / 400.
    let resize = nuwa::image::ResizeRecord::new(&m.image, 400, 266).expect("record");
    let bad = nuwa::image::ImageConfig { width: 0, ..m.image.clone() };
    assert!(nuwa::image::ResizeRecord::new(&bad, 400, 266).is_err(), "a zero-width config gave infinite scales");
    let text = "The vase is at [0.25, 0.5, 0.75, 0.75].".to_string();
    let boxes: Vec<[f32; 4]> =
        nuwa::boxes::extract_boxes(&text, &m.box_format, &resize).into_iter().map(|b| b.original).collect();
    let out = nuwa::Output { text, boxes, tokens: vec![], finish_reason: None, resize, stats: Default::default() };
    // [0.25, 0.5, 0.75, 0.75] of 400x400 is x 100..300, y 200..300 padded, i.e. y 133..233 in the photo.
    let right = Expected::Grounding { bbox: [100.0, 133.0, 300.0, 233.0] };
    let s = score(&right, &out.text, &out.boxes);
    assert!(s.correct && s.iou.is_some_and(|v| v > 0.97), "{s:?}");
    // The same box without the padding offset (y 200..300) overlaps by 33 of 167 rows: wrong.
    let unpadded = Expected::Grounding { bbox: [100.0, 200.0, 300.0, 300.0] };
    assert!(!score(&unpadded, &out.text, &out.boxes).correct);

    // The answer's box is its first group of four numbers: a malformed first box is no box, not rescued by a
    // later one (before, `[1.2, ...]` was skipped and the second box scored).
    let first = |t: &str| nuwa::boxes::first_box(t, &m.box_format, &resize).map(|b| b.original);
    let rescued = "[0.10, 0.10, 1.20, 0.90] or [0.25, 0.5, 0.75, 0.75]";
    assert_eq!(nuwa::boxes::extract_boxes(rescued, &m.box_format, &resize).len(), 1, "the valid box is still found");
    assert_eq!(first(rescued), None);
    assert!(!score(&right, rescued, first(rescued).as_slice()).correct);
    // A first box wholly in the padding (y < 67 / 400) has no area on the photo: no box either.
    assert_eq!(first("[0.1, 0.0, 0.9, 0.1] [0.25, 0.5, 0.75, 0.75]"), None);
    // Text in other brackets does not count as a box; the first four-number group does.
    let ok = first("[the vase] at [0.25, 0.5, 0.75, 0.75], not [0.0, 0.5, 0.1, 0.6]");
    assert!(score(&right, "", ok.as_slice()).correct, "{ok:?}");
}

// ---------------------------------------------------------------- data

#[test]
fn lines_parse_and_unknown_fields_are_ignored() {
    let base = Path::new("/data");
    let item = parse_line(
        r#"{"image": "a.jpg", "kind": "grounding", "prompt": "p", "bbox": [1, 2.5, 30, 40], "answer": "x", "expr": "the red circle", "extra": {"k": [1]}}"#,
        7,
        base,
    )
    .expect("grounding");
    assert_eq!(item.line, 7);
    assert_eq!(item.image, Path::new("/data/a.jpg"));
    assert_eq!(item.prompt, "p");
    assert_eq!(item.expected, Expected::Grounding { bbox: [1.0, 2.5, 30.0, 40.0] });
    assert_eq!(item.qtype, None);
    let item = parse_line(r#"{"image": "b.png", "kind": "vqa", "prompt": "How many?", "answer": 3, "qtype": "count"}"#, 1, base)
        .expect("vqa");
    assert_eq!(item.expected, Expected::Vqa { answer: "3".into() });
    assert_eq!(item.qtype.as_deref(), Some("count"));
    let e = parse_line(r#"{"image": "b.png", "kind": "vqa", "prompt": "q", "answer": "no", "qtype": 3}"#, 1, base).unwrap_err();
    assert!(e.contains("\"qtype\" must be a string"), "{e}");
    // A whole number written as a float (Python's json.dumps(2.0)) is that number; before, "2.0" never matched "2".
    for (raw, want) in [("2.0", "2"), ("1e3", "1000"), ("-0.0", "0"), ("2.5", "2.5"), ("7", "7")] {
        let line = format!(r#"{{"image": "b.png", "kind": "vqa", "prompt": "How many?", "answer": {raw}}}"#);
        assert_eq!(parse_line(&line, 1, base).expect("vqa").expected, Expected::Vqa { answer: want.into() }, "{raw}");
    }
    let abs = parse_line(r#"{"image": "/abs/c.png", "kind": "vqa", "prompt": "q", "answer": "no"}"#, 1, base).expect("abs");
    assert_eq!(abs.image, Path::new("/abs/c.png"));
}

#[test]
fn bad_lines_say_what_is_wrong() {
    let base = Path::new(".");
    for (line, needle) in [
        (r#"{"image": "a.jpg", "kind": "vqa", "prompt": "q""#, "malformed JSON"),
        ("not json", "malformed JSON"),
        ("[1, 2, 3]", "not a JSON object"),
        (r#"{"kind": "vqa", "prompt": "q", "answer": "yes"}"#, "missing field \"image\""),
        (r#"{"image": "a.jpg", "kind": "vqa", "answer": "yes"}"#, "missing field \"prompt\""),
        (r#"{"image": "a.jpg", "prompt": "q", "answer": "yes"}"#, "missing field \"kind\""),
        (r#"{"image": "a.jpg", "kind": "vqa", "prompt": "  ", "answer": "yes"}"#, "\"prompt\" is empty"),
        (r#"{"image": 5, "kind": "vqa", "prompt": "q", "answer": "yes"}"#, "\"image\" must be a string"),
        (r#"{"image": "a.jpg", "kind": "caption", "prompt": "q"}"#, "unknown kind"),
        (r#"{"image": "a.jpg", "kind": "vqa", "prompt": "q"}"#, "without \"answer\""),
        (r#"{"image": "a.jpg", "kind": "vqa", "prompt": "q", "answer": "?!"}"#, "empty after normalisation"),
        (r#"{"image": "a.jpg", "kind": "vqa", "prompt": "q", "answer": ["yes"]}"#, "must be a string"),
        (r#"{"image": "a.jpg", "kind": "grounding", "prompt": "q"}"#, "without \"bbox\""),
        (r#"{"image": "a.jpg", "kind": "grounding", "prompt": "q", "bbox": [1, 2, 3]}"#, "must be [x1, y1, x2, y2]"),
        (r#"{"image": "a.jpg", "kind": "grounding", "prompt": "q", "bbox": [1, 2, "3", 4]}"#, "must be [x1, y1, x2, y2]"),
        (r#"{"image": "a.jpg", "kind": "grounding", "prompt": "q", "bbox": {"x": 1}}"#, "must be [x1, y1, x2, y2]"),
        (r#"{"image": "a.jpg", "kind": "grounding", "prompt": "q", "bbox": [5, 2, 3, 4]}"#, "inverted"),
        (r#"{"image": "a.jpg", "kind": "grounding", "prompt": "q", "bbox": [1, 2, 1, 4]}"#, "empty"),
        (r#"{"image": "a.jpg", "kind": "grounding", "prompt": "q", "bbox": [-1, 2, 3, 4]}"#, "negative"),
        (r#"{"image": "a.jpg", "kind": "grounding", "prompt": "q", "bbox": [1, 2, 3, 1e999]}"#, "malformed JSON"),
    ] {
        let e = parse_line(line, 1, base).expect_err(line);
        assert!(e.contains(needle), "{line}: {e}");
    }
    // A huge value is not echoed in full.
    let long = format!(r#"{{"image": "a.jpg", "kind": "grounding", "prompt": "q", "bbox": [{}]}}"#, vec!["1"; 5000].join(","));
    assert!(parse_line(&long, 1, base).expect_err("long").len() < 200);
}

#[test]
fn the_committed_data_is_counted_line_by_line() {
    let d = Dataset::load(mini(), None).expect("load");
    assert_eq!(d.items.iter().map(|i| i.line).collect::<Vec<_>>(), [1, 2, 6, 8, 9]);
    assert_eq!(d.unreadable.iter().map(|u| u.line).collect::<Vec<_>>(), [3, 4, 7]);
    assert!(d.unreadable[1].reason.contains("does-not-exist.jpg") && d.unreadable[1].reason.contains("not found"));
    assert_eq!((d.n_grounding(), d.n_vqa()), (2, 3));
    assert!(d.items[0].image.is_file(), "paths are relative to the data file");
    // --limit counts non-blank lines, usable or not.
    let d = Dataset::load(mini(), Some(3)).expect("load");
    assert_eq!(d.items.len() + d.unreadable.len(), 3);
    assert_eq!(d.unreadable.iter().map(|u| u.line).collect::<Vec<_>>(), [3]);
    let e = Dataset::load(mini(), Some(0)).expect_err("limit 0");
    assert!(e.to_string().contains("limit of 0"), "{e}");
}

#[test]
fn a_file_without_items_is_an_error_not_an_empty_table() {
    for (name, bytes) in [("empty.jsonl", &b""[..]), ("blank.jsonl", &b"\n  \r\n\t\n"[..])] {
        let path = tmp(name);
        std::fs::write(&path, bytes).expect("write");
        let e = Dataset::load(&path, None).expect_err(name).to_string();
        assert!(e.contains(name) && e.contains("no items"), "{e}");
    }
}

#[test]
fn invalid_utf8_crlf_and_a_missing_file() {
    let path = tmp("bytes.jsonl");
    let img = root().join("examples/coco-000000000139.jpg");
    let good = format!(r#"{{"image": {:?}, "kind": "vqa", "prompt": "q", "answer": "yes"}}"#, img.display().to_string());
    let mut bytes = Vec::new();
    bytes.extend_from_slice(good.as_bytes());
    bytes.extend_from_slice(b"\r\n\xff\xfe{\"image\"\n\r\n   \n");
    bytes.extend_from_slice(good.as_bytes());
    std::fs::write(&path, bytes).expect("write");
    let d = Dataset::load(&path, None).expect("load");
    assert_eq!(d.items.iter().map(|i| i.line).collect::<Vec<_>>(), [1, 5]);
    assert_eq!(d.unreadable, vec![Unreadable { line: 2, reason: d.unreadable[0].reason.clone() }]);
    assert!(d.unreadable[0].reason.contains("UTF-8"));
    // A byte-order mark before the first line (Windows editors) is not JSON: before, line 1 was "malformed".
    let bom = tmp("bom.jsonl");
    std::fs::write(&bom, [&b"\xef\xbb\xbf"[..], good.as_bytes(), b"\n", good.as_bytes()].concat()).expect("write");
    let d = Dataset::load(&bom, None).expect("load");
    assert_eq!((d.items.len(), d.unreadable.len()), (2, 0), "{:?}", d.unreadable);
    let e = Dataset::load(tmp("absent.jsonl"), None).expect_err("missing file");
    assert!(e.to_string().contains("absent.jsonl"), "{e}");
    // The OS error is in the message once and not repeated as a source (anyhow's "{:#}" prints both).
    let chain = format!("{:#}", anyhow::Error::new(e));
    assert_eq!(chain.matches("os error").count(), 1, "{chain}");
}

// ---------------------------------------------------------------- sweep and table

#[test]
fn sweep_specs() {
    let t = PruneConfig { seed: 9, positions: Some(PositionPolicy::Original), ..Default::default() };
    let all = parse_sweep("default", &t).expect("default");
    // A blank spec (an unset shell variable) is refused, not taken for the longest run there is.
    for blank in ["", "  "] {
        let e = parse_sweep(blank, &t).unwrap_err().to_string();
        assert!(e.contains("the sweep is empty"), "{e}");
    }
    // Separators alone ("$A;$B" with both unset) name no setting: before, `none` ran alone.
    for empty in [";", " ; ;"] {
        let e = parse_sweep(empty, &t).unwrap_err().to_string();
        assert!(e.contains("names no setting"), "{empty:?}: {e}");
    }
    assert_eq!(parse_sweep("none", &t).expect("none alone is a setting").len(), 1);
    assert_eq!(all, parse_sweep(DEFAULT_SWEEP, &t).expect("default"));
    assert_eq!(all.len(), 1 + 7 * 3);
    assert_eq!(label(&all[0]), "none");
    for name in METHOD_NAMES.iter().skip(1) {
        let name = if *name == "visionzip" { "visionzip+positions=original" } else { name };
        for b in [64, 128, 192] {
            assert!(all.iter().any(|c| label(c) == format!("{name}:{b}")), "{name}:{b}");
        }
    }
    // A --positions given with the sweep reaches every pruned row; the unpruned row has nothing to renumber, and
    // every row resolves (before, none carried it, which a request now refuses).
    assert!(all.iter().all(|c| c.seed == 9));
    assert_eq!(all[0].positions, None);
    assert!(all[1..].iter().all(|c| c.positions == Some(PositionPolicy::Original)));
    for c in &all {
        c.resolve(24, 24).unwrap_or_else(|e| panic!("{}: {e}", label(c)));
    }
    let s = parse_sweep(" nuwa:64 ; fastv ;nuwa:64;none", &t).expect("spec");
    assert_eq!(s.iter().map(label).collect::<Vec<_>>(), ["none", "nuwa:64", "fastv:64", "fastv:128", "fastv:192"]);
    assert_eq!(s[1].amount, Amount::Budget(64));
    // Ablation options ride on the method and come back in the label.
    let d = PruneConfig::default();
    let s = parse_sweep(
        "nuwa+pillar=0:64,k112/112;visionzip+contextual=0+positions=original:64,128;nuwa:64;visionzip:64;nuwa+regions=0:64;nuwa+stage2=random:64",
        &d,
    )
    .expect("options");
    let labels = [
        "none",
        "nuwa+pillar=0:64",
        "nuwa+pillar=0:k112/112",
        "visionzip+positions=original+contextual=0:64",
        "visionzip+positions=original+contextual=0:128",
        "nuwa:64",
        "visionzip:64",
        "nuwa+regions=0:64",
        "nuwa+stage2=random:64",
    ];
    assert_eq!(s.iter().map(label).collect::<Vec<_>>(), labels);
    assert_eq!((s[1].pillar_quantile, s[1].contextual, s[3].contextual, s[5].pillar_quantile), (Some(0.0), None, Some(0), None));
    assert_eq!((s[2].amount, s[3].positions, s[6].positions), (Amount::Keep { keep1: 112, keep2: 112 }, Some(PositionPolicy::Original), None));
    // A label read back as a sweep entry gives the same setting.
    for c in &s[1..] {
        assert_eq!(parse_sweep(&label(c), &d).expect("label")[1], *c, "{}", label(c));
    }
    // A method's own position convention named explicitly is the same setting, run once (before: two rows
    // labelled nuwa:64, the work done twice, and --resume refusing the file).
    let s = parse_sweep(
        "nuwa:64;nuwa+positions=original:64;visionzip+positions=contiguous:64;visionzip:64;nuwa+regions=1+stage2=attention:64",
        &d,
    )
    .expect("same");
    assert_eq!(s.iter().map(label).collect::<Vec<_>>(), ["none", "nuwa:64", "visionzip:64"]);
    for (bad, needle) in [
        ("none:64", "none takes no budgets"),
        // Before, `none+positions=contiguous` was taken for `none` (same label) and the option dropped.
        ("none+positions=contiguous", "none takes no options"),
        ("none+pillar=0", "none takes no options"),
        ("nuwa:6x", "not a number"),
        ("nuwa:", "not a number"),
        ("fast:64", "unknown pruning method"),
        ("nuwa+pillar:64", "KEY=VALUE"),
        ("nuwa+pillar=x:64", "not a number"),
        ("nuwa+depth=2:64", "unknown option"),
        ("nuwa+regions=2:64", "regions=\"2\""),
        ("nuwa+regions=no:64", "regions=\"no\""),
        ("nuwa+stage2=top:64", "unknown Stage-2 selection \"top\""),
        ("nuwa:k112", "kN/M"),
        ("nuwa:k1x/2", "kN/M"),
        ("visionzip+positions=diagonal:64", "\"visionzip+positions=diagonal:64\": unknown position policy"),
    ] {
        let e = parse_sweep(bad, &t).expect_err(bad).to_string();
        assert!(e.contains(needle), "{bad}: {e}");
    }
}

fn item(kind: ItemKind, correct: bool, ttft: f64, kept: usize) -> ItemResult {
    let grounding = kind == ItemKind::Grounding;
    ItemResult {
        line: 1,
        kind,
        score: Score {
            correct,
            iou: grounding.then_some(if correct { 0.8 } else { 0.1 }),
            predicted_box: grounding.then_some([0.0, 0.0, 1.0, 1.0]),
            normalized: None,
        },
        text: String::new(),
        ttft_ms: ttft,
        visual_tokens_kept: kept,
        visual_tokens_after_stage1: kept * 2,
        target_kept_stage1: grounding.then_some(if correct { 1.0 } else { 0.5 }),
        target_kept_stage2: grounding.then_some(if correct { 0.5 } else { 0.0 }),
        qtype: None,
    }
}

fn run(method: Method, amount: Amount, grounding: &[bool], vqa: &[bool]) -> RunResult {
    let mut items: Vec<ItemResult> = grounding.iter().map(|&c| item(ItemKind::Grounding, c, 10.0, 8)).collect();
    items.extend(vqa.iter().map(|&c| item(ItemKind::Vqa, c, 20.0, 8)));
    RunResult { prune: PruneConfig { method, amount, ..Default::default() }, items, unreadable: vec![] }
}

#[test]
fn retention_arithmetic() {
    assert_eq!(retention(Some(0.4), Some(0.8)), Some(50.0));
    assert_eq!(retention(Some(0.9), Some(0.6)), Some(150.0));
    assert_eq!(retention(Some(0.0), Some(0.5)), Some(0.0));
    assert_eq!(retention(Some(0.3), Some(0.0)), None, "unpruned accuracy 0: null, not inf");
    assert_eq!(retention(Some(0.0), Some(0.0)), None, "0/0: null, not NaN");
    assert_eq!(retention(None, Some(0.5)), None);
    assert_eq!(retention(Some(0.5), None), None);
    // the unpruned row against itself: 100 exactly, not 99.99999999999999 (what 100 * a / a gives for 434 / 587)
    let a = 434.0 / 587.0;
    assert_eq!(retention(Some(a), Some(a)), Some(100.0));
    assert_eq!(retention(Some(f64::NAN), Some(0.5)), None);
}

#[test]
fn summaries_and_the_table() {
    let none = run(Method::None, Amount::All, &[true, true, false, true], &[true, false]);
    let nuwa = run(Method::Nuwa, Amount::Budget(64), &[true, false, false, false], &[true, true]);
    let mut only_vqa = run(Method::Pool, Amount::Keep { keep1: 10, keep2: 10 }, &[], &[false]);
    only_vqa.unreadable = vec![Unreadable { line: 4, reason: "image x not found".into() }];
    let t = Table::new("m", Path::new("d.jsonl"), Some("nuwa eval ...".into()), 32, 6, &[none, nuwa, only_vqa]);
    let [r0, r1, r2] = &t.rows[..] else { panic!("3 rows") };
    assert_eq!((r0.n_grounding, r0.n_vqa, r0.grounding_correct, r0.vqa_correct), (4, 2, 3, 1));
    assert_eq!((r0.grounding_acc, r0.vqa_acc), (Some(0.75), Some(0.5)));
    assert_eq!((r0.grounding_retention, r0.vqa_retention), (Some(100.0), Some(100.0)));
    assert_eq!(r0.mean_ttft_ms, Some((4.0 * 10.0 + 2.0 * 20.0) / 6.0));
    assert_eq!((r0.mean_visual_tokens_kept, r0.mean_visual_tokens_after_stage1), (Some(8.0), Some(16.0)));
    assert!((r0.grounding_mean_iou.expect("iou") - (0.8 * 3.0 + 0.1) / 4.0).abs() < 1e-12);
    assert_eq!(r0.grounding_no_box, 0);
    assert_eq!((r1.label.as_str(), r1.method.as_str(), r1.budget), ("nuwa:64", "nuwa", Some(64)));
    assert_eq!(r1.grounding_acc, Some(0.25));
    assert!((r1.grounding_retention.expect("retention") - 100.0 / 3.0).abs() < 1e-9);
    assert_eq!(r1.vqa_retention, Some(200.0));
    assert_eq!((r2.budget, r2.keep1, r2.keep2), (None, Some(10), Some(10)));
    assert_eq!((r2.grounding_acc, r2.grounding_retention, r2.grounding_mean_iou), (None, None, None), "no grounding items");
    assert_eq!((r2.vqa_acc, r2.vqa_retention), (Some(0.0), Some(0.0)));
    assert_eq!(r2.unreadable, 1);

    let md = t.markdown();
    // target kept: grounding items only (3 right at 1.0 / 0.5, 1 wrong at 0.5 / 0.0)
    assert_eq!((r0.target_kept_stage1, r0.target_kept_stage2), (Some(0.875), Some(0.375)));
    assert_eq!((r2.target_kept_stage1, r2.target_kept_stage2), (None, None));
    assert!(md.contains("| none | - | 16 -> 8 | 0.750 | 100.0% | 0.500 | 100.0% | 88% / 38% | 13.3 | 4 / 2 | 0 |"), "{md}");
    assert!(md.contains("| nuwa | 64 | 16 -> 8 | 0.250 | 33.3% | 1.000 | 200.0% |"), "{md}");
    assert!(md.contains("| pool | 10/10 | 16 -> 8 | n/a | n/a | 0.000 | 0.0% | n/a / n/a |"), "{md}");
    assert!(md.contains("Command: `nuwa eval ...`"));

    // Files: a trailing .md on the stem is dropped; JSON has nulls, never NaN.
    let (md_path, json_path) = t.write(&tmp("tables/sub/run.md")).expect("write");
    assert_eq!(md_path, tmp("tables/sub/run.md"));
    assert_eq!(json_path, tmp("tables/sub/run.json"));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(json_path).expect("json")).expect("parse");
    assert_eq!(v["rows"][2]["grounding_retention"], Value::Null);
    assert_eq!(v["rows"][2]["unreadable_items"][0]["line"], 4);
    assert_eq!(v["rows"].as_array().map(Vec::len), Some(3));
}

#[test]
fn accuracy_and_retention_by_item_type_when_the_data_has_qtype() {
    let typed = |mut r: RunResult, types: &[&str]| {
        for (i, q) in r.items.iter_mut().zip(types) {
            i.qtype = Some(q.to_string());
        }
        r
    };
    // Grounding: attr, attr, position, a|b; VQA: count, count.
    let types = ["attr", "attr", "position", "a|b", "count", "count"];
    let none = typed(run(Method::None, Amount::All, &[true, true, false, true], &[true, false]), &types);
    let nuwa = typed(run(Method::Nuwa, Amount::Budget(64), &[true, false, true, false], &[true, true]), &types);
    let t = Table::new("m", Path::new("d.jsonl"), None, 32, 6, &[none, nuwa]);
    let attr = &t.rows[1].by_qtype["grounding/attr"];
    assert_eq!((attr.n, attr.correct, attr.acc, attr.retention), (2, 1, Some(0.5), Some(50.0)));
    let pos = &t.rows[1].by_qtype["grounding/position"];
    assert_eq!((pos.acc, pos.retention), (Some(1.0), None), "unpruned 0 on the type: no retention");
    assert_eq!(t.rows[1].by_qtype["vqa/count"].retention, Some(200.0));
    let md = t.markdown();
    assert!(md.contains("| method | budget | grounding/attr (n=2) | grounding/a\\|b (n=1) | grounding/position (n=1) | vqa/count (n=2) |"), "{md}");
    assert!(md.contains("| none | - | 1.000 | 1.000 | 0.000 | 0.500 |"), "{md}");
    assert!(md.contains("| nuwa | 64 | 0.500 (50%) | 0.000 (0%) | 1.000 (n/a) | 1.000 (200%) |"), "{md}");
    let v = serde_json::to_value(&t).expect("json");
    assert_eq!(v["rows"][1]["by_qtype"]["vqa/count"]["correct"], 2);
    // Data without types: no breakdown, in the markdown or the JSON.
    let t = Table::new("m", Path::new("d.jsonl"), None, 32, 2, &[run(Method::None, Amount::All, &[true], &[true])]);
    assert!(!t.markdown().contains("By item type"));
    assert!(serde_json::to_value(&t).expect("json")["rows"][0].get("by_qtype").is_none());
}

#[test]
fn a_row_scored_on_other_items_than_none_is_flagged() {
    // A prompt that fits the context only with re-indexed positions fails under none and scores under VisionZip:
    // the two accuracies then cover different items.
    let none = run(Method::None, Amount::All, &[], &[true]);
    let mut vz = run(Method::VisionZip, Amount::Budget(64), &[], &[true]);
    vz.items.push(ItemResult { line: 2, ..item(ItemKind::Vqa, true, 20.0, 8) });
    let same = run(Method::Pool, Amount::Budget(64), &[], &[false]);
    let t = Table::new("m", Path::new("d.jsonl"), None, 32, 2, &[none, vz, same]);
    let flags: Vec<bool> = t.rows.iter().map(|r| r.items_differ_from_none).collect();
    assert_eq!(flags, [false, true, false]);
    let md = t.markdown();
    assert!(md.contains("| visionzip | 64 | 16 -> 8 | n/a | n/a * | 1.000 | 100.0% * |"), "{md}");
    assert!(md.contains("\\* Scored on other items than `none`"), "{md}");
    let v = serde_json::to_value(&t).expect("json");
    assert_eq!((v["rows"][1]["items_differ_from_none"].as_bool(), v["rows"][2].get("items_differ_from_none")), (Some(true), None));
    // Without such a row, no note.
    let t = Table::new("m", Path::new("d.jsonl"), None, 32, 2, &[run(Method::None, Amount::All, &[], &[true])]);
    assert!(!t.markdown().contains("Scored on other items"));
}

#[test]
fn retention_is_null_when_the_unpruned_run_scores_zero() {
    let none = run(Method::None, Amount::All, &[false, false], &[false]);
    let pruned = run(Method::Random, Amount::Budget(64), &[true, false], &[false]);
    let t = Table::new("m", Path::new("d"), None, 32, 3, &[none, pruned]);
    for r in &t.rows {
        assert_eq!((r.grounding_retention, r.vqa_retention), (None, None), "{}", r.label);
    }
    let json = serde_json::to_string(&t).expect("json");
    assert!(!json.contains("NaN") && !json.contains("inf"), "{json}");
    // Without a none run there is nothing to be relative to.
    let t = Table::new("m", Path::new("d"), None, 32, 3, &[run(Method::Pool, Amount::Budget(64), &[true], &[true])]);
    assert_eq!(t.rows[0].grounding_retention, None);
    // A summary of an empty run has no means (null, not NaN).
    let s = Summary::of(&run(Method::None, Amount::All, &[], &[]));
    assert_eq!((s.grounding_acc, s.vqa_acc, s.mean_ttft_ms, s.mean_visual_tokens_kept), (None, None, None, None));
}

#[test]
fn progress_line() {
    assert_eq!(format_duration(42.4), "42s");
    assert_eq!(format_duration(185.0), "3m05s");
    assert_eq!(format_duration(3720.0), "1h02m");
    assert_eq!(format_duration(f64::NAN), "?");
    let l = render(120, 1000, 0, "nuwa:64", 40.0);
    assert!(l.starts_with("[===>") && l.contains("120/1000 nuwa:64 | 3.00 items/s | ETA 4m53s"), "{l}");
    let l = render(0, 10, 0, "none", 0.0);
    assert!(l.contains("0/10") && l.contains("ETA ?"), "{l}");
    let l = render(10, 10, 2, "none", 5.0);
    assert!(l.starts_with(&format!("[{}]", "=".repeat(24))) && l.ends_with("| 2 failed"), "{l}");
    assert!(render(0, 0, 0, "x", 0.0).contains("0/0"));
}

// ---------------------------------------------------------------- the command

#[test]
fn eval_json_counts_items_and_unreadable_lines() {
    let data = mini();
    let data = data.to_str().expect("utf-8 path");
    let o = nuwa(&["eval", "--model", "models/tiny-llava-clip", "--data", data, "--prune", "nuwa", "--budget", "64", "--max-tokens", "4", "--json"]);
    let v = json_stdout(&o);
    assert_eq!(v["method"], "nuwa");
    assert_eq!(v["budget"], 64);
    assert_eq!((v["n_grounding"].as_u64(), v["n_vqa"].as_u64()), (Some(2), Some(2)));
    for key in ["grounding_acc", "vqa_acc"] {
        let acc = v[key].as_f64().unwrap_or_else(|| panic!("{key}: {v}"));
        assert!((0.0..=1.0).contains(&acc), "{key}");
    }
    assert!(v["mean_ttft_ms"].as_f64().is_some_and(|t| t > 0.0));
    // 81 tokens at budget 64: 16 after Stage 1, 2 after Stage 2.
    assert_eq!(v["mean_visual_tokens_after_stage1"].as_f64(), Some(16.0));
    assert_eq!(v["mean_visual_tokens_kept"].as_f64(), Some(2.0));
    // 3 bad lines + line 9, whose "image" is JSON: it fails at run time and is counted, not dropped.
    assert_eq!(v["unreadable"], 4);
    assert_eq!(lines_of(&v["unreadable_items"]), [3, 4, 7, 9]);
    let err = stderr(&o);
    for l in ["line 3: malformed JSON", "line 4: image", "line 7: \"bbox\"", "line 9: "] {
        assert!(err.contains(l), "{l}: {err}");
    }
}

#[test]
fn eval_human_summary_and_predictions() {
    let preds = tmp("preds/p.jsonl");
    let data = mini();
    let o = nuwa(&[
        "eval", "--model", "models/tiny-llava-clip", "--data", data.to_str().expect("path"), "--limit", "2", "--max-tokens", "3",
        "--predictions", preds.to_str().expect("path"), "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("none") && out.contains("grounding Acc@0.5") && (out.contains("(0/1)") || out.contains("(1/1)")), "{out}");
    assert!(out.contains("unreadable 0"), "{out}");
    assert!(!stderr(&o).contains("items/s"), "--quiet: no progress");
    let lines: Vec<Value> = std::fs::read_to_string(&preds)
        .expect("predictions")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!((lines[0]["line"].as_u64(), lines[0]["kind"].as_str(), lines[0]["run"].as_str()), (Some(1), Some("grounding"), Some("none")));
    assert_eq!((lines[1]["line"].as_u64(), lines[1]["kind"].as_str()), (Some(2), Some("vqa")));
    assert!(lines[1]["normalized"].is_string());

    // A predictions file that cannot be written (a full disk) fails the command, but after the table is written:
    // before, a whole sweep's results were lost.
    let out = tmp("preds/full-disk");
    let o = nuwa(&[
        "eval", "--model", "models/tiny-llava-clip", "--data", data.to_str().expect("path"), "--limit", "2", "--max-tokens", "3",
        "--sweep", "none;nuwa:k40/12", "--predictions", "/dev/full", "--out", out.to_str().expect("path"), "--quiet",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("writing --predictions /dev/full") && stderr(&o).contains("table above is complete"), "{}", stderr(&o));
    let md = std::fs::read_to_string(tmp("preds/full-disk.md")).expect("the table was written");
    assert!(md.contains("| nuwa | 40/12 |"), "{md}");
}

#[test]
fn sweep_writes_markdown_and_json_with_the_none_row() {
    let stem = tmp("results/sweep");
    let data = mini();
    let o = nuwa(&[
        "eval", "--model", "models/tiny-llava-clip", "--data", data.to_str().expect("path"), "--limit", "2",
        "--max-tokens", "3", "--sweep", "nuwa:64;pool:64;nuwa+pillar=0:k16/2", "--out", stem.to_str().expect("path"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let md = std::fs::read_to_string(stem.with_extension("md")).expect("sweep.md");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(stem.with_extension("json")).expect("sweep.json")).expect("json");
    let rows = v["rows"].as_array().expect("rows");
    let labels: Vec<&str> = rows.iter().map(|r| r["label"].as_str().expect("label")).collect();
    assert_eq!(labels, ["none", "nuwa:64", "pool:64", "nuwa+pillar=0:k16/2"]);
    for r in rows {
        assert_eq!((r["n_grounding"].as_u64(), r["n_vqa"].as_u64(), r["unreadable"].as_u64()), (Some(1), Some(1), Some(0)));
        for key in ["grounding_acc", "vqa_acc", "grounding_retention", "vqa_retention", "mean_ttft_ms", "mean_visual_tokens_kept", "mean_visual_tokens_after_stage1"] {
            assert!(r.get(key).is_some(), "{key}");
        }
        // Random weights: accuracy 0 unpruned makes retention null; otherwise a finite percentage.
        let none_acc = rows[0]["grounding_acc"].as_f64().expect("acc");
        assert!(if none_acc == 0.0 { r["grounding_retention"].is_null() } else { r["grounding_retention"].is_f64() });
    }
    assert_eq!(rows[1]["mean_visual_tokens_kept"].as_f64(), Some(2.0));
    // The target's cells: all kept unpruned; Stage 2 keeps a subset of what Stage 1 kept.
    assert_eq!((rows[0]["target_kept_stage1"].as_f64(), rows[0]["target_kept_stage2"].as_f64()), (Some(1.0), Some(1.0)));
    for r in &rows[1..] {
        let (s1, s2) = (r["target_kept_stage1"].as_f64().expect("s1"), r["target_kept_stage2"].as_f64().expect("s2"));
        assert!((0.0..=1.0).contains(&s1) && s2 <= s1, "{r}");
    }
    // pool is Stage-1 only: the last layer sees what Stage 1 kept (a 3x3 grid on the 9x9 fixture).
    assert_eq!(rows[2]["mean_visual_tokens_kept"].as_f64(), Some(9.0));
    assert_eq!(rows[2]["mean_visual_tokens_after_stage1"].as_f64(), Some(9.0));
    assert!(v["command"].as_str().is_some_and(|c| c.contains("--sweep 'nuwa:64;pool:64;nuwa+pillar=0:k16/2'")), "{}", v["command"]);
    // The same anchors as nuwa:64 (same counts, same target cells), none of them aggregated.
    assert_eq!((rows[3]["keep1"].as_u64(), rows[3]["keep2"].as_u64()), (Some(16), Some(2)));
    assert_eq!(rows[3]["target_kept_stage1"], rows[1]["target_kept_stage1"]);
    for needle in ["| none | - | 81 -> 81 |", "| nuwa | 64 | 16 -> 2 |", "| pool | 64 | 9 -> 9 |", "| nuwa+pillar=0 | 16/2 | 16 -> 2 |"] {
        assert!(md.contains(needle), "{needle}: {md}");
    }
    // stdout is the markdown table too.
    assert_eq!(String::from_utf8_lossy(&o.stdout), md);
}

#[test]
fn eval_rejects_bad_settings_before_running() {
    let data = mini();
    let data = data.to_str().expect("path");
    let o = nuwa(&["eval", "--model", "models/tiny-llava-clip", "--data", data, "--sweep", "nuwa:50"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("nuwa:50") && stderr(&o).contains("64, 128 and 192"), "{}", stderr(&o));
    let o = nuwa(&["eval", "--model", "models/tiny-llava-clip", "--data", data, "--sweep", "fast:64"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("unknown pruning method"), "{}", stderr(&o));
    let o = nuwa(&["eval", "--model", "models/tiny-llava-clip", "--data", data, "--prune", "nuwa"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--budget"), "{}", stderr(&o));
    // An ablation option on a method that has no such knob, in a sweep and on a single run.
    let o = nuwa(&["eval", "--model", "models/tiny-llava-clip", "--data", data, "--sweep", "fastv+pillar=0:64"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("fastv+pillar=0:64") && stderr(&o).contains("Nüwa option"), "{}", stderr(&o));
    let o = nuwa(&["eval", "--model", "models/tiny-llava-clip", "--data", data, "--prune", "nuwa", "--budget", "64", "--visionzip-contextual", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("VisionZip option"), "{}", stderr(&o));
    let o = nuwa(&["eval", "--model", "models/tiny-llava-clip", "--data", data, "--sweep", "--prune", "nuwa", "--budget", "64"]);
    assert_eq!(o.status.code(), Some(2), "--sweep conflicts with --prune: {}", stderr(&o));
    let o = nuwa(&["eval", "--model", "models/tiny-llava-clip", "--data", "tests/data/eval/absent.jsonl"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("absent.jsonl"), "{}", stderr(&o));
    let o = nuwa(&["eval", "--model", "models/tiny-llava-clip", "--data", data, "--max-tokens", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("max-tokens"), "{}", stderr(&o));
}

#[test]
fn outputs_that_could_not_be_written_fail_before_the_model_loads() {
    let data = mini();
    let data_s = data.to_str().expect("path");
    let blocker = tmp("a-file");
    std::fs::write(&blocker, "x").expect("write");
    let under = blocker.join("table");
    // Before, the whole sweep ran and the table was lost at the end (exit 1, nothing on stdout).
    let o = nuwa(&["eval", "--model", "models/absent", "--data", data_s, "--sweep", "nuwa:64", "--out", under.to_str().expect("path")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--out") && stderr(&o).contains("a-file"), "{}", stderr(&o));
    // --predictions onto the data file used to truncate the data set.
    let copy = tmp("data-copy.jsonl");
    std::fs::copy(&data, &copy).expect("copy");
    let copy_s = copy.to_str().expect("path");
    let o = nuwa(&["eval", "--model", "models/tiny-llava-clip", "--data", copy_s, "--predictions", copy_s]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is the --data file"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&copy).expect("read"), std::fs::read(&data).expect("read"), "the data file is untouched");
    // Two outputs onto one file.
    let stem = tmp("both");
    let o = nuwa(&["eval", "--model", "models/absent", "--data", data_s, "--out", stem.to_str().expect("path"), "--predictions", stem.with_extension("json").to_str().expect("path")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is also written by --out"), "{}", stderr(&o));
    // Refused before the model is looked at: "models/absent" would otherwise have been the error.
    assert!(!stderr(&o).contains("models/absent"), "{}", stderr(&o));
}

#[cfg(unix)]
#[test]
fn a_data_path_that_is_not_utf8_still_gets_its_table() {
    use std::os::unix::ffi::OsStrExt;
    // Before, recording the command line (std::env::args) panicked after the sweep had run, and no table was written.
    let dir = tmp("non-utf8");
    std::fs::create_dir_all(&dir).expect("dir");
    let name = std::ffi::OsStr::from_bytes(b"mini-\xff.jsonl");
    let data = dir.join(name);
    let text = std::fs::read_to_string(mini()).expect("mini");
    // Image paths are relative to the data file: point them back at the original directory.
    let base = mini().parent().expect("dir").to_path_buf();
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(2)
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).expect("line");
            let img = base.join(v["image"].as_str().expect("image"));
            v["image"] = Value::String(img.to_str().expect("path").into());
            v.to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").expect("write");
    let stem = dir.join("table");
    let o = Command::new(env!("CARGO_BIN_EXE_nuwa"))
        .current_dir(root())
        .args(["eval", "--model", "models/tiny-llava-clip", "--max-tokens", "2", "--quiet", "--sweep", "pool:64", "--out"])
        .arg(&stem)
        .arg("--data")
        .arg(&data)
        .output()
        .expect("run nuwa");
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(stem.with_extension("json")).expect("table.json")).expect("json");
    assert!(v["command"].as_str().is_some_and(|c| c.contains("mini-\u{fffd}.jsonl")), "{}", v["command"]);
    assert_eq!(v["rows"].as_array().expect("rows").len(), 2);
}

#[test]
fn expected_boxes_must_lie_in_their_image() {
    assert!(check_box_in_image([0.0, 0.0, 640.0, 426.0], 640, 426).is_ok());
    assert!(check_box_in_image([-0.5, 10.0, 640.9, 426.5], 640, 426).is_ok(), "rounding at the edge is tolerated");
    assert!(check_box_in_image([10.0, 10.0, 11.0, 11.0], 640, 426).is_ok());
    for (b, needle) in [
        ([0.1, 0.2, 0.5, 0.6], "not normalised"),
        ([10.0, 10.0, 10.5, 40.0], "under one pixel"),
        ([10.0, 10.0, 700.0, 40.0], "outside the 640x426 px image"),
        ([10.0, 10.0, 40.0, 428.0], "outside"),
        ([-3.0, 10.0, 40.0, 40.0], "outside"),
        // Every comparison with NaN is false: this box used to pass.
        ([f64::NAN; 4], "not a finite number"),
        ([0.0, 0.0, f64::INFINITY, 40.0], "not a finite number"),
    ] {
        let e = check_box_in_image(b, 640, 426).expect_err("bad box");
        assert!(e.contains(needle), "{b:?}: {e}");
    }
}

#[test]
fn eval_counts_a_box_outside_its_image_as_unreadable() {
    let path = tmp("boxes.jsonl");
    let img = root().join("examples/coco-000000000139.jpg");
    let img = img.to_str().expect("utf8");
    let line = |b: &str| format!(r#"{{"image": {img:?}, "kind": "grounding", "prompt": "Please provide the bounding box coordinate of the region this sentence describes: the person.", "bbox": {b}}}"#);
    std::fs::write(&path, [line("[340, 170, 400, 265]"), line("[0.85, 0.64, 1.0, 0.99]"), line("[340, 170, 4200, 265]")].join("\n")).expect("write");
    let o = nuwa(&["eval", "--model", "models/tiny-llava-clip", "--data", path.to_str().expect("utf8"), "--max-tokens", "2", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!((v["n_grounding"].as_u64(), v["unreadable"].as_u64()), (Some(1), Some(2)), "{v}");
    assert_eq!(lines_of(&v["unreadable_items"]), [2, 3]);
    assert!(stderr(&o).contains("not normalised") && stderr(&o).contains("outside the 400x266 px image"), "{}", stderr(&o));
}

#[test]
fn eval_that_scores_nothing_fails_after_listing_why() {
    let path = tmp("all-bad.jsonl");
    std::fs::write(&path, "{\"image\": \"nope.jpg\", \"kind\": \"vqa\", \"prompt\": \"q\", \"answer\": \"yes\"}\nnot json\n").expect("write");
    let data = path.to_str().expect("path");
    let o = nuwa(&["eval", "--model", "models/tiny-llava-clip", "--data", data, "--max-tokens", "2", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("line 1: image") && err.contains("line 2: malformed JSON"), "{err}");
    assert!(err.contains("no item of") && err.contains("all-bad.jsonl"), "{err}");
    // The summary still reaches stdout, with nothing invented for the missing numbers.
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!((v["unreadable"].as_u64(), v["mean_ttft_ms"].is_null(), v["grounding_acc"].is_null()), (Some(2), true, true));
}

#[test]
fn predictions_are_written_as_items_are_scored_so_a_stopped_sweep_keeps_them() {
    // Many quick items on the tiny fixture: long enough to stop the sweep halfway.
    let img = root().join("examples/coco-000000000139.jpg");
    let line = format!(r#"{{"image": {:?}, "kind": "vqa", "prompt": "Is there a person?", "answer": "yes"}}"#, img.display().to_string());
    let data = tmp("long.jsonl");
    std::fs::write(&data, vec![line; 4000].join("\n")).expect("write");
    let preds = tmp("long.predictions.jsonl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nuwa"))
        .current_dir(root())
        .args(["eval", "--model", "models/tiny-llava-clip", "--data", data.to_str().expect("utf8"), "--max-tokens", "2", "--quiet"])
        .args(["--sweep", "none;nuwa:k40/12", "--predictions", preds.to_str().expect("utf8")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let started = std::time::Instant::now();
    let mut seen = 0;
    while seen < 20 && started.elapsed() < std::time::Duration::from_secs(120) {
        std::thread::sleep(std::time::Duration::from_millis(20));
        seen = std::fs::read_to_string(&preds).map(|t| t.lines().count()).unwrap_or(0);
    }
    let still_running = child.try_wait().expect("wait").is_none();
    child.kill().expect("kill");
    child.wait().expect("wait");
    assert!(still_running, "the sweep ended before it could be stopped; make the data longer");
    let text = std::fs::read_to_string(&preds).expect("predictions");
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("every line is complete JSON")).collect();
    assert!(lines.len() >= 20 && lines.len() < 8000, "{} lines", lines.len());
    let runs: std::collections::BTreeSet<&str> = lines.iter().map(|v| v["run"].as_str().expect("run")).collect();
    assert!(runs.iter().all(|r| ["none", "nuwa:k40/12"].contains(r)), "{runs:?}");
}

#[test]
fn a_stopped_sweep_resumes_from_its_predictions_with_the_same_table() {
    let data = mini();
    let data = data.to_str().expect("utf8");
    let sweep = ["--sweep", "none;nuwa:k40/12"];
    let run = |preds: &Path, extra: &[&str]| {
        let mut args = vec!["eval", "--model", "models/tiny-llava-clip", "--data", data, "--max-tokens", "3", "--json", "--quiet"];
        args.extend(sweep);
        args.extend(["--predictions", preds.to_str().expect("utf8")]);
        args.extend(extra);
        nuwa(&args)
    };
    // Whole rows (accuracies, IoU, no-box counts, target shares, tokens, unreadable lines), timings aside.
    let rows = |o: &ProcessOutput| -> Vec<Value> {
        let v = json_stdout(o);
        v["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.as_object_mut().expect("row").remove("mean_ttft_ms");
                r
            })
            .collect()
    };
    let keys = |path: &Path| -> Vec<(String, u64)> {
        let mut k: Vec<(String, u64)> = std::fs::read_to_string(path)
            .expect("predictions")
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("complete line");
                (v["run"].as_str().expect("run").to_string(), v["line"].as_u64().expect("line"))
            })
            .collect();
        k.sort();
        k
    };

    let full_path = tmp("resume/full.jsonl");
    let full = run(&full_path, &[]);
    assert!(full.status.success(), "{}", stderr(&full));
    let all = std::fs::read_to_string(&full_path).expect("predictions");
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), 8, "4 scorable items x 2 settings (line 9's image cannot be decoded)");

    // Stopped after 4 lines and halfway through the 5th.
    let part = tmp("resume/part.jsonl");
    std::fs::write(&part, format!("{}\n{}", lines[..4].join("\n"), &lines[4][..lines[4].len() / 2])).expect("write");
    let resumed = run(&part, &["--resume"]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(stderr(&resumed).contains("resuming: 4 of 10"), "{}", stderr(&resumed));
    assert_eq!(rows(&resumed), rows(&full));
    assert_eq!(keys(&part), keys(&full_path), "every item once, the cut line replaced");

    // The answers read back are the ones the table counts, scored against the data as it is now (the random-weight
    // fixture answers nothing right, so the comparison above alone cannot tell). A stored verdict alone is not
    // trusted: an item whose `correct` was flipped still counts as wrong.
    let original: Value = serde_json::from_str(lines[0]).expect("json");
    let (run_label, kind) = (original["run"].as_str().expect("run"), original["kind"].as_str().expect("kind"));
    let counted = |o: &ProcessOutput| {
        let v = json_stdout(o);
        let row = v["rows"].as_array().expect("rows").iter().find(|r| r["label"] == run_label).expect("row").clone();
        row[format!("{kind}_correct").as_str()].as_u64().expect("count")
    };
    let doctored = tmp("resume/doctored.jsonl");
    let mut flipped = original.clone();
    flipped["correct"] = Value::Bool(true);
    std::fs::write(&doctored, format!("{flipped}\n{}\n", lines[1..4].join("\n"))).expect("write");
    assert_eq!(counted(&run(&doctored, &["--resume"])), counted(&full), "a flipped verdict is scored anew");
    // An answer that is right (the data's own answer or box put in the file) is counted right.
    let line_no = original["line"].as_u64().expect("line") as usize;
    let source_line = std::fs::read_to_string(mini()).expect("mini").lines().nth(line_no - 1).expect("data line").to_string();
    let source: Value = serde_json::from_str(&source_line).expect("data json");
    let mut right = original.clone();
    match kind {
        "vqa" => right["text"] = source["answer"].clone(),
        _ => right["predicted_box"] = source["bbox"].clone(),
    }
    std::fs::write(&doctored, format!("{right}\n{}\n", lines[1..4].join("\n"))).expect("write");
    assert_eq!(counted(&run(&doctored, &["--resume"])), counted(&full) + 1, "{run_label} {kind}");

    // Resuming a finished run runs nothing and gives the same table.
    let again = run(&part, &["--resume"]);
    assert!(again.status.success() && stderr(&again).contains("resuming: 8 of 10"), "{}", stderr(&again));
    assert_eq!(rows(&again), rows(&full));
    assert_eq!(keys(&part), keys(&full_path));

    // Without the file, --resume starts from the beginning.
    let fresh = tmp("resume/fresh.jsonl");
    let o = run(&fresh, &["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(keys(&fresh), keys(&full_path));

    // Another sweep, or other data, is refused before anything runs.
    let mut args = vec!["eval", "--model", "models/tiny-llava-clip", "--data", data, "--max-tokens", "3", "--sweep", "none;fastv:k81/20", "--resume"];
    args.extend(["--predictions", part.to_str().expect("utf8")]);
    let o = nuwa(&args);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("\"nuwa:k40/12\" is not a setting of this sweep"), "{}", stderr(&o));
    let other = tmp("resume/other.jsonl");
    std::fs::write(&other, lines[0].replace("\"line\":1", "\"line\":3") + "\n").expect("write");
    let o = run(&other, &["--resume"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("made on other data"), "{}", stderr(&o));
    // So are another model and another token limit (before, their answers were counted as this run's).
    let sweep_arg = sweep.join("=");
    for (model, tokens, needle) in [
        ("models/tiny-llava-dinov2", "3", "made with model \"tiny-llava-clip\", this run uses \"tiny-llava-dinov2\""),
        ("models/tiny-llava-clip", "5", "made with --max-tokens 3, this run uses 5"),
    ] {
        let preds = part.to_str().expect("utf8");
        let o = nuwa(&["eval", "--model", model, "--data", data, "--max-tokens", tokens, &sweep_arg, "--predictions", preds, "--resume"]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{}", stderr(&o));
    }
    let o = nuwa(&["eval", "--model", "models/tiny-llava-clip", "--data", data, "--resume"]);
    assert_eq!(o.status.code(), Some(2), "--resume needs --predictions: {}", stderr(&o));
}

#[test]
fn items_on_one_image_anywhere_in_the_file_give_the_results_they_give_alone() {
    let a = root().join("examples/coco-000000000139.jpg");
    let b = root().join("models/tiny-llava-clip/golden/image.png");
    let item = |img: &Path, prompt: &str| format!(r#"{{"image": {:?}, "kind": "vqa", "prompt": {prompt:?}, "answer": "yes"}}"#, img.display().to_string());
    let lines = [item(&a, "Is there a person?"), item(&b, "Is there a circle?"), item(&a, "Is it day?"), item(&b, "Is it red?")];
    let texts = |path: &Path, preds: &Path| -> Vec<(u64, String, String)> {
        let o = nuwa(&["eval", "--model", "models/tiny-llava-clip", "--data", path.to_str().expect("utf8"), "--max-tokens", "4", "--quiet",
            "--sweep", "none;nuwa:k40/12", "--predictions", preds.to_str().expect("utf8")]);
        assert!(o.status.success(), "{}", stderr(&o));
        let mut v: Vec<(u64, String, String)> = std::fs::read_to_string(preds)
            .expect("predictions")
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("json");
                (v["line"].as_u64().expect("line"), v["run"].as_str().expect("run").into(), v["text"].as_str().expect("text").into())
            })
            .collect();
        v.sort();
        v
    };
    let mixed = tmp("interleaved.jsonl");
    std::fs::write(&mixed, lines.join("\n")).expect("write");
    let together = texts(&mixed, &tmp("interleaved.pred.jsonl"));
    assert_eq!(together.len(), 8);
    for (i, l) in lines.iter().enumerate() {
        let one = tmp(&format!("interleaved-{i}.jsonl"));
        std::fs::write(&one, l).expect("write");
        let alone = texts(&one, &tmp(&format!("interleaved-{i}.pred.jsonl")));
        let want: Vec<(u64, String, String)> = together.iter().filter(|t| t.0 == i as u64 + 1).map(|t| (1, t.1.clone(), t.2.clone())).collect();
        assert_eq!(alone, want, "item {}", i + 1);
    }
}

#[test]
fn a_table_path_naming_a_directory_is_refused() {
    let dir = tmp("table-dir");
    std::fs::create_dir_all(&dir).expect("dir");
    // Before: DIR/.md and DIR/.json, hidden files.
    for stem in [dir.clone(), PathBuf::from(format!("{}/", tmp("not-yet").display()))] {
        let e = Table::paths(&stem).unwrap_err().to_string();
        assert!(e.contains("names a directory"), "{}: {e}", stem.display());
    }
    let (md, json) = Table::paths(&dir.join("results.md")).expect("a file stem");
    assert_eq!((md, json), (dir.join("results.md"), dir.join("results.json")));
}

#[test]
fn a_rejected_eval_leaves_an_earlier_predictions_file_alone() {
    let p = tmp("kept-predictions.jsonl");
    let earlier = "{\"an earlier run\": true}\n";
    let data = mini();
    let data_s = data.to_str().expect("path");
    for bad in [["--prune", "nuwa", "--budget", "7"], ["--max-tokens", "0", "--seed", "1"]] {
        std::fs::write(&p, earlier).expect("write");
        let mut args = vec!["eval", "--model", "models/tiny-llava-clip", "--data", data_s, "--predictions", p.to_str().expect("path")];
        args.extend(bad);
        let o = nuwa(&args);
        assert_eq!(o.status.code(), Some(1), "{bad:?}");
        // Before, the file was created (emptied) first and the settings checked after.
        assert_eq!(std::fs::read_to_string(&p).expect("read"), earlier, "{bad:?}: {}", stderr(&o));
    }
    let o = nuwa(&["eval", "--model", "models/tiny-llava-clip", "--data", data_s, "--out", &format!("{}/", tmp("outdir").display())]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("names a directory"), "{}", stderr(&o));
}

#[cfg(unix)]
#[test]
fn a_data_path_that_is_a_fifo_is_refused_not_waited_on() {
    let fifo = tmp("data.fifo");
    let _ = std::fs::remove_file(&fifo);
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    // Before: std::fs::read blocked until a writer came, forever.
    let e = Dataset::load(&fifo, None).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    std::fs::remove_file(&fifo).ok();
}
