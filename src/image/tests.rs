//! Tests of decoding, limits, resize policies and the resize record.

fn encode_jpeg(img: image::RgbImage) -> Vec<u8> {
    let mut jpg = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut jpg), image::ImageFormat::Jpeg)
        .expect("encode");
    jpg
}

#[test]
fn truncated_jpeg_is_rejected_not_filled_with_grey() {
    let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 90]));
    let jpg = encode_jpeg(img);
    assert!(decode_image(&jpg, &ImageLimits::default()).is_ok());
    let err = decode_image(&jpg[..jpg.len() * 2 / 3], &ImageLimits::default()).expect_err("truncated");
    assert!(err.to_string().contains("truncated"), "{err}");
    // Cut anywhere from the first scan on (the headers end before it), it is refused.
    let sos = jpg.windows(2).position(|w| w == [0xFF, 0xDA]).expect("a scan");
    for cut in (sos..jpg.len() - 1).step_by(97) {
        assert!(decode_image(&jpg[..cut], &ImageLimits::default()).is_err(), "cut at {cut} of {}", jpg.len());
    }
}

fn jpeg_variants() -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/image/jpeg");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("tests/data/image/jpeg")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .map(|p| (p.file_name().expect("name").to_string_lossy().into_owned(), std::fs::read(&p).expect("read")))
        .collect();
    out.sort();
    let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 90]));
    out.push(("image-rs baseline".into(), encode_jpeg(img)));
    out
}

