//! Writing one MatFormer slice of a checkpoint as a checkpoint of its own, in the Hugging
//! Face layout (`config.json`, safetensors weights, and the tokenizer, chat template,
//! generation and preprocessor files copied), loadable by transformers and by gemmad.
//!
//! The slicing is the MatFormer Lab procedure (`docs/gemma3n-architecture.md` §4.1): the
//! kept layers are renumbered consecutively; each keeps the first `k` neurons of its FFN
//! (`gate_proj`/`up_proj` rows, `down_proj` columns); `embed_tokens_per_layer` keeps the
//! kept layers' column blocks and `per_layer_model_projection` their row blocks; the
//! skipped layers' tensors are dropped and every other tensor is copied byte for byte.
//! `config.json` is the source's with the text config's `num_hidden_layers`,
//! `intermediate_size`, `layer_types`, `activation_sparsity_pattern` and
//! `num_kv_shared_layers` replaced.
//!
//! The output is streamed: each safetensors header is written first (offsets follow from
//! shapes and dtypes), then every tensor's bytes straight from the mapped source, so
//! memory stays flat whatever the checkpoint's size. Outputs over
//! [`DEFAULT_MAX_SHARD_BYTES`] are sharded with a `model.safetensors.index.json`. All of
//! it is written into a temporary folder next to the destination, which is renamed into
//! place once complete and checked.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::checkpoint::{Checkpoint, DType, TensorView};
use crate::config::{LayerType, Layout, ModelConfig};
use crate::error::{EngineError, Result};
use crate::matformer::{self, SlicePlan, SliceSpec};
use crate::residency::{advise, fadvise_file, page_size, page_span, Advice};

/// The FFN width granularity an exported slice must keep: every width is a multiple of
/// 32 (or the layer's full width). gemmad stores a loaded checkpoint's matrices in
/// 32-element blocks along each row for q8_0 and q4_0 (q4_k falls back to q4_0 on widths
/// that are not multiples of 256); a `down_proj` whose row (the FFN width) is not a whole
/// number of blocks cannot be quantized and would silently stay 16-bit. 32 is also the
/// finest block of the quantized types at which gemmad runs a slice as a view of the
/// full weights, so every exported slice is one gemmad can run either way.
pub const SLICE_BLOCK: usize = 32;

/// The largest safetensors file an export writes (4 GB, counted in decimal as Hugging
/// Face counts shard sizes); a bigger output is sharded.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 4_000_000_000;

/// Options of [`export_slice`].
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Tensor bytes per safetensors file before the output is sharded (a tensor larger
    /// than this gets a file of its own).
    pub max_shard_bytes: u64,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
        }
    }
}

/// What [`export_slice`] wrote.
#[derive(Clone, Debug)]
pub struct ExportReport {
    /// The checkpoint folder written.
    pub out: PathBuf,
    /// The slice's name.
    pub slice: String,
    /// Decoder layers of the slice.
    pub layers: usize,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data written (headers left out).
    pub bytes: u64,
    /// Elements of every tensor written (embeddings and towers included).
    pub params: u64,
    /// The slice's text parameters without embeddings (Google's "effective
    /// parameters"; see [`SlicePlan::effective_params`]).
    pub effective_params: u64,
    /// The safetensors files written, in order.
    pub weight_files: Vec<String>,
    /// The side files copied from the source (tokenizer, chat template, ...).
    pub copied: Vec<String>,
}

/// The slices offered for the checkpoint in `model`: those of `matformer_config` (a
/// slicing file in Google's `configs.csv` format) when given, else the built-in ones
/// ([`matformer::builtin_slices`]: the whole model, plus the official table for an
/// E4B-shaped checkpoint).
pub fn available_slices(model: &Path, matformer_config: Option<&Path>) -> Result<Vec<SliceSpec>> {
    match matformer_config {
        Some(path) => {
            let text = fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
            matformer::parse_configs_csv(&text).map_err(|reason| EngineError::Slice {
                path: path.to_path_buf(),
                reason,
            })
        }
        None => Ok(matformer::builtin_slices(
            &ModelConfig::from_dir(model)?.text,
        )),
    }
}

