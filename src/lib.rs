//! nuwa: an on-device VLM inference runtime with Nüwa visual token pruning, on ONNX Runtime.
//!
//! # Pipeline
//! A model directory (`models/<id>/`, see `docs/model-format.md`) holds four ONNX graphs and a `manifest.json` that
//! names every file, tensor, dimension and token id; nothing model-specific is hard-coded here. One request runs:
//!
//! 1. **preprocess** ([`image`]): decode with size limits checked from the header, resize/pad/crop as the manifest
//!    says, normalise; the [`image::ResizeRecord`] maps boxes back to original pixels.
//! 2. **vision** ([`vision`]): the tower gives pre-projector features plus the Stage-1 signals (CLS attention,
//!    similarity features).
//! 3. **stage 1** ([`prune`]): visual tokens are selected and aggregated *before* the projector; kept tokens keep their
//!    original raster index.
//! 4. **project** and **prompt** ([`prompt`]): the chat template gets one placeholder per kept token; every token gets
//!    the position it would have had without pruning.
//! 5. **decoder head** ([`decoder`]): layers `[0, K)` over all Stage-1 tokens; it also returns the head-mean attention
//!    row of the last prompt token at layer K-1, the Stage-2 signal.
//! 6. **stage 2** and **decoder tail**: only the kept visual tokens enter layers `[K, N)`, whose KV cache is shorter.
//! 7. **decode** ([`pipeline::Generation::step`]): pull one token at a time; head then tail per step; caches are
//!    appended in place ([`kv`]); text is streamed UTF-8-safely ([`detok`]); boxes are parsed ([`boxes`]).
//!
//! # Design decisions
//! - [`pipeline::Model`] is immutable and shared (`Arc`); a [`pipeline::Generation`] owns its state and an `Arc` of the
//!   model, so no borrowed lifetime crosses an API boundary (the C API holds both as handles).
//! - ONNX Runtime is loaded dynamically, once per process ([`runtime::Runtime`]); CUDA/CoreML are tried when asked and
//!   fall back to CPU with a note saying which provider runs.
//! - The token-embedding table is memory-mapped, never loaded into a session; for tied `lm_head` models it is read
//!   straight out of the tail graph's weight file, so it ships once.
//! - Errors are one [`Error`] enum whose messages name the file, field or tensor involved; no input can panic.
//! - Model files must not be modified while a model is loaded (the embedding table is memory-mapped).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod bench;
pub mod boxes;
pub mod decoder;
pub mod detok;
pub mod dump;
pub mod embeddings;
pub mod error;
pub mod eval;
pub mod image;
pub mod kv;
pub mod manifest;
pub mod npy;
pub mod pipeline;
pub mod prompt;
pub mod prune;
pub mod runtime;
pub mod sampler;
pub mod stats;
pub mod vision;
pub mod viz;

pub use error::{Error, Result};
pub use pipeline::{GenerationParams, ImageInput, LoadOptions, Model, Output, Request, Step};
pub use runtime::Provider;
