//! Eviction policies: which evictable cached block goes first.
//!
//! The [`PrefixCache`](crate::PrefixCache) owns the tree and the leaf-first rule: a policy only
//! ever sees *evictable* blocks (cached, used by no running request, no cached child, default
//! retention priority) and picks among them. It is told when a block is cached, hit, becomes
//! evictable, stops being evictable, and leaves the cache.
//!
//! Slots are the cache's internal node indices; a slot is reused after `on_remove`.

use std::collections::{BTreeSet, VecDeque};

use crate::BlockHash;
use crate::continuation::{Checkpoints, Credits, GapMedian};
use crate::fifo_map::FifoMap;
pub use crate::lru::Lru;

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
    /// hit length); 0 for an insert that followed no lookup, and for blocks offered as more
    /// of a request ([`Access::More`]).
    pub request_hit_blocks: u32,
    /// Full blocks of the touching request.
    pub request_blocks: u32,
    /// Tokens per block of the cache.
    pub block_size: u32,
    /// Whether a lookup or an insert touched the block.
    pub access: Access,
}

/// What touched a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// A lookup hit it (it is now in use).
    Lookup,
    /// An insert of a request's prompt cached it or found it cached; such inserts walk a
    /// prompt's blocks in order, once per request.
    Insert,
    /// An insert of more blocks of a request whose prompt is offered apart (a prefix loaded
    /// from the tiers before it, its reply after it) cached it or found it cached. Not part of
    /// a prompt's walk; blocks the request offered before are not reported at all
    /// (see [`PrefixCache::insert_as`](crate::PrefixCache::insert_as)). A block cached
    /// this way and passed by a prompt's walk ([`Access::Insert`]) before its request
    /// released it is that request's own (a prefill chunk offered ahead of the prompt): the
    /// shipped policies treat it as new to the walk, not as a reuse.
    More,
}

/// An eviction policy over the cache's evictable blocks.
pub trait EvictionPolicy: Send + std::fmt::Debug {
    /// The name used on command lines and in reports.
    fn name(&self) -> &'static str;
    /// `slot` now holds a newly cached block (not yet evictable).
    fn on_insert(&mut self, slot: u32, info: &BlockInfo);
    /// A cached block was used again (a lookup hit, or found cached by an insert).
    fn on_hit(&mut self, slot: u32, info: &BlockInfo);
    /// The block's last holder released it at the cache's clock `stamp` (it is about to
    /// become evictable). A request releases its blocks tail first, so the tail gets the
    /// older stamps. Recency policies count this as the block's last use; the default ignores
    /// it.
    fn on_release(&mut self, slot: u32, stamp: u64) {
        let _ = (slot, stamp);
    }
    /// The block became evictable.
    fn on_evictable(&mut self, slot: u32);
    /// The block stopped being evictable (in use, got a cached child, or retained).
    fn on_unevictable(&mut self, slot: u32);
    /// The block left the cache; forget the slot.
    fn on_remove(&mut self, slot: u32);
    /// Removes and returns the evictable block to evict next, if any.
    fn pop_victim(&mut self) -> Option<u32>;
    /// Appends up to `n` blocks likely to be evicted next, in order, without removing them:
    /// a hint the cache uses to fetch their memory ahead of time. The default gives none.
    fn peek_victims(&self, n: usize, out: &mut Vec<u32>) {
        let _ = (n, out);
    }
    /// Whether the block in `slot`, not evictable now and last used at the cache's clock
    /// `stamp` (the stamp this policy was last given for it), would be the very next victim if
    /// it became evictable now. When this says yes, the cache may evict the block at once
    /// without calling [`on_evictable`](Self::on_evictable), [`pop_victim`](Self::pop_victim)
    /// or [`on_remove`](Self::on_remove) for it (a parent whose last child was just evicted,
    /// the usual case when a chain is evicted tail first), so a policy answers yes only if
    /// it keeps no state for a non-evictable slot that `on_remove` would have to clear. It may
    /// tidy its own structures (not its order) while answering. The default says no.
    fn evicts_next(&mut self, slot: u32, stamp: u64) -> bool {
        let _ = (slot, stamp);
        false
    }
    /// Whether this policy is plain least recently used by the stamps the cache gives it, in
    /// exactly [`Lru`]'s order (`(stamp, slot)`, oldest first), as [`Lru`] is. The cache
    /// then keeps that order itself, beside its own nodes, and calls none of the policy's
    /// other methods but [`name`](Self::name): a block's recency is then read where the cache
    /// reads the block anyway, not in a table of the policy's. The default says no.
    fn is_plain_lru(&self) -> bool {
        false
    }
}

