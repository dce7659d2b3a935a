//! `RadixCache` against `PrefixCache` with LRU: the same random stream of requests (lookups,
//! inserts, requests computing the same prompt at once, releases in any order) and
//! evictions runs against both, and every hit, every newly cached list and every eviction
//! must be the same, block for block and in order, with the same counts after every step.
//! Then the radix cache's own contract: typed errors that change nothing, and input whose
//! hashes are not chained (repeated, shared between prompts) kept consistent.

use kvc_reuse::{
    BlockHash, BlockHasher, BlockId, HashExtra, PolicyKind, PrefixCache, RadixCache, RadixError,
    RadixHold, Xxh3Hasher,
};
use proptest::prelude::*;

const BS: usize = 4;

/// A prompt: its tokens (a whole number of blocks, plus `extra` tokens of a partial one).
fn tokens_of(path: &[u8], extra: usize) -> Vec<u32> {
    let mut t: Vec<u32> = path
        .iter()
        .enumerate()
        .flat_map(|(i, &b)| (0..BS as u32).map(move |k| u32::from(b) * 1000 + i as u32 * 10 + k))
        .collect();
    t.extend((0..extra as u32).map(|k| 999_000 + k));
    t
}

fn hashes_of(tokens: &[u32]) -> Vec<BlockHash> {
    let h = Xxh3Hasher;
    let mut out = Vec::new();
    h.hash_blocks(
        h.root(&HashExtra::new("radix-test", 1)),
        tokens,
        BS,
        &mut out,
    );
    out
}

/// A running request in both caches.
struct Running {
    table: Vec<BlockId>,
    hold: RadixHold,
}

struct Pair {
    prefix: PrefixCache,
    radix: RadixCache,
    running: Vec<Running>,
    free: Vec<BlockId>,
    next: u32,
}

impl Pair {
    fn new() -> Self {
        Self {
            prefix: PrefixCache::new(BS as u32, PolicyKind::Lru),
            radix: RadixCache::new(BS as u32),
            running: Vec::new(),
            free: Vec::new(),
            next: 0,
        }
    }

    fn block(&mut self) -> BlockId {
        self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            BlockId(self.next - 1)
        })
    }

    /// Looks the prompt up in both caches; the hit must be the same. Returns the request's
    /// table (the hit, then a block per remaining full block) and its hold.
    fn look_up(&mut self, tokens: &[u32], hashes: &[BlockHash]) -> Running {
        let hit = self.prefix.lookup(hashes, tokens.len(), 0);
        let mut blocks = Vec::new();
        let hold = self.radix.lookup(hashes, tokens.len(), &mut blocks);
        assert_eq!(blocks, hit.blocks, "hit blocks");
        assert_eq!(hold.blocks(), hit.blocks.len());
        let mut table = hit.blocks;
        while table.len() < hashes.len() {
            let b = self.block();
            table.push(b);
        }
        Running { table, hold }
    }

    /// Offers the request's first `n` full blocks to both caches; the newly cached must be
    /// the same.
    fn offer(&mut self, run: &mut Running, hashes: &[BlockHash], n: usize) {
        let n = n.min(hashes.len());
        let (mut a, mut b) = (Vec::new(), Vec::new());
        self.prefix
            .insert(&hashes[..n], &run.table[..n], 0, &mut a)
            .expect("prefix insert");
        self.radix
            .insert(&mut run.hold, &hashes[..n], &run.table[..n], &mut b)
            .expect("radix insert");
        assert_eq!(a, b, "newly cached");
    }

    fn finish(&mut self, i: usize) {
        let run = self.running.remove(i);
        self.prefix.release(&run.table).expect("prefix release");
        self.radix.release(run.hold).expect("radix release");
        // Blocks neither cache took were the request's own: free them.
        for b in run.table {
            if !self.prefix.is_cached(b) {
                self.free.push(b);
            }
        }
    }

    fn evict(&mut self, n: usize) {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let na = self.prefix.evict(n, 0, &mut a);
        let nb = self.radix.evict(n, &mut b);
        assert_eq!((na, &a), (nb, &b), "evicted");
        self.free.extend(a);
    }

    fn check(&self) {
        assert_eq!(self.radix.len(), self.prefix.len(), "cached");
        assert_eq!(
            self.radix.evictable_blocks(),
            self.prefix.evictable_blocks(),
            "evictable"
        );
        assert_eq!(self.radix.in_use_blocks(), self.prefix.in_use_blocks());
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// Start a request for prompt `p` with `extra` tokens past its full blocks, offering
    /// its first `n` full blocks (fewer than it hit, as under admission control, or all).
    Start(usize, usize, usize),
    /// Two requests for prompt `p` look it up before either offers it (computed twice).
    Twice(usize),
    /// Finish the running request at this position (modulo how many run).
    Finish(usize),
    /// Evict up to this many blocks.
    Evict(usize),
}