#[test]
fn a_truncated_jpeg_with_an_end_marker_appended_is_refused() {
    // A download cut off and "repaired" by appending the end-of-image marker: decoders fill the missing blocks with
    // grey and report success (the image crate's, strict mode or not). The scan's blocks are counted instead.
    // Variants from libjpeg (tests/data/image/jpeg/make.py): restart markers every 1, 2, 3 MCUs and every MCU row,
    // 4:2:0, 4:2:2, 4:4:4, grey, CMYK, optimised tables, a size that is not a multiple of the MCU, one scan per
    // component (a cut between two scans leaves components uncoded, which decoders draw grey), progressive (a cut
    // between two scans leaves coefficients unrefined: a blurred preview).
    let variants = jpeg_variants();
    assert_eq!(variants.len(), 9);
    for (name, jpg) in &variants {
        decode_image(jpg, &ImageLimits::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let sos = jpg.windows(2).position(|w| w == [0xFF, 0xDA]).expect("a scan");
        let data = sos + 2 + usize::from(u16::from_be_bytes([jpg[sos + 2], jpg[sos + 3]]));
        assert_eq!(&jpg[jpg.len() - 2..], [0xFF, 0xD9], "{name}");
        // Every cut in the scan's data, each with the end marker appended.
        for cut in data..jpg.len() - 2 {
            let mut repaired = jpg[..cut].to_vec();
            repaired.extend_from_slice(&[0xFF, 0xD9]);
            let e = decode_image(&repaired, &ImageLimits::default()).expect_err(&format!("{name} cut at {cut} of {}", jpg.len()));
            // The reason depends on where the cut falls: in a scan, between scans, inside a later segment.
            assert!(e.to_string().contains("JPEG data") && e.to_string().contains("truncated or corrupt: "), "{name}: {e}");
        }
    }
}

#[test]
fn corrupt_jpeg_scan_data_is_refused_not_drawn() {
    let (_, jpg) = jpeg_variants().into_iter().find(|(n, _)| n == "rst-blocks-420.jpg").expect("variant");
    let sos = jpg.windows(2).position(|w| w == [0xFF, 0xDA]).expect("a scan");
    // A restart marker removed: the MCUs after it would be decoded from the wrong bit position.
    let rst = sos + jpg[sos..].windows(2).position(|w| w[0] == 0xFF && (0xD0..=0xD7).contains(&w[1])).expect("a restart marker");
    let mut no_rst = jpg.clone();
    no_rst.drain(rst..rst + 2);
    let e = decode_image(&no_rst, &ImageLimits::default()).expect_err("missing restart marker");
    assert!(e.to_string().contains("scan 1:"), "{e}");
    // A Huffman table that does not match the data (the first, a DC table, with its code counts moved one length
    // longer): the data reads as a code no table entry has.
    let dht = jpg.windows(2).position(|w| w == [0xFF, 0xC4]).expect("a table");
    let mut bad = jpg.clone();
    let counts = dht + 5;
    bad[counts..counts + 16].rotate_right(1);
    let e = decode_image(&bad, &ImageLimits::default()).expect_err("a scan read with the wrong table");
    assert!(e.to_string().contains("matches no Huffman table entry"), "{e}");
    // A second frame header, claiming a size far over the limits the first one was checked against: refused
    // before the block counter sizes anything by it.
    let sof = jpg.windows(2).position(|w| w == [0xFF, 0xC0]).expect("a frame header");
    let len = 2 + usize::from(u16::from_be_bytes([jpg[sof + 2], jpg[sof + 3]]));
    let mut second = jpg[sof..sof + len].to_vec();
    second[5..9].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
    let mut two = jpg.clone();
    two.splice(sof + len..sof + len, second);
    assert!(decode_image(&two, &ImageLimits::default()).is_err(), "two frame headers");
    let e = jpeg::check_whole(&two).expect_err("two frame headers");
    assert!(e.contains("a second frame header"), "{e}");
}

#[test]
fn stray_bytes_between_jpeg_segments_are_skipped_as_decoders_do() {
    // libjpeg (with a warning) and the decoder skip bytes between segments; the completeness check called such a
    // file truncated.
    let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 90]));
    let jpg = encode_jpeg(img);
    let alone = decode_image(&jpg, &ImageLimits::default()).expect("plain");
    let after_app0 = 4 + usize::from(u16::from_be_bytes([jpg[4], jpg[5]]));
    let mut stray = jpg.clone();
    stray.splice(after_app0..after_app0, [0u8, 0]);
    assert_eq!(decode_image(&stray, &ImageLimits::default()).expect("stray bytes"), alone);
    // Still cut short: still refused.
    let e = decode_image(&stray[..stray.len() - 100], &ImageLimits::default()).expect_err("cut");
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[test]
fn a_jpeg_with_data_after_its_end_is_read_like_the_image_alone() {
    // Motion photos append a video after the JPEG's end marker; the video's bytes can hold 0xFFDA after its last
    // 0xFFD9, which made the old check (end marker after the file's last scan marker) call the image truncated.
    let img = image::RgbImage::from_fn(90, 60, |x, y| image::Rgb([(x * 2) as u8, (y * 3) as u8, ((x + y) % 256) as u8]));
    let jpg = encode_jpeg(img);
    let alone = decode_image(&jpg, &ImageLimits::default()).expect("plain");
    let mut motion = jpg.clone();
    motion.extend_from_slice(b"\0\0\0\x18ftypmp42\0\0\0\0");
    motion.extend_from_slice(&[0xFF, 0xD9, 0x00, 0xFF, 0xDA, 0x12, 0x34, 0xFF, 0xD8]);
    assert_eq!(decode_image(&motion, &ImageLimits::default()).expect("with a trailer"), alone);
    // An EXIF-like APP1 segment holding a complete thumbnail JPEG (its own scan and end marker) before the main
    // image: the main image cut short is still refused.
    let mut app1 = vec![0xFF, 0xE1];
    let body: Vec<u8> = b"Exif\0\0".iter().copied().chain(jpg.iter().copied()).collect();
    app1.extend_from_slice(&u16::try_from(body.len() + 2).expect("small").to_be_bytes());
    app1.extend_from_slice(&body);
    let with_thumb: Vec<u8> = jpg[..2].iter().chain(&app1).chain(&jpg[2..]).copied().collect();
    assert_eq!(decode_image(&with_thumb, &ImageLimits::default()).expect("thumbnail"), alone);
    let e = decode_image(&with_thumb[..with_thumb.len() - 200], &ImageLimits::default()).expect_err("cut");
    assert!(e.to_string().contains("truncated"), "{e}");
}

use super::*;

#[allow(clippy::excessive_precision)] // CLIP's published constants, verbatim
fn config(resize: ResizePolicy, width: u32, height: u32) -> ImageConfig {
    ImageConfig {
        height,
        width,
        resize,
        interpolation: Interpolation::Bicubic,
        pad_color: [122, 116, 104],
        rescale: 1.0 / 255.0,
        mean: [0.48145466, 0.4578275, 0.40821073],
        std: [0.26862954, 0.26130258, 0.27577711],
    }
}

fn png_bytes(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    let enc = image::codecs::png::PngEncoder::new(&mut out);
    let r = img.write_with_encoder(enc);
    assert!(r.is_ok());
    out
}

