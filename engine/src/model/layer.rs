//! One Gemma 3n decoder layer (`Gemma3nTextDecoderLayer`): AltUp predict/correct, LAuReL,
//! self-attention with q/k/v norms and KV sharing, the MLP with Gaussian top-k sparsity,
//! and the per-layer-input injection. Names follow modeling_gemma3n.py.

use super::altup::AltUp;
use super::attention::{attention_forward, Heads, KvView, TILING};
use super::laurel::Laurel;
use super::mlp::Mlp;
use super::scratch::Scratch;
use super::{ops, Loader, TextModel};
use crate::config::{LayerType, TextConfig};
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::weights::Matrix;

#[derive(Debug)]
pub struct Attention {
    pub q_proj: Matrix,
    /// `None` on KV-shared layers: they read their source layer's cache.
    pub k_proj: Option<Matrix>,
    pub v_proj: Option<Matrix>,
    pub o_proj: Matrix,
    pub q_norm: Vec<f32>,
    pub k_norm: Option<Vec<f32>>,
}

#[derive(Debug)]
pub struct DecoderLayer {
    /// This layer's index in the checkpoint (also its KV-cache slot and its block of the
    /// per-layer inputs; a MatFormer slice that skips layers does not renumber them).
    pub layer_idx: usize,
    pub attention_type: LayerType,
    /// The layer whose KV cache this one reads (itself unless KV-shared).
    pub kv_source: usize,
    pub input_layernorm: Vec<f32>,
    pub post_attention_layernorm: Vec<f32>,
    pub pre_feedforward_layernorm: Vec<f32>,
    pub post_feedforward_layernorm: Vec<f32>,
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub altup: AltUp,
    pub laurel: Laurel,
    pub per_layer_input_gate: Matrix,
    pub per_layer_projection: Matrix,
    pub post_per_layer_input_norm: Vec<f32>,
}

impl DecoderLayer {
    pub(crate) fn load(ld: &Loader, c: &TextConfig, i: usize) -> Result<Self> {
        let h = c.hidden_size;
        let p = format!("layers.{i}.");
        let n = |s: &str| format!("{p}{s}");
        let a = c.altup_num_inputs;
        let owns_kv = i < c.first_kv_shared_layer();
        let clip = c.altup_coef_clip.map(|x| x as f32);
        let mut correction_coefs = ld.vector_2d(&n("altup.correction_coefs.weight"), a, a)?;
        if let Some(clip) = clip {
            for v in correction_coefs.iter_mut() {
                *v = v.clamp(-clip, clip);
            }
        }
        Ok(DecoderLayer {
            layer_idx: i,
            attention_type: c.layer_types[i],
            kv_source: c.kv_source_layer(i),
            input_layernorm: ld.vector(&n("input_layernorm.weight"), h)?,
            post_attention_layernorm: ld.vector(&n("post_attention_layernorm.weight"), h)?,
            pre_feedforward_layernorm: ld.vector(&n("pre_feedforward_layernorm.weight"), h)?,
            post_feedforward_layernorm: ld.vector(&n("post_feedforward_layernorm.weight"), h)?,
            self_attn: Attention {
                q_proj: ld.matrix(&n("self_attn.q_proj.weight"), c.q_dim(), h)?,
                k_proj: owns_kv
                    .then(|| ld.matrix(&n("self_attn.k_proj.weight"), c.kv_dim(), h))
                    .transpose()?,
                v_proj: owns_kv
                    .then(|| ld.matrix(&n("self_attn.v_proj.weight"), c.kv_dim(), h))
                    .transpose()?,
                o_proj: ld.matrix(&n("self_attn.o_proj.weight"), h, c.q_dim())?,
                q_norm: ld.vector(&n("self_attn.q_norm.weight"), c.head_dim)?,
                k_norm: owns_kv
                    .then(|| ld.vector(&n("self_attn.k_norm.weight"), c.head_dim))
                    .transpose()?,
            },
            mlp: Mlp::load(ld, c, i)?,
            altup: AltUp {
                correct_output_scale: ld.vector(&n("altup.correct_output_scale"), h)?,
                correction_coefs,
                prediction_coefs: ld.vector_2d(&n("altup.prediction_coefs.weight"), a * a, a)?,
                modality_router: ld.matrix(&n("altup.modality_router.weight"), a, h)?,
                router_norm: ld.vector(&n("altup.router_norm.weight"), h)?,
            },
            laurel: Laurel {
                linear_left: ld.matrix(&n("laurel.linear_left.weight"), c.laurel_rank, h)?,
                linear_right: ld.matrix(&n("laurel.linear_right.weight"), h, c.laurel_rank)?,
                post_laurel_norm: ld.vector(&n("laurel.post_laurel_norm.weight"), h)?,
            },
            per_layer_input_gate: ld.matrix(
                &n("per_layer_input_gate.weight"),
                c.hidden_size_per_layer_input,
                h,
            )?,
            per_layer_projection: ld.matrix(
                &n("per_layer_projection.weight"),
                h,
                c.hidden_size_per_layer_input,
            )?,
            post_per_layer_input_norm: ld.vector(&n("post_per_layer_input_norm.weight"), h)?,
        })
    }

