//! Key/value cache for one group of decoder layers, appended in place.
//!
//! Each layer owns two buffers in sequence-major layout `[capacity, kv_heads, head_dim]`. The first `len` positions
//! are one contiguous slice, handed to ONNX Runtime as the `past` input without a copy; the graph returns only the new
//! positions, which are copied into the free tail of the buffer. Nothing proportional to the whole cache is copied
//! per token (the buffers grow by doubling when a request outruns its reservation, amortised).

use crate::error::{Error, Result};

/// The cache of a contiguous range of decoder layers.
#[derive(Debug, Clone)]
pub struct KvCache {
    first_layer: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    row: usize,
    kv_heads: usize,
    head_dim: usize,
    len: usize,
    capacity: usize,
    /// Positions growth stops at (the most a request can append; `usize::MAX` when unknown).
    limit: usize,
}

/// A zeroed buffer of `positions * row` values, or an error naming the size: an allocation that fails must not
/// abort the host process (`vec!` does), and the product must not wrap.
fn zeroed(positions: usize, row: usize) -> Result<Vec<f32>> {
    let too_big = || Error::InvalidRequest(format!("a KV cache of {positions} positions x {row} values cannot be allocated"));
    let n = positions.checked_mul(row).filter(|&n| n <= isize::MAX as usize / std::mem::size_of::<f32>()).ok_or_else(too_big)?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| too_big())?;
    v.resize(n, 0.0);
    Ok(v)
}

