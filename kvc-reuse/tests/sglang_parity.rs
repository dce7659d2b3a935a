//! The behaviours SGLang's radix cache tests check, re-expressed against `PrefixCache` with
//! one-token blocks (SGLang's default page size): an insert tells what was already cached,
//! matching is longest prefix, locked (in-use) nodes and their ancestors are protected and
//! counted apart from the evictable ones, eviction takes leaves first in least-recently-used
//! order with a parent competing by its own last access once its children are gone, and a
//! reset makes everything unhittable. Then with pages of 4 tokens (`page_size` > 1): whole
//! pages cached and matched, a match after a split, locks protecting whole pages.
//!
//! One difference on purpose: SGLang's `match_prefix` may match a whole key and its scheduler
//! then recomputes the last token; `lookup` never covers the last prompt token itself.

use kvc_reuse::{
    BlockHash, BlockHasher, BlockId, HashExtra, KvEvent, OfferRole, PolicyKind, PrefixCache,
    Xxh3Hasher,
};

fn hashes(tokens: &[u32]) -> Vec<BlockHash> {
    let mut out = Vec::new();
    let root = Xxh3Hasher.root(&HashExtra::new("m", 1));
    Xxh3Hasher.hash_blocks(root, tokens, 1, &mut out);
    out
}

fn ids(range: std::ops::Range<u32>) -> Vec<BlockId> {
    range.map(BlockId).collect()
}

fn cache() -> PrefixCache {
    PrefixCache::new(1, PolicyKind::Lru)
}

#[test]
fn an_insert_tells_which_blocks_were_new() {
    let mut c = cache();
    let mut newly = Vec::new();
    c.insert(&hashes(&[1, 2, 3]), &ids(0..3), 0, &mut newly)
        .unwrap();
    assert_eq!(newly, ids(0..3));
    // A second request computed [1, 2, 3, 4, 5] after hitting [1, 2, 3]: only 4 and 5 are
    // new (SGLang's insert returns the 3 tokens already present).
    let hit = c.lookup(&hashes(&[1, 2, 3, 4, 5]), 5, 1);
    assert_eq!(hit.tokens, 3);
    let mut table = hit.blocks.clone();
    table.extend([BlockId(3), BlockId(4)]);
    newly.clear();
    c.insert(&hashes(&[1, 2, 3, 4, 5]), &table, 1, &mut newly)
        .unwrap();
    assert_eq!(newly, [BlockId(3), BlockId(4)]);
    assert_eq!(c.hittable_blocks(), 5);
}

#[test]
fn matching_is_longest_prefix_and_stops_at_divergence() {
    let mut c = cache();
    let mut newly = Vec::new();
    c.insert(&hashes(&[1, 2, 3, 4]), &ids(0..4), 0, &mut newly)
        .unwrap();
    c.release(&ids(0..4)).unwrap();
    for (prompt, want) in [
        (vec![1, 2, 3, 4, 5], 4),
        (vec![1, 2, 3, 4], 3), // the last token is computed
        (vec![1, 2, 9, 4, 5], 2),
        (vec![9, 2, 3, 4, 5], 0),
        (vec![1], 0),
    ] {
        let hit = c.lookup(&hashes(&prompt), prompt.len(), 1);
        assert_eq!(hit.tokens, want, "{prompt:?}");
        assert_eq!(hit.blocks, ids(0..want as u32));
        c.release(&hit.blocks).unwrap();
    }
}

