//! [`HashIndex`]: the prefix cache's map from block hash to node slot, an open-addressing
//! table of 4-byte entries keyed by the hash's own bits.
//!
//! Block hashes are already uniformly random (a cryptographic or high-quality hash), so the
//! table hashes nothing: the low 32 bits of a block hash pick its home bucket, and an entry
//! packs the slot with a *tag*, as many bits of the hash's second 32-bit word as the slot
//! leaves free (`32 - slot_bits`; 13 or 14 bits for a few hundred thousand nodes). An entry is
//! 4 bytes instead of a map bucket's 32 (a 16-byte key and a slot, padded), so even kept at most
//! half full the table is an eighth of a map's: an engine at its memory limit reads one random
//! entry per block it caches, and a smaller table keeps more of them in the CPU caches, holds
//! 16 entries per cache line and is rebuilt in half the memory traffic.
//!
//! The tag only narrows the search: a lookup confirms a candidate by the full 128-bit hash of
//! the node the slot names (which the caller reads next anyway), passed in as the hash of the
//! *hittable* node at that slot, if any. A wrong candidate (same tag, another hash) costs one
//! node read, about once in 8,000 occupied entries probed.
//!
//! **Removal is lazy.** An engine at its memory limit evicts about as many blocks as it
//! caches, and removing each evicted block's entry cost one more random cache line per block.
//! Here eviction only counts the entry as stale ([`HashIndex::mark_stale`]); the entry stays
//! until something reuses its place. An entry is stale when the slot it names holds no
//! hittable node, or one whose hash has another tag: the node check a lookup makes anyway
//! tells, so a stale entry is never confirmed. (A stale entry whose slot now holds a node with
//! the same tag looks live; it names a real node, so it is harmless, and the next rebuild drops
//! it.) An insert whose probe meets a stale entry with its own tag (typically the entry its own
//! hash had before it was evicted) overwrites it ([`HashIndex::get_or_vacancy`],
//! [`HashIndex::insert_at`]); the others are dropped together when the table would otherwise
//! fill up: the owner rebuilds it in one pass over its live nodes ([`HashIndex::rebuild`]),
//! sized so that many evictions pass before the next rebuild. Since an entry keeps neither its
//! hash's home bits nor its whole tag word, the table never grows by itself: the owner asks
//! [`HashIndex::wants_rebuild`] before each batch of inserts. Nothing is ever deleted from the
//! middle of a probe run, so runs need no backward shift.

use crate::BlockHash;

const EMPTY: u32 = u32::MAX;

/// Hash-to-slot index; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct HashIndex {
    /// `tag << slot_bits | slot`, or [`EMPTY`]. A slot is below [`Self::slot_limit`], so no
    /// entry is all ones.
    entries: Vec<u32>,
    /// Bits of an entry that hold the slot; the other `32 - slot_bits` hold the tag.
    slot_bits: u32,
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
    /// Not stored; a stale entry with the hash's tag sits at this position, which
    /// [`HashIndex::insert_at`] may reuse.
    Vacancy(usize),
    /// Not stored, no stale entry to reuse.
    Absent,
}

