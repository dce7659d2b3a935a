//! [`RadixCache`]: a prefix cache that keeps runs of blocks, not blocks: the fastest way to
//! cache prompts when plain LRU is the policy wanted.
//!
//! A [`PrefixCache`](crate::PrefixCache) keeps one node and one hash-index entry per cached
//! block, which is what lets it run any [`EvictionPolicy`](crate::EvictionPolicy), retention,
//! invalidation, sessions and KV events block by block. Most of its work per request is that
//! per-block bookkeeping: an insert writes a node and an index entry for every new block, an
//! eviction removes them again, a release stamps every block. A radix tree over block hashes
//! (SGLang's `RadixCache`, keyed by chained hashes instead of tokens) keeps a run of blocks
//! cached together, with the same holders, as one *edge*: two arrays (hashes, block ids), one
//! index entry (its first hash), one holder count and one LRU stamp. A lookup compares hashes
//! along an edge, an insert appends one edge, a release walks the edges of a request's path,
//! and an eviction truncates the least recently used leaf edge from its tail.
//!
//! Its eviction order is exactly a block-level LRU's with leaf-first eviction: edges are split
//! where holders differ (a hit that ends inside an edge splits it), so the blocks of an edge
//! are released together, tail first, and its tail is always its least recently used block.
//!
//! What it does not do, by design: eviction policies other than LRU, retention priorities,
//! invalidation, sessions, KV events and per-block checks. It keeps no per-block index, so it
//! cannot tell that a block given to [`insert`](RadixCache::insert) is cached already: the
//! caller passes blocks it owns, as an engine's allocator hands them out. Use
//! [`PrefixCache`](crate::PrefixCache) for any of those.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};

use kvc_core::BlockId;
use thiserror::Error;

use crate::BlockHash;
use crate::cache::KeyHash;

/// No edge.
const NONE: u32 = u32::MAX;

/// The next cache's id (0 is no cache's: [`RadixHold::NOTHING`]'s).
static NEXT_CACHE_ID: AtomicU32 = AtomicU32::new(1);

/// Edges by their first hash (block hashes are already random: the cache's key hasher folds
/// their bits instead of hashing them again).
type ByFirstHash = HashMap<BlockHash, u32, KeyHash>;

/// A run of cached blocks with the same holders: the blocks at prompt positions
/// `start..start + len`, the first one a child of the parent edge's last block.
#[derive(Debug, Default)]
struct Edge {
    parent: u32,
    start: u32,
    /// Child edges (cached continuations of its last block).
    children: u32,
    /// Holds that cover it.
    holders: u32,
    /// When its last holder let go (the cache's clock).
    stamp: u64,
    /// Bumped each time the slot is freed, so a stale hold or queue entry is told apart.
    generation: u32,
    hashes: Vec<BlockHash>,
    blocks: Vec<BlockId>,
}

impl Edge {
    /// Whether a queue entry `(stamp, generation)` for this slot still names it as an
    /// evictable leaf: the same edge (not a later one in the slot), no holder, no child, last
    /// released at that stamp.
    fn queued_as(&self, stamp: u64, generation: u32) -> bool {
        self.generation == generation
            && self.holders == 0
            && self.children == 0
            && self.stamp == stamp
            && !self.blocks.is_empty()
    }
}

/// A request's hold on the cached prefix it uses: its blocks cannot be evicted until the
/// hold is given back with [`RadixCache::release`].
///
/// Holds are not `Clone`: each one is released once. Release every hold, a miss's too: an
/// [`insert`](RadixCache::insert) under a miss's [`NOTHING`](Self::NOTHING) makes it hold
/// the blocks it cached. A hold dropped without a release keeps its blocks cached and out of
/// eviction's reach for as long as the cache lives.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a hold keeps its blocks from eviction until it is released"]
pub struct RadixHold {
    /// The id of the cache that handed it out.
    cache: u32,
    edge: u32,
    generation: u32,
    blocks: u32,
}

impl RadixHold {
    /// A hold of nothing (what a miss returns).
    pub const NOTHING: Self = Self {
        cache: 0,
        edge: NONE,
        generation: 0,
        blocks: 0,
    };

    /// How many blocks, from the prompt's first, the hold covers.
    #[must_use]
    pub fn blocks(&self) -> usize {
        self.blocks as usize
    }
}

