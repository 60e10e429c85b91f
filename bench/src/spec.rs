//! What a Gemma 3n checkpoint holds: tensor names and shapes of the text decoder
//! (architecture doc §2.12), the MobileNet-V5 vision tower (§5.3/§5.5), the audio
//! conformer (§6.6) and the two multimodal embedders, in the order Hugging Face's
//! `Gemma3nForConditionalGeneration.state_dict()` lists them; plus `config.json` and
//! `generation_config.json` as the re-uploaded Hub checkpoints write them.

use serde_json::{json, Value};

/// Which released model to imitate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    E2B,
    E4B,
}

impl std::str::FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "e2b" => Ok(Variant::E2B),
            "e4b" => Ok(Variant::E4B),
            o => Err(format!("unknown variant `{o}` (e2b or e4b)")),
        }
    }
}

/// Text-decoder sizes (everything else is shared by E2B and E4B).
#[derive(Clone, Copy, Debug)]
pub struct TextDims {
    pub layers: usize,
    pub ffn: usize,
    pub kv_shared: usize,
}

pub const HIDDEN: usize = 2048;
pub const VOCAB: usize = 262_400;
pub const VOCAB_PLE: usize = 262_144;
pub const PLE_DIM: usize = 256;
pub const HEADS: usize = 8;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = 256;
pub const LAUREL_RANK: usize = 64;
pub const ALTUP: usize = 4;
pub const SPARSE_LAYERS: usize = 10;

impl Variant {
    pub fn dims(self) -> TextDims {
        match self {
            Variant::E2B => TextDims {
                layers: 30,
                ffn: 8192,
                kv_shared: 10,
            },
            Variant::E4B => TextDims {
                layers: 35,
                ffn: 16384,
                kv_shared: 15,
            },
        }
    }

    pub fn hub_name(self) -> &'static str {
        match self {
            Variant::E2B => "google/gemma-3n-E2B-it",
            Variant::E4B => "google/gemma-3n-E4B-it",
        }
    }
}

/// How a tensor's synthetic values are drawn: uniform on `[center - half, center + half]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Init {
    pub center: f32,
    pub half: f32,
}

impl Init {
    /// Uniform with mean 0 and standard deviation `std`.
    pub fn std(std: f32) -> Init {
        Init {
            center: 0.0,
            half: std * 3f32.sqrt(),
        }
    }

    pub fn range(lo: f32, hi: f32) -> Init {
        Init {
            center: (lo + hi) / 2.0,
            half: (hi - lo) / 2.0,
        }
    }
}

/// One tensor of the checkpoint (all bf16).
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.numel() * 2
    }
}

/// Scales chosen so that a 35-layer forward pass stays finite and well-conditioned:
/// matrices with variance 1/fan_in, norm weights around 1, small embeddings and AltUp
/// coefficients.
pub fn init_for(name: &str, shape: &[usize]) -> Init {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    if name.ends_with("correct_output_scale") {
        Init::range(0.5, 1.5)
    } else if name.ends_with("coefs.weight") {
        Init::range(-0.1, 0.1)
    } else if name.ends_with("embed_tokens.weight")
        || name.ends_with("embed_tokens_per_layer.weight")
        || name.ends_with("embedding.weight")
    {
        Init::std(0.03)
    } else if name.ends_with("layer_scale.gamma") {
        Init::range(0.0, 0.1)
    } else if leaf == "bias" || leaf == "per_dim_scale" {
        Init::range(-0.1, 0.1)
    } else if shape.len() == 1 {
        // RMSNorm / RmsNorm2d weights (`*norm*.weight`, `bn*.weight`).
        Init::range(0.5, 1.5)
    } else {
        let fan_in: usize = shape[1..].iter().product();
        Init::std((1.0 / fan_in.max(1) as f64).sqrt() as f32)
    }
}

struct List(Vec<TensorSpec>);

impl List {
    fn add(&mut self, name: String, shape: &[usize]) {
        let init = init_for(&name, shape);
        self.0.push(TensorSpec {
            name,
            shape: shape.to_vec(),
            init,
        });
    }
}