#[test]
fn locked_nodes_and_their_ancestors_are_protected() {
    let mut c = cache();
    let mut newly = Vec::new();
    // A tree: 1-2-3 and 1-2-4.
    c.insert(&hashes(&[1, 2, 3]), &ids(0..3), 0, &mut newly)
        .unwrap();
    let hit = c.lookup(&hashes(&[1, 2, 4]), 3, 0); // the second request hit 1-2 first
    assert_eq!(hit.blocks, ids(0..2));
    c.insert(
        &hashes(&[1, 2, 4]),
        &[BlockId(0), BlockId(1), BlockId(3)],
        0,
        &mut newly,
    )
    .unwrap();
    c.release(&ids(0..3)).unwrap();
    c.release(&[BlockId(0), BlockId(1), BlockId(3)]).unwrap();
    assert_eq!((c.evictable_blocks(), c.in_use_blocks()), (4, 0));
    // Lock 1-2-4 (a running request): SGLang's protected size 3, evictable size 1.
    let hit = c.lookup(&hashes(&[1, 2, 4, 7]), 4, 1);
    assert_eq!(hit.blocks, [BlockId(0), BlockId(1), BlockId(3)]);
    assert_eq!((c.evictable_blocks(), c.in_use_blocks()), (1, 3));
    let mut out = Vec::new();
    assert_eq!(c.evict(10, 2, &mut out), 1);
    assert_eq!(out, [BlockId(2)], "only the unlocked leaf");
    // Unlocking makes the whole chain evictable again, leaf first.
    c.release(&hit.blocks).unwrap();
    assert_eq!((c.evictable_blocks(), c.in_use_blocks()), (3, 0));
    out.clear();
    assert_eq!(c.evict(10, 3, &mut out), 3);
    assert_eq!(out, [BlockId(3), BlockId(1), BlockId(0)]);
}

#[test]
fn eviction_is_leaf_first_and_least_recently_used() {
    let mut c = cache();
    let mut newly = Vec::new();
    // Chain 1-2 used at t = 1, leaf 9 at t = 2, then block 1 alone touched at t = 3.
    c.insert(&hashes(&[1, 2]), &ids(0..2), 1, &mut newly)
        .unwrap();
    c.release(&ids(0..2)).unwrap();
    c.insert(&hashes(&[9]), &[BlockId(2)], 2, &mut newly)
        .unwrap();
    c.release(&[BlockId(2)]).unwrap();
    let hit = c.lookup(&hashes(&[1, 5]), 2, 3);
    assert_eq!(hit.blocks, [BlockId(0)]);
    c.release(&hit.blocks).unwrap();
    // Leaves 2 (t = 1) and 9 (t = 2) go first, oldest first; then 1, by its own t = 3.
    let mut out = Vec::new();
    assert_eq!(c.evict(3, 4, &mut out), 3);
    assert_eq!(out, [BlockId(1), BlockId(2), BlockId(0)]);
}

#[test]
fn a_parent_goes_only_after_all_its_children() {
    let mut c = cache();
    let mut newly = Vec::new();
    c.insert(&hashes(&[1, 2]), &ids(0..2), 0, &mut newly)
        .unwrap();
    let hit = c.lookup(&hashes(&[1, 3]), 2, 1); // the second request hit block 1 first
    assert_eq!(hit.blocks, [BlockId(0)]);
    c.insert(&hashes(&[1, 3]), &[BlockId(0), BlockId(2)], 1, &mut newly)
        .unwrap();
    c.release(&ids(0..2)).unwrap();
    c.release(&[BlockId(0), BlockId(2)]).unwrap();
    let mut out = Vec::new();
    assert_eq!(c.evict(2, 2, &mut out), 2);
    out.sort();
    assert_eq!(
        out,
        [BlockId(1), BlockId(2)],
        "both children before the parent"
    );
    assert!(c.contains(hashes(&[1])[0]));
}

