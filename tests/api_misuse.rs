//! The library API driven as a C caller could drive it: public fields set by hand, sizes and positions out of
//! range. Each case must be an `Err` naming what was wrong: a panic that unwinds across `extern "C"` (or an abort
//! on a failed allocation) takes the host process down.

use std::path::PathBuf;
use std::sync::Arc;

use ndarray::Array2;
use nuwa::pipeline::{GenerationParams, ImageInput, LoadOptions, Model};
use nuwa::Error;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> Arc<Model> {
    Model::load(root().join("models/tiny-llava-clip"), &LoadOptions::default()).expect("load")
}

fn image() -> ImageInput {
    ImageInput::Path(root().join("examples/shapes-squares.jpg"))
}

#[test]
fn a_layout_whose_image_span_does_not_fit_its_ids_is_an_error() {
    let m = fixture();
    let n = m.manifest().vision.num_tokens();
    let all: Vec<usize> = (0..n).collect();
    let layout = nuwa::prompt::layout(m.tokenizer(), m.manifest(), "what?", &all, n).expect("layout");
    let hidden = m.manifest().decoder.hidden_size;
    // Before: ndarray assertion panics.
    #[allow(clippy::reversed_empty_ranges)] // a reversed span is the point
    let cases = [(10..5, 0), (layout.len() + 5..layout.len() + 7, 2)];
    for (span, rows) in cases {
        let mut bad = layout.clone();
        bad.image_span = span.clone();
        let e = m.embed(&bad, &Array2::zeros((rows, hidden))).unwrap_err();
        assert!(matches!(e, Error::Shape { .. }) && e.to_string().contains("image span"), "{span:?}: {e}");
    }
    let mut bad = layout.clone();
    bad.positions.pop();
    assert!(m.embed(&bad, &Array2::zeros((n, hidden))).is_err(), "positions shorter than ids");
    assert!(m.embed(&layout, &Array2::zeros((n, hidden))).is_ok());
}

#[test]
fn caches_too_large_to_allocate_are_an_error_not_an_abort() {
    let m = fixture();
    let e = m.new_caches(usize::MAX / 2).unwrap_err().to_string();
    assert!(e.contains("KV cache"), "{e}");
    assert_eq!(m.new_caches(8).expect("small").len(), m.segments().len());
}

#[test]
fn decoder_positions_outside_the_context_are_refused() {
    let m = fixture();
    let max = m.manifest().decoder.max_position_embeddings as i64;
    let hidden = m.manifest().decoder.hidden_size;
    let input = Array2::<f32>::zeros((1, hidden));
    for p in [max, max + 100_000, -1, i64::MIN] {
        let mut caches = m.new_caches(4).expect("caches");
        let e = m.run_decoder(input.view(), &[p], &mut caches).unwrap_err();
        assert!(matches!(e, Error::ContextOverflow(_)) && e.to_string().contains(&p.to_string()), "{p}: {e}");
    }
    let mut caches = m.new_caches(4).expect("caches");
    assert!(m.run_decoder(input.view(), &[max - 1], &mut caches).is_ok());
}

#[test]
fn a_prompt_far_longer_than_the_context_is_refused_before_tokenising() {
    let m = fixture();
    let prepared = m.prepare(&image(), &Default::default()).expect("prepare");
    // 5 MB of text on a 2048-position fixture: before, tokenised in full (25 MB took 14 s and 4 GB) to be refused.
    let long = "word ".repeat(1_000_000);
    let e = m.generate_prepared(&prepared, &long, &GenerationParams::default()).map(|_| ()).unwrap_err();
    assert!(matches!(e, Error::ContextOverflow(_)) && e.to_string().contains("5000000 bytes"), "{e}");
    // A prompt that fits still runs.
    assert!(m.generate_prepared(&prepared, &"word ".repeat(20), &GenerationParams::default()).is_ok());
}

#[cfg(unix)]
#[test]
fn an_image_path_that_is_not_a_regular_file_is_refused_unread() {
    // Before, read whole: /dev/zero grew until memory ran out, a FIFO blocked forever.
    let m = fixture();
    let e = m.prepare(&ImageInput::Path("/dev/zero".into()), &Default::default()).unwrap_err().to_string();
    assert!(e.contains("/dev/zero") && e.contains("not a regular file"), "{e}");
    // Opening a FIFO for reading blocks until a writer comes: it must be refused before it is opened.
    let fifo = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("api-misuse-fifo-{}", std::process::id()));
    let _ = std::fs::remove_file(&fifo);
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo").success());
    let (tx, rx) = std::sync::mpsc::channel();
    let path = fifo.clone();
    std::thread::spawn(move || {
        let _ = tx.send(m.prepare(&ImageInput::Path(path), &Default::default()).map(|_| ()).map_err(|e| e.to_string()));
    });
    let e = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("prepare on a FIFO blocked").unwrap_err();
    assert!(e.contains("not a regular file"), "{e}");
    std::fs::remove_file(&fifo).expect("rm fifo");
}

