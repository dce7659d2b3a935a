//! Property tests: under any sequence of lookups, inserts, releases, evictions, retention
//! changes and invalidations, with every policy, the cache leaks no block, hands none back
//! twice or while in use, and keeps its hittable set prefix-closed (leaf-first eviction).

use std::collections::BTreeSet;

use kvc_core::{BlockId, Retention};
use kvc_reuse::{BlockHash, BlockHasher, HashExtra, PolicyKind, PrefixCache, Xxh3Hasher};
use proptest::prelude::*;

const BS: usize = 2;

#[derive(Clone, Debug)]
enum Op {
    /// Look up prompt `p`, then offer its blocks (fresh ids for the misses).
    Request {
        p: usize,
        hold: bool,
    },
    /// Release the oldest held lookup.
    Release,
    Evict(usize),
    Retain {
        p: usize,
        block: usize,
        priority: u8,
        ttl: Option<u64>,
    },
    Invalidate {
        p: usize,
        block: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..8usize, any::<bool>()).prop_map(|(p, hold)| Op::Request { p, hold }),
        2 => Just(Op::Release),
        2 => (1..6usize).prop_map(Op::Evict),
        1 => (0..8usize, 0..6usize, 0..=100u8, proptest::option::of(1..50u64))
            .prop_map(|(p, block, priority, ttl)| Op::Retain { p, block, priority, ttl }),
        1 => (0..8usize, 0..6usize).prop_map(|(p, block)| Op::Invalidate { p, block }),
    ]
}

/// Eight prompts over a tiny alphabet so that they share prefixes often.
fn prompts() -> impl Strategy<Value = Vec<Vec<u32>>> {
    proptest::collection::vec(proptest::collection::vec(0..2u32, 3..13), 8)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn no_leaks_no_double_frees_and_prefix_closed(
        prompts in prompts(),
        ops in proptest::collection::vec(op(), 1..80),
        policy in prop_oneof![
            Just(PolicyKind::Lru),
            Just(PolicyKind::S3Fifo),
            Just(PolicyKind::Conversation)
        ],
    ) {
        let root = Xxh3Hasher.root(&HashExtra::new("m", 1));
        let chains: Vec<Vec<BlockHash>> = prompts
            .iter()
            .map(|p| {
                let mut h = Vec::new();
                Xxh3Hasher.hash_blocks(root, p, BS, &mut h);
                h
            })
            .collect();
        let mut cache = PrefixCache::with_policy(BS as u32, policy.build(8));
        let mut owned: BTreeSet<BlockId> = BTreeSet::new();
        let mut held: Vec<Vec<BlockId>> = Vec::new();
        let mut next = 0u32;
        for (now, op) in ops.into_iter().enumerate() {
            let now = now as u64;
            match op {
                Op::Request { p, hold } => {
                    let h = &chains[p];
                    let hit = cache.lookup(h, prompts[p].len(), now);
                    prop_assert!(hit.tokens < prompts[p].len() as u64 || prompts[p].is_empty());
                    for b in &hit.blocks {
                        prop_assert!(owned.contains(b), "hit on a block the cache does not own");
                    }
                    let mut blocks = hit.blocks.clone();
                    while blocks.len() < h.len() {
                        blocks.push(BlockId(next));
                        next += 1;
                    }
                    let mut newly = Vec::new();
                    cache.insert(h, &blocks, now, &mut newly).unwrap();
                    for &b in &newly {
                        prop_assert!(owned.insert(b), "{b} cached twice");
                    }
                    // The request uses its hit blocks and the blocks it newly cached.
                    let mut mine = hit.blocks;
                    mine.extend(newly);
                    if hold {
                        held.push(mine);
                    } else {
                        cache.release(&mine).unwrap();
                    }
                }
                Op::Release => {
                    if !held.is_empty() {
                        let blocks = held.remove(0);
                        cache.release(&blocks).unwrap();
                    }
                }
                Op::Evict(n) => {
                    let mut out = Vec::new();
                    let got = cache.evict(n, now, &mut out);
                    prop_assert_eq!(got, out.len());
                    prop_assert!(got <= n);
                    let in_use: BTreeSet<BlockId> = held.iter().flatten().copied().collect();
                    for b in out {
                        prop_assert!(owned.remove(&b), "{b} handed back twice or never owned");
                        prop_assert!(!in_use.contains(&b), "{b} evicted while in use");
                    }
                }
                Op::Retain { p, block, priority, ttl } => {
                    if let Some(&h) = chains[p].get(block) {
                        let until = ttl.map(|t| now + t);
                        let _ = cache.set_retention(h, Retention { priority, until }, now);
                    }
                }
                Op::Invalidate { p, block } => {
                    if let Some(&h) = chains[p].get(block) {
                        let _ = cache.invalidate(h);
                    }
                }
            }
            prop_assert_eq!(cache.len(), owned.len(), "the cache's count drifted from its blocks");
            for h in &chains {
                let cached: Vec<bool> = h.iter().map(|&x| cache.contains(x)).collect();
                prop_assert!(
                    cached.windows(2).all(|w| w[0] || !w[1]),
                    "a chain has a hole: {:?}", cached
                );
            }
        }
        for blocks in held.drain(..) {
            cache.release(&blocks).unwrap();
        }
        let mut out = Vec::new();
        cache.evict(usize::MAX, u64::MAX, &mut out);
        for b in out {
            prop_assert!(owned.remove(&b));
        }
        prop_assert!(owned.is_empty(), "leaked {:?}", owned);
        prop_assert!(cache.is_empty());
    }
}
