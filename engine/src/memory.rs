//! Memory accounting: bytes per part of the model, measured from the actual mappings
//! (`mincore` on each part's mapped regions) plus the buffers the engine allocated, and
//! the process RSS.

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::residency::WeightGroup;
use crate::towers::{group_of, Modality};
use crate::weights::{Data, Matrix};

/// The parts the engine's memory is reported by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    /// Everything of the text decoder but the two embedding tables.
    Decoder,
    /// `embed_tokens` (also the tied LM head).
    Embeddings,
    /// The checkpoint's `embed_tokens_per_layer`.
    PleTable,
    /// The PLE cache file's rows.
    PleCache,
    /// The in-RAM hot rows in front of the PLE cache file.
    PleHot,
    /// A tower's weights.
    Tower(Modality),
    /// K/V of the current sequence.
    KvCache,
    /// Buffers kept between forward passes.
    Scratch,
    /// K/V states the prompt cache keeps for later requests.
    PromptCache,
}

impl Part {
    /// The part's name in reports and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Decoder => "decoder",
            Part::Embeddings => "embeddings",
            Part::PleTable => "ple_table",
            Part::PleCache => "ple_cache",
            Part::PleHot => "ple_hot",
            Part::Tower(m) => m.as_str(),
            Part::KvCache => "kv_cache",
            Part::Scratch => "scratch",
            Part::PromptCache => "prompt_cache",
        }
    }

    /// Whether the part holds model parameters (the rest are buffers).
    pub fn holds_params(self) -> bool {
        !matches!(
            self,
            Part::PleHot | Part::KvCache | Part::Scratch | Part::PromptCache
        )
    }
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One part of the model in a [`MemoryReport`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartMemory {
    pub part: Part,
    /// Parameters (elements) the part holds, where that applies.
    pub params: u64,
    /// Bytes of the part's mapped regions (its size on disk).
    pub mapped_bytes: u64,
    /// Of those, bytes whose pages are in RAM (`mincore`).
    pub resident_bytes: u64,
    /// Bytes of heap buffers the engine allocated for the part (quantized copies, the hot
    /// row cache, K/V written so far, indexes).
    pub heap_bytes: u64,
    /// Whether the part is in use (a tower is loaded, the PLE source is this one).
    pub active: bool,
}

impl PartMemory {
    /// A part that holds nothing.
    pub fn empty(part: Part) -> Self {
        PartMemory {
            part,
            params: 0,
            mapped_bytes: 0,
            resident_bytes: 0,
            heap_bytes: 0,
            active: false,
        }
    }

    /// Bytes of RAM the part occupies: resident mapped pages plus heap.
    pub fn ram_bytes(&self) -> u64 {
        self.resident_bytes + self.heap_bytes
    }
}

/// Where the engine's memory is, by part.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryReport {
    pub parts: Vec<PartMemory>,
    /// Process resident set (`VmRSS`), and its anonymous and file-backed shares.
    pub rss_bytes: u64,
    pub rss_anon_bytes: u64,
    pub rss_file_bytes: u64,
    /// Parameters resident now: each part's parameters × its resident fraction, plus
    /// parameters held on the heap.
    pub resident_params: u64,
    /// Parameters in the checkpoint.
    pub checkpoint_params: u64,
}

impl MemoryReport {
    pub fn part(&self, part: Part) -> Option<&PartMemory> {
        self.parts.iter().find(|p| p.part == part)
    }

    /// A human-readable table (for logs and examples).
    pub fn table(&self) -> String {
        let mb = |b: u64| b as f64 / (1u64 << 20) as f64;
        let mut s = format!(
            "{:<11} {:>14} {:>11} {:>11} {:>11} {:>6}\n",
            "part", "params", "mapped MiB", "resid. MiB", "heap MiB", "active"
        );
        for p in &self.parts {
            s += &format!(
                "{:<11} {:>14} {:>11.1} {:>11.1} {:>11.1} {:>6}\n",
                p.part.as_str(),
                p.params,
                mb(p.mapped_bytes),
                mb(p.resident_bytes),
                mb(p.heap_bytes),
                p.active
            );
        }
        s += &format!(
            "RSS {:.1} MiB (anon {:.1}, file {:.1}); resident params {} of {} in the checkpoint\n",
            mb(self.rss_bytes),
            mb(self.rss_anon_bytes),
            mb(self.rss_file_bytes),
            self.resident_params,
            self.checkpoint_params
        );
        s
    }
}