/// Why a [`RadixCache`] refused a call. Nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RadixError {
    /// The hold is not one this cache handed out and still holds (another cache's, or one
    /// whose blocks were released already).
    #[error("the hold is not one this cache holds")]
    UnknownHold,
    /// An insert whose block list and hash list differ in length.
    #[error("insert of {hashes} hashes with {blocks} blocks: one block per hash is required")]
    LengthMismatch {
        /// Hashes given.
        hashes: usize,
        /// Blocks given.
        blocks: usize,
    },
    /// An insert that is not of the held prompt: at the held prefix's last position, its
    /// block or its hash is not the one the hold covers there (the hold of another prompt, or
    /// another request's blocks). Only that position is compared: with chained hashes, the
    /// same hash there means the same prefix, and the insert reads no block before it.
    #[error("the insert's block or hash {index} is not the one its hold covers there")]
    NotTheHeldPrefix {
        /// The held prefix's last position (`RadixHold::blocks() - 1`).
        index: usize,
    },
}

/// Counters since the cache was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RadixStats {
    /// Lookups.
    pub lookups: u64,
    /// Blocks the lookups hit.
    pub hit_blocks: u64,
    /// Blocks inserted (newly cached).
    pub inserted_blocks: u64,
    /// Blocks handed back by [`RadixCache::evict`].
    pub evicted_blocks: u64,
    /// Edges split by a hit ending inside them.
    pub splits: u64,
}

/// A prefix cache of block runs with leaf-first LRU eviction; see the module docs for what
/// it trades for speed.
///
/// The flow per request: [`lookup`](Self::lookup) the prompt's block hashes (the hit's blocks
/// come back, held: take a pool reference on each for the request, as on the blocks it
/// allocates), compute the rest into blocks the caller allocates,
/// [`insert`](Self::insert) the prompt's full blocks under the same hold (the newly cached
/// ones come back: take a pool reference on each for the cache), and
/// [`release`](Self::release) the hold when the request ends, with the request's pool
/// reference on each of its blocks. When memory runs short, [`evict`](Self::evict) hands back
/// blocks no hold covers, least recently used first: releasing the cache's reference on each
/// frees it. The cache never touches the pool; with that rule, the pool's used blocks are the
/// cached ones ([`len`](Self::len)) plus those running requests hold privately.
///
/// ```
/// use kvc_reuse::{BlockHasher, BlockId, HashExtra, RadixCache, Xxh3Hasher};
///
/// let hasher = Xxh3Hasher;
/// let root = hasher.root(&HashExtra::new("llama-3", 1));
/// let prompt: Vec<u32> = (0..40).collect();
/// let mut hashes = Vec::new();
/// hasher.hash_blocks(root, &prompt, 16, &mut hashes); // two full blocks
///
/// let mut cache = RadixCache::new(16);
/// let mut hit = Vec::new();
/// let mut hold = cache.lookup(&hashes, prompt.len(), &mut hit);
/// assert!(hit.is_empty());
/// // The request computed its prompt into blocks 7, 8 and 9 and offers the two full ones.
/// let mut newly = Vec::new();
/// cache.insert(&mut hold, &hashes, &[BlockId(7), BlockId(8)], &mut newly)?;
/// assert_eq!(newly, [BlockId(7), BlockId(8)]);
/// cache.release(hold)?;
/// assert_eq!(cache.evictable_blocks(), 2);
///
/// // The same prompt again: both full blocks hit.
/// let hold = cache.lookup(&hashes, prompt.len(), &mut hit);
/// assert_eq!(hit, [BlockId(7), BlockId(8)]);
/// cache.release(hold)?;
///
/// let mut evicted = Vec::new();
/// assert_eq!(cache.evict(1, &mut evicted), 1);
/// assert_eq!(evicted, [BlockId(8)]); // the tail goes first
/// # Ok::<(), kvc_reuse::RadixError>(())
/// ```
#[derive(Debug)]
pub struct RadixCache {
    /// Told apart from other caches' holds.
    id: u32,
    block_size: u32,
    edges: Vec<Edge>,
    free_edges: Vec<u32>,
    by_first: ByFirstHash,
    /// Evictable leaf edges by stamp; entries that no longer are one are skipped.
    queue: BinaryHeap<Reverse<(u64, u32, u32)>>,
    /// The queue's length past which a release drops its stale entries (which only an
    /// eviction would pop otherwise: a cache that never evicts would grow it forever).
    queue_limit: usize,
    clock: u64,
    cached: usize,
    evictable: usize,
    stats: RadixStats,
}

impl RadixCache {
    /// Blocks a freed edge's arrays keep room for.
    const KEEP_CAPACITY: usize = 64;

    /// Queue entries past twice the live ones before the stale ones are dropped.
    const QUEUE_SLACK: usize = 64;

