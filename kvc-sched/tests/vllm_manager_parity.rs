//! The block-level sequences of vLLM v1's prefix caching tests (prefill, decode, evict,
//! reuse of an evicted block, computed blocks kept over other cached ones, a request that
//! cannot be allocated beside its computed blocks), re-expressed through [`KvManager`] on a
//! real [`BlockPool`] and the real prefix cache ([`ScopedIndex`] over a [`PrefixCache`] with
//! LRU), with exact block ids, reference counts and eviction orders.
//!
//! Block ids differ from vLLM's by design in two ways, each asserted as ours:
//! - the pool has no null block, so ids start at 0;
//! - the pool and the cache are separate: a freed uncached block joins the pool's free list at
//!   its tail, cached blocks are not in the free list at all until evicted, and an allocation
//!   prefers the block physically after the sequence's last one (`allocate_after`). vLLM keeps
//!   one free queue with uncached blocks at its head. What both guarantee, and what these tests
//!   pin, is that cached blocks are taken last, least recently freed first, tail before head.

use kvc_alloc::{BlockAllocator, BlockPool, PoolConfig};
use kvc_core::{BlockId, QosClass, SeqId, TenantId, WaitReason};
use kvc_reuse::{HashExtra, PolicyKind, PrefixCache, ScopedIndex, Xxh3Hasher};
use kvc_sched::{
    DynamicOnly, KvError, KvManager, KvManagerConfig, Pressure, SeqOwner, SlotGrant, SlotRequest,
};

const BS: u32 = 4;

type Manager = KvManager<BlockPool, DynamicOnly, ScopedIndex<Xxh3Hasher>>;

fn manager(blocks: u64) -> Manager {
    let index = ScopedIndex::new(
        PrefixCache::new(BS, PolicyKind::Lru),
        Xxh3Hasher,
        HashExtra::new("m", 1),
    );
    let cfg = KvManagerConfig {
        block_size: BS,
        ..KvManagerConfig::default()
    };
    let pool = BlockPool::new(PoolConfig::new(blocks)).unwrap();
    KvManager::new(cfg, pool, DynamicOnly::default(), index).unwrap()
}

const OWNER: SeqOwner = SeqOwner {
    tenant: TenantId(0),
    class: QosClass::STANDARD,
    session: None,
};

fn ids(list: &[u32]) -> Vec<BlockId> {
    list.iter().copied().map(BlockId).collect()
}

/// `blocks` full blocks, block `i` made of the token `i` repeated (vLLM's `common_token_ids`).
fn common(blocks: u32) -> Vec<u32> {
    (0..blocks)
        .flat_map(|i| std::iter::repeat_n(i, BS as usize))
        .collect()
}

/// Opens `seq`, looks up `prompt`, allocates the rest of it and offers its computed full
/// blocks, as a scheduler does for a prompt computed in one step. Returns the tokens hit.
fn prefill(kv: &mut Manager, seq: u64, prompt: &[u32], now: u64) -> u64 {
    let seq = SeqId(seq);
    kv.open(seq, OWNER).unwrap();
    let hit = kv.lookup_prefix(seq, prompt, now).unwrap();
    let grant = kv
        .allocate_slots(
            seq,
            new_tokens(prompt.len() as u64 - hit),
            now,
            &mut Vec::new(),
        )
        .unwrap();
    assert_eq!(grant, SlotGrant::Now, "seq {seq} prefill");
    kv.cache_blocks(seq, prompt, now).unwrap();
    hit
}

fn new_tokens(n: u64) -> SlotRequest {
    SlotRequest {
        new_tokens: n,
        ..SlotRequest::default()
    }
}

fn blocks(kv: &Manager, seq: u64) -> Vec<BlockId> {
    kv.blocks(SeqId(seq)).unwrap().to_vec()
}

fn refcounts(kv: &Manager, list: &[u32]) -> Vec<u32> {
    list.iter()
        .map(|&b| kv.allocator().refcount(BlockId(b)).unwrap_or(0))
        .collect()
}