/// `model.language_model.*` (§2.12). KV-shared layers carry k_proj/v_proj/k_norm as the
/// released checkpoints do.
pub fn text_tensors(v: Variant) -> Vec<TensorSpec> {
    let d = v.dims();
    let (h, q, kv) = (HIDDEN, HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let mut t = List(Vec::new());
    let p = "model.language_model.";
    t.add(format!("{p}embed_tokens.weight"), &[VOCAB, h]);
    for l in 0..d.layers {
        let n = |s: &str| format!("{p}layers.{l}.{s}");
        t.add(n("self_attn.q_proj.weight"), &[q, h]);
        t.add(n("self_attn.k_proj.weight"), &[kv, h]);
        t.add(n("self_attn.v_proj.weight"), &[kv, h]);
        t.add(n("self_attn.o_proj.weight"), &[h, q]);
        t.add(n("self_attn.q_norm.weight"), &[HEAD_DIM]);
        t.add(n("self_attn.k_norm.weight"), &[HEAD_DIM]);
        t.add(n("mlp.gate_proj.weight"), &[d.ffn, h]);
        t.add(n("mlp.up_proj.weight"), &[d.ffn, h]);
        t.add(n("mlp.down_proj.weight"), &[h, d.ffn]);
        t.add(n("input_layernorm.weight"), &[h]);
        t.add(n("post_attention_layernorm.weight"), &[h]);
        t.add(n("pre_feedforward_layernorm.weight"), &[h]);
        t.add(n("post_feedforward_layernorm.weight"), &[h]);
        t.add(n("altup.correct_output_scale"), &[h]);
        t.add(n("altup.correction_coefs.weight"), &[ALTUP, ALTUP]);
        t.add(n("altup.prediction_coefs.weight"), &[ALTUP * ALTUP, ALTUP]);
        t.add(n("altup.modality_router.weight"), &[ALTUP, h]);
        t.add(n("altup.router_norm.weight"), &[h]);
        t.add(n("laurel.linear_left.weight"), &[LAUREL_RANK, h]);
        t.add(n("laurel.linear_right.weight"), &[h, LAUREL_RANK]);
        t.add(n("laurel.post_laurel_norm.weight"), &[h]);
        t.add(n("per_layer_input_gate.weight"), &[PLE_DIM, h]);
        t.add(n("per_layer_projection.weight"), &[h, PLE_DIM]);
        t.add(n("post_per_layer_input_norm.weight"), &[h]);
    }
    t.add(format!("{p}norm.weight"), &[h]);
    t.add(
        format!("{p}embed_tokens_per_layer.weight"),
        &[VOCAB_PLE, d.layers * PLE_DIM],
    );
    t.add(
        format!("{p}per_layer_model_projection.weight"),
        &[d.layers * PLE_DIM, h],
    );
    t.add(format!("{p}per_layer_projection_norm.weight"), &[PLE_DIM]);
    for i in 0..ALTUP - 1 {
        t.add(format!("{p}altup_projections.{i}.weight"), &[h, h]);
    }
    for i in 0..ALTUP - 1 {
        t.add(format!("{p}altup_unembed_projections.{i}.weight"), &[h, h]);
    }
    t.0
}

/// `model.vision_tower.timm_model.*`: timm `mobilenetv5_300m_enc` with the real names and
/// shapes derived from §5.3/§5.5 (294 126 912 parameters, stem bias included).
pub fn vision_tensors() -> Vec<TensorSpec> {
    let mut t = List(Vec::new());
    let p = "model.vision_tower.timm_model.";
    t.add(format!("{p}conv_stem.conv.weight"), &[64, 3, 3, 3]);
    t.add(format!("{p}conv_stem.conv.bias"), &[64]);
    t.add(format!("{p}conv_stem.bn.weight"), &[64]);

    // Stage 0: EdgeResidual blocks.
    for (b, (cin, mid)) in [(64, 256), (128, 512), (128, 512)].into_iter().enumerate() {
        let n = |s: &str| format!("{p}blocks.0.{b}.{s}");
        t.add(n("conv_exp.weight"), &[mid, cin, 3, 3]);
        t.add(n("bn1.weight"), &[mid]);
        t.add(n("conv_pwl.weight"), &[128, mid, 1, 1]);
        t.add(n("bn2.weight"), &[128]);
    }

    // UniversalInvertedResidual: (stage, block, in, out, mid, dw_start k, dw_mid k).
    let uir = |t: &mut List, s: usize, b: usize, cin, cout, mid, ks: usize, km: usize| {
        let n = |x: &str| format!("{p}blocks.{s}.{b}.{x}");
        if ks > 0 {
            t.add(n("dw_start.conv.weight"), &[cin, 1, ks, ks]);
            t.add(n("dw_start.bn.weight"), &[cin]);
        }
        t.add(n("pw_exp.conv.weight"), &[mid, cin, 1, 1]);
        t.add(n("pw_exp.bn.weight"), &[mid]);
        if km > 0 {
            t.add(n("dw_mid.conv.weight"), &[mid, 1, km, km]);
            t.add(n("dw_mid.bn.weight"), &[mid]);
        }
        t.add(n("pw_proj.conv.weight"), &[cout, mid, 1, 1]);
        t.add(n("pw_proj.bn.weight"), &[cout]);
        t.add(n("layer_scale.gamma"), &[cout]);
    };
    // MobileAttention (multi-query): (stage, block, channels, heads, key/value dim, kv down-conv).
    let mqa = |t: &mut List, s: usize, b: usize, c: usize, heads: usize, kd: usize, down: bool| {
        let n = |x: &str| format!("{p}blocks.{s}.{b}.{x}");
        t.add(n("norm.weight"), &[c]);
        t.add(n("attn.query.proj.weight"), &[heads * kd, c, 1, 1]);
        for kv in ["key", "value"] {
            if down {
                t.add(n(&format!("attn.{kv}.down_conv.weight")), &[c, 1, 3, 3]);
                t.add(n(&format!("attn.{kv}.norm.weight")), &[c]);
            }
            t.add(n(&format!("attn.{kv}.proj.weight")), &[kd, c, 1, 1]);
        }
        t.add(n("attn.output.proj.weight"), &[c, heads * kd, 1, 1]);
        t.add(n("layer_scale.gamma"), &[c]);
    };

    // Stage 1.
    uir(&mut t, 1, 0, 128, 256, 768, 3, 5);
    for (b, ks) in [5, 3, 5, 3].into_iter().enumerate() {
        uir(&mut t, 1, b + 1, 256, 256, 1024, ks, 0);
    }
    // Stage 2.
    uir(&mut t, 2, 0, 256, 640, 1536, 5, 5);
    for b in 1..=7 {
        uir(&mut t, 2, b, 640, 640, 2560, 5, 0);
    }
    uir(&mut t, 2, 8, 640, 640, 640, 0, 0);
    for i in 0..14 {
        mqa(&mut t, 2, 9 + 2 * i, 640, 12, 64, true);
        uir(&mut t, 2, 10 + 2 * i, 640, 640, 1280, 0, 0);
    }
    // Stage 3.
    uir(&mut t, 3, 0, 640, 1280, 3840, 5, 5);
    for i in 0..19 {
        mqa(&mut t, 3, 1 + 2 * i, 1280, 16, 96, false);
        uir(&mut t, 3, 2 + 2 * i, 1280, 1280, 2560, 0, 0);
    }
    // Multi-scale fusion adapter.
    t.add(
        format!("{p}msfa.ffn.pw_exp.conv.weight"),
        &[3840, 1920, 1, 1],
    );
    t.add(format!("{p}msfa.ffn.pw_exp.bn.weight"), &[3840]);
    t.add(
        format!("{p}msfa.ffn.pw_proj.conv.weight"),
        &[2048, 3840, 1, 1],
    );
    t.add(format!("{p}msfa.ffn.pw_proj.bn.weight"), &[2048]);
    t.add(format!("{p}msfa.norm.weight"), &[2048]);
    t.0
}

/// `model.audio_tower.*` (§6.6): SSCP + 12 conformer blocks, hidden 1536.
pub fn audio_tensors() -> Vec<TensorSpec> {
    let mut t = List(Vec::new());
    let p = "model.audio_tower.";
    let a = 1536;
    let s = format!("{p}subsample_conv_projection.");
    t.add(format!("{s}conv_0.conv.weight"), &[128, 1, 3, 3]);
    t.add(format!("{s}conv_0.norm.weight"), &[128]);
    t.add(format!("{s}conv_1.conv.weight"), &[32, 128, 3, 3]);
    t.add(format!("{s}conv_1.norm.weight"), &[32]);
    t.add(format!("{s}input_proj_linear.weight"), &[a, 1024]);
    for i in 0..12 {
        let n = |x: &str| format!("{p}conformer.{i}.{x}");
        t.add(n("ffw_layer_start.pre_layer_norm.weight"), &[a]);
        t.add(n("ffw_layer_start.ffw_layer_1.weight"), &[4 * a, a]);
        t.add(n("ffw_layer_start.ffw_layer_2.weight"), &[a, 4 * a]);
        t.add(n("ffw_layer_start.post_layer_norm.weight"), &[a]);
        t.add(n("attention.pre_attn_norm.weight"), &[a]);
        t.add(n("attention.attn.per_dim_scale"), &[a / 8]);
        t.add(
            n("attention.attn.relative_position_embedding.pos_proj.weight"),
            &[a, a],
        );
        t.add(n("attention.attn.q_proj.weight"), &[a, a]);
        t.add(n("attention.attn.k_proj.weight"), &[a, a]);
        t.add(n("attention.attn.v_proj.weight"), &[a, a]);
        t.add(n("attention.post.weight"), &[a, a]);
        t.add(n("attention.post_norm.weight"), &[a]);
        t.add(n("lconv1d.pre_layer_norm.weight"), &[a]);
        t.add(n("lconv1d.linear_start.weight"), &[2 * a, a]);
        t.add(n("lconv1d.depthwise_conv1d.weight"), &[a, 1, 5]);
        t.add(n("lconv1d.conv_norm.weight"), &[a]);
        t.add(n("lconv1d.linear_end.weight"), &[a, a]);
        t.add(n("ffw_layer_end.pre_layer_norm.weight"), &[a]);
        t.add(n("ffw_layer_end.ffw_layer_1.weight"), &[4 * a, a]);
        t.add(n("ffw_layer_end.ffw_layer_2.weight"), &[a, 4 * a]);
        t.add(n("ffw_layer_end.post_layer_norm.weight"), &[a]);
        t.add(n("norm.weight"), &[a]);
    }
    t.0
}

/// `model.embed_vision.*` (width 2048) or `model.embed_audio.*` (width 1536).
pub fn embedder_tensors(prefix: &str, width: usize) -> Vec<TensorSpec> {
    let mut t = List(Vec::new());
    t.add(format!("{prefix}embedding.weight"), &[128, width]);
    t.add(format!("{prefix}hard_embedding_norm.weight"), &[width]);
    t.add(format!("{prefix}soft_embedding_norm.weight"), &[width]);
    t.add(
        format!("{prefix}embedding_projection.weight"),
        &[HIDDEN, width],
    );
    t.0
}

/// Every tensor of the checkpoint in state-dict order (vision tower, language model, audio
/// tower, vision embedder, audio embedder); `text_only` keeps the language model alone.
pub fn all_tensors(v: Variant, text_only: bool) -> Vec<TensorSpec> {
    if text_only {
        return text_tensors(v);
    }
    let mut t = vision_tensors();
    t.extend(text_tensors(v));
    t.extend(audio_tensors());
    t.extend(embedder_tensors("model.embed_vision.", HIDDEN));
    t.extend(embedder_tensors("model.embed_audio.", 1536));
    t
}

pub fn param_count(t: &[TensorSpec]) -> usize {
    t.iter().map(TensorSpec::numel).sum()
}

/// Groups tensors (kept in order) into shards of at most `max_bytes` each, the way
/// `save_pretrained` does; a tensor larger than the limit gets a shard of its own.
pub fn plan_shards(t: &[TensorSpec], max_bytes: usize) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut cur_bytes = 0usize;
    for (i, ts) in t.iter().enumerate() {
        let b = ts.nbytes();
        if !cur.is_empty() && cur_bytes + b > max_bytes {
            shards.push(std::mem::take(&mut cur));
            cur_bytes = 0;
        }
        cur.push(i);
        cur_bytes += b;
    }
    if !cur.is_empty() {
        shards.push(cur);
    }
    shards
}

