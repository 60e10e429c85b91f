//! Token sampling: greedy, temperature, top-k, top-p, min-p and repetition penalty, in the
//! order transformers applies them, with a seedable RNG (same seed, same tokens).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{EngineError, Result};
use crate::model::ops;

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
        self.candidates(logits);
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

    /// The tokens that may be drawn and their probabilities, into `self.cand`: temperature,
    /// top-k (softmax over the survivors), top-p over those sorted by probability, min-p.
    /// Only the candidates that can matter are sorted: the k largest are found by a scan
    /// that skips 64-logit chunks below the running k-th value (sorting all 262k logits
    /// for each token cost 0.5 ms with top-k 64 and 7 ms without top-k).
    fn candidates(&mut self, logits: &[f32]) {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let n = logits.len();
        if p.top_k > 0 && p.top_k < n {
            top_k_into(logits, p.top_k, inv_t, &mut self.cand);
            self.cand.sort_unstable_by(by_value_desc);
            let m = self.cand[0].1;
            softmax_with_max(&mut self.cand, m);
            if p.top_p < 1.0 {
                let keep = top_p_len(&self.cand, p.top_p).unwrap_or(self.cand.len());
                self.cand.truncate(keep);
            }
        } else if p.top_p < 1.0 {
            // Every token is a candidate, but top-p keeps only the most probable: the
            // 64 largest usually hold the mass; otherwise select by mass over all.
            let m = max(logits) * inv_t;
            let sum = exp_sum(logits, inv_t, m);
            let prob = |v: f32| (ops::exp_f32(v - m) as f64 / sum) as f32;
            top_k_into(logits, 64.min(n), inv_t, &mut self.cand);
            self.cand.sort_unstable_by(by_value_desc);
            self.cand.iter_mut().for_each(|c| c.1 = prob(c.1));
            match top_p_len(&self.cand, p.top_p) {
                Some(keep) => self.cand.truncate(keep),
                None => {
                    self.cand.clear();
                    self.cand.extend(
                        logits
                            .iter()
                            .enumerate()
                            .map(|(i, &l)| (i as u32, prob(l * inv_t))),
                    );
                    let keep = top_mass(&mut self.cand, p.top_p);
                    self.cand.truncate(keep);
                }
            }
        } else {
            self.cand.clear();
            self.cand.extend(
                logits
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| (i as u32, l * inv_t)),
            );
            // Unsorted: without top-p the order of the draw does not change its odds.
            softmax_with_max(&mut self.cand, max(logits) * inv_t);
        }
        if p.min_p > 0.0 {
            let top = self.cand.iter().map(|c| c.1).fold(0.0f32, f32::max);
            let floor = top * p.min_p;
            self.cand.retain(|c| c.1 >= floor);
        }
    }
}

/// Candidates by value, largest first.
fn by_value_desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1)
}

/// The length of the shortest prefix of `cand` (probabilities, largest first) whose mass
/// reaches `top_p`, if any does.
fn top_p_len(cand: &[(u32, f32)], top_p: f32) -> Option<usize> {
    let mut cum = 0.0f32;
    cand.iter()
        .position(|c| {
            cum += c.1;
            cum >= top_p
        })
        .map(|i| i + 1)
}

/// In place: values → probabilities over these candidates, `m` their largest value.
fn softmax_with_max(cand: &mut [(u32, f32)], m: f32) {
    let mut sum = 0.0f64;
    for c in cand.iter_mut() {
        c.1 = (c.1 - m).exp();
        sum += c.1 as f64;
    }
    for c in cand.iter_mut() {
        c.1 = (c.1 as f64 / sum) as f32;
    }
}

/// Rearranges `c` (probabilities) so that its first `n` entries, the returned count, are
/// the most probable ones whose mass first reaches `target` (all of them if it never
/// does), by halving selections instead of a sort: top-p without top-k over a flat
/// 262k-token distribution took 7 ms sorted.
fn top_mass(c: &mut [(u32, f32)], target: f32) -> usize {
    let (mut lo, mut hi, mut need) = (0, c.len(), target);
    while hi - lo > 64 {
        let mid = (hi - lo) / 2;
        c[lo..hi].select_nth_unstable_by(mid, by_value_desc);
        let mass: f32 = c[lo..lo + mid].iter().map(|e| e.1).sum();
        if mass >= need {
            hi = lo + mid;
        } else {
            need -= mass;
            lo += mid;
        }
    }
    c[lo..hi].sort_unstable_by(by_value_desc);
    top_p_len(&c[lo..hi], need).map_or(hi, |k| lo + k)
}