/// Evicts every evictable block one at a time through the manager (which frees each one):
/// the order the blocks leave the cache.
fn eviction_order(kv: &mut Manager, now: u64) -> Vec<BlockId> {
    let total = kv.allocator().total_blocks() as u32;
    let cached = |kv: &Manager| -> Vec<BlockId> {
        (0..total)
            .map(BlockId)
            .filter(|&b| kv.reuse_index().cache().is_cached(b))
            .collect()
    };
    let mut order = Vec::new();
    loop {
        let before = cached(kv);
        if kv.evict(1, now).unwrap() == 0 {
            return order;
        }
        let after = cached(kv);
        let gone: Vec<BlockId> = before.into_iter().filter(|b| !after.contains(b)).collect();
        assert_eq!(gone.len(), 1, "one block per eviction");
        assert_eq!(
            kv.allocator().is_free(gone[0]),
            Ok(true),
            "{} freed",
            gone[0]
        );
        order.extend(gone);
    }
}

// vLLM `test_prefill`: a miss, a hit while the first request still runs (both hold the
// prefix), a hit after both finished, then a miss that needs every block evicts the cached
// prefix last, tail first.
#[test]
fn prefill_hits_a_running_and_a_finished_prefix_then_eviction_takes_it_last() {
    let mut kv = manager(10);
    let mut p0 = common(3);
    p0.extend([3, 3, 3]); // 3 full blocks and 3 tokens
    assert_eq!(prefill(&mut kv, 0, &p0, 0), 0);
    assert_eq!(blocks(&kv, 0), ids(&[0, 1, 2, 3]));
    // Full blocks are cached (held by the sequence and the cache); the partial one is not.
    assert_eq!(refcounts(&kv, &[0, 1, 2, 3]), [2, 2, 2, 1]);
    assert!(!kv.reuse_index().cache().is_cached(BlockId(3)));

    // A hit on the common prefix while seq 0 still holds it.
    let mut p1 = common(3);
    p1.push(3);
    assert_eq!(prefill(&mut kv, 1, &p1, 1), 12);
    // Block 3, the physical successor of the hit, is seq 0's: the free list's head is taken.
    assert_eq!(blocks(&kv, 1), ids(&[0, 1, 2, 4]));
    assert_eq!(refcounts(&kv, &[0, 1, 2]), [3, 3, 3]);
    assert_eq!(kv.usage().total().free, 5);

    kv.free(SeqId(0)).unwrap();
    kv.free(SeqId(1)).unwrap();
    let u = kv.usage().total();
    assert_eq!((u.free, u.evictable, u.in_use), (7, 3, 0));

    // A hit on the prefix after both finished; its next block is free again, so it is taken.
    let mut p2 = common(3);
    p2.extend([3, 3]);
    assert_eq!(prefill(&mut kv, 2, &p2, 2), 12);
    assert_eq!(blocks(&kv, 2), ids(&[0, 1, 2, 3]));
    kv.free(SeqId(2)).unwrap();

    // A miss that needs all 10 blocks: never-cached blocks first (unallocated ones in pool
    // order, then those freed by seqs 1 and 2), the cached prefix last, tail first.
    assert_eq!(prefill(&mut kv, 3, &[99; 40], 3), 0);
    assert_eq!(blocks(&kv, 3), ids(&[5, 6, 7, 8, 9, 4, 3, 2, 1, 0]));
    assert_eq!(kv.stats().evicted_blocks, 3);
    let u = kv.usage().total();
    assert_eq!((u.free, u.evictable), (0, 0));
}

// vLLM `test_decode`: decode tokens fill the partial block without a new one; crossing a
// block boundary takes exactly one; a block is cached once full, never while partial.
#[test]
fn decode_takes_a_block_only_at_a_boundary_and_caches_a_block_once_full() {
    let mut kv = manager(10);
    let mut tokens = common(3);
    tokens.extend([3, 3, 3]);
    prefill(&mut kv, 0, &tokens, 0);
    assert_eq!(blocks(&kv, 0), ids(&[0, 1, 2, 3]));
    // One decode token fills block 3: no new block.
    tokens.push(8);
    assert_eq!(
        kv.allocate_slots(SeqId(0), new_tokens(1), 1, &mut Vec::new())
            .unwrap(),
        SlotGrant::Now
    );
    assert_eq!(blocks(&kv, 0).len(), 4);
    assert!(!kv.reuse_index().cache().is_cached(BlockId(3)));
    assert_eq!(kv.cache_blocks(SeqId(0), &tokens, 1).unwrap(), 1);
    assert!(kv.reuse_index().cache().is_cached(BlockId(3)));
    // The next one crosses the boundary: exactly one new block, the physical successor.
    tokens.push(7);
    assert_eq!(
        kv.allocate_slots(SeqId(0), new_tokens(1), 2, &mut Vec::new())
            .unwrap(),
        SlotGrant::Now
    );
    assert_eq!(blocks(&kv, 0), ids(&[0, 1, 2, 3, 4]));
    assert_eq!(kv.cache_blocks(SeqId(0), &tokens, 2).unwrap(), 0);
    assert!(!kv.reuse_index().cache().is_cached(BlockId(4)));
    // Decoding on through the block and into the next one.
    tokens.extend([7, 7, 7, 7]);
    assert_eq!(
        kv.allocate_slots(SeqId(0), new_tokens(4), 3, &mut Vec::new())
            .unwrap(),
        SlotGrant::Now
    );
    assert_eq!(blocks(&kv, 0), ids(&[0, 1, 2, 3, 4, 5]));
    assert_eq!(kv.cache_blocks(SeqId(0), &tokens, 3).unwrap(), 1);
    assert!(kv.reuse_index().cache().is_cached(BlockId(4)));
    assert!(!kv.reuse_index().cache().is_cached(BlockId(5)));
}