pub fn shard_file_name(i: usize, n: usize) -> String {
    format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
}

/// `config.json` as on the Hub after the July 2025 re-upload (older `rope_theta` /
/// `rope_local_base_freq` keys, per-layer `intermediate_size`, `sscp_conv_group_norm_eps`).
/// `text_only` drops `vision_config`/`audio_config` (their tensors are absent).
pub fn config_json(v: Variant, text_only: bool) -> Value {
    let d = v.dims();
    let layer_types: Vec<&str> = (0..d.layers)
        .map(|i| {
            if (i + 1) % 5 == 0 {
                "full_attention"
            } else {
                "sliding_attention"
            }
        })
        .collect();
    let sparsity: Vec<f64> = (0..d.layers)
        .map(|i| if i < SPARSE_LAYERS { 0.95 } else { 0.0 })
        .collect();
    let text = json!({
        "activation_sparsity_pattern": sparsity,
        "altup_active_idx": 0,
        "altup_coef_clip": 120.0,
        "altup_correct_scale": true,
        "altup_lr_multiplier": 1.0,
        "altup_num_inputs": ALTUP,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "final_logit_softcapping": 30.0,
        "head_dim": HEAD_DIM,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": HIDDEN,
        "hidden_size_per_layer_input": PLE_DIM,
        "initializer_range": 0.02,
        "intermediate_size": vec![d.ffn; d.layers],
        "laurel_rank": LAUREL_RANK,
        "layer_types": layer_types,
        "max_position_embeddings": 32768,
        "model_type": "gemma3n_text",
        "num_attention_heads": HEADS,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": KV_HEADS,
        "num_kv_shared_layers": d.kv_shared,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-6,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": null,
        "rope_theta": 1000000.0,
        "sliding_window": 512,
        "torch_dtype": "bfloat16",
        "use_cache": true,
        "vocab_size": VOCAB,
        "vocab_size_per_layer_input": VOCAB_PLE
    });
    let vision = json!({
        "architecture": "mobilenetv5_300m_enc",
        "do_pooling": false,
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "label_names": ["LABEL_0", "LABEL_1"],
        "model_args": null,
        "model_type": "gemma3n_vision",
        "num_classes": 2,
        "rms_norm_eps": 1e-6,
        "torch_dtype": "bfloat16",
        "vocab_offset": 262144,
        "vocab_size": 128
    });
    let audio = json!({
        "conf_attention_chunk_size": 12,
        "conf_attention_context_left": 13,
        "conf_attention_context_right": 0,
        "conf_attention_invalid_logits_value": -1e9,
        "conf_attention_logit_cap": 50.0,
        "conf_conv_kernel_size": 5,
        "conf_num_attention_heads": 8,
        "conf_num_hidden_layers": 12,
        "conf_reduction_factor": 4,
        "conf_residual_weight": 0.5,
        "gradient_clipping": 10000000000.0,
        "hidden_size": 1536,
        "input_feat_size": 128,
        "model_type": "gemma3n_audio",
        "rms_norm_eps": 1e-6,
        "sscp_conv_channel_size": [128, 32],
        "sscp_conv_group_norm_eps": 0.001,
        "sscp_conv_kernel_size": [[3, 3], [3, 3]],
        "sscp_conv_stride_size": [[2, 2], [2, 2]],
        "torch_dtype": "bfloat16",
        "vocab_offset": 262272,
        "vocab_size": 128
    });
    let mut root = json!({
        "architectures": ["Gemma3nForConditionalGeneration"],
        "audio_soft_tokens_per_image": 188,
        "audio_token_id": 262273,
        "boa_token_id": 256000,
        "boi_token_id": 255999,
        "eoa_token_id": 262272,
        "eoi_token_id": 262144,
        "eos_token_id": [1, 106],
        "image_token_id": 262145,
        "initializer_range": 0.02,
        "model_type": "gemma3n",
        "text_config": text,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.53.0",
        "vision_soft_tokens_per_image": 256
    });
    if !text_only {
        root["vision_config"] = vision;
        root["audio_config"] = audio;
    }
    root
}

