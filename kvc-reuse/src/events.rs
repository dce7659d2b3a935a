//! KV events (shaped like vLLM's and SGLang's: `BlockStored`, `BlockRemoved`, `AllCleared`)
//! with increasing event ids, and the cache's counters.

use crate::BlockHash;

/// A change to the set of hittable blocks, for routers and shared tiers that mirror the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KvEvent {
    /// A chain of blocks became hittable: `hashes` in chain order, the first one's parent is
    /// `parent` (`None`: the first block of a prompt).
    BlockStored {
        /// Hash of the block before `hashes[0]`, if any.
        parent: Option<BlockHash>,
        /// The stored blocks, in chain order.
        hashes: Vec<BlockHash>,
    },
    /// These blocks stopped being hittable (evicted or invalidated).
    BlockRemoved {
        /// The removed blocks.
        hashes: Vec<BlockHash>,
    },
    /// Every block stopped being hittable.
    AllCleared,
}

/// An event with its id: ids increase by one per event, from 0, for the cache's lifetime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRecord {
    /// The event id.
    pub id: u64,
    /// The event.
    pub event: KvEvent,
}

/// The queue a subscriber drains. Off until [`PrefixCache::subscribe`](crate::PrefixCache::subscribe)
/// (no cost when nobody listens).
#[derive(Debug, Default)]
pub(crate) struct EventLog {
    enabled: bool,
    next_id: u64,
    queue: Vec<EventRecord>,
}

impl EventLog {
    pub(crate) fn enable(&mut self) {
        self.enabled = true;
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    pub(crate) fn push(&mut self, event: KvEvent) {
        if self.enabled {
            self.queue.push(EventRecord {
                id: self.next_id,
                event,
            });
            self.next_id += 1;
        }
    }

    pub(crate) fn drain(&mut self, out: &mut Vec<EventRecord>) {
        out.append(&mut self.queue);
    }
}

/// The cache's counters since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metrics {
    /// Lookups.
    pub queries: u64,
    /// Prompt tokens looked up.
    pub query_tokens: u64,
    /// Tokens covered by hits.
    pub hit_tokens: u64,
    /// Blocks covered by hits.
    pub hit_blocks: u64,
    /// Blocks newly cached by inserts.
    pub inserted_blocks: u64,
    /// Blocks an insert found cached under another block and counted the offering request
    /// on instead (`PrefixCache::insert_adopting`: two requests computed them at once).
    pub adopted_blocks: u64,
    /// Blocks evicted to make room (`evict`).
    pub evicted_capacity: u64,
    /// Blocks dropped because they were invalidated (document prefix, or `clear`).
    pub evicted_invalidated: u64,
}

impl Metrics {
    /// The counts since `earlier` (a copy taken before), field by field: what happened in
    /// between, for a windowed rate ([`RecentHitRate`](crate::RecentHitRate)). A field that
    /// went down (the counters of another cache) gives 0.
    ///
    /// ```
    /// use kvc_reuse::{PolicyKind, PrefixCache};
    ///
    /// let mut cache = PrefixCache::new(4, PolicyKind::Lru);
    /// let before = cache.metrics();
    /// let _ = cache.lookup(&[], 9, 0);
    /// let step = cache.metrics().since(&before);
    /// assert_eq!((step.queries, step.query_tokens, step.hit_tokens), (1, 9, 0));
    /// ```
    #[must_use]
    pub const fn since(&self, earlier: &Metrics) -> Metrics {
        Metrics {
            queries: self.queries.saturating_sub(earlier.queries),
            query_tokens: self.query_tokens.saturating_sub(earlier.query_tokens),
            hit_tokens: self.hit_tokens.saturating_sub(earlier.hit_tokens),
            hit_blocks: self.hit_blocks.saturating_sub(earlier.hit_blocks),
            inserted_blocks: self.inserted_blocks.saturating_sub(earlier.inserted_blocks),
            adopted_blocks: self.adopted_blocks.saturating_sub(earlier.adopted_blocks),
            evicted_capacity: self
                .evicted_capacity
                .saturating_sub(earlier.evicted_capacity),
            evicted_invalidated: self
                .evicted_invalidated
                .saturating_sub(earlier.evicted_invalidated),
        }
    }

    /// Hit tokens over queried tokens (0 before any query).
    #[must_use]
    pub fn hit_rate(&self) -> f64 {
        if self.query_tokens == 0 {
            0.0
        } else {
            self.hit_tokens as f64 / self.query_tokens as f64
        }
    }
}
