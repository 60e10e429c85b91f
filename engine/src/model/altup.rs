//! AltUp (`Gemma3nTextAltUp`): the four hidden-state streams a decoder layer predicts
//! from, corrects with its output, and the router that mixes them. Names follow
//! modeling_gemma3n.py.

use std::ops::Range;

use super::ops;
use super::scratch::Scratch;
use crate::weights::Matrix;

#[derive(Debug)]
pub struct AltUp {
    pub correct_output_scale: Vec<f32>,
    /// `[4, 4]` row-major, clamped to ±altup_coef_clip at load.
    pub correction_coefs: Vec<f32>,
    /// `[16, 4]` row-major.
    pub prediction_coefs: Vec<f32>,
    pub modality_router: Matrix,
    pub router_norm: Vec<f32>,
}

/// Width of the pieces AltUp walks a token's streams in (their partial sums stay in
/// registers and L1).
const PIECE: usize = 256;

/// Token `ti`'s row of width `h` in [`PIECE`]-wide pieces: each piece's range in the row
/// and in the `[t, h]` arrays.
#[inline(always)]
fn pieces(ti: usize, h: usize) -> impl Iterator<Item = (Range<usize>, Range<usize>)> {
    (0..h).step_by(PIECE).map(move |lo| {
        let n = (h - lo).min(PIECE);
        (lo..lo + n, ti * h + lo..ti * h + lo + n)
    })
}

impl AltUp {
    /// `tanh(modality_router(router_norm(x) / H))` for each of `t` rows of `x`: `[t, A]`.
    pub fn compute_router_modalities(
        &self,
        x: &[f32],
        t: usize,
        h: usize,
        eps: f32,
        sc: &mut Scratch,
    ) -> Vec<f32> {
        let mut xn = sc.copy_of(x);
        ops::rms_norm(&mut xn, h, Some(&self.router_norm), eps);
        let scale = 1.0 / h as f32;
        ops::for_rows(
            &mut xn,
            h,
            #[inline(always)]
            |_, row| row.iter_mut().for_each(|v| *v *= scale),
        );
        let a = self.modality_router.rows;
        let mut out = sc.take(t * a);
        self.modality_router.matmul(&xn, t, &mut out);
        for v in out.iter_mut() {
            *v = v.tanh();
        }
        sc.give(xn);
        out
    }

    /// The predicted streams: `pred[i] = S[i] + Σ_j coef[A·i + j] · S[j]`, the
    /// coefficients routed from the active stream. Returns `A` arrays of `[t, H]` (the
    /// rest of the array empty), taken from `sc`.
    pub fn predict(
        &self,
        streams: &[Vec<f32>],
        t: usize,
        h: usize,
        active: usize,
        eps: f32,
        sc: &mut Scratch,
    ) -> [Vec<f32>; ops::MAX_ROW_SETS] {
        let a = streams.len();
        let modalities = self.compute_router_modalities(&streams[active], t, h, eps, sc);
        let mut coefs = sc.take(t * a * a);
        for ti in 0..t {
            let md = &modalities[ti * a..(ti + 1) * a];
            for k in 0..a * a {
                let w = &self.prediction_coefs[k * a..(k + 1) * a];
                coefs[ti * a * a + k] = w.iter().zip(md).map(|(x, y)| x * y).sum();
            }
        }
        sc.give(modalities);
        // All of a token's streams in one pass, each read once per 256-wide piece:
        // per element s = 0 + S0·c0 + S1·c1 + …, then pred = S[i] + s, in that order.
        let mut pred_arr: [Vec<f32>; ops::MAX_ROW_SETS] = Default::default();
        for p in pred_arr.iter_mut().take(a) {
            *p = sc.take_for_write(t * h);
        }
        ops::for_rows_of(
            &mut pred_arr[..a],
            h,
            #[inline(always)]
            |ti, rows| {
                let mut s = [0.0f32; PIECE];
                for (piece, at) in pieces(ti, h) {
                    for (i, row) in rows.iter_mut().enumerate() {
                        let cf = &coefs[ti * a * a + i * a..ti * a * a + (i + 1) * a];
                        let s = &mut s[..piece.len()];
                        s.fill(0.0);
                        for (sj, &c) in streams.iter().zip(cf) {
                            for (sv, &x) in s.iter_mut().zip(&sj[at.clone()]) {
                                *sv += x * c;
                            }
                        }
                        let own = &streams[i][at.clone()];
                        for ((pv, &sv), &x) in row[piece.clone()].iter_mut().zip(s.iter()).zip(own)
                        {
                            *pv = x + sv;
                        }
                    }
                }
            },
        );
        sc.give(coefs);
        pred_arr
    }

    /// Writes the corrected streams into `streams`:
    /// `C[i] = pred[i] + (coef(router(activated))[i] + 1) · (activated − pred[active])`.
    /// `activated` goes back to `sc`.
    #[allow(clippy::too_many_arguments)]
    pub fn correct(
        &self,
        pred: &[Vec<f32>],
        activated: Vec<f32>,
        streams: &mut [Vec<f32>],
        t: usize,
        h: usize,
        active: usize,
        eps: f32,
        sc: &mut Scratch,
    ) {
        let a = streams.len();
        let modalities = self.compute_router_modalities(&activated, t, h, eps, sc);
        let mut k = sc.take(t * a);
        for ti in 0..t {
            let md = &modalities[ti * a..(ti + 1) * a];
            for (i, kv) in k[ti * a..(ti + 1) * a].iter_mut().enumerate() {
                let w = &self.correction_coefs[i * a..(i + 1) * a];
                *kv = w.iter().zip(md).map(|(x, y)| x * y).sum::<f32>() + 1.0;
            }
        }
        {
            let (k, activated) = (&k, &activated);
            ops::for_rows_of(
                streams,
                h,
                #[inline(always)]
                |ti, rows| {
                    let mut innov = [0.0f32; PIECE];
                    for (piece, at) in pieces(ti, h) {
                        let innov = &mut innov[..piece.len()];
                        for ((d, &x), &p) in innov
                            .iter_mut()
                            .zip(&activated[at.clone()])
                            .zip(&pred[active][at.clone()])
                        {
                            *d = x - p;
                        }
                        for (i, row) in rows.iter_mut().enumerate() {
                            let ki = k[ti * a + i];
                            for ((v, &p), &d) in row[piece.clone()]
                                .iter_mut()
                                .zip(&pred[i][at.clone()])
                                .zip(innov.iter())
                            {
                                *v = p + d * ki;
                            }
                        }
                    }
                },
            );
        }
        sc.give(k);
        sc.give(modalities);
        sc.give(activated);
    }

    /// `x · correct_output_scale`, row by row (`[t, H]`, in place).
    pub fn scale_corrected_output(&self, x: &mut [f32], h: usize) {
        ops::for_rows(
            x,
            h,
            #[inline(always)]
            |_, row| {
                for (v, &s) in row.iter_mut().zip(&self.correct_output_scale) {
                    *v *= s;
                }
            },
        );
    }
}