/// The mapped weight groups of the text model.
#[derive(Clone, Debug)]
pub struct TextGroups {
    /// Everything of the text decoder but the two embedding tables.
    pub decoder: WeightGroup,
    /// `embed_tokens` (also the tied LM head).
    pub embeddings: WeightGroup,
    /// The checkpoint's `embed_tokens_per_layer`.
    pub ple_table: WeightGroup,
    /// Tower tensors (loaded or not), for accounting and paging.
    pub vision: WeightGroup,
    pub audio: WeightGroup,
}

impl TextGroups {
    pub fn new(cfg: &ModelConfig, ckpt: &Checkpoint) -> Self {
        let p = cfg.layout.text_prefix();
        let emb = format!("{p}embed_tokens.weight");
        let ple = format!("{p}embed_tokens_per_layer.weight");
        let towers: Vec<&str> = Modality::ALL.iter().flat_map(|m| m.prefixes()).collect();
        let mut excl = towers.clone();
        excl.push(&emb);
        excl.push(&ple);
        // `lm_head.weight` is tied; a stored copy is never read.
        let (decoder, _) = group_of(ckpt, "decoder", &[p], &excl);
        let (embeddings, _) = group_of(ckpt, "embeddings", &[&emb], &[]);
        let (ple_table, _) = group_of(ckpt, "ple_table", &[&ple], &[]);
        let (vision, _) = group_of(ckpt, "vision", &Modality::Vision.prefixes(), &[]);
        let (audio, _) = group_of(ckpt, "audio", &Modality::Audio.prefixes(), &[]);
        TextGroups {
            decoder,
            embeddings,
            ple_table,
            vision,
            audio,
        }
    }

    pub fn tower(&self, m: Modality) -> &WeightGroup {
        match m {
            Modality::Vision => &self.vision,
            Modality::Audio => &self.audio,
        }
    }
}

/// The mapped byte range a matrix reads in place, if it does.
pub(crate) fn matrix_mapped(m: &Matrix) -> Option<(&std::sync::Arc<memmap2::Mmap>, usize, usize)> {
    match m.data() {
        Data::F32(s) => s.mapped_range(),
        Data::Bf16(s) | Data::F16(s) => s.mapped_range(),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Unmaps the checkpoint pages `src` faulted in while `converted` was derived from it,
/// unless `converted` still reads them in place. Only pages lying wholly inside the
/// tensor are dropped (neighbours may share a boundary page); the page cache keeps them,
/// so only this process's RSS changes.
pub(crate) fn unmap_source(src: &Matrix, converted: &Matrix) {
    let Some((map, off, len)) = matrix_mapped(src) else {
        return;
    };
    if let Some((m2, o2, _)) = matrix_mapped(converted) {
        if std::sync::Arc::ptr_eq(map, m2) && o2 == off {
            return;
        }
    }
    let (s, l) = crate::residency::page_span(off, len, map.len(), true);
    crate::residency::advise(map, s, l, crate::residency::Advice::Unmap);
}

/// Heap bytes of a matrix that does not read the checkpoint's pages in place.
pub(crate) fn matrix_heap_bytes(m: &Matrix) -> u64 {
    if matrix_mapped(m).is_some() {
        0
    } else {
        m.storage_bytes() as u64
    }
}

/// A part measured from a weight group.
pub(crate) fn group_part(part: Part, g: &WeightGroup, heap: u64, active: bool) -> PartMemory {
    PartMemory {
        part,
        params: g.params,
        mapped_bytes: g.bytes(),
        // Pages shared with a neighbouring group at a boundary are counted by neither.
        resident_bytes: g.resident_bytes_inward(),
        heap_bytes: heap,
        active,
    }
}
