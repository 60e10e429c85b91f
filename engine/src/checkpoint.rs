//! A Hugging Face checkpoint folder: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Files are memory-mapped; only headers are read at open,
//! so tensors nobody asks for (e.g. the vision and audio towers of a text-only run) never
//! have their pages touched.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::Value;

use crate::error::{EngineError, Result};

/// Element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// One memory-mapped safetensors file.
#[derive(Debug)]
pub struct MappedFile {
    pub path: PathBuf,
    pub map: Arc<Mmap>,
}

/// One tensor of a safetensors header.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) file: usize,
    /// An unsupported dtype is an error only when the tensor is asked for.
    pub(crate) dtype: Result<DType, String>,
    pub(crate) shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub(crate) start: usize,
    pub(crate) end: usize,
}

/// A tensor inside a mapped file. Cheap to clone; keeps the mapping alive.
#[derive(Clone, Debug)]
pub struct TensorView {
    pub name: String,
    pub path: PathBuf,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub map: Arc<Mmap>,
    pub start: usize,
    pub end: usize,
}

impl TensorView {
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.end]
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub(crate) fn err(&self, reason: impl Into<String>) -> EngineError {
        EngineError::Tensor {
            path: self.path.clone(),
            tensor: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// Widens the tensor to f32 (copies). For small parameters: norms, scales, coefs.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let b = self.bytes();
        match self.dtype {
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        }
    }
}

/// All tensors of a checkpoint folder, by name.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub files: Vec<MappedFile>,
    entries: HashMap<String, Entry>,
}

fn st_err(path: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::Safetensors {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl Checkpoint {
    /// Opens every safetensors file of `dir` (index first, then `model.safetensors`, then
    /// any `*.safetensors`), validating headers and that each file holds all its data.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let mut names: Vec<String> = Vec::new();
        let mut index_map: Option<HashMap<String, String>> = None;
        if index_path.exists() {
            let text = std::fs::read(&index_path).map_err(|e| EngineError::io(&index_path, e))?;
            let (shards, m) = parse_index(&index_path, &text)?;
            names = shards;
            index_map = Some(m);
        } else if dir.join("model.safetensors").exists() {
            names.push("model.safetensors".into());
        } else {
            let rd = std::fs::read_dir(dir).map_err(|e| EngineError::io(dir, e))?;
            for e in rd {
                let e = e.map_err(|e| EngineError::io(dir, e))?;
                let n = e.file_name().to_string_lossy().into_owned();
                // Unindexed shards; other safetensors files (e.g. adapters) are not weights.
                if n.starts_with("model") && n.ends_with(".safetensors") {
                    names.push(n);
                }
            }
            names.sort();
            if names.is_empty() {
                return Err(st_err(
                    dir,
                    "no model*.safetensors files in the checkpoint folder",
                ));
            }
        }

        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (fi, name) in names.iter().enumerate() {
            let path = dir.join(name);
            let file = File::open(&path).map_err(|e| EngineError::io(&path, e))?;
            // SAFETY: the mapping is read-only; a checkpoint rewritten underneath a running
            // daemon is outside what any mmap-based runtime can defend against.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::io(&path, e))?;
            for (tname, entry) in parse_header(&path, &map, fi)? {
                if let Some(m) = &index_map {
                    if m.get(&tname).map(String::as_str) != Some(name.as_str()) {
                        continue; // the index says it lives elsewhere (or nowhere)
                    }
                }
                entries.insert(tname, entry);
            }
            files.push(MappedFile {
                path,
                map: Arc::new(map),
            });
        }
        if let Some(m) = &index_map {
            for (t, f) in m {
                if !entries.contains_key(t) {
                    return Err(EngineError::Tensor {
                        path: dir.join(f),
                        tensor: t.clone(),
                        reason: "listed in model.safetensors.index.json but absent from the shard"
                            .into(),
                    });
                }
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            entries,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Shape of a tensor without touching its data.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// The tensor `name`, which must exist, have a supported dtype and the given shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<TensorView> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| EngineError::MissingTensor {
                dir: self.dir.clone(),
                tensor: name.to_string(),
                looked_for: name.to_string(),
            })?;
        let f = &self.files[e.file];
        let terr = |reason: String| EngineError::Tensor {
            path: f.path.clone(),
            tensor: name.to_string(),
            reason,
        };
        let dtype = e.dtype.clone().map_err(terr)?;
        if e.shape != shape {
            return Err(terr(format!(
                "shape {:?} does not match the config, expected {:?}",
                e.shape, shape
            )));
        }
        Ok(TensorView {
            name: name.to_string(),
            path: f.path.clone(),
            dtype,
            shape: e.shape.clone(),
            map: f.map.clone(),
            start: e.start,
            end: e.end,
        })
    }
}

/// The shard names (sorted, each once) and tensor → shard map of a
/// `model.safetensors.index.json` (`path` is used in error messages only).
pub(crate) fn parse_index(
    path: &Path,
    text: &[u8],
) -> Result<(Vec<String>, HashMap<String, String>)> {
    let v: Value = serde_json::from_slice(text)
        .map_err(|e| st_err(path, format!("index is not valid JSON: {e}")))?;
    let wm = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| st_err(path, "index has no `weight_map` object"))?;
    let mut names: Vec<String> = Vec::new();
    let mut m = HashMap::new();
    for (k, f) in wm {
        let f = f
            .as_str()
            .ok_or_else(|| st_err(path, format!("`weight_map.{k}` is not a file name")))?;
        if f.contains('/') || f.contains("..") {
            return Err(st_err(
                path,
                format!("shard name `{f}` must be a plain file name"),
            ));
        }
        if !names.iter().any(|n| n == f) {
            names.push(f.to_string());
        }
        m.insert(k.clone(), f.to_string());
    }
    names.sort();
    Ok((names, m))
}

