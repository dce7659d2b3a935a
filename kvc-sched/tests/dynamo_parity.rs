//! The block pool behaviours NVIDIA Dynamo's KV block manager tests (its pool's lifecycle:
//! acquire everything, return, register blocks by sequence hash and match them again; fresh
//! blocks handed out before registered ones; duplicate registrations), re-expressed through
//! [`KvManager`] on a real [`BlockPool`] and the real prefix cache, which together play
//! Dynamo's active pool, inactive pool and registry.
//!
//! Differences by design: a block is registered (cached) by `cache_blocks` after its KV is
//! written, never the last prompt token is matched (the model must compute it), and a
//! duplicate registration keeps the first block while the duplicate stays private to its
//! sequence and is freed with it (Dynamo may keep both, by its duplication policy).

use kvc_alloc::{BlockAllocator, BlockPool, PoolConfig};
use kvc_core::{BlockId, QosClass, SeqId, TenantId, WaitReason};
use kvc_reuse::{HashExtra, PolicyKind, PrefixCache, ScopedIndex, Xxh3Hasher};
use kvc_sched::{
    DynamicOnly, KvManager, KvManagerConfig, Pressure, SeqOwner, SlotGrant, SlotRequest,
};

const BS: u32 = 2;

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

fn grow(kv: &mut Manager, seq: u64, tokens: u64) -> SlotGrant {
    let ask = SlotRequest {
        new_tokens: tokens,
        ..SlotRequest::default()
    };
    kv.allocate_slots(SeqId(seq), ask, 0, &mut Vec::new())
        .unwrap()
}

/// Free plus evictable blocks: what Dynamo counts as available (reset plus inactive blocks).
fn available(kv: &Manager) -> usize {
    let u = kv.usage().total();
    u.free + u.evictable
}

// Dynamo `test_block_pool_lifecycle`: acquire every block, return them, register two blocks,
// match them again (they leave the available count while used), and finally acquire every
// block again, which takes the registered ones last and unregisters them.
#[test]
fn pool_lifecycle_with_registration_and_matching() {
    let mut kv = manager(10);
    kv.open(SeqId(1), OWNER).unwrap();
    assert_eq!(grow(&mut kv, 1, 20), SlotGrant::Now);
    assert_eq!(kv.blocks(SeqId(1)).unwrap().len(), 10);
    assert_eq!(available(&kv), 0);
    // Nothing left: a one-block request waits.
    kv.open(SeqId(2), OWNER).unwrap();
    assert_eq!(
        grow(&mut kv, 2, 1),
        SlotGrant::Later(Pressure::Wait {
            reason: WaitReason::Exhausted
        })
    );
    kv.free(SeqId(2)).unwrap();
    kv.free(SeqId(1)).unwrap();
    assert_eq!(available(&kv), 10);

    // Register two blocks of tokens [1, 2, 3, 4].
    let tokens = [1, 2, 3, 4];
    kv.open(SeqId(3), OWNER).unwrap();
    assert_eq!(kv.lookup_prefix(SeqId(3), &tokens, 1).unwrap(), 0);
    assert_eq!(grow(&mut kv, 3, 4), SlotGrant::Now);
    assert_eq!(available(&kv), 8);
    assert_eq!(kv.cache_blocks(SeqId(3), &tokens, 1).unwrap(), 2);
    let registered = kv.blocks(SeqId(3)).unwrap().to_vec();
    kv.free(SeqId(3)).unwrap();
    assert_eq!(available(&kv), 10);
    assert_eq!(kv.usage().total().evictable, 2);

    // Match them again (one more token, so both blocks can be hit): they are in use, out of
    // the available count, and no other block was taken.
    kv.open(SeqId(4), OWNER).unwrap();
    assert_eq!(kv.lookup_prefix(SeqId(4), &[1, 2, 3, 4, 5], 2).unwrap(), 4);
    assert_eq!(kv.blocks(SeqId(4)).unwrap(), registered.as_slice());
    assert_eq!(available(&kv), 8);
    kv.free(SeqId(4)).unwrap();
    assert_eq!(available(&kv), 10);

    // Acquire every block again: the 8 never-registered blocks first (no eviction), then the
    // 2 registered ones, which are unregistered.
    kv.open(SeqId(5), OWNER).unwrap();
    assert_eq!(grow(&mut kv, 5, 16), SlotGrant::Now);
    assert_eq!(kv.stats().evicted_blocks, 0);
    for b in kv.blocks(SeqId(5)).unwrap() {
        assert!(!registered.contains(b), "{b} was registered");
    }
    assert_eq!(grow(&mut kv, 5, 4), SlotGrant::Now);
    assert_eq!(kv.stats().evicted_blocks, 2);
    assert_eq!(kv.reuse_index().cache().len(), 0);
    assert_eq!(available(&kv), 0);
    kv.free(SeqId(5)).unwrap();
    assert_eq!(kv.usage().total().free, 10);
}

