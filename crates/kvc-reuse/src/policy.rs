//! Eviction policies: which evictable cached block goes first.
//!
//! The [`PrefixCache`](crate::PrefixCache) owns the tree and the leaf-first rule: a policy only
//! ever sees *evictable* blocks (cached, used by no running request, no cached child, default
//! retention priority) and picks among them. It is told when a block is cached, hit, becomes
//! evictable, stops being evictable, and leaves the cache.
//!
//! Slots are the cache's internal node indices; a slot is reused after `on_remove`.

use std::collections::{BTreeSet, VecDeque};

use ahash::AHashSet;

use crate::BlockHash;

/// What a policy learns about a block when it is cached or hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockInfo {
    /// The block's hash.
    pub hash: BlockHash,
    /// Its position in its chain (0 = first block of the prompt).
    pub depth: u32,
    /// The cache's logical clock: increases by one on every block access, so a block's
    /// descendants touched in the same request always get later stamps.
    pub stamp: u64,
    /// Blocks of the touching request that were already cached when it was looked up (its
    /// hit length); 0 for an insert that followed no lookup.
    pub request_hit_blocks: u32,
    /// Full blocks of the touching request.
    pub request_blocks: u32,
}

/// An eviction policy over the cache's evictable blocks.
pub trait EvictionPolicy: Send + std::fmt::Debug {
    /// The name used on command lines and in reports.
    fn name(&self) -> &'static str;
    /// `slot` now holds a newly cached block (not yet evictable).
    fn on_insert(&mut self, slot: u32, info: &BlockInfo);
    /// A cached block was used again (a lookup hit, or offered again by a request).
    fn on_hit(&mut self, slot: u32, info: &BlockInfo);
    /// The block became evictable.
    fn on_evictable(&mut self, slot: u32);
    /// The block stopped being evictable (in use, got a cached child, or retained).
    fn on_unevictable(&mut self, slot: u32);
    /// The block left the cache; forget the slot.
    fn on_remove(&mut self, slot: u32);
    /// Removes and returns the evictable block to evict next, if any.
    fn pop_victim(&mut self) -> Option<u32>;
}

/// The policies this crate ships, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PolicyKind {
    /// [`Lru`].
    Lru,
    /// [`S3Fifo`].
    S3Fifo,
}

impl PolicyKind {
    /// Every shipped policy.
    pub const ALL: &'static [PolicyKind] = &[PolicyKind::Lru, PolicyKind::S3Fifo];

    /// The command-line name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Lru => "lru",
            Self::S3Fifo => "s3fifo",
        }
    }

    /// The policy named `name`.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| k.name() == name)
    }

    /// A fresh policy of this kind for a cache of about `capacity_blocks` blocks.
    #[must_use]
    pub fn build(self, capacity_blocks: usize) -> Box<dyn EvictionPolicy> {
        match self {
            Self::Lru => Box::new(Lru::default()),
            Self::S3Fifo => Box::new(S3Fifo::new(capacity_blocks)),
        }
    }
}

fn grow<T: Default + Clone>(v: &mut Vec<T>, slot: u32) -> &mut T {
    let i = slot as usize;
    if v.len() <= i {
        v.resize(i + 1, T::default());
    }
    &mut v[i]
}

/// Least recently used: evicts the evictable block whose last access is oldest.
#[derive(Debug, Default)]
pub struct Lru {
    stamps: Vec<u64>,
    evictable: Vec<bool>,
    order: BTreeSet<(u64, u32)>,
}

