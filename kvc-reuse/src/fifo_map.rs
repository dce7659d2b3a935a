//! [`FifoMap`]: a bounded map from block hash to a small value that forgets its oldest
//! insertions first: the ghost lists of evicted blocks and the continuation checkpoints of the
//! eviction policies.
//!
//! Its behaviour is exactly that of a hash map beside a FIFO of the keys inserted (a key is
//! queued when it is inserted while absent; trimming pops the oldest queued key and removes
//! it from the map, whether or not that queue entry is the one that put it there), which is
//! how the policies kept them before. The layout is what makes it cheaper: those policies make
//! one or two of these calls per block they see, on tables of hundreds of thousands of keys,
//! so nearly every call is a cache miss, and a general hash map spends two or more (its control
//! bytes, then the bucket; a removal leaves a tombstone that later forces a rehash).
//!
//! Here the FIFO is a ring of cells (key, value, next cell of the same key) in insertion order,
//! and the index is an open-addressing table of 8-byte entries, each a ring position and the
//! key's low 32 bits, whose lowest bits are its home (block hashes are uniformly random), so
//! moving entries never reads a key again and a probe confirms a key only where its bits
//! match. A key's entry names its *oldest* cell in the ring, which holds its value
//! and whether the map holds the key (removing a key only clears that flag: its cell stays
//! queued, as the FIFO entry did). Trimming reads the ring's head in order (no miss), and moves
//! the entry to the key's next cell or deletes it with a backward shift (no tombstones). A
//! look-up or an insert of an absent key reads one table line; a present key's cell is a
//! second read. Both arrays are advised to use huge pages (see [`crate::prefetch`]), so those
//! reads seldom miss the TLB as well.

use crate::BlockHash;

/// No table entry.
const EMPTY: u64 = u64::MAX;
/// No next cell.
const NONE: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Cell<T> {
    /// The key's low and high 64 bits (two words: 8-byte alignment keeps a cell small).
    key: [u64; 2],
    /// The value, in the key's oldest cell only (others hold a copy of no meaning).
    value: T,
    /// In the key's oldest cell: whether the map holds the key.
    live: bool,
    /// Ring position of the key's next cell, or [`NONE`].
    next: u32,
}

/// A bounded map of block hashes to `T`; see the module docs.
#[derive(Debug)]
pub(crate) struct FifoMap<T> {
    /// Cells by ring position modulo the ring's length (a power of two).
    ring: Vec<Cell<T>>,
    /// Ring positions (wrapping) of the oldest cell and of the next one to fill.
    head: u32,
    tail: u32,
    /// `low 32 bits of the key << 32 | position` of each key's oldest cell, or [`EMPTY`].
    table: Vec<u64>,
    /// Keys in the table.
    keys: usize,
    /// Cells kept after [`FifoMap::trim`].
    cap: usize,
}

impl<T: Copy + Default> FifoMap<T> {
    /// Most cells kept after a trim: the ring's positions are 32-bit, so it stays far below
    /// 2^31 cells whatever capacity a caller asks for.
    const MAX_CAP: usize = 1 << 30;

