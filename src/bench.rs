//! Decode-speed measurement at a chosen context length, shared by `nuwa bench` and `cargo bench`.

use std::time::Instant;

use ndarray::Array2;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::pipeline::Model;
use crate::sampler::argmax;

/// Decode timings at one context length.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeBench {
    /// Positions in the KV cache before the timed steps.
    pub context: usize,
    /// Timed decode steps.
    pub steps: usize,
    /// Prefill of the context (head + tail).
    pub prefill_ms: f64,
    /// Median time of one decode step (head + tail + sampling).
    pub median_ms_per_token: f64,
    /// Mean time of one decode step.
    pub mean_ms_per_token: f64,
    /// Fastest step.
    pub min_ms_per_token: f64,
    /// KV bytes held after the run, all layers.
    pub kv_bytes: usize,
}

/// Checks a [`Model::bench_decode`] request against a model of `max_positions` positions: the context takes
/// positions `0..context` and the steps the next `steps`, so both must be positive and fit.
pub fn check_decode_bench(context: usize, steps: usize, max_positions: usize) -> Result<()> {
    if context == 0 || steps == 0 || context.checked_add(steps).is_none_or(|n| n > max_positions) {
        return Err(Error::InvalidRequest(format!(
            "context {context} + steps {steps} must be positive and at most the model's {max_positions} positions"
        )));
    }
    Ok(())
}

impl Model {
    /// Prefills `context` text positions (token ids cycling through the vocabulary) and times `steps` greedy decode
    /// steps after it. The cache is appended in place, so a step's cost grows only with attention over the context.
    pub fn bench_decode(&self, context: usize, steps: usize) -> Result<DecodeBench> {
        let d = &self.manifest().decoder;
        check_decode_bench(context, steps, d.max_position_embeddings)?;
        let vocab = d.vocab_size as u32;
        let ids: Vec<u32> = (0..context as u32).map(|i| (i * 7919 + 13) % vocab).collect();
        let positions: Vec<i64> = (0..context as i64).collect();
        let mut embeds = Array2::<f32>::zeros((context, d.hidden_size));
        self.embeddings().gather_into(&ids, embeds.view_mut())?;
        let mut caches = self.new_caches(context + steps)?;
        let t = Instant::now();
        let mut logits = self.run_decoder(embeds.view(), &positions, &mut caches)?;
        let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut times = Vec::with_capacity(steps);
        let mut embed = Array2::<f32>::zeros((1, d.hidden_size));
        for step in 0..steps {
            let t = Instant::now();
            let id = argmax(&logits)?;
            self.embeddings().gather_into(&[id], embed.view_mut())?;
            logits = self.run_decoder(embed.view(), &[(context + step) as i64], &mut caches)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        let min = times.iter().copied().fold(f64::INFINITY, f64::min);
        let median = median(&mut times);
        Ok(DecodeBench {
            context,
            steps,
            prefill_ms,
            median_ms_per_token: median,
            mean_ms_per_token: mean,
            min_ms_per_token: min,
            kv_bytes: caches.iter().map(|c| c.bytes_used()).sum(),
        })
    }
}

/// The median of `values` (the mean of the two middle ones for an even count; NaN when empty); sorts them.
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_takes_the_mean_of_the_two_middle_values_for_an_even_count() {
        // The upper middle value (the old reading) would give 3.0 and 4.0.
        assert_eq!(median(&mut [3.0, 1.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut [5.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(&mut [7.5]), 7.5);
    }
}
