//! An engine's prefix caching from the `kvc-reuse` docs, over a real block pool
//! (`kvc-alloc`'s `BlockPool`): cache a prompt and look it up, share a system prompt between
//! sequences, fork a sequence for parallel sampling (copy-on-write of its partial last block),
//! cache decode blocks as they fill (as more of the same request, so a policy that learns
//! from requests sees each prompt once), evict under memory pressure, pin a hot prefix with a TTL,
//! keep tenants apart, drop everything on a model update, and meet the double-release error.
//!
//! Every step checks the ownership rule the docs state: each holder of a block holds one pool
//! reference, so a cached block's pool reference count is its use count plus one (the
//! cache's), and once every request has finished and the cache is emptied the pool is whole
//! again.
//!
//! ```sh
//! cargo run -p kvc-reuse --example engine
//! ```

#![allow(clippy::print_stdout)] // a program: it says what it did

use kvc_alloc::{BlockAllocator, BlockPool, BlockTable, PoolConfig, RegionId, Released};
use kvc_reuse::{
    BlockHash, BlockHasher, BlockId, HashExtra, KvEvent, OfferRole, PolicyKind, PrefixCache,
    Retention, ReuseError, Sha256Hasher,
};

const BS: u32 = 16;
const POOL_BLOCKS: u64 = 24;
const D: RegionId = RegionId::DYNAMIC;

type Error = Box<dyn std::error::Error>;

/// The engine: a pool of KV blocks, the prefix cache over it, and a clock.
struct Engine {
    pool: BlockPool,
    cache: PrefixCache,
    now_ms: u64,
}

/// A running sequence: its block table and the chain hashes of its tokens so far.
struct Seq {
    tokens: Vec<u32>,
    table: BlockTable,
    root: BlockHash,
    /// Full blocks it offered to the cache (its prompt's first, then its decode blocks').
    offered: usize,
}

impl Engine {
    fn new(policy: PolicyKind) -> Result<Self, Error> {
        Ok(Self {
            pool: BlockPool::new(PoolConfig::new(POOL_BLOCKS))?,
            cache: PrefixCache::with_capacity(BS, policy, POOL_BLOCKS as usize),
            now_ms: 0,
        })
    }

    fn tick(&mut self) -> u64 {
        self.now_ms += 10;
        self.now_ms
    }

    fn hashes(&self, root: BlockHash, tokens: &[u32]) -> Vec<BlockHash> {
        let mut out = Vec::new();
        Sha256Hasher.hash_blocks(root, tokens, self.cache.block_size() as usize, &mut out);
        out
    }

    /// Frees enough blocks for `need` more: the pool's free blocks first, then evictions.
    fn make_room(&mut self, need: usize) -> Result<(), Error> {
        let free = self.pool.free_blocks(D)?;
        if free >= need {
            return Ok(());
        }
        if free + self.cache.evictable_blocks() < need {
            return Err(format!("{need} blocks needed, {free} free").into());
        }
        let mut evicted = Vec::new();
        let now = self.tick();
        let n = self.cache.evict(need - free, now, &mut evicted);
        assert_eq!(n, need - free, "evict returns min(n, evictable_blocks())");
        for b in evicted {
            // The cache's reference was the last one: the block is free again.
            assert_eq!(
                self.pool.release(b)?,
                Released::Freed,
                "only the cache held {b}"
            );
        }
        Ok(())
    }

    /// Admits a prompt: reuse its longest cached prefix, compute the rest into fresh blocks,
    /// and offer its full blocks to the cache. Returns the sequence and its hit tokens.
    fn prefill(&mut self, root: BlockHash, prompt: &[u32]) -> Result<(Seq, u64), Error> {
        let hashes = self.hashes(root, prompt);
        let now = self.tick();
        let hit = self.cache.lookup(&hashes, prompt.len(), now);
        assert!(
            hit.tokens < prompt.len() as u64,
            "the last token is computed"
        );
        let mut table = BlockTable::new(BS);
        for (i, &b) in hit.blocks.iter().enumerate() {
            // A hit's blocks hold the tokens they claim.
            assert_eq!(self.cache.block_hash(b), Some(hashes[i]));
            self.pool.retain(b)?; // the request's reference
            table.push_block(b);
        }
        table
            .advance(hit.tokens)
            .map_err(|_| "hit blocks hold the hit")?;
        let rest = prompt.len() as u64 - hit.tokens;
        self.make_room(table.blocks_needed(rest))?;
        table.append_tokens(&mut self.pool, D, rest)?;
        // ... the model computes tokens hit.tokens.. into the table's blocks ...
        let mut seq = Seq {
            tokens: prompt.to_vec(),
            table,
            root,
            offered: 0,
        };
        self.offer(&mut seq)?;
        Ok((seq, hit.tokens))
    }

