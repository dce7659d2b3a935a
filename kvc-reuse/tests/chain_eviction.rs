//! Evicting a chain's parent at once (`EvictionPolicy::evicts_next`) and the cache keeping
//! LRU's order itself (`EvictionPolicy::is_plain_lru`) change nothing a user sees: the same
//! random stream of requests, evictions, retention changes and invalidations runs against a
//! cache with LRU and against one with an LRU behind the policy trait that always answers no
//! (so every parent goes through the policy), and every hit and every eviction must be the
//! same, block for block.

use kvc_reuse::{
    BlockHash, BlockHasher, BlockId, BlockInfo, EvictionPolicy, HashExtra, Lru, PolicyKind,
    PrefixCache, Retention, Xxh3Hasher,
};
use proptest::prelude::*;

const BS: usize = 4;

/// LRU that never lets the cache skip it: the reference.
#[derive(Debug, Default)]
struct Announced(Lru);

impl EvictionPolicy for Announced {
    fn name(&self) -> &'static str {
        "lru-announced"
    }
    fn on_insert(&mut self, slot: u32, info: &BlockInfo) {
        self.0.on_insert(slot, info);
    }
    fn on_hit(&mut self, slot: u32, info: &BlockInfo) {
        self.0.on_hit(slot, info);
    }
    fn on_release(&mut self, slot: u32, stamp: u64) {
        self.0.on_release(slot, stamp);
    }
    fn on_evictable(&mut self, slot: u32) {
        self.0.on_evictable(slot);
    }
    fn on_unevictable(&mut self, slot: u32) {
        self.0.on_unevictable(slot);
    }
    fn on_remove(&mut self, slot: u32) {
        self.0.on_remove(slot);
    }
    fn pop_victim(&mut self) -> Option<u32> {
        self.0.pop_victim()
    }
    fn peek_victims(&self, n: usize, out: &mut Vec<u32>) {
        self.0.peek_victims(n, out);
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// Start a request for prompt `p` (a lookup, then an insert of its full blocks).
    Start(usize),
    /// Finish the oldest running request (release everything it holds).
    Finish,
    /// Evict up to this many blocks.
    Evict(usize),
    /// Give the first `depth` blocks of prompt `p` a priority (0 low, 100 high).
    Retain(usize, usize, u8),
    /// Invalidate prompt `p`'s chain from its block `depth` on.
    Invalidate(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..12usize).prop_map(Op::Start),
        4 => Just(Op::Finish),
        2 => (1..40usize).prop_map(Op::Evict),
        1 => (0..12usize, 1..6usize, prop_oneof![Just(0u8), Just(100u8)])
            .prop_map(|(p, d, pr)| Op::Retain(p, d, pr)),
        1 => (0..12usize, 0..10usize).prop_map(|(p, d)| Op::Invalidate(p, d)),
    ]
}

/// Twelve prompts over a tiny alphabet, so they share prefixes and form trees.
fn prompts() -> impl Strategy<Value = Vec<Vec<u32>>> {
    prop::collection::vec(prop::collection::vec(0..2u32, 4..40), 12)
}

struct Side {
    cache: PrefixCache,
    running: std::collections::VecDeque<Vec<BlockId>>,
    next: u32,
}

impl Side {
    fn new(cache: PrefixCache) -> Self {
        Self {
            cache,
            running: Default::default(),
            next: 0,
        }
    }

    /// Runs `op` and returns what a user sees of it.
    fn apply(&mut self, op: &Op, hashes: &[Vec<BlockHash>], now: u64) -> Vec<u32> {
        match *op {
            Op::Start(p) => {
                let h = &hashes[p];
                let hit = self.cache.lookup(h, h.len() * BS + 1, now);
                let mut blocks = hit.blocks.clone();
                while blocks.len() < h.len() {
                    blocks.push(BlockId(self.next));
                    self.next += 1;
                }
                let mut newly = Vec::new();
                self.cache
                    .insert(h, &blocks, now, &mut newly)
                    .expect("fresh ids");
                let mut held = hit.blocks;
                held.extend(newly);
                let seen = held.iter().map(|b| b.0).collect();
                self.running.push_back(held);
                seen
            }
            Op::Finish => {
                if let Some(held) = self.running.pop_front() {
                    self.cache.release(&held).expect("held by the request");
                }
                Vec::new()
            }
            Op::Evict(n) => {
                let mut out = Vec::new();
                self.cache.evict(n, now, &mut out);
                out.iter().map(|b| b.0).collect()
            }
            Op::Retain(p, depth, priority) => {
                let r = Retention {
                    priority,
                    until: Some(now + 50),
                };
                hashes[p]
                    .iter()
                    .take(depth)
                    .map(|&h| u32::from(self.cache.set_retention(h, r, now)))
                    .collect()
            }
            Op::Invalidate(p, depth) => hashes[p]
                .get(depth)
                .map(|&h| vec![self.cache.invalidate(h) as u32])
                .unwrap_or_default(),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn evicting_parents_at_once_keeps_lrus_order(
        prompts in prompts(),
        ops in prop::collection::vec(op(), 1..200),
    ) {
        let root = Xxh3Hasher.root(&HashExtra::new("m", 1));
        let hashes: Vec<Vec<BlockHash>> = prompts
            .iter()
            .map(|t| {
                let mut out = Vec::new();
                Xxh3Hasher.hash_blocks(root, t, BS, &mut out);
                out
            })
            .collect();
        let mut fast = Side::new(PrefixCache::new(BS as u32, PolicyKind::Lru));
        let mut reference = Side::new(PrefixCache::with_policy(
            BS as u32,
            Box::new(Announced::default()),
        ));
        for (t, op) in ops.iter().enumerate() {
            let now = t as u64 * 10;
            let a = fast.apply(op, &hashes, now);
            let b = reference.apply(op, &hashes, now);
            prop_assert_eq!(a, b, "step {} {:?}", t, op);
            prop_assert_eq!(fast.cache.evictable_blocks(), reference.cache.evictable_blocks());
        }
        // Drain both: the rest goes in the same order too.
        while fast.running.front().is_some() {
            fast.apply(&Op::Finish, &hashes, 1 << 40);
            reference.apply(&Op::Finish, &hashes, 1 << 40);
        }
        let a = fast.apply(&Op::Evict(usize::MAX), &hashes, 1 << 40);
        let b = reference.apply(&Op::Evict(usize::MAX), &hashes, 1 << 40);
        prop_assert_eq!(a, b);
    }
}