/// The policies this crate ships, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PolicyKind {
    /// [`Lru`].
    Lru,
    /// [`S3Fifo`].
    S3Fifo,
    /// [`Conversation`].
    Conversation,
    /// [`Adaptive`](crate::Adaptive).
    Adaptive,
    /// [`ReuseOdds`](crate::ReuseOdds) with its model's `kappa`.
    ReuseOdds,
}

impl PolicyKind {
    /// Every shipped policy.
    pub const ALL: &'static [PolicyKind] = &[
        PolicyKind::Lru,
        PolicyKind::S3Fifo,
        PolicyKind::Conversation,
        PolicyKind::Adaptive,
        PolicyKind::ReuseOdds,
    ];

    /// The command-line name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Lru => "lru",
            Self::S3Fifo => "s3fifo",
            Self::Conversation => "conversation",
            Self::Adaptive => "adaptive",
            Self::ReuseOdds => "reuse-odds",
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
            Self::Conversation => Box::new(Conversation::new(capacity_blocks)),
            Self::Adaptive => Box::new(crate::Adaptive::new(capacity_blocks)),
            Self::ReuseOdds => Box::new(crate::ReuseOdds::new(
                capacity_blocks,
                crate::ReuseOdds::MODEL_KAPPA,
            )),
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
    /// Cached outside any prompt's walk ([`Access::More`]) and not yet released: its own
    /// request's prompt walk passing it (after a prefill chunk) is not another access.
    fresh: bool,
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
    ghost: FifoMap<()>,
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
            ghost: FifoMap::new(capacity_blocks),
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
        self.ghost.insert(hash, ());
        self.ghost.trim();
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
        let queue = if self.ghost.remove(&info.hash).is_some() {
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
            fresh: info.access == Access::More,
            hash: info.hash,
        };
    }
    fn on_hit(&mut self, slot: u32, info: &BlockInfo) {
        let s = &mut self.slots[slot as usize];
        if s.fresh && info.access == Access::Insert {
            s.fresh = false;
            return;
        }
        s.freq = (s.freq + 1).min(3);
    }
    fn on_release(&mut self, slot: u32, _stamp: u64) {
        self.slots[slot as usize].fresh = false;
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

/// What the [`Conversation`] policy remembers about a late block of an earlier request (a
/// checkpoint near its end), kept after the block is evicted (a ghost) so continuations are
/// recognised even when the cache lost them.
#[derive(Clone, Copy, Debug, Default)]
struct Tip {
    /// The request's sequence number.
    request: u64,
    /// Turns before it in its conversation (0: a first turn).
    turn: u32,
    /// Its request's class.
    class: u16,
    /// Full blocks of its request.
    blocks: u32,
    /// Clock at its request's end.
    stamp: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct ConvSlot {
    stamp: u64,
    shift: i64,
    evictable: bool,
    /// Evictable but out of the order while its request's walk is in progress.
    pending: bool,
    /// Cached outside any prompt's walk ([`Access::More`]) and not yet released: a prompt
    /// walk passing it (its own request's, after a prefill chunk) finds it new.
    fresh: bool,
}

/// Conversation-aware eviction: LRU order shifted by each request's learned probability of
/// being continued.
///
/// An insert walks a prompt's blocks in order. At the end of each walk the policy remembers a
/// few checkpoints among the blocks that request newly cached (its last block and those 1, 2,
/// 4, ..., 64 blocks before it; remembered even after eviction). A later walk that passes a
/// checkpoint continues that conversation: its turn number is the earlier request's plus one,
/// and the earlier request's class is credited with a continuation. Each request gets a class
/// from (turn number capped at 4, log2 of its new tokens in units of 512, capped at 7); the
/// policy counts, per class, requests and continued requests, and estimates
/// `p = (continued + 1) / (requests + 2)`. A block's eviction key is its last access stamp plus
/// `kappa × median continuation gap × logit(p)` of the request that last offered it: requests
/// unlikely to be continued age faster. Everything is learned from the past only.
///
/// A continuation rarely shares the very end of the request it continues (the chat template
/// re-renders the last message; in Mooncake traces the last partial 512-token block is
/// re-hashed). The policy learns that unshared tail (the median, over recent continuations
/// whose source was still cached, of source blocks minus shared blocks) and evicts the newly
/// cached blocks in each request's last `tail` positions before anything else.
///
/// On the Mooncake conversation trace the useful signals are the new-token count (long pasted
/// documents are rarely followed up) and the turn number (deep conversations usually are).
#[derive(Debug)]
pub struct Conversation {
    slots: Vec<ConvSlot>,
    order: BTreeSet<(i64, u32)>,
    /// Blocks of the insert walk in progress: (slot, hash, newly cached).
    walk: Vec<(u32, BlockHash, bool)>,
    /// Deepest checkpoint the walk passed.
    walk_src: Option<Tip>,
    /// Whether the walk passed that checkpoint while it was still cached.
    walk_src_cached: bool,
    /// Recent tails: blocks at the end of a continued request that its continuation did not
    /// share (a chat template re-rendering the last message, or re-chunked tokens).
    tails: VecDeque<u32>,
    tail_estimate: u32,
    tail_samples: u64,
    pending: Vec<u32>,
    tips: Checkpoints<Tip>,
    credited: Credits,
    requests: u64,
    /// Per class: (requests, continued).
    stats: Vec<(u64, u64)>,
    gaps: GapMedian,
    kappa: f64,
}

impl Conversation {
    const TURN_CLASSES: u32 = 5;
    const GROWTH_CLASSES: u32 = 8;
    const TAIL_WINDOW: usize = 1024;
    /// Key shift of blocks in a request's expected unshared tail: evicted before the rest.
    const TAIL_SHIFT: i64 = -(1 << 50);

    /// A policy for a cache of about `capacity_blocks` blocks (sizes the ghost checkpoints),
    /// with the default `kappa` of 3.
    #[must_use]
    pub fn new(capacity_blocks: usize) -> Self {
        Self::with_kappa(capacity_blocks, 3.0)
    }

    /// A policy whose shift is `kappa` median continuation gaps per unit of logit.
    #[must_use]
    pub fn with_kappa(capacity_blocks: usize, kappa: f64) -> Self {
        Self {
            slots: Vec::new(),
            order: BTreeSet::new(),
            walk: Vec::new(),
            walk_src: None,
            walk_src_cached: false,
            tails: VecDeque::new(),
            tail_estimate: 0,
            tail_samples: 0,
            pending: Vec::new(),
            tips: Checkpoints::new(capacity_blocks.max(1 << 16)),
            credited: Credits::new(capacity_blocks.max(1 << 16)),
            requests: 0,
            stats: vec![(0, 0); (Self::TURN_CLASSES * Self::GROWTH_CLASSES) as usize],
            gaps: GapMedian::default(),
            kappa,
        }
    }

    fn key(&self, slot: u32) -> (i64, u32) {
        let s = &self.slots[slot as usize];
        (s.stamp as i64 + s.shift, slot)
    }

    fn add(&mut self, slot: u32) {
        let key = self.key(slot);
        self.order.insert(key);
    }

    fn remove(&mut self, slot: u32) {
        let key = self.key(slot);
        self.order.remove(&key);
    }

    /// Puts back in order the evictable slots whose keys waited for their walk to end.
    fn flush_pending(&mut self) {
        while let Some(slot) = self.pending.pop() {
            let s = &mut self.slots[slot as usize];
            if s.pending {
                s.pending = false;
                if s.evictable {
                    self.add(slot);
                }
            }
        }
    }

    /// Learns the unshared tail of a continued request; the estimate is the median of recent
    /// tails (a tenth or a quarter scored lower on the Mooncake trace).
    fn record_tail(&mut self, tail: u32) {
        self.tails.push_back(tail);
        if self.tails.len() > Self::TAIL_WINDOW {
            self.tails.pop_front();
        }
        self.tail_samples += 1;
        if self.tail_samples.is_multiple_of(32) {
            let mut sorted: Vec<u32> = self.tails.iter().copied().collect();
            sorted.sort_unstable();
            self.tail_estimate = sorted[sorted.len() / 2];
        }
    }

    /// The walk reached the request's last block: classify the request, learn, key its
    /// blocks and leave checkpoints.
    fn end_walk(&mut self, last: &BlockInfo) {
        let bs = u64::from(last.block_size.max(1));
        let blocks = u64::from(last.request_blocks);
        let (turn, growth_blocks) = match self.walk_src.take() {
            Some(src) => {
                if self.credited.credit(src.request) {
                    self.stats[src.class as usize].1 += 1;
                    self.gaps.record(last.stamp.saturating_sub(src.stamp));
                }
                if self.walk_src_cached {
                    let shared = self.walk.iter().take_while(|w| !w.2).count() as u32;
                    self.record_tail(src.blocks.saturating_sub(shared));
                }
                (src.turn + 1, blocks.saturating_sub(u64::from(src.blocks)))
            }
            None => (0, blocks),
        };
        let growth_tokens = (growth_blocks * bs).max(512);
        let growth_class = (growth_tokens / 512).ilog2().min(Self::GROWTH_CLASSES - 1);
        let class = (turn.min(Self::TURN_CLASSES - 1) * Self::GROWTH_CLASSES + growth_class) as u16;
        let (requests, continued) = self.stats[class as usize];
        self.stats[class as usize].0 += 1;
        let p = (continued as f64 + 1.0) / (requests as f64 + 2.0);
        // Until a continuation has been seen there is nothing to learn from: plain LRU.
        let tau = self.kappa * self.gaps.get() as f64;
        let shift = (tau * (p / (1.0 - p)).ln()) as i64;
        let tail_from = self.walk.len().saturating_sub(self.tail_estimate as usize);
        for i in 0..self.walk.len() {
            let (slot, _, new) = self.walk[i];
            let shift = if new && i >= tail_from {
                Self::TAIL_SHIFT
            } else {
                shift
            };
            // The shift is part of the order's key: a slot in the order leaves it around the
            // change, or the order keeps a stale key it can never remove.
            let s = self.slots[slot as usize];
            let ordered = s.evictable && !s.pending;
            if ordered {
                self.remove(slot);
            }
            self.slots[slot as usize].shift = shift;
            if ordered {
                self.add(slot);
            }
        }
        self.flush_pending();
        self.requests += 1;
        let tip = Tip {
            request: self.requests,
            turn,
            class,
            blocks: last.request_blocks,
            stamp: last.stamp,
        };
        let walk = &self.walk;
        self.tips.leave(walk.len(), |i| (walk[i].1, walk[i].2), tip);
        self.walk.clear();
    }

    fn walk_step(&mut self, slot: u32, info: &BlockInfo, new: bool) {
        if info.depth == 0 {
            // A new walk; one cut short (an insert error) keeps its old keys.
            self.walk.clear();
            self.walk_src = None;
            self.walk_src_cached = false;
            self.flush_pending();
        }
        self.walk.push((slot, info.hash, new));
        if let Some(tip) = self.tips.get(&info.hash) {
            self.walk_src = Some(tip);
            self.walk_src_cached = !new;
        }
        if info.depth + 1 == info.request_blocks {
            self.end_walk(info);
        }
    }
}

impl EvictionPolicy for Conversation {
    fn name(&self) -> &'static str {
        "conversation"
    }
    fn on_insert(&mut self, slot: u32, info: &BlockInfo) {
        *grow(&mut self.slots, slot) = ConvSlot {
            stamp: info.stamp,
            shift: 0,
            evictable: false,
            pending: false,
            fresh: info.access == Access::More,
        };
        if info.access == Access::Insert {
            self.walk_step(slot, info, true);
        }
    }
    fn on_hit(&mut self, slot: u32, info: &BlockInfo) {
        let s = self.slots[slot as usize];
        if s.evictable && !s.pending {
            self.remove(slot);
            self.slots[slot as usize].pending = true;
            self.pending.push(slot);
        }
        self.slots[slot as usize].stamp = info.stamp;
        if info.access == Access::Insert {
            self.slots[slot as usize].fresh = false;
            self.walk_step(slot, info, s.fresh);
        } else {
            self.flush_pending();
        }
    }
    fn on_release(&mut self, slot: u32, _stamp: u64) {
        self.slots[slot as usize].fresh = false;
    }
    fn on_evictable(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        if !s.evictable {
            s.evictable = true;
            if !s.pending {
                self.add(slot);
            }
        }
    }
    fn on_unevictable(&mut self, slot: u32) {
        let s = self.slots[slot as usize];
        if s.evictable {
            self.slots[slot as usize].evictable = false;
            if !s.pending {
                self.remove(slot);
            }
        }
    }
    fn on_remove(&mut self, slot: u32) {
        self.on_unevictable(slot);
        self.slots[slot as usize].pending = false;
    }
    fn pop_victim(&mut self) -> Option<u32> {
        self.flush_pending();
        let (_, slot) = self.order.pop_first()?;
        self.slots[slot as usize].evictable = false;
        Some(slot)
    }
}