    /// An empty map that [`trim`](Self::trim) keeps to the `cap` most recent insertions of
    /// absent keys (at least one, at most 2^30).
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            ring: Vec::new(),
            head: 0,
            tail: 0,
            table: Vec::new(),
            keys: 0,
            cap: cap.clamp(1, Self::MAX_CAP),
        }
    }

    /// Cells queued (insertions of absent keys not yet trimmed).
    pub(crate) fn queued(&self) -> usize {
        self.tail.wrapping_sub(self.head) as usize
    }

    #[inline]
    fn words(key: BlockHash) -> [u64; 2] {
        [key.0 as u64, (key.0 >> 64) as u64]
    }

    /// The entry's high half: the key's low 32 bits.
    #[inline]
    fn tag(key: BlockHash) -> u64 {
        u64::from(key.0 as u32) << 32
    }

    /// The home index of an entry or tag.
    #[inline]
    fn home(&self, tagged: u64) -> usize {
        (tagged >> 32) as usize & (self.table.len() - 1)
    }

    #[inline]
    fn cell(&self, pos: u32) -> &Cell<T> {
        &self.ring[pos as usize & (self.ring.len() - 1)]
    }

    #[inline]
    fn cell_mut(&mut self, pos: u32) -> &mut Cell<T> {
        let mask = self.ring.len() - 1;
        &mut self.ring[pos as usize & mask]
    }

    /// The table index of `key`'s entry.
    #[inline]
    fn find(&self, key: BlockHash) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let tag = Self::tag(key);
        let words = Self::words(key);
        let mask = self.table.len() - 1;
        let mut i = self.home(tag);
        loop {
            let e = self.table[i];
            if e == EMPTY {
                return None;
            }
            if e & !u64::from(u32::MAX) == tag && self.cell(e as u32).key == words {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// The value of `key`, if the map holds it.
    #[inline]
    pub(crate) fn get(&self, key: &BlockHash) -> Option<T> {
        let i = self.find(*key)?;
        let c = self.cell(self.table[i] as u32);
        c.live.then_some(c.value)
    }

    /// Removes `key`, returning its value if the map held it. Its queued cell stays (and
    /// [`trim`](Self::trim) counts it).
    #[inline]
    pub(crate) fn remove(&mut self, key: &BlockHash) -> Option<T> {
        let i = self.find(*key)?;
        let c = self.cell_mut(self.table[i] as u32);
        std::mem::replace(&mut c.live, false).then_some(c.value)
    }

    /// Sets `key`'s value. An absent key is queued (a present one keeps its place); nothing
    /// is forgotten before [`trim`](Self::trim).
    pub(crate) fn insert(&mut self, key: BlockHash, value: T) {
        match self.find(key) {
            Some(i) => {
                let first = self.table[i] as u32;
                let c = self.cell_mut(first);
                if c.live {
                    c.value = value;
                    return;
                }
                // Removed earlier but still queued: held again from its oldest cell, and
                // queued once more (as the FIFO entry would be).
                c.live = true;
                c.value = value;
                let pos = self.push(key, value);
                let mut last = first;
                while self.cell(last).next != NONE {
                    last = self.cell(last).next;
                }
                self.cell_mut(last).next = pos;
            }
            None => {
                let pos = self.push(key, value);
                self.cell_mut(pos).live = true;
                self.grow_table();
                self.place(Self::tag(key) | u64::from(pos));
                self.keys += 1;
            }
        }
    }

    /// Forgets the oldest queued insertions until at most `cap` are queued: each one's key is
    /// removed from the map (however it was inserted since).
    pub(crate) fn trim(&mut self) {
        while self.queued() > self.cap {
            let pos = self.head;
            let Cell { key, next, .. } = *self.cell(pos);
            let key = BlockHash(u128::from(key[0]) | (u128::from(key[1]) << 64));
            self.head = self.head.wrapping_add(1);
            let Some(i) = self.find(key) else {
                debug_assert!(false, "a queued key has a table entry");
                continue;
            };
            debug_assert_eq!(
                self.table[i] as u32, pos,
                "the head is its key's oldest cell"
            );
            if next == NONE {
                self.delete(i);
                self.keys -= 1;
            } else {
                // Its next cell becomes the oldest, not held (the key was removed).
                self.table[i] = Self::tag(key) | u64::from(next);
                self.cell_mut(next).live = false;
            }
        }
    }

    /// Appends a cell for `key` (not held, no next) and returns its position.
    fn push(&mut self, key: BlockHash, value: T) -> u32 {
        if self.queued() == self.ring.len() {
            self.grow_ring();
        }
        let pos = self.tail;
        self.tail = self.tail.wrapping_add(1);
        *self.cell_mut(pos) = Cell {
            key: Self::words(key),
            value,
            live: false,
            next: NONE,
        };
        pos
    }

    /// Doubles the ring, keeping every cell at its position (the table names positions).
    fn grow_ring(&mut self) {
        let len = (self.ring.len() * 2).max(16);
        // Callers trim after at most a few inserts and `cap` is at most 2^30, so the ring
        // never needs 2^31 cells (past that, positions would alias): unreachable.
        assert!(len <= 1 << 31, "a FifoMap holds fewer than 2^31 cells");
        let filler = Cell {
            key: [0; 2],
            value: T::default(),
            live: false,
            next: NONE,
        };
        let mut ring = crate::prefetch::huge_vec(len, filler);
        let mut pos = self.head;
        while pos != self.tail {
            ring[pos as usize & (len - 1)] = *self.cell(pos);
            pos = pos.wrapping_add(1);
        }
        self.ring = ring;
    }

    /// Keeps the table at most half full for one more key.
    fn grow_table(&mut self) {
        if (self.keys + 1) * 2 <= self.table.len() {
            return;
        }
        let len = (self.table.len() * 2).max(64);
        let old = std::mem::replace(&mut self.table, crate::prefetch::huge_vec(len, EMPTY));
        for e in old.into_iter().filter(|&e| e != EMPTY) {
            self.place(e);
        }
    }

    /// Stores entry `e` at the first free index from its home.
    fn place(&mut self, e: u64) {
        let mask = self.table.len() - 1;
        let mut i = self.home(e);
        while self.table[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.table[i] = e;
    }

    /// Deletes the entry at index `i`, shifting later entries of its probe run back so no run
    /// is broken (linear probing without tombstones).
    fn delete(&mut self, mut i: usize) {
        let mask = self.table.len() - 1;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let e = self.table[j];
            if e == EMPTY {
                break;
            }
            let home = self.home(e);
            // Move `e` back into the hole unless its home lies cyclically in (i, j].
            let stays = if i <= j {
                i < home && home <= j
            } else {
                i < home || home <= j
            };
            if !stays {
                self.table[i] = e;
                i = j;
            }
        }
        self.table[i] = EMPTY;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, VecDeque};

    use proptest::prelude::*;

    use super::*;

    /// The behaviour [`FifoMap`] keeps: a map beside a FIFO of the keys inserted while absent.
    #[derive(Default)]
    struct Reference {
        map: HashMap<BlockHash, u8>,
        order: VecDeque<BlockHash>,
        cap: usize,
    }

    impl Reference {
        fn insert(&mut self, key: BlockHash, value: u8) {
            if self.map.insert(key, value).is_none() {
                self.order.push_back(key);
            }
        }
        fn trim(&mut self) {
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u8, u8),
        Remove(u8),
        Trim,
    }

    /// Keys from a small set whose low bits (home and tag) collide often, with homes near
    /// the end of a 64-entry table, so probe runs are long and wrap around.
    fn key(k: u8) -> BlockHash {
        let k = u128::from(k);
        BlockHash(((k % 7) * 9 + 57) | (k << 96))
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..40, any::<u8>()).prop_map(|(k, v)| Op::Insert(k, v)),
            2 => (0u8..40).prop_map(Op::Remove),
            1 => Just(Op::Trim),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn behaves_as_a_map_beside_a_fifo(cap in 1usize..24, ops in prop::collection::vec(op(), 0..400)) {
            let mut m = FifoMap::<u8>::new(cap);
            let mut r = Reference { cap, ..Reference::default() };
            for op in ops {
                match op {
                    Op::Insert(k, v) => {
                        m.insert(key(k), v);
                        r.insert(key(k), v);
                    }
                    Op::Remove(k) => prop_assert_eq!(m.remove(&key(k)), r.map.remove(&key(k))),
                    Op::Trim => {
                        m.trim();
                        r.trim();
                    }
                }
                prop_assert_eq!(m.queued(), r.order.len());
                for k in 0..40 {
                    prop_assert_eq!(m.get(&key(k)), r.map.get(&key(k)).copied(), "key {}", k);
                }
            }
        }
    }

    #[test]
    fn a_removed_key_inserted_again_goes_with_its_oldest_queued_insertion() {
        let (a, b) = (BlockHash(1), BlockHash(2));
        let mut m = FifoMap::new(2);
        m.insert(a, 1);
        assert_eq!(m.remove(&a), Some(1));
        m.insert(b, 2);
        m.insert(a, 3); // queued again: the FIFO holds a, b, a
        assert_eq!(m.queued(), 3);
        m.trim(); // pops the first `a`: the key goes, though re-inserted since
        assert_eq!((m.get(&a), m.get(&b)), (None, Some(2)));
        m.insert(a, 4); // absent again: queued once more (b, a, a)
        m.trim(); // pops b
        assert_eq!(m.queued(), 2);
        assert_eq!((m.get(&a), m.get(&b)), (Some(4), None));
        m.insert(BlockHash(3), 5); // (a, a, 3)
        m.trim(); // pops the older `a`: gone, though its newer cell is still queued
        assert_eq!((m.get(&a), m.get(&BlockHash(3))), (None, Some(5)));
        assert_eq!(m.queued(), 2);
    }

    #[test]
    fn grows_past_its_first_sizes_and_keeps_every_key() {
        let mut m = FifoMap::new(10_000);
        for k in 0..10_000u32 {
            m.insert(
                BlockHash(u128::from(k).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                k,
            );
        }
        m.trim();
        for k in (0..10_000u32).step_by(97) {
            let key = BlockHash(u128::from(k).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            assert_eq!(m.get(&key), Some(k));
        }
        for k in 10_000..10_100u32 {
            m.insert(BlockHash(u128::from(k) << 70), k);
        }
        m.trim();
        assert_eq!(m.queued(), 10_000);
        assert_eq!(m.get(&BlockHash(0)), None, "the oldest are forgotten");
    }
}
