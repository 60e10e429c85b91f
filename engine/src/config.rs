//! `config.json` of a Gemma 3n checkpoint: both the multimodal layout (nested
//! `text_config`) and the text-only one (flat, `model_type = "gemma3n_text"`), both RoPE
//! forms (`rope_theta`/`rope_local_base_freq` and `rope_parameters`), and
//! `intermediate_size` as an int or a per-layer list.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{EngineError, Result};

/// Attention type of one decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerType {
    Sliding,
    Full,
}

/// Where the text decoder's tensors live in the checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `Gemma3nForConditionalGeneration`: tensors `model.language_model.*`.
    Multimodal,
    /// `Gemma3nForCausalLM`: tensors `model.*`.
    TextOnly,
}

impl Layout {
    pub fn text_prefix(self) -> &'static str {
        match self {
            Layout::Multimodal => "model.language_model.",
            Layout::TextOnly => "model.",
        }
    }
}

/// The longest context a config may declare (Gemma 3n declares 32K; this is far above
/// any context a device could hold, and keeps sizes computed from it in range).
pub const MAX_POSITIONS: usize = 1 << 24;

/// The most decoder layers a config may declare (Gemma 3n has 30 or 35): the per-layer
/// lists are sized by the count before anything else bounds it.
pub const MAX_LAYERS: usize = 1024;

/// The text decoder's configuration, validated.
#[derive(Clone, Debug)]
pub struct TextConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub intermediate_size: Vec<usize>,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub vocab_size_per_layer_input: usize,
    pub hidden_size_per_layer_input: usize,
    pub sliding_window: usize,
    pub layer_types: Vec<LayerType>,
    pub rope_theta_full: f64,
    pub rope_theta_sliding: f64,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub final_logit_softcapping: Option<f64>,
    pub num_kv_shared_layers: usize,
    pub altup_num_inputs: usize,
    pub altup_active_idx: usize,
    pub altup_coef_clip: Option<f64>,
    pub altup_correct_scale: bool,
    pub laurel_rank: usize,
    pub activation_sparsity_pattern: Vec<f64>,
    pub pad_token_id: u32,
    pub bos_token_id: u32,
    pub eos_token_ids: Vec<u32>,
}

/// The whole checkpoint configuration as far as the engine needs it today.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub path: PathBuf,
    pub layout: Layout,
    pub text: TextConfig,
    /// Present in the multimodal layout; parsed by the tower issues.
    pub has_vision: bool,
    pub has_audio: bool,
}

impl TextConfig {
    /// First layer that reuses another layer's KV cache.
    pub fn first_kv_shared_layer(&self) -> usize {
        self.num_hidden_layers - self.num_kv_shared_layers
    }

    /// The layer whose KV cache layer `l` reads: itself for owners, the last owner of the
    /// same attention type for KV-shared layers.
    pub fn kv_source_layer(&self, l: usize) -> usize {
        let first = self.first_kv_shared_layer();
        if l < first {
            return l;
        }
        let ty = self.layer_types[l];
        (0..first)
            .rev()
            .find(|&i| self.layer_types[i] == ty)
            .unwrap_or(l) // ok: validated at parse time that every shared type has a source
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

fn field<'a>(obj: &'a Value, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

struct Parser<'a> {
    path: &'a Path,
    obj: &'a Value,
    prefix: &'static str,
}

impl Parser<'_> {
    fn err(&self, reason: impl Into<String>) -> EngineError {
        EngineError::Config {
            path: self.path.to_path_buf(),
            reason: reason.into(),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = field(self.obj, key)
            .ok_or_else(|| self.err(format!("missing field `{}{key}`", self.prefix)))?;
        v.as_u64().map(|x| x as usize).ok_or_else(|| {
            self.err(format!(
                "`{}{key}` must be a non-negative integer, got {v}",
                self.prefix
            ))
        })
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match field(self.obj, key) {
            None => Ok(default),
            Some(_) => self.usize(key),
        }
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match field(self.obj, key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                self.err(format!("`{}{key}` must be a number, got {v}", self.prefix))
            }),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.f64_opt(key)?.unwrap_or(default))
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match field(self.obj, key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                self.err(format!("`{}{key}` must be a boolean, got {v}", self.prefix))
            }),
        }
    }

    fn ids(&self, v: &Value, key: &str) -> Result<Vec<u32>> {
        let bad = || {
            self.err(format!(
                "`{key}` must be a token id or a list of ids, got {v}"
            ))
        };
        match v {
            Value::Number(n) => Ok(vec![n.as_u64().ok_or_else(bad)? as u32]),
            Value::Array(a) => a
                .iter()
                .map(|x| x.as_u64().map(|x| x as u32).ok_or_else(bad))
                .collect(),
            _ => Err(bad()),
        }
    }
}