/// Prompts sharing prefixes: a small tree of block contents, paths of 1 to 9 blocks.
fn prompts() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(prop::collection::vec(0u8..3, 1..10), 4..12)
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            4 => (0usize..12, 0usize..BS + 1, prop_oneof![3 => Just(usize::MAX), 1 => 0usize..6])
                .prop_map(|(p, e, n)| Op::Start(p, e, n)),
            1 => (0usize..12).prop_map(Op::Twice),
            3 => (0usize..8).prop_map(Op::Finish),
            2 => (1usize..12).prop_map(Op::Evict),
        ],
        1..120,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn radix_cache_is_prefix_cache_with_lru(prompts in prompts(), ops in ops()) {
        let mut pair = Pair::new();
        for op in ops {
            match op {
                Op::Start(p, extra, n) => {
                    let tokens = tokens_of(&prompts[p % prompts.len()], extra);
                    let hashes = hashes_of(&tokens);
                    let mut run = pair.look_up(&tokens, &hashes);
                    pair.offer(&mut run, &hashes, n);
                    pair.running.push(run);
                }
                Op::Twice(p) => {
                    let tokens = tokens_of(&prompts[p % prompts.len()], 1);
                    let hashes = hashes_of(&tokens);
                    let mut first = pair.look_up(&tokens, &hashes);
                    let mut second = pair.look_up(&tokens, &hashes);
                    pair.offer(&mut first, &hashes, usize::MAX);
                    pair.offer(&mut second, &hashes, usize::MAX);
                    pair.running.push(first);
                    pair.running.push(second);
                }
                Op::Finish(i) => {
                    if !pair.running.is_empty() {
                        let i = i % pair.running.len();
                        pair.finish(i);
                    }
                }
                Op::Evict(n) => pair.evict(n),
            }
            pair.check();
        }
        while !pair.running.is_empty() {
            pair.finish(0);
            pair.check();
        }
        pair.evict(usize::MAX);
        pair.check();
        prop_assert_eq!(pair.radix.len(), 0);
    }
}

fn prompt(len: usize, seed: u32) -> (Vec<u32>, Vec<BlockHash>) {
    let tokens: Vec<u32> = (0..len as u32).map(|t| t + seed * 10_000).collect();
    let hashes = hashes_of(&tokens);
    (tokens, hashes)
}

fn counts(c: &RadixCache) -> (usize, usize, usize) {
    (c.len(), c.evictable_blocks(), c.in_use_blocks())
}

#[test]
fn a_hit_never_covers_the_last_token() {
    let mut cache = RadixCache::new(BS as u32);
    let (tokens, hashes) = prompt(3 * BS, 1);
    let ids = [BlockId(0), BlockId(1), BlockId(2)];
    let mut hold = cache.lookup(&hashes, tokens.len(), &mut Vec::new());
    cache
        .insert(&mut hold, &hashes, &ids, &mut Vec::new())
        .unwrap();
    cache.release(hold).unwrap();
    // Exactly three blocks of tokens: the third block holds the last token.
    let mut hit = Vec::new();
    let hold = cache.lookup(&hashes, tokens.len(), &mut hit);
    assert_eq!(hit, [BlockId(0), BlockId(1)]);
    assert_eq!(hold.blocks(), 2);
    // The hit split the cached run: the third block stays evictable, the first two are held.
    assert_eq!(counts(&cache), (3, 1, 2));
    assert_eq!(cache.stats().splits, 1);
    cache.release(hold).unwrap();
    assert_eq!(counts(&cache), (3, 3, 0));
}

