//! Parity with vLLM v1's automatic prefix caching, one test per behaviour, at the reuse level
//! (through `kvc_core::ReuseIndex` where a scheduler would use it). Deliberate differences are
//! listed in `docs/reuse.md`.

use kvc_reuse::{
    BlockHash, BlockHasher, BlockId, HashExtra, KvEvent, PolicyKind, PrefixCache, RecentHitRate,
    ReuseError, ReuseIndex, ReuseScope, ScopedIndex, TenantId, Xxh3Hasher,
};

const BS: u32 = 4;

fn index() -> ScopedIndex<Xxh3Hasher> {
    ScopedIndex::new(
        PrefixCache::new(BS, PolicyKind::Lru),
        Xxh3Hasher,
        HashExtra::new("m", 1),
    )
}

fn scope(tenant: u32) -> ReuseScope {
    ReuseScope {
        tenant: TenantId(tenant),
        session: None,
    }
}

fn ids(range: std::ops::Range<u32>) -> Vec<BlockId> {
    range.map(BlockId).collect()
}

/// A request that computed `tokens` into `blocks` (its full blocks) offers them; returns
/// what the index newly cached.
fn offer(idx: &mut impl ReuseIndex, tokens: &[u32], blocks: &[BlockId], now: u64) -> Vec<BlockId> {
    let full = tokens.len() / BS as usize;
    let mut newly = Vec::new();
    idx.insert(
        &scope(1),
        &tokens[..full * BS as usize],
        blocks,
        now,
        &mut newly,
    )
    .unwrap();
    newly
}

fn evict_one_by_one(idx: &mut impl ReuseIndex, now: u64) -> Vec<BlockId> {
    let mut order = Vec::new();
    while idx.evict(1, now, &mut order) == 1 {}
    order
}

#[test]
fn only_full_blocks_are_cached() {
    let mut idx = index();
    let prompt: Vec<u32> = (0..10).collect(); // 2 full blocks and 2 tokens
    // The request holds three blocks; only the two full ones are offered and cached.
    assert_eq!(offer(&mut idx, &prompt, &ids(0..2), 0), ids(0..2));
    let mut longer = prompt.clone();
    longer.extend(10..20);
    let hit = idx.lookup(&scope(1), &longer, 1);
    assert_eq!(hit.tokens, 8, "the partial third block never hits");
    assert_eq!(hit.blocks, ids(0..2));
    // A prompt shorter than a block caches nothing.
    assert!(offer(&mut idx, &[7, 7, 7], &[], 2).is_empty());
    // Offering the partial block as if it were full is refused.
    let mut newly = Vec::new();
    assert_eq!(
        idx.insert(&scope(1), &prompt, &ids(0..3), 3, &mut newly),
        Err(ReuseError::LengthMismatch {
            full_blocks: 2,
            blocks: 3
        })
    );
}

#[test]
fn the_last_prompt_token_is_always_computed() {
    let mut idx = index();
    let prompt: Vec<u32> = (0..8).collect(); // exactly 2 full blocks
    offer(&mut idx, &prompt, &ids(0..2), 0);
    idx.release(&ids(0..2)).unwrap();
    // The same prompt again: its last block would cover the last token, so it is computed.
    let hit = idx.lookup(&scope(1), &prompt, 1);
    assert_eq!((hit.blocks.clone(), hit.tokens), (ids(0..1), 4));
    idx.release(&hit.blocks).unwrap();
    // One more token and both blocks hit.
    let mut longer = prompt.clone();
    longer.push(8);
    assert_eq!(idx.lookup(&scope(1), &longer, 2).tokens, 8);
}

#[test]
fn lookup_stops_at_first_missing_block() {
    let mut idx = index();
    let a: Vec<u32> = (0..12).collect();
    offer(&mut idx, &a, &ids(0..3), 0);
    // b shares a's first block, differs in its second, and repeats a's third block's tokens:
    // the third block is not a hit (its KV depends on the second).
    let mut b = a.clone();
    b[5] = 99;
    b.push(12);
    let hit = idx.lookup(&scope(1), &b, 1);
    assert_eq!(hit.blocks, ids(0..1));
    idx.release(&hit.blocks).unwrap();
    // After the last block of a is evicted, a lookup of a stops before it.
    idx.release(&ids(0..3)).unwrap();
    let mut evicted = Vec::new();
    assert_eq!(idx.evict(1, 2, &mut evicted), 1);
    assert_eq!(evicted, [BlockId(2)]);
    let mut a_longer = a.clone();
    a_longer.push(12);
    assert_eq!(idx.lookup(&scope(1), &a_longer, 3).blocks, ids(0..2));
}

