//! The MLP (`Gemma3nTextMLP`): `down(gelu(gate(x)) · up(x))`, with the Gaussian top-k
//! on the activation-sparse layers, run at a MatFormer slice's width.

use super::ops;
use super::scratch::Scratch;
use super::Loader;
use crate::config::TextConfig;
use crate::error::Result;
use crate::weights::Matrix;

#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: Matrix,
    pub up_proj: Matrix,
    pub down_proj: Matrix,
    /// `down_proj` transposed (`[I, H]`, one contiguous row per FFN neuron) for
    /// activation-sparse layers: only the ~5% of neurons that survive the Gaussian top-k
    /// are read. `down_proj` itself is then left mapped and untouched.
    pub down_proj_t: Option<Matrix>,
    /// Fraction of FFN activations expected to be non-zero (1 for dense layers).
    pub density: f64,
    /// Φ⁻¹(p) of the layer's activation sparsity, `None` for dense layers.
    pub std_multiplier: Option<f32>,
}

impl Mlp {
    pub(crate) fn load(ld: &Loader, c: &TextConfig, i: usize) -> Result<Self> {
        let h = c.hidden_size;
        let inter = c.intermediate_size[i];
        let sparsity = c.activation_sparsity_pattern[i];
        let n = |s: &str| format!("layers.{i}.{s}");
        Ok(Mlp {
            gate_proj: ld.matrix(&n("mlp.gate_proj.weight"), inter, h)?,
            up_proj: ld.matrix(&n("mlp.up_proj.weight"), inter, h)?,
            down_proj_t: if sparsity > 0.0 {
                Some(ld.matrix_t(&n("mlp.down_proj.weight"), h, inter)?)
            } else {
                None
            },
            density: 1.0 - sparsity,
            down_proj: if sparsity > 0.0 {
                ld.raw_matrix(&n("mlp.down_proj.weight"), h, inter)?
            } else {
                ld.matrix(&n("mlp.down_proj.weight"), h, inter)?
            },
            // transformers computes Φ⁻¹(p) in f32 and casts to the activation dtype.
            std_multiplier: (sparsity > 0.0).then(|| ops::normal_icdf(sparsity) as f32),
        })
    }
}

/// `gelu(gate) · up` in place over one token's FFN row, after the Gaussian top-k (keep
/// what lies above mean + z·std, population std) where the layer is sparse. Inlined into
/// [`ops::for_rows`]'s wide-vector context.
#[inline(always)]
fn gelu_gate(g_row: &mut [f32], u_row: &[f32], std_multiplier: Option<f32>) {
    if let Some(z) = std_multiplier {
        let n = g_row.len() as f64;
        let mean = ops::sum_f64(g_row) / n;
        let var = ops::sum_sq_dev_f64(g_row, mean) / n;
        let cutoff = mean as f32 + (var.sqrt() as f32) * z;
        for g in g_row.iter_mut() {
            *g = (*g - cutoff).max(0.0);
        }
    }
    for (g, &u) in g_row.iter_mut().zip(u_row) {
        *g = ops::gelu_tanh(*g) * u;
    }
}

impl Mlp {
    /// Bytes of weights one token reads with the first `width` neurons: gate and up
    /// whole, the down projection whole or, where sparse, its surviving share.
    pub(crate) fn weight_bytes_per_token(&self, width: usize) -> usize {
        let gate_up = self.gate_proj.narrow_rows(width).storage_bytes()
            + self.up_proj.narrow_rows(width).storage_bytes();
        let down = match &self.down_proj_t {
            Some(dt) => (dt.narrow_rows(width).storage_bytes() as f64 * self.density) as usize,
            None => self.down_proj.narrow_cols(width).storage_bytes(),
        };
        gate_up + down
    }

    /// The MLP on `t` rows of `x` with its first `width` neurons (a MatFormer slice
    /// narrows the views; the statistics of the Gaussian top-k are over those neurons,
    /// as in the sliced checkpoint).
    pub(crate) fn forward(&self, x: &[f32], t: usize, width: usize, sc: &mut Scratch) -> Vec<f32> {
        let full = self.gate_proj.rows;
        let inter = width.clamp(1, full);
        let h = self.gate_proj.cols;
        let narrowed;
        let (gate_proj, up_proj, down_proj, down_proj_t) = if inter < full {
            narrowed = (
                self.gate_proj.narrow_rows(inter),
                self.up_proj.narrow_rows(inter),
                self.down_proj.narrow_cols(inter),
                self.down_proj_t.as_ref().map(|d| d.narrow_rows(inter)),
            );
            (&narrowed.0, &narrowed.1, &narrowed.2, narrowed.3.as_ref())
        } else {
            (
                &self.gate_proj,
                &self.up_proj,
                &self.down_proj,
                self.down_proj_t.as_ref(),
            )
        };
        let mut gate = sc.take_for_write(t * inter);
        let mut up = sc.take_for_write(t * inter);
        Matrix::matmul_many(&[gate_proj, up_proj], x, t, &mut [&mut gate, &mut up]);
        let z = self.std_multiplier;
        ops::for_rows(
            &mut gate,
            inter,
            #[inline(always)]
            |ti, g| gelu_gate(g, &up[ti * inter..(ti + 1) * inter], z),
        );
        sc.give(up);
        let mut y = sc.take(t * h);
        match down_proj_t {
            // Sparse: y = Σ over surviving neurons i of a_i · down_proj[:, i].
            Some(dt) => {
                if t > 1 {
                    // Prefill: one row of tokens per task (same arithmetic per output
                    // element as the column split below, so prefill and decode agree).
                    ops::for_rows(
                        &mut y,
                        h,
                        #[inline(always)]
                        |ti, y_row| dt.sparse_axpy(&gate[ti * inter..(ti + 1) * inter], 0, y_row),
                    );
                } else {
                    // Decode: threads split the output columns; each reads only its part
                    // of the surviving rows.
                    let threads = crate::par::threads().max(1);
                    let bs = dt.block_size().max(32);
                    let part = h.div_ceil(threads).div_ceil(bs) * bs;
                    let run = |pi: usize, yp: &mut [f32]| dt.sparse_axpy(&gate, pi * part, yp);
                    if threads > 1 && h >= 1024 && h.is_multiple_of(bs) {
                        crate::par::chunks_mut(&mut y, part, run);
                    } else {
                        dt.sparse_axpy(&gate, 0, &mut y);
                    }
                }
            }
            None => down_proj.matmul(&gate, t, &mut y),
        }
        sc.give(gate);
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The FFN activation gives the same bits compiled for the wide-vector context (as
    /// `ops::for_rows` runs it) and for the x86-64 baseline, dense and sparse.
    #[test]
    fn gelu_gate_is_the_same_bits_wide_and_baseline() {
        let n = 8192 + 7;
        let g = crate::test_util::data(n, 11);
        let u = crate::test_util::data(n, 12);
        for z in [None, Some(ops::normal_icdf(0.95) as f32)] {
            let mut base = g.clone();
            gelu_gate(&mut base, &u, z);
            let mut wide = g.clone();
            ops::wide(|| gelu_gate(&mut wide, &u, z));
            let mut rows = g.clone();
            ops::for_rows(&mut rows, n, |_, r| gelu_gate(r, &u, z));
            assert!(base.iter().any(|&v| v != 0.0));
            for other in [&wide, &rows] {
                assert!(base
                    .iter()
                    .zip(other.iter())
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }
}
