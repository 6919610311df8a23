//! The model (immutable, loaded once, shareable) and a generation (one request's mutable state, pulled a token at a
//! time). A generation owns an `Arc` of its model, so neither borrows the other: a C caller can hold both as handles.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ndarray::{s, Array2, Array4, Axis};
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::boxes;
use crate::decoder::{DecoderHalf, Half, HalfOutput};
use crate::detok::StreamDecoder;
use crate::embeddings::Embeddings;
use crate::error::{Error, Result};
use crate::image::{self, ImageLimits, PixelBatch, ResizeRecord};
use crate::kv::KvCache;
use crate::manifest::Manifest;
use crate::prompt::{self, PromptLayout};
use crate::prune::{PositionPolicy, PruneConfig, Resolved, Stage1Result};
use crate::runtime::{Provider, Runtime, SessionOptions};
use crate::sampler::{Sampler, SamplerConfig};
use crate::stats::{ms_since, peak_rss_mb, Stats};
use crate::vision::{Projector, VisionEncoder, VisionTokens};

/// Decoded tokens a generation's KV caches reserve room for up front (beyond the prompt); more grow them.
const RESERVE_AHEAD: usize = 256;

/// The largest image file read (an encoded image over 256 MiB is far past what [`ImageLimits`] lets decode).
const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;

/// Reads an image file: a regular file of at most [`MAX_IMAGE_FILE_BYTES`], refused unread otherwise (a FIFO would
/// block, `/dev/zero` or a huge file would fill memory).
fn read_image_file(path: &Path) -> Result<Vec<u8>> {
    crate::manifest::read_bounded(path, MAX_IMAGE_FILE_BYTES).map_err(|e| Error::Image(format!("cannot read {}: {e}", path.display())))
}

/// How a model is loaded.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Execution provider asked for (CPU when it cannot be had).
    pub provider: Provider,
    /// Intra-op threads per session (None: ONNX Runtime's default; at most [`crate::runtime::MAX_INTRA_THREADS`]).
    pub intra_threads: Option<usize>,
    /// ONNX Runtime library (None: [`crate::runtime::find_library`]). A process loads one: a later model that names
    /// another library than the first is refused.
    pub ort_library: Option<PathBuf>,
    /// Load the unquantised vision graph (`vision.fp32_file`) instead of `vision.file`; a model without one is
    /// refused, not silently run quantised.
    pub vision_fp32: bool,
}

/// A loaded model: manifest, tokenizer, embedding table and the four sessions.
pub struct Model {
    manifest: Manifest,
    tokenizer: Arc<Tokenizer>,
    embeddings: Arc<Embeddings>,
    vision: VisionEncoder,
    projector: Projector,
    head: DecoderHalf,
    middle: Vec<DecoderHalf>,
    tail: DecoderHalf,
    notes: Vec<String>,
    runtime: Arc<Runtime>,
    /// For a tokenizer that keeps every input byte (ByteLevel pre-tokenizer, no normaliser), the most input bytes
    /// one token covers: a prompt longer than the context times this cannot fit. None for other tokenizers, which
    /// may drop or collapse text (whitespace splitting), so no length says a prompt will not fit.
    max_token_bytes: Option<usize>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("id", &self.manifest.id).field("dir", &self.manifest.dir).finish()
    }
}

/// The image of a request.
#[derive(Debug, Clone)]
pub enum ImageInput {
    /// An encoded image file (PNG or JPEG).
    Path(PathBuf),
    /// Encoded image bytes (PNG or JPEG).
    Encoded(Vec<u8>),
    /// Raw interleaved RGB8 pixels.
    Rgb {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// `width * height * 3` bytes.
        data: Vec<u8>,
    },
}

/// Generation settings of a request.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Token sampling.
    pub sampler: SamplerConfig,
    /// Image size limits (the minimum side is raised to the model's patch size).
    pub limits: ImageLimits,
    /// Visual token pruning.
    pub prune: PruneConfig,
    /// Keep the intermediate tensors of the request ([`Generation::trace`]) for `--dump` and `--viz`.
    pub record: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            max_new_tokens: 128,
            sampler: SamplerConfig::default(),
            limits: ImageLimits::default(),
            prune: PruneConfig::default(),
            record: false,
        }
    }
}

/// An image decoded, preprocessed and run through the vision tower, ready for any number of requests.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    /// The manifest id of the model that prepared it: the features belong to that model's vision tower and
    /// preprocessing, so another model refuses the image rather than running on them.
    pub model_id: String,
    /// Preprocessed pixels and the resize record.
    pub pixels: PixelBatch,
    /// The vision tower's outputs.
    pub vision: VisionTokens,
    /// Decoding and preprocessing time.
    pub preprocess_ms: f64,
    /// Vision tower time.
    pub vision_ms: f64,
}

