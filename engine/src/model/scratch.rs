//! A pool of f32 buffers reused by every forward pass of a sequence, so that the decode
//! loop stops allocating once the first token has warmed the pool up.

/// Free buffers; `take` hands out a zeroed buffer of the asked length, `give` returns it.
#[derive(Debug, Default)]
pub struct Scratch {
    free: Vec<Vec<f32>>,
}

impl Scratch {
    /// A zeroed buffer of `n` elements, reusing a pooled one with enough capacity.
    pub fn take(&mut self, n: usize) -> Vec<f32> {
        let mut v = self.take_len(n);
        v.clear();
        v.resize(n, 0.0);
        v
    }

    /// A buffer of `n` elements holding whatever an earlier user left (zeros only past
    /// that), for an output the caller overwrites whole: a prefill's buffers are megabytes,
    /// and zeroing them ran on one thread while the other waited.
    pub fn take_for_write(&mut self, n: usize) -> Vec<f32> {
        let mut v = self.take_len(n);
        if cfg!(debug_assertions) {
            // Tests run with debug assertions: an element the caller fails to write
            // stays NaN and shows in every result it reaches.
            v.clear();
            v.resize(n, f32::NAN);
        } else {
            v.truncate(n);
            v.resize(n, 0.0);
        }
        v
    }

    /// A pooled (or new) buffer with capacity for `n`, contents as left.
    fn take_len(&mut self, n: usize) -> Vec<f32> {
        // Best fit: the shortest pooled buffer already `n` long (exactly `n` in a decode
        // step, which asks for the same sizes every token, so buffers keep their lengths;
        // its elements are initialised, so `take_for_write` zeroes none: that memset was
        // ~1% of a decode step), else the smallest that holds n.
        let best = self
            .free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= n)
            .min_by_key(|(_, b)| {
                (
                    b.len() < n,
                    if b.len() >= n { b.len() } else { b.capacity() },
                )
            })
            .map(|(i, _)| i);
        match best {
            Some(i) => self.free.swap_remove(i),
            None => match self.free.pop() {
                Some(mut v) => {
                    v.reserve(n.saturating_sub(v.len()));
                    v
                }
                None => Vec::with_capacity(n),
            },
        }
    }

    /// A buffer holding a copy of `src`.
    pub fn copy_of(&mut self, src: &[f32]) -> Vec<f32> {
        let mut v = self.take_for_write(src.len());
        v.copy_from_slice(src);
        v
    }

    pub fn give(&mut self, v: Vec<f32>) {
        self.free.push(v);
    }

    /// Frees every pooled buffer (after a prefill, whose buffers are prompt-chunk sized).
    pub fn release(&mut self) {
        self.free = Vec::new();
    }

    /// Bytes held by pooled buffers (memory accounting).
    pub fn bytes(&self) -> usize {
        self.free.iter().map(|b| b.capacity() * 4).sum()
    }
}