#[test]
fn eviction_takes_least_recently_freed_first() {
    let mut idx = index();
    // Request A starts first, request B second; B finishes first, A after it.
    let a: Vec<u32> = (0..8).collect();
    let b: Vec<u32> = (100..108).collect();
    offer(&mut idx, &a, &ids(0..2), 0);
    offer(&mut idx, &b, &ids(10..12), 1);
    idx.release(&ids(10..12)).unwrap();
    idx.release(&ids(0..2)).unwrap();
    // B's blocks were freed first, so they go first, though A was used first.
    assert_eq!(
        evict_one_by_one(&mut idx, 2),
        [BlockId(11), BlockId(10), BlockId(1), BlockId(0)]
    );
}

#[test]
fn within_a_request_tail_blocks_are_evicted_before_head_blocks() {
    let mut idx = index();
    // Two requests share a 2-block head; each has its own 2-block tail.
    let a: Vec<u32> = (0..16).collect();
    let mut b: Vec<u32> = (0..8).collect();
    b.extend(200..208);
    offer(&mut idx, &a, &ids(0..4), 0);
    let hit = idx.lookup(&scope(1), &b, 1);
    assert_eq!(hit.blocks, ids(0..2));
    offer(
        &mut idx,
        &b,
        &[BlockId(0), BlockId(1), BlockId(4), BlockId(5)],
        1,
    );
    idx.release(&ids(0..4)).unwrap();
    idx.release(&[BlockId(0), BlockId(1), BlockId(4), BlockId(5)])
        .unwrap();
    let order = evict_one_by_one(&mut idx, 2);
    let pos = |b: u32| order.iter().position(|&x| x == BlockId(b)).unwrap();
    // Each request's tail goes before its head, the deepest block first.
    assert!(pos(3) < pos(2) && pos(5) < pos(4), "{order:?}");
    for tail in [2, 3, 4, 5] {
        assert!(pos(tail) < pos(1) && pos(1) < pos(0), "{order:?}");
    }
}

#[test]
fn blocks_in_use_are_never_evicted() {
    let mut idx = index();
    let a: Vec<u32> = (0..12).collect();
    offer(&mut idx, &a, &ids(0..3), 0); // request A still runs
    let mut evicted = Vec::new();
    assert_eq!(idx.evictable_blocks(), 0);
    assert_eq!(
        idx.evict(10, 1, &mut evicted),
        0,
        "offered blocks are in use"
    );
    // A finishes, B looks up the first two blocks and keeps running.
    idx.release(&ids(0..3)).unwrap();
    let mut b = a[..8].to_vec();
    b.push(1);
    let hit = idx.lookup(&scope(1), &b, 2);
    assert_eq!(hit.blocks, ids(0..2));
    assert_eq!(idx.evictable_blocks(), 1);
    assert_eq!(idx.evict(10, 3, &mut evicted), 1);
    assert_eq!(evicted, [BlockId(2)], "only the block no one uses");
    // A fork of B is one more holder: B finishing leaves them in use.
    idx.acquire(&hit.blocks).unwrap();
    idx.release(&hit.blocks).unwrap();
    assert_eq!(idx.evict(10, 4, &mut evicted), 0);
    idx.release(&hit.blocks).unwrap();
    assert_eq!(idx.evict(10, 5, &mut evicted), 2);
}

#[test]
fn an_evicted_block_is_forgotten() {
    let mut idx = index();
    let a: Vec<u32> = (0..9).collect();
    offer(&mut idx, &a, &ids(0..2), 0);
    idx.release(&ids(0..2)).unwrap();
    let mut evicted = Vec::new();
    assert_eq!(idx.evict(2, 1, &mut evicted), 2);
    assert_eq!(idx.lookup(&scope(1), &a, 2).tokens, 0);
    // The ids are no longer the index's: releasing them is a no-op, and the same tokens
    // computed into other blocks are cached afresh.
    idx.release(&ids(0..2)).unwrap();
    assert_eq!(offer(&mut idx, &a, &ids(7..9), 3), ids(7..9));
}