/// `Σ exp(l·inv_t − m)` over all logits, in f64 (per 4096 in f32, in 8 lanes).
fn exp_sum(logits: &[f32], inv_t: f32, m: f32) -> f64 {
    ops::wide(
        #[inline(always)]
        || {
            logits
                .chunks(4096)
                .map(|ch| {
                    let mut acc = [0.0f32; 8];
                    let mut it = ch.chunks_exact(8);
                    for c in &mut it {
                        for k in 0..8 {
                            acc[k] += ops::exp_f32(c[k] * inv_t - m);
                        }
                    }
                    let tail: f32 = it
                        .remainder()
                        .iter()
                        .map(|&l| ops::exp_f32(l * inv_t - m))
                        .sum();
                    (acc.iter().sum::<f32>() + tail) as f64
                })
                .sum()
        },
    )
}

/// The largest of `v` (NaN ignored; −∞ when empty or all NaN), in 8 lanes.
#[inline(always)]
fn max8(v: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            m[k] = m[k].max(c[k]);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    m.iter().fold(tail, |a, &b| a.max(b))
}

fn max(v: &[f32]) -> f32 {
    ops::wide(
        #[inline(always)]
        || max8(v),
    )
}

/// The `k` largest of `logits · inv_t` (ids and values, unordered) into `out`. A 64-logit
/// chunk whose largest value cannot beat the k-th best so far is skipped after one
/// vectorized max; survivors collect in a buffer that is cut back to the best k whenever
/// it holds 4k, so even ascending logits stay linear.
fn top_k_into(logits: &[f32], k: usize, inv_t: f32, out: &mut Vec<(u32, f32)>) {
    out.clear();
    if k == 0 {
        return;
    }
    const CHUNK: usize = 64;
    ops::wide(
        #[inline(always)]
        || {
            // The k-th best value once `out` has been cut to k (nothing is skipped before).
            let mut floor = None;
            for (ci, ch) in logits.chunks(CHUNK).enumerate() {
                if floor.is_some_and(|f| max8(ch) * inv_t <= f) {
                    continue;
                }
                for (j, &l) in ch.iter().enumerate() {
                    let v = l * inv_t;
                    if floor.is_none_or(|f| v > f) {
                        out.push(((ci * CHUNK + j) as u32, v));
                    }
                }
                if out.len() >= 4 * k.max(16) {
                    out.select_nth_unstable_by(k - 1, by_value_desc);
                    out.truncate(k);
                    floor = Some(out.iter().map(|c| c.1).fold(f32::INFINITY, f32::min));
                }
            }
        },
    );
    if out.len() > k {
        out.select_nth_unstable_by(k - 1, by_value_desc);
        out.truncate(k);
    }
}

