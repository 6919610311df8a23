//! Parsers of untrusted bytes never panic: random and mutated images, `.npy` files, manifests and eval data lines
//! give `Ok` or a clear `Err`, and model text of any content gives well-formed boxes and answers, whatever the input.

use std::path::PathBuf;

use nuwa::boxes::extract_boxes;
use nuwa::eval::data::parse_line;
use nuwa::eval::metrics::vqa_correct;
use nuwa::image::{decode_image, ImageLimits, ResizeRecord};
use nuwa::manifest::Manifest;
use nuwa::npy::NpyArray;
use proptest::prelude::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn seeds() -> Vec<Vec<u8>> {
    vec![
        std::fs::read(root().join("examples/coco-000000000139.jpg")).expect("jpg"),
        std::fs::read(root().join("models/tiny-llava-clip/golden/image.png")).expect("png"),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, .. ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_the_image_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_image(&bytes, &ImageLimits::default());
    }

    #[test]
    fn mutated_real_images_decode_or_fail_cleanly(which in 0usize..2, edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..24), cut in any::<prop::sample::Index>()) {
        let mut bytes = seeds()[which].clone();
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        let keep = cut.index(bytes.len()).max(16);
        bytes.truncate(keep);
        if let Err(e) = decode_image(&bytes, &ImageLimits::with_min_side(14)) {
            prop_assert!(e.to_string().starts_with("image: "));
        }
    }

    #[test]
    fn random_npy_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut data = b"\x93NUMPY\x01\x00".to_vec();
        data.extend_from_slice(&bytes);
        let _ = NpyArray::parse(&data);
        let _ = NpyArray::parse(&bytes);
    }

    #[test]
    fn mutated_manifests_load_or_fail_with_the_path(at in any::<prop::sample::Index>(), len in 0usize..40, junk in "[ -~]{0,12}") {
        let src = root().join("models/tiny-llava-clip/manifest.json");
        let text = std::fs::read_to_string(&src).expect("manifest");
        let i = at.index(text.len());
        let j = (i + len).min(text.len());
        let (i, j) = (text.floor_char_boundary(i), text.floor_char_boundary(j));
        let mutated = format!("{}{}{}", &text[..i], junk, &text[j..]);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("manifest-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("manifest.json"), &mutated).expect("write");
        if let Err(e) = Manifest::load(&dir) {
            prop_assert!(e.to_string().contains("manifest.json"), "{}", e);
        }
    }

    #[test]
    fn any_eval_line_parses_or_names_what_is_wrong(text in "\\PC{0,200}") {
        if let Err(e) = parse_line(&text, 7, std::path::Path::new("data")) {
            prop_assert!(!e.is_empty() && e.len() < 300, "{}", e);
        }
    }

    #[test]
    fn eval_lines_with_any_field_values_parse_or_name_the_field(
        image in "\\PC{0,12}",
        kind in prop::sample::select(vec!["grounding", "vqa", "Grounding", "", "other"]),
        prompt in "\\PC{0,20}",
        bbox in prop::sample::select(vec!["[1, 2, 30, 40]", "[1e308, 0, 1e308, 1]", "[-0.0, 0, 1, 1]", "[1, 2, 3]", "\"1 2 3 4\"", "null", "[1, 2, 3, 4, 5]", "[NaN, 0, 1, 1]", "[0, 0, 18446744073709551616, 1]"]),
        answer in prop::sample::select(vec!["\"yes\"", "3", "-2.5e3", "null", "[]", "{}", "\"\""]),
    ) {
        let line = format!(r#"{{"image": {image:?}, "kind": {kind:?}, "prompt": {prompt:?}, "bbox": {bbox}, "answer": {answer}}}"#);
        match parse_line(&line, 1, std::path::Path::new("data")) {
            Ok(item) => prop_assert!(!item.prompt.trim().is_empty()),
            Err(e) => prop_assert!(!e.is_empty() && e.len() < 300, "{}", e),
        }
    }

    #[test]
    fn any_model_text_gives_finite_ordered_boxes_inside_the_image(
        pieces in proptest::collection::vec(prop_oneof![
            "\\PC{0,8}",
            "\\[[0-9.]{0,5}, ?[0-9.]{0,5}, ?[0-9.]{0,5}, ?[0-9.]{0,5}\\]?",
            (0f32..1.5, 0f32..1.5, 0f32..1.5, 0f32..1.5).prop_map(|(a, b, c, d)| format!("[{a:.2}, {b:.2}, {c:.2}, {d:.2}]")),
            Just("[".to_string()), Just("]".to_string()), Just(", ".to_string()),
        ], 0..12),
        (w, h) in (1u32..5000, 1u32..5000),
    ) {
        let m = Manifest::load(root().join("models/nuwa-demo")).expect("manifest");
        let record = ResizeRecord::new(&m.image, w, h).expect("record");
        let text = pieces.concat();
        for b in extract_boxes(&text, &m.box_format, &record) {
            let o = b.original;
            prop_assert!(o.iter().all(|v| v.is_finite()), "{:?} from {:?}", o, text);
            prop_assert!(o[0] <= o[2] && o[1] <= o[3], "{:?} from {:?}", o, text);
            prop_assert!(o[0] >= 0.0 && o[1] >= 0.0 && o[2] <= w as f32 && o[3] <= h as f32, "{:?} outside {}x{}", o, w, h);
        }
    }

    #[test]
    fn any_answer_text_is_scored_without_panicking(expected in "\\PC{0,16}", predicted in "\\PC{0,64}") {
        let (_, normalized) = vqa_correct(&expected, &predicted);
        prop_assert!(normalized.chars().all(|c| c.is_alphanumeric() || c == ' '), "{:?}", normalized);
        prop_assert!(!normalized.starts_with(' ') && !normalized.ends_with(' ') && !normalized.contains("  "), "{:?}", normalized);
        // An answer matches itself exactly when something is left of it after normalising.
        prop_assert_eq!(vqa_correct(&predicted, &predicted).0, !nuwa::eval::normalize_answer(&predicted).is_empty());
    }
}
