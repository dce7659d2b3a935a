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
    let mut sessions = SessionCache::new(cfg, 4);
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