/// The slice named `name` among [`available_slices`]; an unknown name is an error that
/// lists the names there are.
pub fn find_slice(model: &Path, matformer_config: Option<&Path>, name: &str) -> Result<SliceSpec> {
    let all = available_slices(model, matformer_config)?;
    if let Some(s) = all.iter().find(|s| s.name == name) {
        return Ok(s.clone());
    }
    let names: Vec<String> = all.iter().map(|s| format!("{:?}", s.name)).collect();
    let (path, whose) = match matformer_config {
        Some(p) => (p.to_path_buf(), "this slicing file's slices are"),
        None => (
            model.join("config.json"),
            "this checkpoint's built-in slices are (a slicing file in Google's configs.csv \
             format can define others)",
        ),
    };
    Err(EngineError::Slice {
        path,
        reason: format!("no slice named {name:?}; {whose}: {}", names.join(", ")),
    })
}

/// Writes the slice `spec` of the checkpoint in `model` as a checkpoint folder `out`,
/// which must not exist or be empty (its parent folders are created). The slice is
/// checked with [`SliceSpec::plan`] at [`SLICE_BLOCK`] before anything is written.
pub fn export_slice(
    model: &Path,
    spec: &SliceSpec,
    out: &Path,
    opts: &ExportOptions,
) -> Result<ExportReport> {
    check_destination(out)?;
    let cfg_path = model.join("config.json");
    let cfg = ModelConfig::from_dir(model)?;
    let plan = spec
        .plan(&cfg.text, SLICE_BLOCK)
        .map_err(|r| EngineError::Slice {
            path: cfg_path.clone(),
            reason: format!("slice {:?} does not fit this checkpoint: {r}", spec.name),
        })?;
    let root_text = fs::read(&cfg_path).map_err(|e| EngineError::io(&cfg_path, e))?;
    let root: Value = serde_json::from_slice(&root_text).map_err(|e| EngineError::Config {
        path: cfg_path.clone(),
        reason: format!("not valid JSON: {e}"),
    })?;
    let new_config = sliced_config(&cfg_path, &root, &cfg, &plan)?;

    let ckpt = Checkpoint::open(model)?;
    let tensors = plan_tensors(&ckpt, &cfg, &plan)?;
    let shards = plan_shards(&tensors, opts.max_shard_bytes.max(1));

    let tmp = TempDir::new(out)?;
    let mut report = ExportReport {
        out: out.to_path_buf(),
        slice: plan.name.clone(),
        layers: plan.kept.len(),
        tensors: tensors.len(),
        bytes: tensors.iter().map(OutTensor::nbytes).sum(),
        params: tensors.iter().map(|t| t.numel()).sum(),
        effective_params: plan.effective_params(&cfg.text),
        weight_files: Vec::new(),
        copied: Vec::new(),
    };

    write_json(&tmp.path.join("config.json"), &new_config)?;
    report.copied = copy_side_files(model, &tmp.path)?;
    let n = shards.len();
    let mut weight_map = Map::new();
    for (si, shard) in shards.iter().enumerate() {
        let name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", si + 1)
        };
        write_shard(&tmp.path.join(&name), &tensors, shard)?;
        for &i in shard {
            weight_map.insert(tensors[i].name.clone(), Value::String(name.clone()));
        }
        report.weight_files.push(name);
    }
    if n > 1 {
        let index = json!({
            "metadata": {"total_size": report.bytes, "total_parameters": report.params},
            "weight_map": weight_map,
        });
        write_json(&tmp.path.join("model.safetensors.index.json"), &index)?;
    }
    verify(&tmp.path, &tensors, &plan)?;
    sync_files(&tmp.path)?;
    tmp.finish(out)?;
    Ok(report)
}