// vLLM `test_evict`: two finished requests are evicted request by request in the order they
// were freed, each tail first; blocks touched again by a hit leave the order.
#[test]
fn eviction_order_is_per_request_tail_first_and_a_touch_removes_blocks() {
    let mut kv = manager(10);
    let p0: Vec<u32> = (0..23).collect(); // 5 full blocks and 3 tokens
    prefill(&mut kv, 0, &p0, 0);
    assert_eq!(blocks(&kv, 0), ids(&[0, 1, 2, 3, 4, 5]));
    let p1: Vec<u32> = (23..35).collect(); // 3 full blocks
    prefill(&mut kv, 1, &p1, 1);
    assert_eq!(blocks(&kv, 1), ids(&[6, 7, 8]));
    assert_eq!(kv.usage().total().free, 1);

    kv.free(SeqId(0)).unwrap();
    kv.free(SeqId(1)).unwrap();
    let u = kv.usage().total();
    assert_eq!((u.free, u.evictable), (2, 8));

    // Touch seq 0's first two blocks: a third request hits them and keeps running.
    let p2: Vec<u32> = (0..11).collect();
    assert_eq!(prefill(&mut kv, 2, &p2, 2), 8);
    // Block 2 is cached (not free), so the head of the free list is taken.
    assert_eq!(blocks(&kv, 2), ids(&[0, 1, 9]));
    let u = kv.usage().total();
    assert_eq!(u.free + u.evictable, 7, "vLLM: 7 free blocks");

    // Seq 0's unused tail (freed first) goes before seq 1's, each tail first; the touched
    // blocks are in use and stay.
    assert_eq!(eviction_order(&mut kv, 3), ids(&[4, 3, 2, 8, 7, 6]));
    assert!(kv.reuse_index().cache().is_cached(BlockId(0)));
    assert!(kv.reuse_index().cache().is_cached(BlockId(1)));
}

// vLLM `test_hash_block_correct_reuse`: a cached block evicted and handed out again as a
// partial block carries no hash: the cache forgets it and the old prompt no longer hits.
#[test]
fn an_evicted_block_reused_as_a_partial_block_is_not_cached() {
    let mut kv = manager(1);
    let p0: Vec<u32> = (0..4).collect();
    prefill(&mut kv, 0, &p0, 0);
    assert_eq!(blocks(&kv, 0), ids(&[0]));
    assert!(kv.reuse_index().cache().block_hash(BlockId(0)).is_some());
    kv.free(SeqId(0)).unwrap();

    // Three tokens of the same prompt: shorter than a block, so no hit; the only block is
    // evicted and reused.
    assert_eq!(prefill(&mut kv, 1, &p0[..3], 1), 0);
    assert_eq!(blocks(&kv, 1), ids(&[0]));
    assert_eq!(kv.stats().evicted_blocks, 1);
    assert!(!kv.reuse_index().cache().is_cached(BlockId(0)));
    assert_eq!(kv.reuse_index().cache().block_hash(BlockId(0)), None);
    assert_eq!(kv.allocator().refcount(BlockId(0)), Ok(1), "seq 1 only");
    kv.free(SeqId(1)).unwrap();
    // The old prompt misses.
    kv.open(SeqId(2), OWNER).unwrap();
    let mut longer = p0.clone();
    longer.push(4);
    assert_eq!(kv.lookup_prefix(SeqId(2), &longer, 2).unwrap(), 0);
}

