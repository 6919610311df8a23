//! `--dump DIR`: every intermediate tensor of a request as `.npy` files plus `index.json`, so any stage can be
//! checked against a user's own reference in numpy.

use std::path::Path;

use serde_json::json;

use crate::error::{Error, Result};
use crate::npy::{self, NpyElement};
use crate::pipeline::Trace;

struct Writer<'a> {
    dir: &'a Path,
    index: serde_json::Map<String, serde_json::Value>,
}

impl Writer<'_> {
    fn put<T: NpyElement>(&mut self, name: &str, shape: &[usize], data: &[T], what: &str) -> Result<()> {
        let file = format!("{name}.npy");
        npy::write(self.dir.join(&file), shape, data)?;
        self.index.insert(name.into(), json!({ "file": file, "shape": shape, "dtype": T::DESCR, "description": what }));
        Ok(())
    }
}

fn to_i64(v: &[usize]) -> Vec<i64> {
    v.iter().map(|&x| x as i64).collect()
}

/// Removes the arrays an earlier dump listed in `dir`'s index.json, so that a reused directory holds only the new
/// request's (a pruned run's `stage1_pillar.npy` would otherwise outlive it beside an unpruned run's arrays). Only
/// plain `.npy` file names from the index are touched; anything else in the directory stays.
fn remove_earlier_dump(dir: &Path) -> Result<()> {
    let index = dir.join("index.json");
    let Ok(text) = std::fs::read_to_string(&index) else { return Ok(()) };
    let Ok(old) = serde_json::from_str::<serde_json::Value>(&text) else { return Ok(()) };
    let files = old.get("arrays").and_then(|a| a.as_object()).into_iter().flat_map(|a| a.values()).filter_map(|v| v.get("file")?.as_str());
    for name in files {
        let plain = Path::new(name).file_name().is_some_and(|f| f == name) && name.ends_with(".npy");
        let path = dir.join(name);
        if plain && path.is_file() {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    std::fs::remove_file(&index).map_err(|e| Error::io(&index, e))
}

/// Writes the trace of a request into `dir` (created if needed), replacing an earlier dump there.
pub fn write_trace(dir: &Path, trace: &Trace, extra: serde_json::Value) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let index_path = dir.join("index.json");
    if index_path.is_dir() {
        // Found before any array is written: arrays that no index lists could never be cleaned up by a later dump.
        return Err(Error::io(&index_path, std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory, not the dump's index")));
    }
    remove_earlier_dump(dir)?;
    // Checked before anything is written, like the index path above.
    let s1 = &trace.stage1;
    let kept2: Vec<usize> = match &trace.stage2 {
        Some(rel) => rel
            .iter()
            .map(|&k| {
                s1.kept.get(k).copied().ok_or_else(|| Error::Shape {
                    what: "trace stage2".into(),
                    message: format!("index {k} among {} Stage-1 tokens", s1.kept.len()),
                })
            })
            .collect::<Result<_>>()?,
        None => s1.kept.clone(),
    };
    let mut w = Writer { dir, index: serde_json::Map::new() };
    let contiguous = |what: &str| Error::Shape { what: what.into(), message: "not contiguous".into() };
    let px = &trace.pixels;
    w.put("pixel_values", px.shape(), px.as_slice().ok_or_else(|| contiguous("pixels"))?, "preprocessed pixels [1, 3, H, W]")?;
    let v = &trace.vision;
    w.put("vision_features", v.features.shape(), v.features.as_slice().ok_or_else(|| contiguous("features"))?, "pre-projector features [N, D], raster order")?;
    w.put("vision_similarity", v.similarity.shape(), v.similarity.as_slice().ok_or_else(|| contiguous("similarity"))?, "mean of the trailing hidden states [N, D], not normalised")?;
    if let Some(cls) = &v.cls_attention {
        w.put("vision_cls_attention", &[cls.len()], cls, "CLS attention over patches, summed over heads [N]")?;
    }
    w.put("stage1_kept", &[s1.kept.len()], &to_i64(&s1.kept), "raster index of each token kept by Stage 1, in sequence order")?;
    if let Some(p) = &s1.pillar {
        let flags: Vec<u8> = p.iter().map(|&b| u8::from(b)).collect();
        w.put("stage1_pillar", &[flags.len()], &flags, "1 = unchanged anchor (pillar / dominant), 0 = aggregated or merged")?;
    }
    w.put("stage1_tokens", s1.tokens.shape(), s1.tokens.as_standard_layout().as_slice().ok_or_else(|| contiguous("stage1"))?, "features after Stage 1 (aggregated), before the projector")?;
    let e = &trace.image_embeds;
    w.put("image_embeds", e.shape(), e.as_slice().ok_or_else(|| contiguous("image_embeds"))?, "projector output for the kept tokens")?;
    let l = &trace.layout;
    let ids: Vec<i64> = l.ids.iter().map(|&x| i64::from(x)).collect();
    w.put("prompt_ids", &[ids.len()], &ids, "prompt token ids, image placeholders included")?;
    w.put("prompt_positions", &[l.positions.len()], &l.positions, "RoPE position id of every prompt token")?;
    w.put("stage2_attention_row", &[trace.attention_row.len()], &trace.attention_row, "head-mean attention of the last prompt token at layer K-1 over the prompt")?;
    w.put("stage2_kept", &[kept2.len()], &to_i64(&kept2), "raster index of each visual token the decoder tail sees")?;
    let index = json!({
        "image_span": [l.image_span.start, l.image_span.end],
        "grid": [v.grid_h, v.grid_w],
        "request": extra,
        "arrays": w.index,
    });
    let path = dir.join("index.json");
    let text = serde_json::to_string_pretty(&index).map_err(|e| Error::InvalidRequest(e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
}
