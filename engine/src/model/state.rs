//! What a sequence's forward passes carry from one to the next: its KV cache and, beside
//! it, the pool of activation buffers they reuse.

use std::ops::{Deref, DerefMut};

use super::scratch::Scratch;
use crate::kv_cache::KvCache;

/// A sequence's state between forward passes. Derefs to its [`KvCache`]; `clear` (the
/// cache's) keeps every buffer.
#[derive(Debug)]
pub struct ForwardState {
    pub cache: KvCache,
    pub(crate) scratch: Scratch,
}

impl ForwardState {
    pub fn new(cache: KvCache) -> Self {
        ForwardState {
            cache,
            scratch: Scratch::default(),
        }
    }

    /// Frees the activation pool and the pending K/V buffers (both sized by the last
    /// forward pass; committed K/V stay). The next pass allocates what it needs.
    pub(crate) fn release_scratch(&mut self) {
        self.scratch.release();
        self.cache.release_pending();
    }

    /// Bytes of the reusable activation buffers (the pool and the pending K/V).
    pub fn scratch_bytes(&self) -> usize {
        self.scratch.bytes() + self.cache.pending_bytes()
    }
}

impl Deref for ForwardState {
    type Target = KvCache;
    fn deref(&self) -> &KvCache {
        &self.cache
    }
}

impl DerefMut for ForwardState {
    fn deref_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }
}