/// The intermediate tensors of one request, kept when [`GenerationParams::record`] is set.
#[derive(Debug, Clone)]
pub struct Trace {
    /// Preprocessed pixels `[1, 3, H, W]`.
    pub pixels: Array4<f32>,
    /// Every vision output.
    pub vision: VisionTokens,
    /// What Stage 1 kept (indices, pillar flags, aggregated features).
    pub stage1: Stage1Result,
    /// Projector output for the kept tokens.
    pub image_embeds: Array2<f32>,
    /// The prompt layout (ids, positions, image span).
    pub layout: PromptLayout,
    /// The Stage-2 signal: head-mean attention of the last prompt token at layer K-1, over the prompt.
    pub attention_row: Vec<f32>,
    /// Stage-2 kept indices relative to the image span (None: Stage 2 kept everything).
    pub stage2: Option<Vec<usize>>,
}

/// One request: an image, a prompt and settings.
#[derive(Debug, Clone)]
pub struct Request {
    /// The image.
    pub image: ImageInput,
    /// The user's text.
    pub prompt: String,
    /// Settings.
    pub params: GenerationParams,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token was sampled.
    Eos,
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// The model's context length was reached.
    ContextFull,
    /// The caller ended it: [`Generation::stop`], or a [`Generation::run_to_end`] sink that returned false.
    Stopped,
}

/// What one pull of a generation gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// A token and the text it completed (possibly empty while a multi-byte character is incomplete).
    Token {
        /// Token id.
        id: u32,
        /// Newly completed text.
        text: String,
    },
    /// Generation has ended; `text` is what an incomplete character held back (usually empty). Further pulls
    /// return this again with empty text.
    Finished {
        /// Why it ended.
        reason: FinishReason,
        /// Remaining text.
        text: String,
    },
}

/// The result of a whole request.
#[derive(Debug, Clone, Serialize)]
pub struct Output {
    /// Generated text.
    pub text: String,
    /// Boxes found in the text, `[x1, y1, x2, y2]` in original-image pixels, clamped to the image; a box with no
    /// area on the image (wholly in the padding, or a point) is left out ([`boxes::extract_boxes`]).
    pub boxes: Vec<[f32; 4]>,
    /// Generated token ids (end-of-sequence excluded).
    pub tokens: Vec<u32>,
    /// Why generation stopped: None while it runs, and after a step failed.
    pub finish_reason: Option<FinishReason>,
    /// How the image was mapped to the model input.
    pub resize: ResizeRecord,
    /// Timings and counts.
    pub stats: Stats,
}