// vLLM `test_computed_blocks_not_evicted`: a request that hits one cached block and needs one
// more evicts another cached block, never the one it hit.
#[test]
fn a_hit_block_is_not_evicted_to_make_room_for_its_own_request() {
    let mut kv = manager(2);
    prefill(&mut kv, 0, &(0..4).collect::<Vec<_>>(), 0);
    assert_eq!(blocks(&kv, 0), ids(&[0]));
    prefill(&mut kv, 1, &(4..8).collect::<Vec<_>>(), 1);
    assert_eq!(blocks(&kv, 1), ids(&[1]));
    kv.free(SeqId(0)).unwrap();
    kv.free(SeqId(1)).unwrap();
    // Block 0 was freed first (older), but the new request hits it: block 1 is evicted.
    let p2: Vec<u32> = (0..8).collect();
    assert_eq!(prefill(&mut kv, 2, &p2, 2), 4);
    assert_eq!(blocks(&kv, 2), ids(&[0, 1]));
    assert_eq!(kv.stats().evicted_blocks, 1);
    assert!(kv.reuse_index().cache().is_cached(BlockId(0)));
}

// vLLM `test_prefill_not_enough_free_blocks_with_computed_blocks`: a request whose computed
// prefix is cached but whose new blocks cannot be allocated leaves every block as it was.
// Differs by design: `lookup_prefix` takes the hit blocks into the sequence at once (vLLM
// takes them only when allocation succeeds), so the scheduler frees the sequence to give
// them back; nothing is evicted meanwhile and the hit blocks are not counted as evictable
// for the request's own allocation.
#[test]
fn a_request_that_cannot_be_allocated_changes_no_block() {
    let mut kv = manager(10);
    let c = common(3);
    prefill(&mut kv, 0, &c, 0);
    assert_eq!(blocks(&kv, 0), ids(&[0, 1, 2]));
    let p1: Vec<u32> = c.iter().chain(&c).copied().collect();
    assert_eq!(prefill(&mut kv, 1, &p1, 1), 12);
    assert_eq!(blocks(&kv, 1), ids(&[0, 1, 2, 3, 4, 5]));
    kv.free(SeqId(1)).unwrap();
    // Seq 0 and the cache hold 0..3; only the cache holds 3..6.
    assert_eq!(refcounts(&kv, &[0, 1, 2, 3, 4, 5]), [2, 2, 2, 1, 1, 1]);
    prefill(&mut kv, 2, &[7; 8], 2);
    assert_eq!(blocks(&kv, 2), ids(&[6, 7]));
    let u = kv.usage().total();
    assert_eq!((u.free, u.evictable), (2, 3));

    // Seq 3 is seq 1's prompt plus 3 more blocks: 6 blocks hit, 3 more needed, 2 free and
    // nothing else evictable (the hit blocks are its own now).
    let p3: Vec<u32> = c.iter().chain(&c).chain(&c).copied().collect();
    kv.open(SeqId(3), OWNER).unwrap();
    assert_eq!(kv.lookup_prefix(SeqId(3), &p3, 3).unwrap(), 24);
    let grant = kv
        .allocate_slots(SeqId(3), new_tokens(12), 3, &mut Vec::new())
        .unwrap();
    // The pin policy is shown 2 free and 0 evictable blocks and says wait.
    assert_eq!(
        grant,
        SlotGrant::Later(Pressure::Wait {
            reason: WaitReason::Exhausted
        })
    );
    assert_eq!(kv.stats().evicted_blocks, 0);
    assert_eq!(blocks(&kv, 3), ids(&[0, 1, 2, 3, 4, 5]));
    // Freeing the waiting sequence gives everything back as it was.
    kv.free(SeqId(3)).unwrap();
    assert_eq!(refcounts(&kv, &[0, 1, 2, 3, 4, 5]), [2, 2, 2, 1, 1, 1]);
    let u = kv.usage().total();
    assert_eq!((u.free, u.evictable), (2, 3));
    assert_eq!(
        kv.free(SeqId(3)),
        Err(KvError::UnknownSeq { seq: SeqId(3) })
    );
}