    /// An empty cache of `block_size`-token blocks (a block size of 0 is taken as 1).
    #[must_use]
    pub fn new(block_size: u32) -> Self {
        // Ids wrap after 2^32 caches; 0 stays no cache's.
        let id = NEXT_CACHE_ID.fetch_add(1, Ordering::Relaxed).max(1);
        Self {
            id,
            block_size: block_size.max(1),
            edges: Vec::new(),
            free_edges: Vec::new(),
            by_first: ByFirstHash::default(),
            queue: BinaryHeap::new(),
            queue_limit: Self::QUEUE_SLACK,
            clock: 0,
            cached: 0,
            evictable: 0,
            stats: RadixStats::default(),
        }
    }

    /// Tokens per block.
    #[must_use]
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Blocks cached.
    #[must_use]
    pub fn len(&self) -> usize {
        self.cached
    }

    /// Whether nothing is cached.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.cached == 0
    }

    /// Cached blocks no hold covers: what [`evict`](Self::evict) can hand back now.
    #[must_use]
    pub fn evictable_blocks(&self) -> usize {
        self.evictable
    }

    /// Cached blocks some hold covers.
    #[must_use]
    pub fn in_use_blocks(&self) -> usize {
        self.cached - self.evictable
    }

    /// Counters since the cache was built.
    #[must_use]
    pub fn stats(&self) -> RadixStats {
        self.stats
    }

    /// The longest cached prefix of `hashes` (the chained hashes of a prompt's full blocks),
    /// never covering the prompt's last token (`prompt_tokens` long: its logits must be
    /// computed). Its blocks are appended to `blocks`, in prompt order, and held until the
    /// returned hold is released (also on a miss, where it holds nothing).
    pub fn lookup(
        &mut self,
        hashes: &[BlockHash],
        prompt_tokens: usize,
        blocks: &mut Vec<BlockId>,
    ) -> RadixHold {
        self.stats.lookups = self.stats.lookups.saturating_add(1);
        let usable = (prompt_tokens.saturating_sub(1) / self.block_size as usize).min(hashes.len());
        let (mut at, mut pos) = (NONE, 0usize);
        while pos < usable {
            let Some(&e) = self.by_first.get(&hashes[pos]) else {
                break;
            };
            let edge = &self.edges[e as usize];
            if edge.parent != at || edge.start as usize != pos || edge.holders == u32::MAX {
                // Not a continuation of this path (a hash collision, or hashes that are not
                // chained), or a run that cannot take another holder: the hit ends here.
                break;
            }
            let want = &hashes[pos..usable];
            let matched = edge
                .hashes
                .iter()
                .zip(want)
                .take_while(|(a, b)| a == b)
                .count();
            if matched < edge.hashes.len() {
                // The hit ends inside this edge: split it there, so each edge keeps one set
                // of holders.
                let Some(head) = self.split(e, matched) else {
                    break;
                };
                blocks.extend_from_slice(&self.edges[head as usize].blocks);
                at = head;
                pos += matched;
                break;
            }
            blocks.extend_from_slice(&edge.blocks);
            at = e;
            pos += matched;
        }
        self.stats.hit_blocks = self.stats.hit_blocks.saturating_add(pos as u64);
        if at == NONE {
            return RadixHold::NOTHING;
        }
        let mut e = at;
        while e != NONE {
            let edge = &mut self.edges[e as usize];
            if edge.holders == 0 {
                self.evictable -= edge.blocks.len();
            }
            edge.holders += 1;
            e = edge.parent;
        }
        RadixHold {
            cache: self.id,
            edge: at,
            generation: self.edges[at as usize].generation,
            blocks: pos as u32,
        }
    }

    /// Splits edge `e` after its first `at` blocks (`0 < at < len`): a new edge takes the
    /// head, `e` keeps the tail (so holds naming `e` still name their deepest edge). `None`,
    /// and nothing changed, if the tail's first hash already starts another edge (hashes
    /// that are not chained).
    fn split(&mut self, e: u32, at: usize) -> Option<u32> {
        if at == 0 {
            return None;
        }
        let tail_first = self.edges[e as usize].hashes[at];
        if self.by_first.contains_key(&tail_first) {
            return None;
        }
        let h = self.new_edge();
        let [edge, head] = self.edges.get_disjoint_mut([e as usize, h as usize]).ok()?;
        head.hashes.extend(edge.hashes.drain(..at));
        head.blocks.extend(edge.blocks.drain(..at));
        head.parent = edge.parent;
        head.start = edge.start;
        head.children = 1;
        head.holders = edge.holders;
        head.stamp = edge.stamp;
        edge.parent = h;
        edge.start += at as u32;
        let head_first = head.hashes[0];
        self.by_first.insert(head_first, h);
        self.by_first.insert(tail_first, e);
        self.stats.splits = self.stats.splits.saturating_add(1);
        Some(h)
    }

    /// A free edge slot, empty.
    fn new_edge(&mut self) -> u32 {
        if let Some(e) = self.free_edges.pop() {
            return e;
        }
        self.edges.push(Edge::default());
        (self.edges.len() - 1) as u32
    }

    /// Whether `hold` is one this cache handed out and still holds.
    fn check(&self, hold: &RadixHold) -> Result<(), RadixError> {
        if hold.edge == NONE {
            return if hold.blocks == 0 {
                Ok(())
            } else {
                Err(RadixError::UnknownHold)
            };
        }
        if hold.cache != self.id {
            return Err(RadixError::UnknownHold);
        }
        match self.edges.get(hold.edge as usize) {
            Some(edge)
                if edge.generation == hold.generation
                    && edge.holders > 0
                    && edge.start as usize + edge.blocks.len() == hold.blocks as usize =>
            {
                Ok(())
            }
            _ => Err(RadixError::UnknownHold),
        }
    }

    /// Caches the full blocks of a prompt past what `hold` covers: `hashes` and `blocks` are
    /// the prompt's, from its first block (the first [`RadixHold::blocks`] of them the held
    /// hit). The newly cached blocks are appended to `newly_cached` (take one pool reference
    /// on each for the cache) and the hold grows to cover them; an insert no longer than the
    /// hold caches nothing. A request may insert again under the same hold, a longer prefix
    /// of the same sequence (its prompt and output when it ends, say): the blocks past the
    /// hold are cached the same way. If the block after the hold is cached already (another
    /// request cached the same continuation first), nothing is cached and the request's
    /// blocks stay its own.
    ///
    /// # Errors
    /// [`RadixError::UnknownHold`], [`RadixError::LengthMismatch`], or
    /// [`RadixError::NotTheHeldPrefix`] when the block or the hash at the held prefix's last
    /// position is not the hold's (the insert is not of the held prompt); nothing changed.
    pub fn insert(
        &mut self,
        hold: &mut RadixHold,
        hashes: &[BlockHash],
        blocks: &[BlockId],
        newly_cached: &mut Vec<BlockId>,
    ) -> Result<(), RadixError> {
        if hashes.len() != blocks.len() {
            return Err(RadixError::LengthMismatch {
                hashes: hashes.len(),
                blocks: blocks.len(),
            });
        }
        self.check(hold)?;
        let pos = hold.blocks as usize;
        if hashes.len() <= pos {
            // Nothing past the held prefix (an insert may offer fewer blocks than it hit).
            return Ok(());
        }
        if pos > 0 {
            // The held prefix's last block and hash must be the prompt's there (a cheap check
            // that the insert is the held prompt's: chained hashes that agree there agree on
            // the whole prefix). Another prompt's hashes would hang its blocks under this
            // path, where no lookup reaches them, and can keep that prompt from caching them.
            let edge = &self.edges[hold.edge as usize];
            if blocks.get(pos - 1) != edge.blocks.last()
                || hashes.get(pos - 1) != edge.hashes.last()
            {
                return Err(RadixError::NotTheHeldPrefix { index: pos - 1 });
            }
        }
        let first = hashes[pos];
        if self.by_first.contains_key(&first) {
            return Ok(());
        }
        let parent = hold.edge;
        let n = self.new_edge();
        let edge = &mut self.edges[n as usize];
        edge.hashes.extend_from_slice(&hashes[pos..]);
        edge.blocks.extend_from_slice(&blocks[pos..]);
        edge.parent = parent;
        edge.start = pos as u32;
        edge.children = 0;
        edge.holders = 1;
        edge.stamp = 0;
        let generation = edge.generation;
        if parent != NONE {
            self.edges[parent as usize].children += 1;
        }
        self.by_first.insert(first, n);
        let added = hashes.len() - pos;
        self.cached += added;
        self.stats.inserted_blocks = self.stats.inserted_blocks.saturating_add(added as u64);
        newly_cached.extend_from_slice(&blocks[pos..]);
        // The hold's deepest edge is now the new one; the edges above it count the hold
        // already, and its release walks each once.
        *hold = RadixHold {
            cache: self.id,
            edge: n,
            generation,
            blocks: hashes.len() as u32,
        };
        Ok(())
    }

    /// Gives a hold back: every edge it covers loses a holder, and those left with none
    /// become evictable, last used now (its deepest blocks least recently, so a prefix's tail
    /// goes before its head).
    ///
    /// # Errors
    /// [`RadixError::UnknownHold`]; nothing changed.
    pub fn release(&mut self, hold: RadixHold) -> Result<(), RadixError> {
        self.check(&hold)?;
        let mut e = hold.edge;
        while e != NONE {
            let edge = &mut self.edges[e as usize];
            debug_assert!(
                edge.holders > 0,
                "a hold covers every edge above its deepest"
            );
            edge.holders -= 1;
            if edge.holders == 0 {
                self.clock += 1;
                edge.stamp = self.clock;
                self.evictable += edge.blocks.len();
                if edge.children == 0 {
                    self.queue.push(Reverse((edge.stamp, e, edge.generation)));
                }
            }
            e = edge.parent;
        }
        if self.queue.len() > self.queue_limit {
            self.drop_stale_queue_entries();
        }
        Ok(())
    }

    /// Drops the queue entries that no longer name an evictable leaf edge with that stamp
    /// (what [`evict`](Self::evict) would skip): the order of the rest is unchanged. O(queue
    /// length), once the queue has at least doubled since the last time: O(1) per release.
    fn drop_stale_queue_entries(&mut self) {
        let edges = &self.edges;
        self.queue.retain(|&Reverse((stamp, e, generation))| {
            edges
                .get(e as usize)
                .is_some_and(|edge| edge.queued_as(stamp, generation))
        });
        self.queue_limit = (2 * self.queue.len()).max(self.edges.len()) + Self::QUEUE_SLACK;
    }

    /// Forgets up to `count` blocks no hold covers, least recently used first and each
    /// block after its cached descendants, appending their ids to `evicted` for the caller to
    /// free; returns how many.
    pub fn evict(&mut self, count: usize, evicted: &mut Vec<BlockId>) -> usize {
        let mut n = 0;
        while n < count {
            let Some(&Reverse((stamp, e, generation))) = self.queue.peek() else {
                break;
            };
            let edge = &mut self.edges[e as usize];
            if !edge.queued_as(stamp, generation) {
                // No longer an evictable leaf with that stamp.
                self.queue.pop();
                continue;
            }
            let len = edge.blocks.len();
            let first = edge.hashes[0];
            let k = (count - n).min(len);
            evicted.extend(edge.blocks[len - k..].iter().rev());
            edge.blocks.truncate(len - k);
            edge.hashes.truncate(len - k);
            n += k;
            if k < len {
                break;
            }
            // The edge is gone: its parent may be a leaf now.
            self.queue.pop();
            let parent = edge.parent;
            edge.generation = edge.generation.wrapping_add(1);
            edge.parent = NONE;
            if edge.blocks.capacity() > Self::KEEP_CAPACITY {
                // A free slot keeps small arrays for the next edge, not a long prompt's.
                edge.blocks = Vec::new();
                edge.hashes = Vec::new();
            }
            self.free_edges.push(e);
            if self.by_first.get(&first) == Some(&e) {
                self.by_first.remove(&first);
            }
            if parent != NONE {
                let p = &mut self.edges[parent as usize];
                p.children -= 1;
                if p.children == 0 && p.holders == 0 {
                    self.queue.push(Reverse((p.stamp, parent, p.generation)));
                }
            }
        }
        self.cached -= n;
        self.evictable -= n;
        self.stats.evicted_blocks = self.stats.evicted_blocks.saturating_add(n as u64);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache that never has to evict (a pool larger than its working set) keeps a bounded
    /// eviction queue however many requests it serves: each release of a leaf edge queues
    /// an entry, and only an eviction would pop the stale ones.
    #[test]
    fn the_eviction_queue_stays_bounded_without_evictions() {
        let mut cache = RadixCache::new(1);
        let hashes = [BlockHash(1), BlockHash(2), BlockHash(3)];
        let blocks = [BlockId(0), BlockId(1), BlockId(2)];
        for _ in 0..10_000 {
            let mut hit = Vec::new();
            let mut hold = cache.lookup(&hashes, 4, &mut hit);
            cache
                .insert(&mut hold, &hashes, &blocks, &mut Vec::new())
                .unwrap();
            cache.release(hold).unwrap();
        }
        assert_eq!(cache.len(), 3);
        assert!(
            cache.queue.len() <= 2 * cache.edges.len() + RadixCache::QUEUE_SLACK,
            "{} queue entries for {} edges",
            cache.queue.len(),
            cache.edges.len()
        );
        // The order is unchanged: the whole run still goes, tail first.
        let mut evicted = Vec::new();
        assert_eq!(cache.evict(usize::MAX, &mut evicted), 3);
        assert_eq!(evicted, [BlockId(2), BlockId(1), BlockId(0)]);
    }
}
