//! [`HashIndex`]: the prefix cache's map from block hash to node slot, an open-addressing
//! table of 8-byte entries keyed by the hash's own bits.
//!
//! Block hashes are already uniformly random (a cryptographic or high-quality hash), so the
//! table hashes nothing: the low 32 bits of a block hash pick its home bucket and are stored
//! beside the slot. An entry is 8 bytes instead of a map bucket's 32 (a 16-byte key and a
//! slot, padded), so even kept at most half full the table is half the size of a map's and
//! more of it stays in the CPU caches; evictions, which dominate an engine at its memory
//! limit, remove entries by slot without reading the hash table's keys at all. Linear probing
//! with backward-shift deletion leaves no tombstones, so probe lengths do not grow under
//! constant insert/evict churn.
//!
//! The 32 stored bits only narrow the search: a lookup confirms a candidate by comparing the
//! full 128-bit hash of the node the slot names (which the caller reads next anyway).

use crate::BlockHash;

const EMPTY: u64 = u64::MAX;

/// Hash-to-slot index; see the module docs. Slot `u32::MAX` is reserved (never stored).
#[derive(Debug, Default)]
pub(crate) struct HashIndex {
    /// `(low 32 bits of the hash) << 32 | slot`, or [`EMPTY`].
    entries: Vec<u64>,
    len: usize,
}

#[inline]
fn frag(hash: BlockHash) -> u32 {
    hash.0 as u32
}

#[inline]
fn slot_of(e: u64) -> u32 {
    e as u32
}

impl HashIndex {
    /// Entries stored.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    fn mask(&self) -> usize {
        self.entries.len().wrapping_sub(1)
    }

    #[inline]
    fn home(&self, frag: u32) -> usize {
        frag as usize & self.mask()
    }

    /// The slot stored for `hash`: `is_hash(slot)` confirms a candidate.
    #[inline]
    pub(crate) fn get(&self, hash: BlockHash, is_hash: impl Fn(u32) -> bool) -> Option<u32> {
        if self.entries.is_empty() {
            return None;
        }
        let f = frag(hash);
        let mask = self.mask();
        let mut i = self.home(f);
        loop {
            let e = self.entries[i];
            if e == EMPTY {
                return None;
            }
            if (e >> 32) as u32 == f && is_hash(slot_of(e)) {
                return Some(slot_of(e));
            }
            i = (i + 1) & mask;
        }
    }

    /// Hints the CPU to fetch the home bucket of `hash` (see [`crate::prefetch`]). Changes
    /// nothing.
    #[inline]
    pub(crate) fn prefetch(&self, hash: BlockHash) {
        if !self.entries.is_empty() {
            crate::prefetch::prefetch_at(&self.entries, self.home(frag(hash)));
        }
    }

    /// Stores `slot` for `hash`, which must not be stored yet.
    pub(crate) fn insert(&mut self, hash: BlockHash, slot: u32) {
        debug_assert_ne!(slot, u32::MAX);
        // At most half full: linear probing's runs then stay a few entries long, so a miss
        // (every new block's probe) and a removal's backward shift read one cache line and
        // take few unpredictable branches. At 3/4 they scanned ~7 entries on average.
        if (self.len + 1) * 2 > self.entries.len() {
            self.grow();
        }
        self.place(u64::from(frag(hash)) << 32 | u64::from(slot));
        self.len += 1;
    }

    fn place(&mut self, entry: u64) {
        let mask = self.mask();
        let mut i = self.home((entry >> 32) as u32);
        while self.entries[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.entries[i] = entry;
    }

    fn grow(&mut self) {
        let size = (self.entries.len() * 2).max(64);
        let old = std::mem::replace(&mut self.entries, vec![EMPTY; size]);
        for e in old {
            if e != EMPTY {
                self.place(e);
            }
        }
    }

    /// Removes the entry of `slot`, stored under `hash`. Returns whether it was there.
    pub(crate) fn remove(&mut self, hash: BlockHash, slot: u32) -> bool {
        if self.entries.is_empty() {
            return false;
        }
        let mask = self.mask();
        let want = u64::from(frag(hash)) << 32 | u64::from(slot);
        let mut i = self.home(frag(hash));
        loop {
            let e = self.entries[i];
            if e == EMPTY {
                return false;
            }
            if e == want {
                break;
            }
            i = (i + 1) & mask;
        }
        // Backward shift: pull later entries of the run into the hole unless their home lies
        // cyclically in (hole, their position].
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let e = self.entries[j];
            if e == EMPTY {
                break;
            }
            let home = self.home((e >> 32) as u32);
            let stays = if i <= j {
                i < home && home <= j
            } else {
                i < home || home <= j
            };
            if !stays {
                self.entries[i] = e;
                i = j;
            }
        }
        self.entries[i] = EMPTY;
        self.len -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Hashes whose low bits collide a lot, to exercise long runs and wrap-around.
    fn hash(k: u64) -> BlockHash {
        BlockHash(u128::from(k % 7) | u128::from(k) << 64)
    }

    #[test]
    fn matches_a_map_under_churn() {
        let mut t = HashIndex::default();
        let mut m: HashMap<u64, u32> = HashMap::new();
        let mut keys: HashMap<u32, u64> = HashMap::new();
        let mut x = 1u64;
        for step in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = x % 500;
            let h = hash(k);
            let found = t.get(h, |s| keys.get(&s) == Some(&k));
            assert_eq!(found, m.get(&k).copied());
            match found {
                Some(s) if step % 3 != 0 => {
                    assert!(t.remove(h, s));
                    m.remove(&k);
                    keys.remove(&s);
                }
                Some(_) => {}
                None => {
                    t.insert(h, step);
                    m.insert(k, step);
                    keys.insert(step, k);
                }
            }
            assert_eq!(t.len(), m.len());
        }
        for (&k, &s) in &m {
            assert_eq!(t.get(hash(k), |c| c == s), Some(s));
        }
        assert!(!t.remove(hash(10_000), 1));
    }

    #[test]
    fn a_fragment_match_is_confirmed() {
        let mut t = HashIndex::default();
        let a = BlockHash(5 | 1 << 64);
        let b = BlockHash(5 | 2 << 64);
        t.insert(a, 1);
        assert_eq!(t.get(b, |s| s == 2), None, "same low bits, another hash");
        t.insert(b, 2);
        assert_eq!(t.get(b, |s| s == 2), Some(2));
        assert_eq!(t.get(a, |s| s == 1), Some(1));
    }
}