pub fn generation_config_json() -> Value {
    json!({
        "bos_token_id": 2,
        "cache_implementation": "hybrid",
        "do_sample": true,
        "eos_token_id": [1, 106],
        "pad_token_id": 0,
        "temperature": 1.0,
        "top_k": 64,
        "top_p": 0.95,
        "transformers_version": "4.53.0"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_architecture_doc() {
        // §1.7 of docs/gemma3n-architecture.md.
        assert_eq!(param_count(&text_tensors(Variant::E2B)), 4_456_156_768);
        assert_eq!(param_count(&text_tensors(Variant::E4B)), 6_866_696_688);
        assert_eq!(param_count(&vision_tensors()), 294_126_912);
        assert_eq!(param_count(&audio_tensors()), 681_348_640);
        assert_eq!(
            param_count(&embedder_tensors("model.embed_vision.", HIDDEN)),
            4_460_544
        );
        assert_eq!(
            param_count(&embedder_tensors("model.embed_audio.", 1536)),
            3_345_408
        );
    }

    #[test]
    fn names_are_unique_and_shards_cover_everything() {
        let t = all_tensors(Variant::E2B, false);
        let mut names: Vec<&str> = t.iter().map(|x| x.name.as_str()).collect();
        names.sort();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n);
        let shards = plan_shards(&t, 4_000_000_000);
        let flat: Vec<usize> = shards.iter().flatten().copied().collect();
        assert_eq!(flat, (0..t.len()).collect::<Vec<_>>());
        for s in &shards {
            let b: usize = s.iter().map(|&i| t[i].nbytes()).sum();
            assert!(s.len() == 1 || b <= 4_000_000_000);
        }
    }

    #[test]
    fn config_parses_with_the_engine() {
        for v in [Variant::E2B, Variant::E4B] {
            let c = gemmad_engine::ModelConfig::from_json(
                std::path::Path::new("config.json"),
                &config_json(v, false),
                Some(&generation_config_json()["eos_token_id"]),
            )
            .unwrap();
            assert_eq!(c.layout, gemmad_engine::Layout::Multimodal);
            assert!(c.has_vision && c.has_audio);
            assert_eq!(c.text.num_hidden_layers, v.dims().layers);
            assert_eq!(c.text.kv_source_layer(c.text.num_hidden_layers - 1), 19);
            assert_eq!(c.text.eos_token_ids, vec![1, 106]);
        }
        let c = gemmad_engine::ModelConfig::from_json(
            std::path::Path::new("config.json"),
            &config_json(Variant::E2B, true),
            None,
        )
        .unwrap();
        assert_eq!(c.layout, gemmad_engine::Layout::Multimodal);
        assert!(!c.has_vision && !c.has_audio);
        assert_eq!(
            param_count(&all_tensors(Variant::E2B, true)),
            param_count(&text_tensors(Variant::E2B))
        );
    }

    #[test]
    fn inits_by_role() {
        assert_eq!(
            init_for("a.layers.0.input_layernorm.weight", &[2048]),
            Init::range(0.5, 1.5)
        );
        assert_eq!(
            init_for("a.altup.prediction_coefs.weight", &[16, 4]),
            Init::range(-0.1, 0.1)
        );
        let m = init_for("a.mlp.down_proj.weight", &[2048, 8192]);
        let var = m.half * m.half / 3.0;
        assert!((var * 8192.0 - 1.0).abs() < 1e-4);
    }
}