/// Refuses a destination that exists and is not an empty folder.
fn check_destination(out: &Path) -> Result<()> {
    let bad = |reason: &str| EngineError::Export {
        path: out.to_path_buf(),
        reason: reason.into(),
    };
    match fs::metadata(out) {
        Ok(m) if !m.is_dir() => Err(bad(
            "exists and is not a folder; export into a new or empty folder",
        )),
        Ok(_) => {
            let mut rd = fs::read_dir(out).map_err(|e| EngineError::io(out, e))?;
            match rd.next() {
                None => Ok(()),
                Some(Ok(_)) => Err(bad(
                    "exists and is not empty; export into a new or empty folder",
                )),
                Some(Err(e)) => Err(EngineError::io(out, e)),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(EngineError::io(out, e)),
    }
}

/// The source config with the slice's values in the text config (top level for a
/// text-only checkpoint, `text_config` for a multimodal one); other keys untouched. Keys
/// come out in `serde_json`'s map order: sorted (as `save_pretrained` writes them) unless
/// the workspace turns on its `preserve_order` feature.
fn sliced_config(path: &Path, root: &Value, cfg: &ModelConfig, plan: &SlicePlan) -> Result<Value> {
    let layers = cfg.text.num_hidden_layers;
    let mut root = root.clone();
    let text = match cfg.layout {
        Layout::Multimodal => root.get_mut("text_config"),
        Layout::TextOnly => Some(&mut root),
    }
    .and_then(Value::as_object_mut)
    .ok_or_else(|| EngineError::Config {
        path: path.to_path_buf(),
        reason: "the text config is not a JSON object".into(),
    })?;
    // Per-layer lists are filtered entry by entry (their JSON values kept as written);
    // one the config leaves out gets the plan's values, which are what the parser
    // derived for the full model, filtered.
    let filtered = |text: &Map<String, Value>, key: &str, derived: Vec<Value>| match text.get(key) {
        Some(Value::Array(a)) if a.len() == layers => {
            Value::Array(plan.kept.iter().map(|&l| a[l].clone()).collect())
        }
        _ => Value::Array(derived),
    };
    let layer_types = filtered(
        text,
        "layer_types",
        plan.layer_types
            .iter()
            .map(|t| {
                Value::from(match t {
                    LayerType::Sliding => "sliding_attention",
                    LayerType::Full => "full_attention",
                })
            })
            .collect(),
    );
    let sparsity = filtered(
        text,
        "activation_sparsity_pattern",
        plan.activation_sparsity_pattern
            .iter()
            .map(|&s| Value::from(s))
            .collect(),
    );
    text.insert("num_hidden_layers".into(), json!(plan.kept.len()));
    text.insert("intermediate_size".into(), json!(plan.ffn));
    text.insert("layer_types".into(), layer_types);
    text.insert("activation_sparsity_pattern".into(), sparsity);
    text.insert(
        "num_kv_shared_layers".into(),
        json!(plan.num_kv_shared_layers),
    );
    Ok(root)
}

/// One output tensor: `rows` rows of `row_bytes` bytes of the source, of each of which
/// the byte ranges `segments` are copied, in order.
struct OutTensor {
    name: String,
    src: TensorView,
    shape: Vec<usize>,
    rows: usize,
    row_bytes: usize,
    segments: Vec<Range<usize>>,
}

impl OutTensor {
    fn nbytes(&self) -> u64 {
        let per_row: usize = self.segments.iter().map(|s| s.len()).sum();
        (self.rows * per_row) as u64
    }

    fn numel(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64
    }

    /// The source tensor unchanged under `name`.
    fn whole(name: String, src: TensorView) -> Self {
        let len = src.bytes().len();
        OutTensor {
            name,
            shape: src.shape.clone(),
            src,
            rows: 1,
            row_bytes: len,
            segments: std::iter::once(0..len).collect(),
        }
    }

    /// The rows `blocks` (in order) of the matrix `src`.
    fn rows_of(name: String, src: TensorView, blocks: &[Range<usize>]) -> Self {
        let (cols, es) = (src.shape[1], src.dtype.size());
        let len = src.bytes().len();
        let segments = merged(
            blocks
                .iter()
                .map(|b| b.start * cols * es..b.end * cols * es),
        );
        let rows: usize = blocks.iter().map(|b| b.len()).sum();
        OutTensor {
            name,
            shape: vec![rows, cols],
            src,
            rows: 1,
            row_bytes: len,
            segments,
        }
    }

    /// The columns `blocks` (in order) of every row of the matrix `src`.
    fn cols_of(name: String, src: TensorView, blocks: &[Range<usize>]) -> Self {
        let (rows, cols, es) = (src.shape[0], src.shape[1], src.dtype.size());
        let segments = merged(blocks.iter().map(|b| b.start * es..b.end * es));
        let kept: usize = blocks.iter().map(|b| b.len()).sum();
        OutTensor {
            name,
            shape: vec![rows, kept],
            src,
            rows,
            row_bytes: cols * es,
            segments,
        }
    }
}

/// Byte ranges with each one that starts where the previous ends joined to it.
fn merged(ranges: impl Iterator<Item = Range<usize>>) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

/// A tensor name split at its dots, numbers compared as numbers, so that layer 10 sorts
/// after layer 9.
fn natural_key(name: &str) -> Vec<(u64, &str)> {
    name.split('.')
        .map(|p| match p.parse::<u64>() {
            Ok(n) => (n, ""),
            Err(_) => (u64::MAX, p),
        })
        .collect()
}

/// The output tensors of the slice, in natural name order.
fn plan_tensors(ckpt: &Checkpoint, cfg: &ModelConfig, plan: &SlicePlan) -> Result<Vec<OutTensor>> {
    let c = &cfg.text;
    let prefix = cfg.layout.text_prefix();
    let layers_prefix = format!("{prefix}layers.");
    let ple_table = format!("{prefix}embed_tokens_per_layer.weight");
    let ple_proj = format!("{prefix}per_layer_model_projection.weight");
    let (layers, p) = (c.num_hidden_layers, c.hidden_size_per_layer_input);
    let mut new_index: Vec<Option<usize>> = vec![None; layers];
    for (new, &old) in plan.kept.iter().enumerate() {
        new_index[old] = Some(new);
    }
    let ple_blocks: Vec<Range<usize>> = plan.per_layer_input_columns(c).collect();
    const FFN: [&str; 3] = [
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ];
    let mut seen_ffn = vec![[false; 3]; plan.kept.len()];

    let mut names: Vec<&str> = ckpt.tensor_names().collect();
    names.sort_by(|a, b| natural_key(a).cmp(&natural_key(b)));
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let Some(shape) = ckpt.shape(name) else {
            continue;
        };
        let src = ckpt.get(name, shape)?;
        let layer = name
            .strip_prefix(&layers_prefix)
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(i, rest)| Some((i.parse::<usize>().ok()?, rest)));
        if let Some((old, rest)) = layer {
            if old >= layers {
                return Err(src.err(format!(
                    "names layer {old}, but the config has {layers} layers"
                )));
            }
            let Some(new) = new_index[old] else {
                continue; // a skipped layer
            };
            let new_name = format!("{layers_prefix}{new}.{rest}");
            let (have, k) = (c.intermediate_size[old], plan.ffn[new]);
            let ffn = FFN.iter().position(|&f| f == rest);
            if let Some(f) = ffn {
                seen_ffn[new][f] = true;
                let first_k = 0..k;
                let prefix = std::slice::from_ref(&first_k);
                // gate/up are [width, hidden]; down is [hidden, width].
                let axis = if f == 2 { 1 } else { 0 };
                if src.shape.len() != 2 || src.shape[axis] != have {
                    return Err(src.err(format!(
                        "shape {:?} does not match the config's FFN width {have} of layer \
                         {old} (expected it on axis {axis} of a matrix)",
                        src.shape
                    )));
                }
                out.push(if axis == 0 {
                    OutTensor::rows_of(new_name, src, prefix)
                } else {
                    OutTensor::cols_of(new_name, src, prefix)
                });
            } else {
                out.push(OutTensor::whole(new_name, src));
            }
        } else if name == ple_table || name == ple_proj {
            let axis = if name == ple_table { 1 } else { 0 };
            if src.shape.len() != 2 || src.shape[axis] != layers * p {
                return Err(src.err(format!(
                    "shape {:?} does not hold {layers} layers of {p} per-layer inputs on \
                     axis {axis} of a matrix",
                    src.shape
                )));
            }
            out.push(if axis == 0 {
                OutTensor::rows_of(name.to_string(), src, &ple_blocks)
            } else {
                OutTensor::cols_of(name.to_string(), src, &ple_blocks)
            });
        } else {
            out.push(OutTensor::whole(name.to_string(), src));
        }
    }
    // A kept layer without its FFN would leave the new widths unchecked (and usually
    // means the tensors are not where the config's layout puts them).
    for (new, seen) in seen_ffn.iter().enumerate() {
        if let Some(f) = seen.iter().position(|&s| !s) {
            let tensor = format!("{layers_prefix}{}.{}", plan.kept[new], FFN[f]);
            return Err(EngineError::MissingTensor {
                dir: ckpt.dir.clone(),
                tensor: tensor.clone(),
                looked_for: tensor,
            });
        }
    }
    Ok(out)
}

