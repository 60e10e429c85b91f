//! LAuReL (`Gemma3nTextLaurelBlock`): a low-rank residual beside attention,
//! `x + norm(linear_right(linear_left(x)))`.

use super::ops;
use super::scratch::Scratch;
use crate::weights::Matrix;

#[derive(Debug)]
pub struct Laurel {
    pub linear_left: Matrix,
    pub linear_right: Matrix,
    pub post_laurel_norm: Vec<f32>,
}

impl Laurel {
    /// The block's output for `t` rows of its input `x`, given `left = linear_left(x)`
    /// (computed in the same pass over `x` as Q, K and V: one fused product in a decode
    /// step). `left` goes back to `sc`.
    pub fn forward(
        &self,
        x: &[f32],
        left: Vec<f32>,
        t: usize,
        h: usize,
        eps: f32,
        sc: &mut Scratch,
    ) -> Vec<f32> {
        let mut out = sc.take_for_write(t * h);
        self.linear_right.matmul(&left, t, &mut out);
        sc.give(left);
        ops::rms_norm(&mut out, h, Some(&self.post_laurel_norm), eps);
        ops::for_rows(
            &mut out,
            h,
            #[inline(always)]
            |ti, row| {
                for (o, &v) in row.iter_mut().zip(&x[ti * h..]) {
                    *o += v;
                }
            },
        );
        out
    }
}
