//! The in-RAM cache of recently read rows, least recently used first out.

use std::collections::{BTreeMap, HashMap};

/// The in-RAM cache of recently used rows (raw bytes, already verified).
#[derive(Debug, Default)]
pub(super) struct HotRows {
    pub(super) cap_bytes: usize,
    pub(super) used: usize,
    pub(super) tick: u64,
    pub(super) rows: HashMap<u32, (u64, Box<[u8]>)>,
    pub(super) order: BTreeMap<u64, u32>,
    pub(super) hits: u64,
    pub(super) misses: u64,
}

impl HotRows {
    pub(super) fn get(&mut self, id: u32) -> Option<&[u8]> {
        self.tick += 1;
        let tick = self.tick;
        match self.rows.get_mut(&id) {
            Some((t, data)) => {
                self.order.remove(t);
                *t = tick;
                self.order.insert(tick, id);
                self.hits += 1;
                Some(data)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    pub(super) fn insert(&mut self, id: u32, data: &[u8]) {
        if data.len() > self.cap_bytes || self.rows.contains_key(&id) {
            return;
        }
        while self.used + data.len() > self.cap_bytes {
            let Some((&t, &old)) = self.order.iter().next() else {
                break;
            };
            self.order.remove(&t);
            if let Some((_, d)) = self.rows.remove(&old) {
                self.used -= d.len();
            }
        }
        self.tick += 1;
        self.order.insert(self.tick, id);
        self.rows.insert(id, (self.tick, data.into()));
        self.used += data.len();
    }

    pub(super) fn clear(&mut self) {
        self.rows.clear();
        self.order.clear();
        self.used = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_rows_evict_least_recent() {
        let mut h = HotRows {
            cap_bytes: 8,
            ..Default::default()
        };
        h.insert(1, &[1; 4]);
        h.insert(2, &[2; 4]);
        assert!(h.get(1).is_some());
        h.insert(3, &[3; 4]);
        assert!(h.get(2).is_none());
        assert!(h.get(1).is_some() && h.get(3).is_some());
        assert_eq!(h.used, 8);
    }
}
