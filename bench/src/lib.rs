//! gemmad-bench: synthetic Gemma 3n checkpoints of real dimensions (`make-synthetic`) and
//! the CPU inference benchmark (`bench`). See bench/README.md.

pub mod membw;
pub mod procfs;
pub mod spec;
pub mod synth;