    /// Runs the layer on `t` tokens whose AltUp streams are `streams` (`A × [t, H]`),
    /// updating them in place, with the first `ffn` FFN neurons (the active MatFormer
    /// slice's width for this layer).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        m: &TextModel,
        ffn: usize,
        streams: &mut [Vec<f32>],
        pli: &[f32],
        t: usize,
        pos0: usize,
        rope: &[f32],
        cache: &mut KvCache,
        sc: &mut Scratch,
    ) -> Result<()> {
        let c = &m.cfg;
        let h = c.hidden_size;
        let a = c.altup_num_inputs;
        let act = c.altup_active_idx;
        let eps = m.eps;
        let li = self.layer_idx;

        // AltUp predict.
        let mut pred_arr = self.altup.predict(streams, t, h, act, eps, sc);
        let pred_s = &mut pred_arr[..a];
        let active = &pred_s[act];

        let mut xn = sc.take_for_write(t * h);
        ops::rms_norm_into(active, &mut xn, h, Some(&self.input_layernorm), eps);

        // LAuReL: xn + norm(right(left(xn))); its left product goes with Q, K and V.
        let (q, lr) = self.project_qkv(m, &xn, t, rope, cache, sc);
        let laurel = self.laurel.forward(&xn, lr, t, h, eps, sc);

        let mut attn = self.attention(m, q, t, pos0, cache, sc);
        ops::rms_norm(&mut attn, h, Some(&self.post_attention_layernorm), eps);

        // attn_laurel = (active + attn + laurel) / sqrt(2)
        let sqrt2 = std::f64::consts::SQRT_2 as f32;
        let mut x = sc.take_for_write(t * h);
        ops::for_rows(
            &mut x,
            h,
            #[inline(always)]
            |ti, row| {
                for (e, v) in row.iter_mut().enumerate() {
                    let i = ti * h + e;
                    *v = ((active[i] + attn[i]) + laurel[i]) / sqrt2;
                }
            },
        );
        sc.give(attn);
        sc.give(laurel);
        ops::rms_norm_into(&x, &mut xn, h, Some(&self.pre_feedforward_layernorm), eps);
        let mut ffw = self.mlp.forward(&xn, t, ffn, sc);
        ops::rms_norm(&mut ffw, h, Some(&self.post_feedforward_layernorm), eps);
        ops::for_rows(
            &mut x,
            h,
            #[inline(always)]
            |ti, row| {
                for (o, &f) in row.iter_mut().zip(&ffw[ti * h..]) {
                    *o += f;
                }
            },
        );
        sc.give(ffw);
        sc.give(xn);
        let activated = x;

        // AltUp correct: the streams become the corrected predictions.
        self.altup
            .correct(&pred_arr[..a], activated, streams, t, h, act, eps, sc);
        for p in pred_arr.iter_mut().take(a) {
            sc.give(std::mem::take(p));
        }

        // Per-layer input injection into streams other than the active one.
        let pdim = c.hidden_size_per_layer_input;
        let mut first = sc.copy_of(&streams[act]);
        if c.altup_correct_scale {
            self.altup.scale_corrected_output(&mut first, h);
        }
        let mut gate = sc.take_for_write(t * pdim);
        self.per_layer_input_gate.matmul(&first, t, &mut gate);
        sc.give(first);
        let lp = c.num_hidden_layers * pdim;
        ops::for_rows(
            &mut gate,
            pdim,
            #[inline(always)]
            |ti, row| {
                let pl = &pli[ti * lp + li * pdim..ti * lp + (li + 1) * pdim];
                for (g, &p) in row.iter_mut().zip(pl) {
                    *g = ops::gelu_tanh(*g) * p;
                }
            },
        );
        let mut inj = sc.take_for_write(t * h);
        self.per_layer_projection.matmul(&gate, t, &mut inj);
        sc.give(gate);
        ops::rms_norm(&mut inj, h, Some(&self.post_per_layer_input_norm), eps);
        for (i, s) in streams.iter_mut().enumerate() {
            if i == act {
                continue;
            }
            ops::for_rows(
                s,
                h,
                #[inline(always)]
                |ti, row| {
                    for (v, &p) in row.iter_mut().zip(&inj[ti * h..]) {
                        *v += p;
                    }
                },
            );
        }
        sc.give(inj);
        Ok(())
    }

    /// Q (normed, rotated), the new K/V of owner layers (normed, rotated, left in the
    /// cache's pending slot for this layer, committed after all layers ran) and LAuReL's
    /// left product, all from the normed input `xn`: one fused product in a decode step.
    #[allow(clippy::too_many_arguments)]
    fn project_qkv(
        &self,
        m: &TextModel,
        xn: &[f32],
        t: usize,
        rope: &[f32],
        cache: &mut KvCache,
        sc: &mut Scratch,
    ) -> (Vec<f32>, Vec<f32>) {
        let c = &m.cfg;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let qd = nh * hd;
        let kvd = nkv * hd;
        let eps = m.eps;
        let sa = &self.self_attn;
        let left = &self.laurel.linear_left;

        let mut q = sc.take_for_write(t * qd);
        let mut lr = sc.take_for_write(t * c.laurel_rank);
        if let (Some(kp), Some(vp)) = (&sa.k_proj, &sa.v_proj) {
            let f16 = cache.dtype() == crate::kv_cache::KvDType::F16;
            let (k, v) = cache.pending_mut(self.layer_idx, t * kvd);
            Matrix::matmul_many(
                &[&sa.q_proj, kp, vp, left],
                xn,
                t,
                &mut [&mut q, k, v, &mut lr],
            );
            ops::rms_norm(k, hd, sa.k_norm.as_deref(), eps);
            ops::rms_norm(v, hd, None, eps);
            ops::for_rows(
                k,
                kvd,
                #[inline(always)]
                |ti, row| {
                    for head in row.chunks_exact_mut(hd) {
                        ops::apply_rope(head, &rope[ti * hd..(ti + 1) * hd]);
                    }
                },
            );
            if f16 {
                // What the cache will hand back, so prefill and decode agree.
                crate::kv_cache::round_to_f16(k);
                crate::kv_cache::round_to_f16(v);
            }
        } else {
            Matrix::matmul_many(&[&sa.q_proj, left], xn, t, &mut [&mut q, &mut lr]);
        }
        ops::rms_norm(&mut q, hd, Some(&sa.q_norm), eps);
        ops::for_rows(
            &mut q,
            qd,
            #[inline(always)]
            |ti, row| {
                for head in row.chunks_exact_mut(hd) {
                    ops::apply_rope(head, &rope[ti * hd..(ti + 1) * hd]);
                }
            },
        );
        (q, lr)
    }

    /// Self-attention of `t` new tokens at positions `pos0..pos0+t` (queries `q` from
    /// [`DecoderLayer::project_qkv`]) over the cached positions and the new ones;
    /// KV-shared layers read their source's cache plus its pending K/V.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        m: &TextModel,
        q: Vec<f32>,
        t: usize,
        pos0: usize,
        cache: &mut KvCache,
        sc: &mut Scratch,
    ) -> Vec<f32> {
        let c = &m.cfg;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let qd = nh * hd;
        let sa = &self.self_attn;
        let src = self.kv_source;
        let window = match self.attention_type {
            LayerType::Sliding => Some(c.sliding_window),
            LayerType::Full => None,
        };
        let mut out = sc.take(t * qd);
        if let Some((cached, new_k, new_v)) = cache.view(src) {
            let kv = KvView {
                cached,
                new_k,
                new_v,
            };
            let heads = Heads {
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                window,
            };
            attention_forward(&q, t, pos0, &kv, heads, TILING, &mut out, sc);
        }
        sc.give(q);
        let mut y = sc.take_for_write(t * c.hidden_size);
        sa.o_proj.matmul(&out, t, &mut y);
        sc.give(out);
        y
    }
}

