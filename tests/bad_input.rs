//! Bad input through the real CLI: every case must fail with a clear message naming what was wrong and a non-zero
//! exit, never a panic or a hang.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

const FIXTURE: &str = "tiny-llava-clip";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> PathBuf {
    root().join("models").join(FIXTURE)
}

fn example_image() -> PathBuf {
    fixture().join("golden").join("image.png")
}

/// A fresh scratch directory under the target dir (removed first if a previous run left it).
fn scratch(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("bad-input-{}-{name}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn copy_model(to: &Path) {
    copy_model_from(&fixture(), to);
}

fn copy_model_from(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("fixture") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }
}

fn nuwa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nuwa")).args(args).output().expect("run nuwa")
}

fn run_with(model: &Path, image: &Path, prompt: &str) -> Output {
    nuwa(&["run", "--model", model.to_str().expect("utf8"), "--image", image.to_str().expect("utf8"), "--prompt", prompt, "--max-tokens", "4"])
}

/// Asserts a clean failure whose stderr contains every one of `needles` (case-insensitive).
fn assert_fails(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {stderr}");
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let lower = stderr.to_lowercase();
    for n in needles {
        assert!(lower.contains(&n.to_lowercase()), "stderr lacks {n:?}: {stderr}");
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn chunk(png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    png.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    png.extend_from_slice(&body);
    png.extend_from_slice(&crc32(&body).to_be_bytes());
}

/// A well-formed PNG whose header claims `w` x `h` RGB pixels but whose IDAT holds only a few bytes: what a
/// decompression bomb looks like before inflation.
fn bomb_png(w: u32, h: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    // zlib stream with one stored block of 4 zero bytes.
    let idat = [0x78, 0x01, 0x01, 4, 0, 0xfb, 0xff, 0, 0, 0, 0, 0, 4, 0, 1];
    chunk(&mut png, b"IDAT", &idat);
    chunk(&mut png, b"IEND", &[]);
    png
}

#[test]
fn corrupt_image_is_rejected() {
    let dir = scratch("corrupt");
    let path = dir.join("noise.jpg");
    std::fs::write(&path, (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect::<Vec<_>>()).expect("write");
    assert_fails(&run_with(&fixture(), &path, "What is this?"), &["image"]);
}

#[test]
fn truncated_image_is_rejected() {
    let dir = scratch("truncated");
    let full = std::fs::read(root().join("examples").join("coco-000000000139.jpg")).expect("example jpg");
    let path = dir.join("half.jpg");
    std::fs::write(&path, &full[..full.len() / 3]).expect("write");
    assert_fails(&run_with(&fixture(), &path, "What is this?"), &["image"]);
    let png = std::fs::read(example_image()).expect("png");
    let path = dir.join("half.png");
    std::fs::write(&path, &png[..png.len() / 2]).expect("write");
    assert_fails(&run_with(&fixture(), &path, "What is this?"), &["image"]);
}

#[test]
fn one_pixel_image_is_rejected() {
    let dir = scratch("tiny");
    let path = dir.join("one.png");
    let img = image::RgbImage::from_pixel(1, 1, image::Rgb([200, 10, 10]));
    img.save(&path).expect("save png");
    assert_fails(&run_with(&fixture(), &path, "What is this?"), &["1x1"]);
}

#[test]
fn decompression_bomb_header_is_rejected_before_decoding() {
    let dir = scratch("bomb");
    let path = dir.join("bomb.png");
    std::fs::write(&path, bomb_png(20_000, 20_000)).expect("write");
    let t = std::time::Instant::now();
    let out = run_with(&fixture(), &path, "What is this?");
    assert_fails(&out, &["20000x20000"]);
    assert!(t.elapsed().as_secs() < 60, "rejection took {:?}", t.elapsed());
}

#[test]
fn missing_image_file_is_rejected() {
    let dir = scratch("noimage");
    assert_fails(&run_with(&fixture(), &dir.join("nope.png"), "What is this?"), &["nope.png"]);
}

#[test]
fn empty_prompt_is_rejected() {
    assert_fails(&run_with(&fixture(), &example_image(), ""), &["prompt", "empty"]);
    assert_fails(&run_with(&fixture(), &example_image(), "   \n"), &["prompt", "empty"]);
}

#[test]
fn missing_model_file_is_named() {
    let dir = scratch("missing-file");
    copy_model(&dir);
    std::fs::remove_file(dir.join("decoder_tail.onnx")).expect("remove");
    assert_fails(&run_with(&dir, &example_image(), "What is this?"), &["decoder_tail.onnx", "decoder.tail.file"]);
}

#[test]
fn missing_model_dir_is_named() {
    let dir = scratch("no-model").join("absent");
    assert_fails(&run_with(&dir, &example_image(), "What is this?"), &["absent", "does not exist"]);
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    edit(&mut m);
    std::fs::write(&path, serde_json::to_string_pretty(&m).expect("json")).expect("write");
}

#[test]
fn manifest_with_wrong_vision_dimension_is_rejected() {
    let dir = scratch("wrong-dim");
    copy_model(&dir);
    edit_manifest(&dir, |m| m["vision"]["hidden_size"] = serde_json::json!(48));
    assert_fails(&run_with(&dir, &example_image(), "What is this?"), &["vision.hidden_size", "48"]);
}

#[test]
fn manifest_fields_that_describe_an_impossible_model_are_rejected() {
    for (section, field, value, needle) in [
        ("vision", "num_layers", 0i64, "vision.num_layers"),
        ("vision", "feature_layer", -99, "vision.feature_layer -99"),
        ("vision", "metric_layer", 4, "vision.metric_layer 4"),
        ("vision", "similarity_layers", 0, "vision.similarity_layers 0"),
        ("vision", "similarity_layers", 6, "vision.similarity_layers 6"),
        ("decoder", "num_attention_heads", 0, "num_attention_heads 0"),
        // Products that wrapped in release passed the size check: 2^63 + 9 rows of 14 px "matched" the image.
        ("vision", "grid_h", (1i64 << 62) + 9, "has more than"),
        ("decoder", "max_position_embeddings", 1i64 << 40, "max_position_embeddings 1099511627776 is above"),
        // Before: the loaders built 2e8 names per tensor before a graph could refuse, and the process aborted.
        ("decoder", "num_layers", 200_000_000, "decoder.num_layers must lie in [2, 4096]"),
        ("pruning", "stage2_layer", 1, "pruning.stage2_layer 1 differs from decoder.split_layer"),
    ] {
        let dir = scratch("impossible");
        copy_model(&dir);
        edit_manifest(&dir, |m| m[section][field] = serde_json::json!(value));
        assert_fails(&run_with(&dir, &example_image(), "What is this?"), &["manifest.json", needle]);
    }
}

#[test]
fn manifest_with_wrong_decoder_dimension_is_rejected() {
    let dir = scratch("wrong-kv");
    copy_model(&dir);
    edit_manifest(&dir, |m| {
        let heads = m["decoder"]["num_key_value_heads"].as_u64().expect("kv heads");
        m["decoder"]["num_key_value_heads"] = serde_json::json!(heads * 2);
    });
    assert_fails(&run_with(&dir, &example_image(), "What is this?"), &["manifest"]);
}

#[test]
fn manifest_with_wrong_split_is_rejected() {
    let dir = scratch("wrong-split");
    copy_model(&dir);
    edit_manifest(&dir, |m| {
        let k = m["decoder"]["split_layer"].as_u64().expect("split");
        m["decoder"]["split_layer"] = serde_json::json!(k + 1);
    });
    assert_fails(&run_with(&dir, &example_image(), "What is this?"), &["decoder"]);
}

#[test]
fn malformed_manifest_is_rejected() {
    let dir = scratch("malformed");
    copy_model(&dir);
    std::fs::write(dir.join("manifest.json"), "{\"format_version\": 1, \"id\": ").expect("write");
    assert_fails(&run_with(&dir, &example_image(), "What is this?"), &["manifest.json"]);
    edit_manifest_raw(&dir, "{\"format_version\": 1}");
    assert_fails(&run_with(&dir, &example_image(), "What is this?"), &["missing field"]);
}

#[test]
fn manifest_keys_the_runtime_does_not_know_are_refused_by_name() {
    // Before: "ofset" was ignored, the table read from offset 0, and the model answered garbage without an error.
    for (section, key) in [("embeddings", "ofset"), ("decoder", "kv_dtyp"), ("vision", "fp32_fil"), ("pruning", "stage_2_layer")] {
        let dir = scratch("unknown-key");
        copy_model(&dir);
        edit_manifest(&dir, |m| m[section][key] = serde_json::json!(64));
        assert_fails(&run_with(&dir, &example_image(), "What is this?"), &["manifest.json", "unknown field", key]);
    }
    // The informative blocks stay free-form.
    let dir = scratch("known-free-form");
    copy_model(&dir);
    edit_manifest(&dir, |m| {
        m["source"]["note"] = serde_json::json!("anything");
        m["quantization"]["note"] = serde_json::json!("anything");
    });
    let out = run_with(&dir, &example_image(), "What is this?");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn image_settings_a_request_would_refuse_are_a_manifest_error_at_load() {
    // Before: the manifest loaded and every request failed with a message that did not name it.
    let dir = scratch("negative-std");
    copy_model(&dir);
    edit_manifest(&dir, |m| m["image"]["std"][0] = serde_json::json!(-0.229));
    assert_fails(&nuwa(&["info", "--model", dir.to_str().expect("utf8")]), &["manifest.json", "image.std"]);
}

#[cfg(unix)]
#[test]
fn an_embedding_table_that_is_a_fifo_is_refused_not_waited_on() {
    let dir = scratch("fifo-embed");
    copy_model_from(&root().join("models/tiny-llava-dinov2"), &dir);
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).expect("read")).expect("json");
    let name = m["embeddings"]["file"].as_str().expect("file").to_string();
    std::fs::remove_file(dir.join(&name)).expect("rm");
    assert!(Command::new("mkfifo").arg(dir.join(&name)).status().expect("mkfifo").success());
    // Before: File::open blocked until a writer came.
    assert_fails(&nuwa(&["info", "--model", dir.to_str().expect("utf8")]), &[&name, "not a regular file"]);
}

#[test]
fn a_non_finite_value_in_an_f16_table_is_an_error_not_a_chosen_token() {
    let dir = scratch("inf-embed");
    copy_model_from(&root().join("models/tiny-llava-dinov2"), &dir);
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).expect("read")).expect("json");
    let e = &m["embeddings"];
    assert_eq!(e["dtype"], "f16");
    let (name, cols, offset) = (e["file"].as_str().expect("file"), e["cols"].as_u64().expect("cols"), e["offset"].as_u64().unwrap_or(0));
    let path = dir.join(name);
    let mut bytes = std::fs::read(&path).expect("read");
    // +inf in every row's first column: whatever token is looked up or scored meets one.
    let rows = (bytes.len() as u64 - offset) / (2 * cols);
    for r in 0..rows {
        let at = (offset + r * 2 * cols) as usize;
        bytes[at..at + 2].copy_from_slice(&half::f16::INFINITY.to_bits().to_le_bytes());
    }
    std::fs::write(&path, bytes).expect("write");
    assert_fails(&run_with(&dir, &example_image(), "What is this?"), &[name, "must be finite"]);
}