#[test]
fn deserializes_manifest_image_object() {
    let json = r#"{"height": 336, "width": 336, "resize": "pad", "interpolation": "bicubic",
        "pad_color": [122, 116, 104], "rescale": 0.00392156862745098,
        "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}"#;
    let c: ImageConfig = serde_json::from_str(json).unwrap();
    assert_eq!(c.resize, ResizePolicy::Pad);
    assert_eq!(c.interpolation, Interpolation::Bicubic);
    assert_eq!(c.pad_color, [122, 116, 104]);
    assert!(c.validate().is_ok());
    let back: ImageConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    for (s, p) in [("crop", ResizePolicy::Crop), ("stretch", ResizePolicy::Stretch)] {
        let j = json.replace("\"pad\"", &format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<ImageConfig>(&j).unwrap().resize, p);
    }
    assert!(serde_json::from_str::<ImageConfig>(&json.replace("\"pad\"", "\"Pad\"")).is_err());
}

#[test]
fn rejects_bad_config() {
    let mut c = config(ResizePolicy::Pad, 8, 8);
    c.std[1] = 0.0;
    assert!(c.validate().unwrap_err().contains("image.std"));
    let img = RgbImage::new(4, 4);
    assert!(matches!(preprocess(&img, &c), Err(Error::Image(_))));
}

#[test]
fn decodes_png_and_rejects_garbage() {
    let img = RgbImage::from_fn(20, 16, |x, y| Rgb([x as u8 * 10, y as u8 * 10, 7]));
    let bytes = png_bytes(&img);
    let limits = ImageLimits::with_min_side(14);
    let back = decode_image(&bytes, &limits).unwrap();
    assert_eq!(back, img);
    // Truncated.
    let e = decode_image(&bytes[..bytes.len() / 2], &limits).unwrap_err();
    assert!(matches!(e, Error::Image(_)), "{e}");
    let e = decode_image(&bytes[..20], &limits).unwrap_err();
    assert!(matches!(e, Error::Image(_)), "{e}");
    // Unknown format and empty.
    let e = decode_image(b"this is not an image at all", &limits).unwrap_err();
    assert!(e.to_string().contains("unrecognised"), "{e}");
    assert!(decode_image(&[], &limits).is_err());
    // Corrupt JPEG (valid magic, junk after).
    let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xE0];
    jpeg.extend_from_slice(&[0x13; 64]);
    assert!(matches!(decode_image(&jpeg, &limits), Err(Error::Image(_))));
}

#[test]
fn rejects_too_small() {
    let bytes = png_bytes(&RgbImage::new(1, 1));
    let e = decode_image(&bytes, &ImageLimits::with_min_side(14)).unwrap_err();
    assert_eq!(e.to_string(), "image: image is 1x1 px; the smallest accepted side is 14 px");
    let e = rgb_from_raw(30, 13, &[0; 30 * 13 * 3], &ImageLimits::with_min_side(14)).unwrap_err();
    assert!(e.to_string().contains("30x13"), "{e}");
}

