//! Token samplers: greedy (argmax) and seeded temperature sampling with top-k and top-p.
//!
//! Sampling is deterministic across platforms for a given seed: the RNG is xoshiro256** seeded through
//! SplitMix64, the softmax runs in f64, and candidates are ordered by (logit descending, id ascending).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Picks the next token id from a row of logits.
pub trait Sampler: Send {
    /// Returns the chosen token id; fails on empty logits or logits containing NaN.
    fn sample(&mut self, logits: &[f32]) -> Result<u32>;
}

/// How to pick tokens, as given in a request (`{"kind": "greedy"}` or `{"kind": "temperature", ...}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SamplerConfig {
    /// Always the most likely token (ties to the lowest id).
    #[default]
    Greedy,
    /// Softmax sampling at a temperature, restricted to the top-k then the top-p nucleus.
    Temperature {
        /// Logits are divided by this; must be finite and > 0.
        temperature: f32,
        /// Keep only the k most likely tokens (>= 1); `None` keeps all.
        #[serde(default)]
        top_k: Option<u32>,
        /// Keep the smallest set of tokens whose probability sums to at least this (0 < top_p <= 1).
        #[serde(default = "default_top_p")]
        top_p: f32,
        /// RNG seed; equal seeds give equal token sequences on equal logits.
        #[serde(default)]
        seed: u64,
    },
}

fn default_top_p() -> f32 {
    1.0
}

impl SamplerConfig {
    /// Checks the parameters are in range.
    pub fn validate(&self) -> Result<()> {
        match *self {
            SamplerConfig::Greedy => Ok(()),
            SamplerConfig::Temperature { temperature, top_k, top_p, .. } => {
                if !temperature.is_finite() || temperature <= 0.0 {
                    return Err(Error::InvalidRequest(format!(
                        "temperature must be finite and > 0, got {temperature}"
                    )));
                }
                if !(top_p > 0.0 && top_p <= 1.0) {
                    return Err(Error::InvalidRequest(format!("top_p must be in (0, 1], got {top_p}")));
                }
                if top_k == Some(0) {
                    return Err(Error::InvalidRequest("top_k must be >= 1".into()));
                }
                Ok(())
            }
        }
    }

    /// Validates the configuration and builds the sampler.
    pub fn build(&self) -> Result<Box<dyn Sampler>> {
        self.validate()?;
        Ok(match *self {
            SamplerConfig::Greedy => Box::new(Greedy),
            SamplerConfig::Temperature { temperature, top_k, top_p, seed } => {
                Box::new(TemperatureSampler::new(temperature, top_k, top_p, seed)?)
            }
        })
    }
}

/// Returns the index of the largest logit, ties to the lowest id; fails on empty input or NaN.
pub fn argmax(logits: &[f32]) -> Result<u32> {
    check_logits(logits)?;
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate().skip(1) {
        if v > logits[best] {
            best = i;
        }
    }
    to_id(best)
}

fn check_logits(logits: &[f32]) -> Result<()> {
    if logits.is_empty() {
        return Err(Error::InvalidRequest("cannot sample from empty logits".into()));
    }
    if u32::try_from(logits.len()).is_err() {
        return Err(Error::InvalidRequest(format!("{} logits do not fit u32 token ids", logits.len())));
    }
    if let Some(i) = logits.iter().position(|v| v.is_nan()) {
        return Err(Error::InvalidRequest(format!("logits contain NaN (token {i})")));
    }
    Ok(())
}

fn to_id(i: usize) -> Result<u32> {
    u32::try_from(i).map_err(|_| Error::InvalidRequest(format!("token index {i} does not fit u32")))
}

/// The greedy sampler: argmax, ties to the lowest id.
#[derive(Clone, Copy, Debug, Default)]
pub struct Greedy;

impl Sampler for Greedy {
    fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        argmax(logits)
    }
}

/// Temperature sampling with optional top-k and top-p truncation, seeded.
#[derive(Clone, Debug)]
pub struct TemperatureSampler {
    temperature: f64,
    top_k: Option<usize>,
    top_p: f64,
    rng: Rng,
    candidates: Vec<u32>,
    weights: Vec<f64>,
}

