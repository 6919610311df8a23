//! The token-embedding table, memory-mapped: a gather needs no session and no copy of the table in memory.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use ndarray::ArrayViewMut2;

use crate::error::{Error, Result};
use crate::manifest::{EmbeddingDtype, EmbeddingSpec};

/// Fewer rows than this per thread cost more to hand out than they save.
const MIN_ROWS_PER_THREAD: usize = 8192;

/// The scale of a `q8_row` row: its first four bytes, little-endian f32.
#[inline(always)]
fn q8_scale(row: &[u8]) -> f32 {
    f32::from_le_bytes([row[0], row[1], row[2], row[3]])
}

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
        let cannot_open = |e: std::io::Error| Error::ModelFile {
            path: path.to_path_buf(),
            message: format!("cannot open the embedding table (manifest field embeddings.file): {e}"),
        };
        // Before opening: opening a FIFO blocks, and a device has no size to check.
        crate::manifest::regular_file_metadata(path).map_err(cannot_open)?;
        let file = File::open(path).map_err(cannot_open)?;
        let overflow = || Error::ModelFile { path: path.to_path_buf(), message: "embedding table size overflows".into() };
        let row_bytes = spec.dtype.checked_row_bytes(spec.cols).ok_or_else(overflow)?;
        let need = (spec.rows as u64)
            .checked_mul(row_bytes as u64)
            .and_then(|n| n.checked_add(spec.offset))
            .filter(|&n| usize::try_from(n).is_ok())
            .ok_or_else(overflow)?;
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
        if !spec.offset.is_multiple_of(spec.dtype.align() as u64) {
            return Err(Error::ModelFile {
                path: path.to_path_buf(),
                message: format!("embeddings.offset {} is not aligned to the element size", spec.offset),
            });
        }
        let map = map_readonly(&file).map_err(|e| Error::io(path, e))?;
        let table = Embeddings {
            map,
            offset: spec.offset as usize,
            dtype: spec.dtype,
            rows: spec.rows,
            cols: spec.cols,
            path: path.to_path_buf(),
        };
        table.check_q8_scales()?;
        Ok(table)
    }

    /// A `q8_row` row's scale must be finite: an infinite one makes that row's logit +-inf (greedy decoding then
    /// picks the token every time), a NaN one fails every request. One read per row; the tied lm_head reads every
    /// row on the first token anyway.
    fn check_q8_scales(&self) -> Result<()> {
        if self.dtype != EmbeddingDtype::Q8Row {
            return Ok(());
        }
        let row = self.dtype.row_bytes(self.cols);
        for r in 0..self.rows {
            let at = self.offset + r * row;
            let scale = q8_scale(&self.map[at..]);
            if !scale.is_finite() {
                return Err(Error::ModelFile {
                    path: self.path.clone(),
                    message: format!("embedding row {r} has scale {scale}: a q8_row table needs finite scales (a damaged file?)"),
                });
            }
        }
        Ok(())
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
                let scale = q8_scale(bytes);
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
        // Checked where a row is read (f16/f32 tables are not scanned at open: a 7B model's is 256 MB; a q8_row
        // table's scales are checked at open and its int8 values are finite): an infinite value would make this
        // token's logit +-inf through the tied lm_head, and greedy decoding would pick it without a word.
        if self.dtype != EmbeddingDtype::Q8Row {
            if let Some(c) = out.iter().position(|v| !v.is_finite()) {
                return Err(Error::ModelFile {
                    path: self.path.clone(),
                    message: format!("embedding row {id} holds {} at column {c}: the table's values must be finite (a damaged file?)", out[c]),
                });
            }
        }
        Ok(())
    }

    /// Applies the table as a tied lm_head: `out[r] = row(r) . hidden` for the first `out.len()` rows (the
    /// vocabulary; a table may carry extra rows). Used when the decoder tail outputs its final hidden state instead
    /// of logits, so the model stores the matrix once, not twice (as the gather's table and as the graph's lm_head).
    /// With `workers`, the rows of a `q8_row` table are split into one part per worker plus one for the calling
    /// thread (no part under 8192 rows; see [`lm_head_workers`]); f16 and f32 tables run on the calling thread.
    pub fn logits_into(&self, hidden: &[f32], out: &mut [f32], workers: Option<&rayon::ThreadPool>) -> Result<()> {
        if hidden.len() != self.cols {
            return Err(Error::Shape { what: "lm_head input".into(), message: format!("{} values for {} columns", hidden.len(), self.cols) });
        }
        if out.len() > self.rows {
            return Err(Error::Shape { what: "lm_head output".into(), message: format!("{} logits from a {}-row table", out.len(), self.rows) });
        }
        if let Some(bad) = hidden.iter().position(|v| !v.is_finite()) {
            return Err(Error::Session {
                stage: "lm_head",
                message: format!("the decoder's final hidden state holds {} at column {bad}: its values are not finite", hidden[bad]),
            });
        }
        match self.dtype {
            EmbeddingDtype::Q8Row => {
                let row = self.dtype.row_bytes(self.cols);
                let table = &self.map[self.offset..self.offset + out.len() * row];
                let (h, hscale) = dot::quantize(hidden);
                let parts = 1 + workers.map_or(0, rayon::ThreadPool::current_num_threads);
                let per = out.len().div_ceil(parts).max(MIN_ROWS_PER_THREAD);
                match workers {
                    Some(pool) if per < out.len() => pool.in_place_scope(|scope| {
                        let mut parts = table.chunks(per * row).zip(out.chunks_mut(per));
                        let first = parts.next();
                        for (t, o) in parts {
                            let h = &h;
                            scope.spawn(move |_| dot::q8_rows(t, row, h, hscale, o));
                        }
                        if let Some((t, o)) = first {
                            dot::q8_rows(t, row, &h, hscale, o);
                        }
                    }),
                    _ => dot::q8_rows(table, row, &h, hscale, out),
                }
            }
            EmbeddingDtype::F16 | EmbeddingDtype::F32 => {
                let mut buf = vec![0.0f32; self.cols];
                for (id, o) in (0u32..).zip(out.iter_mut()) {
                    self.row_into(id, &mut buf)?;
                    *o = dot::f32s(&buf, hidden);
                }
            }
        }
        // Finite rows and a finite hidden state can still overflow (a huge q8_row scale, or f32 values near the
        // limit): greedy decoding would pick an infinite logit every time, so it is refused here, once per token
        // (a pass over the vocabulary, small beside the dot products).
        if let Some(bad) = out.iter().position(|v| !v.is_finite()) {
            return Err(Error::ModelFile {
                path: self.path.clone(),
                message: format!(
                    "the tied lm_head (the embedding table) gave logit {} for token {bad}: logits must be finite (a damaged table?)",
                    out[bad]
                ),
            });
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

/// Worker threads for [`Embeddings::logits_into`] when `threads` threads should share it (the calling thread is
/// one of them): `None` for one thread or a vocabulary too small to split. Persistent threads, because spawning
/// them for every token measurably slowed the ONNX Runtime sessions around it (+0.3 ms a token on the demo model).
pub fn lm_head_workers(threads: usize, vocab: usize) -> Result<Option<rayon::ThreadPool>> {
    let n = threads.min(vocab / MIN_ROWS_PER_THREAD).saturating_sub(1);
    if n == 0 {
        return Ok(None);
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("nuwa-lm-head-{i}"))
        .build()
        .map(Some)
        .map_err(|e| Error::Runtime(format!("cannot start the lm_head threads: {e}")))
}

/// Row dot products for [`Embeddings::logits_into`].
///
/// `q8_row` rows against an int16-quantised hidden state: integer multiply-adds (exact), one f32 multiply by the
/// two scales per row. The int16 limit keeps every partial sum inside i32 (|q| <= 128, so |sum| <= 128 x cols x
/// limit), and leaves 12 bits or more of the hidden state's precision up to 4096 columns: the logits differ from
/// f32 arithmetic by ~1e-4 of their range, far below the table's own int8 rounding. Reading the table is the cost
/// (12.6 MB for 49153 x 256), so the rows are split across threads. The AVX2 kernel is picked at run time (the
/// default x86-64 target has no AVX2); elsewhere the portable loop is what the compiler vectorises (NEON on aarch64).
mod dot {
    /// Quantises `hidden` to int16 for `cols`-wide rows; returns the values and their scale.
    pub(super) fn quantize(hidden: &[f32]) -> (Vec<i16>, f32) {
        let limit = (i32::MAX as f32 / (128.0 * hidden.len().max(1) as f32)).min(32767.0).floor();
        let max = hidden.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        if max == 0.0 {
            return (vec![0; hidden.len()], 0.0);
        }
        let scale = max / limit;
        (hidden.iter().map(|&v| (v / scale).round() as i16).collect(), scale)
    }

    /// The row loop every kernel shares: per row, its scale times `dot` over the columns the kernel's full steps of
    /// `step` cover, plus the remaining columns one at a time. Inlined into each kernel, so `dot` is compiled with
    /// that kernel's target features.
    #[inline(always)]
    fn rows_with(table: &[u8], row: usize, h: &[i16], hscale: f32, out: &mut [f32], step: usize, dot: impl Fn(&[u8], &[i16]) -> i32) {
        let cols = h.len();
        let full = cols - cols % step;
        for (o, bytes) in out.iter_mut().zip(table.chunks_exact(row)) {
            let scale = super::q8_scale(bytes);
            let q = &bytes[4..4 + cols];
            let mut sum = dot(&q[..full], &h[..full]);
            for (&b, &x) in q[full..].iter().zip(&h[full..]) {
                sum += i32::from(b as i8) * i32::from(x);
            }
            *o = scale * hscale * sum as f32;
        }
    }

    fn rows_portable(table: &[u8], row: usize, h: &[i16], hscale: f32, out: &mut [f32]) {
        rows_with(table, row, h, hscale, out, 16, |q, h| {
            let mut acc = [0i32; 16];
            for (qs, hs) in q.chunks_exact(16).zip(h.chunks_exact(16)) {
                for k in 0..16 {
                    acc[k] += i32::from(qs[k] as i8) * i32::from(hs[k]);
                }
            }
            acc.iter().sum()
        })
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[allow(unsafe_code)]
    fn rows_avx2(table: &[u8], row: usize, h: &[i16], hscale: f32, out: &mut [f32]) {
        use std::arch::x86_64::*;
        rows_with(table, row, h, hscale, out, 32, |q, h| {
            let (mut a0, mut a1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for c in (0..q.len()).step_by(32) {
                // SAFETY: q.len() = h.len() is a multiple of 32 (rows_with): every load reads inside the slices.
                unsafe {
                    let x0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(q.as_ptr().add(c).cast()));
                    let x1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(q.as_ptr().add(c + 16).cast()));
                    let h0 = _mm256_loadu_si256(h.as_ptr().add(c).cast());
                    let h1 = _mm256_loadu_si256(h.as_ptr().add(c + 16).cast());
                    a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(x0, h0));
                    a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(x1, h1));
                }
            }
            let a = _mm256_add_epi32(a0, a1);
            let v = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256::<1>(a));
            let v = _mm_add_epi32(v, _mm_shuffle_epi32::<0b01_00_11_10>(v));
            let v = _mm_add_epi32(v, _mm_shuffle_epi32::<0b10_11_00_01>(v));
            _mm_cvtsi128_si32(v)
        })
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    #[allow(unsafe_code)]
    fn rows_avx512(table: &[u8], row: usize, h: &[i16], hscale: f32, out: &mut [f32]) {
        use std::arch::x86_64::*;
        rows_with(table, row, h, hscale, out, 64, |q, h| {
            let (mut a0, mut a1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for c in (0..q.len()).step_by(64) {
                // SAFETY: q.len() = h.len() is a multiple of 64 (rows_with): every load reads inside the slices.
                unsafe {
                    let x0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(q.as_ptr().add(c).cast()));
                    let x1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(q.as_ptr().add(c + 32).cast()));
                    let h0 = _mm512_loadu_si512(h.as_ptr().add(c).cast());
                    let h1 = _mm512_loadu_si512(h.as_ptr().add(c + 32).cast());
                    a0 = _mm512_add_epi32(a0, _mm512_madd_epi16(x0, h0));
                    a1 = _mm512_add_epi32(a1, _mm512_madd_epi16(x1, h1));
                }
            }
            _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1))
        })
    }

    /// `out[r] = scale_r * sum_c q[r][c] * hidden[c]` over `q8_row` rows of `row` bytes (`hidden` quantised).
    pub(super) fn q8_rows(table: &[u8], row: usize, h: &[i16], hscale: f32, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512bw") {
            // SAFETY: the CPU has AVX-512 F and BW, the features the function is compiled for (checked just above).
            #[allow(unsafe_code)]
            unsafe {
                rows_avx512(table, row, h, hscale, out)
            };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, the one feature the function is compiled for (checked just above).
            #[allow(unsafe_code)]
            unsafe {
                rows_avx2(table, row, h, hscale, out)
            };
            return;
        }
        rows_portable(table, row, h, hscale, out)
    }

    /// Plain f32 dot product (f16 and f32 tables, converted a row at a time).
    pub(super) fn f32s(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0.0f32; 16];
        let mut ac = a.chunks_exact(16);
        let mut bc = b.chunks_exact(16);
        for (xs, ys) in (&mut ac).zip(&mut bc) {
            for k in 0..16 {
                acc[k] += xs[k] * ys[k];
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for (x, y) in ac.remainder().iter().zip(bc.remainder()) {
            sum += x * y;
        }
        sum
    }

    #[cfg(test)]
    pub(super) type Kernel = Box<dyn Fn(&[u8], usize, &[i16], f32, &mut [f32])>;

    /// Every kernel this CPU can run, by name (tests compare them).
    #[cfg(test)]
    #[allow(unsafe_code)]
    pub(super) fn kernels_here() -> Vec<(&'static str, Kernel)> {
        let mut k: Vec<(&'static str, Kernel)> = vec![("portable", Box::new(rows_portable))];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: feature detected.
                k.push(("avx2", Box::new(|t, r, h, s, o| unsafe { rows_avx2(t, r, h, s, o) })));
            }
            if std::arch::is_x86_feature_detected!("avx512bw") {
                // SAFETY: feature detected.
                k.push(("avx512", Box::new(|t, r, h, s, o| unsafe { rows_avx512(t, r, h, s, o) })));
            }
        }
        k
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
    fn q8_row_table_with_a_non_finite_scale_is_refused_at_open() {
        // Before, +-inf reached the logits (greedy then picked that row's token) and NaN failed every request.
        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            let mut bytes = Vec::new();
            for (r, scale) in [0.5f32, 0.25, bad, 0.125].into_iter().enumerate() {
                bytes.extend_from_slice(&scale.to_le_bytes());
                bytes.extend([r as u8, 1, 2]);
            }
            let path = temp_file("nonfinite", &bytes);
            let err = Embeddings::open(&path, &spec("t", EmbeddingDtype::Q8Row, 4, 3, 0)).unwrap_err().to_string();
            assert!(err.contains("row 2 has scale") && err.contains("finite") && err.contains("nonfinite"), "{err}");
        }
    }

    #[test]
    fn a_table_size_that_overflows_is_refused() {
        // Before, the row size wrapped around in usize and a 1-byte file passed for 1000 rows.
        let path = temp_file("tiny", &[0u8]);
        for (dtype, cols) in [(EmbeddingDtype::F32, usize::MAX / 4 + 1), (EmbeddingDtype::F16, usize::MAX / 2 + 1), (EmbeddingDtype::Q8Row, usize::MAX - 2)] {
            let err = Embeddings::open(&path, &spec("t", dtype, 1000, cols, 0)).unwrap_err().to_string();
            assert!(err.contains("overflows"), "{dtype:?}: {err}");
        }
    }

    #[test]
    fn q8_row_table_too_short_is_named() {
        let path = temp_file("short", &[0u8; 13]); // 2 rows x 3 cols need 2 * (4 + 3) = 14 bytes
        let err = Embeddings::open(&path, &spec("t", EmbeddingDtype::Q8Row, 2, 3, 0)).unwrap_err().to_string();
        assert!(err.contains("13 bytes") && err.contains("need 14"), "{err}");
    }

    #[test]
    fn logits_are_row_dot_hidden_for_every_dtype() {
        // 3 rows x 19 cols (a full 16-lane chunk and a remainder), compared with a plain f64 sum of the gathered rows.
        let cols = 19;
        let vals: Vec<Vec<f32>> = (0..3).map(|r| (0..cols).map(|c| ((r * 7 + c * 3) % 11) as f32 - 5.0).collect()).collect();
        let hidden: Vec<f32> = (0..cols).map(|c| 0.25 * c as f32 - 2.0).collect();
        let mut q8 = Vec::new();
        let mut f16 = Vec::new();
        let mut f32b = Vec::new();
        for row in &vals {
            q8.extend_from_slice(&0.5f32.to_le_bytes());
            q8.extend(row.iter().map(|&v| (2.0 * v) as i8 as u8)); // scale 0.5 x (2v) = v exactly
            for &v in row {
                f16.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
                f32b.extend_from_slice(&v.to_le_bytes());
            }
        }
        for (name, dtype, bytes) in [("lq8", EmbeddingDtype::Q8Row, q8), ("lf16", EmbeddingDtype::F16, f16), ("lf32", EmbeddingDtype::F32, f32b)] {
            let path = temp_file(name, &bytes);
            let e = Embeddings::open(&path, &spec("t", dtype, 3, cols, 0)).unwrap();
            let mut out = [0.0f32; 2]; // the vocabulary may be shorter than the table
            e.logits_into(&hidden, &mut out, None).unwrap();
            for (r, &got) in out.iter().enumerate() {
                let mut row = vec![0.0f32; cols];
                e.row_into(r as u32, &mut row).unwrap();
                let want: f64 = row.iter().zip(&hidden).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                assert!((f64::from(got) - want).abs() < 1e-3, "{name} row {r}: {got} vs {want}");
            }
            assert!(out[0] != out[1], "{name}: rows differ, so must their logits");
            let err = e.logits_into(&hidden[1..], &mut out, None).unwrap_err().to_string();
            assert!(err.contains("18 values for 19 columns"), "{err}");
            let err = e.logits_into(&hidden, &mut [0.0; 4], None).unwrap_err().to_string();
            assert!(err.contains("4 logits from a 3-row table"), "{err}");
            let mut bad = hidden.clone();
            bad[3] = f32::NAN;
            let err = e.logits_into(&bad, &mut out, None).unwrap_err().to_string();
            assert!(err.contains("lm_head") && err.contains("NaN at column 3") && !err.contains("shape"), "{err}");
        }
    }

    #[test]
    fn q8_logits_split_across_threads_match_f64_and_the_portable_kernel() {
        // 20000 rows (parts of 8192 rows at least) x 135 columns (AVX-512: two 64-wide steps, AVX2: four 32-wide
        // steps, then a 7-column tail).
        let (rows, cols) = (20000usize, 135usize);
        let mut bytes = Vec::with_capacity(rows * (4 + cols));
        let mut x = 7u32;
        for r in 0..rows {
            bytes.extend_from_slice(&(0.001 * (1 + r % 13) as f32).to_le_bytes());
            for _ in 0..cols {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                bytes.push((x >> 24) as u8);
            }
        }
        let path = temp_file("q8big", &bytes);
        let e = Embeddings::open(&path, &spec("t", EmbeddingDtype::Q8Row, rows, cols, 0)).unwrap();
        let hidden: Vec<f32> = (0..cols).map(|c| ((c * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let mut one = vec![0.0f32; rows];
        let mut three = vec![0.0f32; rows];
        e.logits_into(&hidden, &mut one, None).unwrap();
        let workers = lm_head_workers(3, rows).unwrap();
        assert_eq!(workers.as_ref().map(rayon::ThreadPool::current_num_threads), Some(1), "20000 rows: 2 parts of >= 8192");
        assert!(lm_head_workers(1, rows).unwrap().is_none() && lm_head_workers(8, 9000).unwrap().is_none());
        let workers = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        e.logits_into(&hidden, &mut three, Some(&workers)).unwrap();
        assert_eq!(one, three, "the split must not change a single logit");
        let (h, hs) = dot::quantize(&hidden);
        for (name, kernel) in dot::kernels_here() {
            let mut got = vec![0.0f32; rows];
            kernel(&bytes, 4 + cols, &h, hs, &mut got);
            assert_eq!(one, got, "kernel {name}: every kernel computes the same integer sums");
        }
        let mut row = vec![0.0f32; cols];
        let mut worst = 0.0f64;
        for r in (0..rows).step_by(997) {
            e.row_into(r as u32, &mut row).unwrap();
            let want: f64 = row.iter().zip(&hidden).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            worst = worst.max((f64::from(one[r]) - want).abs());
        }
        assert!(worst < 1e-3, "int16 hidden state: max error {worst}");
        assert!(one.iter().any(|&v| v.abs() > 1.0), "non-trivial logits");
    }

    #[cfg(unix)]
    #[test]
    fn a_table_that_is_not_a_regular_file_is_refused_without_opening_it() {
        // Before, File::open on a FIFO blocked until a writer came: the model load hung.
        let dir = std::env::temp_dir().join(format!("nuwa-emb-{}-fifo", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("table.bin");
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
        assert!(made.success());
        let (send, recv) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let _ = send.send(Embeddings::open(&path, &spec("t", EmbeddingDtype::F32, 1, 1, 0)).map(|_| ()).map_err(|e| e.to_string()));
        });
        let got = recv.recv_timeout(std::time::Duration::from_secs(20));
        if got.is_err() {
            // Unblock the opener before failing, so the test process can end.
            let _ = std::fs::OpenOptions::new().write(true).open(&fifo);
        }
        let err = got.expect("Embeddings::open hung on a FIFO").unwrap_err();
        assert!(err.contains("table.bin") && err.contains("not a regular file") && err.contains("embeddings.file"), "{err}");
        let err = Embeddings::open(&dir, &spec("t", EmbeddingDtype::F32, 1, 1, 0)).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "a directory: {err}");
    }

    #[test]
    fn non_finite_f16_and_f32_values_are_refused_where_a_row_is_read() {
        // Before, an infinite value reached the tied lm_head's logits and greedy decoding picked that token every
        // time; a gathered row carried it into the decoder.
        let f16 = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes().to_vec();
        let f32b = |v: f32| v.to_le_bytes().to_vec();
        for (name, dtype, enc) in [("nf16", EmbeddingDtype::F16, &f16 as &dyn Fn(f32) -> Vec<u8>), ("nf32", EmbeddingDtype::F32, &f32b)] {
            for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
                let bytes: Vec<u8> = [0.5f32, -1.0, 2.0, bad, 0.25, 0.75].iter().flat_map(|&v| enc(v)).collect();
                let path = temp_file(name, &bytes);
                let e = Embeddings::open(&path, &spec("t", dtype, 3, 2, 0)).unwrap();
                let mut row = [0.0f32; 2];
                e.row_into(0, &mut row).unwrap();
                e.row_into(2, &mut row).unwrap();
                let err = e.row_into(1, &mut row).unwrap_err().to_string();
                assert!(err.contains(name) && err.contains("embedding row 1") && err.contains("column 1") && err.contains("finite"), "{err}");
                let mut out = ndarray::Array2::<f32>::zeros((2, 2));
                assert!(e.gather_into(&[0, 1], out.view_mut()).is_err(), "{name}: gather");
                let err = e.logits_into(&[1.0, 1.0], &mut [0.0; 3], None).unwrap_err().to_string();
                assert!(err.contains(name) && err.contains("embedding row 1"), "{err}");
                e.logits_into(&[1.0, 1.0], &mut [0.0; 1], None).unwrap(); // the bad row lies past this vocabulary
            }
        }
    }

    #[test]
    fn a_logit_that_overflows_is_refused() {
        // Finite rows and a finite hidden state whose product overflows f32, for each kind of table.
        let mut f32b = Vec::new();
        for v in [1.0f32, 1.0, 3e38, 3e38] {
            f32b.extend_from_slice(&v.to_le_bytes());
        }
        let mut q8 = Vec::new();
        for scale in [1.0f32, 3e38] {
            q8.extend_from_slice(&scale.to_le_bytes());
            q8.extend([127u8, 127]);
        }
        for (name, dtype, bytes) in [("of32", EmbeddingDtype::F32, f32b), ("oq8", EmbeddingDtype::Q8Row, q8)] {
            let path = temp_file(name, &bytes);
            let e = Embeddings::open(&path, &spec("t", dtype, 2, 2, 0)).unwrap();
            let mut out = [0.0f32; 2];
            let err = e.logits_into(&[10.0, 10.0], &mut out, None).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains("lm_head") && err.contains("token 1") && err.contains("inf"), "{err}");
            e.logits_into(&[10.0, 10.0], &mut out[..1], None).unwrap();
        }
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