/// A PNG whose IHDR claims 20000 x 20000 but that carries only a few bytes of data.
fn bomb_png(width: u32, height: u32) -> Vec<u8> {
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    push_chunk(&mut png, b"IHDR", &ihdr);
    push_chunk(&mut png, b"IDAT", &[0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    push_chunk(&mut png, b"IEND", &[]);
    png
}

fn push_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn rejects_decompression_bomb_from_header() {
    let limits = ImageLimits::default();
    let e = decode_image(&bomb_png(20000, 20000), &limits).unwrap_err();
    assert!(e.to_string().contains("20000x20000"), "{e}");
    // Within max_side but over max_pixels: caught by our own header check.
    let e = decode_image(&bomb_png(16000, 16000), &limits).unwrap_err();
    assert!(e.to_string().contains("pixels"), "{e}");
    // Within all limits: the header passes and decoding fails on the missing data, without allocating 40 GB.
    let e = decode_image(&bomb_png(4000, 4000), &limits).unwrap_err();
    assert!(matches!(e, Error::Image(_)), "{e}");
}

#[test]
fn raw_rgb_length_checked() {
    let limits = ImageLimits::default();
    assert!(rgb_from_raw(4, 2, &[0; 24], &limits).is_ok());
    let e = rgb_from_raw(4, 2, &[0; 23], &limits).unwrap_err();
    assert!(e.to_string().contains("needs 24 bytes, got 23"), "{e}");
    assert!(rgb_from_raw(0, 2, &[], &limits).is_err());
    assert!(rgb_from_raw(u32::MAX, u32::MAX, &[], &limits).is_err());
}

#[test]
fn hf_shortest_edge_truncates() {
    // 336 * 640 / 480 = 448 exactly; 336 * 500 / 333 = 504.5045 -> 504; portrait mirrors.
    assert_eq!(shortest_edge_size(640, 480, 336), (448, 336));
    assert_eq!(shortest_edge_size(500, 333, 336), (504, 336));
    assert_eq!(shortest_edge_size(333, 500, 336), (336, 504));
    assert_eq!(shortest_edge_size(100, 100, 336), (336, 336));
    // 336 * 1001 / 999 = 336.67 -> 336
    assert_eq!(shortest_edge_size(999, 1001, 336), (336, 336));
}

#[test]
fn stretch_output_shape_and_normalisation() {
    let img = RgbImage::from_pixel(50, 30, Rgb([255, 0, 128]));
    let c = config(ResizePolicy::Stretch, 28, 14);
    let b = preprocess(&img, &c).unwrap();
    assert_eq!(b.pixels.shape(), &[1, 3, 14, 28]);
    for (ch, v) in [255.0f32, 0.0, 128.0].into_iter().enumerate() {
        let want = (v / 255.0 - c.mean[ch]) / c.std[ch];
        assert!((b.pixels[[0, ch, 7, 9]] - want).abs() < 1e-5);
    }
}

#[test]
fn pad_fills_with_pad_color() {
    // 40 wide, 20 tall, white: padded rows on top/bottom take pad_color.
    let img = RgbImage::from_pixel(40, 20, Rgb([255, 255, 255]));
    let mut c = config(ResizePolicy::Pad, 40, 40);
    c.interpolation = Interpolation::Nearest;
    let b = preprocess(&img, &c).unwrap();
    let top = b.pixels[[0, 0, 0, 20]];
    let want_pad = (122.0 / 255.0 - c.mean[0]) / c.std[0];
    assert!((top - want_pad).abs() < 1e-5);
    let mid = b.pixels[[0, 0, 20, 20]];
    assert!((mid - (1.0 - c.mean[0]) / c.std[0]).abs() < 1e-5);
    assert_eq!(b.resize.offset_y, -10.0);
    assert_eq!(b.resize.offset_x, 0.0);
}

#[test]
fn crop_takes_the_centre() {
    // 30x10 image, columns coloured by x; crop to 10x10 with nearest keeps columns 10..20.
    let img = RgbImage::from_fn(30, 10, |x, _| Rgb([x as u8, 0, 0]));
    let mut c = config(ResizePolicy::Crop, 10, 10);
    c.interpolation = Interpolation::Nearest;
    c.mean = [0.0; 3];
    c.std = [1.0; 3];
    c.rescale = 1.0;
    let b = preprocess(&img, &c).unwrap();
    assert_eq!(b.pixels[[0, 0, 0, 0]], 10.0);
    assert_eq!(b.pixels[[0, 0, 5, 9]], 19.0);
    assert_eq!(b.resize.offset_x, 10.0);
}

fn assert_box_close(a: [f32; 4], b: [f32; 4]) {
    for i in 0..4 {
        assert!((a[i] - b[i]).abs() < 1e-3, "{a:?} vs {b:?}");
    }
}

#[derive(serde::Deserialize)]
struct GoldenCase {
    image: String,
    expected: String,
    config: ImageConfig,
}

/// Parity with transformers' PIL backend (tests/data/image/make_golden.py): image-rs resampling is not PIL's,
/// so values differ by a few 8-bit levels at sharp edges (1 level = 1/255/std ~ 0.015) and very little on average.
#[test]
fn matches_pil_reference() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/image");
    let cases: Vec<GoldenCase> =
        serde_json::from_slice(&std::fs::read(dir.join("golden.json")).unwrap()).unwrap();
    assert_eq!(cases.len(), 11);
    for case in cases {
        let img = decode_image(&std::fs::read(dir.join(&case.image)).unwrap(), &ImageLimits::default()).unwrap();
        let want: Vec<f32> = std::fs::read(dir.join(&case.expected))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let got = preprocess(&img, &case.config).unwrap().pixels;
        assert_eq!(got.len(), want.len());
        let diffs: Vec<f32> = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
        let max = diffs.iter().cloned().fold(0.0, f32::max);
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        // Measured: nearest is exact; bilinear and bicubic differ by <= 1 level except a few bicubic edge
        // pixels (up to 7 levels, PIL clips between its two passes); the mean stays ~0.003.
        let (max_tol, mean_tol) = match case.config.interpolation {
            Interpolation::Nearest => (1e-6, 1e-7),
            Interpolation::Bilinear => (0.016, 0.004),
            Interpolation::Bicubic => (0.11, 0.004),
        };
        assert!(max <= max_tol && mean <= mean_tol, "{}: max {max} mean {mean}", case.expected);
    }
}

#[test]
fn round_trip_stretch() {
    let img = RgbImage::new(640, 480);
    let r = preprocess(&img, &config(ResizePolicy::Stretch, 336, 336)).unwrap().resize;
    let orig = [64.0, 48.0, 320.0, 240.0];
    // By hand: x * 336/640, y * 336/480.
    let model = [33.6, 33.6, 168.0, 168.0];
    assert_box_close(r.to_model_box(orig), model);
    assert_box_close(r.to_original_box(model), orig);
}

#[test]
fn round_trip_crop() {
    // 640x480 -> 448x336, crop left = (448-336)/2 = 56, top = 0.
    let img = RgbImage::new(640, 480);
    let r = preprocess(&img, &config(ResizePolicy::Crop, 336, 336)).unwrap().resize;
    let orig = [200.0, 48.0, 400.0, 240.0];
    let s = 336.0 / 480.0;
    let model = [200.0 * s - 56.0, 48.0 * s, 400.0 * s - 56.0, 240.0 * s];
    assert_box_close(r.to_model_box(orig), model);
    assert_box_close(r.to_original_box(model), orig);
    // A box reaching into the cropped-away area maps to the image edge at most.
    let full = r.to_original_box([0.0, 0.0, 336.0, 336.0]);
    assert_box_close(full, [80.0, 0.0, 560.0, 480.0]);
    // Portrait, odd sizes: 333x500 -> 336x504, top = (504-336)/2 = 84.
    let r = preprocess(&RgbImage::new(333, 500), &config(ResizePolicy::Crop, 336, 336)).unwrap().resize;
    let orig = [10.0, 100.0, 300.0, 400.0];
    let (sx, sy) = (336.0 / 333.0, 504.0 / 500.0);
    let model = [10.0 * sx, 100.0 * sy - 84.0, 300.0 * sx, 400.0 * sy - 84.0];
    assert_box_close(r.to_model_box(orig), model);
    assert_box_close(r.to_original_box(model), orig);
}

#[test]
fn round_trip_pad() {
    // 640x480 -> 640x640 canvas, image at y offset 80, then 336/640.
    let img = RgbImage::new(640, 480);
    let r = preprocess(&img, &config(ResizePolicy::Pad, 336, 336)).unwrap().resize;
    let orig = [64.0, 48.0, 320.0, 240.0];
    let s = 336.0 / 640.0;
    let model = [64.0 * s, (48.0 + 80.0) * s, 320.0 * s, (240.0 + 80.0) * s];
    assert_box_close(r.to_model_box(orig), model);
    assert_box_close(r.to_original_box(model), orig);
    // The whole model input maps to the whole image (padding clamped away).
    assert_box_close(r.to_original_box([0.0, 0.0, 336.0, 336.0]), [0.0, 0.0, 640.0, 480.0]);
    // Portrait 301x500: x offset (500-301)/2 = 99.
    let r = preprocess(&RgbImage::new(301, 500), &config(ResizePolicy::Pad, 336, 336)).unwrap().resize;
    assert_eq!(r.offset_x, -99.0);
    let orig = [1.0, 2.0, 300.0, 499.0];
    let s = 336.0 / 500.0;
    let model = [100.0 * s, 2.0 * s, 399.0 * s, 499.0 * s];
    assert_box_close(r.to_model_box(orig), model);
    assert_box_close(r.to_original_box(model), orig);
}

#[test]
fn to_original_box_orders_and_clamps() {
    let r = preprocess(&RgbImage::new(100, 50), &config(ResizePolicy::Stretch, 10, 10)).unwrap().resize;
    assert_box_close(r.to_original_box([8.0, 9.0, 2.0, -3.0]), [20.0, 0.0, 80.0, 45.0]);
    let b = r.to_original_box([f32::NAN, f32::NAN, f32::NAN, f32::NAN]);
    assert!(b.iter().all(|v| v.is_finite()), "{b:?}");
}

/// A photo-like test image: smooth gradients with a few hard edges.
fn busy(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let edge = if (x / 7 + y / 5) % 3 == 0 { 90 } else { 0 };
        Rgb([((x * 255) / w.max(1)) as u8, ((y * 255) / h.max(1)) as u8, (edge + (x * y) % 61) as u8])
    })
}

