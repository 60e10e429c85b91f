//! Writing a synthetic checkpoint: seeded bf16 values generated in parallel and streamed
//! into safetensors shards (header first, then the data tensor by tensor), so that no
//! shard is ever held in memory.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde_json::{json, Map, Value};

use crate::spec::{self, Init, TensorSpec, Variant};

/// wyrand: one multiply per 64 random bits, good enough for weights.
#[derive(Clone, Debug)]
pub struct WyRand(u64);

impl WyRand {
    pub fn new(seed: u64) -> Self {
        WyRand(splitmix64(seed))
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) ^ t) as u64
    }
}

pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// f32 to bf16 with round-to-nearest-even (inputs are finite).
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Elements per independently seeded chunk: a tensor's values depend only on the seed,
/// its name and the chunk index, never on threads or shard layout.
pub const CHUNK: usize = 1 << 20;
/// Elements per buffer handed to the writer thread (64 MiB of bf16).
const BLOCK: usize = 32 * CHUNK;

/// Fills `out` (little-endian bf16, `out.len() / 2` elements) with chunk `chunk` of a
/// tensor whose stream is identified by `stream`.
pub fn fill_chunk(out: &mut [u8], init: Init, stream: u64, chunk: u64) {
    let mut rng = WyRand::new(stream ^ chunk.wrapping_mul(0xd1b5_4a32_d192_ed03));
    let scale = init.half * (2.0 / 65536.0);
    let offset = init.center - init.half + 0.5 * scale;
    let mut quads = out.chunks_exact_mut(8);
    for q in &mut quads {
        let r = rng.next_u64();
        for k in 0..4 {
            let u = ((r >> (16 * k)) & 0xffff) as f32;
            let v = f32_to_bf16(offset + u * scale);
            q[2 * k..2 * k + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    let rest = quads.into_remainder();
    let r = rng.next_u64();
    for (k, pair) in rest.chunks_exact_mut(2).enumerate() {
        let u = ((r >> (16 * k)) & 0xffff) as f32;
        pair.copy_from_slice(&f32_to_bf16(offset + u * scale).to_le_bytes());
    }
}

/// Options of one checkpoint.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub variant: Variant,
    pub seed: u64,
    pub text_only: bool,
    pub max_shard_bytes: usize,
    /// `tokenizer.json` (+ `tokenizer_config.json` / `chat_template.jinja` next to it) to
    /// copy in, if any.
    pub tokenizer: Option<PathBuf>,
}

/// What was written.
#[derive(Clone, Debug)]
pub struct SynthReport {
    pub shards: Vec<(String, u64)>,
    pub params: usize,
    pub tensor_bytes: usize,
    pub seconds: f64,
}

enum Msg {
    Open(PathBuf, Vec<u8>),
    Data(Vec<u8>),
    Close,
}

/// The safetensors header of one shard: 8-byte length, then JSON padded with spaces to a
/// multiple of 8. Tensors are laid out in `order`.
pub fn shard_header(tensors: &[TensorSpec], order: &[usize]) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0usize;
    for &i in order {
        let t = &tensors[i];
        let end = off + t.nbytes();
        m.insert(
            t.name.clone(),
            json!({"dtype": "BF16", "shape": t.shape, "data_offsets": [off, end]}),
        );
        off = end;
    }
    let mut js = serde_json::to_vec(&Value::Object(m)).expect("header serializes");
    let pad = (8 - js.len() % 8) % 8;
    js.resize(js.len() + pad, b' ');
    let mut out = (js.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&js);
    out
}

fn writer_loop(rx: Receiver<Msg>, back: SyncSender<Vec<u8>>) -> Result<Vec<(PathBuf, u64)>> {
    let mut cur: Option<(PathBuf, BufWriter<File>, u64)> = None;
    let mut done = Vec::new();
    for msg in rx {
        match msg {
            Msg::Open(path, header) => {
                let f =
                    File::create(&path).with_context(|| format!("create {}", path.display()))?;
                let mut w = BufWriter::with_capacity(1 << 20, f);
                w.write_all(&header)?;
                cur = Some((path, w, header.len() as u64));
            }
            Msg::Data(buf) => {
                let Some((path, w, n)) = cur.as_mut() else {
                    bail!("data before a shard was opened");
                };
                w.write_all(&buf)
                    .with_context(|| format!("write {}", path.display()))?;
                *n += buf.len() as u64;
                let _ = back.try_send(buf); // recycle the buffer
            }
            Msg::Close => {
                let Some((path, w, n)) = cur.take() else {
                    bail!("close without an open shard");
                };
                let f = w
                    .into_inner()
                    .map_err(|e| anyhow::anyhow!("flush {}: {}", path.display(), e.error()))?;
                drop(f);
                done.push((path, n));
            }
        }
    }
    Ok(done)
}

/// Writes the checkpoint into `dir` (which must exist and be empty).
pub fn write_checkpoint(dir: &Path, opts: &SynthOptions) -> Result<SynthReport> {
    let t0 = Instant::now();
    let tensors = spec::all_tensors(opts.variant, opts.text_only);
    let shards = spec::plan_shards(&tensors, opts.max_shard_bytes);
    let n = shards.len();

    // Small files first.
    let write_json = |name: &str, v: &Value| -> Result<()> {
        let p = dir.join(name);
        let mut s = serde_json::to_string_pretty(v)?;
        s.push('\n');
        std::fs::write(&p, s).with_context(|| format!("write {}", p.display()))
    };
    write_json(
        "config.json",
        &spec::config_json(opts.variant, opts.text_only),
    )?;
    write_json("generation_config.json", &spec::generation_config_json())?;
    let mut weight_map = Map::new();
    let mut total = 0usize;
    for (si, s) in shards.iter().enumerate() {
        for &i in s {
            weight_map.insert(
                tensors[i].name.clone(),
                Value::String(spec::shard_file_name(si, n)),
            );
            total += tensors[i].nbytes();
        }
    }
    write_json(
        "model.safetensors.index.json",
        &json!({"metadata": {"total_size": total, "total_parameters": total / 2},
                "weight_map": weight_map}),
    )?;
    if let Some(tok) = &opts.tokenizer {
        std::fs::copy(tok, dir.join("tokenizer.json"))
            .with_context(|| format!("copy {}", tok.display()))?;
        for side in ["tokenizer_config.json", "chat_template.jinja"] {
            let tc = tok.with_file_name(side);
            if tc.exists() {
                std::fs::copy(&tc, dir.join(side))
                    .with_context(|| format!("copy {}", tc.display()))?;
            }
        }
    }

    let (tx, rx) = sync_channel::<Msg>(2);
    let (back_tx, back_rx) = sync_channel::<Vec<u8>>(4);
    let writer = std::thread::Builder::new()
        .name("shard-writer".into())
        .spawn(move || writer_loop(rx, back_tx))?;

    let send = |m: Msg| -> Result<()> {
        tx.send(m)
            .map_err(|_| anyhow::anyhow!("the writer thread stopped"))
    };
    let mut result = Ok(());
    'outer: for (si, s) in shards.iter().enumerate() {
        // Within a shard, data is laid out in name order as the safetensors writer does.
        let mut order = s.clone();
        order.sort_by(|&a, &b| tensors[a].name.cmp(&tensors[b].name));
        let path = dir.join(spec::shard_file_name(si, n));
        let ts = Instant::now();
        let mut shard_bytes = 0usize;
        if let Err(e) = send(Msg::Open(path.clone(), shard_header(&tensors, &order))) {
            result = Err(e);
            break;
        }
        for &i in &order {
            let t = &tensors[i];
            let stream = splitmix64(opts.seed) ^ fnv1a(&t.name);
            let numel = t.numel();
            let mut start = 0usize;
            while start < numel {
                let len = BLOCK.min(numel - start);
                let mut buf = back_rx.try_recv().unwrap_or_default();
                buf.resize(len * 2, 0);
                buf.par_chunks_mut(CHUNK * 2)
                    .enumerate()
                    .for_each(|(k, c)| {
                        fill_chunk(c, t.init, stream, (start / CHUNK + k) as u64);
                    });
                if let Err(e) = send(Msg::Data(buf)) {
                    result = Err(e);
                    break 'outer;
                }
                start += len;
            }
            shard_bytes += t.nbytes();
        }
        if let Err(e) = send(Msg::Close) {
            result = Err(e);
            break;
        }
        eprintln!(
            "  {} ({} tensors, {:.2} GB) generated in {:.1}s",
            spec::shard_file_name(si, n),
            s.len(),
            shard_bytes as f64 / 1e9,
            ts.elapsed().as_secs_f64()
        );
    }
    drop(tx);
    let written = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer thread panicked"))?;
    let written = written?; // the writer's own error explains a failed send best
    result?;
    Ok(SynthReport {
        shards: written
            .into_iter()
            .map(|(p, b)| (p.file_name().unwrap().to_string_lossy().into_owned(), b))
            .collect(),
        params: spec::param_count(&tensors),
        tensor_bytes: total,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        assert_eq!(f32_to_bf16(-2.0), 0xc000);
        // 1 + 2^-8 is halfway between two bf16 values: ties to even (down).
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
    }

    #[test]
    fn chunks_have_the_requested_moments_and_are_deterministic() {
        let init = Init::std(0.5);
        let mut a = vec![0u8; 2 * 100_001];
        fill_chunk(&mut a, init, 7, 3);
        let mut b = vec![0u8; 2 * 100_001];
        fill_chunk(&mut b, init, 7, 3);
        assert_eq!(a, b);
        let v: Vec<f32> = a
            .chunks_exact(2)
            .map(|p| f32::from_bits(u32::from(u16::from_le_bytes([p[0], p[1]])) << 16))
            .collect();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.01, "{}", var.sqrt());
        assert!(v.iter().all(|&x| x.abs() <= 0.5 * 3f32.sqrt() * 1.01));
        let n1 = init_range_check(Init::range(0.5, 1.5));
        assert!(n1.0 >= 0.5 && n1.1 <= 1.5);
    }

    fn init_range_check(init: Init) -> (f32, f32) {
        let mut a = vec![0u8; 2 * 4096];
        fill_chunk(&mut a, init, 1, 0);
        let v: Vec<f32> = a
            .chunks_exact(2)
            .map(|p| f32::from_bits(u32::from(u16::from_le_bytes([p[0], p[1]])) << 16))
            .collect();
        let lo = v.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        (lo, hi)
    }

    #[test]
    fn header_is_aligned_and_parses() {
        let t = spec::embedder_tensors("model.embed_audio.", 1536);
        let order: Vec<usize> = (0..t.len()).collect();
        let h = shard_header(&t, &order);
        assert_eq!(h.len() % 8, 0);
        let n = u64::from_le_bytes(h[..8].try_into().unwrap()) as usize;
        assert_eq!(n + 8, h.len());
        let v: Value = serde_json::from_slice(&h[8..]).unwrap();
        let e = &v["model.embed_audio.embedding_projection.weight"];
        assert_eq!(e["shape"], json!([2048, 1536]));
        assert_eq!(e["dtype"], "BF16");
    }
}