#[test]
fn salts_and_adapter_ids_separate_caches() {
    let prompt: Vec<u32> = (0..9).collect();
    // Tenants with different salts never hit each other's blocks; equal salts share.
    let mut idx = index();
    offer(&mut idx, &prompt, &ids(0..2), 0);
    assert_eq!(idx.lookup(&scope(2), &prompt, 1).tokens, 0);
    idx.set_salt(TenantId(1), *b"team");
    idx.set_salt(TenantId(2), *b"team");
    offer(&mut idx, &prompt, &ids(2..4), 2);
    assert_eq!(idx.lookup(&scope(2), &prompt, 3).blocks, ids(2..4));
    // Adapters (and model versions) are part of every chain's root.
    let base = HashExtra::new("m", 1);
    let roots: Vec<BlockHash> = [
        base.clone(),
        base.clone().with_adapter(7),
        base.clone().with_adapter(8),
        HashExtra::new("m", 2),
    ]
    .iter()
    .map(|e| Xxh3Hasher.root(e))
    .collect();
    let mut cache = PrefixCache::new(BS, PolicyKind::Lru);
    let mut h = Vec::new();
    Xxh3Hasher.hash_blocks(roots[1], &prompt, BS as usize, &mut h);
    cache.insert(&h, &ids(0..2), 0, &mut Vec::new()).unwrap();
    for (i, &root) in roots.iter().enumerate() {
        let mut h = Vec::new();
        Xxh3Hasher.hash_blocks(root, &prompt, BS as usize, &mut h);
        let hit = cache.lookup(&h, prompt.len(), 1);
        assert_eq!(hit.tokens, if i == 1 { 8 } else { 0 }, "root {i}");
    }
}

#[test]
fn reset_is_refused_while_blocks_are_in_use() {
    let mut idx = index();
    let a: Vec<u32> = (0..9).collect();
    offer(&mut idx, &a, &ids(0..2), 0);
    assert_eq!(
        idx.cache_mut().clear(),
        Err(ReuseError::InUse { in_use: 2 })
    );
    assert_eq!(
        idx.lookup(&scope(1), &a, 1).tokens,
        8,
        "nothing was dropped"
    );
    idx.release(&ids(0..2)).unwrap(); // the lookup
    idx.release(&ids(0..2)).unwrap(); // the request that offered them
    assert_eq!(idx.cache_mut().clear(), Ok(2));
    assert_eq!(idx.lookup(&scope(1), &a, 2).tokens, 0);
    // The dropped blocks come back from evict for the caller to free.
    let mut evicted = Vec::new();
    assert_eq!(idx.evict(10, 3, &mut evicted), 2);
}

fn chain_hashes(tokens: &[u32]) -> Vec<BlockHash> {
    let mut h = Vec::new();
    let root = Xxh3Hasher.root(&HashExtra::new("m", 1));
    Xxh3Hasher.hash_blocks(root, tokens, BS as usize, &mut h);
    h
}

fn events(c: &mut PrefixCache) -> Vec<KvEvent> {
    let mut out = Vec::new();
    c.drain_events(&mut out);
    // Event ids increase by one.
    for w in out.windows(2) {
        assert_eq!(w[1].id, w[0].id + 1);
    }
    out.into_iter().map(|r| r.event).collect()
}

// vLLM `test_kv_cache_events` and `test_null_parent_block_hash`: caching a request's blocks
// stores them in one event (no parent for a chain from its first block, the logical parent's
// hash for a continuation); evicting removes them; a reset clears all. Differs by design:
// one `BlockRemoved` per `evict` call lists every block it took (vLLM sends one per block),
// and blocks handed back after a reset are not announced again.
#[test]
fn kv_events_store_remove_and_clear() {
    let mut c = PrefixCache::new(BS, PolicyKind::Lru);
    c.subscribe();
    let tokens: Vec<u32> = (0..16).collect();
    let h = chain_hashes(&tokens);
    let mut newly = Vec::new();
    c.insert(&h[..3], &ids(0..3), 0, &mut newly).unwrap();
    assert_eq!(
        events(&mut c),
        [KvEvent::BlockStored {
            parent: None,
            hashes: h[..3].to_vec()
        }]
    );
    // The request's next block: only it is stored, under its logical parent.
    c.insert(&h, &ids(0..4), 1, &mut newly).unwrap();
    assert_eq!(
        events(&mut c),
        [KvEvent::BlockStored {
            parent: Some(h[2]),
            hashes: vec![h[3]]
        }]
    );
    // Offering what is cached already stores nothing.
    c.insert(&h, &ids(0..4), 2, &mut newly).unwrap();
    assert!(events(&mut c).is_empty());
    c.release(&ids(0..4)).unwrap();
    let mut out = Vec::new();
    assert_eq!(c.evict(2, 3, &mut out), 2);
    assert_eq!(
        events(&mut c),
        [KvEvent::BlockRemoved {
            hashes: vec![h[3], h[2]]
        }]
    );
    assert_eq!(c.clear(), Ok(2));
    assert_eq!(events(&mut c), [KvEvent::AllCleared]);
    assert_eq!(c.evict(10, 4, &mut out), 2);
    assert!(events(&mut c).is_empty());
}

