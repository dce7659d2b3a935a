//! [`PrefixCache::end_conversation`]: an ended conversation's own blocks are evicted before
//! every other block under every policy, a later use restores them, blocks other
//! conversations share are never demoted, and no block or use count is lost on the way.

use kvc_reuse::{
    BlockHash, BlockHasher, BlockId, ConversationEnd, EndError, HashExtra, PolicyKind, PrefixCache,
    Retention, Xxh3Hasher,
};

const BS: usize = 4;

fn hashes(tokens: &[u32]) -> Vec<BlockHash> {
    let mut out = Vec::new();
    Xxh3Hasher.hash_blocks(
        Xxh3Hasher.root(&HashExtra::new("m", 1)),
        tokens,
        BS,
        &mut out,
    );
    out
}

/// A prompt of `blocks` full blocks: the shared block `[0; BS]` first when `shared`, then
/// blocks unique to `conv`.
fn prompt(conv: u32, blocks: usize, shared: bool) -> Vec<u32> {
    let mut p = Vec::new();
    for b in 0..blocks {
        let t = if shared && b == 0 {
            0
        } else {
            1000 * (conv + 1) + b as u32
        };
        p.extend(std::iter::repeat_n(t, BS));
    }
    p
}

fn cache(policy: PolicyKind) -> PrefixCache {
    PrefixCache::with_policy(BS as u32, policy.build(64))
}

/// A request with prompt hashes `h` runs to completion: looks up, computes the rest into
/// fresh ids from `next`, offers its blocks and releases them. Returns the hit blocks.
fn run(cache: &mut PrefixCache, h: &[BlockHash], next: &mut u32, now: u64) -> usize {
    let hit = cache.lookup(h, h.len() * BS + 1, now);
    let mut blocks = hit.blocks.clone();
    while blocks.len() < h.len() {
        blocks.push(BlockId(*next));
        *next += 1;
    }
    let mut newly = Vec::new();
    cache.insert(h, &blocks, now, &mut newly).unwrap();
    cache.release(&hit.blocks).unwrap();
    cache.release(&newly).unwrap();
    hit.blocks.len()
}

fn evict_all(cache: &mut PrefixCache) -> Vec<BlockId> {
    let mut out = Vec::new();
    let n = cache.len();
    cache.evict(n, 1_000, &mut out);
    out
}

#[test]
fn an_ended_conversation_is_evicted_first_under_every_policy() {
    for &policy in PolicyKind::ALL {
        let mut c = cache(policy);
        let mut next = 0;
        // Conversation 0 first (least recently used), then 1; both share block 0.
        let h0 = hashes(&prompt(0, 4, true));
        let h1 = hashes(&prompt(1, 4, true));
        run(&mut c, &h0, &mut next, 1);
        run(&mut c, &h1, &mut next, 2);
        let before: Vec<Option<u32>> = (0..next).map(|b| c.use_count(BlockId(b))).collect();
        // The most recently used conversation ended: its own three blocks go first.
        let end = c.end_conversation(&h1, 0, 3).unwrap();
        assert_eq!(
            end,
            ConversationEnd {
                demoted: 3,
                kept: 1, // block 0: conversation 0 branches there
                uncached: 0
            },
            "{policy:?}"
        );
        let after: Vec<Option<u32>> = (0..next).map(|b| c.use_count(BlockId(b))).collect();
        assert_eq!(before, after, "{policy:?}: use counts unchanged");
        assert_eq!(c.block_retention(BlockId(4)), Some(PrefixCache::ENDED));
        assert_eq!(c.block_retention(BlockId(0)), Some(Retention::DEFAULT));
        let mut out = Vec::new();
        c.evict(3, 4, &mut out);
        out.sort();
        assert_eq!(out, [BlockId(4), BlockId(5), BlockId(6)], "{policy:?}");
        // Conversation 0 is whole.
        assert_eq!(c.lookup(&h0, h0.len() * BS + 1, 5).blocks.len(), 4);
    }
}

