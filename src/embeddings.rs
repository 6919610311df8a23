//! The token-embedding table, memory-mapped: a gather needs no session and no copy of the table in memory.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use ndarray::ArrayViewMut2;

use crate::error::{Error, Result};
use crate::manifest::{EmbeddingDtype, EmbeddingSpec};

/// A read-only, memory-mapped `[rows, cols]` table of f16, f32 or row-scaled int8.
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
            .checked_mul(spec.dtype.row_bytes(spec.cols) as u64)
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
        if spec.offset % spec.dtype.align() as u64 != 0 {
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
        let row = self.dtype.row_bytes(self.cols);
        let start = self.offset + id * row;
        let bytes = &self.map[start..start + row];
        match self.dtype {
            EmbeddingDtype::Q8Row => {
                let scale = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                for (o, &b) in out.iter_mut().zip(&bytes[4..]) {
                    *o = scale * f32::from(b as i8);
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(file: &str, dtype: EmbeddingDtype, rows: usize, cols: usize, offset: u64) -> EmbeddingSpec {
        EmbeddingSpec { file: file.into(), offset, dtype, rows, cols }
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nuwa-emb-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("table.bin");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn q8_row_rows_are_scale_times_bytes() {
        // 2 rows x 3 cols after a 5-byte header: row r = scale_r, then signed bytes
        let mut bytes = vec![0xAAu8; 5];
        for (scale, q) in [(0.5f32, [1i8, -2, 127]), (0.01f32, [-128i8, 0, 3])] {
            bytes.extend_from_slice(&scale.to_le_bytes());
            bytes.extend(q.iter().map(|&v| v as u8));
        }
        let path = temp_file("q8", &bytes);
        let e = Embeddings::open(&path, &spec("t", EmbeddingDtype::Q8Row, 2, 3, 5)).unwrap();
        let mut out = ndarray::Array2::<f32>::zeros((3, 3));
        e.gather_into(&[1, 0, 1], out.view_mut()).unwrap();
        assert_eq!(out.row(1).to_vec(), vec![0.5, -1.0, 63.5]);
        assert_eq!(out.row(0).to_vec(), vec![-1.28, 0.0, 0.03]);
        assert_eq!(out.row(2), out.row(0));
        let err = e.row_into(2, &mut [0.0; 3]).unwrap_err().to_string();
        assert!(err.contains("outside the embedding table"), "{err}");
    }

    #[test]
    fn q8_row_table_too_short_is_named() {
        let path = temp_file("short", &[0u8; 13]); // 2 rows x 3 cols need 2 * (4 + 3) = 14 bytes
        let err = Embeddings::open(&path, &spec("t", EmbeddingDtype::Q8Row, 2, 3, 0)).unwrap_err().to_string();
        assert!(err.contains("13 bytes") && err.contains("need 14"), "{err}");
    }

    #[test]
    fn f16_rows_and_alignment() {
        let mut bytes = vec![0u8; 2];
        for v in [1.5f32, -2.0, 0.25, 4.0] {
            bytes.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
        }
        let path = temp_file("f16", &bytes);
        let e = Embeddings::open(&path, &spec("t", EmbeddingDtype::F16, 2, 2, 2)).unwrap();
        let mut row = [0.0f32; 2];
        e.row_into(1, &mut row).unwrap();
        assert_eq!(row, [0.25, 4.0]);
        let err = Embeddings::open(&path, &spec("t", EmbeddingDtype::F16, 1, 2, 1)).unwrap_err().to_string();
        assert!(err.contains("not aligned"), "{err}");
    }
}