impl Model {
    /// Loads the model directory `dir`: manifest, ONNX Runtime, sessions (validated), tokenizer, embeddings.
    pub fn load(dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<Arc<Model>> {
        let mut manifest = Manifest::load(dir)?;
        // The manifest kept (and shown by `nuwa info`) names the vision graph actually loaded.
        if opts.vision_fp32 {
            match manifest.vision.fp32_file.clone() {
                Some(f) => manifest.vision.file = f,
                None => {
                    return Err(Error::InvalidRequest(format!(
                        "the unquantised vision graph was asked for (--vision-fp32), but the manifest of {} names no \
                         vision.fp32_file: this model ships only {}",
                        manifest.dir.display(),
                        manifest.vision.file
                    )))
                }
            }
        }
        // Cheap file checks first, so a broken directory fails before any graph is parsed.
        let emb_path = manifest.file(&manifest.embeddings.file);
        let embeddings = Arc::new(Embeddings::open(&emb_path, &manifest.embeddings)?);
        let tok_path = manifest.file(&manifest.tokenizer.file);
        if !tok_path.is_file() {
            return Err(Error::ModelFile { path: tok_path, message: "not found (named by manifest field tokenizer.file)".into() });
        }
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::ModelFile { path: tok_path.clone(), message: format!("not a tokenizer.json: {e}") })?;
        let runtime = Runtime::get(opts.ort_library.as_deref(), opts.intra_threads)?;
        let sopts = SessionOptions { provider: opts.provider, intra_threads: opts.intra_threads };
        let mut notes = Vec::new();
        let vision = VisionEncoder::load(&runtime, &manifest, &sopts, &mut notes)?;
        let projector = Projector::load(&runtime, &manifest, &sopts, &mut notes)?;
        let head = DecoderHalf::load(&runtime, &manifest, Half::Head, &embeddings, &sopts, &mut notes)?;
        let middle = (0..manifest.decoder.middle.len())
            .map(|i| DecoderHalf::load(&runtime, &manifest, Half::Middle(i), &embeddings, &sopts, &mut notes))
            .collect::<Result<Vec<_>>>()?;
        let tail = DecoderHalf::load(&runtime, &manifest, Half::Tail, &embeddings, &sopts, &mut notes)?;
        notes.dedup();
        let keeps_every_byte = tokenizer.get_normalizer().is_none()
            && matches!(tokenizer.get_pre_tokenizer(), Some(tokenizers::PreTokenizerWrapper::ByteLevel(_)));
        // A ByteLevel token's string has one char per input byte (an added token's, at most one per byte).
        let max_token_bytes =
            keeps_every_byte.then(|| tokenizer.get_vocab(true).keys().map(|k| k.chars().count()).max().unwrap_or(1).max(1));
        Ok(Arc::new(Model {
            manifest,
            tokenizer: Arc::new(tokenizer),
            embeddings,
            vision,
            projector,
            head,
            middle,
            tail,
            notes,
            runtime,
            max_token_bytes,
        }))
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Messages about requested execution providers that could not be used.
    pub fn provider_notes(&self) -> &[String] {
        &self.notes
    }

    /// The provider running the decoder (the bulk of the work).
    pub fn provider(&self) -> Provider {
        self.tail.provider
    }

    /// The embedding table.
    pub fn embeddings(&self) -> &Embeddings {
        &self.embeddings
    }

    /// The decoder segments in order: head, middle segments, tail.
    pub fn segments(&self) -> Vec<&DecoderHalf> {
        std::iter::once(&self.head).chain(&self.middle).chain(std::iter::once(&self.tail)).collect()
    }

    /// Empty KV caches for every segment, with room for `capacity` positions each (an error when that cannot be
    /// allocated).
    pub fn new_caches(&self, capacity: usize) -> Result<Vec<KvCache>> {
        self.segments().iter().map(|s| s.new_cache(capacity)).collect()
    }

    /// Runs `input` through every segment at `positions` (no pruning) and returns the last-position logits. Every
    /// position must lie in the model's context (`0..max_position_embeddings`).
    pub fn run_decoder(&self, input: ndarray::ArrayView2<'_, f32>, positions: &[i64], caches: &mut [KvCache]) -> Result<Vec<f32>> {
        let max = self.manifest.decoder.max_position_embeddings as i64;
        if let Some(bad) = positions.iter().find(|&&p| !(0..max).contains(&p)) {
            return Err(Error::ContextOverflow(format!("position {bad} is outside the model's context 0..{max}")));
        }
        let segments = self.segments();
        if caches.len() != segments.len() {
            return Err(Error::Shape { what: "decoder caches".into(), message: format!("{} caches for {} segments", caches.len(), segments.len()) });
        }
        let mut hidden: Option<Array2<f32>> = None;
        for (seg, cache) in segments.iter().zip(caches.iter_mut()) {
            let x = hidden.as_ref().map_or(input.view(), |h| h.view());
            match seg.run(x, positions, cache)? {
                HalfOutput::Head { hidden: h, .. } => hidden = Some(h),
                HalfOutput::Tail { logits } => return Ok(logits),
            }
        }
        Err(Error::Session { stage: "decoder tail", message: "the last segment returned hidden states".into() })
    }

    /// The ONNX Runtime in use.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Decodes (if needed) and preprocesses an image as the manifest says.
    pub fn preprocess(&self, input: &ImageInput, limits: &ImageLimits) -> Result<PixelBatch> {
        let mut limits = *limits;
        limits.min_side = limits.min_side.max(self.manifest.vision.patch_size as u32);
        let rgb = match input {
            ImageInput::Path(p) => image::decode_image(&read_image_file(p)?, &limits)?,
            ImageInput::Encoded(bytes) => image::decode_image(bytes, &limits)?,
            ImageInput::Rgb { width, height, data } => image::rgb_from_raw(*width, *height, data, &limits)?,
        };
        image::preprocess(&rgb, &self.manifest.image)
    }

    /// Runs the vision tower on a preprocessed image.
    pub fn encode_image(&self, pixels: &PixelBatch) -> Result<VisionTokens> {
        self.vision.encode(pixels)
    }

    /// Projects `[M, vision hidden]` tokens into the decoder's embedding space.
    pub fn project(&self, tokens: ndarray::ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        self.projector.project(tokens)
    }

    /// Embeds `layout`'s text tokens from the table and scatters `visual` (`[span len, hidden]`) into the image span.
    pub fn embed(&self, layout: &PromptLayout, visual: &Array2<f32>) -> Result<Array2<f32>> {
        self.embed_range(layout, 0..layout.len(), visual)
    }

    /// [`Model::embed`] for the tokens `range` of `layout` only.
    fn embed_range(&self, layout: &PromptLayout, range: std::ops::Range<usize>, visual: &Array2<f32>) -> Result<Array2<f32>> {
        let hidden = self.manifest.decoder.hidden_size;
        let span = layout.image_span.clone();
        // PromptLayout's fields are public: a span outside the ids (or reversed) must be an error, not a panic.
        if span.start > span.end || span.end > layout.ids.len() || layout.positions.len() != layout.ids.len() {
            return Err(Error::Shape {
                what: "prompt layout".into(),
                message: format!(
                    "image span {}..{} over {} ids with {} positions",
                    span.start,
                    span.end,
                    layout.ids.len(),
                    layout.positions.len()
                ),
            });
        }
        if visual.nrows() != span.len() || visual.ncols() != hidden {
            return Err(Error::Shape {
                what: "visual embeddings".into(),
                message: format!("[{}, {}] for an image span of {} tokens of width {hidden}", visual.nrows(), visual.ncols(), span.len()),
            });
        }
        let (lo, hi) = (range.start, range.end.min(layout.len()));
        let mut out = Array2::<f32>::zeros((hi.saturating_sub(lo), hidden));
        // text before the image, the image span, text after it: each clipped to the range, rows relative to `lo`
        let before = lo..span.start.clamp(lo, hi);
        let image = span.start.clamp(lo, hi)..span.end.clamp(lo, hi);
        let after = span.end.clamp(lo, hi)..hi;
        self.embeddings.gather_into(&layout.ids[before.clone()], out.slice_mut(s![before.start - lo..before.end - lo, ..]))?;
        out.slice_mut(s![image.start - lo..image.end - lo, ..])
            .assign(&visual.slice(s![image.start - span.start..image.end - span.start, ..]));
        self.embeddings.gather_into(&layout.ids[after.clone()], out.slice_mut(s![after.start - lo..after.end - lo, ..]))?;
        Ok(out)
    }

    /// Decodes, preprocesses and encodes an image once; any number of prompts and pruning settings can then run on
    /// it with [`Model::generate_prepared`] without repeating the vision tower.
    pub fn prepare(&self, image: &ImageInput, limits: &ImageLimits) -> Result<PreparedImage> {
        let t0 = Instant::now();
        let pixels = self.preprocess(image, limits)?;
        let preprocess_ms = ms_since(t0);
        let t = Instant::now();
        let vision = self.encode_image(&pixels)?;
        Ok(PreparedImage { model_id: self.manifest.id.clone(), pixels, vision, preprocess_ms, vision_ms: ms_since(t) })
    }

    /// Starts a request: image, vision tower, projector and prompt prefill. Pull tokens with [`Generation::step`].
    pub fn generate(self: &Arc<Self>, request: &Request) -> Result<Generation> {
        // Cheap checks before the vision tower runs.
        self.check_params(&request.prompt, &request.params)?;
        let image = self.prepare(&request.image, &request.params.limits)?;
        self.generate_prepared(&image, &request.prompt, &request.params)
    }

    fn check_params(&self, prompt: &str, params: &GenerationParams) -> Result<Resolved> {
        params.sampler.validate()?;
        if params.max_new_tokens == 0 {
            return Err(Error::InvalidRequest("max_new_tokens must be at least 1".into()));
        }
        if prompt.trim().is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        // Where no token covers more than max_token_bytes of the prompt, a prompt past the context on that count
        // alone is refused before it is tokenised (25 MB took 14 s and 4 GB to be found too long).
        let max_pos = self.manifest.decoder.max_position_embeddings;
        if let Some(longest) = self.max_token_bytes.map(|b| max_pos.saturating_mul(b)).filter(|&l| prompt.len() > l) {
            return Err(Error::ContextOverflow(format!(
                "the prompt is {} bytes: more than {max_pos} positions of this model's tokens can hold ({longest} bytes)",
                prompt.len()
            )));
        }
        let v = &self.manifest.vision;
        params.prune.resolve(v.grid_h, v.grid_w)
    }

    /// Starts a request on an image already prepared by [`Model::prepare`]. Timings count the preparation, so
    /// `ttft_ms` means the same as for [`Model::generate`].
    pub fn generate_prepared(self: &Arc<Self>, image: &PreparedImage, prompt: &str, params: &GenerationParams) -> Result<Generation> {
        self.check_params(prompt, params)?;
        let prefix = self.image_prefix(image, &params.prune)?;
        self.generate_with_prefix(&prefix, prompt, params)
    }

    /// The prompt-independent part of requests on `image` under `prune`: Stage 1, the projector, and the decoder
    /// layers that see every visual token (those before the in-decoder pruning point; all of them when `prune` never
    /// prunes inside the decoder) run over the tokens before the prompt text. Any number of prompts then start from it
    /// with [`Model::generate_with_prefix`], which gives the same result as [`Model::generate_prepared`] without
    /// repeating that work (when the prompt template puts text before the image, only Stage 1 and the projector are
    /// shared).
    pub fn image_prefix(&self, image: &PreparedImage, prune: &PruneConfig) -> Result<ImagePrefix> {
        self.check_prepared_here(image)?;
        let v = &self.manifest.vision;
        let resolved = prune.resolve(v.grid_h, v.grid_w)?;
        let tokens = &image.vision;
        let total_visual = tokens.features.nrows();

        let t = Instant::now();
        let stage1 = prune.stage1(&resolved, tokens)?;
        let stage1_ms = ms_since(t);
        let t = Instant::now();
        let visual = self.project(stage1.tokens.view())?;
        let projector_ms = ms_since(t);

        let slots: Vec<usize> = match resolved.positions {
            PositionPolicy::Original => stage1.kept.clone(),
            PositionPolicy::Contiguous => (0..stage1.kept.len()).collect(),
        };
        let slot_count = if resolved.positions == PositionPolicy::Original { total_visual } else { slots.len() };
        let mut prefix = ImagePrefix {
            prune: prune.clone(),
            image: image.clone(),
            stage1,
            visual,
            slots,
            slot_count,
            ids: Vec::new(),
            positions: Vec::new(),
            caches: Vec::new(),
            hidden: None,
            stage1_ms,
            projector_ms,
            decoder_ms: 0.0,
        };
        // Shared decoder work only when the text before the image does not depend on the prompt.
        let before_image = self.manifest.prompt.template.split_once("{image}").map(|(b, _)| b).unwrap_or("");
        if before_image.contains("{prompt}") {
            return Ok(prefix);
        }
        let probe = prompt::layout(&self.tokenizer, &self.manifest, "?", &prefix.slots, prefix.slot_count)?;
        let p = probe.image_span.end;
        let t = Instant::now();
        let embeds = self.embed_range(&probe, 0..p, &prefix.visual)?;
        let positions = &probe.positions[..p];
        let prune_at = self.prune_layer(prune);
        let in_decoder = prune.prunes_in_decoder(&resolved);
        let mut hidden = embeds;
        for seg in self.segments() {
            if in_decoder && seg.layers().start >= prune_at {
                break;
            }
            let mut cache = seg.new_cache(p)?;
            if let HalfOutput::Head { hidden: h, .. } = seg.run(hidden.view(), positions, &mut cache)? {
                hidden = h;
            }
            prefix.caches.push(cache);
        }
        if in_decoder {
            prefix.hidden = Some(hidden);
        }
        prefix.ids = probe.ids[..p].to_vec();
        prefix.positions = positions.to_vec();
        prefix.decoder_ms = ms_since(t);
        Ok(prefix)
    }

    /// Refuses an image prepared by another model (its features and resize record belong to that model).
    fn check_prepared_here(&self, image: &PreparedImage) -> Result<()> {
        if image.model_id != self.manifest.id {
            return Err(Error::InvalidRequest(format!(
                "the image was prepared by model {:?}, this model is {:?}: its features and resize record do not apply here; \
                 prepare it with this model",
                image.model_id, self.manifest.id
            )));
        }
        // The fields are public (and the id is a free-form string a copied directory keeps): the tensors must be
        // this tower's, or Stage 1 would run on another grid.
        let (v, t) = (&self.manifest.vision, &image.vision);
        let n = v.num_tokens();
        let shape_ok = (t.grid_h, t.grid_w) == (v.grid_h, v.grid_w)
            && t.features.dim() == (n, v.hidden_size)
            && t.similarity.dim() == (n, v.hidden_size)
            && t.cls_attention.as_ref().is_none_or(|c| c.len() == n);
        if !shape_ok {
            return Err(Error::Shape {
                what: "prepared image".into(),
                message: format!(
                    "grid {}x{}, features {:?}, similarity {:?}, CLS attention {:?}; this model's tower gives grid {}x{} and [{n}, {}]",
                    t.grid_h,
                    t.grid_w,
                    t.features.dim(),
                    t.similarity.dim(),
                    t.cls_attention.as_ref().map(Vec::len),
                    v.grid_h,
                    v.grid_w,
                    v.hidden_size
                ),
            });
        }
        Ok(())
    }

    /// The decoder layer where `prune` acts inside the decoder: FastV at the first decoder boundary (its own early
    /// cut when the export has one), Nüwa's Stage 2 at the split.
    fn prune_layer(&self, prune: &PruneConfig) -> usize {
        let d = &self.manifest.decoder;
        if prune.method == crate::prune::Method::FastV {
            d.head_end()
        } else {
            d.split_layer
        }
    }

    /// Starts a request from a shared [`ImagePrefix`] (built for the same pruning setting as `params.prune`).
    pub fn generate_with_prefix(self: &Arc<Self>, prefix: &ImagePrefix, prompt: &str, params: &GenerationParams) -> Result<Generation> {
        let resolved = self.check_params(prompt, params)?;
        self.check_prepared_here(&prefix.image)?;
        if !params.prune.same_selection(&prefix.prune) {
            return Err(Error::InvalidRequest(format!(
                "the image prefix was built for pruning {:?}, the request asks for {:?}",
                prefix.prune, params.prune
            )));
        }
        let image = &prefix.image;
        let shared_ms = image.preprocess_ms + image.vision_ms + prefix.stage1_ms + prefix.projector_ms + prefix.decoder_ms;
        let t0 = Instant::now().checked_sub(std::time::Duration::from_secs_f64(shared_ms.max(0.0) / 1e3)).unwrap_or_else(Instant::now);
        let sampler = params.sampler.build()?;
        let mut stats = Stats {
            provider: format!("{:?}", self.provider()).to_lowercase(),
            method: params.prune.method.to_string(),
            positions: format!("{:?}", resolved.positions).to_lowercase(),
            preprocess_ms: image.preprocess_ms,
            vision_ms: image.vision_ms,
            stage1_ms: prefix.stage1_ms,
            projector_ms: prefix.projector_ms,
            ..Stats::default()
        };
        stats.visual_tokens_in = image.vision.features.nrows();
        stats.visual_tokens_after_stage1 = prefix.stage1.kept.len();
        stats.kept_stage1 = prefix.stage1.kept.clone();

        let layout = prompt::layout(&self.tokenizer, &self.manifest, prompt, &prefix.slots, prefix.slot_count)?;
        let max_pos = self.manifest.decoder.max_position_embeddings as i64;
        if layout.next_position >= max_pos {
            return Err(Error::ContextOverflow(format!(
                "the prompt needs {} positions; the model has {max_pos}",
                layout.next_position
            )));
        }
        stats.prompt_tokens = layout.len();

        // Start after the shared prefix when its tokens are this prompt's first ones (always, unless the template
        // puts text before the image).
        let p = prefix.ids.len();
        let reuse = !prefix.caches.is_empty() && layout.ids.get(..p) == Some(&prefix.ids[..]) && layout.positions[..p] == prefix.positions[..];
        let from = if reuse { p } else { 0 };
        let t = Instant::now();
        let mut hidden = self.embed_range(&layout, from..layout.len(), &prefix.visual)?;
        let mut positions = layout.positions.clone();
        let mut span = layout.image_span.clone();
        let mut kept_now = prefix.stage1.kept.clone();
        let prune_at = self.prune_layer(&params.prune);
        // Rows reserved up front: the prompt's, plus one per decoded token up to RESERVE_AHEAD, and never past the
        // last position; a longer generation grows the caches by doubling (so a huge max_new_tokens on a long
        // context costs memory only as tokens come).
        let decodable = usize::try_from(max_pos - layout.next_position).unwrap_or(0);
        let capacity = layout.len() + params.max_new_tokens.min(decodable).min(RESERVE_AHEAD);
        let mut caches = Vec::new();
        let mut signal = Vec::new();
        let mut stage2 = None;
        let mut logits = None;
        for (si, seg) in self.segments().into_iter().enumerate() {
            // `hidden` holds rows `from..` of the current sequence; a shared segment continues its prefix cache.
            let shared = reuse && si < prefix.caches.len();
            let mut cache = if shared { prefix.caches[si].fork(capacity)? } else { seg.new_cache(capacity)? };
            cache.set_limit(layout.len() + params.max_new_tokens.min(decodable));
            let rows = if shared { p..positions.len() } else { 0..positions.len() };
            match seg.run(hidden.view(), &positions[rows], &mut cache)? {
                HalfOutput::Head { hidden: h, attention_row } => {
                    hidden = h;
                    if shared && si + 1 == prefix.caches.len() {
                        if let Some(ph) = &prefix.hidden {
                            // the pruning point: the whole sequence again, prefix rows from the shared run
                            hidden = ndarray::concatenate(Axis(0), &[ph.view(), hidden.view()]).map_err(|e| Error::Shape {
                                what: "prefix hidden states".into(),
                                message: e.to_string(),
                            })?;
                        }
                    }
                    if seg.layers().end == prune_at {
                        let t2 = Instant::now();
                        if let Some(rel) = params.prune.stage2(&resolved, &attention_row, span.clone())? {
                            let keep: Vec<usize> =
                                (0..span.start).chain(rel.iter().map(|&k| span.start + k)).chain(span.end..positions.len()).collect();
                            hidden = hidden.select(Axis(0), &keep);
                            positions = keep.iter().map(|&i| positions[i]).collect();
                            kept_now = rel.iter().map(|&k| kept_now[k]).collect();
                            span = span.start..span.start + rel.len();
                            stats.stage2_layer = Some(prune_at);
                            stage2 = Some(rel);
                        }
                        stats.stage2_ms = ms_since(t2);
                        signal = attention_row;
                    }
                }
                HalfOutput::Tail { logits: l } => logits = Some(l),
            }
            caches.push(cache);
        }
        let logits = logits.ok_or_else(|| Error::Session { stage: "decoder tail", message: "no logits".into() })?;
        stats.kept_stage2 = kept_now;
        stats.visual_tokens_after_stage2 = stats.kept_stage2.len();
        stats.visual_tokens_kept = stats.visual_tokens_after_stage2;
        stats.prefill_ms = ms_since(t) + if reuse { prefix.decoder_ms } else { 0.0 };
        let attention_row = signal;

        let trace = params.record.then(|| {
            Box::new(Trace {
                pixels: image.pixels.pixels.clone(),
                vision: image.vision.clone(),
                stage1: prefix.stage1.clone(),
                image_embeds: prefix.visual.clone(),
                layout: layout.clone(),
                attention_row,
                stage2,
            })
        });

        Ok(Generation {
            model: self.clone(),
            caches,
            sampler,
            detok: StreamDecoder::new(self.tokenizer.clone()),
            next_position: layout.next_position,
            logits: Some(logits),
            tokens: Vec::new(),
            text: String::new(),
            finished: None,
            failed: None,
            max_new_tokens: params.max_new_tokens,
            resize: image.pixels.resize,
            stats,
            started: t0,
            decode_started: None,
            decode_runs: 0,
            trace,
        })
    }
}

/// What requests on one image under one pruning setting share; see [`Model::image_prefix`].
#[derive(Debug, Clone)]
pub struct ImagePrefix {
    prune: PruneConfig,
    image: PreparedImage,
    stage1: Stage1Result,
    visual: Array2<f32>,
    slots: Vec<usize>,
    slot_count: usize,
    /// Token ids and positions of the shared tokens (those before the prompt text); empty when none are shared.
    ids: Vec<u32>,
    positions: Vec<i64>,
    /// KV of the shared tokens for the first `caches.len()` decoder segments.
    caches: Vec<KvCache>,
    /// Hidden states of the shared tokens at the in-decoder pruning point (when the setting prunes there).
    hidden: Option<Array2<f32>>,
    stage1_ms: f64,
    projector_ms: f64,
    decoder_ms: f64,
}

impl ImagePrefix {
    /// Tokens whose decoder work is shared (0: only Stage 1 and the projector are).
    pub fn shared_tokens(&self) -> usize {
        if self.caches.is_empty() {
            0
        } else {
            self.ids.len()
        }
    }

