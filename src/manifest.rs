//! `manifest.json`: the typed description of a model directory (see docs/model-format.md).
//!
//! Loading parses and checks everything that can be checked without ONNX Runtime; `runtime.rs` then checks the
//! sessions' declared inputs and outputs against it. Every error names the manifest and the field.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::boxes::BoxFormat;
use crate::error::{Error, Result};
use crate::image::ImageConfig;

/// The manifest format this runtime reads.
pub const FORMAT_VERSION: u32 = 1;

/// The longest context a manifest may declare (16M positions): above any released model's, and small enough that
/// positions stay exact as `i64` and the sizes derived from them cannot wrap.
pub const MAX_POSITIONS: usize = 1 << 24;

/// The largest `manifest.json` read (a manifest is a few kB; a path to a device or a huge file is refused unread).
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// The most decoder layers a manifest may declare (the largest open models have ~130): the loaders build names per
/// layer before a graph can say otherwise, so a corrupt count must not reach them.
pub const MAX_DECODER_LAYERS: usize = 4096;

/// A parsed and validated `manifest.json`, plus the directory it came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version; must equal [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Model id (the directory name under `models/` by convention).
    pub id: String,
    /// Model family; only `llava` is defined.
    pub architecture: String,
    /// Where the export came from (free-form, informative).
    #[serde(default)]
    pub source: serde_json::Value,
    /// Image preprocessing.
    pub image: ImageConfig,
    /// Vision tower graph.
    pub vision: VisionSpec,
    /// Projector graph.
    pub projector: ProjectorSpec,
    /// Token-embedding table.
    pub embeddings: EmbeddingSpec,
    /// Split decoder.
    pub decoder: DecoderSpec,
    /// Tokenizer and special tokens.
    pub tokenizer: TokenizerSpec,
    /// Prompt layout rendered from the chat template.
    pub prompt: PromptSpec,
    /// How box answers are written.
    pub box_format: BoxFormat,
    /// Where the exporter placed the in-decoder pruning (restates the decoder's split; checked to agree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruning: Option<PruningSpec>,
    /// Quantisation report written by the exporter (informative).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<serde_json::Value>,
    /// The directory holding the model files (not part of the JSON).
    #[serde(skip)]
    pub dir: PathBuf,
}

/// The manifest's `pruning` block: the layers the exporter split the decoder at for pruning. It restates
/// `decoder.split_layer` (Stage 2) and `decoder.head_end()` (FastV's cut); [`Manifest::validate`] refuses a copy
/// where they disagree, since the runtime prunes where the graphs are split, whatever this block says.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruningSpec {
    /// First decoder layer that sees only the Stage-2 selection.
    pub stage2_layer: usize,
    /// First decoder layer that sees only FastV's selection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fastv_layer: Option<usize>,
}

/// The vision tower graph and its Stage-1 signals.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionSpec {
    /// Graph the runtime loads.
    pub file: String,
    /// Unquantised reference graph.
    #[serde(default)]
    pub fp32_file: Option<String>,
    /// Pixel input name, f32 [1, 3, H, W].
    pub input: String,
    /// Pre-projector features output, f32 [1, N, D].
    pub features_output: String,
    /// CLS attention metric output, f32 [1, N]; absent for towers without CLS.
    #[serde(default)]
    pub cls_attention_output: Option<String>,
    /// Similarity features output, f32 [1, N, D].
    pub similarity_output: String,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Patch rows.
    pub grid_h: usize,
    /// Patch columns.
    pub grid_w: usize,
    /// Feature width D.
    pub hidden_size: usize,
    /// Transformer layers in the tower.
    pub num_layers: usize,
    /// Whether the tower has a CLS token.
    pub has_cls: bool,
    /// Hugging Face hidden_states index of the features.
    pub feature_layer: i64,
    /// Hugging Face attentions index of the metric.
    pub metric_layer: i64,
    /// Number of trailing hidden states averaged for similarity.
    pub similarity_layers: usize,
}

impl VisionSpec {
    /// Number of visual tokens the tower produces.
    pub fn num_tokens(&self) -> usize {
        self.grid_h * self.grid_w
    }
}

/// The projector graph.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectorSpec {
    /// Graph file.
    pub file: String,
    /// Input name, f32 [1, M, vision hidden].
    pub input: String,
    /// Output name, f32 [1, M, decoder hidden].
    pub output: String,
}