impl EvictionPolicy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }
    fn on_insert(&mut self, slot: u32, info: &BlockInfo) {
        *grow(&mut self.stamps, slot) = info.stamp;
        *grow(&mut self.evictable, slot) = false;
    }
    fn on_hit(&mut self, slot: u32, info: &BlockInfo) {
        let i = slot as usize;
        if self.evictable[i] {
            self.order.remove(&(self.stamps[i], slot));
            self.order.insert((info.stamp, slot));
        }
        self.stamps[i] = info.stamp;
    }
    fn on_evictable(&mut self, slot: u32) {
        let i = slot as usize;
        if !self.evictable[i] {
            self.evictable[i] = true;
            self.order.insert((self.stamps[i], slot));
        }
    }
    fn on_unevictable(&mut self, slot: u32) {
        let i = slot as usize;
        if self.evictable[i] {
            self.evictable[i] = false;
            self.order.remove(&(self.stamps[i], slot));
        }
    }
    fn on_remove(&mut self, slot: u32) {
        self.on_unevictable(slot);
    }
    fn pop_victim(&mut self) -> Option<u32> {
        let (_, slot) = self.order.pop_first()?;
        self.evictable[slot as usize] = false;
        Some(slot)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Queue {
    #[default]
    Small,
    Main,
}

#[derive(Clone, Copy, Debug, Default)]
struct S3Slot {
    queue: Queue,
    /// Position in its queue (insertion order; a reinsertion takes a new one).
    seq: u64,
    /// Accesses since it entered its queue, capped at 3.
    freq: u8,
    evictable: bool,
    hash: BlockHash,
}

/// S3-FIFO (Yang et al., SOSP'23), scan resistant: new blocks enter a small FIFO (a tenth of
/// the cache); those hit again there move to the main FIFO, the rest are evicted and
/// remembered in a ghost FIFO, and a block cached again while remembered goes straight to
/// main. Main is a FIFO with lazy promotion (a hit block is reinserted instead of evicted).
/// A one-off scan therefore only ever churns the small queue.
#[derive(Debug)]
pub struct S3Fifo {
    slots: Vec<S3Slot>,
    small: BTreeSet<(u64, u32)>,
    main: BTreeSet<(u64, u32)>,
    small_len: usize,
    main_len: usize,
    seq: u64,
    ghost: AHashSet<BlockHash>,
    ghost_order: VecDeque<BlockHash>,
    ghost_cap: usize,
}

impl S3Fifo {
    /// A policy for a cache of about `capacity_blocks` blocks (sizes the ghost FIFO).
    #[must_use]
    pub fn new(capacity_blocks: usize) -> Self {
        Self {
            slots: Vec::new(),
            small: BTreeSet::new(),
            main: BTreeSet::new(),
            small_len: 0,
            main_len: 0,
            seq: 0,
            ghost: AHashSet::new(),
            ghost_order: VecDeque::new(),
            ghost_cap: capacity_blocks.max(1),
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn set_of(&mut self, q: Queue) -> &mut BTreeSet<(u64, u32)> {
        match q {
            Queue::Small => &mut self.small,
            Queue::Main => &mut self.main,
        }
    }

    fn remember(&mut self, hash: BlockHash) {
        if self.ghost.insert(hash) {
            self.ghost_order.push_back(hash);
            while self.ghost_order.len() > self.ghost_cap {
                if let Some(old) = self.ghost_order.pop_front() {
                    self.ghost.remove(&old);
                }
            }
        }
    }

    /// Moves an evictable slot to the tail of `to`.
    fn requeue(&mut self, slot: u32, to: Queue) {
        let s = self.slots[slot as usize];
        self.set_of(s.queue).remove(&(s.seq, slot));
        if s.queue != to {
            match to {
                Queue::Main => {
                    self.small_len -= 1;
                    self.main_len += 1;
                }
                Queue::Small => {
                    self.main_len -= 1;
                    self.small_len += 1;
                }
            }
        }
        let seq = self.next_seq();
        let s = &mut self.slots[slot as usize];
        s.queue = to;
        s.seq = seq;
        self.set_of(to).insert((seq, slot));
    }
}

impl EvictionPolicy for S3Fifo {
    fn name(&self) -> &'static str {
        "s3fifo"
    }
    fn on_insert(&mut self, slot: u32, info: &BlockInfo) {
        let queue = if self.ghost.remove(&info.hash) {
            self.main_len += 1;
            Queue::Main
        } else {
            self.small_len += 1;
            Queue::Small
        };
        let seq = self.next_seq();
        *grow(&mut self.slots, slot) = S3Slot {
            queue,
            seq,
            freq: 0,
            evictable: false,
            hash: info.hash,
        };
    }
    fn on_hit(&mut self, slot: u32, _: &BlockInfo) {
        let s = &mut self.slots[slot as usize];
        s.freq = (s.freq + 1).min(3);
    }
    fn on_evictable(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        if !s.evictable {
            s.evictable = true;
            let key = (s.seq, slot);
            let q = s.queue;
            self.set_of(q).insert(key);
        }
    }
    fn on_unevictable(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        if s.evictable {
            s.evictable = false;
            let key = (s.seq, slot);
            let q = s.queue;
            self.set_of(q).remove(&key);
        }
    }
    fn on_remove(&mut self, slot: u32) {
        self.on_unevictable(slot);
        match self.slots[slot as usize].queue {
            Queue::Small => self.small_len -= 1,
            Queue::Main => self.main_len -= 1,
        }
    }
    fn pop_victim(&mut self) -> Option<u32> {
        // Every pass either evicts or lowers a frequency / promotes, so this ends; the bound
        // guards against a policy bug ever spinning.
        let bound = 4 * (self.small.len() + self.main.len()) + 4;
        for _ in 0..bound {
            let total = self.small_len + self.main_len;
            let from_small =
                !self.small.is_empty() && (self.main.is_empty() || self.small_len * 10 >= total);
            if from_small {
                let &(_, slot) = self.small.first()?;
                let s = self.slots[slot as usize];
                if s.freq > 0 {
                    self.slots[slot as usize].freq = 0;
                    self.requeue(slot, Queue::Main);
                    continue;
                }
                self.small.pop_first();
                self.slots[slot as usize].evictable = false;
                self.remember(s.hash);
                return Some(slot);
            }
            let &(_, slot) = self.main.first()?;
            let s = self.slots[slot as usize];
            if s.freq > 0 {
                self.slots[slot as usize].freq = s.freq - 1;
                self.requeue(slot, Queue::Main);
                continue;
            }
            self.main.pop_first();
            self.slots[slot as usize].evictable = false;
            return Some(slot);
        }
        // Unreachable in practice: fall back to the oldest evictable block anywhere.
        let (_, slot) = self.small.pop_first().or_else(|| self.main.pop_first())?;
        self.slots[slot as usize].evictable = false;
        Some(slot)
    }
}