fn max_and_mean_diff(a: &RgbImage, b: &RgbImage) -> (u8, f64) {
    assert_eq!(a.dimensions(), b.dimensions());
    let d: Vec<u8> = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).collect();
    (*d.iter().max().unwrap_or(&0), d.iter().map(|&v| f64::from(v)).sum::<f64>() / d.len() as f64)
}

#[test]
fn padding_in_two_passes_matches_the_square_canvas() {
    // The bounded-memory path of `pad` (for canvases over MAX_INTERMEDIATE_PIXELS) against the canvas path, on
    // images small enough to take both: wide and tall, odd offsets.
    let c = config(ResizePolicy::Pad, 336, 336);
    for (w, h) in [(700, 211), (211, 700), (1000, 14), (337, 335)] {
        let img = busy(w, h);
        let side = w.max(h);
        let (left, top) = ((side - w) / 2, (side - h) / 2);
        let mut canvas = RgbImage::from_pixel(side, side, Rgb(c.pad_color));
        imageops::replace(&mut canvas, &img, i64::from(left), i64::from(top));
        let exact = imageops::resize(&canvas, 336, 336, c.interpolation.filter());
        let (max, mean) = max_and_mean_diff(&pad_resize_in_two_passes(&img, &c, side, left, top), &exact);
        // Measured: max 4 / 4 / 2 / 8 levels, mean 0.016 / 0.017 / 0.002 / 0.071.
        assert!(max <= 8 && mean < 0.1, "{w}x{h}: max {max} levels, mean {mean}");
    }
}