#[test]
fn without_an_ending_eviction_is_unchanged() {
    for &policy in PolicyKind::ALL {
        let order = |end: bool| {
            let mut c = cache(policy);
            let mut next = 0;
            let h0 = hashes(&prompt(0, 3, true));
            let h1 = hashes(&prompt(1, 3, true));
            run(&mut c, &h0, &mut next, 1);
            run(&mut c, &h1, &mut next, 2);
            if end {
                // Ending a conversation none of whose blocks is cached changes nothing.
                let gone = hashes(&prompt(7, 3, false));
                let e = c.end_conversation(&gone, 0, 3).unwrap();
                assert_eq!((e.demoted, e.uncached), (0, 3));
            }
            evict_all(&mut c)
        };
        assert_eq!(order(false), order(true), "{policy:?}");
    }
}

#[test]
fn a_later_use_restores_the_default() {
    for &policy in PolicyKind::ALL {
        let mut c = cache(policy);
        let mut next = 0;
        let h0 = hashes(&prompt(0, 3, false));
        let h1 = hashes(&prompt(1, 3, false));
        run(&mut c, &h0, &mut next, 1);
        run(&mut c, &h1, &mut next, 2);
        assert_eq!(c.end_conversation(&h0, 0, 3).unwrap().demoted, 3);
        // The conversation goes on after all: its next turn hits all three blocks...
        let mut longer = prompt(0, 3, false);
        longer.extend(std::iter::repeat_n(77, BS));
        let h0b = hashes(&longer);
        assert_eq!(run(&mut c, &h0b, &mut next, 4), 3, "{policy:?}");
        for b in 0..3 {
            assert_eq!(
                c.block_retention(BlockId(b)),
                Some(Retention::DEFAULT),
                "{policy:?}"
            );
        }
        // ...and is now the most recent: LRU evicts conversation 1 first. (Other policies
        // order by their own rules, but none ranks a restored block below the default.)
        if policy == PolicyKind::Lru {
            let mut out = Vec::new();
            c.evict(3, 5, &mut out);
            out.sort();
            assert_eq!(out, [BlockId(3), BlockId(4), BlockId(5)]);
        }
        // An acquire (a session keeping the blocks) restores a demoted block too.
        let e = c.end_conversation(&h0b, 0, 6).unwrap();
        assert_eq!(e.demoted, 4, "{policy:?}");
        c.acquire(&[BlockId(6)]).unwrap();
        assert_eq!(c.block_retention(BlockId(6)), Some(Retention::DEFAULT));
        c.release(&[BlockId(6)]).unwrap();
        assert_eq!(c.block_retention(BlockId(2)), Some(PrefixCache::ENDED));
    }
}

#[test]
fn shared_in_use_and_pinned_blocks_are_kept() {
    let mut c = cache(PolicyKind::Lru);
    let mut next = 0;
    let h0 = hashes(&prompt(0, 5, false));
    run(&mut c, &h0, &mut next, 1);
    // `keep_first`: the application says the first two blocks are a shared system prompt.
    let e = c.end_conversation(&h0, 2, 2).unwrap();
    assert_eq!(
        (e.demoted, e.kept, e.uncached),
        (3, 0, 0),
        "blocks 2, 3, 4 demoted"
    );
    assert_eq!(c.block_retention(BlockId(1)), Some(Retention::DEFAULT));
    // A block in use stops the walk: it and its prefix keep their standing.
    let hit = c.lookup(&h0[..4], 4 * BS + 1, 3); // blocks 0..4 in use
    let e = c.end_conversation(&h0, 0, 4).unwrap();
    assert_eq!((e.demoted, e.kept), (1, 4), "only block 4 is free");
    c.release(&hit.blocks).unwrap();
    assert_eq!(c.block_retention(BlockId(3)), Some(Retention::DEFAULT));
    // A pin wins over an ending, and so does everything before it.
    let pin = Retention {
        priority: 90,
        until: None,
    };
    assert!(c.set_retention(h0[2], pin, 5));
    let e = c.end_conversation(&h0, 0, 6).unwrap();
    assert_eq!((e.demoted, e.kept), (2, 3));
    assert_eq!(c.block_retention(BlockId(2)), Some(pin));
    // Past the cached part: uncached.
    let mut longer = prompt(0, 5, false);
    longer.extend(std::iter::repeat_n(9, 2 * BS));
    let e = c.end_conversation(&hashes(&longer), 0, 7).unwrap();
    assert_eq!(e.uncached, 2);
}

