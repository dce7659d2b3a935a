//! [`PrefixCache`]: the prefix tree of cached blocks keyed by chained hashes, with reference
//! tracking, lazy leaf-first eviction through a pluggable policy, retention priorities,
//! invalidation and KV events.
//!
//! The cache never allocates or frees memory. It records which [`BlockId`] holds each hash and
//! how many holders other than itself use each cached block (its use count), following the
//! ownership rule of [`kvc_core::ReuseIndex`]: every holder of a block holds one pool
//! reference; [`lookup`](PrefixCache::lookup), [`insert`](PrefixCache::insert) and
//! [`acquire`](PrefixCache::acquire) count a holder in, [`release`](PrefixCache::release)
//! counts one out; a cached block with use count 0 is *evictable*, and
//! [`evict`](PrefixCache::evict) hands back only evictable blocks, so the caller dropping the
//! cache's reference on each frees it.
//!
//! Eviction order, first to last: blocks whose retention priority is below the default
//! (lowest priority first, then least recently used); default-priority blocks in the policy's
//! order; blocks retained above the default (lowest priority first). Only *evictable* blocks
//! are candidates: cached, in use by no holder, with no cached child (leaf first).

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeSet, BinaryHeap};

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use kvc_core::{Adopted, BlockId, OfferRole, PrefixHit, Retention, ReuseError};

use crate::BlockHash;
use crate::events::{EventLog, EventRecord, KvEvent, Metrics};
use crate::policy::{Access, BlockInfo, EvictionPolicy, PolicyKind};
use crate::recency::{Entry, Placed, Recency};
use crate::table::{HashIndex, Probe};

mod ending;

pub use ending::{ConversationEnd, EndError};

/// Hashing for keys that are already well mixed (block hashes) or small dense integers (block
/// ids): a multiply-fold instead of a keyed hash, which showed up in replay profiles. Block
/// hashes come from a cryptographic or high-quality hash, so no further mixing is needed.
#[derive(Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn write_u128(&mut self, n: u128) {
        self.0 ^= (n as u64) ^ ((n >> 64) as u64);
    }
}

pub(crate) type KeyHash = BuildHasherDefault<KeyHasher>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    /// Not evictable.
    None,
    /// Evictable at the default priority: the policy orders it.
    Policy,
    /// Evictable, retained below the default priority.
    Low,
    /// Evictable, retained above the default priority.
    High,
}

/// No node (an end of a sibling list, or no child).
const NIL: u32 = u32::MAX;

/// A cached block: one 64-byte cache line, so reading a node costs one memory access.
/// Children are an intrusive list (newest first) through `first_child` and the siblings'
/// `next_sibling`/`prev_sibling`, so a node owns no allocation.
#[derive(Clone, Copy, Debug)]
#[repr(align(64))]
struct Node {
    hash: BlockHash,
    block: BlockId,
    /// The parent's slot ([`NIL`]: the first block of a prompt, or detached).
    parent: u32,
    /// The ancestor [`PrefixCache::CHAIN_AHEAD`] levels up ([`NIL`] above the first blocks):
    /// fetched while this node is evicted, so an eviction walking a chain tail first finds
    /// the nodes it reads next already on their way. A node's ancestors outlive it (leaf-first
    /// eviction, invalidation detaches whole subtrees), so this names the ancestor exactly.
    ancestor: u32,
    first_child: u32,
    next_sibling: u32,
    prev_sibling: u32,
    refs: u32,
    /// Has an entry in `PrefixCache::retained` (a retention other than the default).
    retained: bool,
    /// Still reachable by lookups; false once invalidated (kept only while in use).
    hittable: bool,
    stamp: u64,
    depth: u32,
    lane: Lane,
    /// In the policy lane of the cache's own recency order: in its ordered set rather than
    /// its queue (see [`crate::recency`]).
    in_set: bool,
    /// Whether the slot holds a node (false once removed, until reused).
    live: bool,
}

const _: () = assert!(
    std::mem::size_of::<Node>() == 64,
    "a node is one cache line"
);

impl Node {
    /// An empty slot of the node table.
    const DEAD: Self = Self {
        hash: BlockHash(0),
        block: BlockId(0),
        parent: NIL,
        ancestor: NIL,
        first_child: NIL,
        next_sibling: NIL,
        prev_sibling: NIL,
        refs: 0,
        retained: false,
        hittable: false,
        stamp: 0,
        depth: 0,
        lane: Lane::None,
        in_set: false,
        live: false,
    };

    /// A block just cached: in use by the request offering it, childless, in no lane.
    #[inline(always)]
    fn cached(
        hash: BlockHash,
        block: BlockId,
        parent: u32,
        ancestor: u32,
        stamp: u64,
        depth: u32,
    ) -> Self {
        Self {
            hash,
            block,
            parent,
            ancestor,
            first_child: NIL,
            next_sibling: NIL,
            prev_sibling: NIL,
            refs: 1,
            retained: false,
            hittable: true,
            stamp,
            depth,
            lane: Lane::None,
            in_set: false,
            live: true,
        }
    }

    #[inline]
    fn has_children(&self) -> bool {
        self.first_child != NIL
    }

    #[inline]
    fn parent(&self) -> Option<u32> {
        (self.parent != NIL).then_some(self.parent)
    }
}

/// The node table, addressed by block id. A block pool hands out small dense ids (`0..` its
/// size) and a block is cached at most once, so the node of a block whose id is below
/// [`Nodes::DIRECT`] lives at slot = its id, in one flat array of cache lines grown to the
/// largest such id seen: finding a block's node (every release, hold and insert) reads the
/// node itself and nothing else, and a block cached right after its eviction (the pool hands
/// evicted blocks out again at once) lands on the line the eviction just read. Blocks with
/// larger ids (any `u32` is a valid id) are *spilled*: their nodes sit in a second array at
/// slots from `DIRECT` up, found through a map and reused last freed first, so memory stays
/// bounded by the direct table (at most `DIRECT` nodes, 256 MiB, reached only by an id just
/// below it) plus one node per spilled block.
///
/// That is for a cache ordering its own LRU lane. A cache with a policy object keeps the
/// earlier numbering instead (`by_id` false): slots handed out densely, freed ones reused
/// last freed first, block ids mapped to slots by a [`BlockIndex`]. Policies see slots and
/// may break ties between equal keys by slot, so their eviction order (and hit rate) would
/// otherwise change with the ids the pool hands out.
#[derive(Debug, Default)]
struct Nodes {
    /// Whether slots are block ids (see above).
    by_id: bool,
    /// With `by_id`, slot `i` holds the node of block `i` while `live`; otherwise the nodes
    /// by slot.
    direct: Vec<Node>,
    /// The nodes of spilled blocks: slot `DIRECT + k` is `spill[k]`.
    spill: Vec<Node>,
    /// Freed positions of `spill`.
    spill_free: Vec<u32>,
    /// Spilled block id to slot.
    spill_slots: HashMap<BlockId, u32, KeyHash>,
    /// Slots from here up are freed through [`Self::free_slot`]: spilled ones with `by_id`,
    /// all of them without.
    free_from: u32,
    /// Without `by_id`: freed slots, and block id to slot.
    free: Vec<u32>,
    slots: BlockIndex,
    len: usize,
}

/// What an eviction needs of a node [`Nodes::take_leaf`] removed.
#[derive(Clone, Copy, Debug)]
struct Victim {
    hash: BlockHash,
    block: BlockId,
    parent: u32,
    ancestor: u32,
    stamp: u64,
    retained: bool,
}

impl Nodes {
    /// Block ids below this have their node at slot = id; the others are spilled.
    const DIRECT: usize = 1 << 22;

