//! Criterion benchmarks of the prefix cache: hashing one 16-token block with each hasher
//! (xxh3, BLAKE3, keyed BLAKE3, SHA-256),
//! hashing plus lookup of a fully cached 32k-token prompt (16-token blocks) with each hasher,
//! inserting the same prompt into an empty cache, evicting 1,024 blocks, and setting the
//! retention of one block by its short hash (what `ReuseIndex::set_retention` does) in a
//! cache of 131,072 blocks. The lookup, insert and eviction benches run `RadixCache` beside
//! `PrefixCache` (LRU), on the same blocks.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use kvc_core::BlockId;
use kvc_reuse::{
    BlockHasher, HashExtra, HasherKind, PolicyKind, PrefixCache, RadixCache, RadixHold,
};

const TOKENS: usize = 32 * 1024;
const BS: u32 = 16;

fn prompt() -> Vec<u32> {
    (0..TOKENS as u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % 128_000)
        .collect()
}

fn filled(hasher: HasherKind, tokens: &[u32]) -> (PrefixCache, Vec<kvc_reuse::BlockHash>) {
    let root = hasher.root(&HashExtra::new("bench", 1));
    let mut hashes = Vec::new();
    hasher.hash_blocks(root, tokens, BS as usize, &mut hashes);
    let blocks: Vec<BlockId> = (0..hashes.len() as u32).map(BlockId).collect();
    let mut cache = PrefixCache::new(BS, PolicyKind::Lru);
    cache
        .insert(&hashes, &blocks, 0, &mut Vec::new())
        .expect("fresh blocks");
    // The request that computed them is done: the blocks are cached and unused.
    cache.release(&blocks).expect("held by the insert");
    (cache, hashes)
}

/// One chained 16-token block: the time per block of every prompt hash.
fn chain(c: &mut Criterion) {
    let tokens = prompt();
    let block = &tokens[..BS as usize];
    for hasher in HasherKind::ALL {
        let parent = hasher.root(&HashExtra::new("bench", 1));
        c.bench_function(
            &format!("reuse/chain one 16-token block ({})", hasher.name()),
            |b| b.iter(|| hasher.chain(black_box(parent), black_box(block))),
        );
    }
}

fn lookup(c: &mut Criterion) {
    let tokens = prompt();
    for hasher in HasherKind::ALL {
        let (mut cache, _) = filled(hasher, &tokens);
        let root = hasher.root(&HashExtra::new("bench", 1));
        let mut hashes = Vec::with_capacity(TOKENS / BS as usize);
        c.bench_function(
            &format!("reuse/hash+lookup 32k-token prompt ({})", hasher.name()),
            |b| {
                b.iter(|| {
                    hashes.clear();
                    hasher.hash_blocks(root, black_box(&tokens), BS as usize, &mut hashes);
                    let hit = cache.lookup(&hashes, tokens.len(), 1);
                    cache.release(&hit.blocks).expect("held by the lookup");
                    black_box(hit.tokens)
                })
            },
        );
    }
    let (mut cache, hashes) = filled(HasherKind::Xxh3, &tokens);
    c.bench_function("reuse/lookup only, 2048 cached blocks", |b| {
        b.iter(|| {
            let hit = cache.lookup(black_box(&hashes), tokens.len(), 1);
            cache.release(&hit.blocks).expect("held by the lookup");
            black_box(hit.tokens)
        })
    });
    let mut radix = RadixCache::new(BS);
    let blocks: Vec<BlockId> = (0..hashes.len() as u32).map(BlockId).collect();
    let mut hold = RadixHold::NOTHING;
    radix
        .insert(&mut hold, &hashes, &blocks, &mut Vec::new())
        .expect("fresh blocks");
    radix.release(hold).expect("held by the insert");
    let mut hit = Vec::with_capacity(blocks.len());
    c.bench_function("reuse/lookup only, 2048 cached blocks (radix)", |b| {
        b.iter(|| {
            hit.clear();
            let hold = radix.lookup(black_box(&hashes), tokens.len(), &mut hit);
            radix.release(hold).expect("held by the lookup");
            black_box(hit.len())
        })
    });
}

fn insert(c: &mut Criterion) {
    let tokens = prompt();
    for hasher in HasherKind::ALL {
        let root = hasher.root(&HashExtra::new("bench", 1));
        let blocks: Vec<BlockId> = (0..(TOKENS / BS as usize) as u32).map(BlockId).collect();
        let mut hashes = Vec::with_capacity(blocks.len());
        let mut newly = Vec::with_capacity(blocks.len());
        c.bench_function(
            &format!("reuse/hash+insert 32k-token prompt ({})", hasher.name()),
            |b| {
                b.iter_batched(
                    || PrefixCache::new(BS, PolicyKind::Lru),
                    |mut cache| {
                        hashes.clear();
                        newly.clear();
                        hasher.hash_blocks(root, black_box(&tokens), BS as usize, &mut hashes);
                        cache
                            .insert(&hashes, &blocks, 0, &mut newly)
                            .expect("fresh blocks");
                        cache
                    },
                    BatchSize::LargeInput,
                )
            },
        );
    }
    let hasher = HasherKind::Xxh3;
    let root = hasher.root(&HashExtra::new("bench", 1));
    let blocks: Vec<BlockId> = (0..(TOKENS / BS as usize) as u32).map(BlockId).collect();
    let mut hashes = Vec::with_capacity(blocks.len());
    let mut newly = Vec::with_capacity(blocks.len());
    c.bench_function("reuse/hash+insert 32k-token prompt (xxh3, radix)", |b| {
        b.iter_batched(
            || RadixCache::new(BS),
            |mut cache| {
                hashes.clear();
                newly.clear();
                hasher.hash_blocks(root, black_box(&tokens), BS as usize, &mut hashes);
                let mut hold = RadixHold::NOTHING;
                cache
                    .insert(&mut hold, &hashes, &blocks, &mut newly)
                    .expect("fresh blocks");
                (cache, hold)
            },
            BatchSize::LargeInput,
        )
    });
}

