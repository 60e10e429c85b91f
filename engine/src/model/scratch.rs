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
        // Best fit: a pooled buffer exactly `n` long (a decode step asks for the same
        // sizes every token, so buffers keep their lengths), else the shortest already
        // longer (its elements initialised, so `take_for_write` need not zero any: that
        // memset was ~1% of a decode step), else the smallest that holds n.
        let mut best = self.free.iter().position(|b| b.len() == n);
        if best.is_none() {
            for (i, b) in self.free.iter().enumerate() {
                if b.len() >= n && best.is_none_or(|j| self.free[j].len() > b.len()) {
                    best = Some(i);
                }
            }
        }
        if best.is_none() {
            for (i, b) in self.free.iter().enumerate() {
                if b.capacity() >= n && best.is_none_or(|j| self.free[j].capacity() > b.capacity())
                {
                    best = Some(i);
                }
            }
        }
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
