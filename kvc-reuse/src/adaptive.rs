//! [`Adaptive`]: an eviction policy that learns online which signal predicts reuse on the
//! traffic it sees, instead of being tuned to one trace (its docs say how).

use kvc_core::BlockId;

use crate::policy::{Access, BlockInfo, EvictionPolicy, Lru, S3Fifo};
use crate::{BlockHash, PrefixCache, ReuseOdds};

/// How many experts [`Adaptive`] runs.
const N: usize = 4;

/// One expert's shadow: a hash-only prefix cache replaying every request, to count what the
/// expert would have hit on this traffic.
#[derive(Debug)]
struct Shadow {
    cache: PrefixCache,
    next_block: u32,
    free: Vec<BlockId>,
    blocks: Vec<BlockId>,
    newly: Vec<BlockId>,
    /// Hit blocks, decayed.
    score: f64,
}

impl Shadow {
    fn new(block_size: u32, policy: Box<dyn EvictionPolicy>) -> Self {
        Self {
            cache: PrefixCache::with_policy(block_size, policy),
            next_block: 0,
            free: Vec::new(),
            blocks: Vec::new(),
            newly: Vec::new(),
            score: 0.0,
        }
    }

    /// Replays one request of full blocks `hashes` (request at a time: look up, cache,
    /// release, evict down to `capacity`); returns its hit blocks.
    fn replay(&mut self, hashes: &[BlockHash], capacity: usize) -> usize {
        let tokens = hashes.len() * self.cache.block_size() as usize + 1;
        let hit = self.cache.lookup(hashes, tokens, 0);
        let hits = hit.blocks.len();
        self.blocks.clear();
        self.blocks.extend_from_slice(&hit.blocks);
        while self.blocks.len() < hashes.len() {
            let id = self.free.pop().unwrap_or_else(|| {
                self.next_block = self.next_block.wrapping_add(1);
                BlockId(self.next_block - 1)
            });
            self.blocks.push(id);
        }
        self.newly.clear();
        // A refused offer (never for hashes this shadow issued ids for) keeps blocks private.
        let _ = self.cache.insert(hashes, &self.blocks, 0, &mut self.newly);
        let _ = self.cache.release(&hit.blocks);
        let _ = self.cache.release(&self.newly);
        let mut kept = self.newly.iter().peekable();
        for &b in &self.blocks[hits..] {
            if kept.peek() == Some(&&b) {
                kept.next();
            } else {
                self.free.push(b);
            }
        }
        if self.cache.len() > capacity {
            let over = self.cache.len() - capacity;
            self.cache.evict(over, 0, &mut self.free);
        }
        hits
    }
}

/// The adaptive policy: four experts, the real cache evicting in the order of the one whose
/// shadow cache hits most on the recent traffic.
///
/// It keeps four experts, each with its own order over the cache's evictable blocks:
/// - **recency** ([`Lru`]): the least recently used block first;
/// - **scan resistance** ([`S3Fifo`]): new blocks on probation in a small FIFO, promoted when
///   used again, which keeps a hot set (hot documents, hot prefixes) through bursts of
///   one-off prompts;
/// - **reuse odds** ([`ReuseOdds`]), twice: LRU shifted by each block's learned probability of
///   being used again (from its request's turn and new tokens, its own past uses and its
///   position), at the shift its model gives and at twice that.
///
/// Which expert evicts is decided by what each one *would* have hit on this traffic: the
/// policy reconstructs every request's block hashes from the insert walk the cache reports,
/// and replays them through one shadow cache per expert (hashes only, no KV memory) of the
/// real cache's size (learned as the most blocks the real cache has held). Each shadow's hit
/// blocks are summed with an exponential decay (a window of a few cache turnovers, so the
/// policy follows traffic that changes), and the real cache evicts in the order of the
/// expert whose shadow is ahead: follow the leader, with counterfactual hit counts instead of
/// guesses. Recency leads until another expert is ahead by more than the noise of the counts
/// (two standard deviations of a count, taken as Poisson), so the policy behaves like LRU
/// whenever no other signal helps.
///
/// Nothing is fitted to a trace: the experts learn their own statistics online, the window
/// is a multiple of the cache's own size, and the switching margin is a statistical one. The
/// price is CPU and memory: four orders over the real cache plus four shadow caches, several
/// times LRU's work per block (see `docs/reuse.md` for the measured cost).
#[derive(Debug)]
pub struct Adaptive {
    /// The recency and scan-resistance experts' orders over the real cache.
    lru: Lru,
    s3fifo: S3Fifo,
    /// Both reuse-odds experts: one model (what it learns does not depend on the shift), one
    /// order per shift.
    odds: ReuseOdds,
    shadows: Vec<Shadow>,
    /// The expert evicting now.
    leader: usize,
    /// Blocks of the insert walk in progress.
    walk: Vec<BlockHash>,
    /// The walk in shadow blocks.
    coarse: Vec<BlockHash>,
    /// Blocks the real cache holds now, and the most it has held (the shadows' size).
    held: usize,
    most_held: usize,
    /// Capacity hint, for the experts' own ghost lists.
    capacity_hint: usize,
    /// Evictions each expert made, and requests during which it led.
    chosen: [u64; N],
    led: [u64; N],
}