/// Tensors (indices into `tensors`, in order) per safetensors file: a file is closed
/// when the next tensor would take it past `max_bytes`.
fn plan_shards(tensors: &[OutTensor], max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut cur = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let n = t.nbytes();
        match shards.last_mut() {
            Some(s) if cur + n <= max_bytes => s.push(i),
            _ => {
                shards.push(vec![i]);
                cur = 0;
            }
        }
        cur += n;
    }
    if shards.is_empty() {
        shards.push(Vec::new());
    }
    shards
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
    }
}

/// Writes one safetensors file: the header (JSON padded with spaces to a multiple of 8,
/// tensors laid out in order), then each tensor's bytes.
fn write_shard(path: &Path, tensors: &[OutTensor], which: &[usize]) -> Result<()> {
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0u64;
    for &i in which {
        let t = &tensors[i];
        let end = off + t.nbytes();
        header.insert(
            t.name.clone(),
            json!({"dtype": dtype_name(t.src.dtype), "shape": t.shape, "data_offsets": [off, end]}),
        );
        off = end;
    }
    let mut js = serde_json::to_vec(&Value::Object(header)).map_err(|e| EngineError::Export {
        path: path.to_path_buf(),
        reason: format!("cannot serialize the safetensors header: {e}"),
    })?;
    js.resize(js.len().next_multiple_of(8), b' ');

    let io = |e| EngineError::io(path, e);
    let file = File::create(path).map_err(io)?;
    let mut w = BufWriter::with_capacity(8 << 20, file);
    w.write_all(&(js.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&js).map_err(io)?;
    for &i in which {
        let t = &tensors[i];
        let bytes = t.src.bytes();
        let needed = match (t.rows, t.segments.last()) {
            (1.., Some(last)) => t.src.start + (t.rows - 1) * t.row_bytes + last.end,
            _ => continue,
        };
        let mut pager = Pager::new(&t.src, needed);
        for r in 0..t.rows {
            let base = r * t.row_bytes;
            for s in &t.segments {
                // Long segments (whole tensors, row prefixes) go in windows, so that the
                // pages behind are dropped as the copy advances.
                let (mut a, end) = (base + s.start, base + s.end);
                while a < end {
                    let b = end.min(a + Pager::WINDOW);
                    let chunk = bytes
                        .get(a..b)
                        .ok_or_else(|| t.src.err("a slice reaches past the tensor's data"))?;
                    w.write_all(chunk).map_err(io)?;
                    pager.reached(t.src.start + b);
                    a = b;
                }
            }
        }
        pager.finish();
    }
    let file = w
        .into_inner()
        .map_err(|e| EngineError::io(path, e.into_error()))?;
    file.sync_all().map_err(io)?;
    // Written once and not read here again: leave the page cache to the source.
    fadvise_file(&file, 0, 0); // length 0: to the end of the file
    Ok(())
}

/// Keeps the export's footprint in the source mapping to a window: pages ahead of the
/// copy are read ahead a window at a time, and the pages behind it are dropped from
/// this process (the page cache keeps them), so that resident memory does not grow to
/// the size of the largest tensor (4.7 GB for E4B's per-layer embeddings).
struct Pager<'a> {
    src: &'a TensorView,
    /// Page-aligned source offset below which this tensor's pages were dropped.
    released: usize,
    /// Source offset up to which read-ahead was asked for.
    ahead: usize,
    /// Source offset of the end of the last byte the copy reads.
    end: usize,
}