#[test]
fn errors_change_nothing() {
    let mut cache = RadixCache::new(BS as u32);
    let mut other = RadixCache::new(BS as u32);
    let (tokens, hashes) = prompt(4 * BS + 1, 2);
    let ids = [BlockId(0), BlockId(1), BlockId(2), BlockId(3)];
    let mut hold = cache.lookup(&hashes, tokens.len(), &mut Vec::new());
    assert_eq!(
        cache.insert(&mut hold, &hashes, &ids[..3], &mut Vec::new()),
        Err(RadixError::LengthMismatch {
            hashes: 4,
            blocks: 3
        })
    );
    cache
        .insert(&mut hold, &hashes[..2], &ids[..2], &mut Vec::new())
        .unwrap();
    let before = counts(&cache);
    // Its blocks under the hold must be the held ones.
    let wrong = [BlockId(9), BlockId(8), BlockId(2), BlockId(3)];
    assert_eq!(
        cache.insert(&mut hold, &hashes, &wrong, &mut Vec::new()),
        Err(RadixError::NotTheHeldPrefix { index: 1 })
    );
    assert_eq!(counts(&cache), before);
    // Another cache's hold.
    let mut stray = other.lookup(&hashes, tokens.len(), &mut Vec::new());
    other
        .insert(&mut stray, &hashes, &ids, &mut Vec::new())
        .unwrap();
    assert_eq!(
        cache.insert(&mut stray, &hashes, &ids, &mut Vec::new()),
        Err(RadixError::UnknownHold)
    );
    assert_eq!(cache.release(stray), Err(RadixError::UnknownHold));
    assert_eq!(counts(&cache), before);
    // The rest of the prompt, then done.
    let mut newly = Vec::new();
    cache.insert(&mut hold, &hashes, &ids, &mut newly).unwrap();
    assert_eq!(newly, [BlockId(2), BlockId(3)]);
    cache.release(hold).unwrap();
    assert_eq!(counts(&cache), (4, 4, 0));
    let mut evicted = Vec::new();
    assert_eq!(cache.evict(10, &mut evicted), 4);
    assert_eq!(evicted, [BlockId(3), BlockId(2), BlockId(1), BlockId(0)]);
    assert!(cache.is_empty());
}

/// Two caches fed the same requests lay out the same edges: a hold from one is still not
/// the other's, and giving it to the other changes nothing there.
#[test]
fn a_hold_from_a_cache_of_the_same_shape_is_refused() {
    let (tokens, hashes) = prompt(4 * BS + 1, 4);
    let ids = [BlockId(0), BlockId(1), BlockId(2), BlockId(3)];
    let fill = || {
        let mut c = RadixCache::new(BS as u32);
        let mut hold = c.lookup(&hashes, tokens.len(), &mut Vec::new());
        c.insert(&mut hold, &hashes, &ids, &mut Vec::new()).unwrap();
        c.release(hold).unwrap();
        c
    };
    let (mut a, mut b) = (fill(), fill());
    let from_a = a.lookup(&hashes, tokens.len(), &mut Vec::new());
    let from_b = b.lookup(&hashes, tokens.len(), &mut Vec::new());
    let before = counts(&b);
    assert_eq!(b.release(from_a), Err(RadixError::UnknownHold));
    assert_eq!(counts(&b), before, "b's blocks stay held by b's request");
    let mut extra = Vec::new();
    let mut from_a = a.lookup(&hashes, tokens.len(), &mut Vec::new());
    assert_eq!(
        b.insert(&mut from_a, &hashes, &ids, &mut extra),
        Err(RadixError::UnknownHold)
    );
    assert_eq!(counts(&b), before);
    b.release(from_b).unwrap();
    assert_eq!(counts(&b), (4, 4, 0));
    a.release(from_a).unwrap();
}

/// An insert under a hold with the held blocks but another prompt's hashes is refused: it
/// would cache that prompt's blocks under this prompt's path, out of any lookup's reach, and
/// can keep that prompt from caching them under its own.
#[test]
fn an_insert_of_another_prompts_hashes_under_a_hold_is_refused() {
    let mut cache = RadixCache::new(BS as u32);
    let (tokens, hashes) = prompt(2 * BS + 1, 5);
    let (other_tokens, other) = prompt(4 * BS + 1, 6);
    let mut hold = cache.lookup(&hashes, tokens.len(), &mut Vec::new());
    cache
        .insert(
            &mut hold,
            &hashes,
            &[BlockId(0), BlockId(1)],
            &mut Vec::new(),
        )
        .unwrap();
    let before = counts(&cache);
    let table = [BlockId(0), BlockId(1), BlockId(2), BlockId(3)];
    let mut newly = Vec::new();
    assert_eq!(
        cache.insert(&mut hold, &other, &table, &mut newly),
        Err(RadixError::NotTheHeldPrefix { index: 1 })
    );
    assert!(newly.is_empty());
    assert_eq!(counts(&cache), before);
    cache.release(hold).unwrap();
    // The other prompt caches all of its blocks under its own path.
    let mut hold = cache.lookup(&other, other_tokens.len(), &mut Vec::new());
    let table = [BlockId(4), BlockId(5), BlockId(6), BlockId(7)];
    cache.insert(&mut hold, &other, &table, &mut newly).unwrap();
    assert_eq!(newly, table);
    cache.release(hold).unwrap();
}