/// Element type of the embedding table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EmbeddingDtype {
    /// IEEE half precision.
    #[serde(rename = "f16")]
    F16,
    /// IEEE single precision.
    #[serde(rename = "f32")]
    F32,
    /// Symmetric int8 with one scale per row: each row is a little-endian f32 scale followed by `cols` signed bytes,
    /// value = scale * byte (a quarter of f32, half of f16).
    #[serde(rename = "q8_row")]
    Q8Row,
}

impl EmbeddingDtype {
    /// [`EmbeddingDtype::row_bytes`], or None where it overflows.
    pub fn checked_row_bytes(self, cols: usize) -> Option<usize> {
        match self {
            EmbeddingDtype::F16 => cols.checked_mul(2),
            EmbeddingDtype::F32 => cols.checked_mul(4),
            EmbeddingDtype::Q8Row => cols.checked_add(4),
        }
    }

    /// Bytes of one row of `cols` values ([`EmbeddingDtype::checked_row_bytes`]; a table whose row size overflows
    /// is refused when it is opened, so this saturates rather than wraps).
    pub fn row_bytes(self, cols: usize) -> usize {
        self.checked_row_bytes(cols).unwrap_or(usize::MAX)
    }

    /// Alignment the table's offset must have (the element size; 1 for the byte-addressed q8_row rows).
    pub fn align(self) -> usize {
        match self {
            EmbeddingDtype::F16 => 2,
            EmbeddingDtype::F32 => 4,
            EmbeddingDtype::Q8Row => 1,
        }
    }
}

/// Where the token-embedding table lies (memory-mapped, row-major [rows, cols]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingSpec {
    /// File holding the table.
    pub file: String,
    /// Byte offset of row 0.
    #[serde(default)]
    pub offset: u64,
    /// Element type.
    pub dtype: EmbeddingDtype,
    /// Vocabulary rows.
    pub rows: usize,
    /// Hidden columns.
    pub cols: usize,
}

/// The decoder, split at `split_layer` into a head and a tail graph.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderSpec {
    /// Total decoder layers N.
    pub num_layers: usize,
    /// First layer of the tail, K (head = [0, K), tail = [K, N)).
    pub split_layer: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size (logits width).
    pub vocab_size: usize,
    /// Longest sequence of positions the model supports.
    pub max_position_embeddings: usize,
    /// KV element type; only `f32` is defined.
    #[serde(default = "default_kv_dtype")]
    pub kv_dtype: String,
    /// Head graph: layers [0, first middle segment's first layer), or [0, split_layer) without middle segments.
    pub head: DecoderHeadSpec,
    /// Optional segments between head and tail (contiguous, ending at split_layer): each boundary is a place to prune;
    /// FastV prunes at the first boundary, Nüwa's Stage 2 at split_layer.
    #[serde(default)]
    pub middle: Vec<DecoderMiddleSpec>,
    /// Tail graph: layers [split_layer, num_layers).
    pub tail: DecoderTailSpec,
}

impl DecoderSpec {
    /// Last layer (exclusive) of the head graph.
    pub fn head_end(&self) -> usize {
        self.middle.first().map_or(self.split_layer, |m| m.first_layer)
    }
}

/// Tensor names and layers of a middle decoder segment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderMiddleSpec {
    /// Graph file.
    pub file: String,
    /// First layer (inclusive, global).
    pub first_layer: usize,
    /// Last layer (exclusive, global).
    pub last_layer: usize,
    /// Hidden states input.
    pub hidden_states: String,
    /// Position ids, i64 [1, S].
    pub position_ids: String,
    /// Past keys, `%d` = global layer index.
    pub past_key: String,
    /// Past values, `%d` = global layer index.
    pub past_value: String,
    /// Hidden states output.
    pub output: String,
    /// New keys output, `%d` = global layer index.
    pub new_key: String,
    /// New values output, `%d` = global layer index.
    pub new_value: String,
    /// Attention row of the last query at layer last_layer - 1, f32 [1, P + S].
    pub attention_row: String,
}

fn default_kv_dtype() -> String {
    "f32".into()
}

/// Tensor names of the decoder head graph.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderHeadSpec {
    /// Graph file.
    pub file: String,
    /// Input embeddings, f32 [1, S, hidden].
    pub inputs_embeds: String,
    /// Position ids, i64 [1, S].
    pub position_ids: String,
    /// Past keys, `%d` = global layer index.
    pub past_key: String,
    /// Past values, `%d` = global layer index.
    pub past_value: String,
    /// Hidden states output.
    pub hidden_states: String,
    /// New keys output, `%d` = global layer index.
    pub new_key: String,
    /// New values output, `%d` = global layer index.
    pub new_value: String,
    /// Stage-2 signal output, f32 [1, P + S].
    pub attention_row: String,
}

