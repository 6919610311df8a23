//! `--viz OUT.png`: the original image with the kept tokens drawn on their grid cells and any predicted box.
//!
//! Pruned cells are dimmed; kept cells are outlined: yellow = pillar / dominant (unchanged), cyan = aggregated or
//! merged anchor, green = plain selection; a white inner frame marks tokens that also survived Stage 2; predicted
//! boxes are red.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::error::{Error, Result};
use crate::image::ResizeRecord;
use crate::pipeline::Trace;

const YELLOW: Rgb<u8> = Rgb([255, 214, 0]);
const CYAN: Rgb<u8> = Rgb([0, 200, 255]);
const GREEN: Rgb<u8> = Rgb([40, 220, 60]);
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const RED: Rgb<u8> = Rgb([255, 30, 30]);

fn rect(img: &mut RgbImage, b: [f32; 4], inset: i64, thickness: i64, color: Rgb<u8>) {
    let (w, h) = (i64::from(img.width()), i64::from(img.height()));
    let x1 = b[0].floor() as i64 + inset;
    let y1 = b[1].floor() as i64 + inset;
    let x2 = b[2].ceil() as i64 - 1 - inset;
    let y2 = b[3].ceil() as i64 - 1 - inset;
    if x2 < x1 || y2 < y1 {
        return;
    }
    for t in 0..thickness {
        for x in x1..=x2 {
            for y in [y1 + t, y2 - t] {
                if (0..w).contains(&x) && (0..h).contains(&y) {
                    img.put_pixel(x as u32, y as u32, color);
                }
            }
        }
        for y in y1..=y2 {
            for x in [x1 + t, x2 - t] {
                if (0..w).contains(&x) && (0..h).contains(&y) {
                    img.put_pixel(x as u32, y as u32, color);
                }
            }
        }
    }
}

/// Draws the kept tokens of `trace` and `boxes` (original pixels) over `original` and writes a PNG or JPEG (by the
/// extension of `out`). `original` must be the image `resize` was recorded for.
pub fn render(original: &RgbImage, resize: &ResizeRecord, trace: &Trace, patch: usize, boxes: &[[f32; 4]], out: &Path) -> Result<()> {
    if original.dimensions() != (resize.original_width, resize.original_height) {
        return Err(Error::InvalidRequest(format!(
            "the image to draw on is {}x{}, the request's was {}x{}: cells and boxes would land in the wrong places",
            original.width(),
            original.height(),
            resize.original_width,
            resize.original_height
        )));
    }
    let (gh, gw) = (trace.vision.grid_h, trace.vision.grid_w);
    let s1 = &trace.stage1;
    let mut kept = vec![None; gh * gw];
    for (i, &r) in s1.kept.iter().enumerate() {
        if let Some(slot) = kept.get_mut(r) {
            *slot = Some(s1.pillar.as_ref().map(|p| p[i]));
        }
    }
    let mut stage2 = vec![false; gh * gw];
    // Trace fields are public: an index off the grid is skipped, not a panic.
    let mark = |flags: &mut Vec<bool>, r: usize| {
        if let Some(f) = flags.get_mut(r) {
            *f = true;
        }
    };
    match &trace.stage2 {
        Some(rel) => rel.iter().filter_map(|&k| s1.kept.get(k)).for_each(|&r| mark(&mut stage2, r)),
        None => s1.kept.iter().for_each(|&r| mark(&mut stage2, r)),
    }
    let mut img = original.clone();
    let p = patch as f32;
    for (x, y, px) in img.enumerate_pixels_mut() {
        let [mx, my] = resize.to_model_point(x as f32 + 0.5, y as f32 + 0.5);
        let (c, r) = ((mx / p).floor(), (my / p).floor());
        let inside = c >= 0.0 && r >= 0.0 && (c as usize) < gw && (r as usize) < gh;
        if !inside || kept[r as usize * gw + c as usize].is_none() {
            px.0 = px.0.map(|v| (f32::from(v) * 0.3) as u8);
        }
    }
    let line = (img.width().max(img.height()) / 400).max(1) as i64;
    for r in 0..gh {
        for c in 0..gw {
            let Some(kind) = kept[r * gw + c] else { continue };
            let cell = resize.to_original_box([c as f32 * p, r as f32 * p, (c + 1) as f32 * p, (r + 1) as f32 * p]);
            let color = match kind {
                Some(true) => YELLOW,
                Some(false) => CYAN,
                None => GREEN,
            };
            rect(&mut img, cell, 0, line, color);
            if stage2[r * gw + c] && trace.stage2.is_some() {
                rect(&mut img, cell, 2 * line, line, WHITE);
            }
        }
    }
    for b in boxes {
        rect(&mut img, *b, 0, 2 * line + 1, RED);
    }
    img.save(out).map_err(|e| Error::Image(format!("cannot write {}: {e}", out.display())))
}