#[test]
fn a_reset_makes_everything_unhittable_and_hands_every_block_back() {
    let mut c = cache();
    c.subscribe();
    let mut newly = Vec::new();
    c.insert(&hashes(&[1, 2, 3]), &ids(0..3), 0, &mut newly)
        .unwrap();
    c.release(&ids(0..3)).unwrap();
    assert_eq!(c.clear(), Ok(3));
    assert_eq!(c.lookup(&hashes(&[1, 2, 3, 4]), 4, 1).tokens, 0);
    let mut out = Vec::new();
    assert_eq!(c.evict(usize::MAX, 2, &mut out), 3);
    assert!(c.is_empty());
    let mut events = Vec::new();
    c.drain_events(&mut events);
    assert_eq!(events.last().map(|r| &r.event), Some(&KvEvent::AllCleared));
    // Blocks handed back after a reset are not announced again.
    assert!(
        !events
            .iter()
            .any(|r| matches!(r.event, KvEvent::BlockRemoved { .. }))
    );
}

// The same behaviours with pages of 4 tokens (SGLang's `page_size` > 1).

const PAGE: u32 = 4;

fn paged_hashes(tokens: &[u32]) -> Vec<BlockHash> {
    let mut out = Vec::new();
    let root = Xxh3Hasher.root(&HashExtra::new("m", 1));
    Xxh3Hasher.hash_blocks(root, tokens, PAGE as usize, &mut out);
    out
}

fn paged() -> PrefixCache {
    PrefixCache::new(PAGE, PolicyKind::Lru)
}

/// A request that holds `blocks` (its hits and the blocks it computed) caches `tokens` into
/// them and finishes. Returns the blocks newly cached.
fn paged_insert(c: &mut PrefixCache, tokens: &[u32], blocks: &[u32], now: u64) -> Vec<BlockId> {
    let blocks: Vec<BlockId> = blocks.iter().copied().map(BlockId).collect();
    let mut newly = Vec::new();
    c.insert(&paged_hashes(tokens), &blocks, now, &mut newly)
        .unwrap();
    c.release(&blocks).unwrap();
    newly
}

// SGLang with `page_size` 4: a key is cached up to its last whole page, and a match is a whole
// number of pages.
#[test]
fn paged_keys_are_cached_and_matched_in_whole_pages() {
    let mut c = paged();
    let key: Vec<u32> = (0..10).collect(); // 2 pages and 2 tokens
    assert_eq!(paged_hashes(&key).len(), 2);
    assert_eq!(paged_insert(&mut c, &key, &[0, 1], 0), ids(0..2));
    assert_eq!(c.hittable_blocks(), 2);
    for (len, want) in [(10, 8), (9, 8), (8, 4), (5, 4), (4, 0), (3, 0)] {
        let hit = c.lookup(&paged_hashes(&key[..len]), len, 1);
        assert_eq!(hit.tokens, want, "a key of {len} tokens");
        c.release(&hit.blocks).unwrap();
    }
}

// SGLang's match after a split: a second key diverging inside a node splits it at the last
// whole page before the divergence; both keys match in full afterwards, a key diverging inside
// the first page matches nothing, and one diverging inside the second page matches one page.
#[test]
fn paged_match_after_a_split() {
    let mut c = paged();
    let a: Vec<u32> = (0..12).collect(); // 3 pages
    paged_insert(&mut c, &a, &[0, 1, 2], 0);
    let mut b = a.clone();
    b[9] = 99; // diverges inside the third page
    let hit = c.lookup(&paged_hashes(&b), b.len(), 1);
    assert_eq!(hit.blocks, ids(0..2));
    // The request holds its hit and computes the third page into block 3.
    assert_eq!(paged_insert(&mut c, &b, &[0, 1, 3], 1), [BlockId(3)]);
    for (key, want) in [(&a, [0, 1, 2]), (&b, [0, 1, 3])] {
        let mut longer = key.clone();
        longer.push(7);
        let hit = c.lookup(&paged_hashes(&longer), longer.len(), 2);
        assert_eq!(hit.blocks, want.map(BlockId));
        c.release(&hit.blocks).unwrap();
    }
    let mut d = a.clone();
    d[2] = 77;
    assert_eq!(c.lookup(&paged_hashes(&d), d.len(), 3).tokens, 0);
    let mut e = a.clone();
    e[6] = 77;
    let hit = c.lookup(&paged_hashes(&e), e.len(), 3);
    assert_eq!((hit.tokens, hit.blocks.clone()), (4, vec![BlockId(0)]));
    c.release(&hit.blocks).unwrap();
    // The split node's pages are shared: evicting everything takes the two leaves first.
    let mut out = Vec::new();
    assert_eq!(c.evict(2, 4, &mut out), 2);
    out.sort();
    assert_eq!(out, [BlockId(2), BlockId(3)]);
}