    /// An empty table; `by_id`: slots are block ids (see [`Nodes`]).
    fn new(by_id: bool) -> Self {
        Self {
            by_id,
            free_from: if by_id { Self::DIRECT as u32 } else { 0 },
            ..Self::default()
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// The live node at `slot`.
    #[inline]
    fn get(&self, slot: usize) -> Option<&Node> {
        match self.direct.get(slot) {
            Some(n) => Some(n),
            None => self.spill.get(slot.wrapping_sub(Self::DIRECT)),
        }
        .filter(|n| n.live)
    }

    /// The slot of `block`'s node, if the table holds one.
    #[inline]
    fn slot_of(&self, block: BlockId) -> Option<u32> {
        if !self.by_id {
            return self.slots.get(block);
        }
        self.slot_of_by_id(block)
    }

    /// [`Self::slot_of`] in a table whose slots are block ids (the caller knows it is one:
    /// the cache orders its own LRU lane), without checking.
    #[inline(always)]
    fn slot_of_by_id(&self, block: BlockId) -> Option<u32> {
        debug_assert!(self.by_id);
        let i = block.index();
        match self.direct.get(i) {
            Some(n) => n.live.then_some(i as u32),
            None if i < Self::DIRECT => None,
            None => self.spilled_slot(block),
        }
    }

    #[cold]
    #[inline(never)]
    fn spilled_slot(&self, block: BlockId) -> Option<u32> {
        self.spill_slots.get(&block).copied()
    }

    #[inline]
    fn contains(&self, block: BlockId) -> bool {
        self.slot_of(block).is_some()
    }

    /// Above every slot in use and every slot the next `more` new nodes with direct ids
    /// the table already covers, or spilled ids, can take.
    #[inline]
    fn slot_bound(&self, more: usize) -> usize {
        if !self.by_id {
            // Freed slots are reused, new ones appended.
            return self.direct.len() + more;
        }
        if self.spill.is_empty() {
            self.direct.len()
        } else {
            Self::DIRECT + self.spill.len() + more
        }
    }

    /// Grows the direct table to cover id `i` (below [`Self::DIRECT`]): to a power of two,
    /// so a pool's ids cost a few growths in all.
    #[cold]
    #[inline(never)]
    fn grow(&mut self, i: usize) {
        let len = (i + 1).next_power_of_two().clamp(64, Self::DIRECT);
        if len <= self.direct.len() {
            return;
        }
        // Grown by hand so the new table is advised to use huge pages before anything is
        // written to it (see `crate::prefetch::advise_huge_pages`).
        let mut grown = Vec::with_capacity(len);
        crate::prefetch::advise_huge_pages(&grown);
        grown.extend_from_slice(&self.direct);
        grown.resize(len, Node::DEAD);
        self.direct = grown;
    }

    /// Stores the node of a block the table holds no node for, and returns its slot.
    #[inline(always)]
    fn insert(&mut self, node: Node) -> u32 {
        if !self.by_id {
            return self.insert_dense(node);
        }
        let i = node.block.index();
        self.len += 1;
        if let Some(n) = self.direct.get_mut(i) {
            debug_assert!(!n.live, "block {i} cached twice");
            *n = node;
            return i as u32;
        }
        self.insert_cold(node)
    }

    /// [`Self::insert`] of [`Node::cached`] in a table whose slots are block ids (the caller
    /// knows it is one), its fields written in place in the direct table (no node built
    /// aside and copied).
    #[inline(always)]
    fn insert_cached_by_id(
        &mut self,
        hash: BlockHash,
        block: BlockId,
        parent: u32,
        ancestor: u32,
        stamp: u64,
        depth: u32,
    ) -> u32 {
        debug_assert!(self.by_id);
        let i = block.index();
        if let Some(n) = self.direct.get_mut(i) {
            debug_assert!(!n.live, "block {i} cached twice");
            self.len += 1;
            n.hash = hash;
            n.block = block;
            n.parent = parent;
            n.ancestor = ancestor;
            n.first_child = NIL;
            n.next_sibling = NIL;
            n.prev_sibling = NIL;
            n.refs = 1;
            n.retained = false;
            n.hittable = true;
            n.stamp = stamp;
            n.depth = depth;
            n.lane = Lane::None;
            n.in_set = false;
            n.live = true;
            return i as u32;
        }
        self.insert(Node::cached(hash, block, parent, ancestor, stamp, depth))
    }

    /// [`Self::insert`] without `by_id`: the last freed slot, or a new one.
    fn insert_dense(&mut self, node: Node) -> u32 {
        self.len += 1;
        let slot = match self.free.pop() {
            Some(slot) => {
                self.direct[slot as usize] = node;
                slot
            }
            None => {
                if self.direct.len() == self.direct.capacity() {
                    // Grown by hand so the new table is advised to use huge pages before
                    // anything is written to it (see `crate::prefetch::advise_huge_pages`).
                    let mut grown = Vec::with_capacity((self.direct.capacity() * 2).max(64));
                    crate::prefetch::advise_huge_pages(&grown);
                    grown.extend_from_slice(&self.direct);
                    self.direct = grown;
                }
                self.direct.push(node);
                (self.direct.len() - 1) as u32
            }
        };
        self.slots.insert(node.block, slot);
        slot
    }

    /// [`Self::insert`] of a spilled block, or of a direct one past the table.
    #[cold]
    #[inline(never)]
    fn insert_cold(&mut self, node: Node) -> u32 {
        let i = node.block.index();
        if i < Self::DIRECT {
            self.grow(i);
            self.direct[i] = node;
            return i as u32;
        }
        let k = match self.spill_free.pop() {
            Some(k) => {
                self.spill[k as usize] = node;
                k as usize
            }
            None => {
                self.spill.push(node);
                self.spill.len() - 1
            }
        };
        // At most one node per id at or above `DIRECT`, so the slot stays below `NIL`.
        let slot = (Self::DIRECT + k) as u32;
        self.spill_slots.insert(node.block, slot);
        slot
    }

    /// Frees `slot` of `block` once its node is dead (a spilled one, or any slot without
    /// `by_id`).
    #[cold]
    #[inline(never)]
    fn free_slot(&mut self, slot: u32, block: BlockId) {
        if !self.by_id {
            self.free.push(slot);
            self.slots.remove(block);
            return;
        }
        self.spill_free.push(slot - Self::DIRECT as u32);
        self.spill_slots.remove(&block);
    }

    fn remove(&mut self, slot: usize) -> Node {
        let n = &mut self[slot];
        let node = *n;
        debug_assert!(node.live, "slot {slot} removed twice");
        n.live = false;
        if slot as u32 >= self.free_from {
            self.free_slot(slot as u32, node.block);
        }
        self.len -= 1;
        node
    }

    fn iter(&self) -> impl Iterator<Item = (usize, &Node)> {
        self.direct
            .iter()
            .enumerate()
            .chain(
                self.spill
                    .iter()
                    .enumerate()
                    .map(|(k, n)| (Self::DIRECT + k, n)),
            )
            .filter(|(_, n)| n.live)
    }

    /// Hints the CPU to fetch the node at `slot` (see [`crate::prefetch`]; spilled nodes
    /// are not fetched ahead).
    #[inline(always)]
    fn prefetch(&self, slot: usize) {
        crate::prefetch::prefetch_at(&self.direct, slot);
    }

    /// Hints the CPU to fetch the node of `block`: with `by_id` its slot is its id, so no
    /// look-up comes before the fetch.
    #[inline(always)]
    fn prefetch_block(&self, block: BlockId) {
        let slot = if self.by_id {
            Some(block.0)
        } else {
            self.slots.get(block)
        };
        if let Some(slot) = slot {
            self.prefetch(slot as usize);
        }
    }

    /// Makes `child` the first child of `parent`.
    fn add_child(&mut self, parent: u32, child: u32) {
        let first = self[parent as usize].first_child;
        if first != NIL {
            self[first as usize].prev_sibling = child;
        }
        let c = &mut self[child as usize];
        c.next_sibling = first;
        c.prev_sibling = NIL;
        self[parent as usize].first_child = child;
    }

    /// Takes `child` out of the children of `parent`.
    fn remove_child(&mut self, parent: u32, child: u32) {
        let Node {
            prev_sibling: prev,
            next_sibling: next,
            ..
        } = self[child as usize];
        if prev == NIL {
            self[parent as usize].first_child = next;
        } else {
            self[prev as usize].next_sibling = next;
        }
        if next != NIL {
            self[next as usize].prev_sibling = prev;
        }
        let c = &mut self[child as usize];
        c.next_sibling = NIL;
        c.prev_sibling = NIL;
    }

    /// Removes the node at `slot` if it is an evictable leaf in `lane` (hittable, in use by
    /// no holder, childless), taking it out of its parent's children; `None` (nothing changed)
    /// otherwise. One look-up of the slot for the check, the removal and the fields an
    /// eviction needs, where separate calls would each index the table again.
    #[inline]
    fn take_leaf(&mut self, slot: u32, lane: Lane) -> Option<Victim> {
        let node = self.get(slot as usize)?;
        if !(node.lane == lane && node.hittable && node.refs == 0 && !node.has_children()) {
            return None;
        }
        Some(self.take_evictable_leaf(slot))
    }

    /// [`Self::take_leaf`] for a node the caller has just checked is an evictable leaf (a
    /// chain's parent the eviction named next, whose state it read a moment before).
    #[inline(always)]
    fn take_evictable_leaf(&mut self, slot: u32) -> Victim {
        let node = &mut self[slot as usize];
        debug_assert!(
            node.live && node.hittable && node.refs == 0 && !node.has_children(),
            "slot {slot} is not an evictable leaf"
        );
        node.lane = Lane::None;
        node.live = false;
        let (prev, next) = (node.prev_sibling, node.next_sibling);
        node.prev_sibling = NIL;
        node.next_sibling = NIL;
        let victim = Victim {
            hash: node.hash,
            block: node.block,
            parent: node.parent,
            ancestor: node.ancestor,
            stamp: node.stamp,
            retained: node.retained,
        };
        if slot >= self.free_from {
            self.free_slot(slot, victim.block);
        }
        self.len -= 1;
        if victim.parent != NIL {
            if next != NIL {
                self[next as usize].prev_sibling = prev;
            }
            if prev == NIL {
                self[victim.parent as usize].first_child = next;
            } else {
                self[prev as usize].next_sibling = next;
            }
        }
        victim
    }

    /// Appends the children of `parent`, oldest first, to `out`, and forgets them.
    fn drain_children(&mut self, parent: u32, out: &mut Vec<u32>) {
        let from = out.len();
        let mut c = std::mem::replace(&mut self[parent as usize].first_child, NIL);
        while c != NIL {
            out.push(c);
            c = self[c as usize].next_sibling;
        }
        out[from..].reverse();
    }

    /// The spilled node at `slot` (out of line: direct slots are the common case).
    #[cold]
    #[inline(never)]
    fn spilled(&self, slot: usize) -> &Node {
        &self.spill[slot.wrapping_sub(Self::DIRECT)]
    }

    #[cold]
    #[inline(never)]
    fn spilled_mut(&mut self, slot: usize) -> &mut Node {
        &mut self.spill[slot.wrapping_sub(Self::DIRECT)]
    }
}

impl std::ops::Index<usize> for Nodes {
    type Output = Node;
    #[inline(always)]
    fn index(&self, slot: usize) -> &Node {
        match self.direct.get(slot) {
            Some(n) => n,
            None => self.spilled(slot),
        }
    }
}

impl std::ops::IndexMut<usize> for Nodes {
    #[inline(always)]
    fn index_mut(&mut self, slot: usize) -> &mut Node {
        // Checked apart from the access, so the borrow of `direct` ends before the fallback.
        if slot < self.direct.len() {
            &mut self.direct[slot]
        } else {
            self.spilled_mut(slot)
        }
    }
}

/// Retention state of the few blocks with a caller-set retention (kept apart so the common
/// node stays one cache line).
#[derive(Debug)]
struct Retained {
    retention: Retention,
    generation: u64,
    /// The key the block has in the low or high lane: (priority, stamp).
    lane_key: (u8, u64),
    /// Set by [`PrefixCache::end_conversation`]: the retention lasts until the block is used
    /// again, and its next use restores the default.
    until_used: bool,
}

/// Block id to node slot: a dense table for the small ids a block pool hands out, a map for
/// any others.
#[derive(Debug, Default)]
struct BlockIndex {
    dense: Vec<u32>,
    sparse: HashMap<BlockId, u32, KeyHash>,
}

impl BlockIndex {
    /// Ids below this use the dense table (at most 16 MiB).
    const DENSE_LIMIT: usize = 1 << 22;
    const NONE: u32 = u32::MAX;

    fn get(&self, block: BlockId) -> Option<u32> {
        let i = block.index();
        match self.dense.get(i) {
            // The dense table never reaches past `DENSE_LIMIT`.
            Some(&s) => (s != Self::NONE).then_some(s),
            None if i < Self::DENSE_LIMIT => None,
            None => self.sparse.get(&block).copied(),
        }
    }

    fn insert(&mut self, block: BlockId, slot: u32) {
        let i = block.index();
        if let Some(entry) = self.dense.get_mut(i) {
            // Only ids below `DENSE_LIMIT` are ever given an entry.
            *entry = slot;
        } else if i < Self::DENSE_LIMIT {
            self.dense.resize((i + 1).next_power_of_two(), Self::NONE);
            self.dense[i] = slot;
        } else {
            self.sparse.insert(block, slot);
        }
    }

    fn remove(&mut self, block: BlockId) {
        let i = block.index();
        match self.dense.get_mut(i) {
            Some(s) => *s = Self::NONE,
            None if i < Self::DENSE_LIMIT => {}
            None => {
                self.sparse.remove(&block);
            }
        }
    }
}

/// The hash of the hittable node at a slot, if any: confirms a hash-index entry (see
/// [`crate::table`]).
#[inline]
fn hittable_hash(nodes: &Nodes) -> impl Fn(u32) -> Option<BlockHash> + '_ {
    |slot| {
        nodes
            .get(slot as usize)
            .filter(|n| n.hittable)
            .map(|n| n.hash)
    }
}

/// Whether a recency-queue entry is live: its node is queued in the policy lane under the
/// entry's stamp (see [`crate::recency`]).
fn queued(nodes: &Nodes) -> impl Fn(Entry) -> bool + '_ {
    |e| {
        nodes
            .get(e.slot as usize)
            .is_some_and(|n| n.lane == Lane::Policy && !n.in_set && n.stamp == e.stamp)
    }
}

