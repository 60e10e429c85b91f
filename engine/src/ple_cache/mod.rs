//! The PLE cache file: a row per text token id `v < vocab_size_per_layer_input`, served
//! from a read-only mapping (with checksums and a hot-row cache) so that the checkpoint's
//! `embed_tokens_per_layer` table (2 G parameters in E2B) is not needed while serving
//! text. What a row holds depends on its [`RowDType`]:
//!
//! - `raw` (the default): the checkpoint's own table row, its bytes unchanged (bf16, f16
//!   or f32 as stored there), unscaled. The model turns it into the token part and adds
//!   the projection part with the very code of the table path
//!   (`model::per_layer::token_part`), so serving from the cache gives the table path's
//!   per-layer inputs, logits and tokens bit for bit. Same size as the table.
//! - `f32`, `bf16`, `f16`, `q8_0`: the complete per-layer input vector `PLI[v] ∈ [L, P]`
//!   (architecture doc §2.3, §3), precomputed, which also removes the per-token
//!   projection matvec; approximate (f32 to ~1e-6, because the build projects with the
//!   checkpoint's weights in batches; the others by their rounding).
//!
//! # File format (version [`VERSION`](format::VERSION), little-endian)
//!
//! ```text
//! [0, 4096)            header (one page; fields below, xxh64 of bytes [0, 4088) at 4088)
//! [4096, rows_end)     rows: `rows` × `row_bytes`, token-major (row v = table[v] or PLI[v])
//! [pad_off, +L·P·4)    pad section: 16·PLE[pad_id] as f32 (the token part of positions
//!                      whose id has no row: multimodal soft/hard tokens), page-aligned
//! [sums_off, +rows·4)  row checksums: low 32 bits of xxh64(row bytes), page-aligned
//! ```
//!
//! Header fields: magic `GEMMAPLE`, version, header size, row dtype, L, P, hidden size,
//! rows, row bytes, section offsets and sizes, total file size, the checkpoint key
//! (128 bits), xxh64 of the pad and checksum sections, the checkpoint table's dtype
//! (0 f32, 1 bf16, 2 f16; at byte 128, since version 2) and the header's own xxh64.
//! Version 1 files (precomputed bf16 rows by default) are stale: their file is rebuilt,
//! and those of row types no longer asked for are removed when a cache is built.
//!
//! # Validity
//!
//! At open, everything but the rows is verified (header checksum, magic, version, dims,
//! dtypes, checkpoint key, exact file size, pad and checksum-table checksums); any
//! mismatch makes the file stale and it is rebuilt. Rows are verified lazily, each time
//! one is read from the mapping into the hot-row cache or a forward pass (a 15 KiB xxh64,
//! ~µs): a corrupt row is never used — the engine computes that token's vector from the
//! checkpoint instead, logs the corruption and renames the file to `*.corrupt`, so that
//! the next load rebuilds it. [`PleCache::verify_all`] checks every row up front.
//!
//! Precomputed rows are computed by the model's own per-layer code, so the builder lives
//! with it (`model::ple_build`); this module reads and writes the file.
//!
//! # Checkpoint key
//!
//! The checkpoint key of `derived` (config, index, shard names, sizes, mtimes and
//! safetensors headers), salted with this format's version and the row dtype.

pub(crate) mod format;
mod hot;
pub(crate) mod reader;
mod writer;

pub(crate) use format::remove_older_versions;
pub use format::{cache_key, cache_name, RowDType};
pub use reader::{Invalid, PleCache};
pub(crate) use writer::Writer;