    /// Offers a sequence's full blocks (prompt and output so far) to the cache: the first
    /// offer is its prompt, later ones more of the same request, so the policy counts the
    /// request once.
    fn offer(&mut self, seq: &mut Seq) -> Result<(), Error> {
        let hashes = self.hashes(seq.root, &seq.tokens);
        let mut newly = Vec::new();
        let now = self.tick();
        let role = match seq.offered {
            0 => OfferRole::Prompt,
            offered_before => OfferRole::More { offered_before },
        };
        self.cache.insert_as(
            &hashes,
            &seq.table.blocks()[..hashes.len()],
            role,
            now,
            &mut newly,
        )?;
        seq.offered = hashes.len();
        for b in newly {
            self.pool.retain(b)?; // the cache's reference
        }
        Ok(())
    }

    /// Decodes `n` tokens, caching each block as it fills (as vLLM does).
    fn decode(&mut self, seq: &mut Seq, n: u32) -> Result<(), Error> {
        for i in 0..n {
            self.make_room(seq.table.blocks_needed(1))?;
            seq.table.append_tokens(&mut self.pool, D, 1)?;
            seq.tokens.push(50_000 + i);
            if seq.tokens.len().is_multiple_of(BS as usize) {
                self.offer(seq)?;
            }
        }
        Ok(())
    }

    /// A second sequence continuing from `seq` (parallel sampling).
    fn fork(&mut self, seq: &Seq) -> Result<Seq, Error> {
        self.cache.acquire(seq.table.blocks())?;
        let table = seq.table.fork(&mut self.pool)?;
        Ok(Seq {
            tokens: seq.tokens.clone(),
            table,
            root: seq.root,
            offered: seq.offered,
        })
    }

    /// The sequence is done: its whole table goes back to the cache, then to the pool.
    fn finish(&mut self, mut seq: Seq) -> Result<(), Error> {
        self.cache.release(seq.table.blocks())?;
        seq.table.release_all(&mut self.pool)?;
        Ok(())
    }

    /// The ownership rule, checked on every cached block.
    fn check(&self, seqs: &[&Seq]) -> Result<(), Error> {
        for seq in seqs {
            for &b in seq.table.blocks() {
                let cached = self.cache.use_count(b).map_or(0, |n| n + 1);
                let holders = seqs
                    .iter()
                    .filter(|s| s.table.blocks().contains(&b))
                    .count();
                assert_eq!(
                    self.pool.refcount(b)?,
                    holders as u32 + u32::from(cached > 0)
                );
                if let Some(uses) = self.cache.use_count(b) {
                    assert_eq!(uses as usize, holders, "{b}: one use per holder");
                }
            }
        }
        Ok(())
    }
}