#[test]
fn ending_every_turn_oldest_first_demotes_the_whole_conversation() {
    for oldest_first in [false, true] {
        let mut c = cache(PolicyKind::Lru);
        let mut next = 0;
        // Turn 1: blocks a, b, t (t: the tail the next turn rewrites); turn 2: a, b, x, y.
        let turn1: Vec<u32> = [1, 2, 3].iter().flat_map(|&t| [t; BS]).collect();
        let turn2: Vec<u32> = [1, 2, 8, 9].iter().flat_map(|&t| [t; BS]).collect();
        let (h1, h2) = (hashes(&turn1), hashes(&turn2));
        run(&mut c, &h1, &mut next, 1);
        assert_eq!(run(&mut c, &h2, &mut next, 2), 2);
        if oldest_first {
            let e = c.end_conversation(&h1, 0, 3).unwrap();
            assert_eq!((e.demoted, e.kept), (1, 2), "t only: turn 2 branches at b");
            let e = c.end_conversation(&h2, 0, 3).unwrap();
            assert_eq!(
                (e.demoted, e.kept),
                (4, 0),
                "past b: its other child t ended"
            );
        } else {
            let e = c.end_conversation(&h2, 0, 3).unwrap();
            assert_eq!(
                (e.demoted, e.kept),
                (2, 2),
                "x, y only: t is still live at b"
            );
        }
        let ended = (0..next)
            .filter(|&b| c.block_retention(BlockId(b)) == Some(PrefixCache::ENDED))
            .count();
        assert_eq!(ended, if oldest_first { 5 } else { 2 });
    }
}

#[test]
fn a_broken_chain_is_refused_and_changes_nothing() {
    let mut c = cache(PolicyKind::Lru);
    let mut next = 0;
    let h0 = hashes(&prompt(0, 3, false));
    let h1 = hashes(&prompt(1, 3, false));
    run(&mut c, &h0, &mut next, 1);
    run(&mut c, &h1, &mut next, 2);
    let mixed = [h0[0], h1[1], h1[2]];
    assert_eq!(
        c.end_conversation(&mixed, 0, 3),
        Err(EndError::BrokenChain { index: 1 })
    );
    assert_eq!(
        c.end_conversation(&h0[1..], 0, 3),
        Err(EndError::BrokenChain { index: 0 }),
        "not from the first block"
    );
    for b in 0..6 {
        assert_eq!(c.block_retention(BlockId(b)), Some(Retention::DEFAULT));
    }
}

#[test]
fn nothing_leaks_through_endings_hits_and_evictions() {
    for &policy in PolicyKind::ALL {
        let mut c = cache(policy);
        let mut next = 0;
        let mut rng = kvc_core::rng::SplitMix64::new(7);
        let cap = 24;
        let mut freed = Vec::new();
        for step in 0..400u64 {
            let conv = (rng.next_u64() % 6) as u32;
            let len = 1 + (rng.next_u64() % 6) as usize;
            let h = hashes(&prompt(conv, len, true));
            run(&mut c, &h, &mut next, step);
            if rng.next_u64().is_multiple_of(3) {
                let keep = (rng.next_u64() % 2) as usize;
                let _ = c.end_conversation(&h, keep, step).unwrap();
            }
            if c.len() > cap {
                let n = c.len() - cap;
                assert_eq!(c.evict(n, step, &mut freed), n, "{policy:?}");
            }
            assert_eq!(c.in_use_blocks(), 0, "{policy:?}");
            assert_eq!(c.evictable_blocks(), c.len(), "{policy:?}");
        }
        freed.extend(evict_all(&mut c));
        assert!(c.is_empty(), "{policy:?}");
        // Every id handed out was cached once and handed back once (ids are never reused
        // here, and a fresh id the cache did not keep is never cached).
        assert_eq!(
            freed.len(),
            next as usize,
            "{policy:?}: every block handed back"
        );
        freed.sort();
        let before = freed.len();
        freed.dedup();
        assert_eq!(freed.len(), before, "{policy:?}: a block handed back twice");
        assert!(freed.iter().all(|b| b.0 < next));
    }
}