fn edit_manifest_raw(dir: &Path, text: &str) {
    std::fs::write(dir.join("manifest.json"), text).expect("write");
}

#[test]
fn truncated_embedding_table_is_rejected() {
    // tiny-llava-clip shares its tied table with the tail's weight file; tiny-llava-dinov2 ships an f16 table.
    for id in ["tiny-llava-clip", "tiny-llava-dinov2"] {
        let dir = scratch("short-embed");
        copy_model_from(&root().join("models").join(id), &dir);
        let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).expect("read")).expect("json");
        let name = m["embeddings"]["file"].as_str().expect("file");
        let file = dir.join(name);
        let bytes = std::fs::read(&file).expect("read");
        std::fs::write(&file, &bytes[..bytes.len() / 2]).expect("write");
        assert_fails(&run_with(&dir, &example_image(), "What is this?"), &[name, "bytes", "embeddings"]);
    }
}

#[test]
fn prompt_with_image_placeholder_is_rejected() {
    assert_fails(&run_with(&fixture(), &example_image(), "look <image> here"), &["placeholder"]);
}

#[test]
fn missing_onnxruntime_library_is_explained() {
    let out = Command::new(env!("CARGO_BIN_EXE_nuwa"))
        .args(["info", "--model", fixture().to_str().expect("utf8")])
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .output()
        .expect("run");
    assert_fails(&out, &["setup-ort.sh"]);
}