    /// Decoder segments whose KV of the shared tokens is kept.
    pub fn shared_segments(&self) -> usize {
        self.caches.len()
    }

    /// The pruning setting it was built for.
    pub fn prune(&self) -> &PruneConfig {
        &self.prune
    }
}

/// One request in flight: KV caches, sampler, detokeniser and the text so far.
pub struct Generation {
    model: Arc<Model>,
    caches: Vec<KvCache>,
    sampler: Box<dyn Sampler>,
    detok: StreamDecoder,
    next_position: i64,
    logits: Option<Vec<f32>>,
    tokens: Vec<u32>,
    text: String,
    finished: Option<FinishReason>,
    /// Set when a step failed: the generation's state is then unknown (logits spent, KV possibly half-written), so
    /// every later pull returns this error again instead of carrying on or reporting a normal finish.
    failed: Option<String>,
    max_new_tokens: usize,
    resize: ResizeRecord,
    stats: Stats,
    started: Instant,
    decode_started: Option<Instant>,
    /// Decoder runs on generated tokens (one per token fed back; the last token is not fed back when the limit or
    /// the context ends the generation, while a token followed by EOS or a stop is).
    decode_runs: usize,
    trace: Option<Box<Trace>>,
}

impl Generation {
    /// Samples the next token and runs the decoder on it; returns the token, or why generation ended. After an
    /// error (a failed ONNX Runtime run, logits the sampler refuses) the generation cannot go on: this and
    /// [`Generation::stop`] return an error naming the first failure from then on.
    pub fn step(&mut self) -> Result<Step> {
        self.check_not_failed()?;
        let step = self.advance();
        if let Err(e) = &step {
            self.failed = Some(e.to_string());
        }
        step
    }

