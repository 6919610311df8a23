//! The token-embedding table, memory-mapped: a gather needs no session and no copy of the table in memory.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use ndarray::ArrayViewMut2;

use crate::error::{Error, Result};
use crate::manifest::{EmbeddingDtype, EmbeddingSpec};

/// A read-only, memory-mapped `[rows, cols]` table of f16 or f32.
pub struct Embeddings {
    map: Mmap,
    offset: usize,
    dtype: EmbeddingDtype,
    rows: usize,
    cols: usize,
    path: PathBuf,
}

impl std::fmt::Debug for Embeddings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embeddings").field("path", &self.path).field("rows", &self.rows).field("cols", &self.cols).finish()
    }
}

impl Embeddings {
    /// Maps the table described by `spec` from `path`, checking that the file is large enough.
    pub fn open(path: &Path, spec: &EmbeddingSpec) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::ModelFile {
            path: path.to_path_buf(),
            message: format!("cannot open the embedding table (manifest field embeddings.file): {e}"),
        })?;
        let need = (spec.rows as u64)
            .checked_mul(spec.cols as u64)
            .and_then(|n| n.checked_mul(spec.dtype.size() as u64))
            .and_then(|n| n.checked_add(spec.offset))
            .ok_or_else(|| Error::ModelFile { path: path.to_path_buf(), message: "embedding table size overflows".into() })?;
        let have = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if have < need {
            return Err(Error::ModelFile {
                path: path.to_path_buf(),
                message: format!(
                    "file has {have} bytes but embeddings [{} x {}] {:?} at offset {} need {need}",
                    spec.rows, spec.cols, spec.dtype, spec.offset
                ),
            });
        }
        if spec.offset % spec.dtype.size() as u64 != 0 {
            return Err(Error::ModelFile {
                path: path.to_path_buf(),
                message: format!("embeddings.offset {} is not aligned to the element size", spec.offset),
            });
        }
        let map = map_readonly(&file).map_err(|e| Error::io(path, e))?;
        Ok(Embeddings {
            map,
            offset: spec.offset as usize,
            dtype: spec.dtype,
            rows: spec.rows,
            cols: spec.cols,
            path: path.to_path_buf(),
        })
    }

    /// Row count (vocabulary size).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Column count (hidden size).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Writes row `id` into `out` (length `cols`) as f32.
    pub fn row_into(&self, id: u32, out: &mut [f32]) -> Result<()> {
        let id = id as usize;
        if id >= self.rows {
            return Err(Error::Tokenizer(format!("token id {id} is outside the embedding table ({} rows)", self.rows)));
        }
        if out.len() != self.cols {
            return Err(Error::Shape { what: "embedding row".into(), message: format!("{} != {}", out.len(), self.cols) });
        }
        let size = self.dtype.size();
        let start = self.offset + id * self.cols * size;
        let bytes = &self.map[start..start + self.cols * size];
        match self.dtype {
            EmbeddingDtype::F16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
            EmbeddingDtype::F32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
        }
        Ok(())
    }

    /// Gathers the rows of `ids` into the rows of `out` ([ids.len(), cols]).
    pub fn gather_into(&self, ids: &[u32], mut out: ArrayViewMut2<'_, f32>) -> Result<()> {
        if out.nrows() != ids.len() {
            return Err(Error::Shape { what: "embedding gather".into(), message: format!("{} rows for {} ids", out.nrows(), ids.len()) });
        }
        for (&id, mut row) in ids.iter().zip(out.rows_mut()) {
            match row.as_slice_mut() {
                Some(slice) => self.row_into(id, slice)?,
                None => return Err(Error::Shape { what: "embedding gather".into(), message: "output rows not contiguous".into() }),
            }
        }
        Ok(())
    }
}

/// Maps a model file read-only.
#[allow(unsafe_code)]
fn map_readonly(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the mapping is read-only and model files are not modified while a model is loaded (documented in the
    // crate docs); a concurrent truncation by another process is the only way to invalidate it.
    unsafe { Mmap::map(file) }
}
