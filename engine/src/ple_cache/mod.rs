//! The PLE cache file: for every text token id `v < vocab_size_per_layer_input`, the
//! complete per-layer input vector `PLI[v] ∈ [L, P]` (architecture doc §2.3, §3), built
//! once from the checkpoint and served from a read-only mapping, so that neither the
//! checkpoint's `embed_tokens_per_layer` table (2 G parameters in E2B) nor the per-token
//! projection matvec is needed while serving text.
//!
//! # File format (version [`VERSION`](format::VERSION), little-endian)
//!
//! ```text
//! [0, 4096)            header (one page; fields below, xxh64 of bytes [0, 4088) at 4088)
//! [4096, rows_end)     rows: `rows` × `row_bytes`, token-major (row v = PLI[v, 0..L, 0..P])
//! [pad_off, +L·P·4)    pad section: 16·PLE[pad_id] as f32 (the table part of positions
//!                      whose id has no row: multimodal soft/hard tokens), page-aligned
//! [sums_off, +rows·4)  row checksums: low 32 bits of xxh64(row bytes), page-aligned
//! ```
//!
//! Header fields: magic `GEMMAPLE`, version, header size, row dtype, L, P, hidden size,
//! rows, row bytes, section offsets and sizes, total file size, the checkpoint key
//! (128 bits), xxh64 of the pad and checksum sections, and the header's own xxh64.
//!
//! # Validity
//!
//! At open, everything but the rows is verified (header checksum, magic, version, dims,
//! dtype, checkpoint key, exact file size, pad and checksum-table checksums); any mismatch
//! makes the file stale and it is rebuilt. Rows are verified lazily, each time one is read
//! from the mapping into the hot-row cache or a forward pass (a 15 KiB xxh64, ~µs): a
//! corrupt row is never used — the engine computes that token's vector from the checkpoint
//! instead, logs the corruption and renames the file to `*.corrupt`, so that the next load
//! rebuilds it. [`PleCache::verify_all`] checks every row up front.
//!
//! The rows are computed by the model's own per-layer code, so the builder lives with
//! it (`model::ple_build`); this module reads and writes the file.
//!
//! # Checkpoint key
//!
//! The checkpoint key of `derived` (config, index, shard names, sizes, mtimes and
//! safetensors headers), salted with this format's version and the row dtype.

pub(crate) mod format;
mod hot;
pub(crate) mod reader;
mod writer;

pub use format::{cache_key, cache_name, RowDType};
pub use reader::{Invalid, PleCache};
pub(crate) use writer::Writer;