impl TemperatureSampler {
    /// Builds a sampler after validating the parameters (see [`SamplerConfig::Temperature`]).
    pub fn new(temperature: f32, top_k: Option<u32>, top_p: f32, seed: u64) -> Result<Self> {
        SamplerConfig::Temperature { temperature, top_k, top_p, seed }.validate()?;
        Ok(TemperatureSampler {
            temperature: f64::from(temperature),
            top_k: top_k.map(|k| k as usize),
            top_p: f64::from(top_p),
            rng: Rng::seed_from_u64(seed),
            candidates: Vec::new(),
            weights: Vec::new(),
        })
    }
}

impl Sampler for TemperatureSampler {
    fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        check_logits(logits)?;
        if logits.contains(&f32::INFINITY) {
            return Err(Error::InvalidRequest("logits contain +inf".into()));
        }
        let n = logits.len();
        // Order: logit descending, then id ascending. By value, so that -0.0 and +0.0 tie and go to the lower id
        // as in greedy decoding (total_cmp would rank +0.0 first); NaN is already rejected, so this is total.
        let order = |a: &u32, b: &u32| {
            let (la, lb) = (logits[*a as usize], logits[*b as usize]);
            lb.partial_cmp(&la).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(b))
        };
        self.candidates.clear();
        self.candidates.extend(0..n as u32);
        let k = self.top_k.unwrap_or(n).min(n);
        if k < n {
            self.candidates.select_nth_unstable_by(k - 1, order);
            self.candidates.truncate(k);
            self.candidates.sort_unstable_by(order);
        } else if self.top_p < 1.0 {
            self.candidates.sort_unstable_by(order);
        }
        let max = self
            .candidates
            .iter()
            .map(|&i| logits[i as usize])
            .fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return Err(Error::InvalidRequest("all logits are -inf".into()));
        }
        let max = f64::from(max);
        self.weights.clear();
        let mut total = 0.0f64;
        for &i in &self.candidates {
            let w = ((f64::from(logits[i as usize]) - max) / self.temperature).exp();
            total += w;
            self.weights.push(w);
        }
        // Nucleus: the smallest prefix (candidates are sorted when top_p < 1) whose probability reaches top_p.
        let mut kept = self.weights.len();
        if self.top_p < 1.0 {
            let threshold = self.top_p * total;
            let mut cum = 0.0;
            for (j, w) in self.weights.iter().enumerate() {
                cum += w;
                if cum >= threshold {
                    kept = j + 1;
                    break;
                }
            }
        }
        let kept_total: f64 = self.weights[..kept].iter().sum();
        let u = self.rng.next_f64() * kept_total;
        let mut cum = 0.0;
        let mut last_positive = 0;
        for j in 0..kept {
            let w = self.weights[j];
            if w > 0.0 {
                last_positive = j;
            }
            cum += w;
            if u < cum {
                return Ok(self.candidates[j]);
            }
        }
        // Rounding left u at the very top: take the last token with non-zero weight.
        Ok(self.candidates[last_positive])
    }
}

/// A small deterministic RNG: xoshiro256** seeded via SplitMix64.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