impl ModelConfig {
    /// Reads `dir/config.json` and, when present, `dir/generation_config.json` (EOS ids).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read(&path).map_err(|e| EngineError::io(&path, e))?;
        let gen_path = dir.join("generation_config.json");
        let gen_text = match std::fs::read(&gen_path) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(EngineError::io(&gen_path, e)),
        };
        Self::from_bytes(
            &path,
            &text,
            gen_text.as_deref().map(|t| (gen_path.as_path(), t)),
        )
    }

    /// Parses the bytes of `config.json` (`path`, for error messages) and of
    /// `generation_config.json` when there is one.
    pub fn from_bytes(
        path: &Path,
        text: &[u8],
        generation: Option<(&Path, &[u8])>,
    ) -> Result<Self> {
        let root: Value = serde_json::from_slice(text).map_err(|e| EngineError::Config {
            path: path.to_path_buf(),
            reason: format!("not valid JSON: {e}"),
        })?;
        let gen_eos = match generation {
            Some((gen_path, t)) => {
                let g: Value = serde_json::from_slice(t).map_err(|e| EngineError::Config {
                    path: gen_path.to_path_buf(),
                    reason: format!("not valid JSON: {e}"),
                })?;
                field(&g, "eos_token_id").cloned()
            }
            None => None,
        };
        Self::from_json(path, &root, gen_eos.as_ref())
    }

    /// Parses an already-read config (`path` is used in error messages only).
    pub fn from_json(path: &Path, root: &Value, gen_eos: Option<&Value>) -> Result<Self> {
        let top = Parser {
            path,
            obj: root,
            prefix: "",
        };
        if !root.is_object() {
            return Err(top.err("top level must be a JSON object"));
        }
        let (layout, text_obj, prefix) = match field(root, "text_config") {
            Some(t) => (Layout::Multimodal, t, "text_config."),
            None => {
                let mt = field(root, "model_type")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if mt != "gemma3n_text" && mt != "gemma3n" && !mt.is_empty() {
                    return Err(top.err(format!(
                        "model_type `{mt}` is not a Gemma 3n text model (expected `gemma3n` or `gemma3n_text`)"
                    )));
                }
                (Layout::TextOnly, root, "")
            }
        };
        let p = Parser {
            path,
            obj: text_obj,
            prefix,
        };
        let text = parse_text(&p, root, gen_eos)?;
        Ok(ModelConfig {
            path: path.to_path_buf(),
            layout,
            text,
            has_vision: field(root, "vision_config").is_some(),
            has_audio: field(root, "audio_config").is_some(),
        })
    }
}

