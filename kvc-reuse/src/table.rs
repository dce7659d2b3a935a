//! [`HashIndex`]: the prefix cache's map from block hash to node slot, an open-addressing
//! table of 8-byte entries keyed by the hash's own bits.
//!
//! Block hashes are already uniformly random (a cryptographic or high-quality hash), so the
//! table hashes nothing: the low 32 bits of a block hash pick its home bucket and are stored
//! beside the slot. An entry is 8 bytes instead of a map bucket's 32 (a 16-byte key and a
//! slot, padded), so even kept at most half full the table is half the size of a map's and
//! more of it stays in the CPU caches.
//!
//! The 32 stored bits only narrow the search: a lookup confirms a candidate by the full
//! 128-bit hash of the node the slot names (which the caller reads next anyway), passed in as
//! the hash of the *hittable* node at that slot, if any.
//!
//! **Removal is lazy.** An engine at its memory limit evicts about as many blocks as it
//! caches, and removing each evicted block's entry cost one more random cache line per block.
//! Here eviction only counts the entry as stale ([`HashIndex::mark_stale`]); the entry stays
//! until something reuses its place. An entry is stale when the slot it names holds no
//! hittable node, or one whose hash has other low bits: the node check a lookup makes anyway
//! tells, so a stale entry is never confirmed. An insert whose probe meets a stale entry with
//! its own low bits (typically the entry its own hash had before it was evicted) overwrites it
//! ([`HashIndex::get_or_vacancy`], [`HashIndex::insert_at`]); the others are dropped together
//! when the table would otherwise grow: the owner rebuilds it in one pass over its live nodes
//! ([`HashIndex::rebuild`]), sized so that many evictions pass before the next rebuild.
//! Nothing is ever deleted from the middle of a probe run, so runs need no backward shift.

use crate::BlockHash;

const EMPTY: u64 = u64::MAX;

/// Hash-to-slot index; see the module docs. Slot `u32::MAX` is reserved (never stored).
#[derive(Debug, Default)]
pub(crate) struct HashIndex {
    /// `(low 32 bits of the hash) << 32 | slot`, or [`EMPTY`].
    entries: Vec<u64>,
    /// Entries stored, stale ones included.
    len: usize,
    /// Entries that name no hittable node (see [`Self::mark_stale`]).
    stale: usize,
}