    fn check_not_failed(&self) -> Result<()> {
        match &self.failed {
            Some(why) => Err(Error::InvalidRequest(format!("this generation failed earlier and cannot go on: {why}"))),
            None => Ok(()),
        }
    }

    fn advance(&mut self) -> Result<Step> {
        if let Some(reason) = self.finished {
            return Ok(Step::Finished { reason, text: String::new() });
        }
        let Some(logits) = self.logits.take() else {
            return self.finish(FinishReason::MaxTokens);
        };
        let id = self.sampler.sample(&logits)?;
        if self.tokens.is_empty() {
            self.stats.ttft_ms = ms_since(self.started);
            self.decode_started = Some(Instant::now());
        }
        if self.model.manifest.tokenizer.eos_token_ids.contains(&id) {
            return self.finish(FinishReason::Eos);
        }
        self.tokens.push(id);
        let text = self.detok.push(id)?.unwrap_or_default();
        self.text.push_str(&text);

        let max_pos = self.model.manifest.decoder.max_position_embeddings as i64;
        if self.tokens.len() >= self.max_new_tokens {
            self.finished = Some(FinishReason::MaxTokens);
        } else if self.next_position >= max_pos {
            self.finished = Some(FinishReason::ContextFull);
        } else {
            self.logits = Some(self.decode_one(id)?);
        }
        if self.finished.is_some() {
            self.flush_stats();
            let rest = self.detok.finish()?;
            self.text.push_str(&rest);
            return Ok(Step::Token { id, text: text + &rest });
        }
        Ok(Step::Token { id, text })
    }