/// Index of the largest logit (the first of equals; NaN never wins; 0 when all are NaN):
/// a vectorized max, then the first 64-logit chunk holding it (scalar, this was 150 µs
/// of every greedy 262k-vocabulary token).
pub fn argmax(v: &[f32]) -> u32 {
    let m = max(v);
    ops::wide(
        #[inline(always)]
        || {
            for (ci, ch) in v.chunks(64).enumerate() {
                if ch.iter().fold(false, |a, &x| a | (x == m)) {
                    let j = ch.iter().position(|&x| x == m).unwrap_or(0);
                    return (ci * 64 + j) as u32;
                }
            }
            0
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

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

    /// The sampler before its candidates were found without sorting every logit: what
    /// `candidates` must keep, with the same probabilities.
    fn reference_candidates(p: &SamplingParams, logits: &[f32]) -> Vec<(u32, f32)> {
        let inv_t = 1.0 / p.temperature;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l * inv_t))
            .collect();
        let by_value_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_value_desc);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(by_value_desc);
        let m = cand[0].1;
        let e: Vec<f64> = cand.iter().map(|c| (c.1 - m).exp() as f64).collect();
        let sum: f64 = e.iter().sum();
        for (c, e) in cand.iter_mut().zip(e) {
            c.1 = (e / sum) as f32;
        }
        if p.top_p < 1.0 {
            let mut cum = 0.0f32;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                cum += c.1;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let floor = cand[0].1 * p.min_p;
            let keep = cand.iter().take_while(|c| c.1 >= floor).count();
            cand.truncate(keep.max(1));
        }
        cand
    }

    #[test]
    fn candidates_match_sorting_every_logit() {
        // Distinct logits (no ties at a cut): a 262k vocabulary flat and peaked, ascending
        // (every chunk beats the running k-th best), and a small one.
        let n = 262_144;
        let flat: Vec<f32> = (0..n)
            .map(|i| ((i as u64 * 2_654_435_761) % n as u64) as f32 / n as f32 * 12.0 - 6.0)
            .collect();
        let peaked: Vec<f32> = flat
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                if i % 4099 == 5 {
                    x + 9.0 + (i % 7) as f32
                } else {
                    x
                }
            })
            .collect();
        let ascending: Vec<f32> = (0..n).map(|i| i as f32 * 1e-4).collect();
        let small: Vec<f32> = (0..100).map(|i| ((i * 37) % 100) as f32 / 10.0).collect();
        let params = [
            (1.0, 64, 0.95, 0.0),
            (0.7, 40, 1.0, 0.0),
            (1.0, 0, 0.95, 0.0),
            (1.5, 0, 0.5, 0.0),
            (1.0, 0, 0.9, 0.05),
            (1.0, 0, 1.0, 0.01),
            (1.0, 1000, 0.8, 0.0),
        ];
        for logits in [&flat, &peaked, &ascending, &small] {
            for (temperature, top_k, top_p, min_p) in params {
                let p = SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    seed: Some(1),
                    ..Default::default()
                };
                let mut s = Sampler::new(p.clone());
                s.candidates(logits);
                let got = s.cand.clone();
                let want = reference_candidates(&p, logits);
                // The same tokens with the same probabilities, except where a top-p cut
                // falls: cumulative f32 sums in another order may move it by a token of
                // the least probable kept ones.
                let least = want.iter().map(|c| c.1).fold(f32::INFINITY, f32::min);
                let (gm, wm): (HashMap<u32, f32>, HashMap<u32, f32>) = (
                    got.iter().copied().collect(),
                    want.iter().copied().collect(),
                );
                let mut differ = 0;
                for (id, &pg) in &gm {
                    match wm.get(id) {
                        Some(&pw) => assert!(
                            (pg - pw).abs() <= 1e-5 * pw + 1e-12,
                            "{p:?}: token {id} p {pg} vs {pw}"
                        ),
                        None => {
                            differ += 1;
                            assert!(pg <= least * 1.0001, "{p:?}: extra token {id} p {pg}");
                        }
                    }
                }
                for (id, &pw) in &wm {
                    if !gm.contains_key(id) {
                        differ += 1;
                        assert!(pw <= least * 1.0001, "{p:?}: missing token {id} p {pw}");
                    }
                }
                assert!(
                    differ <= (want.len() / 1000).max(1) && (differ == 0 || p.top_p < 1.0),
                    "{p:?} over {} logits: {differ} tokens differ of {}",
                    logits.len(),
                    want.len()
                );
            }
        }
    }

    #[test]
    fn argmax_is_the_first_largest() {
        let reference = |v: &[f32]| {
            let mut best = 0usize;
            for (i, &x) in v.iter().enumerate() {
                if x > v[best] || (v[best].is_nan() && !x.is_nan()) {
                    best = i;
                }
            }
            best as u32
        };
        let mut cases: Vec<Vec<f32>> = vec![
            vec![],
            vec![f32::NAN; 5],
            vec![f32::NAN, 1.0, 3.0, 3.0, f32::NAN],
            vec![-0.0, 0.0, -1.0],
            vec![f32::NEG_INFINITY; 3],
        ];
        for n in [1, 7, 64, 65, 1000, 262_144] {
            let v: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1013) as f32).collect();
            cases.push(v);
        }
        let mut late = vec![0.5f32; 300_000];
        late[299_999] = 2.0;
        late[150_000] = f32::NAN;
        cases.push(late);
        for v in &cases {
            assert_eq!(argmax(v), reference(v), "{:?}", &v[..v.len().min(8)]);
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
