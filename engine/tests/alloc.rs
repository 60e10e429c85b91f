//! The decode hot path allocates nothing per token once its buffers are warm: counted
//! with a global allocator over 1000 decode steps of the tiny model.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::*;
use gemmad_engine::internals::{LogitsFor, TextModel};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decode_steps_do_not_allocate() {
    let (_, model) = TextModel::load_dir(&fixture("text")).unwrap();
    let g = goldens("text");
    let prompt = ids(&g["greedy_prompt"]);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(|| {
        let mut cache = model.new_cache(2048);
        let mut logits = Vec::new();
        model
            .forward_into(&prompt, &mut cache, LogitsFor::Last, &mut logits)
            .unwrap();
        let mut next = argmax(&logits) as u32;
        // Warm up: the first decode steps size the pools; attention's score buffer grows
        // with the context, so warm it to the longest context used below.
        for _ in 0..8 {
            model
                .forward_into(&[next], &mut cache, LogitsFor::Last, &mut logits)
                .unwrap();
            next = argmax(&logits) as u32;
        }
        let mut warm = model.new_cache(2048);
        model
            .forward_into(&vec![5u32; 1100], &mut warm, LogitsFor::Last, &mut logits)
            .unwrap();
        std::mem::swap(&mut cache, &mut warm); // carry the warmed pools over
        cache.clear();
        model
            .forward_into(&prompt, &mut cache, LogitsFor::Last, &mut logits)
            .unwrap();
        next = argmax(&logits) as u32;

        ALLOCS.store(0, Ordering::SeqCst);
        COUNTING.store(true, Ordering::SeqCst);
        for _ in 0..1000 {
            model
                .forward_into(&[next], &mut cache, LogitsFor::Last, &mut logits)
                .unwrap();
            next = argmax(&logits) as u32;
        }
        COUNTING.store(false, Ordering::SeqCst);
        assert_eq!(cache.len(), prompt.len() + 1000);
    });
    let n = ALLOCS.load(Ordering::SeqCst);
    assert_eq!(n, 0, "{n} allocations in 1000 decode steps");
}