#[test]
fn a_continuation_cached_first_by_another_request_stays_private() {
    let mut cache = RadixCache::new(BS as u32);
    let (tokens, hashes) = prompt(2 * BS + 1, 3);
    let mut a = cache.lookup(&hashes, tokens.len(), &mut Vec::new());
    let mut b = cache.lookup(&hashes, tokens.len(), &mut Vec::new());
    let mut newly = Vec::new();
    cache
        .insert(&mut a, &hashes, &[BlockId(0), BlockId(1)], &mut newly)
        .unwrap();
    assert_eq!(newly, [BlockId(0), BlockId(1)]);
    newly.clear();
    cache
        .insert(&mut b, &hashes, &[BlockId(5), BlockId(6)], &mut newly)
        .unwrap();
    assert!(newly.is_empty(), "the first copy stays cached");
    assert_eq!(b.blocks(), 0);
    cache.release(b).unwrap();
    cache.release(a).unwrap();
    assert_eq!(counts(&cache), (2, 2, 0));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Hashes that are not chained (drawn from a small set, repeated inside a prompt and
    /// across prompts): the cache may hit less than a chained cache would, but every block it
    /// caches comes back from `evict` exactly once after every hold is released, and its
    /// counts stay consistent.
    #[test]
    fn unchained_hashes_keep_the_cache_consistent(
        prompts in prop::collection::vec(prop::collection::vec(0u128..6, 1..8), 1..10),
        ops in prop::collection::vec((0usize..10, 0usize..4, 0usize..6), 1..80),
    ) {
        let mut cache = RadixCache::new(BS as u32);
        let mut running: Vec<RadixHold> = Vec::new();
        let mut next = 0u32;
        let mut cached = std::collections::HashSet::new();
        for (p, kind, n) in ops {
            match kind {
                0 | 1 => {
                    let hashes: Vec<BlockHash> =
                        prompts[p % prompts.len()].iter().map(|&h| BlockHash(h)).collect();
                    let mut hit = Vec::new();
                    let mut hold = cache.lookup(&hashes, hashes.len() * BS + 1, &mut hit);
                    for b in &hit {
                        prop_assert!(cached.contains(b), "a hit holds cached blocks");
                    }
                    let mut table = hit.clone();
                    while table.len() < hashes.len() {
                        table.push(BlockId(next));
                        next += 1;
                    }
                    let mut newly = Vec::new();
                    cache.insert(&mut hold, &hashes, &table, &mut newly).unwrap();
                    for b in newly {
                        prop_assert!(cached.insert(b), "cached once");
                    }
                    running.push(hold);
                }
                2 => {
                    if !running.is_empty() {
                        let hold = running.remove(n % running.len());
                        cache.release(hold).unwrap();
                    }
                }
                _ => {
                    let mut evicted = Vec::new();
                    let k = cache.evict(n, &mut evicted);
                    prop_assert_eq!(k, evicted.len());
                    for b in evicted {
                        prop_assert!(cached.remove(&b), "evicted once, and only cached blocks");
                    }
                }
            }
            prop_assert_eq!(cache.len(), cached.len());
            prop_assert!(cache.evictable_blocks() <= cache.len());
        }
        for hold in running {
            cache.release(hold).unwrap();
        }
        prop_assert_eq!(cache.evictable_blocks(), cache.len());
        let mut evicted = Vec::new();
        cache.evict(usize::MAX, &mut evicted);
        for b in evicted {
            prop_assert!(cached.remove(&b));
        }
        prop_assert!(cached.is_empty());
        prop_assert!(cache.is_empty());
    }
}
