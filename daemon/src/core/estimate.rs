//! How long queued work will take, for the `retry-after` hint: measured prefill and
//! decode rates, the share of `max_tokens` requests really generate, and each job's own
//! prompt length and `max_tokens`. A job is prefill (prompt tokens / prefill rate) plus
//! decode (expected tokens / decode rate) plus a fixed overhead; the running job counts
//! for what is left of it.

use std::time::Duration;

/// What one finished job measured.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct JobStats {
    pub prompt_tokens: usize,
    pub prefill: Duration,
    pub completion_tokens: usize,
    pub decode: Duration,
    pub max_tokens: usize,
    /// The request asked to ignore end-of-sequence (it generates `max_tokens`), so it
    /// says nothing about how early requests stop.
    pub ignore_eos: bool,
    /// The whole time the job held the engine thread.
    pub held: Duration,
}

/// The size of one job, as far as the queue knows it before it runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobSize {
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    pub ignore_eos: bool,
}

/// Moving averages of what jobs measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// Generated tokens / max_tokens, of requests that may stop early.
    pub generated_share: f64,
    /// Time a job holds the engine thread beyond prefill and decode (seconds).
    pub overhead_s: f64,
}

/// The weight of a new measurement in the moving averages.
const ALPHA: f64 = 0.25;

fn ema(old: f64, new: f64) -> f64 {
    if new.is_finite() {
        old + ALPHA * (new - old)
    } else {
        old
    }
}

impl Default for Rates {
    /// Before the first job: a small model on a slow CPU, and half of `max_tokens`.
    fn default() -> Self {
        Rates {
            prefill_tokens_per_s: 100.0,
            decode_tokens_per_s: 10.0,
            generated_share: 0.5,
            overhead_s: 0.0,
        }
    }
}

impl Rates {
    /// Folds in one finished job (parts too short to time are left out).
    pub fn update(&mut self, s: &JobStats) {
        let (prefill, decode) = (s.prefill.as_secs_f64(), s.decode.as_secs_f64());
        if s.prompt_tokens > 0 && prefill > 1e-4 {
            self.prefill_tokens_per_s =
                ema(self.prefill_tokens_per_s, s.prompt_tokens as f64 / prefill);
        }
        if s.completion_tokens > 1 && decode > 1e-4 {
            self.decode_tokens_per_s = ema(
                self.decode_tokens_per_s,
                s.completion_tokens as f64 / decode,
            );
        }
        if !s.ignore_eos && s.max_tokens > 0 {
            let share = (s.completion_tokens as f64 / s.max_tokens as f64).min(1.0);
            self.generated_share = ema(self.generated_share, share);
        }
        let overhead = (s.held.as_secs_f64() - prefill - decode).max(0.0);
        self.overhead_s = ema(self.overhead_s, overhead);
    }

    fn expected_tokens(&self, j: &JobSize) -> f64 {
        if j.ignore_eos {
            j.max_tokens as f64
        } else {
            self.generated_share * j.max_tokens as f64
        }
    }

    /// Expected time of a job from its start to its end.
    pub fn job(&self, j: &JobSize) -> Duration {
        let s = j.prompt_tokens as f64 / self.prefill_tokens_per_s.max(1e-3)
            + self.expected_tokens(j) / self.decode_tokens_per_s.max(1e-3)
            + self.overhead_s;
        secs(s)
    }

    /// Expected time left of a running job that started `elapsed` ago and has generated
    /// `generated` tokens: its prefill if not done, then the tokens still expected
    /// (at least one: it has not ended).
    pub fn remaining(&self, j: &JobSize, elapsed: Duration, generated: usize) -> Duration {
        let prefill = j.prompt_tokens as f64 / self.prefill_tokens_per_s.max(1e-3);
        let prefill_left = if generated == 0 {
            (prefill - elapsed.as_secs_f64()).max(0.0)
        } else {
            0.0
        };
        let mut left = (self.expected_tokens(j) - generated as f64).max(1.0);
        left = left.min(j.max_tokens.saturating_sub(generated).max(1) as f64);
        secs(prefill_left + left / self.decode_tokens_per_s.max(1e-3) + self.overhead_s)
    }
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(d: Duration) -> u128 {
        d.as_millis()
    }

    #[test]
    fn learns_rates_and_predicts_jobs() {
        let mut r = Rates::default();
        // 100 prompt tokens in 0.1 s, 50 of 100 tokens in 1 s, 0.05 s besides: many
        // times, so the averages settle on them.
        let s = JobStats {
            prompt_tokens: 100,
            prefill: Duration::from_millis(100),
            completion_tokens: 50,
            decode: Duration::from_secs(1),
            max_tokens: 100,
            ignore_eos: false,
            held: Duration::from_millis(1150),
        };
        for _ in 0..100 {
            r.update(&s);
        }
        assert!((r.prefill_tokens_per_s - 1000.0).abs() < 1e-6, "{r:?}");
        assert!((r.decode_tokens_per_s - 50.0).abs() < 1e-6, "{r:?}");
        assert!((r.generated_share - 0.5).abs() < 1e-9, "{r:?}");
        assert!((r.overhead_s - 0.05).abs() < 1e-9, "{r:?}");
        // 2000 prompt tokens (2 s) + half of 400 tokens at 50/s (4 s) + 0.05 s.
        let j = JobSize {
            prompt_tokens: 2000,
            max_tokens: 400,
            ignore_eos: false,
        };
        assert_eq!(ms(r.job(&j)), 6050);
        // ignore_eos generates all 400 (8 s).
        let all = JobSize {
            ignore_eos: true,
            ..j
        };
        assert_eq!(ms(r.job(&all)), 10050);
        // Running for 1 s: 1 s of prefill left, then 4 s.
        assert_eq!(ms(r.remaining(&j, Duration::from_secs(1), 0)), 5050);
        // 150 generated: 50 expected left (1 s).
        assert_eq!(ms(r.remaining(&j, Duration::from_secs(5), 150)), 1050);
        // Past the expected share: at least one more token (20 ms).
        assert_eq!(ms(r.remaining(&j, Duration::from_secs(9), 300)), 70);
        // An ignore_eos request with a measured share of 0 still predicts all tokens.
        let short = JobStats {
            completion_tokens: 0,
            ..s
        };
        for _ in 0..100 {
            r.update(&short);
        }
        assert!(r.generated_share < 1e-9);
        assert_eq!(ms(r.job(&all)), ms(r.job(&j)) + 8000);
    }

    #[test]
    fn unusable_measurements_change_nothing() {
        let mut r = Rates::default();
        r.update(&JobStats::default());
        let d = Rates::default();
        assert_eq!(
            (r.prefill_tokens_per_s, r.decode_tokens_per_s),
            (d.prefill_tokens_per_s, d.decode_tokens_per_s)
        );
    }
}