impl<'a> Pager<'a> {
    const WINDOW: usize = 64 << 20;

    fn new(src: &'a TensorView, end: usize) -> Self {
        let ps = page_size();
        let mut p = Pager {
            src,
            released: src.start / ps * ps,
            ahead: src.start,
            end,
        };
        p.read_ahead(src.start);
        p
    }

    fn read_ahead(&mut self, pos: usize) {
        let to = (pos + 2 * Self::WINDOW).min(self.end);
        if to > self.ahead {
            let (s, n) = page_span(self.ahead, to - self.ahead, self.src.map.len(), false);
            advise(&self.src.map, s, n, Advice::WillNeed);
            self.ahead = to;
        }
    }

    /// The copy has read every byte it needs below `pos`.
    fn reached(&mut self, pos: usize) {
        let done = pos / page_size() * page_size();
        if done >= self.released + Self::WINDOW {
            advise(
                &self.src.map,
                self.released,
                done - self.released,
                Advice::Unmap,
            );
            self.released = done;
            self.read_ahead(pos);
        }
    }

    fn finish(self) {
        if self.end > self.released {
            let n = self.end - self.released;
            advise(&self.src.map, self.released, n, Advice::Unmap);
        }
    }
}

/// Writes `v` as pretty JSON with a final newline (as `save_pretrained` does).
fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).map_err(|e| EngineError::Export {
        path: path.to_path_buf(),
        reason: format!("cannot serialize: {e}"),
    })?;
    s.push('\n');
    fs::write(path, s).map_err(|e| EngineError::io(path, e))
}