/// The tensors a safetensors file's header lists, checked against the file's length
/// (`buf` is the whole file; `path` is used in error messages only).
pub(crate) fn parse_header(path: &Path, buf: &[u8], file: usize) -> Result<Vec<(String, Entry)>> {
    if buf.len() < 8 {
        return Err(st_err(
            path,
            format!("file is {} bytes, too short for a header", buf.len()),
        ));
    }
    let n = u64::from_le_bytes(
        buf[..8]
            .try_into()
            .map_err(|_| st_err(path, "short header"))?,
    );
    let n = usize::try_from(n).map_err(|_| st_err(path, "header length overflows"))?;
    if n > 100_000_000 || 8 + n > buf.len() {
        return Err(st_err(
            path,
            format!(
                "header claims {n} bytes but the file has {} (truncated?)",
                buf.len()
            ),
        ));
    }
    let header: Value = serde_json::from_slice(&buf[8..8 + n])
        .map_err(|e| st_err(path, format!("header is not valid JSON: {e}")))?;
    let obj = header
        .as_object()
        .ok_or_else(|| st_err(path, "header is not a JSON object"))?;
    let data_start = 8 + n;
    let mut out = Vec::with_capacity(obj.len());
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let terr = |reason: String| EngineError::Tensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            reason,
        };
        let dtype_s = info.get("dtype").and_then(Value::as_str).unwrap_or("");
        let dtype = match dtype_s {
            "F32" => Ok(DType::F32),
            "F16" => Ok(DType::F16),
            "BF16" => Ok(DType::BF16),
            other => Err(format!(
                "dtype `{other}` is not supported (F32, F16, BF16 are)"
            )),
        };
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
            .ok_or_else(|| terr("header entry lacks a valid `shape`".into()))?;
        let offs: Vec<usize> = info
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
            .filter(|v: &Vec<usize>| v.len() == 2)
            .ok_or_else(|| terr("header entry lacks valid `data_offsets`".into()))?;
        let (s, e) = (offs[0], offs[1]);
        if s > e {
            return Err(terr(format!("data_offsets [{s}, {e}] are reversed")));
        }
        let start = data_start
            .checked_add(s)
            .ok_or_else(|| terr("offset overflows".into()))?;
        let end = data_start
            .checked_add(e)
            .ok_or_else(|| terr("offset overflows".into()))?;
        if end > buf.len() {
            return Err(terr(format!(
                "data ends at byte {end} but the file has only {} bytes (truncated file)",
                buf.len()
            )));
        }
        if let Ok(dt) = &dtype {
            let numel = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| terr("shape overflows".into()))?;
            if numel * dt.size() != e - s {
                return Err(terr(format!(
                    "{} bytes stored for shape {shape:?} of {dtype_s}, expected {}",
                    e - s,
                    numel * dt.size()
                )));
            }
        }
        out.push((
            name.clone(),
            Entry {
                file,
                dtype,
                shape,
                start,
                end,
            },
        ));
    }
    Ok(out)
}