fn evict(c: &mut Criterion) {
    // 64 prompts of 64 blocks sharing their first 16: 3,088 cached blocks, evict 1,024.
    let hasher = HasherKind::Xxh3;
    let root = hasher.root(&HashExtra::new("bench", 1));
    let mut chains = Vec::new();
    for p in 0..64u32 {
        let tokens: Vec<u32> = (0..64 * BS)
            .map(|i| if i < 16 * BS { i } else { p * 100_000 + i })
            .collect();
        let mut hashes = Vec::new();
        hasher.hash_blocks(root, &tokens, BS as usize, &mut hashes);
        chains.push(hashes);
    }
    for policy in PolicyKind::ALL {
        let mut out = Vec::with_capacity(1024);
        c.bench_function(
            &format!("reuse/evict 1024 blocks ({})", policy.name()),
            |b| {
                b.iter_batched(
                    || {
                        let mut cache = PrefixCache::with_policy(BS, policy.build(4096));
                        let mut next = 0u32;
                        for (t, hashes) in chains.iter().enumerate() {
                            let blocks: Vec<BlockId> =
                                (next..next + hashes.len() as u32).map(BlockId).collect();
                            next += hashes.len() as u32;
                            let mut newly = Vec::new();
                            cache
                                .insert(hashes, &blocks, t as u64, &mut newly)
                                .expect("fresh blocks");
                            cache.release(&newly).expect("held by the insert");
                        }
                        cache
                    },
                    |mut cache| {
                        out.clear();
                        black_box(cache.evict(1024, 100, &mut out));
                        cache
                    },
                    BatchSize::LargeInput,
                )
            },
        );
    }
    let mut out = Vec::with_capacity(1024);
    c.bench_function("reuse/evict 1024 blocks (lru, radix)", |b| {
        b.iter_batched(
            || {
                let mut cache = RadixCache::new(BS);
                let mut next = 0u32;
                for hashes in &chains {
                    let blocks: Vec<BlockId> =
                        (next..next + hashes.len() as u32).map(BlockId).collect();
                    next += hashes.len() as u32;
                    let mut hit = Vec::new();
                    let mut hold = cache.lookup(hashes, hashes.len() * BS as usize, &mut hit);
                    let mut table = hit;
                    table.extend_from_slice(&blocks[table.len()..]);
                    cache
                        .insert(&mut hold, hashes, &table, &mut Vec::new())
                        .expect("fresh blocks");
                    cache.release(hold).expect("held by the insert");
                }
                cache
            },
            |mut cache| {
                out.clear();
                black_box(cache.evict(1024, &mut out));
                cache
            },
            BatchSize::LargeInput,
        )
    });
}

/// A pin update through `ReuseIndex::set_retention`: one block named by its short hash, in a
/// cache of 64 prompts of 32k tokens (131,072 blocks, about 2M tokens).
fn retention_by_short_hash(c: &mut Criterion) {
    let hasher = HasherKind::Xxh3;
    let mut cache = PrefixCache::new(BS, PolicyKind::Lru);
    let mut shorts = Vec::new();
    for p in 0..64u32 {
        let tokens: Vec<u32> = prompt().iter().map(|t| t ^ (p << 20)).collect();
        let root = hasher.root(&HashExtra::new("bench", 1));
        let mut hashes = Vec::new();
        hasher.hash_blocks(root, &tokens, BS as usize, &mut hashes);
        let first = p * hashes.len() as u32;
        let blocks: Vec<BlockId> = (first..first + hashes.len() as u32).map(BlockId).collect();
        cache
            .insert(&hashes, &blocks, 0, &mut Vec::new())
            .expect("fresh blocks");
        cache.release(&blocks).expect("held by the insert");
        shorts.extend(hashes.iter().step_by(509).map(|h| h.short()));
    }
    let pin = kvc_reuse::Retention {
        priority: 80,
        until: Some(1_000),
    };
    let mut i = 0;
    c.bench_function("reuse/set_retention_short, 131072 cached blocks", |b| {
        b.iter(|| {
            i = (i + 1) % shorts.len();
            assert!(cache.set_retention_short(black_box(shorts[i]), pin, 1));
        })
    });
}

criterion_group!(
    benches,
    chain,
    lookup,
    insert,
    evict,
    retention_by_short_hash
);
criterion_main!(benches);