// SGLang's `evictable_size` / `protected_size` (in tokens) with pages: a locked key protects
// its pages and its ancestors'; an eviction asking for more than is evictable takes only the
// unlocked pages, leaf first, and unlocking makes the rest evictable again.
#[test]
fn paged_locks_protect_whole_pages() {
    let mut c = paged();
    let a: Vec<u32> = (0..16).collect(); // 4 pages
    paged_insert(&mut c, &a, &[0, 1, 2, 3], 0);
    let tokens = |blocks: usize| blocks * PAGE as usize;
    assert_eq!(
        (tokens(c.evictable_blocks()), tokens(c.in_use_blocks())),
        (16, 0)
    );
    // Lock the first 9 tokens: 2 whole pages are matched and locked.
    let hit = c.lookup(&paged_hashes(&a[..9]), 9, 1);
    assert_eq!(hit.blocks, ids(0..2));
    assert_eq!(
        (tokens(c.evictable_blocks()), tokens(c.in_use_blocks())),
        (8, 8)
    );
    let mut out = Vec::new();
    assert_eq!(c.evict(10, 2, &mut out), 2);
    assert_eq!(out, [BlockId(3), BlockId(2)]);
    assert_eq!(c.evictable_blocks(), 0);
    c.release(&hit.blocks).unwrap();
    assert_eq!(
        (tokens(c.evictable_blocks()), tokens(c.in_use_blocks())),
        (8, 0)
    );
    out.clear();
    assert_eq!(c.evict(10, 3, &mut out), 2);
    assert_eq!(out, [BlockId(1), BlockId(0)]);
    assert!(c.is_empty());
}

fn hashes_at(page: usize, root: BlockHash, tokens: &[u32]) -> Vec<BlockHash> {
    let mut out = Vec::new();
    Xxh3Hasher.hash_blocks(root, tokens, page, &mut out);
    out
}

// SGLang `test_advanced_prefix_match_with_node_splits` (page sizes 1 and 2): a second key
// diverging after 2 tokens adds only its own tokens (8 + 2 cached), and matches that diverge
// inside the first key, at 4 and at 6 tokens, return exactly those tokens of it; nothing is
// added by matching. Differs by design: a whole key is matched up to its last token only.
#[test]
fn matches_after_node_splits_at_page_sizes_1_and_2() {
    let root = Xxh3Hasher.root(&HashExtra::new("m", 1));
    for page in [1u32, 2] {
        let p = page as usize;
        let mut c = PrefixCache::new(page, PolicyKind::Lru);
        let seq1 = [1, 2, 3, 4, 5, 6, 7, 8];
        let h1 = hashes_at(p, root, &seq1);
        let b1: Vec<BlockId> = (0..h1.len() as u32).map(BlockId).collect();
        let mut newly = Vec::new();
        c.insert(&h1, &b1, 0, &mut newly).unwrap();
        c.release(&b1).unwrap();
        let seq2 = [1, 2, 9, 10];
        let h2 = hashes_at(p, root, &seq2);
        let shared = 2 / p;
        let mut b2 = b1[..shared].to_vec();
        b2.extend((0..(h2.len() - shared) as u32).map(|i| BlockId(100 + i)));
        let hit = c.lookup(&h2, seq2.len(), 1);
        assert_eq!(hit.blocks, &b1[..shared], "page {page}");
        newly.clear();
        c.insert(&h2, &b2, 1, &mut newly).unwrap();
        c.release(&b2).unwrap();
        assert_eq!(
            newly.len() * p,
            2,
            "page {page}: only the branch's own tokens"
        );
        assert_eq!(c.len() * p, 10, "page {page}: 8 + 2 tokens cached");
        for (query, want) in [
            (vec![1, 2, 3, 4, 999, 1000], 4),
            (vec![1, 2, 3, 4, 5, 6, 777, 888], 6),
            (seq1.to_vec(), 8 - p),
            (seq2.to_vec(), 4 - p),
        ] {
            let h = hashes_at(p, root, &query);
            let hit = c.lookup(&h, query.len(), 2);
            assert_eq!(hit.tokens as usize, want, "page {page}, {query:?}");
            let from = if query[2] == 9 { &b2 } else { &b1 };
            assert_eq!(hit.blocks, &from[..want / p]);
            c.release(&hit.blocks).unwrap();
        }
        assert_eq!(c.len() * p, 10, "page {page}: matching added nothing");
    }
}