/// Tensor names of the decoder tail graph.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderTailSpec {
    /// Graph file.
    pub file: String,
    /// Hidden states input.
    pub hidden_states: String,
    /// Position ids, i64 [1, S].
    pub position_ids: String,
    /// Past keys, `%d` = global layer index.
    pub past_key: String,
    /// Past values, `%d` = global layer index.
    pub past_value: String,
    /// Last-position logits output, f32 [1, vocab]; exactly one of `logits` and `final_hidden` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logits: Option<String>,
    /// Last-position hidden state after the final norm, f32 [1, hidden], for a tied lm_head: the runtime applies the
    /// `embeddings` table itself (logits = table[..vocab] x final_hidden), so the table is stored once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_hidden: Option<String>,
    /// New keys output, `%d` = global layer index.
    pub new_key: String,
    /// New values output, `%d` = global layer index.
    pub new_value: String,
}

/// Tokenizer file and special tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSpec {
    /// tokenizer.json file.
    pub file: String,
    /// Beginning-of-sequence id, if the model uses one.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// Ids that end generation.
    pub eos_token_ids: Vec<u32>,
    /// Padding id (informative).
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Text of the image placeholder token.
    pub image_token: String,
    /// Id of the image placeholder token.
    pub image_token_id: u32,
}

/// Prompt layout rendered from the chat template.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSpec {
    /// Template with exactly one `{image}` and one `{prompt}`.
    pub template: String,
    /// Whether to prepend the BOS id.
    pub add_bos: bool,
}

/// Formats `%d` in a per-layer tensor name template.
pub fn layer_name(template: &str, layer: usize) -> String {
    template.replacen("%d", &layer.to_string(), 1)
}

/// The metadata of `path`, which must be a regular file: anything else (a FIFO, whose opening blocks; a device; a
/// directory) is an `InvalidInput` error saying so, found without opening it.
pub(crate) fn regular_file_metadata(path: &Path) -> std::io::Result<std::fs::Metadata> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"));
    }
    Ok(meta)
}

/// Reads a file of at most `cap` bytes. One that is not a regular file is refused before it is opened (opening a
/// FIFO blocks; a device such as /dev/zero never ends), and a larger one before it is read; the refusals are
/// `InvalidInput` errors saying why.
pub(crate) fn read_bounded(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Error as IoError, ErrorKind, Read};
    let refuse = |why: String| IoError::new(ErrorKind::InvalidInput, why);
    let meta = regular_file_metadata(path)?;
    if meta.len() > cap {
        return Err(refuse(format!("{} bytes; at most {cap} are read", meta.len())));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(refuse(format!("grew past {cap} bytes while read")));
    }
    Ok(bytes)
}

