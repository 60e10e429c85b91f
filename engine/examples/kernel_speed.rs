//! Kernel throughput on one core, from cache, measured in thread CPU time (so other load
//! on the machine does not distort it): GMAC/s per kernel and the bytes/s of weights that
//! rate corresponds to. Run: `cargo run --release -p gemmad-engine --example kernel_speed`
//! (`GEMMAD_ISA=avx2` and the like for a lower tier).

use gemmad_engine::internals::quant::blocks::*;
use gemmad_engine::internals::quant::kernels::{self, isa};
use gemmad_engine::internals::quant::packed;
use gemmad_engine::QuantType;

fn cpu_now() -> f64 {
    let mut ts = libc_timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we pass.
    unsafe { clock_gettime(3, &mut ts) }; // CLOCK_THREAD_CPUTIME_ID
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

#[repr(C)]
struct libc_timespec {
    tv_sec: i64,
    tv_nsec: i64,
}

extern "C" {
    fn clock_gettime(clk: i32, ts: *mut libc_timespec) -> i32;
}

fn main() {
    gemmad_engine::internals::configure_kernels_from_env();
    let (rows, cols) = (256usize, 2048usize);
    let mut s = 1u64;
    let mut rnd = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let w: Vec<f32> = (0..rows * cols).map(|_| rnd()).collect();
    let x: Vec<f32> = (0..cols).map(|_| rnd()).collect();
    let mut xq = vec![BlockQ8_0::default(); cols / 32];
    quantize_q8_0(&x, &mut xq);
    let mut sums = Vec::new();
    kernels::q8_0_meta(&xq, xq.len(), &mut sums);
    let mut xk = vec![BlockQ8K::default(); cols / 256];
    quantize_q8_k(&x, &mut xk);
    let mut w8 = vec![BlockQ8_0::default(); rows * cols / 32];
    let mut w4 = vec![BlockQ4_0 { d: 0, qs: [0; 16] }; rows * cols / 32];
    let mut wk = vec![
        BlockQ4K {
            d: 0,
            dmin: 0,
            scales: [0; 12],
            qs: [0; 128]
        };
        rows * cols / 256
    ];
    let wb: Vec<u16> = w
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect();
    for r in 0..rows {
        quantize_q8_0(
            &w[r * cols..(r + 1) * cols],
            &mut w8[r * cols / 32..(r + 1) * cols / 32],
        );
        quantize_q4_0(
            &w[r * cols..(r + 1) * cols],
            &mut w4[r * cols / 32..(r + 1) * cols / 32],
        );
        quantize_q4_k(
            &w[r * cols..(r + 1) * cols],
            &mut wk[r * cols / 256..(r + 1) * cols / 256],
        );
    }
    println!("isa: {:?}", isa());
    let reps = 400;
    let mut sink = 0.0f32;
    let mut run = |name: &str, bytes_per_el: f64, f: &mut dyn FnMut(usize) -> f32| {
        let t0 = cpu_now();
        for _ in 0..reps {
            for r in 0..rows {
                sink += f(r);
            }
        }
        let dt = cpu_now() - t0;
        let macs = (reps * rows * cols) as f64;
        println!(
            "{name:8} {:6.2} GMAC/s/core  = {:6.2} GB/s of weights per core",
            macs / dt / 1e9,
            macs * bytes_per_el / dt / 1e9
        );
    };
    let nb = cols / 32;
    run("bf16", 2.0, &mut |r| {
        kernels::dot_bf16(&wb[r * cols..(r + 1) * cols], &x)
    });
    run("q8_0", 34.0 / 32.0, &mut |r| {
        kernels::dot_q8_0(&w8[r * nb..(r + 1) * nb], &xq, &sums)
    });
    run("q4_0", 18.0 / 32.0, &mut |r| {
        kernels::dot_q4_0(&w4[r * nb..(r + 1) * nb], &xq, &sums)
    });
    run("q4_k", 144.0 / 256.0, &mut |r| {
        kernels::dot_q4_k(&wk[r * cols / 256..(r + 1) * cols / 256], &xk)
    });
    // Four tokens per weight pass (prefill): MACs counted for all four.
    let x4 = [&xq[..], &xq[..], &xq[..], &xq[..]];
    let s4 = [&sums[..], &sums[..], &sums[..], &sums[..]];
    let k4 = [&xk[..], &xk[..], &xk[..], &xk[..]];
    let xf = [&x[..], &x[..], &x[..], &x[..]];
    println!("4-token kernels (prefill): multiply GMAC/s by 4 for all four tokens");
    run("bf16x4", 0.5, &mut |r| {
        kernels::dot_bf16_x4(&wb[r * cols..(r + 1) * cols], xf)[3]
    });
    run("q8_0x4", 34.0 / 32.0 / 4.0, &mut |r| {
        kernels::dot_q8_0_x4(&w8[r * nb..(r + 1) * nb], x4, s4)[3]
    });
    run("q4_0x4", 18.0 / 32.0 / 4.0, &mut |r| {
        kernels::dot_q4_0_x4(&w4[r * nb..(r + 1) * nb], x4, s4)[3]
    });
    run("q4_kx4", 144.0 / 256.0 / 4.0, &mut |r| {
        kernels::dot_q4_k_x4(&wk[r * cols / 256..(r + 1) * cols / 256], k4)[3]
    });
    if packed::supported() {
        // The 16-row interleaved layout (the matmul path on AVX-512 VNNI): one token
        // (decode) and eight tokens per weight pass (prefill), all tokens counted.
        let x8: Vec<BlockQ8_0> = (0..8).flat_map(|_| xq.iter().copied()).collect();
        let mut meta = vec![packed::XMeta::default(); x8.len()];
        packed::prepare(&x8, &mut meta);
        let k8: Vec<BlockQ8K> = (0..8).flat_map(|_| xk.iter().copied()).collect();
        let mut ksums = vec![packed::XSumsK::default(); k8.len()];
        packed::prepare_k(&k8, &mut ksums);
        let mut px = packed::PackedX {
            blocks: &x8,
            meta: &meta,
            kblocks: &k8,
            ksums: &ksums,
            nbx: nb,
        };
        let mut out = vec![0.0f32; rows * 8];
        println!(
            "packed x16 kernels ({:?}; t=8: eight tokens per weight pass)",
            packed::path()
        );
        for (name, q, bytes, data) in [
            (
                "q8_0",
                QuantType::Q8_0,
                34.0 / 32.0,
                packed::pack(&w8, rows, nb),
            ),
            (
                "q4_0",
                QuantType::Q4_0,
                18.0 / 32.0,
                packed::pack(&w4, rows, nb),
            ),
            (
                "q4_k",
                QuantType::Q4K,
                144.0 / 256.0,
                packed::pack(&wk, rows, cols / 256),
            ),
        ] {
            // Q4_K meets Q8_K activations, one block per 256.
            px.nbx = cols / packed::block_len(q);
            let w = packed::PackedW {
                kind: q,
                bytes: &data,
                nbs: cols / packed::block_len(q),
                nb: cols / packed::block_len(q),
            };
            for toks in [1usize, 8] {
                let t0 = cpu_now();
                for _ in 0..reps {
                    packed::tile(&w, 0..rows, &px, 0..toks, &mut out, toks);
                    sink += out[rows - 1];
                }
                let dt = cpu_now() - t0;
                let macs = (reps * rows * cols * toks) as f64;
                println!(
                    "{name}x16 t={toks} {:6.2} GMAC/s/core  = {:6.2} GB/s of weights per core",
                    macs / dt / 1e9,
                    macs * bytes / toks as f64 / dt / 1e9
                );
            }
        }
    }
    println!("(sink {sink})");
}
