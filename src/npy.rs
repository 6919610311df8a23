//! Minimal `.npy` reader and writer (format versions 1 and 2, little-endian, C order).
//!
//! Used for golden files in tests and for `--dump`, so users can compare any stage against their own reference in numpy.

use std::io::Write;
use std::path::Path;

use ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};

/// Element data of an array read from a `.npy` file.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    /// `<f4`
    F32(Vec<f32>),
    /// `<f8`
    F64(Vec<f64>),
    /// `<i8`
    I64(Vec<i64>),
    /// `<i4`
    I32(Vec<i32>),
    /// `|u1` or `|b1`
    U8(Vec<u8>),
}

/// An array read from a `.npy` file.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Elements in C order.
    pub data: NpyData,
}

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::Npy { path: path.to_path_buf(), message: message.into() }
}

impl NpyArray {
    /// Reads a `.npy` file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&bytes).map_err(|m| bad(path, m))
    }

    /// Parses the bytes of a `.npy` file.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
            return Err("not a .npy file (bad magic)".into());
        }
        let (header_len, start): (usize, usize) = match bytes[6] {
            1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
            2 | 3 => {
                if bytes.len() < 12 {
                    return Err("truncated header".into());
                }
                (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
            }
            v => return Err(format!("unsupported format version {v}")),
        };
        let end = start.checked_add(header_len).filter(|&e| e <= bytes.len()).ok_or("truncated header")?;
        let header = std::str::from_utf8(&bytes[start..end]).map_err(|_| "header is not UTF-8")?;
        let descr = dict_value(header, "descr").ok_or("header has no 'descr'")?;
        let descr = descr.trim_matches(|c| c == '\'' || c == '"');
        let fortran = dict_value(header, "fortran_order").ok_or("header has no 'fortran_order'")?;
        if fortran.trim() != "False" {
            return Err("Fortran-order arrays are not supported".into());
        }
        let shape_text = dict_value(header, "shape").ok_or("header has no 'shape'")?;
        let shape = parse_shape(shape_text)?;
        let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("shape overflows")?;
        // ndarray also refuses a shape whose non-zero lengths multiply past isize::MAX, even holding no element
        // ((0, usize::MAX)): refused here, so every parsed array converts.
        if shape.iter().filter(|&&d| d > 0).try_fold(1usize, |a, &d| a.checked_mul(d)).is_none_or(|n| n > isize::MAX as usize) {
            return Err("shape overflows".into());
        }
        let body = &bytes[end..];
        let need = |size: usize| -> std::result::Result<&[u8], String> {
            let n = count.checked_mul(size).ok_or("shape overflows")?;
            body.get(..n).ok_or_else(|| format!("data truncated: need {n} bytes, have {}", body.len()))
        };
        let data = match descr {
            "<f4" => NpyData::F32(need(4)?.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4]))).collect()),
            "<f8" => NpyData::F64(need(8)?.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()),
            "<i8" => NpyData::I64(need(8)?.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()),
            "<i4" => NpyData::I32(need(4)?.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap_or([0; 4]))).collect()),
            "|u1" | "|b1" => NpyData::U8(need(1)?.to_vec()),
            other => return Err(format!("unsupported dtype {other}")),
        };
        Ok(NpyArray { shape, data })
    }

    /// The elements as f32 (f64 and integers are converted).
    pub fn to_f32(&self) -> ArrayD<f32> {
        let v: Vec<f32> = match &self.data {
            NpyData::F32(v) => v.clone(),
            NpyData::F64(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::I64(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::I32(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::U8(v) => v.iter().map(|&x| f32::from(x)).collect(),
        };
        ArrayD::from_shape_vec(IxDyn(&self.shape), v).unwrap_or_else(|_| ArrayD::zeros(IxDyn(&[0])))
    }

    /// The elements as i64, or `None` for floating-point data.
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        match &self.data {
            NpyData::I64(v) => Some(v.clone()),
            NpyData::I32(v) => Some(v.iter().map(|&x| i64::from(x)).collect()),
            NpyData::U8(v) => Some(v.iter().map(|&x| i64::from(x)).collect()),
            NpyData::F32(_) | NpyData::F64(_) => None,
        }
    }
}

fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let k1 = format!("'{key}'");
    let at = header.find(&k1)? + k1.len();
    let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')')? + 1
    } else {
        rest.find(',').or_else(|| rest.find('}'))?
    };
    Some(&rest[..end])
}