impl DecoderLayer {
    /// The matrices one decode step reads whole (the sparse down projection, read a few
    /// rows at a time, is left out).
    pub fn dense_decode_matrices(&self) -> Vec<&Matrix> {
        let mut v = self.decode_matrices_outside_mlp();
        v.extend([&self.mlp.gate_proj, &self.mlp.up_proj]);
        if self.mlp.down_proj_t.is_none() {
            v.push(&self.mlp.down_proj);
        }
        v
    }

    /// The matrices besides the MLP's that a decode step reads whole.
    fn decode_matrices_outside_mlp(&self) -> Vec<&Matrix> {
        let a = &self.self_attn;
        let mut v = vec![&a.q_proj, &a.o_proj];
        v.extend(a.k_proj.iter().chain(a.v_proj.iter()));
        v.extend([
            &self.laurel.linear_left,
            &self.laurel.linear_right,
            &self.per_layer_input_gate,
            &self.per_layer_projection,
            &self.altup.modality_router,
        ]);
        v
    }

    /// Bytes of this layer's weights read for one token: the matrices read whole and the
    /// surviving share of a sparse down projection.
    pub fn weight_bytes_per_token(&self) -> usize {
        self.weight_bytes_per_token_at(self.mlp.gate_proj.rows)
    }

    /// As [`weight_bytes_per_token`](Self::weight_bytes_per_token) with the first `ffn`
    /// FFN neurons (a MatFormer slice's width).
    pub fn weight_bytes_per_token_at(&self, ffn: usize) -> usize {
        let outside: usize = self
            .decode_matrices_outside_mlp()
            .iter()
            .map(|m| m.storage_bytes())
            .sum();
        outside + self.mlp.weight_bytes_per_token(ffn)
    }
}