impl KvCache {
    /// An empty cache for layers `first_layer..first_layer + num_layers`, reserving `capacity` positions; a size
    /// that overflows or cannot be allocated is an error.
    pub fn new(first_layer: usize, num_layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> Result<Self> {
        let row = kv_heads
            .checked_mul(head_dim)
            .ok_or_else(|| Error::InvalidRequest(format!("KV rows of {kv_heads} heads x {head_dim} values overflow")))?;
        Ok(KvCache {
            first_layer,
            keys: (0..num_layers).map(|_| zeroed(capacity, row)).collect::<Result<_>>()?,
            values: (0..num_layers).map(|_| zeroed(capacity, row)).collect::<Result<_>>()?,
            row,
            kv_heads,
            head_dim,
            len: 0,
            capacity,
            limit: usize::MAX,
        })
    }

    /// Caps growth by doubling at `positions` (a request's prompt plus the tokens it may still decode), so the last
    /// doubling does not reserve past what can ever be appended.
    pub fn set_limit(&mut self, positions: usize) {
        self.limit = positions;
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.keys.len()
    }

    /// Global index of the first layer.
    pub fn first_layer(&self) -> usize {
        self.first_layer
    }

    /// Shape of one layer's past tensor: `[1, len, kv_heads, head_dim]`.
    pub fn past_shape(&self) -> [usize; 4] {
        [1, self.len, self.kv_heads, self.head_dim]
    }

    /// The held keys and values of local layer `i` (contiguous prefix of the buffers).
    pub fn past(&self, i: usize) -> (&[f32], &[f32]) {
        let n = self.len * self.row;
        (&self.keys[i][..n], &self.values[i][..n])
    }

    /// Bytes used by the held positions (keys and values, all layers).
    pub fn bytes_used(&self) -> usize {
        2 * self.keys.len() * self.len * self.row * std::mem::size_of::<f32>()
    }

    /// A copy of the held positions in new buffers reserving `capacity` positions (at least the held ones): a
    /// shared prefix continued by one request without touching the original.
    pub fn fork(&self, capacity: usize) -> Result<KvCache> {
        let capacity = capacity.max(self.len);
        let n = self.len * self.row;
        let copy = |bufs: &Vec<Vec<f32>>| -> Result<Vec<Vec<f32>>> {
            bufs.iter()
                .map(|b| {
                    let mut v = zeroed(capacity, self.row)?;
                    v[..n].copy_from_slice(&b[..n]);
                    Ok(v)
                })
                .collect()
        };
        Ok(KvCache { keys: copy(&self.keys)?, values: copy(&self.values)?, capacity, ..*self })
    }

    /// Appends `new` positions to every layer: `keys[i]` and `values[i]` hold `[new, kv_heads, head_dim]`.
    pub fn append(&mut self, new: usize, keys: &[&[f32]], values: &[&[f32]]) -> Result<()> {
        let n = new * self.row;
        if keys.len() != self.keys.len() || values.len() != self.values.len() {
            return Err(Error::Shape {
                what: "kv append".into(),
                message: format!("{} layers given, cache has {}", keys.len(), self.keys.len()),
            });
        }
        if let Some(bad) = keys.iter().chain(values).find(|s| s.len() != n) {
            return Err(Error::Shape {
                what: "kv append".into(),
                message: format!("{} elements for {new} positions of {} values each", bad.len(), self.row),
            });
        }
        if self.len + new > self.capacity {
            let cap = (self.len + new).max(self.capacity.saturating_mul(2).min(self.limit));
            let too_big = || Error::InvalidRequest(format!("the KV cache cannot grow to {cap} positions"));
            let total = cap.checked_mul(self.row).ok_or_else(too_big)?;
            for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
                buf.try_reserve_exact(total - buf.len()).map_err(|_| too_big())?;
                buf.resize(total, 0.0);
            }
            self.capacity = cap;
        }
        let start = self.len * self.row;
        for (buf, src) in self.keys.iter_mut().zip(keys) {
            buf[start..start + n].copy_from_slice(src);
        }
        for (buf, src) in self.values.iter_mut().zip(values) {
            buf[start..start + n].copy_from_slice(src);
        }
        self.len += new;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_keeps_prefix_and_grows_in_place() {
        let mut kv = KvCache::new(3, 2, 1, 2, 2).expect("cache");
        kv.append(1, &[&[1.0, 2.0], &[3.0, 4.0]], &[&[5.0, 6.0], &[7.0, 8.0]]).expect("append");
        let ptr = kv.past(0).0.as_ptr();
        kv.append(1, &[&[9.0, 10.0], &[11.0, 12.0]], &[&[0.0, 0.0], &[1.0, 1.0]]).expect("append");
        assert_eq!(kv.past(0).0, &[1.0, 2.0, 9.0, 10.0]);
        assert_eq!(kv.past(1).1, &[7.0, 8.0, 1.0, 1.0]);
        assert_eq!(kv.past(0).0.as_ptr(), ptr, "append within capacity must not reallocate");
        kv.append(3, &[&[0.5; 6], &[0.5; 6]], &[&[0.5; 6], &[0.5; 6]]).expect("grow");
        assert_eq!(kv.len(), 5);
        assert_eq!(&kv.past(1).0[..4], &[3.0, 4.0, 11.0, 12.0]);
        assert_eq!(kv.past_shape(), [1, 5, 1, 2]);
        assert_eq!(kv.bytes_used(), 2 * 2 * 5 * 2 * 4);
        assert!(kv.append(1, &[&[1.0]], &[&[1.0]]).is_err());
        // Growth by doubling stops at the limit, but never refuses what is appended.
        let mut kv = KvCache::new(0, 1, 1, 1, 4).expect("cache");
        kv.set_limit(6);
        kv.append(5, &[&[0.0; 5]], &[&[0.0; 5]]).expect("grow");
        assert_eq!(kv.capacity, 6, "doubling would give 8");
        kv.append(3, &[&[0.0; 3]], &[&[0.0; 3]]).expect("past the limit still appends");
        assert_eq!(kv.capacity, 8);
    }

    #[test]
    fn sizes_that_overflow_or_cannot_be_allocated_are_errors_not_aborts() {
        // Before, `vec!` panicked on "capacity overflow" or aborted the process on a failed allocation.
        for (heads, dim, capacity) in [(1usize << 40, 1usize << 40, 1), (1, 2, usize::MAX / 2), (8, 64, 1usize << 50)] {
            let e = KvCache::new(0, 1, heads, dim, capacity).unwrap_err().to_string();
            assert!(e.contains("KV"), "{e}");
        }
        let kv = KvCache::new(0, 1, 1, 2, 1).expect("cache");
        assert!(kv.fork(usize::MAX / 2).is_err());
    }
}