// SGLang `test_extra_key_isolation`: the same tokens under different extra keys (here an
// adapter id, a salt, or none, in the chain's root) never match each other.
#[test]
fn extra_keys_isolate_the_same_tokens() {
    let base = HashExtra::new("m", 1);
    let roots = [
        Xxh3Hasher.root(&base.clone().with_adapter(1)),
        Xxh3Hasher.root(&base.clone().with_salt(*b"key2")),
        Xxh3Hasher.root(&base),
    ];
    let mut c = cache();
    let tokens = [1, 2, 3];
    for (i, &root) in roots.iter().enumerate() {
        let blocks = [BlockId(10 * i as u32), BlockId(10 * i as u32 + 1)];
        let mut newly = Vec::new();
        c.insert(&hashes_at(1, root, &tokens[..2]), &blocks, 0, &mut newly)
            .unwrap();
        assert_eq!(newly, blocks, "root {i}: nothing shared");
        c.release(&blocks).unwrap();
    }
    for (i, &root) in roots.iter().enumerate() {
        let hit = c.lookup(&hashes_at(1, root, &tokens), 3, 1);
        assert_eq!(
            hit.blocks,
            [BlockId(10 * i as u32), BlockId(10 * i as u32 + 1)]
        );
        c.release(&hit.blocks).unwrap();
    }
    let unknown = Xxh3Hasher.root(&HashExtra::new("m", 1).with_salt(*b"nonexistent"));
    assert_eq!(c.lookup(&hashes_at(1, unknown, &tokens), 3, 2).tokens, 0);
}

// SGLang `test_hash_value_repeating_tokens`: a repeated page of tokens gets another hash at
// another position (hashes are chained), and the second page's event names the first as its
// parent.
#[test]
fn repeated_pages_get_position_aware_hashes() {
    let root = Xxh3Hasher.root(&HashExtra::new("m", 1));
    let h = hashes_at(4, root, &[1, 2, 3, 4, 1, 2, 3, 4]);
    assert_ne!(h[0], h[1]);
    let mut c = PrefixCache::new(4, PolicyKind::Lru);
    c.subscribe();
    let mut newly = Vec::new();
    c.insert(&h[..1], &[BlockId(0)], 0, &mut newly).unwrap();
    c.insert(&h, &[BlockId(0), BlockId(1)], 0, &mut newly)
        .unwrap();
    let mut events = Vec::new();
    c.drain_events(&mut events);
    let events: Vec<KvEvent> = events.into_iter().map(|r| r.event).collect();
    assert_eq!(
        events,
        [
            KvEvent::BlockStored {
                parent: None,
                hashes: vec![h[0]]
            },
            KvEvent::BlockStored {
                parent: Some(h[0]),
                hashes: vec![h[1]]
            }
        ]
    );
}

