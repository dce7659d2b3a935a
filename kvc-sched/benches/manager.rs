//! Criterion benchmark: one request's life in [`KvManager`] with prefix reuse, per hasher:
//! open, look up a 4,096-token prompt whose first 2,048 tokens every request shares, assign
//! slots, offer the prompt's blocks when it is computed, decode 128 tokens, offer again, free.
//! The pool holds 64 such requests, so the cache evicts as it goes. The hashing of the
//! prompt's 256 blocks (once per request since the manager keeps each sequence's keys; once
//! per call before) is most of the difference between the hashers. With xxh3 also prefilled
//! in chunks of 512 tokens, each chunk's blocks offered when it is computed, as the
//! `Scheduler` does.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use kvc_alloc::{BlockPool, PoolConfig};
use kvc_core::{QosClass, SeqId, TenantId};
use kvc_reuse::{
    Blake3Hasher, BlockHasher, HashExtra, PolicyKind, PrefixCache, ScopedIndex, Sha256Hasher,
    Xxh3Hasher,
};
use kvc_sched::{DynamicOnly, KvManager, KvManagerConfig, SeqOwner, SlotGrant, SlotRequest};

const BS: u32 = 16;
const SHARED: u32 = 2_048;
const PROMPT: u32 = 4_096;
const DECODE: u32 = 128;

fn lifecycle<H: BlockHasher>(c: &mut Criterion, hasher: H, chunk: Option<u32>) {
    let chunks = chunk.map_or(String::new(), |c| format!(" in chunks of {c}"));
    let name = format!(
        "manager/request of {PROMPT} tokens ({SHARED} shared){chunks} + {DECODE} decoded, {}",
        hasher.name()
    );
    let index = ScopedIndex::new(
        PrefixCache::new(BS, PolicyKind::Lru),
        hasher,
        HashExtra::new("bench", 1),
    );
    let cfg = KvManagerConfig {
        block_size: BS,
        ..KvManagerConfig::default()
    };
    let blocks = u64::from(64 * (PROMPT + DECODE) / BS);
    let pool = BlockPool::new(PoolConfig::new(blocks)).unwrap();
    let mut kv = KvManager::new(cfg, pool, DynamicOnly::default(), index).unwrap();
    let owner = SeqOwner {
        tenant: TenantId(0),
        class: QosClass::STANDARD,
        session: None,
    };
    let mut tokens: Vec<u32> = Vec::with_capacity((PROMPT + DECODE) as usize);
    let mut next = 0u64;
    let mut copies = Vec::new();
    c.bench_function(&name, |b| {
        b.iter(|| {
            next += 1;
            let seq = SeqId(next);
            tokens.clear();
            tokens.extend(0..SHARED);
            let own = (next as u32).wrapping_mul(1 << 20);
            tokens.extend((SHARED..PROMPT).map(|t| own.wrapping_add(t)));
            kv.open(seq, owner).unwrap();
            let hit = kv.lookup_prefix(seq, &tokens, 0).unwrap();
            let ask = |new_tokens| SlotRequest {
                new_tokens,
                lookahead: 0,
                admission: false,
            };
            let step = chunk.map_or(u64::from(PROMPT), u64::from);
            let mut done = hit;
            while done < u64::from(PROMPT) {
                let n = step.min(u64::from(PROMPT) - done);
                let grant = kv.allocate_slots(seq, ask(n), 0, &mut copies);
                assert_eq!(grant.unwrap(), SlotGrant::Now);
                done += n;
                kv.cache_blocks(seq, &tokens[..done as usize], 0).unwrap();
            }
            let grant = kv.allocate_slots(seq, ask(u64::from(DECODE)), 0, &mut copies);
            assert_eq!(grant.unwrap(), SlotGrant::Now);
            tokens.extend((0..DECODE).map(|t| own.wrapping_add(PROMPT + t)));
            black_box(kv.cache_blocks(seq, &tokens, 0).unwrap());
            kv.free(seq).unwrap();
        })
    });
}

fn requests(c: &mut Criterion) {
    lifecycle(c, Xxh3Hasher, None);
    lifecycle(c, Xxh3Hasher, Some(512));
    lifecycle(c, Sha256Hasher, None);
    lifecycle(c, Blake3Hasher, None);
}

criterion_group!(benches, requests);
criterion_main!(benches);