fn main() -> Result<(), Error> {
    let mut e = Engine::new(PolicyKind::Lru)?;
    let model = HashExtra::new("llama-3-8b", 1);
    let tenant_a = Sha256Hasher.root(&model.clone().with_salt(*b"tenant-a"));
    let tenant_b = Sha256Hasher.root(&model.clone().with_salt(*b"tenant-b"));
    let system: Vec<u32> = (1..=48).collect(); // three full blocks
    let prompt = |tail: u32| -> Vec<u32> {
        let mut p = system.clone();
        p.extend((0..20).map(|i| tail * 100 + i));
        p
    };

    // Two requests share the system prompt: the second computes only its own tokens.
    let (mut a, hit) = e.prefill(tenant_a, &prompt(1))?;
    assert_eq!(hit, 0);
    let (b, hit) = e.prefill(tenant_a, &prompt(2))?;
    assert_eq!(hit, 48, "three system blocks reused");
    assert_eq!(a.table.blocks()[..3], b.table.blocks()[..3]);
    e.check(&[&a, &b])?;
    println!("shared the system prompt: {hit} tokens reused");

    // Another tenant with the same prompt hits nothing: its chains have another root.
    let (c, hit) = e.prefill(tenant_b, &prompt(1))?;
    assert_eq!(hit, 0);
    e.finish(c)?;

    // Parallel sampling: fork `a` (68 tokens, its last block holds 4), copy-on-write.
    let mut sample = e.fork(&a)?;
    e.check(&[&a, &b, &sample])?;
    let shared_last = *a.table.blocks().last().ok_or("a has blocks")?;
    let copy = sample
        .table
        .make_last_writable(&mut e.pool, D)?
        .ok_or("the partial last block is shared")?;
    assert_eq!(copy.src, shared_last);
    assert!(
        !e.cache.is_cached(copy.dst),
        "the copy is private to the sample"
    );
    // ... the kernels copy copy.src into copy.dst ...
    e.decode(&mut sample, 12)?; // fills block 4 (tokens 64..80): cached as the sample's
    e.decode(&mut a, 12)?; // the same tokens: a's block 4 is a duplicate
    e.check(&[&a, &b, &sample])?;
    let cached = e.cache.block_hash(sample.table.blocks()[4]);
    assert!(cached.is_some());
    // One block per hash: the later copy of the same tokens stays private to `a` and goes
    // back to the pool with it (vLLM would cache both).
    assert!(!e.cache.is_cached(a.table.blocks()[4]));
    println!("forked a sequence: {} blocks cached", e.cache.len());

    e.finish(sample)?;
    e.finish(b)?;
    e.finish(a)?;
    let evictable = e.cache.evictable_blocks();
    assert_eq!(evictable, e.cache.len(), "nothing in use");
    assert_eq!(e.pool.free_blocks(D)? + evictable, POOL_BLOCKS as usize);

    // A double release is an error, and nothing changes.
    let (d, _) = e.prefill(tenant_a, &prompt(3))?;
    e.cache.release(d.table.blocks())?;
    let again = e.cache.release(d.table.blocks());
    assert!(
        matches!(again, Err(ReuseError::NotInUse { .. })),
        "{again:?}"
    );
    let mut d = d;
    d.table.release_all(&mut e.pool)?; // the request's own references, once

    // Pin the system prompt for 1 s, then fill the pool with unrelated prompts: everything
    // else is evicted first, and the pin holds.
    let sys_hashes = e.hashes(tenant_a, &system);
    let until = e.now_ms + 1_000;
    for &h in &sys_hashes {
        let pin = Retention {
            priority: 90,
            until: Some(until),
        };
        assert!(e.cache.set_retention(h, pin, e.now_ms));
    }
    for i in 0..6 {
        let other: Vec<u32> = (0..70).map(|t| 1_000_000 + i * 1_000 + t).collect();
        let (s, _) = e.prefill(tenant_a, &other)?;
        e.finish(s)?;
    }
    let (s, hit) = e.prefill(tenant_a, &prompt(9))?;
    assert_eq!(hit, 48, "the pinned system prompt survived the pressure");
    e.finish(s)?;
    println!(
        "pinned prefix kept under pressure; {} blocks cached",
        e.cache.len()
    );

    // After the TTL the pin decays to the default priority and LRU order applies again. The
    // cache reads retentions at its own clock: the time of the last call that gave one.
    e.now_ms = until;
    let (s, _) = e.prefill(tenant_a, &prompt(10))?;
    e.finish(s)?;
    let first = e.cache.block_retention(
        (0..POOL_BLOCKS as u32)
            .map(BlockId)
            .find(|&b| e.cache.block_hash(b) == Some(sys_hashes[0]))
            .ok_or("system block cached")?,
    );
    assert_eq!(first, Some(Retention::DEFAULT));

    // A model update: new chains under version 2, and the old blocks dropped at once.
    e.cache.subscribe();
    let v2 = Sha256Hasher.root(&HashExtra::new("llama-3-8b", 2).with_salt(*b"tenant-a"));
    let (s, hit) = e.prefill(v2, &prompt(1))?;
    assert_eq!(hit, 0, "no block of version 1 can hit");
    e.finish(s)?;
    let dropped = e.cache.clear()?;
    let mut freed = Vec::new();
    let now = e.tick();
    assert_eq!(e.cache.evict(usize::MAX, now, &mut freed), dropped);
    for b in freed {
        assert_eq!(e.pool.release(b)?, Released::Freed);
    }
    let mut events = Vec::new();
    e.cache.drain_events(&mut events);
    assert!(matches!(
        events.last().map(|r| &r.event),
        Some(KvEvent::AllCleared)
    ));
    assert!(e.cache.is_empty());
    assert_eq!(
        e.pool.free_blocks(D)?,
        POOL_BLOCKS as usize,
        "every block is back"
    );
    let m = e.cache.metrics();
    println!(
        "model update dropped {dropped} blocks; {} lookups, hit rate {:.1}%, {} evicted",
        m.queries,
        100.0 * m.hit_rate(),
        m.evicted_capacity
    );
    Ok(())
}