    fn decode_one(&mut self, id: u32) -> Result<Vec<f32>> {
        let hidden = self.model.manifest.decoder.hidden_size;
        let mut embed = Array2::<f32>::zeros((1, hidden));
        self.model.embeddings.gather_into(&[id], embed.view_mut())?;
        let logits = self.model.run_decoder(embed.view(), &[self.next_position], &mut self.caches)?;
        self.next_position += 1;
        self.decode_runs += 1;
        Ok(logits)
    }

    fn finish(&mut self, reason: FinishReason) -> Result<Step> {
        self.finished = Some(reason);
        self.flush_stats();
        let rest = self.detok.finish()?;
        self.text.push_str(&rest);
        Ok(Step::Finished { reason, text: rest })
    }

    fn flush_stats(&mut self) {
        if let Some(t) = self.decode_started {
            self.stats.decode_ms = ms_since(t);
            self.stats.decode_ms_per_token = self.stats.decode_ms / self.decode_runs.max(1) as f64;
        }
        self.stats.generated_tokens = self.tokens.len();
        let (before, tail) = self.caches.split_at(self.caches.len().saturating_sub(1));
        let head_layers: usize = before.iter().map(KvCache::num_layers).sum();
        self.stats.kv_bytes_head = before.iter().map(KvCache::bytes_used).sum();
        self.stats.kv_bytes_tail = tail.iter().map(KvCache::bytes_used).sum();
        self.stats.kv_bytes_per_head_layer = self.stats.kv_bytes_head / head_layers.max(1);
        self.stats.kv_bytes_per_tail_layer = self.stats.kv_bytes_tail / tail.iter().map(KvCache::num_layers).sum::<usize>().max(1);
        self.stats.peak_rss_mb = peak_rss_mb();
    }

