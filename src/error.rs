//! The crate's one error type.

use std::path::PathBuf;

/// Everything the runtime can fail with; each variant names what was wrong so a caller can act on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    ///
    /// The OS error is part of the message and deliberately not exposed as `source()`, so error chains (`{:#}` in
    /// anyhow, the FFI's last-error text) do not print it twice.
    #[error("{path}: {error}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// The manifest is malformed or disagrees with a model file.
    #[error("manifest {path}: {message}")]
    Manifest {
        /// The manifest (or model file) involved.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
    /// A model file is missing or cannot be loaded.
    #[error("model file {path}: {message}")]
    ModelFile {
        /// The file involved.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// ONNX Runtime could not be loaded or initialised.
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
    /// An ONNX Runtime session failed while running a stage.
    #[error("{stage}: {message}")]
    Session {
        /// The stage (vision, projector, decoder head, decoder tail).
        stage: &'static str,
        /// What ONNX Runtime said.
        message: String,
    },
    /// The image could not be decoded or is outside the accepted limits.
    #[error("image: {0}")]
    Image(String),
    /// The request is invalid (empty prompt, bad option value, unknown method, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A tensor does not have the shape or type a stage expects.
    #[error("shape mismatch in {what}: {message}")]
    Shape {
        /// The tensor involved.
        what: String,
        /// Expected versus found.
        message: String,
    },
    /// The tokenizer failed or produced ids outside the model's vocabulary.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The sequence would exceed the model's context length.
    #[error("context overflow: {0}")]
    ContextOverflow(String),
    /// A .npy file is malformed or of an unsupported type.
    #[error("npy {path}: {message}")]
    Npy {
        /// The file involved.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io { path: path.into(), error }
    }
}
