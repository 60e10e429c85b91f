//! The forward pass's thread pool: `threads - 1` workers that spin between jobs and park
//! only after a quiet spell, so a decode step's ~370 products and row splits start in
//! well under a microsecond instead of waking sleeping threads each time.
//!
//! Why not rayon here: its idle workers yield and then sleep within ~50 µs, and in the
//! VMs and laptops gemmad runs on, waking a sleeping (halted) vCPU costs tens of
//! microseconds; measured on a layer-shaped sequence of decode products, a 20 µs gap
//! between products made each one ~18 µs slower. Jobs here are flat index ranges
//! claimed one index at a time from a shared counter (the calling thread works too), and
//! the call returns when every worker has checked in, so borrowed data outlives its use.
//!
//! [`install`] makes a pool current on this thread; [`for_each`], [`chunks_mut`] and
//! [`threads`] use it when there is one and rayon's pool otherwise (tests, tools).

use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long an idle worker spins before it parks: longer than any gap inside a decode
/// step or between tokens, short enough that an idle service burns no CPU.
const SPIN: Duration = Duration::from_millis(3);

struct Job<'a> {
    n: usize,
    f: &'a (dyn Fn(usize) + Sync),
}

struct Shared {
    /// Bumped (SeqCst) once per job after `job`, `next` and `finished` are set.
    epoch: AtomicU64,
    job: AtomicPtr<()>,
    next: AtomicUsize,
    /// Workers done with the current job.
    finished: AtomicUsize,
    panicked: AtomicBool,
    stop: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

/// A spinning pool; see the module docs.
pub struct SpinPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Set while a job runs: a job started meanwhile (nested, or from another thread)
    /// runs on its caller alone.
    busy: AtomicBool,
}

fn work(job: &Job, next: &AtomicUsize) {
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= job.n {
            return;
        }
        (job.f)(i);
    }
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        let mut since = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            if s.stop.load(Ordering::Relaxed) {
                return;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && since.elapsed() > SPIN {
                let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while s.epoch.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::SeqCst) {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                since = Instant::now();
            }
        }
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        // SAFETY: `run` published a live `Job` before bumping the epoch (Acquire above
        // pairs with it) and does not return, so the job stays alive, until this worker
        // has counted itself into `finished`.
        let job = unsafe { &*(s.job.load(Ordering::Acquire) as *const Job) };
        if catch_unwind(AssertUnwindSafe(|| work(job, &s.next))).is_err() {
            s.panicked.store(true, Ordering::SeqCst);
        }
        s.finished.fetch_add(1, Ordering::Release);
    }
}

impl SpinPool {
    /// A pool for `threads` threads in all: the caller plus `threads - 1` workers.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            next: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut pool = SpinPool {
            shared: shared.clone(),
            workers: Vec::new(),
            busy: AtomicBool::new(false),
        };
        for i in 1..threads.max(1) {
            let s = shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("gemmad-spin-{i}"))
                .spawn(move || worker(&s))?;
            pool.workers.push(h);
        }
        Ok(pool)
    }

    /// Threads a job runs on (workers and the caller).
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// `f(i)` for every `i` in `0..n`, spread over the pool; returns when all are done.
    /// A panic in `f` is re-raised here after every thread has stopped.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n <= 1
            || self.workers.is_empty()
            || self
                .busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            (0..n).for_each(f);
            return;
        }
        let s = &*self.shared;
        let job = Job { n, f };
        s.job
            .store(&job as *const Job as *mut (), Ordering::Relaxed);
        s.next.store(0, Ordering::Relaxed);
        s.finished.store(0, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| work(&job, &s.next)));
        while s.finished.load(Ordering::Acquire) < self.workers.len() {
            std::hint::spin_loop();
        }
        let theirs = s.panicked.swap(false, Ordering::SeqCst);
        self.busy.store(false, Ordering::Release);
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if theirs {
            panic!("a compute worker panicked"); // ok: re-raises a panic from `f`
        }
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

thread_local! {
    static CURRENT: Cell<*const SpinPool> = const { Cell::new(std::ptr::null()) };
}

/// Runs `f` with `pool` as this thread's pool.
pub fn install<R>(pool: &SpinPool, f: impl FnOnce() -> R) -> R {
    struct Restore(*const SpinPool);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CURRENT.with(|c| c.replace(pool)));
    f()
}

fn current<R>(f: impl FnOnce(Option<&SpinPool>) -> R) -> R {
    let p = CURRENT.with(|c| c.get());
    // SAFETY: `install` keeps the pool borrowed, and resets the pointer, around every
    // use on this thread.
    f(unsafe { p.as_ref() })
}

/// Threads that parallel work here is split over.
pub fn threads() -> usize {
    current(|p| p.map_or_else(rayon::current_num_threads, SpinPool::threads))
}

/// `f(i)` for `i` in `0..n` over the current pool.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    current(|p| match p {
        Some(p) => p.run(n, &f),
        None => (0..n).into_par_iter().for_each(&f),
    })
}

/// A raw pointer the pool's threads may share: for handing them disjoint parts of one
/// mutably borrowed buffer (the user's SAFETY comment says why they are disjoint).
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: only used to hand disjoint parts of buffers to the pool's threads.
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// `f(i, chunk i)` for the `chunk`-long pieces of `v` (the last may be shorter), over
/// the current pool.
pub fn chunks_mut<T: Send>(v: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunk = chunk.max(1);
    let len = v.len();
    let p = SendPtr(v.as_mut_ptr());
    let p = &p;
    for_each(len.div_ceil(chunk), |i| {
        let s = i * chunk;
        let n = chunk.min(len - s);
        // SAFETY: chunk `i` is `v[s..s + n]`, within `v`, and no two indices overlap;
        // `v` stays mutably borrowed until every call has returned.
        f(i, unsafe { std::slice::from_raw_parts_mut(p.0.add(s), n) })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_once_and_chunks_cover_the_slice() {
        let pool = SpinPool::new(3).unwrap();
        assert_eq!(pool.threads(), 3);
        install(&pool, || {
            assert_eq!(threads(), 3);
            for n in [0usize, 1, 2, 7, 1000] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                for_each(n, |i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "n = {n}"
                );
            }
            let mut v = vec![0usize; 1001];
            chunks_mut(&mut v, 64, |i, c| {
                for (j, x) in c.iter_mut().enumerate() {
                    *x = i * 64 + j + 1;
                }
            });
            assert!(v.iter().enumerate().all(|(i, &x)| x == i + 1));
        });
        // Outside `install`, rayon's pool.
        assert_eq!(threads(), rayon::current_num_threads());
    }

    #[test]
    fn parked_workers_wake_and_nested_jobs_run_inline() {
        let pool = SpinPool::new(2).unwrap();
        let sum = AtomicUsize::new(0);
        std::thread::sleep(SPIN * 3); // the worker parks
        pool.run(100, &|i| {
            // A nested job runs on this thread alone.
            pool.run(3, &|j| {
                sum.fetch_add(i * 3 + j, Ordering::Relaxed);
            });
        });
        assert_eq!(sum.load(Ordering::Relaxed), (0..300).sum::<usize>());
    }

    #[test]
    fn a_panicking_task_is_reraised_and_the_pool_still_works() {
        let pool = SpinPool::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(64, &|i| {
                if i == 40 {
                    panic!("task 40");
                }
            })
        }));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        pool.run(64, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 64);
    }
}