fn parse_text(p: &Parser, root: &Value, gen_eos: Option<&Value>) -> Result<TextConfig> {
    let hidden_size = p.usize("hidden_size")?;
    let num_hidden_layers = p.usize("num_hidden_layers")?;
    if num_hidden_layers == 0 || hidden_size == 0 {
        return Err(p.err("hidden_size and num_hidden_layers must be positive"));
    }
    if num_hidden_layers > MAX_LAYERS {
        return Err(p.err(format!(
            "`{}num_hidden_layers` is {num_hidden_layers}; it must be at most {MAX_LAYERS}",
            p.prefix
        )));
    }
    let intermediate_size = match field(p.obj, "intermediate_size") {
        None => return Err(p.err(format!("missing field `{}intermediate_size`", p.prefix))),
        Some(Value::Array(a)) => {
            let v: Option<Vec<usize>> = a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect();
            let v = v.ok_or_else(|| p.err("`intermediate_size` list must hold integers"))?;
            if v.len() != num_hidden_layers {
                return Err(p.err(format!(
                    "`intermediate_size` has {} entries for {num_hidden_layers} layers",
                    v.len()
                )));
            }
            v
        }
        Some(_) => vec![p.usize("intermediate_size")?; num_hidden_layers],
    };
    let num_attention_heads = p.usize("num_attention_heads")?;
    let num_key_value_heads = p.usize("num_key_value_heads")?;
    if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
        return Err(p.err(format!(
            "num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
        )));
    }
    let head_dim = p.usize("head_dim")?;
    if head_dim % 2 != 0 {
        return Err(p.err("head_dim must be even (RoPE rotates halves)"));
    }
    let vocab_size = p.usize("vocab_size")?;
    let vocab_size_per_layer_input = p.usize("vocab_size_per_layer_input")?;
    if vocab_size_per_layer_input == 0 || vocab_size_per_layer_input > vocab_size {
        return Err(p.err("vocab_size_per_layer_input must be in 1..=vocab_size"));
    }
    let hidden_size_per_layer_input = p.usize("hidden_size_per_layer_input")?;
    let sliding_window = p.usize("sliding_window")?;
    if sliding_window == 0 {
        return Err(p.err("sliding_window must be positive"));
    }

    let layer_types = match field(p.obj, "layer_types") {
        Some(Value::Array(a)) => {
            let mut v = Vec::with_capacity(a.len());
            for x in a {
                v.push(match x.as_str() {
                    Some("sliding_attention") => LayerType::Sliding,
                    Some("full_attention") => LayerType::Full,
                    _ => return Err(p.err(format!("unknown layer type {x} in `layer_types`"))),
                });
            }
            if v.len() != num_hidden_layers {
                return Err(p.err(format!(
                    "`layer_types` has {} entries for {num_hidden_layers} layers",
                    v.len()
                )));
            }
            v
        }
        Some(v) => return Err(p.err(format!("`layer_types` must be a list, got {v}"))),
        None => (0..num_hidden_layers)
            .map(|i| {
                if (i + 1) % 5 == 0 {
                    LayerType::Full
                } else {
                    LayerType::Sliding
                }
            })
            .collect(),
    };

    let (rope_theta_full, rope_theta_sliding) = match field(p.obj, "rope_parameters") {
        Some(rp) => {
            let theta = |kind: &str| -> Result<f64> {
                let sub = field(rp, kind)
                    .ok_or_else(|| p.err(format!("`rope_parameters` lacks `{kind}`")))?;
                if let Some(t) = field(sub, "rope_type").and_then(Value::as_str) {
                    if t != "default" {
                        return Err(p.err(format!(
                            "rope_type `{t}` for {kind} is not supported (Gemma 3n uses `default`)"
                        )));
                    }
                }
                field(sub, "rope_theta")
                    .and_then(Value::as_f64)
                    .ok_or_else(|| p.err(format!("`rope_parameters.{kind}.rope_theta` missing")))
            };
            (theta("full_attention")?, theta("sliding_attention")?)
        }
        None => {
            if let Some(s) = field(p.obj, "rope_scaling") {
                return Err(p.err(format!("rope_scaling {s} is not supported (expected null)")));
            }
            (
                p.f64_or("rope_theta", 1_000_000.0)?,
                p.f64_or("rope_local_base_freq", 10_000.0)?,
            )
        }
    };

    let num_kv_shared_layers = p.usize_or("num_kv_shared_layers", 0)?;
    if num_kv_shared_layers >= num_hidden_layers {
        return Err(p.err("num_kv_shared_layers must be smaller than num_hidden_layers"));
    }
    let first_shared = num_hidden_layers - num_kv_shared_layers;
    for l in first_shared..num_hidden_layers {
        if !layer_types[..first_shared].contains(&layer_types[l]) {
            return Err(p.err(format!(
                "KV-shared layer {l} has no earlier layer of its attention type to share with"
            )));
        }
    }

    let altup_num_inputs = p.usize_or("altup_num_inputs", 4)?;
    let altup_active_idx = p.usize_or("altup_active_idx", 0)?;
    if altup_num_inputs < 1 || altup_active_idx >= altup_num_inputs {
        return Err(p.err("altup_active_idx must be below altup_num_inputs"));
    }

    let activation_sparsity_pattern = match field(p.obj, "activation_sparsity_pattern") {
        Some(Value::Array(a)) => {
            let v: Option<Vec<f64>> = a.iter().map(Value::as_f64).collect();
            let v = v.ok_or_else(|| p.err("`activation_sparsity_pattern` must hold numbers"))?;
            if v.len() != num_hidden_layers {
                return Err(p.err(format!(
                    "`activation_sparsity_pattern` has {} entries for {num_hidden_layers} layers",
                    v.len()
                )));
            }
            if v.iter().any(|&x| !(0.0..1.0).contains(&x)) {
                return Err(p.err("`activation_sparsity_pattern` values must be in [0, 1)"));
            }
            v
        }
        Some(v) => {
            return Err(p.err(format!(
                "`activation_sparsity_pattern` must be a list, got {v}"
            )))
        }
        None => vec![0.0; num_hidden_layers],
    };

    if let Some(act) = field(p.obj, "hidden_activation").and_then(Value::as_str) {
        if act != "gelu_pytorch_tanh" {
            return Err(p.err(format!("hidden_activation `{act}` is not supported")));
        }
    }

    let eos_value = gen_eos
        .or_else(|| field(p.obj, "eos_token_id"))
        .or_else(|| field(root, "eos_token_id"));
    let eos_token_ids = match eos_value {
        Some(v) => p.ids(v, "eos_token_id")?,
        None => vec![1],
    };

    Ok(TextConfig {
        hidden_size,
        num_hidden_layers,
        intermediate_size,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size,
        vocab_size_per_layer_input,
        hidden_size_per_layer_input,
        sliding_window,
        layer_types,
        rope_theta_full,
        rope_theta_sliding,
        max_position_embeddings: {
            let n = p.usize_or("max_position_embeddings", 32768)?;
            if !(1..=MAX_POSITIONS).contains(&n) {
                return Err(p.err(format!(
                    "`{}max_position_embeddings` is {n}; it must be in 1..={MAX_POSITIONS}",
                    p.prefix
                )));
            }
            n
        },
        rms_norm_eps: p.f64_or("rms_norm_eps", 1e-6)?,
        final_logit_softcapping: p.f64_opt("final_logit_softcapping")?,
        num_kv_shared_layers,
        altup_num_inputs,
        altup_active_idx,
        altup_coef_clip: p.f64_opt("altup_coef_clip")?,
        altup_correct_scale: p.bool_or("altup_correct_scale", true)?,
        laurel_rank: p.usize("laurel_rank")?,
        activation_sparsity_pattern,
        pad_token_id: p.usize_or("pad_token_id", 0)? as u32,
        bos_token_id: p.usize_or("bos_token_id", 2)? as u32,
        eos_token_ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "model_type": "gemma3n_text",
            "hidden_size": 64, "num_hidden_layers": 6, "intermediate_size": 128,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "vocab_size": 512, "vocab_size_per_layer_input": 480,
            "hidden_size_per_layer_input": 16, "sliding_window": 8,
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
            "num_kv_shared_layers": 2, "laurel_rank": 8,
            "eos_token_id": [1, 106]
        })
    }

    #[test]
    fn old_rope_form_scalar_intermediate_and_default_layer_types() {
        let mut b = base();
        b["num_kv_shared_layers"] = json!(1);
        let c = ModelConfig::from_json(Path::new("c.json"), &b, None).unwrap();
        assert_eq!(c.layout, Layout::TextOnly);
        assert_eq!(c.text.intermediate_size, vec![128; 6]);
        assert_eq!(c.text.rope_theta_sliding, 10000.0);
        assert_eq!(c.text.layer_types[4], LayerType::Full);
        assert_eq!(c.text.layer_types[5], LayerType::Sliding);
        assert_eq!(c.text.eos_token_ids, vec![1, 106]);
        assert_eq!(c.text.kv_source_layer(5), 3);
        // Default pattern [s,s,s,s,f,s] with 2 shared layers: layer 4 (full) has no owner.
        let e = ModelConfig::from_json(Path::new("c.json"), &base(), None).unwrap_err();
        assert!(e.to_string().contains("no earlier layer"), "{e}");
    }

    #[test]
    fn new_rope_form_nested_text_config() {
        let mut t = base();
        t["intermediate_size"] = json!([128, 128, 192, 192, 256, 256]);
        t["layer_types"] = json!([
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention"
        ]);
        t.as_object_mut().unwrap().remove("rope_theta");
        t.as_object_mut().unwrap().remove("rope_local_base_freq");
        t["rope_parameters"] = json!({
            "full_attention": {"rope_theta": 1e6, "rope_type": "default"},
            "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}});
        let root = json!({"model_type": "gemma3n", "text_config": t, "vision_config": {}});
        let c = ModelConfig::from_json(Path::new("c.json"), &root, Some(&json!(106))).unwrap();
        assert_eq!(c.layout, Layout::Multimodal);
        assert!(c.has_vision && !c.has_audio);
        assert_eq!(c.text.intermediate_size[5], 256);
        assert_eq!(c.text.rope_theta_full, 1e6);
        assert_eq!(c.text.eos_token_ids, vec![106]);
        assert_eq!(c.text.kv_source_layer(4), 3);
        assert_eq!(c.text.kv_source_layer(5), 2);
        assert_eq!(c.text.kv_source_layer(1), 1);
    }

    #[test]
    fn missing_and_malformed_fields_are_named() {
        for (key, val, needle) in [
            ("hidden_size", Value::Null, "missing field `hidden_size`"),
            (
                "head_dim",
                json!("x"),
                "`head_dim` must be a non-negative integer",
            ),
            (
                "intermediate_size",
                json!([1, 2]),
                "`intermediate_size` has 2 entries",
            ),
            (
                "num_key_value_heads",
                json!(3),
                "multiple of num_key_value_heads",
            ),
        ] {
            let mut t = base();
            if val.is_null() {
                t.as_object_mut().unwrap().remove(key);
            } else {
                t[key] = val;
            }
            let e = ModelConfig::from_json(Path::new("/m/config.json"), &t, None).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(needle), "{msg}");
            assert!(msg.contains("/m/config.json"), "{msg}");
        }
    }

    #[test]
    fn a_huge_layer_count_is_refused_before_allocating() {
        // A layer count sized the per-layer lists (intermediate sizes, layer types,
        // sparsity) before anything bounded it: 2^40 layers asked for terabytes.
        let mut t = base();
        t["num_hidden_layers"] = json!(1u64 << 40);
        let e = ModelConfig::from_json(Path::new("c.json"), &t, None).unwrap_err();
        assert!(e.to_string().contains("num_hidden_layers"), "{e}");
        t["num_hidden_layers"] = json!(MAX_LAYERS + 1);
        assert!(ModelConfig::from_json(Path::new("c.json"), &t, None).is_err());
    }
}