// Dynamo `test_basic_sequence_matching` / partial matches: matching by sequence hash returns
// the registered blocks in order and stops at the first hash that is not registered.
#[test]
fn matching_returns_blocks_in_order_and_stops_at_the_first_miss() {
    let mut kv = manager(10);
    let tokens: Vec<u32> = (1..=8).collect(); // 4 blocks
    kv.open(SeqId(1), OWNER).unwrap();
    assert_eq!(grow(&mut kv, 1, 8), SlotGrant::Now);
    assert_eq!(kv.cache_blocks(SeqId(1), &tokens, 0).unwrap(), 4);
    let blocks = kv.blocks(SeqId(1)).unwrap().to_vec();
    kv.free(SeqId(1)).unwrap();
    // The third block differs: blocks 0 and 1 match, nothing after the miss.
    let mut other = tokens.clone();
    other[5] = 99;
    other.push(9);
    kv.open(SeqId(2), OWNER).unwrap();
    assert_eq!(kv.lookup_prefix(SeqId(2), &other, 1).unwrap(), 4);
    assert_eq!(kv.blocks(SeqId(2)).unwrap(), &blocks[..2]);
    // The full sequence plus one token matches all four.
    let mut longer = tokens.clone();
    longer.push(9);
    kv.open(SeqId(3), OWNER).unwrap();
    assert_eq!(kv.lookup_prefix(SeqId(3), &longer, 2).unwrap(), 8);
    assert_eq!(kv.blocks(SeqId(3)).unwrap(), blocks.as_slice());
}

// Dynamo's duplicate registration: two sequences computed the same blocks at once. The first
// registration stands; the second sequence's copies are not registered, stay its own, and go
// back to the free list when it finishes.
#[test]
fn a_duplicate_registration_keeps_the_first_block() {
    let mut kv = manager(10);
    let tokens = [1, 2, 3, 4];
    for seq in [1, 2] {
        kv.open(SeqId(seq), OWNER).unwrap();
        assert_eq!(kv.lookup_prefix(SeqId(seq), &tokens, 0).unwrap(), 0);
        assert_eq!(grow(&mut kv, seq, 4), SlotGrant::Now);
    }
    assert_eq!(kv.cache_blocks(SeqId(1), &tokens, 1).unwrap(), 2);
    assert_eq!(kv.cache_blocks(SeqId(2), &tokens, 1).unwrap(), 0);
    let first = kv.blocks(SeqId(1)).unwrap().to_vec();
    let second = kv.blocks(SeqId(2)).unwrap().to_vec();
    assert_eq!(first, [BlockId(0), BlockId(1)]);
    assert_eq!(second, [BlockId(2), BlockId(3)]);
    for b in &second {
        assert!(!kv.reuse_index().cache().is_cached(*b));
        assert_eq!(kv.allocator().refcount(*b), Ok(1), "{b}: its sequence only");
    }
    kv.free(SeqId(2)).unwrap();
    for b in &second {
        assert_eq!(kv.allocator().is_free(*b), Ok(true));
    }
    // The registered copy is what later sequences match.
    kv.open(SeqId(3), OWNER).unwrap();
    assert_eq!(kv.lookup_prefix(SeqId(3), &[1, 2, 3, 4, 5], 2).unwrap(), 4);
    assert_eq!(kv.blocks(SeqId(3)).unwrap(), first.as_slice());
}
