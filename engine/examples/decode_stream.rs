//! Decode products streamed from memory: the bytes/s that `Matrix::matmul` with one token
//! reaches on weights larger than the caches, for one matrix and for a layer-like
//! sequence of smaller ones (where the per-product fork/join shows). Compare with the
//! bench's bandwidth probe. Run:
//! `cargo run --release -p gemmad-engine --example decode_stream -- [q4_0|q8_0|q4_k] [threads]`.

use std::time::Instant;

use gemmad_engine::internals::Matrix;
use gemmad_engine::QuantType;

fn matrix(rows: usize, cols: usize, q: QuantType, seed: u64) -> Matrix {
    let mut s = seed;
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    Matrix::from_f32(rows, cols, w).to_quant(q).packed()
}

fn main() -> Result<(), String> {
    gemmad_engine::internals::configure_kernels_from_env();
    let args: Vec<String> = std::env::args().collect();
    let q: QuantType = args.get(1).map_or("q4_0", |s| s.as_str()).parse()?;
    let threads: usize = args
        .get(2)
        .map_or(Ok(2), |s| s.parse())
        .map_err(|e| format!("{e}"))?;
    // As the engine does: the forward pass runs inside the pool.
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| e.to_string())?
        .install(|| run(q, threads))
}

fn run(q: QuantType, threads: usize) -> Result<(), String> {
    let h = 2048;
    // One big product, then a "layer": q,k,v,o, gate, up, down at E2B sizes × 32 copies
    // (1.1 GB at Q4_0, about a decode step's weights) so the set exceeds L3 (260 MiB on
    // this project's Xeon; 8 copies stayed partly cached).
    let big = matrix(65536, h, q, 1);
    let mut layer = Vec::new();
    for i in 0..32 {
        for &(r, c) in &[
            (2048, h),
            (512, h),
            (512, h),
            (h, 2048),
            (8192, h),
            (8192, h),
            (h, 8192),
        ] {
            layer.push(matrix(r, c, q, 10 + i));
        }
    }
    // Fork/join cost alone: a product small enough to stay in L1/L2.
    let small = matrix(256, h, q, 99);
    let x0: Vec<f32> = (0..h).map(|i| i as f32 / h as f32 - 0.5).collect();
    let mut y0 = vec![0.0f32; 256];
    let t0 = Instant::now();
    for _ in 0..10000 {
        small.matmul(&x0, 1, &mut y0);
    }
    println!(
        "{q} {threads} threads, 256x{h} from cache: {:.1} us per product",
        t0.elapsed().as_secs_f64() / 10000.0 * 1e6
    );
    let x: Vec<f32> = (0..8192)
        .map(|i| ((i * 7919) % 997) as f32 / 997.0 - 0.5)
        .collect();
    let mut y = vec![0.0f32; 65536];
    for (name, set) in [
        ("one 65536x2048", vec![&big]),
        ("layer set", layer.iter().collect()),
    ] {
        let bytes: usize = set.iter().map(|m| m.storage_bytes()).sum();
        let mut best = f64::MAX;
        for _ in 0..10 {
            let t0 = Instant::now();
            for m in &set {
                m.matmul(&x[..m.cols], 1, &mut y[..m.rows]);
            }
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!(
            "{q} {threads} threads, {name}: {:.1} MB in {:.2} ms = {:.1} GB/s ({} products)",
            bytes as f64 / 1e6,
            best * 1e3,
            bytes as f64 / best / 1e9,
            set.len()
        );
    }
    Ok(())
}