impl Adaptive {
    /// The expert names, in [`Adaptive::stats`] order. Recency comes first: it leads until
    /// another expert is ahead.
    pub const EXPERTS: [&'static str; N] = ["lru", "s3fifo", "reuse-odds", "reuse-odds*2"];
    /// The decay window of the shadows' hit counts, in cache turnovers: blocks walked by
    /// requests, as a multiple of the cache's size.
    const WINDOW_TURNOVERS: f64 = 4.0;
    /// Tokens per shadow block at least: with small blocks the shadows group consecutive
    /// blocks into one (a 16-token cache's shadows replay 256-token blocks, 16 times less
    /// work), which changes hit counts little and their ranking less.
    const SHADOW_BLOCK_TOKENS: u32 = 256;

    /// A policy for a cache of about `capacity_blocks` blocks (sizes the experts' ghost
    /// lists; a capacity of 0 is taken as 65,536 blocks). The shadows take the real cache's
    /// size from what it holds, not from this hint.
    #[must_use]
    pub fn new(capacity_blocks: usize) -> Self {
        let cap = if capacity_blocks == 0 {
            1 << 16
        } else {
            capacity_blocks
        };
        Self {
            lru: Lru::default(),
            s3fifo: S3Fifo::new(cap),
            odds: ReuseOdds::with_kappas(cap, &Self::KAPPAS),
            shadows: Vec::new(),
            leader: 0,
            walk: Vec::new(),
            coarse: Vec::new(),
            held: 0,
            most_held: 0,
            capacity_hint: cap,
            chosen: [0; N],
            led: [0; N],
        }
    }

    /// The shifts of the two reuse-odds experts: the model's, and twice it.
    const KAPPAS: [f64; 2] = [ReuseOdds::MODEL_KAPPA, ReuseOdds::MODEL_KAPPA * 2.0];

    /// The experts as separate policies, in [`Adaptive::EXPERTS`] order, for the shadows.
    fn fresh_experts(cap: usize) -> [Box<dyn EvictionPolicy>; N] {
        [
            Box::new(Lru::default()),
            Box::new(S3Fifo::new(cap)),
            Box::new(ReuseOdds::new(cap, Self::KAPPAS[0])),
            Box::new(ReuseOdds::new(cap, Self::KAPPAS[1])),
        ]
    }

    /// The next victim in expert `e`'s order (the other experts forget it when the cache
    /// removes it).
    fn pop_victim_of(&mut self, e: usize) -> Option<u32> {
        match e {
            0 => self.lru.pop_victim(),
            1 => self.s3fifo.pop_victim(),
            _ => self.odds.pop_victim_in(e - 2),
        }
    }

    /// Per expert, in [`Adaptive::EXPERTS`] order: (its shadow's decayed hit blocks,
    /// evictions it made in the real cache, requests after which it led).
    #[must_use]
    pub fn stats(&self) -> [(f64, u64, u64); N] {
        std::array::from_fn(|e| {
            (
                self.shadows.get(e).map_or(0.0, |s| s.score),
                self.chosen[e],
                self.led[e],
            )
        })
    }

    /// The expert evicting now (an index into [`Adaptive::EXPERTS`]).
    #[must_use]
    pub fn leader(&self) -> usize {
        self.leader
    }

    /// A request's walk is complete: replay it through every shadow and pick the leader.
    fn end_walk(&mut self, block_size: u32) {
        let group = (Self::SHADOW_BLOCK_TOKENS / block_size.max(1)).max(1) as usize;
        if self.shadows.is_empty() {
            let cap = self.capacity_hint / group;
            self.shadows = Self::fresh_experts(cap)
                .into_iter()
                .map(|p| Shadow::new(block_size.saturating_mul(group as u32), p))
                .collect();
        }
        // A group of blocks is named by its last block's hash: hashes are chained, so it
        // stands for the whole prefix up to there.
        self.coarse.clear();
        self.coarse
            .extend(self.walk.chunks_exact(group).map(|g| g[group - 1]));
        let capacity = (self.most_held / group).max(1);
        let window = Self::WINDOW_TURNOVERS * self.most_held.max(1) as f64;
        let decay = (-(self.walk.len() as f64) / window).exp();
        for shadow in &mut self.shadows {
            let hits = shadow.replay(&self.coarse, capacity);
            shadow.score = shadow.score * decay + hits as f64;
        }
        let lead = self.shadows[self.leader].score;
        let (best, top) = self
            .shadows
            .iter()
            .enumerate()
            .map(|(e, s)| (e, s.score))
            .fold(
                (self.leader, lead),
                |acc, x| if x.1 > acc.1 { x } else { acc },
            );
        // Switch only on a lead larger than the counts' noise (two Poisson deviations).
        if best != self.leader && top - lead > 2.0 * top.sqrt() {
            self.leader = best;
        }
        self.led[self.leader] += 1;
        self.walk.clear();
    }

    fn walk_step(&mut self, info: &BlockInfo) {
        if info.access != Access::Insert {
            return;
        }
        if info.depth == 0 {
            // A new walk; one cut short (an insert error) is dropped.
            self.walk.clear();
        }
        if info.depth as usize != self.walk.len() {
            return;
        }
        self.walk.push(info.hash);
        if info.depth + 1 == info.request_blocks {
            self.end_walk(info.block_size);
        }
    }
}

impl EvictionPolicy for Adaptive {
    fn name(&self) -> &'static str {
        "adaptive"
    }
    fn on_insert(&mut self, slot: u32, info: &BlockInfo) {
        self.held += 1;
        self.most_held = self.most_held.max(self.held);
        self.lru.on_insert(slot, info);
        self.s3fifo.on_insert(slot, info);
        self.odds.on_insert(slot, info);
        self.walk_step(info);
    }
    fn on_hit(&mut self, slot: u32, info: &BlockInfo) {
        self.lru.on_hit(slot, info);
        self.s3fifo.on_hit(slot, info);
        self.odds.on_hit(slot, info);
        self.walk_step(info);
    }
    fn on_release(&mut self, slot: u32, stamp: u64) {
        self.lru.on_release(slot, stamp);
        self.s3fifo.on_release(slot, stamp);
        self.odds.on_release(slot, stamp);
    }
    fn on_evictable(&mut self, slot: u32) {
        self.lru.on_evictable(slot);
        self.s3fifo.on_evictable(slot);
        self.odds.on_evictable(slot);
    }
    fn on_unevictable(&mut self, slot: u32) {
        self.lru.on_unevictable(slot);
        self.s3fifo.on_unevictable(slot);
        self.odds.on_unevictable(slot);
    }
    fn on_remove(&mut self, slot: u32) {
        self.held = self.held.saturating_sub(1);
        self.lru.on_remove(slot);
        self.s3fifo.on_remove(slot);
        self.odds.on_remove(slot);
    }
    fn pop_victim(&mut self) -> Option<u32> {
        // Every expert orders the same evictable set, so the leader normally answers; the
        // others are asked only if it has nothing.
        let first = self.leader;
        let (expert, slot) = (0..N)
            .map(|k| (first + k) % N)
            .find_map(|e| self.pop_victim_of(e).map(|s| (e, s)))?;
        // The others forget it when the cache removes it (`on_remove`), right after this.
        self.chosen[expert] += 1;
        Some(slot)
    }
    fn peek_victims(&self, n: usize, out: &mut Vec<u32>) {
        match self.leader {
            0 => self.lru.peek_victims(n, out),
            1 => self.s3fifo.peek_victims(n, out),
            e => self.odds.peek_victims_in(e - 2, n, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Access;

    fn info(hash: u128, stamp: u64) -> BlockInfo {
        BlockInfo {
            hash: BlockHash(hash),
            depth: 0,
            stamp,
            request_hit_blocks: 0,
            request_blocks: 1,
            block_size: 16,
            access: Access::Insert,
        }
    }

    #[test]
    fn every_evictable_block_comes_out_once() {
        let mut p = Adaptive::new(8);
        for s in 0..6u32 {
            p.on_insert(s, &info(u128::from(s) + 1, u64::from(s)));
            p.on_evictable(s);
        }
        p.on_unevictable(2);
        let mut out = Vec::new();
        while let Some(s) = p.pop_victim() {
            p.on_remove(s);
            out.push(s);
        }
        out.sort_unstable();
        assert_eq!(out, [0, 1, 3, 4, 5]);
    }

    /// Replays `requests` (each a list of block ids, chained) through a cache of `capacity`
    /// blocks of 256 tokens, under `adaptive` or LRU; returns the hit blocks.
    fn replay(requests: &[Vec<u32>], capacity: usize, adaptive: bool) -> usize {
        let policy: Box<dyn EvictionPolicy> = if adaptive {
            Box::new(Adaptive::new(capacity))
        } else {
            Box::new(Lru::default())
        };
        crate::test_replay::replay(requests, capacity, 256, policy)
    }

    #[test]
    fn it_follows_the_expert_whose_shadow_hits_more() {
        // A hot set of 8 one-block prompts used all the time, and every 40 requests a scan
        // of 30 one-off prompts of 3 blocks: LRU loses the hot set to every scan.
        let mut requests = Vec::new();
        let mut fresh = 1000u32;
        for round in 0..60u32 {
            for i in 0..40u32 {
                requests.push(vec![(round * 7 + i) % 8]);
            }
            for _ in 0..30 {
                requests.push(vec![fresh, fresh + 1, fresh + 2]);
                fresh += 3;
            }
        }
        let lru = replay(&requests, 40, false);
        let adaptive = replay(&requests, 40, true);
        assert!(adaptive > lru, "adaptive {adaptive} hits, lru {lru}");
    }

    #[test]
    fn it_stays_with_recency_when_nothing_else_helps() {
        let mut p = Adaptive::new(16);
        // One-off prompts: no expert ever hits, so recency keeps the lead.
        for r in 0..200u32 {
            for d in 0..3u32 {
                let i = BlockInfo {
                    hash: BlockHash(u128::from(r * 3 + d) + 1),
                    depth: d,
                    stamp: u64::from(r * 3 + d),
                    request_hit_blocks: 0,
                    request_blocks: 3,
                    block_size: 256,
                    access: Access::Insert,
                };
                p.on_insert(r * 3 + d, &i);
            }
        }
        assert_eq!(p.leader(), 0);
        assert_eq!(p.shadows.len(), Adaptive::EXPERTS.len());
        assert!(p.stats().iter().all(|s| s.0 == 0.0));
        assert_eq!(p.led[0], 200);
    }
}
