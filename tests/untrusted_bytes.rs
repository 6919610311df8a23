//! Parsers of untrusted bytes never panic: random and mutated images, `.npy` files and manifests give `Ok` or a
//! clear `Err`, whatever the input.

use std::path::PathBuf;

use nuwa::image::{decode_image, ImageLimits};
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
}