#[test]
fn a_prepared_image_with_tensors_of_another_shape_is_refused() {
    let m = fixture();
    let good = m.prepare(&image(), &Default::default()).expect("prepare");
    let n = m.manifest().vision.num_tokens();
    let hidden = m.manifest().vision.hidden_size;
    let mut short = good.clone();
    short.vision.features = Array2::zeros((5, hidden));
    let mut regrid = good.clone();
    (regrid.vision.grid_h, regrid.vision.grid_w) = (3, n / 3);
    let mut cls = good.clone();
    cls.vision.cls_attention = Some(vec![0.0; n - 1]);
    // Before, the first two ran: a 5-token image, and Stage 1 on a 3 x 27 grid.
    for (what, bad) in [("5 feature rows", short), ("another grid", regrid), ("short CLS attention", cls)] {
        let e = m.generate_prepared(&bad, "What is this?", &GenerationParams::default()).map(|_| ()).unwrap_err();
        assert!(matches!(e, Error::Shape { .. }) && e.to_string().contains("prepared image"), "{what}: {e}");
    }
    assert!(m.generate_prepared(&good, "What is this?", &GenerationParams::default()).is_ok());
}

#[test]
fn a_trace_with_a_stage2_index_off_its_tokens_is_refused_before_any_file_is_written() {
    let m = fixture();
    let params = GenerationParams { max_new_tokens: 1, record: true, ..Default::default() };
    let g = m.generate(&nuwa::Request { image: image(), prompt: "What is this?".into(), params }).expect("generate");
    let mut trace = g.trace().expect("recorded").clone();
    let dir = std::env::temp_dir().join(format!("nuwa-api-misuse-dump-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    trace.stage2 = Some(vec![trace.stage1.kept.len() + 3]);
    // Before: an index panic after half the arrays had been written.
    let e = nuwa::dump::write_trace(&dir, &trace, serde_json::json!({})).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }) && e.to_string().contains("stage2"), "{e}");
    let written: Vec<_> = std::fs::read_dir(&dir).expect("dir").collect();
    assert!(written.is_empty(), "files written before the refusal: {written:?}");
    trace.stage2 = Some(vec![0, 1]);
    nuwa::dump::write_trace(&dir, &trace, serde_json::json!({})).expect("a valid trace is written");
    assert!(dir.join("index.json").is_file() && dir.join("stage2_kept.npy").is_file());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn drawing_on_an_image_of_another_size_than_the_request_is_refused() {
    let m = fixture();
    let params = GenerationParams { max_new_tokens: 1, record: true, ..Default::default() };
    let g = m.generate(&nuwa::Request { image: image(), prompt: "What is this?".into(), params }).expect("generate");
    let out = g.output();
    let trace = g.trace().expect("recorded");
    let (w, h) = (out.resize.original_width, out.resize.original_height);
    let png = std::env::temp_dir().join(format!("nuwa-api-misuse-viz-{}.png", std::process::id()));
    let patch = m.manifest().vision.patch_size;
    let other = image::RgbImage::new(w + 7, h);
    let e = nuwa::viz::render(&other, &out.resize, trace, patch, &[], &png).unwrap_err();
    assert!(e.to_string().contains("wrong places"), "{e}");
    assert!(!png.exists());
    let same = image::RgbImage::new(w, h);
    nuwa::viz::render(&same, &out.resize, trace, patch, &[[1.0, 1.0, 5.0, 5.0]], &png).expect("same size draws");
    assert!(png.is_file());
    std::fs::remove_file(&png).ok();
}

#[test]
fn a_second_onnx_runtime_library_in_the_same_process_is_refused() {
    let m = fixture();
    let loaded = m.runtime().library().to_path_buf();
    let e = nuwa::runtime::Runtime::get(Some(&root().join("Cargo.toml")), None).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("already loaded"), "{e}");
    // The library already loaded, named by path, is the same runtime.
    assert!(nuwa::runtime::Runtime::get(Some(&loaded), None).is_ok());
}