/// A prefix cache over chained block hashes.
///
/// Eviction order, first to last: invalidated blocks; blocks whose retention priority is
/// below the default (lowest priority first, then least recently used); default-priority
/// blocks in the policy's order; blocks retained above the default (lowest priority first).
/// Only *evictable* blocks are candidates: cached, in use by no holder, with no cached child
/// (leaf first). Ownership follows the rule of [`kvc_core::ReuseIndex`].
///
/// ```
/// use kvc_reuse::{BlockHasher, BlockId, HashExtra, PolicyKind, PrefixCache, Xxh3Hasher};
///
/// let mut cache = PrefixCache::new(4, PolicyKind::Lru);
/// let hasher = Xxh3Hasher;
/// let root = hasher.root(&HashExtra::new("model", 1));
/// let prompt: Vec<u32> = (0..10).collect();
/// let mut hashes = Vec::new();
/// hasher.hash_blocks(root, &prompt, 4, &mut hashes); // two full blocks
///
/// let hit = cache.lookup(&hashes, prompt.len(), 0);
/// assert_eq!(hit.tokens, 0);
/// let mut newly = Vec::new();
/// cache.insert(&hashes, &[BlockId(7), BlockId(8)], 0, &mut newly)?;
/// assert_eq!(newly, [BlockId(7), BlockId(8)]); // in use by the request that offered them
///
/// let hit = cache.lookup(&hashes, prompt.len(), 1);
/// assert_eq!(hit.blocks, [BlockId(7), BlockId(8)]);
/// cache.release(&hit.blocks)?;
/// assert_eq!(cache.evictable_blocks(), 0);
/// cache.release(&[BlockId(7), BlockId(8)])?; // the offering request is done too
/// assert_eq!(cache.evictable_blocks(), 2);
///
/// let mut freed = Vec::new();
/// cache.evict(1, 2, &mut freed);
/// assert_eq!(freed, [BlockId(8)]); // leaf first
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct PrefixCache {
    block_size: u32,
    nodes: Nodes,
    by_hash: HashIndex,
    retained: HashMap<u32, Retained, KeyHash>,
    policy: Box<dyn EvictionPolicy>,
    /// The cache's own LRU order, in place of `policy` when that is plain LRU
    /// ([`EvictionPolicy::is_plain_lru`]).
    recency: Option<Recency>,
    low: BTreeSet<(u8, u64, u32)>,
    high: BTreeSet<(u8, u64, u32)>,
    expiries: BinaryHeap<Reverse<(u64, u32, u64)>>,
    retention_gen: u64,
    orphans: Vec<BlockId>,
    /// Scratch for [`Self::prefetch_victims`].
    peeked: Vec<u32>,
    /// Scratch for [`Self::lookup`]: the slots of the hit.
    hit_slots: Vec<u32>,
    /// Scratch for [`Self::lookup_own_order`]: the blocks of the hit.
    hit_blocks: Vec<BlockId>,
    /// Hittable nodes with use count 0 (evictable, possibly after their unused descendants).
    unused: usize,
    clock: u64,
    now_ms: u64,
    events: EventLog,
    metrics: Metrics,
}

impl PrefixCache {
    /// An empty cache of `block_size`-token blocks evicting with a shipped policy. A
    /// `block_size` of 0 is taken as 1 (see [`block_size`](Self::block_size)).
    ///
    /// The cache sees hashes, not tokens, so it cannot check how they were made: hash
    /// prompts with [`BlockHasher::hash_blocks`](crate::BlockHasher::hash_blocks) at this
    /// cache's [`block_size`](Self::block_size), or hits will claim a block size of tokens
    /// for blocks holding another.
    ///
    /// The policy is built without knowing how many blocks the cache will hold. Policies that
    /// remember evicted blocks size that memory by it: `s3fifo` then keeps almost no ghost
    /// FIFO, and `adaptive` sizes its shadow caches for 65,536 blocks, both losing hits
    /// (measured on the conversation trace at 3M tokens of 512-token blocks: `s3fifo`
    /// 13.39% → 9.97%; on the synthetic trace `adaptive` 33.88% → 33.43%). When the cache's
    /// size is known, as it is for a pool of device blocks, use
    /// [`with_capacity`](Self::with_capacity).
    #[must_use]
    pub fn new(block_size: u32, policy: PolicyKind) -> Self {
        Self::with_policy(block_size, policy.build(0))
    }

    /// [`new`](Self::new) with the policy sized for a cache of about `capacity_blocks`
    /// blocks (the blocks it may hold: the pool's, or the part of it given to reuse).
    ///
    /// ```
    /// use kvc_reuse::{PolicyKind, PrefixCache};
    ///
    /// let cache = PrefixCache::with_capacity(16, PolicyKind::Adaptive, 187_500);
    /// assert_eq!(cache.policy_name(), "adaptive");
    /// ```
    #[must_use]
    pub fn with_capacity(block_size: u32, policy: PolicyKind, capacity_blocks: usize) -> Self {
        Self::with_policy(block_size, policy.build(capacity_blocks))
    }

    /// An empty cache with any policy (`block_size` as in [`new`](Self::new)). A policy
    /// that is plain LRU
    /// ([`EvictionPolicy::is_plain_lru`], as [`Lru`](crate::Lru) is) is ordered by the cache
    /// itself, in the same order, without calls to the policy object.
    #[must_use]
    pub fn with_policy(block_size: u32, policy: Box<dyn EvictionPolicy>) -> Self {
        Self {
            block_size: block_size.max(1),
            nodes: Nodes::new(policy.is_plain_lru()),
            by_hash: HashIndex::default(),
            retained: HashMap::default(),
            recency: policy.is_plain_lru().then(Recency::default),
            policy,
            low: BTreeSet::new(),
            high: BTreeSet::new(),
            expiries: BinaryHeap::new(),
            retention_gen: 0,
            orphans: Vec::new(),
            peeked: Vec::new(),
            hit_slots: Vec::new(),
            hit_blocks: Vec::new(),
            unused: 0,
            clock: 0,
            now_ms: 0,
            events: EventLog::default(),
            metrics: Metrics::default(),
        }
    }