// vLLM `test_cache_blocks`: blocks are cached from the start of a request, and a later call
// for the same request caches only the blocks after those cached before.
#[test]
fn caching_continues_after_the_blocks_cached_before() {
    let mut c = PrefixCache::new(BS, PolicyKind::Lru);
    let tokens: Vec<u32> = (0..14).collect(); // 3 full blocks and 2 tokens
    let h = chain_hashes(&tokens);
    assert_eq!(h.len(), 3);
    let mut newly = Vec::new();
    c.insert(&h[..2], &ids(0..2), 0, &mut newly).unwrap();
    assert_eq!((newly.clone(), c.hittable_blocks()), (ids(0..2), 2));
    newly.clear();
    c.insert(&h, &ids(0..3), 1, &mut newly).unwrap();
    assert_eq!((newly, c.hittable_blocks()), (ids(2..3), 3));
    assert_eq!(c.use_count(BlockId(0)), Some(1), "offered once");
    assert_eq!(c.use_count(BlockId(2)), Some(1));
}

fn window(r: &RecentHitRate) -> (u64, u64, u64) {
    (r.requests(), r.query_tokens(), r.hit_tokens())
}

// vLLM `test_metrics`: the hit rate over the last 5 requests; a batch pushing the window past
// 5 requests drops the oldest batch; a reset empties it.
#[test]
fn the_hit_rate_over_a_window_of_recent_requests() {
    let mut r = RecentHitRate::new(5);
    assert_eq!(r.hit_rate(), 0.0);
    r.observe(1, 20, 9);
    assert_eq!(r.hit_rate(), 0.45);
    r.observe(4, 80, 16);
    assert_eq!(r.hit_rate(), 0.25);
    r.observe(1, 10, 2);
    assert_eq!(window(&r), (5, 90, 18));
    assert_eq!(r.hit_rate(), 0.2);
    r.reset();
    assert_eq!((window(&r), r.hit_rate()), ((0, 0, 0), 0.0));
}

// vLLM `test_metrics_empty_stats`: empty batches are ignored, and a batch larger than the
// window is kept alone.
#[test]
fn the_window_ignores_empty_batches_and_keeps_the_latest_alone() {
    let mut r = RecentHitRate::new(5);
    for (req, q, h) in [
        (0, 0, 0),
        (1, 20, 9),
        (0, 0, 0),
        (4, 80, 16),
        (0, 0, 0),
        (1, 10, 2),
    ] {
        r.observe(req, q, h);
    }
    assert_eq!((window(&r), r.hit_rate()), ((5, 90, 18), 0.2));
    r.observe(11, 20, 10);
    assert_eq!((window(&r), r.hit_rate()), ((11, 20, 10), 0.5));
    r.observe(22, 40, 30);
    assert_eq!((window(&r), r.hit_rate()), ((22, 40, 30), 0.75));
}

// The window fed from the cache's own counters, step by step.
#[test]
fn the_window_follows_the_cache_counters() {
    let mut idx = index();
    let mut r = RecentHitRate::new(2);
    let mut last = idx.cache().metrics();
    let a: Vec<u32> = (0..9).collect();
    // Step 1: a miss on 9 tokens, then cached.
    assert_eq!(idx.lookup(&scope(1), &a, 0).tokens, 0);
    offer(&mut idx, &a, &ids(0..2), 0);
    idx.release(&ids(0..2)).unwrap();
    let now = idx.cache().metrics();
    r.observe_metrics(&now.since(&last));
    last = now;
    assert_eq!(window(&r), (1, 9, 0));
    // Step 2: two hits of 8 tokens.
    for t in 1..3 {
        let hit = idx.lookup(&scope(1), &a, t);
        assert_eq!(hit.tokens, 8);
        idx.release(&hit.blocks).unwrap();
    }
    let now = idx.cache().metrics();
    r.observe_metrics(&now.since(&last));
    // The window holds 2 requests: step 1 left it.
    assert_eq!(window(&r), (2, 18, 16));
    assert_eq!(now.hit_rate(), 16.0 / 27.0, "the cumulative rate");
}