/// Whether a file of the checkpoint folder travels with the slice: the tokenizer
/// (`tokenizer*`, `special_tokens_map.json`, `added_tokens.json`), the chat template
/// (`chat_template*`) and every `*_config.json` (generation, preprocessor, processor,
/// tokenizer). Weights, the index, `config.json` (rewritten) and anything else (the
/// model card describes the full model) stay behind.
fn is_side_file(name: &str) -> bool {
    name.starts_with("tokenizer")
        || name.starts_with("chat_template")
        || name.ends_with("_config.json")
        || name == "special_tokens_map.json"
        || name == "added_tokens.json"
}

/// Copies the side files of `model` into `dir`; returns their names, sorted.
fn copy_side_files(model: &Path, dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for e in fs::read_dir(model).map_err(|e| EngineError::io(model, e))? {
        let e = e.map_err(|e| EngineError::io(model, e))?;
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !is_side_file(&name) {
            continue;
        }
        // Follows links: a Hub cache snapshot links its files to blobs.
        let src = e.path();
        match fs::metadata(&src) {
            Ok(m) if m.is_file() => names.push(name),
            Ok(_) => {}
            Err(err) => return Err(EngineError::io(&src, err)),
        }
    }
    names.sort();
    for name in &names {
        let src = model.join(name);
        fs::copy(&src, dir.join(name)).map_err(|e| EngineError::io(&src, e))?;
    }
    Ok(names)
}