    /// Tokens per block (at least 1). Hash prompts at this size.
    #[must_use]
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The eviction policy's name.
    #[must_use]
    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }

    /// Blocks the cache holds a reference on: hittable ones, invalidated ones still in use,
    /// and invalidated ones waiting to be handed back by [`evict`](Self::evict).
    #[must_use]
    pub fn len(&self) -> usize {
        self.nodes.len() + self.orphans.len()
    }

    /// Whether the cache holds no block.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Blocks a lookup can hit.
    #[must_use]
    pub fn hittable_blocks(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether a lookup can hit `hash` (given its whole chain is cached).
    #[must_use]
    pub fn contains(&self, hash: BlockHash) -> bool {
        self.find(hash).is_some()
    }

    /// The counters so far.
    #[must_use]
    pub fn metrics(&self) -> Metrics {
        self.metrics
    }

    /// Starts recording [`KvEvent`]s for [`drain_events`](Self::drain_events). Events before
    /// this call are not recorded.
    pub fn subscribe(&mut self) {
        self.events.enable();
    }

    /// Moves the recorded events, oldest first, to `out`.
    pub fn drain_events(&mut self, out: &mut Vec<EventRecord>) {
        self.events.drain(out);
    }

    /// The slot of the hittable node cached under `hash`.
    #[inline]
    fn find(&self, hash: BlockHash) -> Option<u32> {
        let nodes = &self.nodes;
        self.by_hash.get(hash, hittable_hash(nodes))
    }

    /// Drops the hash index's stale entries (see [`crate::table`]), making room for `more`
    /// inserts of slots below `slot_bound`: one pass over the nodes, `count` of them
    /// hittable.
    fn rebuild_index(&mut self, more: usize, slot_bound: usize, count: usize) {
        // The direct table in one tight pass, the few spilled nodes after it.
        let live = |(s, n): (usize, &Node)| (n.live && n.hittable).then_some((n.hash, s as u32));
        let direct = self.nodes.direct.iter().enumerate().filter_map(live);
        self.by_hash.rebuild(direct, count, more, slot_bound);
        let spilled = self.nodes.spill.iter().enumerate();
        for (hash, slot) in spilled.filter_map(|(k, n)| live((Nodes::DIRECT + k, n))) {
            self.by_hash.insert(hash, slot);
        }
        debug_assert_eq!(self.by_hash.len(), count, "one entry per hittable node");
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Cached blocks no holder uses: how many blocks [`evict`](Self::evict) can hand back now
    /// (hittable ones with use count 0, and invalidated ones waiting to be handed back).
    /// Constant time.
    #[must_use]
    pub fn evictable_blocks(&self) -> usize {
        self.unused + self.orphans.len()
    }

    /// Cached blocks at least one holder uses (hittable or invalidated).
    #[must_use]
    pub fn in_use_blocks(&self) -> usize {
        self.nodes.len() - self.unused
    }

    /// Whether the cache tracks `block`: cached, or invalidated but still in use. Releasing or
    /// acquiring any other block is a no-op (it is private to its holder).
    #[must_use]
    pub fn is_cached(&self, block: BlockId) -> bool {
        self.nodes.contains(block)
    }

    /// The hash `block` is cached under, while lookups can hit it (`None` for a block the
    /// cache does not track or one invalidated and waiting to be handed back).
    #[must_use]
    pub fn block_hash(&self, block: BlockId) -> Option<BlockHash> {
        let node = self.nodes.get(self.nodes.slot_of(block)? as usize)?;
        node.hittable.then_some(node.hash)
    }

    /// The retention priority of a hittable cached block at the cache's clock (the
    /// default unless [`set_retention`](Self::set_retention) gave it another that has not
    /// expired), or `None` where [`block_hash`](Self::block_hash) is `None`.
    #[must_use]
    pub fn block_priority(&self, block: BlockId) -> Option<u8> {
        let slot = self.nodes.slot_of(block)?;
        let node = self.nodes.get(slot as usize)?;
        node.hittable.then(|| self.priority(slot))
    }

    /// The retention of a hittable cached block at the cache's clock: the one
    /// [`set_retention`](Self::set_retention) gave it while it is in force (with its expiry),
    /// [`Retention::DEFAULT`] otherwise; `None` where [`block_hash`](Self::block_hash) is
    /// `None`. What a tier below device memory needs to keep ranking the block the same way.
    #[must_use]
    pub fn block_retention(&self, block: BlockId) -> Option<Retention> {
        let slot = self.nodes.slot_of(block)?;
        let node = self.nodes.get(slot as usize)?;
        node.hittable.then(|| self.retention(slot))
    }

    /// The use count of a tracked block (`None` if the cache does not track it).
    #[must_use]
    pub fn use_count(&self, block: BlockId) -> Option<u32> {
        self.nodes
            .slot_of(block)
            .map(|slot| self.nodes[slot as usize].refs)
    }

    /// One more holder of the node at `slot`: false (nothing changed) if its count is full.
    #[inline(always)]
    fn hold(&mut self, slot: u32) -> bool {
        let node = &mut self.nodes[slot as usize];
        let Some(refs) = node.refs.checked_add(1) else {
            return false;
        };
        node.refs = refs;
        if refs == 1 && node.hittable {
            self.unused -= 1;
            self.refresh(slot);
            if self.nodes[slot as usize].retained {
                self.restore_if_ended(slot);
            }
        }
        true
    }

    /// The longest cached prefix of a prompt of `prompt_tokens` tokens whose full blocks hash
    /// to `hashes`. Never covers the last prompt token. Each hit block's use count goes up by
    /// one until [`release`](Self::release)d: the caller takes one pool reference on each for
    /// its request.
    pub fn lookup(&mut self, hashes: &[BlockHash], prompt_tokens: usize, now_ms: u64) -> PrefixHit {
        self.now_ms = now_ms;
        self.metrics.queries = self.metrics.queries.saturating_add(1);
        self.metrics.query_tokens = self
            .metrics
            .query_tokens
            .saturating_add(prompt_tokens as u64);
        let usable = (prompt_tokens.saturating_sub(1) / self.block_size as usize).min(hashes.len());
        if self.recency.is_some() {
            return self.lookup_own_order(&hashes[..usable]);
        }
        let mut slots = std::mem::take(&mut self.hit_slots);
        slots.clear();
        for h in &hashes[..usable] {
            match self.find(*h) {
                // A block with `u32::MAX` holders ends the hit (a shorter hit is always safe).
                Some(slot) if self.nodes[slot as usize].refs < u32::MAX => slots.push(slot),
                _ => break,
            }
        }
        let hit = slots.len() as u32;
        let mut blocks = Vec::with_capacity(slots.len());
        for &slot in &slots {
            let stamp = self.tick();
            self.set_stamp(slot, stamp);
            let held = self.hold(slot);
            debug_assert!(held, "use count checked above");
            let node = &self.nodes[slot as usize];
            blocks.push(node.block);
            let (hash, depth) = (node.hash, node.depth);
            self.refresh(slot);
            if self.recency.is_none() {
                let info = BlockInfo {
                    hash,
                    depth,
                    stamp,
                    request_hit_blocks: hit,
                    request_blocks: hashes.len() as u32,
                    block_size: self.block_size,
                    access: Access::Lookup,
                };
                self.policy.on_hit(slot, &info);
            }
        }
        let tokens = u64::from(hit) * u64::from(self.block_size);
        self.metrics.hit_blocks = self.metrics.hit_blocks.saturating_add(u64::from(hit));
        self.metrics.hit_tokens = self.metrics.hit_tokens.saturating_add(tokens);
        self.hit_slots = slots;
        PrefixHit { blocks, tokens }
    }

    /// [`Self::lookup`] of the usable `hashes` in the cache's own LRU order, in one pass:
    /// no policy is told the hit's length, so each block is held as soon as it is found
    /// (holding changes nothing a later find reads: the index and which nodes are hittable).
    #[inline]
    fn lookup_own_order(&mut self, hashes: &[BlockHash]) -> PrefixHit {
        let mut blocks = std::mem::take(&mut self.hit_blocks);
        blocks.clear();
        for h in hashes {
            match self.find(*h) {
                // A block with `u32::MAX` holders ends the hit (a shorter hit is always safe).
                Some(slot) if self.nodes[slot as usize].refs < u32::MAX => {
                    let stamp = self.tick();
                    self.set_stamp(slot, stamp);
                    let held = self.hold(slot);
                    debug_assert!(held, "use count checked above");
                    blocks.push(self.nodes[slot as usize].block);
                    self.refresh(slot);
                }
                _ => break,
            }
        }
        let hit = blocks.len() as u64;
        let tokens = hit * u64::from(self.block_size);
        self.metrics.hit_blocks = self.metrics.hit_blocks.saturating_add(hit);
        self.metrics.hit_tokens = self.metrics.hit_tokens.saturating_add(tokens);
        let hit = PrefixHit {
            blocks: blocks.clone(),
            tokens,
        };
        self.hit_blocks = blocks;
        hit
    }

    /// Caches the full blocks of a request: `blocks[i]` holds the tokens hashed by
    /// `hashes[i]`, which must be a whole chain from the first block. The blocks are in use by
    /// the offering request (see [`kvc_core::ReuseIndex::insert`]):
    ///
    /// - a block newly cached starts with use count 1 and is appended to `newly_cached` (the
    ///   caller takes one pool reference on it for the cache);
    /// - a hash already cached under the same block changes nothing but its recency;
    /// - a hash already cached under another block, or a block invalidated while in use, ends
    ///   the insert there (`Ok`): that block and the ones after it stay private.
    ///
    /// This is the request's prompt to the eviction policy ([`OfferRole::Prompt`]); see
    /// [`insert_as`](Self::insert_as) for the other blocks of a request.
    ///
    /// # Errors
    /// [`ReuseError::LengthMismatch`] (nothing cached); [`ReuseError::BlockAlreadyCached`]
    /// when a block caches another hash (blocks before it were processed).
    pub fn insert(
        &mut self,
        hashes: &[BlockHash],
        blocks: &[BlockId],
        now_ms: u64,
        newly_cached: &mut Vec<BlockId>,
    ) -> Result<(), ReuseError> {
        self.insert_as(hashes, blocks, OfferRole::Prompt, now_ms, newly_cached)
    }

    /// [`insert`](Self::insert), saying what the insert is to the request making it
    /// (see [`kvc_core::ReuseIndex::offer`]). With [`OfferRole::Prompt`] it is `insert`: the
    /// policy is told each block as part of the request's prompt ([`Access::Insert`], one
    /// walk per request). With [`OfferRole::More`] the first `offered_before` blocks, which
    /// the request offered before, are passed over as no access at all (no recency, no
    /// policy call), and the others are cached or found as [`Access::More`], outside any
    /// prompt's walk. So a request offered in parts (its prompt, then its reply) is one
    /// request to a policy that learns from requests, not two.
    ///
    /// # Errors
    /// As [`insert`](Self::insert).
    pub fn insert_as(
        &mut self,
        hashes: &[BlockHash],
        blocks: &[BlockId],
        role: OfferRole,
        now_ms: u64,
        newly_cached: &mut Vec<BlockId>,
    ) -> Result<(), ReuseError> {
        // Monomorphised without the adopting branch: the engine-like replay's hot loop.
        self.insert_inner::<false>(hashes, blocks, role, now_ms, newly_cached, &mut Vec::new())
    }

    /// [`insert_as`](Self::insert_as) for a caller that can put another block in the
    /// request's table (see [`kvc_core::ReuseIndex::offer_adopting`]): a hash already cached
    /// under another block (two requests computed the same prefix at once) does not end the
    /// insert. The request is counted as a user of the cached copy (its use count goes up by
    /// one, as for a hit), the pair is appended to `adopted`, and the blocks after it are
    /// cached after the cached copy. For each [`Adopted`] entry take one pool reference on
    /// `cached` for the request, put it in the request's table at `index`, drop the
    /// request's reference on `own`; release `cached`, not `own`, when the request ends.
    ///
    /// ```
    /// use kvc_reuse::{BlockHasher, BlockId, HashExtra, OfferRole, PolicyKind, PrefixCache, Xxh3Hasher};
    ///
    /// let mut cache = PrefixCache::new(4, PolicyKind::Lru);
    /// let prompt: Vec<u32> = (0..12).collect();
    /// let mut hashes = Vec::new();
    /// Xxh3Hasher.hash_blocks(Xxh3Hasher.root(&HashExtra::new("m", 1)), &prompt, 4, &mut hashes);
    /// let (mut newly, mut adopted) = (Vec::new(), Vec::new());
    /// // Two requests computed the first two blocks at once; the first cached them.
    /// cache.insert(&hashes[..2], &[BlockId(0), BlockId(1)], 0, &mut newly)?;
    /// newly.clear();
    /// // The second offers its copies and its third block.
    /// let second = [BlockId(5), BlockId(6), BlockId(7)];
    /// cache.insert_adopting(&hashes, &second, OfferRole::Prompt, 1, &mut newly, &mut adopted)?;
    /// assert_eq!(newly, [BlockId(7)]);
    /// assert_eq!(adopted.iter().map(|a| (a.own, a.cached)).collect::<Vec<_>>(),
    ///            [(BlockId(5), BlockId(0)), (BlockId(6), BlockId(1))]);
    /// // The second request's table is now [0, 1, 7]; it releases that.
    /// cache.release(&[BlockId(0), BlockId(1), BlockId(7)])?;
    /// # Ok::<(), kvc_reuse::ReuseError>(())
    /// ```
    ///
    /// # Errors
    /// As [`insert`](Self::insert); entries appended before an error stand.
    pub fn insert_adopting(
        &mut self,
        hashes: &[BlockHash],
        blocks: &[BlockId],
        role: OfferRole,
        now_ms: u64,
        newly_cached: &mut Vec<BlockId>,
        adopted: &mut Vec<Adopted>,
    ) -> Result<(), ReuseError> {
        self.insert_inner::<true>(hashes, blocks, role, now_ms, newly_cached, adopted)
    }

    /// [`insert_as`](Self::insert_as); with `ADOPT`, adopting cached copies into `adopted`.
    fn insert_inner<const ADOPT: bool>(
        &mut self,
        hashes: &[BlockHash],
        blocks: &[BlockId],
        role: OfferRole,
        now_ms: u64,
        newly_cached: &mut Vec<BlockId>,
        adopted: &mut Vec<Adopted>,
    ) -> Result<(), ReuseError> {
        let (access, offered_before) = match role {
            OfferRole::Prompt => (Access::Insert, 0),
            OfferRole::More { offered_before } => (Access::More, offered_before),
        };
        if hashes.len() != blocks.len() {
            return Err(ReuseError::LengthMismatch {
                full_blocks: hashes.len(),
                blocks: blocks.len(),
            });
        }
        self.now_ms = now_ms;
        let slot_bound = self.nodes.slot_bound(hashes.len());
        if self.by_hash.wants_rebuild(hashes.len(), slot_bound) {
            self.rebuild_index(hashes.len(), slot_bound, self.by_hash.len());
        }
        // The blocks offered before are no access. When the last of them is still cached as
        // the request's own block under its hash, every block before it is cached too (a
        // cached block's ancestors are), as the request's own or as a copy it adopted, and
        // the walk starts after it: an offer per prefill chunk walks each chunk once, not
        // every earlier chunk again.
        let skip = self.offered_chain_end(hashes, blocks, offered_before);
        let start = if skip.is_some() { offered_before } else { 0 };
        for &h in hashes.iter().skip(start).take(Self::AHEAD) {
            self.by_hash.prefetch(h);
        }
        // The blocks already cached, for the policy's `BlockInfo` (the cache's own LRU order
        // needs no count, so it skips this pass over the index).
        // Only a prompt's walk reports it: blocks offered as more of a request would make
        // this pass walk everything the request offered before, every time.
        let existing = if self.recency.is_some() || access != Access::Insert {
            0
        } else {
            hashes
                .iter()
                .zip(blocks)
                .enumerate()
                .take_while(|&(i, (h, &b))| {
                    if let Some(&next) = hashes.get(i + Self::AHEAD) {
                        self.by_hash.prefetch(next);
                    }
                    self.find(*h)
                        .is_some_and(|s| self.nodes[s as usize].block == b)
                })
                .count() as u32
        };
        let request_blocks = hashes.len() as u32;
        let block_size = self.block_size;
        // What a policy object is told of block `depth` of this insert (hit or new).
        let info = |hash, depth: usize, stamp| BlockInfo {
            hash,
            depth: depth as u32,
            stamp,
            request_hit_blocks: existing,
            request_blocks,
            block_size,
            access,
        };
        let mut parent: Option<u32> = None;
        // Whether `parent` was cached by this call: in use by the offering request, so never
        // evictable here, and adding a child leaves it out of every lane (no refresh needed).
        let mut parent_new = false;
        // The slots of the last `CHAIN_AHEAD` blocks of the chain, by depth modulo its size.
        let mut recent = [NIL; Self::CHAIN_AHEAD];
        let mut stored: Vec<BlockHash> = Vec::new();
        let mut stored_parent = None;
        let mut result = Ok(());
        let mut inserted = 0u64;
        // Blocks after a new one are new too (see `Self::insert_new_run`), so once one is
        // cached the rest go through that run's loop, which hands back to this one at a block
        // that is not new; it needs the cache's own LRU order and no events, whose per-block
        // work it leaves out.
        let runs = self.recency.is_some() && !self.events.enabled();
        let mut next = start;
        if let Some(last) = skip {
            parent = Some(last);
            let mut up = last;
            for depth in (0..offered_before).rev().take(Self::CHAIN_AHEAD) {
                recent[depth % Self::CHAIN_AHEAD] = up;
                up = self.nodes[up as usize].parent;
                if up == NIL {
                    break;
                }
            }
        }
        while let (Some(&hash), Some(&block)) = (hashes.get(next), blocks.get(next)) {
            let i = next;
            next += 1;
            if i >= existing as usize
                && let Some(&next) = hashes.get(i + Self::AHEAD)
            {
                self.by_hash.prefetch(next);
            }
            let probe = self
                .by_hash
                .get_or_vacancy(hash, hittable_hash(&self.nodes));
            if let Probe::Found(slot) = probe {
                if self.nodes[slot as usize].block != block {
                    // Computed twice: the cached copy stays. Without `adopted` (or when the
                    // request's block is tracked, or the copy cannot take another holder) the
                    // request's block and the ones after it stay private.
                    if !ADOPT || self.nodes.slot_of(block).is_some() || !self.hold(slot) {
                        break;
                    }
                    adopted.push(Adopted {
                        index: i,
                        own: block,
                        cached: self.nodes[slot as usize].block,
                    });
                    self.metrics.adopted_blocks = self.metrics.adopted_blocks.saturating_add(1);
                    if i >= offered_before {
                        let stamp = self.tick();
                        self.set_stamp(slot, stamp);
                        if self.recency.is_none() {
                            self.policy.on_hit(slot, &info(hash, i, stamp));
                        }
                    }
                    self.refresh(slot);
                    parent = Some(slot);
                    parent_new = false;
                    recent[i % Self::CHAIN_AHEAD] = slot;
                    continue;
                }
                if i < offered_before {
                    // Offered before by the same request, which still holds it: no access.
                    parent = Some(slot);
                    parent_new = false;
                    recent[i % Self::CHAIN_AHEAD] = slot;
                    continue;
                }
                let stamp = self.tick();
                self.set_stamp(slot, stamp);
                if self.recency.is_none() {
                    self.policy.on_hit(slot, &info(hash, i, stamp));
                }
                if self.nodes[slot as usize].retained {
                    self.restore_if_ended(slot);
                }
                self.refresh(slot);
                parent = Some(slot);
                parent_new = false;
                recent[i % Self::CHAIN_AHEAD] = slot;
                continue;
            }
            if let Some(slot) = self.nodes.slot_of(block) {
                if self.nodes[slot as usize].hittable {
                    result = Err(ReuseError::BlockAlreadyCached { block, index: i });
                }
                // An invalidated block in use: never cached again.
                break;
            }
            let stamp = self.tick();
            // Before this block's own slot replaces it: the block `CHAIN_AHEAD` up.
            let ancestor = recent[i % Self::CHAIN_AHEAD];
            let parent_slot = parent.unwrap_or(NIL);
            let slot = if self.recency.is_some() {
                // The cache's own LRU order: slots are block ids (see `Nodes`).
                self.nodes
                    .insert_cached_by_id(hash, block, parent_slot, ancestor, stamp, i as u32)
            } else {
                let node = Node::cached(hash, block, parent_slot, ancestor, stamp, i as u32);
                self.nodes.insert(node)
            };
            self.index_new(probe, hash, slot, hashes.len() - i);
            if self.recency.is_none() {
                self.policy.on_insert(slot, &info(hash, i, stamp));
            }
            if let Some(p) = parent {
                self.nodes.add_child(p, slot);
                if !parent_new {
                    self.refresh(p);
                }
            }
            if self.events.enabled() {
                if stored.is_empty() {
                    stored_parent = parent.map(|p| self.nodes[p as usize].hash);
                }
                stored.push(hash);
            }
            inserted += 1;
            newly_cached.push(block);
            parent = Some(slot);
            parent_new = true;
            recent[i % Self::CHAIN_AHEAD] = slot;
            if runs {
                let (end, last) =
                    self.insert_new_run(hashes, blocks, next, slot, &mut recent, newly_cached);
                inserted += (end - next) as u64;
                parent = Some(last);
                next = end;
            }
        }
        self.metrics.inserted_blocks = self.metrics.inserted_blocks.saturating_add(inserted);
        if let Some(last) = parent {
            self.refresh(last);
        }
        if !stored.is_empty() {
            self.events.push(KvEvent::BlockStored {
                parent: stored_parent,
                hashes: stored,
            });
        }
        result
    }

    /// The slot of block `offered_before - 1` of an offer when it is cached, hittable, under
    /// its hash: the end of the chain the request offered before (see
    /// [`Self::insert_inner`]).
    #[inline]
    fn offered_chain_end(
        &self,
        hashes: &[BlockHash],
        blocks: &[BlockId],
        offered_before: usize,
    ) -> Option<u32> {
        let i = offered_before.checked_sub(1)?;
        let (&hash, &block) = (hashes.get(i)?, blocks.get(i)?);
        let slot = self.nodes.slot_of(block)?;
        let node = &self.nodes[slot as usize];
        (node.hittable && node.hash == hash).then_some(slot)
    }

    /// Stores the hash of the node just cached at `slot` after a probe for it found nothing
    /// (see [`HashIndex::store_probed`]). A slot that does not fit beside the index's tags
    /// (a block id past the node table, which grew for it, or a new spilled slot) rebuilds
    /// the index instead, this node included, with room for `more` inserts. Checking the
    /// slot here, where it is known anyway, spares every insert a pass over its blocks for
    /// their largest id.
    #[inline(always)]
    fn index_new(&mut self, probe: Probe, hash: BlockHash, slot: u32, more: usize) {
        if self.by_hash.fits(slot) {
            self.by_hash.store_probed(probe, hash, slot);
        } else {
            self.reindex_grown(more);
        }
    }

    /// [`Self::index_new`]'s rebuild.
    #[cold]
    #[inline(never)]
    fn reindex_grown(&mut self, more: usize) {
        let bound = self.nodes.slot_bound(more);
        // The node just cached is hittable and not in the index yet.
        self.rebuild_index(more, bound, self.by_hash.len() + 1);
    }

    /// Caches blocks `from..` of an insert while each one is new, as [`Self::insert`]'s loop
    /// would with the cache's own LRU order and no events: `parent` is the slot of block
    /// `from - 1`, cached by this call (so it has no child yet). Returns where it stopped
    /// (the end, or a block the general loop must handle) and the last block's slot.
    ///
    /// With chained hashes a block after a new one is new too: a cached block's parent is
    /// cached (eviction is leaf first, invalidation detaches whole subtrees), so a hit after
    /// a miss would need the missed hash cached. Hashes that are not a chain still work: a
    /// hash found cached, or a block the cache tracks, ends the run, and the general loop
    /// takes that block as before.
    #[inline(always)]
    fn insert_new_run(
        &mut self,
        hashes: &[BlockHash],
        blocks: &[BlockId],
        from: usize,
        mut parent: u32,
        recent: &mut [u32; Self::CHAIN_AHEAD],
        newly_cached: &mut Vec<BlockId>,
    ) -> (usize, u32) {
        let (hashes, blocks) = (&hashes[..blocks.len()], &blocks[..hashes.len()]);
        let mut i = from;
        while let (Some(&hash), Some(&block)) = (hashes.get(i), blocks.get(i)) {
            if let Some(&next) = hashes.get(i + Self::AHEAD) {
                self.by_hash.prefetch(next);
            }
            let probe = self
                .by_hash
                .get_or_vacancy(hash, hittable_hash(&self.nodes));
            // Runs are taken in the cache's own LRU order only, so slots are block ids.
            if matches!(probe, Probe::Found(_)) || self.nodes.slot_of_by_id(block).is_some() {
                break;
            }
            let stamp = self.tick();
            let slot = self.nodes.insert_cached_by_id(
                hash,
                block,
                parent,
                recent[i % Self::CHAIN_AHEAD],
                stamp,
                i as u32,
            );
            self.index_new(probe, hash, slot, hashes.len() - i);
            // The parent was cached by this call and its only child is this block: in use by
            // the offering request, in no lane, so nothing else about it changes.
            debug_assert_eq!(self.nodes[parent as usize].first_child, NIL);
            self.nodes[parent as usize].first_child = slot;
            recent[i % Self::CHAIN_AHEAD] = slot;
            parent = slot;
            i += 1;
        }
        // The run's blocks, in order, in one copy.
        newly_cached.extend_from_slice(blocks.get(from..i).unwrap_or_default());
        (i, parent)
    }

    /// Another holder of these blocks (a fork, a session keeping a request's blocks): each
    /// tracked block's use count goes up by one. Untracked (private) blocks are skipped.
    ///
    /// Pass a whole table from its first block, as a holder holds it: the cache counts on
    /// every holder of a block holding the blocks before it. A later block acquired alone
    /// keeps its unused ancestors in [`evictable_blocks`](Self::evictable_blocks) although
    /// leaf-first eviction cannot reach them until it is released.
    ///
    /// # Errors
    /// [`ReuseError::TooManyHolders`] for a block with `u32::MAX` holders (unchanged); the
    /// other blocks are still processed and the first error is returned.
    pub fn acquire(&mut self, blocks: &[BlockId]) -> Result<(), ReuseError> {
        let mut result = Ok(());
        for &block in blocks {
            let Some(slot) = self.nodes.slot_of(block) else {
                continue;
            };
            if !self.hold(slot) {
                result = result.and(Err(ReuseError::TooManyHolders { block }));
            }
        }
        result
    }

    /// A holder stopped using these blocks (given in prompt order): each tracked block's use
    /// count goes down by one, and at 0 it becomes evictable, last used now. Blocks are
    /// released tail first. Untracked (private) blocks are skipped.
    ///
    /// # Errors
    /// [`ReuseError::NotInUse`] for a tracked block with use count 0 (a double release); the
    /// other blocks are still processed and one of the errors is returned.
    pub fn release(&mut self, blocks: &[BlockId]) -> Result<(), ReuseError> {
        let mut result = Ok(());
        let own_order = self.recency.is_some();
        // Tail first: the blocks freed first are the first evicted (as vLLM frees a request's
        // blocks in reverse), and a prefix's head outlives its tail. The nodes of the blocks
        // `AHEAD` positions on are fetched meanwhile, so their misses overlap.
        for (j, &block) in blocks.iter().enumerate().rev() {
            if let Some(&next) = j.checked_sub(Self::AHEAD).and_then(|k| blocks.get(k)) {
                if own_order {
                    // Slots are block ids: no look-up before the fetch.
                    self.nodes.prefetch(next.index());
                } else {
                    self.prefetch_block(next);
                }
            }
            // The cache's own LRU order means slots are block ids (see `Nodes`).
            let slot = if own_order {
                self.nodes.slot_of_by_id(block)
            } else {
                self.nodes.slot_of(block)
            };
            let Some(slot) = slot else {
                continue;
            };
            // The common cases in line: a block other holders still use, and a hittable
            // block whose last holder leaves, in the cache's own LRU order. A block in use is
            // in no lane, so its new stamp needs no queue change; it joins the order if it
            // has no child (`refresh`). Everything else takes `release_one`.
            let node = &mut self.nodes[slot as usize];
            if node.refs > 1 {
                node.refs -= 1;
                continue;
            }
            if own_order && node.refs == 1 && node.hittable {
                debug_assert_eq!(node.lane, Lane::None, "a block in use is in no lane");
                node.refs = 0;
                self.clock += 1;
                node.stamp = self.clock;
                let leaf = !node.has_children();
                self.unused += 1;
                if leaf {
                    self.relane(slot);
                }
                continue;
            }
            if let Err(e) = self.release_one(block) {
                result = Err(e);
            }
        }
        result
    }

    fn release_one(&mut self, block: BlockId) -> Result<(), ReuseError> {
        let Some(slot) = self.nodes.slot_of(block) else {
            return Ok(());
        };
        let node = &mut self.nodes[slot as usize];
        if node.refs == 0 {
            return Err(ReuseError::NotInUse { block });
        }
        node.refs -= 1;
        if node.refs == 0 {
            if node.hittable {
                self.unused += 1;
                let stamp = self.tick();
                self.set_stamp(slot, stamp);
                if self.recency.is_none() {
                    self.policy.on_release(slot, stamp);
                }
                self.refresh(slot);
            } else {
                let node = self.nodes.remove(slot as usize);
                self.retained.remove(&slot);
                self.orphans.push(node.block);
            }
        }
        Ok(())
    }

    /// How far up a chain an eviction fetches nodes ahead (see `Node::ancestor`).
    const CHAIN_AHEAD: usize = 8;

    /// Blocks (or hashes) fetched ahead of use by the loops over a request's blocks.
    const AHEAD: usize = 16;

    /// Hints the CPU to fetch the node of `block` (see [`crate::prefetch`]).
    #[inline]
    fn prefetch_block(&self, block: BlockId) {
        self.nodes.prefetch_block(block);
    }

    /// Forgets up to `count` evictable blocks, appending their ids to `evicted` for the caller
    /// to free (it drops the cache's reference on each), and returns how many. Invalidated
    /// blocks go first, then leaves in retention and policy order (see [`PrefixCache`]). A
    /// block in use is never evicted.
    pub fn evict(&mut self, count: usize, now_ms: u64, evicted: &mut Vec<BlockId>) -> usize {
        self.evict_inner(count, now_ms, evicted, None)
    }

    /// [`evict`](Self::evict), also appending to `hashes` the hash each evicted block was
    /// cached under and its retention when it was evicted (see
    /// [`block_retention`](Self::block_retention); `None` for an invalidated block, whose hash
    /// must not be reused), one entry per evicted block, in the same order. A tier below
    /// device memory stores the block under that hash, ranked by that retention.
    pub fn evict_with_hashes(
        &mut self,
        count: usize,
        now_ms: u64,
        evicted: &mut Vec<BlockId>,
        hashes: &mut Vec<Option<(BlockHash, Retention)>>,
    ) -> usize {
        self.evict_inner(count, now_ms, evicted, Some(hashes))
    }

    fn evict_inner(
        &mut self,
        count: usize,
        now_ms: u64,
        evicted: &mut Vec<BlockId>,
        mut hashes: Option<&mut Vec<Option<(BlockHash, Retention)>>>,
    ) -> usize {
        self.now_ms = now_ms;
        let mut n = 0;
        while n < count {
            let Some(b) = self.orphans.pop() else { break };
            evicted.push(b);
            if let Some(h) = hashes.as_deref_mut() {
                h.push(None);
            }
            n += 1;
        }
        self.expire(now_ms);
        let mut removed = Vec::new();
        let mut ahead = 0;
        // Blocks evicted below (not the orphans above), for the metrics.
        let mut by_policy = 0u64;
        // A parent the policy named as the very next victim when its last child went: evicted
        // at once, never announced to the policy (see `EvictionPolicy::evicts_next`).
        let mut next_up: Option<u32> = None;
        while n < count {
            if ahead == 0 && count - n > 1 {
                self.prefetch_victims(count - n);
                ahead = Self::PREFETCH;
            }
            ahead = ahead.saturating_sub(1);
            let announced = next_up.is_none();
            let (slot, lane) = if let Some(s) = next_up.take() {
                (s, Lane::Policy)
            } else if let Some((_, _, s)) = self.low.pop_first() {
                (s, Lane::Low)
            } else if let Some(s) = self.pop_policy_victim() {
                (s, Lane::Policy)
            } else if let Some((_, _, s)) = self.high.pop_first() {
                (s, Lane::High)
            } else {
                break;
            };
            let Some(victim) = self.nodes.take_leaf(slot, lane) else {
                // A victim that is not an evictable leaf in that lane means the lanes and the
                // nodes disagree: never hand back a block someone may hold.
                debug_assert!(
                    false,
                    "eviction order named slot {slot}, not an evictable leaf"
                );
                continue;
            };
            // Read before the retention is forgotten; the policy's lane holds
            // default-priority blocks only.
            let retention = if hashes.is_some() && lane != Lane::Policy && victim.retained {
                self.retention_in_force(slot)
            } else {
                Retention::DEFAULT
            };
            next_up = self.remove_hittable(
                slot,
                &victim,
                announced,
                lane == Lane::Policy,
                count - n > 1,
            );
            self.unused -= 1;
            if self.events.enabled() {
                removed.push(victim.hash);
            }
            evicted.push(victim.block);
            if let Some(h) = hashes.as_deref_mut() {
                h.push(Some((victim.hash, retention)));
            }
            n += 1;
            by_policy += 1;
            // A chain released tail first is evicted tail first: while the policy names each
            // parent as the next victim, it is taken here, without the order's look-ups, the
            // prefetch of the order's next victims (the chain's nodes come from `ancestor`)
            // or a pass through the lanes above.
            while let Some(p) = next_up {
                if n >= count {
                    break;
                }
                // `remove_hittable` named it after checking that it is an evictable leaf.
                let victim = self.nodes.take_evictable_leaf(p);
                next_up = self.remove_hittable(p, &victim, false, true, count - n > 1);
                self.unused -= 1;
                if self.events.enabled() {
                    removed.push(victim.hash);
                }
                evicted.push(victim.block);
                if let Some(h) = hashes.as_deref_mut() {
                    h.push(Some((victim.hash, Retention::DEFAULT)));
                }
                n += 1;
                by_policy += 1;
            }
        }
        self.metrics.evicted_capacity = self.metrics.evicted_capacity.saturating_add(by_policy);
        if let Some(p) = next_up {
            // Not evicted after all (the count was reached): it joins its lane as usual.
            self.nodes[p as usize].lane = Lane::None;
            self.refresh(p);
        }
        if !removed.is_empty() {
            self.events.push(KvEvent::BlockRemoved { hashes: removed });
        }
        n
    }

    /// Victims fetched ahead of a batch eviction.
    const PREFETCH: usize = 16;

    /// Fetches the nodes of the next victims the policy names, so their cache misses overlap
    /// (evicting them one by one would wait for each in turn).
    fn prefetch_victims(&mut self, want: usize) {
        let mut next = std::mem::take(&mut self.peeked);
        next.clear();
        let n = want.min(Self::PREFETCH);
        match &self.recency {
            Some(r) => r.peek(n, &mut next),
            None => self.policy.peek_victims(n, &mut next),
        }
        for &s in &next {
            self.nodes.prefetch(s as usize);
        }
        self.peeked = next;
    }

    /// Sets the retention of the cached block `hash` (priority 0–100, decaying to the default
    /// at `until`). Returns whether the block is cached.
    pub fn set_retention(&mut self, hash: BlockHash, retention: Retention, now_ms: u64) -> bool {
        self.now_ms = now_ms;
        let Some(slot) = self.find(hash) else {
            return false;
        };
        let retention = Retention {
            priority: retention.priority.min(Retention::MAX_PRIORITY),
            until: retention.until,
        };
        self.retain(slot, retention, false);
        true
    }

    /// Gives the hittable node at `slot` a caller-set retention (`until_used`: one that its
    /// next use clears, see [`Self::restore_if_ended`]) and puts it in its lane.
    fn retain(&mut self, slot: u32, retention: Retention, until_used: bool) {
        self.retention_gen += 1;
        let node = &mut self.nodes[slot as usize];
        node.retained = true;
        let lane_key = self.retained.get(&slot).map_or((0, 0), |r| r.lane_key);
        self.retained.insert(
            slot,
            Retained {
                retention,
                generation: self.retention_gen,
                lane_key,
                until_used,
            },
        );
        if let Some(until) = retention.until {
            self.expiries
                .push(Reverse((until, slot, self.retention_gen)));
        }
        self.refresh(slot);
    }

    /// The node at `slot` is used again: a retention [`Self::end_conversation`] gave it is
    /// dropped (the conversation did not end after all, or another one reached the block),
    /// so it is ranked at the default priority again. Other retentions stay.
    fn restore_if_ended(&mut self, slot: u32) {
        if self.retained.get(&slot).is_some_and(|r| r.until_used) {
            // Out of its lane while the retention still names its key there.
            self.leave_lane(slot);
            self.retained.remove(&slot);
            self.nodes[slot as usize].retained = false;
            self.refresh(slot);
        }
    }

    /// Sets the retention of the cached block whose [`BlockHash::short`] is `short` (what
    /// [`kvc_core::ReuseIndex::set_retention`] names blocks by). Constant time, as
    /// [`set_retention`](Self::set_retention): the hash index is keyed by the low 64 bits.
    pub fn set_retention_short(&mut self, short: u64, retention: Retention, now_ms: u64) -> bool {
        // The home bucket and tag come from the low 64 bits alone, so a probe with them finds
        // the entry; candidates are confirmed by their node's low 64 bits.
        let found = {
            let nodes = &self.nodes;
            let hittable = hittable_hash(nodes);
            self.by_hash
                .get(BlockHash(u128::from(short)), |slot| {
                    hittable(slot).map(|h| BlockHash(u128::from(h.short())))
                })
                .map(|slot| nodes[slot as usize].hash)
        };
        match found {
            Some(hash) => self.set_retention(hash, retention, now_ms),
            None => false,
        }
    }

    /// Makes `hash` and every chain through it unhittable (an invalidated document prefix),
    /// and returns how many blocks that was. Blocks no request uses are handed back by the
    /// next [`evict`](Self::evict); blocks in use are handed back after their release.
    pub fn invalidate(&mut self, hash: BlockHash) -> usize {
        let Some(top) = self.find(hash) else {
            return 0;
        };
        if let Some(p) = self.nodes[top as usize].parent() {
            self.nodes.remove_child(p, top);
            self.refresh(p);
        }
        let mut removed = Vec::new();
        self.detach_subtree(top, &mut removed);
        let n = removed.len();
        self.events.push(KvEvent::BlockRemoved { hashes: removed });
        n
    }

    /// Drops every cached block (for example on a model switch) and returns how many became
    /// unhittable; they are handed back by the next [`evict`](Self::evict).
    ///
    /// # Errors
    /// [`ReuseError::InUse`] while any cached block is in use (its holders still read it):
    /// nothing changes. Release them first, or [`invalidate`](Self::invalidate) the chains to
    /// drop them as their holders finish.
    pub fn clear(&mut self) -> Result<usize, ReuseError> {
        let in_use = self.in_use_blocks();
        if in_use > 0 {
            return Err(ReuseError::InUse { in_use });
        }
        let tops: Vec<u32> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.hittable && n.parent == NIL)
            .map(|(s, _)| s as u32)
            .collect();
        let mut removed = Vec::new();
        for top in tops {
            self.detach_subtree(top, &mut removed);
        }
        self.events.push(KvEvent::AllCleared);
        Ok(removed.len())
    }

    fn detach_subtree(&mut self, top: u32, removed: &mut Vec<BlockHash>) {
        let mut stack = vec![top];
        while let Some(slot) = stack.pop() {
            self.leave_lane(slot);
            if self.recency.is_none() {
                self.policy.on_remove(slot);
            }
            self.nodes.drain_children(slot, &mut stack);
            let node = &mut self.nodes[slot as usize];
            node.parent = NIL;
            node.ancestor = NIL;
            node.hittable = false;
            let (hash, block, refs) = (node.hash, node.block, node.refs);
            // Stale now that the node is not hittable (see `crate::table`).
            self.by_hash.mark_stale();
            removed.push(hash);
            self.metrics.evicted_invalidated = self.metrics.evicted_invalidated.saturating_add(1);
            if refs == 0 {
                self.unused -= 1;
                self.nodes.remove(slot as usize);
                self.retained.remove(&slot);
                self.orphans.push(block);
            }
        }
    }

    /// Forgets the evictable hittable node at `slot` that [`Nodes::take_leaf`] took out of
    /// the table (`node`): its block, its retention, the policy's record; its hash-index
    /// entry stays, stale (see below). `announced`: the policy knows the
    /// node as evictable (false for a parent taken through `EvictionPolicy::evicts_next`).
    /// With `chain`, a parent left without children that the policy would evict next is
    /// returned instead of being put in its lane (its lane is set to `Lane::Policy`): the
    /// caller evicts it next, or puts it in its lane. `least`: the node was the policy lane's
    /// next victim (taken from the policy's order, or a parent it named next).
    #[inline(always)]
    fn remove_hittable(
        &mut self,
        slot: u32,
        node: &Victim,
        announced: bool,
        least: bool,
        chain: bool,
    ) -> Option<u32> {
        if announced && self.recency.is_none() {
            self.policy.on_remove(slot);
        }
        self.nodes.prefetch(node.ancestor as usize);
        // Its hash-index entry is stale from here on (the slot holds no node), and stays
        // until an insert reuses it or the index is rebuilt (see `crate::table`).
        self.by_hash.mark_stale();
        if node.retained {
            self.retained.remove(&slot);
        }
        let mut up = None;
        if node.parent != NIL {
            let p = node.parent;
            let parent = &self.nodes[p as usize];
            if chain
                && self.low.is_empty()
                && parent.lane == Lane::None
                && parent.hittable
                && parent.refs == 0
                && !parent.retained
                && !parent.has_children()
                && match self.recency.as_mut() {
                    Some(r) => {
                        // The victim was the least `(stamp, slot)` of the order, and stamps
                        // are unique (one tick each): a parent stamped no later than the tick
                        // after it is below every key left, so it is next without a look at
                        // the queue (a chain released tail first has consecutive stamps).
                        let next_tick =
                            least && node.stamp.checked_add(1).is_some_and(|s| parent.stamp <= s);
                        debug_assert!(
                            !next_tick || r.evicts_next(parent.stamp, p, queued(&self.nodes)),
                            "a parent stamped right after the victim is next"
                        );
                        next_tick || r.evicts_next(parent.stamp, p, queued(&self.nodes))
                    }
                    None => self.policy.evicts_next(p, parent.stamp),
                }
            {
                self.nodes[p as usize].lane = Lane::Policy;
                up = Some(p);
            } else {
                self.refresh(p);
            }
        }
        up
    }

    /// Applies retention expiries due by `now_ms`.
    fn expire(&mut self, now_ms: u64) {
        while let Some(&Reverse((until, slot, generation))) = self.expiries.peek() {
            if until > now_ms {
                break;
            }
            self.expiries.pop();
            if self.nodes.get(slot as usize).is_some_and(|n| n.hittable)
                && self
                    .retained
                    .get(&slot)
                    .is_some_and(|r| r.generation == generation)
            {
                self.refresh(slot);
            }
        }
    }

    /// Sets the last use of the node at `slot`. In the cache's own recency order a node
    /// queued under its old stamp leaves its lane first (the caller's `refresh` puts it back
    /// under the new one).
    #[inline]
    fn set_stamp(&mut self, slot: u32, stamp: u64) {
        if self.recency.is_some() && self.nodes[slot as usize].lane == Lane::Policy {
            self.leave_lane(slot);
        }
        self.nodes[slot as usize].stamp = stamp;
    }

    /// Takes the policy's next victim out of its order.
    #[inline]
    fn pop_policy_victim(&mut self) -> Option<u32> {
        match self.recency.as_mut() {
            Some(r) => {
                let (slot, placed) = r.pop(queued(&self.nodes))?;
                if placed == Placed::Set {
                    self.nodes[slot as usize].in_set = false;
                }
                Some(slot)
            }
            None => self.policy.pop_victim(),
        }
    }

    /// The retention of the node at `slot` now: its own while in force, else the default.
    fn retention(&self, slot: u32) -> Retention {
        if !self.nodes[slot as usize].retained {
            return Retention::DEFAULT;
        }
        self.retention_in_force(slot)
    }

    /// The retention recorded for `slot` while in force, else the default.
    fn retention_in_force(&self, slot: u32) -> Retention {
        match self.retained.get(&slot) {
            Some(r) if r.retention.until.is_none_or(|until| self.now_ms < until) => r.retention,
            _ => Retention::DEFAULT,
        }
    }

    /// The retention priority of the node at `slot` now.
    fn priority(&self, slot: u32) -> u8 {
        if self.nodes[slot as usize].retained {
            self.retained
                .get(&slot)
                .map_or(Retention::DEFAULT_PRIORITY, |r| {
                    r.retention.priority_at(self.now_ms)
                })
        } else {
            Retention::DEFAULT_PRIORITY
        }
    }

    /// Puts a node in the lane its state calls for.
    #[inline(always)]
    fn refresh(&mut self, slot: u32) {
        let node = &self.nodes[slot as usize];
        // The common case on the hot paths (a released block that still has children, a hit
        // block now in use): not evictable and in no lane, so it stays in none.
        if node.lane == Lane::None && !(node.hittable && node.refs == 0 && !node.has_children()) {
            return;
        }
        self.relane(slot);
    }

    /// [`Self::refresh`] for a node that is evictable or in a lane (kept out of line, so the
    /// check above stays a few instructions wherever it is inlined).
    #[inline(never)]
    fn relane(&mut self, slot: u32) {
        let priority = self.priority(slot);
        let node = &self.nodes[slot as usize];
        let evictable = node.hittable && node.refs == 0 && !node.has_children();
        let want = if !evictable {
            Lane::None
        } else {
            match priority.cmp(&Retention::DEFAULT_PRIORITY) {
                Ordering::Less => Lane::Low,
                Ordering::Equal => Lane::Policy,
                Ordering::Greater => Lane::High,
            }
        };
        let key = (priority, node.stamp);
        if want == node.lane {
            let same_key = match want {
                Lane::None | Lane::Policy => true,
                Lane::Low | Lane::High => {
                    self.retained.get(&slot).is_some_and(|r| r.lane_key == key)
                }
            };
            if same_key {
                return;
            }
        }
        self.leave_lane(slot);
        self.nodes[slot as usize].lane = want;
        match want {
            Lane::None => {}
            Lane::Policy => match self.recency.as_mut() {
                Some(r) => {
                    let node = &mut self.nodes[slot as usize];
                    node.in_set = r.enter(node.stamp, slot) == Placed::Set;
                }
                None => self.policy.on_evictable(slot),
            },
            Lane::Low | Lane::High => {
                if let Some(r) = self.retained.get_mut(&slot) {
                    r.lane_key = key;
                }
                let set = if want == Lane::Low {
                    &mut self.low
                } else {
                    &mut self.high
                };
                set.insert((key.0, key.1, slot));
            }
        }
    }

    fn leave_lane(&mut self, slot: u32) {
        let node = &mut self.nodes[slot as usize];
        let lane = node.lane;
        node.lane = Lane::None;
        let key = || self.retained.get(&slot).map_or((0, 0), |r| r.lane_key);
        match lane {
            Lane::None => {}
            Lane::Policy => match self.recency.as_mut() {
                Some(r) => {
                    let node = &mut self.nodes[slot as usize];
                    if std::mem::take(&mut node.in_set) {
                        r.leave_set(node.stamp, slot);
                    } else {
                        r.leave_queued(queued(&self.nodes));
                    }
                }
                None => self.policy.on_unevictable(slot),
            },
            Lane::Low => {
                let k = key();
                self.low.remove(&(k.0, k.1, slot));
            }
            Lane::High => {
                let k = key();
                self.high.remove(&(k.0, k.1, slot));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An insert's run of new blocks (`PrefixCache::insert_new_run`, taken with the cache's
    /// own LRU order and no events) ends where the general loop must take over, and the two
    /// paths cache the same: a cache recording events (so never taking the run) sees the
    /// same results, newly cached blocks, hits, evictions and metrics under a stream of
    /// inserts whose hashes are *not* chains (hashes cached under another parent or another
    /// block, repeats within one insert, blocks already cached, invalidated blocks in use).
    #[test]
    fn an_insert_run_hands_back_to_the_general_loop() {
        let mut fast = PrefixCache::new(4, PolicyKind::Lru);
        let mut slow = PrefixCache::new(4, PolicyKind::Lru);
        slow.subscribe();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut held: Vec<Vec<BlockId>> = Vec::new();
        let (mut runs_stopped, mut next_block) = (0, 0u32);
        for step in 0..6_000u64 {
            match rand(10) {
                0..=4 => {
                    // Hashes from a small set, so many are cached already, under other parents.
                    let len = 1 + rand(12) as usize;
                    let hashes: Vec<BlockHash> = (0..len)
                        .map(|_| BlockHash(u128::from(rand(40)) * 0x9e37_79b9_7f4a_7c15 + 1))
                        .collect();
                    let blocks: Vec<BlockId> = (0..len)
                        .map(|_| {
                            if rand(4) == 0 {
                                BlockId(rand(u64::from(next_block.max(1))) as u32)
                            } else {
                                next_block += 1;
                                BlockId(next_block)
                            }
                        })
                        .collect();
                    let (mut a, mut b) = (Vec::new(), Vec::new());
                    let ra = fast.insert(&hashes, &blocks, step, &mut a);
                    let rb = slow.insert(&hashes, &blocks, step, &mut b);
                    assert_eq!(ra, rb, "step {step}");
                    assert_eq!(a, b, "step {step}");
                    if a.len() > 1 && a.len() < len {
                        runs_stopped += 1;
                    }
                    held.push(blocks);
                }
                5 | 6 if !held.is_empty() => {
                    let blocks = held.swap_remove(rand(held.len() as u64) as usize);
                    assert_eq!(fast.release(&blocks), slow.release(&blocks), "step {step}");
                }
                7 => {
                    let h = BlockHash(u128::from(rand(40)) * 0x9e37_79b9_7f4a_7c15 + 1);
                    assert_eq!(fast.invalidate(h), slow.invalidate(h), "step {step}");
                }
                8 => {
                    let n = rand(20) as usize;
                    let (mut a, mut b) = (Vec::new(), Vec::new());
                    fast.evict(n, step, &mut a);
                    slow.evict(n, step, &mut b);
                    assert_eq!(a, b, "step {step}");
                }
                _ => {
                    let h = BlockHash(u128::from(rand(40)) * 0x9e37_79b9_7f4a_7c15 + 1);
                    let hit_a = fast.lookup(&[h], 8, step);
                    let hit_b = slow.lookup(&[h], 8, step);
                    assert_eq!(hit_a, hit_b, "step {step}");
                    assert_eq!(fast.release(&hit_a.blocks), slow.release(&hit_b.blocks));
                }
            }
            assert_eq!(fast.metrics(), slow.metrics(), "step {step}");
            assert_eq!(fast.evictable_blocks(), slow.evictable_blocks());
            assert_eq!(fast.len(), slow.len());
        }
        // Inserts that cached a run of new blocks and then stopped before their end.
        assert!(runs_stopped > 50, "only {runs_stopped} runs ended early");
        let (mut a, mut b) = (Vec::new(), Vec::new());
        fast.evict(usize::MAX, 1 << 20, &mut a);
        slow.evict(usize::MAX, 1 << 20, &mut b);
        assert_eq!(a, b);
    }

    /// Block ids on both sides of the direct table's limit (`u32::MAX` included), ids past
    /// the table's end, and ids reused after removal: every look-up, insert and removal finds
    /// the right node, direct ids at slot = id, spilled ones in slots reused last freed first.
    #[test]
    fn nodes_direct_and_spilled_ids() {
        let limit = Nodes::DIRECT as u32;
        let ids = [0, 5, 1000, 70_000, limit, limit + 7, u32::MAX - 1, u32::MAX];
        let node =
            |id: u32| Node::cached(BlockHash(u128::from(id) + 1), BlockId(id), NIL, NIL, 0, 0);
        let mut nodes = Nodes::new(true);
        for &id in &ids {
            assert_eq!(nodes.slot_of(BlockId(id)), None, "{id} before any insert");
        }
        let slots: Vec<u32> = ids.iter().map(|&id| nodes.insert(node(id))).collect();
        assert_eq!(nodes.len(), ids.len());
        assert_eq!(&slots[..4], &ids[..4], "direct ids sit at slot = id");
        assert!(slots[4..].iter().all(|&s| s >= limit && s != NIL));
        assert_eq!(
            nodes.direct.len(),
            1 << 17,
            "grown to the largest direct id only"
        );
        assert_eq!(nodes.spill.len(), 4);
        for (&id, &slot) in ids.iter().zip(&slots) {
            assert_eq!(nodes.slot_of(BlockId(id)), Some(slot), "{id}");
            assert_eq!(nodes[slot as usize].block, BlockId(id));
            assert_eq!(
                nodes.get(slot as usize).map(|n| n.hash),
                Some(BlockHash(u128::from(id) + 1))
            );
        }
        // Known to neither table: below the limit (inside and past the table) and above it.
        for id in [6, 1001, limit + 8] {
            assert!(!nodes.contains(BlockId(id)), "{id}");
        }
        for &k in &[1, 5] {
            let removed = nodes.remove(slots[k] as usize);
            assert_eq!(removed.block, BlockId(ids[k]));
            assert_eq!(
                nodes.slot_of(BlockId(ids[k])),
                None,
                "{} after removal",
                ids[k]
            );
            assert!(nodes.get(slots[k] as usize).is_none());
        }
        // A new spilled id takes the freed spill slot; a direct id comes back to its own.
        assert_eq!(nodes.insert(node(limit + 9)), slots[5]);
        assert_eq!(nodes.insert(node(5)), 5);
        assert_eq!(nodes.spill.len(), 4, "no spill slot added");
        let mut live: Vec<(usize, u32)> = nodes.iter().map(|(s, n)| (s, n.block.0)).collect();
        live.sort_unstable();
        let mut want: Vec<(usize, u32)> = ids
            .iter()
            .zip(&slots)
            .map(|(&id, &s)| (s as usize, if id == limit + 7 { limit + 9 } else { id }))
            .collect();
        want.sort_unstable();
        assert_eq!(live, want);
        assert_eq!(nodes.len(), ids.len());
    }

    /// Without `by_id` (a cache with a policy object) slots are handed out densely whatever
    /// the ids, freed ones reused last freed first, as policies have always seen them.
    #[test]
    fn nodes_not_by_id_hand_out_dense_slots() {
        let node =
            |id: u32| Node::cached(BlockHash(u128::from(id) + 1), BlockId(id), NIL, NIL, 0, 0);
        let mut nodes = Nodes::new(false);
        let ids = [70_000, 3, u32::MAX, 9];
        let slots: Vec<u32> = ids.iter().map(|&id| nodes.insert(node(id))).collect();
        assert_eq!(slots, [0, 1, 2, 3]);
        for (&id, &slot) in ids.iter().zip(&slots) {
            assert_eq!(nodes.slot_of(BlockId(id)), Some(slot));
        }
        assert_eq!(nodes.remove(2).block, BlockId(u32::MAX));
        nodes.remove(0);
        assert_eq!(nodes.slot_of(BlockId(u32::MAX)), None);
        assert_eq!(nodes.slot_of(BlockId(70_000)), None);
        assert_eq!(nodes.insert(node(5)), 0, "the last freed slot first");
        assert_eq!(nodes.insert(node(6)), 2);
        assert_eq!(nodes.insert(node(7)), 4);
        assert_eq!(nodes.len(), 5);
        assert!(nodes.spill.is_empty() && nodes.direct.len() == 5);
    }

    /// A cache whose block ids are spilled (at or above `Nodes::DIRECT`, mixed with direct
    /// ones) behaves exactly as one with small ids: an engine-like loop over a pool of ids
    /// reused after eviction, with hits, inserts, releases, evictions and invalidations;
    /// every result, hit, eviction and count agrees once ids are mapped back.
    #[test]
    fn spilled_block_ids_behave_as_direct_ones() {
        const POOL: u32 = 96;
        // Every other id far above the direct table (`u32::MAX` included), the rest small.
        let far = |b: u32| if b % 2 == 1 { u32::MAX - b / 2 } else { b };
        let back = |id: BlockId| {
            if id.0 >= Nodes::DIRECT as u32 {
                BlockId(2 * (u32::MAX - id.0) + 1)
            } else {
                id
            }
        };
        let to_far = |v: &[BlockId]| v.iter().map(|b| BlockId(far(b.0))).collect::<Vec<_>>();
        let mut near = PrefixCache::new(4, PolicyKind::Lru);
        let mut wide = PrefixCache::new(4, PolicyKind::Lru);
        let mut free: Vec<u32> = (0..POOL).rev().collect();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        // Each request's blocks, and those of them the cache never took (freed when it ends).
        let mut held: Vec<(Vec<BlockId>, Vec<u32>)> = Vec::new();
        let mut evicted_total = 0;
        for step in 0..3_000u64 {
            // At most 6 requests alive at once (48 blocks of the pool's 96).
            if held.len() >= 6 || (rand(4) == 0 && !held.is_empty()) {
                let (blocks, private) = held.swap_remove(rand(held.len() as u64) as usize);
                assert_eq!(
                    near.release(&blocks),
                    wide.release(&to_far(&blocks)),
                    "{step}"
                );
                free.extend(private);
                continue;
            }
            if rand(50) == 0 {
                let h = BlockHash(u128::from(rand(30)) + 1);
                assert_eq!(near.invalidate(h), wide.invalidate(h), "{step}");
            }
            // A prompt of up to 8 blocks from one of 30 chains.
            let chain = rand(30);
            let len = 1 + rand(8) as usize;
            let hashes: Vec<BlockHash> = (0..len)
                .map(|d| BlockHash(u128::from(chain + 1) + ((d as u128) << 64)))
                .collect();
            let hit = near.lookup(&hashes, len * 4 + 1, step);
            let hit_w = wide.lookup(&hashes, len * 4 + 1, step);
            assert_eq!(hit.tokens, hit_w.tokens, "{step}");
            assert_eq!(to_far(&hit.blocks), hit_w.blocks, "{step}");
            let mut blocks = hit.blocks.clone();
            let need = len - blocks.len();
            if free.len() < need {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                let n = near.evict(need - free.len(), step, &mut a);
                assert_eq!(n, wide.evict(need - free.len(), step, &mut b), "{step}");
                assert_eq!(
                    a,
                    b.iter().map(|&id| back(id)).collect::<Vec<_>>(),
                    "{step}"
                );
                evicted_total += n;
                free.extend(a.iter().map(|b| b.0));
            }
            if free.len() < need {
                near.release(&blocks).unwrap();
                wide.release(&to_far(&blocks)).unwrap();
                continue;
            }
            blocks.extend((0..need).filter_map(|_| free.pop()).map(BlockId));
            let (mut a, mut b) = (Vec::new(), Vec::new());
            assert_eq!(
                near.insert(&hashes, &blocks, step, &mut a),
                wide.insert(&hashes, &to_far(&blocks), step, &mut b),
                "{step}"
            );
            assert_eq!(to_far(&a), b, "{step}");
            let private = blocks[hit.blocks.len()..]
                .iter()
                .filter(|b| !a.contains(b))
                .map(|b| b.0)
                .collect();
            held.push((blocks, private));
            assert_eq!(near.metrics(), wide.metrics(), "{step}");
            assert_eq!(near.len(), wide.len());
            assert_eq!(near.evictable_blocks(), wide.evictable_blocks());
            for b in 0..POOL {
                assert_eq!(
                    near.use_count(BlockId(b)),
                    wide.use_count(BlockId(far(b))),
                    "{step}: block {b}"
                );
            }
        }
        assert!(evicted_total > 500, "only {evicted_total} evictions");
        assert!(!wide.nodes.spill.is_empty() && wide.nodes.direct.len() <= 128);
    }
}