/// One step of SplitMix64: advances `state` and returns the next output.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// Seeds the four state words from SplitMix64(seed), as the xoshiro authors recommend.
    pub fn seed_from_u64(seed: u64) -> Self {
        let mut state = seed;
        let s = std::array::from_fn(|_| splitmix64(&mut state));
        Rng { s }
    }

    /// Builds the generator from raw state words (must not be all zero; zero state is replaced by seed 0).
    pub fn from_state(s: [u64; 4]) -> Self {
        if s == [0; 4] {
            Rng::seed_from_u64(0)
        } else {
            Rng { s }
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform float in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use super::Rng;
    use proptest::prelude::*;

    fn temp(temperature: f32, top_k: Option<u32>, top_p: f32, seed: u64) -> TemperatureSampler {
        TemperatureSampler::new(temperature, top_k, top_p, seed).unwrap()
    }

    fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
        let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let e: Vec<f64> = logits.iter().map(|&l| ((l as f64 - m) / t).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|x| x / s).collect()
    }

    #[test]
    fn rng_reference_vectors() {
        // SplitMix64 reference output for seed 0.
        let mut st = 0u64;
        assert_eq!(splitmix64(&mut st), 0xE220_A839_7B1D_CDAF);
        // xoshiro256** reference outputs from state [1, 2, 3, 4].
        let mut r = Rng::from_state([1, 2, 3, 4]);
        let got: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
        assert_eq!(got, vec![11520, 0, 1509978240, 1215971899390074240]);
        let mut r = Rng::seed_from_u64(7);
        assert!((0..1000).map(|_| r.next_f64()).all(|x| (0.0..1.0).contains(&x)));
    }

    #[test]
    fn greedy_is_argmax_with_ties_low() {
        let mut g = Greedy;
        assert_eq!(g.sample(&[0.1, 3.0, -2.0, 3.0]).unwrap(), 1);
        assert_eq!(g.sample(&[f32::NEG_INFINITY, -1e30]).unwrap(), 1);
        assert_eq!(g.sample(&[5.0]).unwrap(), 0);
        assert_eq!(g.sample(&[1.0, f32::INFINITY, 2.0]).unwrap(), 1);
        assert!(g.sample(&[]).is_err());
        assert!(g.sample(&[1.0, f32::NAN]).is_err());
    }

    #[test]
    fn rejects_bad_inputs_and_configs() {
        let mut s = temp(1.0, None, 1.0, 0);
        assert!(s.sample(&[]).is_err());
        assert!(s.sample(&[0.0, f32::NAN]).is_err());
        assert!(s.sample(&[0.0, f32::INFINITY]).is_err());
        assert!(s.sample(&[f32::NEG_INFINITY; 3]).is_err());
        for (t, k, p) in [(0.0, None, 1.0), (-1.0, None, 1.0), (f32::NAN, None, 1.0), (f32::INFINITY, None, 1.0),
            (1.0, Some(0), 1.0), (1.0, None, 0.0), (1.0, None, 1.5), (1.0, None, f32::NAN)]
        {
            let c = SamplerConfig::Temperature { temperature: t, top_k: k, top_p: p, seed: 0 };
            assert!(matches!(c.build(), Err(Error::InvalidRequest(_))), "{c:?}");
        }
    }

    #[test]
    fn config_serde() {
        let c: SamplerConfig = serde_json::from_str(r#"{"kind": "greedy"}"#).unwrap();
        assert_eq!(c, SamplerConfig::Greedy);
        let c: SamplerConfig = serde_json::from_str(r#"{"kind": "temperature", "temperature": 0.7}"#).unwrap();
        assert_eq!(c, SamplerConfig::Temperature { temperature: 0.7, top_k: None, top_p: 1.0, seed: 0 });
        let j = r#"{"kind": "temperature", "temperature": 0.5, "top_k": 40, "top_p": 0.9, "seed": 42}"#;
        let c: SamplerConfig = serde_json::from_str(j).unwrap();
        assert_eq!(c, SamplerConfig::Temperature { temperature: 0.5, top_k: Some(40), top_p: 0.9, seed: 42 });
        assert!(serde_json::from_str::<SamplerConfig>(r#"{"kind": "temperature"}"#).is_err());
        assert!(serde_json::from_str::<SamplerConfig>(r#"{"kind": "temperature", "temperature": 1, "x": 1}"#).is_err());
        assert!(serde_json::from_str::<SamplerConfig>(r#"{"kind": "beam"}"#).is_err());
        assert!(c.build().is_ok());
    }

    const FIXED: [f32; 8] = [1.0, 2.5, 0.3, 2.4, -1.0, 0.0, 1.7, 2.5];

    #[test]
    fn seeded_sequence_is_reproducible() {
        let run = |seed| {
            let mut s = temp(0.8, Some(5), 0.95, seed);
            (0..24).map(|_| s.sample(&FIXED).unwrap()).collect::<Vec<u32>>()
        };
        let a = run(1234);
        assert_eq!(a, run(1234));
        assert_ne!(a, run(1235));
        // Regression value: computed once with this implementation; any change to the RNG, ordering or
        // arithmetic that alters sampled tokens shows up here.
        assert_eq!(a, REGRESSION_1234);
    }

    const REGRESSION_1234: [u32; 24] = [1, 3, 3, 3, 1, 6, 7, 1, 7, 3, 7, 1, 1, 3, 7, 3, 3, 6, 6, 3, 3, 1, 7, 1];

    #[test]
    fn frequencies_match_softmax() {
        let logits = [1.0f32, 2.0, 0.5, 3.0, -1.0];
        let t = 0.7;
        let mut s = temp(t as f32, None, 1.0, 99);
        let n = 20_000;
        let mut counts = [0usize; 5];
        for _ in 0..n {
            counts[s.sample(&logits).unwrap() as usize] += 1;
        }
        let p = softmax(&logits, t);
        for i in 0..5 {
            let f = counts[i] as f64 / n as f64;
            let sigma = (p[i] * (1.0 - p[i]) / n as f64).sqrt();
            assert!((f - p[i]).abs() < 4.0 * sigma + 1e-3, "token {i}: {f} vs {}", p[i]);
        }
    }

    #[test]
    fn truncated_frequencies_match_renormalised_softmax() {
        // top_k = 3 keeps ids 3, 1, 0 (probabilities 0.665, 0.245, 0.090 at t = 1, cumulative 0.665, 0.910, 1):
        // top_p = 0.95 keeps all three, 0.9 and 0.7 keep two, 0.6 keeps one.
        let logits = [1.0f32, 2.0, 0.5, 3.0, -1.0];
        for (top_p, kept) in [(0.95f32, vec![3usize, 1, 0]), (0.9, vec![3, 1]), (0.7, vec![3, 1]), (0.6, vec![3])] {
            let mut s = temp(1.0, Some(3), top_p, 5);
            let n = 20_000;
            let mut counts = [0usize; 5];
            for _ in 0..n {
                counts[s.sample(&logits).unwrap() as usize] += 1;
            }
            let sub: Vec<f32> = kept.iter().map(|&i| logits[i]).collect();
            let p = softmax(&sub, 1.0);
            for (j, &i) in kept.iter().enumerate() {
                let f = counts[i] as f64 / n as f64;
                assert!((f - p[j]).abs() < 0.015, "top_p {top_p} token {i}: {f} vs {}", p[j]);
            }
            let outside: usize = (0..5).filter(|i| !kept.contains(i)).map(|i| counts[i]).sum();
            assert_eq!(outside, 0);
        }
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let mut r = Rng::seed_from_u64(3);
        for seed in 0..50 {
            let logits: Vec<f32> = (0..100).map(|_| (r.next_f64() * 10.0 - 5.0) as f32).collect();
            let want = argmax(&logits).unwrap();
            assert_eq!(temp(1.3, Some(1), 1.0, seed).sample(&logits).unwrap(), want);
            assert_eq!(temp(1.3, None, 1e-6, seed).sample(&logits).unwrap(), want);
        }
        // Ties: top_k = 1 keeps the lowest id, like greedy.
        assert_eq!(temp(1.0, Some(1), 1.0, 0).sample(&FIXED).unwrap(), 1);
        assert_eq!(temp(1.0, None, 1e-6, 0).sample(&FIXED).unwrap(), 1);
        // -0.0 and +0.0 are a tie too.
        let zeros = [-0.0f32, 0.0];
        assert_eq!(argmax(&zeros).unwrap(), 0);
        assert_eq!(temp(1.0, Some(1), 1.0, 0).sample(&zeros).unwrap(), 0);
        assert_eq!(temp(1.0, None, 1e-6, 0).sample(&zeros).unwrap(), 0);
    }

    proptest! {
        #[test]
        fn sampled_id_is_in_top_k(
            logits in proptest::collection::vec(-20.0f32..20.0, 1..64),
            k in 1u32..10,
            top_p in 0.01f32..=1.0,
            t in 0.05f32..5.0,
            seed in any::<u64>(),
        ) {
            let mut s = TemperatureSampler::new(t, Some(k), top_p, seed).unwrap();
            let id = s.sample(&logits).unwrap() as usize;
            prop_assert!(id < logits.len());
            // The allowed set: the k first by (logit desc, id asc).
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            order.truncate(k as usize);
            prop_assert!(order.contains(&id), "id {} not in {:?}", id, order);
        }

        #[test]
        fn never_fails_on_finite_logits(
            logits in proptest::collection::vec(-1e30f32..1e30, 1..32),
            seed in any::<u64>(),
        ) {
            let mut s = TemperatureSampler::new(0.01, None, 0.5, seed).unwrap();
            prop_assert!((s.sample(&logits).unwrap() as usize) < logits.len());
        }
    }
}