/// What [`HashIndex::get_or_vacancy`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Probe {
    /// The slot stored for the hash.
    Found(u32),
    /// Not stored; a stale entry with the hash's low bits sits at this position, which
    /// [`HashIndex::insert_at`] may reuse.
    Vacancy(usize),
    /// Not stored, no stale entry to reuse.
    Absent,
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
    /// Hashes stored (entries that are not stale).
    pub(crate) fn len(&self) -> usize {
        self.len - self.stale
    }

    #[inline]
    fn mask(&self) -> usize {
        self.entries.len().wrapping_sub(1)
    }

    #[inline]
    fn home(&self, frag: u32) -> usize {
        frag as usize & self.mask()
    }

    /// The slot stored for `hash`. `hittable(slot)` is the hash of the hittable node at
    /// `slot`, if any: it confirms a candidate.
    #[inline]
    pub(crate) fn get(
        &self,
        hash: BlockHash,
        hittable: impl Fn(u32) -> Option<BlockHash>,
    ) -> Option<u32> {
        match self.get_or_vacancy(hash, hittable) {
            Probe::Found(slot) => Some(slot),
            Probe::Vacancy(_) | Probe::Absent => None,
        }
    }

    /// [`Self::get`], also naming on a miss the first stale entry met with `hash`'s low bits
    /// (for [`Self::insert_at`]).
    #[inline]
    pub(crate) fn get_or_vacancy(
        &self,
        hash: BlockHash,
        hittable: impl Fn(u32) -> Option<BlockHash>,
    ) -> Probe {
        if self.entries.is_empty() {
            return Probe::Absent;
        }
        let f = frag(hash);
        let mask = self.mask();
        let mut i = self.home(f);
        let mut vacancy = Probe::Absent;
        loop {
            let e = self.entries[i];
            if e == EMPTY {
                return vacancy;
            }
            if (e >> 32) as u32 == f {
                match hittable(slot_of(e)) {
                    Some(h) if h == hash => return Probe::Found(slot_of(e)),
                    // Another hittable hash with the same low bits: a live entry.
                    Some(h) if frag(h) == f => {}
                    // The slot holds no hittable node, or one this entry cannot be for.
                    _ => {
                        if vacancy == Probe::Absent {
                            vacancy = Probe::Vacancy(i);
                        }
                    }
                }
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
        // At most half full (stale entries included): linear probing's runs then stay a few
        // entries long, so a miss (every new block's probe) reads one cache line and takes few
        // unpredictable branches. At 3/4 they scanned ~7 entries on average.
        if (self.len + 1) * 2 > self.entries.len() {
            self.grow();
        }
        self.place(u64::from(frag(hash)) << 32 | u64::from(slot));
        self.len += 1;
    }

    /// Stores `slot` for `hash` in place of the stale entry at `at`, which
    /// [`Self::get_or_vacancy`] returned for `hash` with nothing stored in between.
    pub(crate) fn insert_at(&mut self, at: usize, hash: BlockHash, slot: u32) {
        debug_assert_ne!(slot, u32::MAX);
        debug_assert_eq!((self.entries[at] >> 32) as u32, frag(hash));
        self.entries[at] = u64::from(frag(hash)) << 32 | u64::from(slot);
        self.stale -= 1;
    }

    /// One stored hash's node is no longer hittable (evicted or invalidated): its entry is
    /// stale from now on. The caller makes sure the confirmation passed to [`Self::get`]
    /// rejects it from now on.
    #[inline]
    pub(crate) fn mark_stale(&mut self) {
        debug_assert!(self.stale < self.len);
        self.stale += 1;
    }

    /// Whether `more` inserts could make the table grow while at least a quarter of its
    /// entries are stale: then [`Self::rebuild`] is due instead.
    pub(crate) fn wants_rebuild(&self, more: usize) -> bool {
        (self.len + more) * 2 > self.entries.len() && self.stale * 4 >= self.len
    }

    /// Drops every entry and stores `live` (each hittable node's hash and slot) instead, in a
    /// table sized so that at most a quarter of it is used: the stale entries of many
    /// evictions fit before the next rebuild.
    pub(crate) fn rebuild(&mut self, live: impl Iterator<Item = (BlockHash, u32)>, count: usize) {
        let size = (count.max(16) * 4).next_power_of_two();
        if self.entries.len() == size {
            self.entries.fill(EMPTY);
        } else {
            self.entries = crate::prefetch::huge_vec(size, EMPTY);
        }
        self.len = 0;
        self.stale = 0;
        for (hash, slot) in live {
            debug_assert_ne!(slot, u32::MAX);
            self.place(u64::from(frag(hash)) << 32 | u64::from(slot));
            self.len += 1;
        }
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
        let old = std::mem::replace(&mut self.entries, crate::prefetch::huge_vec(size, EMPTY));
        for e in old {
            if e != EMPTY {
                self.place(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Hashes whose low bits collide a lot, to exercise long runs, wrap-around and stale
    /// entries that share a fragment with live ones.
    fn hash(k: u64) -> BlockHash {
        BlockHash(u128::from(k % 7) | u128::from(k) << 64)
    }

    /// A node table as the cache keeps one: slots reused last freed first.
    #[derive(Default)]
    struct Slots {
        hash: Vec<Option<BlockHash>>,
        free: Vec<u32>,
    }

    impl Slots {
        fn take(&mut self, h: BlockHash) -> u32 {
            match self.free.pop() {
                Some(s) => {
                    self.hash[s as usize] = Some(h);
                    s
                }
                None => {
                    self.hash.push(Some(h));
                    self.hash.len() as u32 - 1
                }
            }
        }

        fn at(&self, s: u32) -> Option<BlockHash> {
            self.hash.get(s as usize).copied().flatten()
        }
    }

    #[test]
    fn matches_a_map_under_churn() {
        let mut t = HashIndex::default();
        let mut slots = Slots::default();
        let mut m: HashMap<u64, u32> = HashMap::new();
        let mut rebuilt = 0;
        let mut reused = 0;
        let mut x = 1u64;
        for step in 0..40_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = x % 500;
            let h = hash(k);
            let probe = t.get_or_vacancy(h, |s| slots.at(s));
            assert_eq!(t.get(h, |s| slots.at(s)), m.get(&k).copied());
            match probe {
                Probe::Found(s) => {
                    assert_eq!(m.get(&k), Some(&s));
                    if step % 3 != 0 {
                        // Evicted: the slot is freed, the entry goes stale.
                        slots.hash[s as usize] = None;
                        slots.free.push(s);
                        t.mark_stale();
                        m.remove(&k);
                    }
                }
                Probe::Vacancy(at) => {
                    assert!(!m.contains_key(&k));
                    let s = slots.take(h);
                    t.insert_at(at, h, s);
                    m.insert(k, s);
                    reused += 1;
                }
                Probe::Absent => {
                    assert!(!m.contains_key(&k));
                    if t.wants_rebuild(1) {
                        let live: Vec<_> = (0..slots.hash.len() as u32)
                            .filter_map(|s| slots.at(s).map(|h| (h, s)))
                            .collect();
                        t.rebuild(live.iter().copied(), live.len());
                        rebuilt += 1;
                    }
                    let s = slots.take(h);
                    t.insert(h, s);
                    m.insert(k, s);
                }
            }
            assert_eq!(t.len(), m.len());
        }
        assert!(
            rebuilt > 0 && reused > 0,
            "{rebuilt} rebuilds, {reused} reuses"
        );
        for (&k, &s) in &m {
            assert_eq!(t.get(hash(k), |c| slots.at(c)), Some(s));
        }
    }

    #[test]
    fn a_fragment_match_is_confirmed() {
        let mut t = HashIndex::default();
        let a = BlockHash(5 | 1 << 64);
        let b = BlockHash(5 | 2 << 64);
        let node = |s: u32| match s {
            1 => Some(a),
            2 => Some(b),
            _ => None,
        };
        t.insert(a, 1);
        assert_eq!(
            t.get_or_vacancy(b, node),
            Probe::Absent,
            "a live entry, another hash"
        );
        t.insert(b, 2);
        assert_eq!(t.get(b, node), Some(2));
        assert_eq!(t.get(a, node), Some(1));
    }

    #[test]
    fn a_stale_entry_is_never_confirmed_and_is_reused() {
        let mut t = HashIndex::default();
        let a = BlockHash(9 | 1 << 64);
        t.insert(a, 3);
        t.mark_stale();
        assert_eq!(t.len(), 0);
        // Slot 3 now holds another hash: the entry is stale, a lookup of `a` misses.
        let other = BlockHash(4 | 7 << 64);
        let node = |s: u32| (s == 3).then_some(other);
        let Probe::Vacancy(at) = t.get_or_vacancy(a, node) else {
            panic!("the stale entry of `a` is offered for reuse");
        };
        t.insert_at(at, a, 5);
        assert_eq!(t.len(), 1);
        assert_eq!(t.get(a, |s| (s == 5).then_some(a)), Some(5));
    }
}
