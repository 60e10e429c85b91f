//! Token sampling: greedy, temperature, top-k, top-p, min-p and repetition penalty, in the
//! order transformers applies them, with a seedable RNG (same seed, same tokens).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{EngineError, Result};

/// Sampling settings of one request. `temperature == 0` means greedy.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables.
    pub repetition_penalty: f32,
    /// `None` draws a seed from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    /// Gemma 3n's published generation defaults.
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 64,
            top_p: 0.95,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            ..Default::default()
        }
    }

    /// Rejects values no sampler can honour, with a message naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::InvalidRequest(m));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// A sampler bound to one request's RNG stream.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch for candidate (id, value) pairs; reused across steps.
    cand: Vec<(u32, f32)>,
    /// Bitset of ids already penalised in this step; reused across steps.
    seen: Vec<u64>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Sampler {
            params,
            rng,
            cand: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// Picks the next token from `logits` (modified in place), given the ids seen so far
    /// (prompt and generated, for the repetition penalty).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            self.seen.clear();
            self.seen.resize(logits.len().div_ceil(64), 0);
            for &id in history {
                let (w, b) = (id as usize / 64, 1u64 << (id % 64));
                if w < self.seen.len() && self.seen[w] & b == 0 {
                    self.seen[w] |= b;
                    if let Some(l) = logits.get_mut(id as usize) {
                        *l = if *l > 0.0 {
                            *l / p.repetition_penalty
                        } else {
                            *l * p.repetition_penalty
                        };
                    }
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature;
        self.cand.clear();
        self.cand.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l * inv_t)),
        );
        let by_value_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        if p.top_k > 0 && p.top_k < self.cand.len() {
            self.cand.select_nth_unstable_by(p.top_k - 1, by_value_desc);
            self.cand.truncate(p.top_k);
        }
        self.cand.sort_unstable_by(by_value_desc);
        // softmax over the survivors
        let m = self.cand[0].1;
        let mut sum = 0.0f64;
        for c in self.cand.iter_mut() {
            c.1 = (c.1 - m).exp();
            sum += c.1 as f64;
        }
        for c in self.cand.iter_mut() {
            c.1 = (c.1 as f64 / sum) as f32;
        }
        if p.top_p < 1.0 {
            let mut cum = 0.0f32;
            let mut keep = self.cand.len();
            for (i, c) in self.cand.iter().enumerate() {
                cum += c.1;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            self.cand.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let floor = self.cand[0].1 * p.min_p;
            let keep = self.cand.iter().take_while(|c| c.1 >= floor).count();
            self.cand.truncate(keep.max(1));
        }
        let total: f32 = self.cand.iter().map(|c| c.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for c in &self.cand {
            r -= c.1;
            if r <= 0.0 {
                return c.0;
            }
        }
        self.cand.last().map(|c| c.0).unwrap_or(0)
    }
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..100).map(|i| ((i * 37) % 100) as f32 / 10.0).collect()
    }

    #[test]
    fn greedy_takes_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        let mut l = logits();
        assert_eq!(s.sample(&mut l, &[]), argmax(&logits()));
    }

    #[test]
    fn same_seed_same_tokens_and_different_seed_differs() {
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 5.0,
                top_k: 0,
                top_p: 1.0,
                seed: Some(seed),
                ..Default::default()
            });
            (0..32)
                .map(|_| s.sample(&mut logits(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn top_k_one_and_min_p_one_are_greedy() {
        let want = argmax(&logits());
        for p in [
            SamplingParams {
                top_k: 1,
                seed: Some(3),
                ..Default::default()
            },
            SamplingParams {
                top_k: 0,
                top_p: 1.0,
                min_p: 1.0,
                seed: Some(3),
                ..Default::default()
            },
            SamplingParams {
                top_k: 0,
                top_p: 1e-6,
                seed: Some(3),
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(p);
            for _ in 0..20 {
                assert_eq!(s.sample(&mut logits(), &[]), want);
            }
        }
    }

    #[test]
    fn top_k_limits_the_support() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 100.0,
            top_k: 3,
            top_p: 1.0,
            seed: Some(9),
            ..Default::default()
        });
        let mut order: Vec<u32> = (0..100).collect();
        let l = logits();
        order.sort_by(|a, b| l[*b as usize].total_cmp(&l[*a as usize]));
        for _ in 0..200 {
            let t = s.sample(&mut logits(), &[]);
            assert!(order[..3].contains(&t));
        }
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut l = vec![1.0, 2.0, 1.9];
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&mut l, &[1]), 2);
    }

    #[test]
    fn invalid_params_are_rejected() {
        for p in [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                min_p: 2.0,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
        ] {
            assert!(p.validate().is_err(), "{p:?}");
        }
    }
}