/// Reopens the written folder as gemmad will: the config must read back with the
/// slice's shapes, and every tensor must be there with its own.
fn verify(dir: &Path, tensors: &[OutTensor], plan: &SlicePlan) -> Result<()> {
    let cfg = ModelConfig::from_dir(dir)?;
    if cfg.text.num_hidden_layers != plan.kept.len() || cfg.text.intermediate_size != plan.ffn {
        return Err(EngineError::Export {
            path: dir.join("config.json"),
            reason: "the written config does not read back with the slice's shapes".into(),
        });
    }
    let ck = Checkpoint::open(dir)?;
    let mut found = 0;
    for t in tensors {
        ck.get(&t.name, &t.shape)?;
        found += 1;
    }
    let total = ck.tensor_names().count();
    if total != found {
        return Err(EngineError::Export {
            path: dir.to_path_buf(),
            reason: format!("holds {total} tensors, {found} were written"),
        });
    }
    Ok(())
}

/// Flushes every file of `dir`, and `dir` itself, to disk, so that the folder renamed
/// into place is complete even after a crash.
fn sync_files(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).map_err(|e| EngineError::io(dir, e))? {
        let path = e.map_err(|e| EngineError::io(dir, e))?.path();
        let f = File::open(&path).map_err(|e| EngineError::io(&path, e))?;
        f.sync_all().map_err(|e| EngineError::io(&path, e))?;
    }
    let d = File::open(dir).map_err(|e| EngineError::io(dir, e))?;
    d.sync_all().map_err(|e| EngineError::io(dir, e))
}

/// The folder an export is written into, next to its destination; removed on drop
/// unless [`TempDir::finish`] renamed it into place.
struct TempDir {
    path: PathBuf,
    done: bool,
}

impl TempDir {
    fn new(out: &Path) -> Result<Self> {
        let bad = |reason: &str| EngineError::Export {
            path: out.to_path_buf(),
            reason: reason.into(),
        };
        let name = out
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| bad("is not a folder name"))?;
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        fs::create_dir_all(parent).map_err(|e| EngineError::io(parent, e))?;
        for i in 0..1000 {
            let path = parent.join(format!(".{name}.partial-{}-{i}", std::process::id()));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir { path, done: false }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(EngineError::io(&path, e)),
            }
        }
        Err(bad("no free name for a temporary folder next to it"))
    }

    /// Moves the finished folder to `out` (an empty folder there is replaced).
    fn finish(mut self, out: &Path) -> Result<()> {
        check_destination(out)?;
        if out.is_dir() {
            fs::remove_dir(out).map_err(|e| EngineError::io(out, e))?;
        }
        fs::rename(&self.path, out).map_err(|e| EngineError::io(out, e))?;
        self.done = true;
        // Make the rename durable: sync the folder that holds it (best effort).
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(d) = File::open(parent) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_ranges_merge() {
        assert_eq!(
            merged([0..2, 2..4, 6..8, 8..9].into_iter()),
            vec![0..4, 6..9]
        );
        assert_eq!(merged(std::iter::empty()), Vec::<Range<usize>>::new());
    }

    #[test]
    fn layer_numbers_sort_as_numbers() {
        let mut v = vec!["m.layers.10.a", "m.layers.9.b", "m.layers.9.a", "m.norm"];
        v.sort_by(|a, b| natural_key(a).cmp(&natural_key(b)));
        assert_eq!(
            v,
            ["m.layers.9.a", "m.layers.9.b", "m.layers.10.a", "m.norm"]
        );
    }

    #[test]
    fn side_files_are_the_tokenizer_template_and_configs() {
        for n in [
            "tokenizer.json",
            "tokenizer_config.json",
            "tokenizer.model",
            "chat_template.jinja",
            "generation_config.json",
            "preprocessor_config.json",
            "processor_config.json",
            "special_tokens_map.json",
        ] {
            assert!(is_side_file(n), "{n}");
        }
        for n in [
            "config.json",
            "model.safetensors",
            "model.safetensors.index.json",
            "README.md",
        ] {
            assert!(!is_side_file(n), "{n}");
        }
    }
}