impl Manifest {
    /// Reads and validates `<dir>/manifest.json`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("manifest.json");
        if !dir.is_dir() {
            return Err(Error::ModelFile { path: dir.to_path_buf(), message: "model directory does not exist".into() });
        }
        let bytes = read_bounded(&path, MAX_MANIFEST_BYTES).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidInput => Error::ModelFile { path: path.clone(), message: e.to_string() },
            _ => Error::io(&path, e),
        })?;
        let text = String::from_utf8(bytes).map_err(|e| Error::Manifest { path: path.clone(), message: format!("not UTF-8: {e}") })?;
        let mut manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::Manifest { path: path.clone(), message: e.to_string() })?;
        manifest.dir = dir.to_path_buf();
        manifest.validate()?;
        Ok(manifest)
    }

    /// Path of the manifest file.
    pub fn path(&self) -> PathBuf {
        self.dir.join("manifest.json")
    }

    /// Resolves a file named in the manifest against the model directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn err(&self, message: impl Into<String>) -> Error {
        Error::Manifest { path: self.path(), message: message.into() }
    }

    /// Checks the manifest's internal consistency (files and sessions are checked at load).
    pub fn validate(&self) -> Result<()> {
        let check = |ok: bool, message: String| if ok { Ok(()) } else { Err(self.err(message)) };
        check(
            self.format_version == FORMAT_VERSION,
            format!("format_version is {}, this runtime reads {FORMAT_VERSION}", self.format_version),
        )?;
        check(self.architecture == "llava", format!("architecture {:?} is not supported (only \"llava\")", self.architecture))?;

        let im = &self.image;
        let v = &self.vision;
        check(v.patch_size > 0 && v.grid_h > 0 && v.grid_w > 0, "vision.patch_size, grid_h and grid_w must be positive".into())?;
        // Products that wrap in a release build would pass the size check below with absurd values.
        check(
            v.grid_h.checked_mul(v.grid_w).is_some_and(|n| n <= crate::prune::MAX_GRID_TOKENS),
            format!("vision grid {}x{} has more than {} patches", v.grid_h, v.grid_w, crate::prune::MAX_GRID_TOKENS),
        )?;
        check(
            v.grid_h.checked_mul(v.patch_size) == Some(im.height as usize) && v.grid_w.checked_mul(v.patch_size) == Some(im.width as usize),
            format!(
                "image is {}x{} (height x width) but vision grid {}x{} of {} px patches needs {}x{}",
                im.height,
                im.width,
                v.grid_h,
                v.grid_w,
                v.patch_size,
                v.grid_h.saturating_mul(v.patch_size),
                v.grid_w.saturating_mul(v.patch_size)
            ),
        )?;
        check(v.hidden_size > 0, "vision.hidden_size must be positive".into())?;
        // What the export computed inside the graph; checked so that `nuwa info` and dumps never describe a tower
        // that cannot exist (hidden_states has num_layers + 1 entries, attentions num_layers).
        let (layers, states) = (v.num_layers as i64, v.num_layers as i64 + 1);
        check(v.num_layers > 0, "vision.num_layers must be positive".into())?;
        check(
            (-states..states).contains(&v.feature_layer),
            format!("vision.feature_layer {} is not a hidden_states index of a {}-layer tower", v.feature_layer, v.num_layers),
        )?;
        check(
            (-layers..layers).contains(&v.metric_layer),
            format!("vision.metric_layer {} is not an attentions index of a {}-layer tower", v.metric_layer, v.num_layers),
        )?;
        check(
            (1..=states).contains(&(v.similarity_layers as i64)),
            format!("vision.similarity_layers {} must lie in [1, {states}]", v.similarity_layers),
        )?;
        // The request-time check, here so that a bad value is a manifest error at load, not a failure of every
        // request that does not name the manifest.
        im.validate().map_err(|m| self.err(m))?;
        check(
            v.cls_attention_output.is_some() == v.has_cls,
            "vision.cls_attention_output must be given exactly when vision.has_cls is true".into(),
        )?;

        let d = &self.decoder;
        check(
            (2..=MAX_DECODER_LAYERS).contains(&d.num_layers),
            format!("decoder.num_layers must lie in [2, {MAX_DECODER_LAYERS}], got {}", d.num_layers),
        )?;
        check(
            d.split_layer >= 1 && d.split_layer < d.num_layers,
            format!("decoder.split_layer {} must lie in [1, {})", d.split_layer, d.num_layers),
        )?;
        check(
            d.num_key_value_heads > 0 && d.num_attention_heads > 0 && d.num_attention_heads.is_multiple_of(d.num_key_value_heads),
            format!(
                "decoder.num_attention_heads {} must be a multiple of num_key_value_heads {}",
                d.num_attention_heads, d.num_key_value_heads
            ),
        )?;
        check(d.head_dim > 0 && d.hidden_size > 0 && d.vocab_size > 0, "decoder dimensions must be positive".into())?;
        check(d.kv_dtype == "f32", format!("decoder.kv_dtype {:?} is not supported (only \"f32\")", d.kv_dtype))?;
        check(d.max_position_embeddings > v.num_tokens(), "decoder.max_position_embeddings is shorter than one image".into())?;
        check(
            d.max_position_embeddings <= MAX_POSITIONS,
            format!("decoder.max_position_embeddings {} is above the {MAX_POSITIONS} this runtime supports", d.max_position_embeddings),
        )?;
        for (field, name) in [
            ("decoder.head.past_key", &d.head.past_key),
            ("decoder.head.past_value", &d.head.past_value),
            ("decoder.head.new_key", &d.head.new_key),
            ("decoder.head.new_value", &d.head.new_value),
            ("decoder.tail.past_key", &d.tail.past_key),
            ("decoder.tail.past_value", &d.tail.past_value),
            ("decoder.tail.new_key", &d.tail.new_key),
            ("decoder.tail.new_value", &d.tail.new_value),
        ] {
            check(name.matches("%d").count() == 1, format!("{field} {name:?} must contain %d exactly once"))?;
        }

        let mut at = d.head_end();
        check(at >= 1, "decoder.middle[0].first_layer must be at least 1 (the head needs a layer)".into())?;
        for (i, mid) in d.middle.iter().enumerate() {
            check(
                mid.first_layer == at && mid.last_layer > mid.first_layer,
                format!(
                    "decoder.middle[{i}] covers layers [{}, {}) but must start at {at} and be non-empty",
                    mid.first_layer, mid.last_layer
                ),
            )?;
            for (field, name) in [("past_key", &mid.past_key), ("past_value", &mid.past_value), ("new_key", &mid.new_key), ("new_value", &mid.new_value)] {
                check(name.matches("%d").count() == 1, format!("decoder.middle[{i}].{field} {name:?} must contain %d exactly once"))?;
            }
            at = mid.last_layer;
        }
        check(
            at == d.split_layer,
            format!("decoder.middle segments end at layer {at} but decoder.split_layer is {}", d.split_layer),
        )?;

        if let Some(pr) = &self.pruning {
            check(
                pr.stage2_layer == d.split_layer,
                format!("pruning.stage2_layer {} differs from decoder.split_layer {}", pr.stage2_layer, d.split_layer),
            )?;
            if let Some(f) = pr.fastv_layer {
                check(
                    f == d.head_end(),
                    format!("pruning.fastv_layer {f} differs from the decoder's first cut, layer {}", d.head_end()),
                )?;
            }
        }

        check(
            d.tail.logits.is_some() != d.tail.final_hidden.is_some(),
            "decoder.tail must name exactly one of `logits` (lm_head inside the graph) and `final_hidden` (lm_head = the embeddings table)".into(),
        )?;
        let e = &self.embeddings;
        check(
            e.cols == d.hidden_size,
            format!("embeddings.cols {} differs from decoder.hidden_size {}", e.cols, d.hidden_size),
        )?;
        check(
            e.rows >= d.vocab_size,
            format!("embeddings.rows {} is smaller than decoder.vocab_size {}", e.rows, d.vocab_size),
        )?;

        let t = &self.tokenizer;
        let vocab = d.vocab_size as u64;
        for (field, id) in t
            .bos_token_id
            .iter()
            .map(|&id| ("tokenizer.bos_token_id", id))
            .chain(t.eos_token_ids.iter().map(|&id| ("tokenizer.eos_token_ids", id)))
            .chain(std::iter::once(("tokenizer.image_token_id", t.image_token_id)))
        {
            check(u64::from(id) < vocab, format!("{field} {id} is outside the vocabulary ({vocab})"))?;
        }
        check(!t.eos_token_ids.is_empty(), "tokenizer.eos_token_ids is empty".into())?;
        check(!t.image_token.is_empty(), "tokenizer.image_token is empty".into())?;
        check(
            !self.prompt.add_bos || t.bos_token_id.is_some(),
            "prompt.add_bos is true but tokenizer.bos_token_id is null".into(),
        )?;
        let p = &self.prompt.template;
        check(
            p.matches("{image}").count() == 1 && p.matches("{prompt}").count() == 1,
            format!("prompt.template {p:?} must contain {{image}} and {{prompt}} exactly once"),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_are_global() {
        assert_eq!(layer_name("past_key.%d", 17), "past_key.17");
    }

    fn models() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models")
    }

    /// Loads `models/<id>/manifest.json` after `edit`, from a scratch directory (validation reads no other file).
    fn load_edited(id: &str, edit: impl FnOnce(&mut serde_json::Value)) -> Result<Manifest> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let text = std::fs::read_to_string(models().join(id).join("manifest.json")).unwrap();
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        edit(&mut json);
        let dir = std::env::temp_dir().join(format!("nuwa-manifest-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("manifest.json"), serde_json::to_string_pretty(&json).unwrap()).unwrap();
        let loaded = Manifest::load(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        loaded
    }

    fn load_err(id: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let err = load_edited(id, edit).unwrap_err().to_string();
        assert!(err.contains("manifest.json"), "the error names the manifest: {err}");
        err
    }

    #[test]
    fn every_shipped_manifest_loads_and_its_pruning_block_is_read() {
        let mut seen = 0;
        for entry in std::fs::read_dir(models()).unwrap() {
            let dir = entry.unwrap().path();
            if !dir.join("manifest.json").is_file() {
                continue;
            }
            let m = Manifest::load(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let p = m.pruning.as_ref().unwrap_or_else(|| panic!("{}: pruning block", dir.display()));
            assert_eq!(p.stage2_layer, m.decoder.split_layer);
            assert_eq!(p.fastv_layer, Some(m.decoder.head_end()));
            seen += 1;
        }
        assert!(seen >= 3, "{seen} manifests");
    }

    #[test]
    fn misspelled_keys_are_refused_in_every_section() {
        // Before, only `image` refused unknown keys: `"ofset": 64` loaded the table from offset 0.
        type Section = fn(&mut serde_json::Value) -> &mut serde_json::Value;
        let sections: [(&str, Section); 11] = [
            ("top level", |m| m),
            ("vision", |m| &mut m["vision"]),
            ("projector", |m| &mut m["projector"]),
            ("embeddings", |m| &mut m["embeddings"]),
            ("decoder", |m| &mut m["decoder"]),
            ("decoder.head", |m| &mut m["decoder"]["head"]),
            ("decoder.middle[0]", |m| &mut m["decoder"]["middle"][0]),
            ("decoder.tail", |m| &mut m["decoder"]["tail"]),
            ("tokenizer", |m| &mut m["tokenizer"]),
            ("prompt", |m| &mut m["prompt"]),
            ("pruning", |m| &mut m["pruning"]),
        ];
        for (section, at) in sections {
            let err = load_err("tiny-llava-dinov2", |m| {
                at(m).as_object_mut().unwrap().insert("ofset".into(), 64.into());
            });
            assert!(err.contains("unknown field `ofset`"), "{section}: {err}");
        }
        let err = load_err("tiny-llava-clip", |m| {
            let e = m["embeddings"].as_object_mut().unwrap();
            let offset = e.remove("offset").unwrap();
            e.insert("ofset".into(), offset);
        });
        assert!(err.contains("unknown field `ofset`") && err.contains("`offset`"), "{err}");
    }

    #[test]
    fn a_pruning_block_that_disagrees_with_the_decoder_is_refused() {
        let err = load_err("tiny-llava-dinov2", |m| m["pruning"]["stage2_layer"] = 2.into());
        assert!(err.contains("pruning.stage2_layer 2 differs from decoder.split_layer 3"), "{err}");
        let err = load_err("tiny-llava-dinov2", |m| m["pruning"]["fastv_layer"] = 2.into());
        assert!(err.contains("pruning.fastv_layer 2") && err.contains("layer 1"), "{err}");
        // Without a middle segment FastV's cut is the split itself.
        let err = load_err("tiny-llava-clip", |m| m["pruning"]["fastv_layer"] = 1.into());
        assert!(err.contains("pruning.fastv_layer 1") && err.contains("layer 2"), "{err}");
        // The block is optional, and so is its fastv_layer.
        assert!(load_edited("tiny-llava-clip", |m| {
            m.as_object_mut().unwrap().remove("pruning");
        })
        .unwrap()
        .pruning
        .is_none());
        let m = load_edited("tiny-llava-dinov2", |m| {
            m["pruning"].as_object_mut().unwrap().remove("fastv_layer");
        })
        .unwrap();
        assert_eq!(m.pruning.map(|p| (p.stage2_layer, p.fastv_layer)), Some((3, None)));
    }

    #[test]
    fn an_absurd_decoder_layer_count_is_refused_before_any_graph_is_opened() {
        // Before, the decoder loader built 4 x 2e8 tensor names for the tail and the process aborted.
        let err = load_err("tiny-llava-clip", |m| m["decoder"]["num_layers"] = 200_000_000.into());
        assert!(err.contains("decoder.num_layers") && err.contains("4096") && err.contains("200000000"), "{err}");
        load_edited("tiny-llava-clip", |m| {
            m["decoder"]["num_layers"] = MAX_DECODER_LAYERS.into();
            m["pruning"].as_object_mut().unwrap().remove("fastv_layer");
        })
        .unwrap();
    }

    #[test]
    fn image_values_that_preprocessing_refuses_are_refused_at_load() {
        // Before, a negative std loaded and every request then failed with an image error naming no manifest.
        for (field, value, needle) in [
            ("std", serde_json::json!([-0.229, 0.224, 0.225]), "image.std"),
            ("std", serde_json::json!([0.0, 0.224, 0.225]), "image.std"),
            ("rescale", serde_json::json!(-1.0), "image.rescale"),
        ] {
            let err = load_err("tiny-llava-clip", |m| m["image"][field] = value);
            assert!(err.contains(needle), "{field}: {err}");
        }
    }
}
