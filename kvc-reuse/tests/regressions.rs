//! Regression tests for composed-state failures found through the public API.

use std::collections::HashMap;

use kvc_core::{BlockId, SessionId};
use kvc_reuse::{
    BlockHasher, HashExtra, PolicyKind, PrefixCache, SessionCache, SessionConfig, Truncation,
    Xxh3Hasher,
};

/// A pool's reference counts, as a caller following the documented rules keeps them.
#[derive(Default)]
struct Refs(HashMap<BlockId, u32>);

impl Refs {
    fn add(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
            *self.0.entry(b).or_default() += 1;
        }
    }
    fn drop(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
            let r = self
                .0
                .get_mut(&b)
                .expect("dropped a block never referenced");
            *r -= 1;
        }
    }
    fn live(&self, b: BlockId) -> bool {
        self.0.get(&b).is_some_and(|&r| r > 0)
    }
}

#[test]
fn a_session_commit_never_leaves_a_freed_block_cached() {
    let cfg = SessionConfig {
        max_tokens: 1_000,
        truncation: Truncation::LastTokens { tokens: 1_000 },
        idle_ms: 1_000,
    };
    let mut prefix = PrefixCache::new(4, PolicyKind::Lru);
    let mut sessions = SessionCache::new(cfg, 4).unwrap();
    let root = Xxh3Hasher.root(&HashExtra::new("m", 1));
    let mut refs = Refs::default();
    let system: Vec<u32> = (0..12).collect();
    let (a, b) = (SessionId(1), SessionId(2));

    // B opens with a 3-block system prompt; A opens with a 2-block prefix of it and commits.
    let tb = sessions
        .open(&mut prefix, &Xxh3Hasher, b, root, &system, 0)
        .unwrap();
    assert_eq!(tb.cached_tokens, 0);
    let ta = sessions
        .open(&mut prefix, &Xxh3Hasher, a, root, &system[..8], 1)
        .unwrap();
    assert_eq!(ta.cached_tokens, 0);
    let mut newly = Vec::new();
    let a_blocks = [BlockId(0), BlockId(1)];
    refs.add(&a_blocks);
    sessions
        .commit(&mut prefix, &Xxh3Hasher, a, &a_blocks, 2, &mut newly)
        .unwrap();
    refs.add(&newly); // the prefix cache's references
    assert_eq!(newly, a_blocks);
    // B commits its own three blocks, then closes.
    let b_blocks = [BlockId(10), BlockId(11), BlockId(12)];
    refs.add(&b_blocks);
    newly.clear();
    sessions
        .commit(&mut prefix, &Xxh3Hasher, b, &b_blocks, 3, &mut newly)
        .unwrap();
    refs.add(&newly);
    assert!(
        newly.is_empty(),
        "A's blocks already hold B's first two blocks: B's stay private"
    );
    let mut released = Vec::new();
    sessions.close(&mut prefix, b, &mut released).unwrap();
    refs.drop(&released);

    // Every block a later lookup returns must still be referenced (never freed KV).
    let mut hashes = Vec::new();
    Xxh3Hasher.hash_blocks(root, &system, 4, &mut hashes);
    let hit = prefix.lookup(&hashes, system.len() + 1, 4);
    for &blk in &hit.blocks {
        assert!(
            refs.live(blk),
            "lookup returned freed {blk}: {:?}",
            hit.blocks
        );
    }
    assert_eq!(hit.blocks, a_blocks);
}

/// A small deterministic generator (SplitMix64) so the seeds below replay exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random public calls against a cache with `policy`: requests that look up, offer their
/// blocks and finish at once or keep their lookup; offers of cached chains again; evictions.
/// Returns the first block evicted while a lookup still held it.
fn drive(policy: PolicyKind, seed: u64) -> Option<(BlockId, usize)> {
    let mut rng = Rng(seed);
    let root = Xxh3Hasher.root(&HashExtra::new("m", 1));
    // Prompts over a two-token alphabet: many shared prefixes, many chains through each block.
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|_| {
            let len = 3 + rng.below(12) as usize;
            (0..len).map(|_| rng.below(2) as u32).collect()
        })
        .collect();
    let chains: Vec<Vec<kvc_reuse::BlockHash>> = prompts
        .iter()
        .map(|p| {
            let mut h = Vec::new();
            Xxh3Hasher.hash_blocks(root, p, 2, &mut h);
            h
        })
        .collect();
    let mut cache = PrefixCache::with_policy(2, policy.build(8));
    let mut held: Vec<Vec<BlockId>> = Vec::new();
    let mut offered: Vec<(usize, Vec<BlockId>)> = Vec::new();
    let mut next = 0u32;
    for step in 0..120 {
        let now = step as u64;
        match rng.below(6) {
            0..=2 => {
                let p = rng.below(prompts.len() as u64) as usize;
                let hit = cache.lookup(&chains[p], prompts[p].len(), now);
                let mut blocks = hit.blocks.clone();
                while blocks.len() < chains[p].len() {
                    blocks.push(BlockId(next));
                    next += 1;
                }
                let mut newly = Vec::new();
                cache.insert(&chains[p], &blocks, now, &mut newly).unwrap();
                cache.release(&newly).unwrap();
                offered.push((p, blocks));
                if rng.below(2) == 0 {
                    held.push(hit.blocks);
                } else {
                    cache.release(&hit.blocks).unwrap();
                }
            }
            3 if !offered.is_empty() => {
                // The same chain offered again (a duplicate completion): changes nothing but
                // its recency.
                let (p, blocks) = offered[rng.below(offered.len() as u64) as usize].clone();
                let mut newly = Vec::new();
                if cache.insert(&chains[p], &blocks, now, &mut newly).is_ok() {
                    cache.release(&newly).unwrap();
                }
            }
            4 if !held.is_empty() => {
                let i = rng.below(held.len() as u64) as usize;
                let blocks = held.swap_remove(i);
                cache.release(&blocks).unwrap();
            }
            _ => {
                let mut out = Vec::new();
                cache.evict(1 + rng.below(4) as usize, now, &mut out);
                for b in out {
                    if held.iter().flatten().any(|&h| h == b) {
                        return Some((b, step));
                    }
                }
            }
        }
    }
    None
}

#[test]
fn conversation_policy_never_evicts_a_block_in_use() {
    for policy in PolicyKind::ALL.iter().copied() {
        for seed in 0..1_000 {
            let bad = drive(policy, seed);
            assert_eq!(
                bad,
                None,
                "{} seed {seed}: evicted a block in use",
                policy.name()
            );
        }
    }
}

#[test]
fn a_session_cache_without_room_for_a_token_is_refused() {
    let cfg = SessionConfig {
        max_tokens: 0,
        truncation: Truncation::LastTokens { tokens: 0 },
        idle_ms: 1_000,
    };
    assert_eq!(
        SessionCache::new(cfg, 4).unwrap_err(),
        kvc_reuse::SessionConfigError::ZeroMaxTokens
    );
}

#[test]
fn metric_counters_saturate_instead_of_overflowing() {
    let mut cache = PrefixCache::new(4, PolicyKind::Lru);
    for now in 0..2 {
        let hit = cache.lookup(&[], usize::MAX, now);
        assert_eq!(hit.tokens, 0);
    }
    let m = cache.metrics();
    assert_eq!((m.queries, m.query_tokens), (2, u64::MAX));
    assert_eq!(m.hit_rate(), 0.0);
}