#[test]
fn elongated_images_preprocess_in_bounded_memory_or_are_refused_by_name() {
    // 16384x14 is within the decoding limits; padded to a square it would be 268M pixels.
    let img = busy(16384, 14);
    let pad = preprocess(&img, &config(ResizePolicy::Pad, 336, 336)).expect("pad");
    assert_eq!(pad.pixels.shape(), &[1, 3, 336, 336]);
    // The image is a band of about 0.3 rows in the middle: the top and bottom rows are the pad colour.
    let c = config(ResizePolicy::Pad, 336, 336);
    let pad_value = (f32::from(c.pad_color[0]) * c.rescale - c.mean[0]) / c.std[0];
    assert!((pad.pixels[[0, 0, 0, 100]] - pad_value).abs() < 1e-5 && (pad.pixels[[0, 0, 335, 100]] - pad_value).abs() < 1e-5);
    let e = preprocess(&img, &config(ResizePolicy::Crop, 336, 336)).expect_err("crop").to_string();
    assert!(e.contains("16384x14") && e.contains("too elongated") && e.contains("393216x336"), "{e}");
    // Stretch needs no intermediate image.
    assert!(preprocess(&img, &config(ResizePolicy::Stretch, 336, 336)).is_ok());
}

#[test]
fn crop_to_a_non_square_target_zooms_only_as_much_as_the_window_needs() {
    // Before, the short side was scaled to the larger target side: a 336x224 image for a 336x224 model was zoomed to
    // 504x336 and lost a third of each side.
    let c = config(ResizePolicy::Crop, 336, 224);
    let img = busy(336, 224);
    let out = preprocess(&img, &c).expect("crop");
    let r = out.resize;
    assert_eq!((r.scale_x, r.scale_y, r.offset_x, r.offset_y), (1.0, 1.0, 0.0, 0.0));
    // A taller image: the width decides (the scaled image is 336 wide and at least 224 high).
    let r = preprocess(&busy(300, 400), &c).expect("crop").resize;
    assert!((r.scale_x - 300.0 / 336.0).abs() < 1e-9 && r.offset_x == 0.0 && r.offset_y > 0.0, "{r:?}");
    // Square targets are HF's shortest_edge = side, as before.
    assert_eq!(cover_short_side(640, 480, 336, 336), 336);
    assert_eq!(cover_short_side(480, 640, 336, 336), 336);
    for (w, h, tw, th) in [(336, 224, 336, 224), (300, 400, 336, 224), (1000, 10, 50, 300), (7, 9, 336, 100)] {
        let (rw, rh) = shortest_edge_size(w, h, cover_short_side(w, h, tw, th));
        assert!(rw >= tw && rh >= th, "{w}x{h} -> {rw}x{rh} for {tw}x{th}");
    }
}
