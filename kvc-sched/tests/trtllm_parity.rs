//! TensorRT-LLM applies a request's retention config (a priority per token range, with a
//! duration) when the request's blocks are stored. Re-expressed through [`KvManager`] with the
//! real pin policy ([`PinningPolicy`], whose soft pins name blocks by their chained hashes)
//! and the real prefix cache: a pin whose blocks are not cached yet (placed ahead of the
//! prompt, or its blocks evicted anyway, since pins are soft, and computed again) ranks them
//! as soon as they are cached, and only while it lives.

use kvc_alloc::{BlockPool, PoolConfig};
use kvc_core::{BlockId, QosClass, ReuseIndex, ReuseScope, SeqId, StoreKey, TenantId};
use kvc_pin::{PinRequest, PinTarget, PinningPolicy, PolicyConfig, Retention, SoftPinConfig};
use kvc_reuse::{HashExtra, PolicyKind, PrefixCache, ScopedIndex, Xxh3Hasher};
use kvc_sched::{KvManager, KvManagerConfig, SeqOwner, SlotGrant, SlotRequest};

const BS: u32 = 4;

type Manager = KvManager<BlockPool, PinningPolicy, ScopedIndex<Xxh3Hasher>>;

fn manager(blocks: u64) -> Manager {
    let index = ScopedIndex::new(
        PrefixCache::new(BS, PolicyKind::Lru),
        Xxh3Hasher,
        HashExtra::new("m", 1),
    );
    let soft = SoftPinConfig::new(1024, blocks as usize, 0.5).unwrap();
    let policy = PinningPolicy::new(PolicyConfig::unpinned(soft)).unwrap();
    let cfg = KvManagerConfig {
        block_size: BS,
        ..KvManagerConfig::default()
    };
    let pool = BlockPool::new(PoolConfig::new(blocks)).unwrap();
    KvManager::new(cfg, pool, policy, index).unwrap()
}

const OWNER: SeqOwner = SeqOwner {
    tenant: TenantId(0),
    class: QosClass::STANDARD,
    session: None,
};

const SCOPE: ReuseScope = ReuseScope {
    tenant: TenantId(0),
    session: None,
};

/// The 64-bit chained hashes the pin policy names `tokens`' full blocks by.
fn chain(kv: &mut Manager, tokens: &[u32]) -> Vec<u64> {
    let mut keys: Vec<StoreKey> = Vec::new();
    kv.reuse_index_mut().block_keys(&SCOPE, tokens, &mut keys);
    keys.iter().map(|k| k.0 as u64).collect()
}

/// Pins tokens `start..end` of `tokens` and hands the updates to the cache, as an engine does.
fn pin(kv: &mut Manager, tokens: &[u32], start: u64, end: u64, priority: u8, now: u64) {
    let hashes = chain(kv, tokens);
    let grant = kv
        .pin_policy_mut()
        .pin(&PinRequest {
            tenant: TenantId(0),
            target: PinTarget::TokenRange {
                chain: &hashes,
                block_size: BS,
                start,
                end,
            },
            priority,
            ttl_ms: 1_000,
            now_ms: now,
        })
        .unwrap();
    for u in grant.updates {
        kv.reuse_index_mut()
            .set_retention(u.block_hash, u.retention);
    }
}

/// Computes `prompt` for `seq` and caches its full blocks; returns the sequence's blocks.
fn prefill(kv: &mut Manager, seq: u64, prompt: &[u32], now: u64) -> Vec<BlockId> {
    kv.open(SeqId(seq), OWNER).unwrap();
    let hit = kv.lookup_prefix(SeqId(seq), prompt, now).unwrap();
    let ask = SlotRequest {
        new_tokens: prompt.len() as u64 - hit,
        ..SlotRequest::default()
    };
    assert_eq!(
        kv.allocate_slots(SeqId(seq), ask, now, &mut Vec::new())
            .unwrap(),
        SlotGrant::Now
    );
    kv.cache_blocks(SeqId(seq), prompt, now).unwrap();
    kv.blocks(SeqId(seq)).unwrap().to_vec()
}

fn priorities(kv: &Manager, blocks: &[BlockId]) -> Vec<Option<u8>> {
    blocks
        .iter()
        .map(|&b| kv.reuse_index().cache().block_priority(b))
        .collect()
}

const D: Option<u8> = Some(Retention::DEFAULT_PRIORITY);

// TensorRT-LLM's token-range retention, set before the prompt is computed: the blocks are
// ranked by it from the moment they are cached.
#[test]
fn a_range_pinned_ahead_ranks_the_blocks_when_they_are_cached() {
    let mut kv = manager(16);
    let prompt: Vec<u32> = (0..17).collect(); // 4 full blocks
    pin(&mut kv, &prompt, 0, 8, 90, 0);
    let blocks = prefill(&mut kv, 1, &prompt, 1);
    assert_eq!(
        priorities(&kv, &blocks[..4]),
        [Some(90), Some(90), D, D],
        "the pin's first two blocks"
    );
    kv.free(SeqId(1)).unwrap();
}

// Soft pins never forbid eviction: a pinned block evicted under pressure and computed again
// while its pin lives is ranked by the pin again; after the pin expires it is not.
#[test]
fn a_pinned_block_computed_again_is_ranked_again_while_the_pin_lives() {
    let mut kv = manager(4);
    let prompt: Vec<u32> = (0..9).collect(); // 2 full blocks
    let blocks = prefill(&mut kv, 1, &prompt, 0);
    pin(&mut kv, &prompt, 0, 8, 90, 0);
    assert_eq!(priorities(&kv, &blocks[..2]), [Some(90), Some(90)]);
    kv.free(SeqId(1)).unwrap();
    // A request needing the whole pool evicts the pinned blocks anyway.
    let other: Vec<u32> = (100..116).collect();
    prefill(&mut kv, 2, &other, 1);
    assert_eq!(kv.stats().evicted_blocks, 2);
    kv.free(SeqId(2)).unwrap();
    // Computed again at 10, within the pin's second: ranked at 90 again.
    let again = prefill(&mut kv, 3, &prompt, 10);
    assert_eq!(priorities(&kv, &again[..2]), [Some(90), Some(90)]);
    kv.free(SeqId(3)).unwrap();
    // Evicted again, and computed after the pin expired (at 1,000): the default.
    prefill(&mut kv, 4, &other, 20);
    kv.free(SeqId(4)).unwrap();
    let late = prefill(&mut kv, 5, &prompt, 2_000);
    assert_eq!(priorities(&kv, &late[..2]), [D, D]);
}