#[test]
fn good_input_still_works() {
    let out = nuwa(&["run", "--model", fixture().to_str().expect("utf8"), "--image", example_image().to_str().expect("utf8"), "--prompt", "Describe the image.", "--max-tokens", "3", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json on stdout");
    for key in ["text", "boxes", "tokens", "stats"] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    for key in ["vision_ms", "prefill_ms", "decode_ms", "ttft_ms", "visual_tokens_in", "visual_tokens_kept", "peak_rss_mb"] {
        assert!(v["stats"].get(key).is_some(), "missing stats.{key}");
    }
    assert_eq!(v["tokens"].as_array().expect("tokens").len(), 3);
}

#[test]
fn a_visualisation_path_that_cannot_be_written_fails_before_generating() {
    let dir = scratch("viz");
    let bad = dir.join("kept.txt");
    let out = nuwa(&["run", "--model", fixture().to_str().expect("utf8"), "--image", example_image().to_str().expect("utf8"), "--prompt", "Describe the image.", "--max-tokens", "3", "--viz", bad.to_str().expect("utf8")]);
    assert_fails(&out, &["--viz", "kept.txt", ".png"]);
    assert!(out.stdout.is_empty(), "nothing generated: {}", String::from_utf8_lossy(&out.stdout));
    // A directory that does not exist yet is created, as --dump and --predictions do.
    let nested = dir.join("a/b/kept.PNG");
    let out = nuwa(&["run", "--model", fixture().to_str().expect("utf8"), "--image", example_image().to_str().expect("utf8"), "--prompt", "Describe the image.", "--max-tokens", "3", "--viz", nested.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let png = std::fs::read(&nested).expect("visualisation written");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
}

#[test]
fn an_absurd_thread_count_is_refused_before_any_thread_starts() {
    // Before, --threads 100000 spent minutes and gigabytes starting threads.
    let out = nuwa(&["run", "--model", fixture().to_str().expect("utf8"), "--image", example_image().to_str().expect("utf8"), "--prompt", "Hi", "--threads", "100000"]);
    assert_fails(&out, &["100000 intra-op threads", "at most 1024"]);
}

#[test]
fn sampling_options_without_a_temperature_are_refused_not_ignored() {
    let (model, image) = (fixture(), example_image());
    for extra in [["--top-k", "5"], ["--top-p", "0.5"]] {
        let mut args = vec!["run", "--model", model.to_str().expect("utf8"), "--image", image.to_str().expect("utf8"), "--prompt", "Describe."];
        args.extend(extra);
        let out = nuwa(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains("--temperature"), "{extra:?}: {stderr}");
    }
}

#[test]
fn a_file_that_is_not_onnxruntime_is_explained() {
    let dir = scratch("fake-ort");
    let fake = dir.join("libonnxruntime.so");
    std::fs::write(&fake, b"not a shared library").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_nuwa"))
        .args(["info", "--model", fixture().to_str().expect("utf8")])
        .env("ORT_DYLIB_PATH", &fake)
        .output()
        .expect("run");
    assert_fails(&out, &["cannot load", "libonnxruntime.so"]);
    // The loader's own reason, not only "dlopen failed" (glibc: "file too short" for this 20-byte file).
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("file too short") || stderr.contains("invalid ELF header"), "{stderr}");
}

#[test]
fn unavailable_execution_provider_falls_back_to_cpu_and_says_so() {
    let out = nuwa(&["run", "--model", fixture().to_str().expect("utf8"), "--image", example_image().to_str().expect("utf8"), "--prompt", "Describe the image.", "--max-tokens", "2", "--provider", "cuda", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("CUDAExecutionProvider") && stderr.contains("running on CPU"), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["stats"]["provider"], "cpu");
    let out = nuwa(&["info", "--model", fixture().to_str().expect("utf8"), "--provider", "coreml"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CoreMLExecutionProvider"));
    let out = nuwa(&["info", "--model", fixture().to_str().expect("utf8"), "--provider", "tpu"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown execution provider"));
}

#[test]
fn tail_output_must_be_logits_or_final_hidden_and_match_the_graph() {
    let dir = scratch("tail-both");
    copy_model(&dir);
    edit_manifest(&dir, |m| m["decoder"]["tail"]["final_hidden"] = serde_json::json!("final_hidden"));
    assert_fails(&run_with(&dir, &example_image(), "What is this?"), &["decoder.tail", "exactly one", "final_hidden"]);
    edit_manifest(&dir, |m| {
        m["decoder"]["tail"].as_object_mut().expect("tail").remove("final_hidden");
        m["decoder"]["tail"].as_object_mut().expect("tail").remove("logits");
    });
    assert_fails(&run_with(&dir, &example_image(), "What is this?"), &["decoder.tail", "exactly one", "logits"]);
    // The manifest promises a final hidden state but the graph still ends in lm_head.
    edit_manifest(&dir, |m| m["decoder"]["tail"]["final_hidden"] = serde_json::json!("logits"));
    assert_fails(&run_with(&dir, &example_image(), "What is this?"), &["decoder tail", "logits", "final_hidden"]);
    // The cut graph named as if it still produced logits.
    edit_manifest(&dir, |m| {
        let tail = m["decoder"]["tail"].as_object_mut().expect("tail");
        tail.remove("final_hidden");
        tail.insert("logits".into(), "final_hidden".into());
        tail.insert("file".into(), "decoder_tail.final_hidden.onnx".into());
    });
    assert_fails(&run_with(&dir, &example_image(), "What is this?"), &["decoder tail", "final_hidden", "vocab"]);
}

#[test]
fn middle_segments_that_do_not_tile_the_head_are_rejected() {
    let dir = scratch("bad-middle");
    copy_model_from(&root().join("models").join("tiny-llava-dinov2"), &dir);
    edit_manifest(&dir, |m| m["decoder"]["middle"][0]["last_layer"] = serde_json::json!(2));
    assert_fails(&run_with(&dir, &example_image(), "What is this?"), &["decoder.middle", "split_layer"]);
    let dir = scratch("missing-middle-file");
    copy_model_from(&root().join("models").join("tiny-llava-dinov2"), &dir);
    std::fs::remove_file(dir.join("decoder_mid.onnx")).expect("remove");
    assert_fails(&run_with(&dir, &example_image(), "What is this?"), &["decoder_mid.onnx", "decoder.middle"]);
}

#[test]
fn closed_stdout_ends_quietly() {
    // `nuwa run ... --json | head -c 1`: the reader goes away mid-output. That is not an error of ours: no panic,
    // no backtrace, exit 0, as for other Unix tools.
    use std::io::Read;
    use std::process::Stdio;
    let model = fixture();
    let image = example_image();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nuwa"))
        .current_dir(root())
        .args(["run", "--model", model.to_str().unwrap(), "--image", image.to_str().unwrap()])
        .args(["--prompt", "What is in the image?", "--json", "--max-tokens", "4"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nuwa");
    drop(child.stdout.take());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert!(status.success(), "{status}: {err}");
}

#[cfg(target_os = "linux")]
#[test]
fn a_stderr_that_cannot_be_written_does_not_cost_the_result() {
    // Before, every eprintln! panicked on a full or closed stderr (exit 101, nothing on stdout); `2>&1 | head`
    // hit it in about one try of three.
    let full = || std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
    let out = Command::new(env!("CARGO_BIN_EXE_nuwa"))
        .args(["info", "--model", fixture().to_str().expect("utf8"), "--provider", "cuda"])
        .stderr(full())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains(FIXTURE));
    let out = Command::new(env!("CARGO_BIN_EXE_nuwa"))
        .args(["run", "--model", fixture().to_str().expect("utf8"), "--image", example_image().to_str().expect("utf8")])
        .args(["--prompt", "Describe the image.", "--max-tokens", "3"])
        .stderr(full())
        .output()
        .expect("run");
    // The timing summary goes to stderr after the text; the text and the exit status stand.
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.len() > 1, "{:?}", String::from_utf8_lossy(&out.stdout));
}

#[cfg(unix)]
#[test]
fn a_manifest_that_is_not_a_regular_file_is_refused_unread() {
    // Before, it was read whole: /dev/zero grew to gigabytes, a FIFO blocked forever.
    let dir = scratch("dev-zero");
    copy_model(&dir);
    std::fs::remove_file(dir.join("manifest.json")).expect("rm");
    std::os::unix::fs::symlink("/dev/zero", dir.join("manifest.json")).expect("symlink");
    assert_fails(&run_with(&dir, &example_image(), "What is this?"), &["manifest.json", "not a regular file"]);
}

/// Reads a protobuf varint at `*at`, advancing past it.
fn varint(bytes: &[u8], at: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = bytes[*at];
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
    }
    v
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// `model` (an ONNX ModelProto) with one more graph input, `extra`: f32 [1], consumed by no node.
fn with_extra_graph_input(model: &[u8]) -> Vec<u8> {
    // ValueInfoProto { name: "extra", type: TypeProto { tensor_type { elem_type: FLOAT, shape { dim { dim_value: 1 } } } } }
    let value_info = [&[0x0a, 5][..], b"extra", &[0x12, 10, 0x0a, 8, 0x08, 1, 0x12, 4, 0x0a, 2, 0x08, 1]].concat();
    let mut out = Vec::with_capacity(model.len() + 32);
    let mut at = 0;
    while at < model.len() {
        let start = at;
        let key = varint(model, &mut at);
        match key & 7 {
            0 => {
                varint(model, &mut at);
            }
            1 => at += 8,
            5 => at += 4,
            2 => {
                let len = varint(model, &mut at) as usize;
                if key >> 3 == 7 {
                    // ModelProto.graph: GraphProto.input is field 11 (repeated; appended last is fine).
                    let mut graph = model[at..at + len].to_vec();
                    graph.push(11 << 3 | 2);
                    put_varint(&mut graph, value_info.len() as u64);
                    graph.extend_from_slice(&value_info);
                    put_varint(&mut out, key);
                    put_varint(&mut out, graph.len() as u64);
                    out.extend_from_slice(&graph);
                    at += len;
                    continue;
                }
                at += len;
            }
            w => panic!("unexpected wire type {w} in the ModelProto"),
        }
        out.extend_from_slice(&model[start..at]);
    }
    out
}

#[test]
fn graphs_with_an_input_the_runtime_does_not_feed_are_refused_at_load() {
    // Before, the vision tower and the projector loaded whatever inputs their graphs had beyond the one the runtime
    // feeds, and every request then failed inside ONNX Runtime.
    let dir = scratch("vision-extra-input");
    copy_model(&dir);
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).expect("read")).expect("json");
    let vision = dir.join(m["vision"]["file"].as_str().expect("vision.file"));
    std::fs::write(&vision, with_extra_graph_input(&std::fs::read(&vision).expect("read"))).expect("write");
    let out = nuwa(&["info", "--model", dir.to_str().expect("utf8")]);
    assert_fails(&out, &["vision", "input \"extra\"", "does not feed"]);
    // A projector file whose graph takes more than the projected tokens (here the decoder head: same widths).
    let dir = scratch("projector-extra-input");
    copy_model(&dir);
    edit_manifest(&dir, |m| {
        m["projector"] = serde_json::json!({"file": m["decoder"]["head"]["file"], "input": "inputs_embeds", "output": "hidden_states"});
    });
    let out = nuwa(&["info", "--model", dir.to_str().expect("utf8")]);
    assert_fails(&out, &["projector", "position_ids", "does not feed"]);
}