fn parse_shape(text: &str) -> std::result::Result<Vec<usize>, String> {
    let inner = text.trim().trim_start_matches('(').trim_end_matches(')');
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad shape entry {s:?}")))
        .collect()
}

/// Element types `.npy` files can be written with.
pub trait NpyElement: Copy {
    /// numpy's `descr` string.
    const DESCR: &'static str;
    /// Appends the little-endian bytes of `self`.
    fn put(self, out: &mut Vec<u8>);
}

impl NpyElement for f32 {
    const DESCR: &'static str = "<f4";
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}
impl NpyElement for i64 {
    const DESCR: &'static str = "<i8";
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}
impl NpyElement for u8 {
    const DESCR: &'static str = "|u1";
    fn put(self, out: &mut Vec<u8>) {
        out.push(self);
    }
}

/// Encodes `data` (C order) with `shape` as `.npy` bytes.
pub fn encode<T: NpyElement>(shape: &[usize], data: &[T]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}", T::DESCR, shape_text);
    // Version 1.0 stores the header length in 16 bits; a longer header (a shape of thousands of dimensions) needs
    // 2.0's 32 bits, or the length written would be truncated and the file unreadable.
    let v1 = 10 + header.len() + 1 + 63 <= usize::from(u16::MAX);
    let prefix = if v1 { 10 } else { 12 };
    let unpadded = prefix + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(prefix + header.len() + data.len() * 8);
    if v1 {
        out.extend_from_slice(b"\x93NUMPY\x01\x00");
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(b"\x93NUMPY\x02\x00");
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    for &x in data {
        x.put(&mut out);
    }
    out
}

/// Writes `data` (C order) with `shape` to a `.npy` file.
pub fn write<T: NpyElement>(path: impl AsRef<Path>, shape: &[usize], data: &[T]) -> Result<()> {
    let path = path.as_ref();
    let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if count != Some(data.len()) {
        let count = count.map_or_else(|| "more than usize::MAX".to_string(), |c| c.to_string());
        return Err(bad(path, format!("shape {shape:?} holds {count} elements, data has {}", data.len())));
    }
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(&encode(shape, data)).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_that_overflow_or_need_a_long_header_are_handled() {
        let dir = std::env::temp_dir().join(format!("nuwa-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Before: the product wrapped to 0 and an unreadable file was written.
        assert!(write(dir.join("a.npy"), &[1 << 33, 1 << 31], &[] as &[f32]).is_err());
        // Before: the 16-bit header length was truncated and the file could not be read back.
        let shape = vec![1usize; 30000];
        write(dir.join("b.npy"), &shape, &[1.5f32]).unwrap();
        let back = NpyArray::read(dir.join("b.npy")).unwrap();
        assert_eq!((back.shape, back.data), (shape, NpyData::F32(vec![1.5])));
        // A shape ndarray cannot build, holding no element: refused at parse, not converted to a silent [0].
        let bytes = encode(&[0, usize::MAX], &[] as &[f32]);
        assert!(NpyArray::parse(&bytes).unwrap_err().contains("shape overflows"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn round_trip_f32_and_i64() {
        let bytes = encode(&[2, 3], &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.5]);
        let a = NpyArray::parse(&bytes).expect("parse");
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, NpyData::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.5]));
        let bytes = encode(&[4], &[7i64, -1, 0, 9]);
        let a = NpyArray::parse(&bytes).expect("parse");
        assert_eq!(a.shape, vec![4]);
        assert_eq!(a.to_i64(), Some(vec![7, -1, 0, 9]));
        assert_eq!(bytes.iter().position(|&b| b == b'\n').map(|p| (p + 1) % 64), Some(0));
    }

    #[test]
    fn scalar_shape_and_errors() {
        let bytes = encode::<f32>(&[], &[3.0]);
        let a = NpyArray::parse(&bytes).expect("parse");
        assert!(a.shape.is_empty());
        assert!(NpyArray::parse(b"garbage").is_err());
        let mut trunc = encode(&[10], &[1.0f32; 10]);
        trunc.truncate(trunc.len() - 4);
        let err = NpyArray::parse(&trunc).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
    }
}