/// The bits of a hash that pick its home bucket (masked by the table size).
#[inline]
fn home_bits(hash: BlockHash) -> usize {
    hash.0 as u32 as usize
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
    fn home(&self, hash: BlockHash) -> usize {
        home_bits(hash) & self.mask()
    }

    /// Slots must be below this (and the cache asks for a rebuild before they would not be).
    #[inline]
    fn slot_limit(&self) -> u64 {
        (1u64 << self.slot_bits) - 1
    }

    /// The tag of `hash`: the top `32 - slot_bits` bits of its second 32-bit word (the
    /// first picks the home bucket).
    #[inline]
    fn tag(&self, hash: BlockHash) -> u32 {
        (u64::from((hash.0 >> 32) as u32) >> self.slot_bits) as u32
    }

    /// Whether `slot` fits beside the tag (else [`Self::rebuild`] with a larger bound first).
    #[inline]
    pub(crate) fn fits(&self, slot: u32) -> bool {
        u64::from(slot) < self.slot_limit()
    }

    #[inline]
    fn tag_of(&self, e: u32) -> u32 {
        (u64::from(e) >> self.slot_bits) as u32
    }

    #[inline]
    fn slot_of(&self, e: u32) -> u32 {
        (u64::from(e) & self.slot_limit()) as u32
    }

    #[inline]
    fn entry(&self, hash: BlockHash, slot: u32) -> u32 {
        debug_assert!(u64::from(slot) < self.slot_limit(), "slot {slot} too large");
        ((u64::from(self.tag(hash)) << self.slot_bits) | u64::from(slot)) as u32
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

    /// [`Self::get`], also naming on a miss the first stale entry met with `hash`'s tag (for
    /// [`Self::insert_at`]).
    #[inline]
    pub(crate) fn get_or_vacancy(
        &self,
        hash: BlockHash,
        hittable: impl Fn(u32) -> Option<BlockHash>,
    ) -> Probe {
        if self.entries.is_empty() {
            return Probe::Absent;
        }
        let t = self.tag(hash);
        let mask = self.mask();
        let mut i = self.home(hash);
        let mut vacancy = Probe::Absent;
        loop {
            let e = self.entries[i];
            if e == EMPTY {
                return vacancy;
            }
            if self.tag_of(e) == t {
                let slot = self.slot_of(e);
                match hittable(slot) {
                    Some(h) if h == hash => return Probe::Found(slot),
                    // Another hittable hash with the same tag: possibly a live entry.
                    Some(h) if self.tag(h) == t => {}
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
            crate::prefetch::prefetch_at(&self.entries, self.home(hash));
        }
    }

    /// Stores `slot` for `hash`, which must not be stored yet. The owner makes room first:
    /// [`Self::wants_rebuild`] was false for this insert and the slot.
    pub(crate) fn insert(&mut self, hash: BlockHash, slot: u32) {
        // At most half full (stale entries included): linear probing's runs then stay a few
        // entries long, so a miss (every new block's probe) reads one cache line and takes few
        // unpredictable branches.
        debug_assert!(
            (self.len + 1) * 2 <= self.entries.len(),
            "no room: rebuild first"
        );
        let e = self.entry(hash, slot);
        self.place(self.home(hash), e);
        self.len += 1;
    }

    /// Stores `slot` for `hash` in place of the stale entry at `at`, which
    /// [`Self::get_or_vacancy`] returned for `hash` with nothing stored in between.
    pub(crate) fn insert_at(&mut self, at: usize, hash: BlockHash, slot: u32) {
        debug_assert_eq!(self.tag_of(self.entries[at]), self.tag(hash));
        self.entries[at] = self.entry(hash, slot);
        self.stale -= 1;
    }

    /// Stores `slot` for `hash` after a probe for it found nothing stored: in place of the
    /// stale entry the probe named ([`Probe::Vacancy`]: often the hash's own, from before its
    /// block was evicted), or as a new entry.
    #[inline]
    pub(crate) fn store_probed(&mut self, probe: Probe, hash: BlockHash, slot: u32) {
        match probe {
            Probe::Vacancy(at) => self.insert_at(at, hash, slot),
            Probe::Found(_) | Probe::Absent => self.insert(hash, slot),
        }
    }

    /// One stored hash's node is no longer hittable (evicted or invalidated): its entry is
    /// stale from now on. The caller makes sure the confirmation passed to [`Self::get`]
    /// rejects it from now on.
    #[inline]
    pub(crate) fn mark_stale(&mut self) {
        debug_assert!(self.stale < self.len);
        self.stale += 1;
    }

    /// Whether [`Self::rebuild`] is due before `more` inserts of slots below `slot_bound`:
    /// the table would be over half full (stale entries included), or a slot would not fit
    /// beside the tag. The table never grows or re-packs by itself: an entry keeps neither
    /// its hash's home bits nor its whole second word, so only the owner's live nodes can
    /// place them again.
    pub(crate) fn wants_rebuild(&self, more: usize, slot_bound: usize) -> bool {
        (self.len + more) * 2 > self.entries.len() || slot_bound as u64 > self.slot_limit()
    }

    /// Drops every entry and stores `live` (each hittable node's hash and slot, `count` of
    /// them) instead, with room for `more` inserts of slots below `slot_bound`: the table is
    /// sized so that at most an eighth of it is used with them, so the stale entries of many
    /// evictions fit before the next rebuild (at least three times as many inserts as there
    /// are live entries pass between two rebuilds, so an engine at its memory limit pays a
    /// rebuild's pass over the nodes and clearing of the table rarely), and slots get one bit
    /// of headroom.
    pub(crate) fn rebuild(
        &mut self,
        live: impl Iterator<Item = (BlockHash, u32)>,
        count: usize,
        more: usize,
        slot_bound: usize,
    ) {
        let size = ((count + more).max(16) * 8).next_power_of_two();
        if self.entries.len() == size {
            self.entries.fill(EMPTY);
        } else {
            self.entries = Vec::new();
            self.entries = crate::prefetch::huge_vec(size, EMPTY);
        }
        self.slot_bits = (slot_bound.max(1) as u64 * 2)
            .next_power_of_two()
            .trailing_zeros()
            .min(32);
        self.len = 0;
        self.stale = 0;
        for (hash, slot) in live {
            let e = self.entry(hash, slot);
            self.place(self.home(hash), e);
            self.len += 1;
        }
    }

    fn place(&mut self, home: usize, entry: u32) {
        let mask = self.mask();
        let mut i = home;
        while self.entries[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.entries[i] = entry;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Hashes whose home and tag bits collide a lot, to exercise long runs, wrap-around,
    /// wrong candidates, and stale entries that share a tag with live ones.
    fn hash(k: u64) -> BlockHash {
        BlockHash(u128::from(k % 7) | u128::from(k % 5) << 61 | u128::from(k) << 64)
    }

    /// An empty table with room for `more` inserts of slots below `slot_bound`.
    fn table(more: usize, slot_bound: usize) -> HashIndex {
        let mut t = HashIndex::default();
        assert!(t.wants_rebuild(1, 1), "an empty table has no room");
        t.rebuild(std::iter::empty(), 0, more, slot_bound);
        t
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
        let mut bits = Vec::new();
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
            // As the cache asks before inserting: room for one more, in a slot at most one
            // past the end.
            if t.wants_rebuild(1, slots.hash.len() + 1) {
                let live: Vec<_> = (0..slots.hash.len() as u32)
                    .filter_map(|s| slots.at(s).map(|h| (h, s)))
                    .collect();
                t.rebuild(live.iter().copied(), live.len(), 1, slots.hash.len() + 1);
                rebuilt += 1;
            }
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
                    let s = slots.take(h);
                    t.insert(h, s);
                    m.insert(k, s);
                }
            }
            assert_eq!(t.len(), m.len());
            if bits.last() != Some(&t.slot_bits) {
                bits.push(t.slot_bits);
            }
        }
        assert!(bits.len() > 1, "slots outgrew the tag split: {bits:?}");
        assert!(
            rebuilt > 0 && reused > 0,
            "{rebuilt} rebuilds, {reused} reuses"
        );
        for (&k, &s) in &m {
            assert_eq!(t.get(hash(k), |c| slots.at(c)), Some(s));
        }
    }

    #[test]
    fn a_tag_match_is_confirmed() {
        let mut t = table(4, 8);
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
        let mut t = table(4, 8);
        let a = BlockHash(9 | 1 << 64);
        t.insert(a, 3);
        t.mark_stale();
        assert_eq!(t.len(), 0);
        // Slot 3 now holds another hash: the entry is stale, a lookup of `a` misses.
        let other = BlockHash(4 | 0xffff << 32 | 7 << 64);
        let node = |s: u32| (s == 3).then_some(other);
        let Probe::Vacancy(at) = t.get_or_vacancy(a, node) else {
            panic!("the stale entry of `a` is offered for reuse");
        };
        t.insert_at(at, a, 5);
        assert_eq!(t.len(), 1);
        assert_eq!(t.get(a, |s| (s == 5).then_some(a)), Some(5));
    }
}