    /// The logits the next [`Generation::step`] will sample from, if it will sample.
    pub fn peek_logits(&self) -> Option<&[f32]> {
        self.logits.as_deref()
    }

    /// The request's intermediate tensors, when it was made with `record`.
    pub fn trace(&self) -> Option<&Trace> {
        self.trace.as_deref()
    }

    /// Text generated so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Token ids generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Whether generation has ended, normally or by an error.
    pub fn is_finished(&self) -> bool {
        self.finished.is_some() || self.failed.is_some()
    }

    /// Ends the generation before it would end by itself (a pull-style caller that wants no more tokens): the
    /// timings and KV sizes are final, [`Output::finish_reason`] says [`FinishReason::Stopped`], and further pulls
    /// return `Finished`. Returns `Finished` with the text an incomplete character held back; on a generation that
    /// has already ended it changes nothing and returns `Finished` with its reason and empty text.
    pub fn stop(&mut self) -> Result<Step> {
        self.check_not_failed()?;
        match self.finished {
            Some(reason) => Ok(Step::Finished { reason, text: String::new() }),
            None => self.finish(FinishReason::Stopped),
        }
    }

    /// Runs to the end, calling `sink` with each piece of text; `sink` returns false to stop early (the generation
    /// then ends as by [`Generation::stop`]).
    pub fn run_to_end(&mut self, mut sink: impl FnMut(&str) -> bool) -> Result<()> {
        loop {
            match self.step()? {
                Step::Token { text, .. } => {
                    if !text.is_empty() && !sink(&text) {
                        self.stop()?;
                        return Ok(());
                    }
                }
                Step::Finished { text, .. } => {
                    if !text.is_empty() {
                        sink(&text);
                    }
                    return Ok(());
                }
            }
        }
    }

    /// The result so far (complete once finished): text, boxes in original pixels, tokens, stats.
    pub fn output(&self) -> Output {
        let boxes = boxes::extract_boxes(&self.text, &self.model.manifest.box_format, &self.resize).into_iter().map(|b| b.original).collect();
        Output {
            text: self.text.clone(),
            boxes,
            tokens: self.tokens.clone(),
            finish_reason: self.finished,
            resize: self.resize,
            stats: self.stats.clone(),
        }
    }
}