// vLLM `test_cache_key_salting`: the same tokens under another salt miss; under the same salt
// (two tenants given one salt) they hit.
#[test]
fn salted_tenants_share_only_with_equal_salts() {
    let mut kv = manager(16);
    let mut p: Vec<u32> = common(3);
    p.extend([3; 3]);
    let owner = |t| SeqOwner {
        tenant: TenantId(t),
        ..OWNER
    };
    kv.reuse_index_mut().set_salt(TenantId(1), *b"salt1");
    kv.reuse_index_mut().set_salt(TenantId(2), *b"salt1");
    kv.reuse_index_mut().set_salt(TenantId(3), *b"salt2");
    kv.open(SeqId(0), owner(1)).unwrap();
    kv.lookup_prefix(SeqId(0), &p, 0).unwrap();
    assert_eq!(
        kv.allocate_slots(SeqId(0), new_tokens(15), 0, &mut Vec::new())
            .unwrap(),
        SlotGrant::Now
    );
    assert_eq!(kv.cache_blocks(SeqId(0), &p, 0).unwrap(), 3);
    for (seq, tenant, want) in [(1, 2, 12), (2, 3, 0), (3, 0, 0)] {
        kv.open(SeqId(seq), owner(tenant)).unwrap();
        assert_eq!(
            kv.lookup_prefix(SeqId(seq), &p, 1).unwrap(),
            want,
            "tenant {tenant}"
        );
    }
}

// vLLM `test_reset_prefix_cache`: a reset is refused while a request holds cached blocks;
// once they are free it drops every cached block, and here the manager then frees them all.
#[test]
fn a_reset_is_refused_while_in_use_then_frees_every_cached_block() {
    let mut kv = manager(10);
    let mut p0 = common(3);
    p0.extend([3; 3]);
    prefill(&mut kv, 0, &p0, 0);
    let mut p1 = common(3);
    p1.extend([4; 3]);
    assert_eq!(prefill(&mut kv, 1, &p1, 1), 12);
    assert_eq!(blocks(&kv, 1), ids(&[0, 1, 2, 4]));
    assert_eq!(
        kv.reuse_index_mut().cache_mut().clear(),
        Err(kvc_reuse::ReuseError::InUse { in_use: 3 })
    );
    assert_eq!(kv.reuse_index().cache().hittable_blocks(), 3);
    kv.free(SeqId(0)).unwrap();
    kv.free(SeqId(1)).unwrap();
    assert_eq!(kv.reuse_index_mut().cache_mut().clear(), Ok(3));
    assert_eq!(kv.reuse_index().cache().hittable_blocks(), 0);
    // The dropped blocks are still evictable (held by the cache until handed back).
    assert_eq!(kv.usage().total().evictable, 3);
    assert_eq!(kv.evict(10, 2).unwrap(), 3);
    let u = kv.usage().total();
    assert_eq!((u.free, u.evictable, u.in_use), (10, 0, 0));
    // Nothing hits afterwards.
    kv.open(SeqId(2), OWNER).unwrap();
    assert_eq!(kv.lookup_prefix(SeqId(2), &p0, 3).unwrap(), 0);
}

// vLLM `allocate_slots(num_lookahead_tokens=..)`: lookahead slots (speculative tokens) are
// allocated with the new tokens; tokens that later fill them take no new block.
#[test]
fn lookahead_slots_are_allocated_ahead_and_reused() {
    let mut kv = manager(10);
    kv.open(SeqId(0), OWNER).unwrap();
    let ask = SlotRequest {
        new_tokens: 3,
        lookahead: 6,
        ..SlotRequest::default()
    };
    assert_eq!(
        kv.allocate_slots(SeqId(0), ask, 0, &mut Vec::new())
            .unwrap(),
        SlotGrant::Now
    );
    // 3 + 6 slots: 3 blocks of 4.
    assert_eq!(blocks(&kv, 0), ids(&[0, 1, 2]));
    assert_eq!(kv.num_tokens(SeqId(0)).unwrap(), 3);
    // Five accepted tokens land in the lookahead blocks.
    assert_eq!(
        kv.allocate_slots(SeqId(0), new_tokens(5), 1, &mut Vec::new())
            .unwrap(),
        SlotGrant::Now
    );
    assert_eq!(blocks(&kv, 0).len(), 3);
    assert_eq!(kv.num_tokens(SeqId(0)).unwrap(), 8);
    assert_eq!(kv.usage().total().free, 7);
}