// SGLang's insert of a key whose prefix another request cached meanwhile frees the
// request's duplicate KV, points it at the cached nodes and caches the rest of the key.
// Differs by design (see `PrefixCache::insert` and docs/reuse.md): one block per hash, so the
// later copy stays private to its request, and the offer ends there: the blocks after it are
// not cached either (the cache's holders always hold whole prefixes, which keeps every
// evictable block reachable leaf first). The request's blocks go back with it.
#[test]
fn a_prefix_computed_twice_keeps_the_first_copy_and_ends_the_later_offer() {
    let mut c = paged();
    let key: Vec<u32> = (0..12).collect(); // 3 pages
    let h = paged_hashes(&key);
    // Two requests computed the first two pages at once; the first offers them.
    let mut newly = Vec::new();
    c.insert(&h[..2], &ids(0..2), 0, &mut newly).unwrap();
    // The second offers its copies and its own third page.
    newly.clear();
    c.insert(&h, &[BlockId(5), BlockId(6), BlockId(7)], 1, &mut newly)
        .unwrap();
    assert!(newly.is_empty());
    for b in [5, 6, 7] {
        assert!(!c.is_cached(BlockId(b)), "block {b} stays private");
    }
    assert_eq!(c.hittable_blocks(), 2);
    // Releasing the second request's table skips its private blocks.
    c.release(&[BlockId(5), BlockId(6), BlockId(7)]).unwrap();
    c.release(&ids(0..2)).unwrap();
    let mut longer = key.clone();
    longer.push(12);
    let hit = c.lookup(&paged_hashes(&longer), longer.len(), 2);
    assert_eq!(hit.blocks, ids(0..2), "the third page was never cached");
}

// SGLang's `cache_unfinished_req` / `cache_finished_req`: the radix insert matches the pages
// already cached, caches the request's later pages under them, and the request's duplicates
// are freed and its table re-pointed at the cached pages. `insert_adopting` is that.
#[test]
fn a_prefix_computed_twice_is_adopted_and_the_later_pages_cached() {
    let mut c = paged();
    let key: Vec<u32> = (0..12).collect(); // 3 pages
    let h = paged_hashes(&key);
    let mut newly = Vec::new();
    c.insert(&h[..2], &ids(0..2), 0, &mut newly).unwrap();
    newly.clear();
    let mut table = vec![BlockId(5), BlockId(6), BlockId(7)];
    let mut adopted = Vec::new();
    c.insert_adopting(&h, &table, OfferRole::Prompt, 1, &mut newly, &mut adopted)
        .unwrap();
    assert_eq!(
        newly,
        [BlockId(7)],
        "the third page is cached after the first copy"
    );
    let pairs: Vec<(usize, BlockId, BlockId)> =
        adopted.iter().map(|a| (a.index, a.own, a.cached)).collect();
    assert_eq!(
        pairs,
        [(0, BlockId(5), BlockId(0)), (1, BlockId(6), BlockId(1))]
    );
    for a in &adopted {
        table[a.index] = a.cached;
    }
    assert!(!c.is_cached(BlockId(5)) && !c.is_cached(BlockId(6)));
    assert_eq!(c.hittable_blocks(), 3);
    assert_eq!(c.metrics().adopted_blocks, 2);
    // Both requests use the first two pages: the first one's end leaves them in use.
    c.release(&ids(0..2)).unwrap();
    assert_eq!(
        c.evictable_blocks(),
        0,
        "the second request holds all three"
    );
    c.release(&table).unwrap();
    assert_eq!(c.evictable_blocks(), 3);
    let mut longer = key.clone();
    longer.push(12);
    let hit = c.lookup(&paged_hashes(&longer), longer.len(), 2);
    assert_eq!(hit.blocks, [BlockId(0), BlockId(1), BlockId(7)]);
    c.release(&hit.blocks).unwrap();
    // Leaf first: the adopted chain drains in one pass.
    let mut evicted = Vec::new();
    assert_eq!(c.evict(3, 3, &mut evicted), 3);
    assert_eq!(evicted, [BlockId(7), BlockId(1), BlockId(0)]);
}
