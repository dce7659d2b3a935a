//! The engine-like replay of the design guide (§4): the block management an inference engine
//! does for a trace, with everything but the model. A fixed number of requests are alive at
//! once; each one hashes its prompt, looks up its cached prefix, allocates blocks for the rest
//! from a real [`BlockPool`], offers its full prompt blocks to the prefix cache
//! ([`PrefixCache`], or [`RadixCache`] with [`CacheKind::Radix`]), appends its output one
//! decode token at a time (a block every `block_size` tokens), and is freed. When the pool runs
//! out, cached blocks are evicted.
//!
//! It reports the wall time of that block management per request, next to the hit rate. Prompt
//! token synthesis (the stand-in for a tokenizer) is timed apart and not counted.

use std::collections::VecDeque;
use std::time::Instant;

use kvc_alloc::{AllocError, BlockAllocator, BlockPool, BlockTable, PoolConfig, RegionId};
use kvc_core::BlockId;
use kvc_reuse::{
    BlockHash, BlockHasher, HashExtra, HasherKind, PolicyKind, PrefixCache, RadixCache, RadixHold,
};
use serde::Serialize;
use thiserror::Error;

use crate::replay::synth_prompt;
use crate::trace::TraceRequest;

/// What to replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockReplayConfig {
    /// KV pool size in tokens (blocks × block size), shared by running requests and the cache.
    pub capacity_tokens: u64,
    /// Tokens per block.
    pub block_size: u32,
    /// Requests alive at once.
    pub alive: usize,
    /// The prefix cache's eviction policy.
    pub policy: PolicyKind,
    /// How the cache keeps blocks: one by one ([`PrefixCache`], any policy) or in runs
    /// ([`RadixCache`], LRU only).
    pub cache: CacheKind,
    /// The block hasher.
    pub hasher: HasherKind,
    /// Admission control: cache a block only when its hash was already seen once, among the
    /// last `2 × pool blocks` hashes offered (a doorkeeper, as in TinyLFU). Blocks of prompts
    /// never repeated are then never cached, so they are never evicted either; the first
    /// reuse of every block is lost.
    pub admission: bool,
}

/// Which prefix cache the replay drives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheKind {
    /// [`PrefixCache`]: a node and an index entry per block; every eviction policy.
    #[default]
    Prefix,
    /// [`RadixCache`]: runs of blocks as radix-tree edges; LRU only.
    Radix,
}

impl CacheKind {
    /// Both, in the report's order.
    pub const ALL: [Self; 2] = [Self::Prefix, Self::Radix];

    /// The name the command line takes (`prefix`, `radix`).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Prefix => "prefix",
            Self::Radix => "radix",
        }
    }

    /// The kind named `name`.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// Why the replay could not run.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BlockReplayError {
    /// The trace holds no request.
    #[error("the trace holds no request")]
    EmptyTrace,
    /// A setting that must be at least 1 is 0.
    #[error("{name} must be at least 1")]
    Zero {
        /// The setting.
        name: &'static str,
    },
    /// The radix cache evicts by LRU only.
    #[error("the radix cache evicts by LRU only, not {policy}")]
    RadixNeedsLru {
        /// The policy asked for.
        policy: &'static str,
    },
    /// The pool is too large for block ids.
    #[error(transparent)]
    Pool(#[from] kvc_alloc::ConfigError),
    /// Even with the cache emptied, the alive requests do not fit in the pool.
    #[error("request {index} does not fit: {source} (raise the capacity or lower --alive)")]
    DoesNotFit {
        /// The request's index in the trace.
        index: usize,
        /// The allocation failure.
        source: AllocError,
    },
    /// The pool or the prefix cache refused a reference change: the replay and the cache
    /// disagree on who holds a block (a broken ownership invariant).
    #[error("request {index}: {what}")]
    Ownership {
        /// The request's index in the trace.
        index: usize,
        /// What was refused.
        what: String,
    },
}

/// What the replay measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BlockReplayReport {
    /// Requests replayed.
    pub requests: usize,
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Prompt tokens served from the cache.
    pub hit_tokens: u64,
    /// `hit_tokens / input_tokens`.
    pub hit_rate: f64,
    /// Decode tokens appended.
    pub decode_tokens: u64,
    /// Blocks evicted from the cache to make room.
    pub evicted_blocks: u64,
    /// Blocks still allocated after every request was freed (the cache's, and only them).
    pub blocks_in_use_at_end: usize,
    /// Blocks the cache holds at the end.
    pub cached_blocks_at_end: usize,
    /// Wall time of block management (hashing, lookup, allocation, caching, appends, frees).
    pub management_s: f64,
    /// Block management per request, in microseconds.
    pub us_per_request: f64,
    /// Wall time of prompt token synthesis, excluded from the above.
    pub synth_s: f64,
    /// CPU time this thread spent on block management (synthesis excluded): unlike the wall
    /// time, it does not count time the thread waited for a core on a busy machine.
    pub management_cpu_s: f64,
    /// Block management CPU time per request, in microseconds.
    pub cpu_us_per_request: f64,
    /// The settings.
    pub capacity_tokens: u64,
    /// Tokens per block.
    pub block_size: u32,
    /// Requests alive at once.
    pub alive: usize,
    /// Policy name.
    pub policy: &'static str,
    /// Cache name (`prefix` or `radix`).
    pub cache: &'static str,
    /// Hasher name.
    pub hasher: &'static str,
    /// Whether admission control was on.
    pub admission: bool,
}

struct Live {
    table: BlockTable,
    /// Its hold on the radix cache's blocks (nothing with the prefix cache, which counts
    /// holders per block).
    hold: RadixHold,
    remaining: u32,
}

/// The cache the replay drives (one value per replay, so its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Cache {
    Prefix(PrefixCache),
    Radix(RadixCache),
}

impl Cache {
    fn len(&self) -> usize {
        match self {
            Self::Prefix(c) => c.len(),
            Self::Radix(c) => c.len(),
        }
    }
}

struct Replay {
    pool: BlockPool,
    cache: Cache,
    evicted: Vec<BlockId>,
    /// Scratch for [`Replay::append`]: blocks just allocated.
    fresh: Vec<BlockId>,
    evicted_blocks: u64,
    /// The first reference change the pool or the cache refused.
    broken: Option<String>,
    /// Emptied tables of finished requests, reused so a request allocates no table.
    spare: Vec<BlockTable>,
}

impl Replay {
    /// Appends `n` tokens to `table`, evicting cached blocks when the pool is short. The same
    /// blocks as [`BlockTable::append_tokens`] (each new block the physical successor of the
    /// one before when that is free, else the free list's head), taken in one
    /// [`BlockPool::allocate_many`] pass; tokens that fit in the blocks held (every decode
    /// step but one in `block_size`) take none.
    #[inline]
    fn append(&mut self, table: &mut BlockTable, n: u64, now: u64) -> Result<(), AllocError> {
        if table.advance(n).is_ok() {
            return Ok(());
        }
        self.append_blocks(table, n, now)
    }

    /// [`Self::append`] when the tokens do not fit in the blocks held (kept out of line, so a
    /// decode step that fits is a few inlined instructions, not a call).
    #[inline(never)]
    fn append_blocks(
        &mut self,
        table: &mut BlockTable,
        n: u64,
        now: u64,
    ) -> Result<(), AllocError> {
        let needed = table.blocks_needed(n);
        if needed == usize::MAX {
            // The token count would overflow: the table's own error.
            return table.append_tokens(&mut self.pool, RegionId::DYNAMIC, n);
        }
        loop {
            let free = self.pool.free_blocks(RegionId::DYNAMIC)?;
            if free >= needed {
                break;
            }
            if self.evict(needed - free, now) == 0 {
                return Err(AllocError::OutOfBlocks {
                    region: RegionId::DYNAMIC,
                    requested: needed,
                    free,
                });
            }
        }
        // Seeded with the table's last block, so the first new block continues its run.
        self.fresh.clear();
        self.fresh.extend(table.blocks().last());
        let seeded = self.fresh.len();
        self.pool
            .allocate_many(RegionId::DYNAMIC, needed, &mut self.fresh)?;
        table.push_blocks(&self.fresh[seeded..]);
        table.advance(n).map_err(|_| AllocError::TooManyTokens {
            tokens: table.num_tokens(),
            extra: n,
        })
    }

    /// Evicts up to `count` cached blocks, dropping the cache's reference on each (which
    /// frees it: the cache only evicts blocks no request uses).
    fn evict(&mut self, count: usize, now: u64) -> usize {
        self.evicted.clear();
        let n = match &mut self.cache {
            Cache::Prefix(c) => c.evict(count, now, &mut self.evicted),
            Cache::Radix(c) => c.evict(count, &mut self.evicted),
        };
        // One batch: the cache only evicts blocks no request uses, so each one's last
        // reference goes and it is freed.
        match self.pool.release_many(&self.evicted) {
            Ok(freed) if freed == self.evicted.len() => {}
            Ok(freed) => {
                let held = self.evicted.len() - freed;
                self.broken
                    .get_or_insert(format!("{held} evicted blocks still held elsewhere"));
            }
            Err(e) => {
                self.broken.get_or_insert(format!("evicted: {e}"));
            }
        }
        self.evicted_blocks += n as u64;
        n
    }

    /// A request is done: it stops using every block of its table in the cache (its hit
    /// blocks and those it cached) and drops its pool references.
    fn retire(&mut self, mut live: Live) {
        let released = match &mut self.cache {
            Cache::Prefix(c) => c.release(live.table.blocks()).map_err(|e| e.to_string()),
            Cache::Radix(c) => c.release(live.hold).map_err(|e| e.to_string()),
        };
        if let Err(e) = released {
            self.broken.get_or_insert(format!("release: {e}"));
        }
        if let Err(e) = live.table.release_all(&mut self.pool) {
            self.broken.get_or_insert(format!("release_all: {e}"));
        }
        self.spare.push(live.table);
    }

    /// The first ownership failure seen, as an error for request `index`.
    fn check(&mut self, index: usize) -> Result<(), BlockReplayError> {
        match self.broken.take() {
            Some(what) => Err(BlockReplayError::Ownership { index, what }),
            None => Ok(()),
        }
    }
}

/// The hashes offered recently, for admission control: a bounded FIFO set.
struct Doorkeeper {
    set: ahash::AHashSet<BlockHash>,
    order: VecDeque<BlockHash>,
    cap: usize,
}

impl Doorkeeper {
    fn new(cap: usize) -> Self {
        Self {
            set: ahash::AHashSet::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    fn contains(&self, h: &BlockHash) -> bool {
        self.set.contains(h)
    }

    fn remember(&mut self, h: BlockHash) {
        if self.set.insert(h) {
            self.order.push_back(h);
            if self.order.len() > self.cap
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }
}

/// CPU time of the calling thread, in seconds (0 where the clock is unavailable).
#[cfg(unix)]
#[allow(unsafe_code)]
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the call only writes to it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// CPU time of the calling thread: not measured off Unix.
#[cfg(not(unix))]
fn thread_cpu_s() -> f64 {
    0.0
}

/// Replays `trace` as an engine's block manager would; see the module docs.
pub fn block_replay(
    trace: &[TraceRequest],
    cfg: &BlockReplayConfig,
) -> Result<BlockReplayReport, BlockReplayError> {
    if trace.is_empty() {
        return Err(BlockReplayError::EmptyTrace);
    }
    for (v, name) in [
        (cfg.block_size as usize, "the block size"),
        (cfg.alive, "the number of requests alive"),
    ] {
        if v == 0 {
            return Err(BlockReplayError::Zero { name });
        }
    }
    // Every block the replay could ever hold at once: a larger pool behaves the same, and
    // sizing the pool's bookkeeping by it keeps a typo like 2^40 tokens from exhausting memory.
    let demand: u64 = trace
        .iter()
        .map(|t| {
            (u64::from(t.input_length) + u64::from(t.output_length.max(1)))
                .div_ceil(u64::from(cfg.block_size))
        })
        .sum();
    if cfg.cache == CacheKind::Radix && cfg.policy != PolicyKind::Lru {
        return Err(BlockReplayError::RadixNeedsLru {
            policy: cfg.policy.name(),
        });
    }
    let blocks = (cfg.capacity_tokens / u64::from(cfg.block_size)).min(demand);
    let bs = cfg.block_size as usize;
    let mut r = Replay {
        pool: BlockPool::new(PoolConfig::new(blocks))?,
        cache: match cfg.cache {
            CacheKind::Prefix => Cache::Prefix(PrefixCache::with_policy(
                cfg.block_size,
                cfg.policy.build(blocks as usize),
            )),
            CacheKind::Radix => Cache::Radix(RadixCache::new(cfg.block_size)),
        },
        evicted: Vec::new(),
        fresh: Vec::new(),
        evicted_blocks: 0,
        broken: None,
        spare: Vec::new(),
    };
    let root = cfg.hasher.root(&HashExtra::new("mooncake-replay", 1));
    let mut door = cfg
        .admission
        .then(|| Doorkeeper::new(2 * usize::try_from(blocks).unwrap_or(usize::MAX >> 1)));
    let (mut tokens, mut hashes, mut newly) = (Vec::new(), Vec::new(), Vec::new());
    let mut hit_blocks: Vec<BlockId> = Vec::new();
    let mut alive: VecDeque<Live> = VecDeque::with_capacity(cfg.alive.min(trace.len()));
    let (mut input_tokens, mut hit_tokens, mut decode_tokens) = (0u64, 0u64, 0u64);
    let (mut synth_s, mut synth_cpu_s) = (0.0, 0.0);
    let start = Instant::now();
    let start_cpu = thread_cpu_s();
    for (index, req) in trace.iter().enumerate() {
        let now = req.timestamp_ms;
        // A full engine: every alive request decodes one token per step until one finishes.
        while alive.len() >= cfg.alive {
            for live in alive.iter_mut() {
                r.append(&mut live.table, 1, now)
                    .map_err(|source| BlockReplayError::DoesNotFit { index, source })?;
                live.remaining = live.remaining.saturating_sub(1);
                decode_tokens += 1;
            }
            while let Some(pos) = alive.iter().position(|l| l.remaining == 0) {
                if let Some(done) = alive.remove(pos) {
                    r.retire(done);
                }
            }
            r.check(index)?;
        }
        let synth = Instant::now();
        let synth_cpu = thread_cpu_s();
        tokens.clear();
        synth_prompt(req, &mut tokens);
        synth_s += synth.elapsed().as_secs_f64();
        synth_cpu_s += thread_cpu_s() - synth_cpu;
        if tokens.is_empty() {
            continue;
        }
        hashes.clear();
        cfg.hasher.hash_blocks(root, &tokens, bs, &mut hashes);
        let mut hold = RadixHold::NOTHING;
        match &mut r.cache {
            Cache::Prefix(c) => hit_blocks = c.lookup(&hashes, tokens.len(), now).blocks,
            Cache::Radix(c) => {
                hit_blocks.clear();
                hold = c.lookup(&hashes, tokens.len(), &mut hit_blocks);
            }
        }
        let hit_len = (hit_blocks.len() * bs) as u64;
        input_tokens += tokens.len() as u64;
        hit_tokens += hit_len;
        let mut table = r
            .spare
            .pop()
            .unwrap_or_else(|| BlockTable::new(cfg.block_size));
        let ownership = |what: String| BlockReplayError::Ownership { index, what };
        // The request's own reference on each hit block (the cache holds another).
        r.pool
            .retain_many(&hit_blocks)
            .map_err(|e| ownership(format!("retain: {e}")))?;
        table.push_blocks(&hit_blocks);
        table
            .advance(hit_len)
            .map_err(|e| ownership(format!("advance: {e}")))?;
        let rest = tokens.len() as u64 - hit_len;
        if let Err(source) = r.append(&mut table, rest, now) {
            return Err(BlockReplayError::DoesNotFit { index, source });
        }
        r.check(index)?;
        let mut full = tokens.len() / bs;
        if let Some(door) = door.as_mut() {
            // The longest prefix whose hashes were all seen before; the rest is remembered.
            let seen = hashes[..full]
                .iter()
                .take_while(|h| door.contains(h))
                .count();
            for &h in &hashes[seen..full] {
                door.remember(h);
            }
            full = seen;
        }
        newly.clear();
        match &mut r.cache {
            Cache::Prefix(c) => c
                .insert(&hashes[..full], &table.blocks()[..full], now, &mut newly)
                .map_err(|e| ownership(format!("insert: {e}")))?,
            Cache::Radix(c) => c
                .insert(
                    &mut hold,
                    &hashes[..full],
                    &table.blocks()[..full],
                    &mut newly,
                )
                .map_err(|e| ownership(format!("insert: {e}")))?,
        }
        // The cache's reference on each block it took.
        r.pool
            .retain_many(&newly)
            .map_err(|e| ownership(format!("retain: {e}")))?;
        alive.push_back(Live {
            table,
            hold,
            remaining: req.output_length.max(1),
        });
    }
    let end = trace.last().map_or(0, |t| t.timestamp_ms);
    while let Some(mut live) = alive.pop_front() {
        let n = u64::from(live.remaining);
        r.append(&mut live.table, n, end)
            .map_err(|source| BlockReplayError::DoesNotFit {
                index: trace.len() - 1,
                source,
            })?;
        decode_tokens += n;
        r.retire(live);
        r.check(trace.len() - 1)?;
    }
    let management_s = start.elapsed().as_secs_f64() - synth_s;
    let management_cpu_s = thread_cpu_s() - start_cpu - synth_cpu_s;
    Ok(BlockReplayReport {
        requests: trace.len(),
        input_tokens,
        hit_tokens,
        hit_rate: hit_tokens as f64 / input_tokens.max(1) as f64,
        decode_tokens,
        evicted_blocks: r.evicted_blocks,
        blocks_in_use_at_end: r.pool.stats().used(),
        cached_blocks_at_end: r.cache.len(),
        management_s,
        us_per_request: management_s * 1e6 / trace.len() as f64,
        synth_s,
        management_cpu_s,
        cpu_us_per_request: management_cpu_s * 1e6 / trace.len() as f64,
        capacity_tokens: cfg.capacity_tokens,
        block_size: cfg.block_size,
        alive: cfg.alive,
        policy: cfg.policy.name(),
        cache: cfg.cache.name(),
        hasher: cfg.hasher.name(),
        admission: cfg.admission,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ts: u64, ids: &[u32], input: u32, output: u32) -> TraceRequest {
        TraceRequest {
            timestamp_ms: ts,
            input_length: input,
            output_length: output,
            hash_ids: ids.to_vec(),
        }
    }

    fn cfg(capacity_tokens: u64, alive: usize) -> BlockReplayConfig {
        BlockReplayConfig {
            capacity_tokens,
            block_size: 16,
            alive,
            policy: PolicyKind::Lru,
            cache: CacheKind::Prefix,
            hasher: HasherKind::Xxh3,
            admission: false,
        }
    }

    /// `Replay::append` takes exactly the blocks `BlockTable::append_tokens` would, and fails
    /// the same way, on a fragmented pool (tables freed in any order, appends of any size).
    #[test]
    fn append_takes_the_blocks_the_table_would() {
        let replay = || Replay {
            pool: BlockPool::new(PoolConfig::new(96)).unwrap(),
            cache: Cache::Prefix(PrefixCache::new(4, PolicyKind::Lru)),
            evicted: Vec::new(),
            fresh: Vec::new(),
            evicted_blocks: 0,
            broken: None,
            spare: Vec::new(),
        };
        let (mut model, mut r) = (replay(), replay());
        let mut want: Vec<BlockTable> = (0..5).map(|_| BlockTable::new(4)).collect();
        let mut got: Vec<BlockTable> = (0..5).map(|_| BlockTable::new(4)).collect();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for step in 0..4_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let t = (x % 5) as usize;
            if (x >> 8).is_multiple_of(7) {
                want[t].release_all(&mut model.pool).unwrap();
                got[t].release_all(&mut r.pool).unwrap();
            } else {
                let n = match (x >> 16) % 4 {
                    0 => 1,
                    1 => 0,
                    _ => (x >> 24) % 40,
                };
                let a = want[t].append_tokens(&mut model.pool, RegionId::DYNAMIC, n);
                let b = r.append(&mut got[t], n, 0);
                assert_eq!(a, b, "step {step}");
            }
            assert_eq!(want[t].blocks(), got[t].blocks(), "step {step}");
            assert_eq!(want[t].num_tokens(), got[t].num_tokens(), "step {step}");
        }
        assert_eq!(model.pool.stats().used(), r.pool.stats().used());
        r.pool.audit().unwrap();
        for (mut a, mut b) in want.into_iter().zip(got) {
            a.release_all(&mut model.pool).unwrap();
            b.release_all(&mut r.pool).unwrap();
        }
    }

    #[test]
    fn shared_prefixes_hit_and_every_block_comes_back() {
        let trace = vec![
            req(0, &[1, 2], 1000, 20),
            req(1, &[1, 2], 1000, 20),
            req(2, &[1, 3], 1000, 20),
        ];
        let r = block_replay(&trace, &cfg(100_000, 2)).unwrap();
        // The second request reuses 62 full blocks (992 tokens); the third shares block 1's
        // 512 tokens (32 blocks).
        assert_eq!(r.hit_tokens, 992 + 512);
        assert_eq!(r.decode_tokens, 60);
        assert_eq!(r.requests, 3);
        assert_eq!(r.blocks_in_use_at_end, r.cached_blocks_at_end);
        assert!(r.cached_blocks_at_end > 0);
    }

    /// The radix cache evicts in the prefix cache's LRU order: on a real trace under memory
    /// pressure (with and without admission control) the two replay alike to the last block.
    #[test]
    fn radix_and_prefix_caches_replay_alike() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/mooncake-synthetic.jsonl");
        let trace = crate::trace::read_trace(&path).unwrap();
        let trace = &trace[..400];
        for (capacity, admission) in [(400_000, false), (400_000, true), (2_000_000, false)] {
            let mut c = cfg(capacity, 16);
            c.admission = admission;
            let a = block_replay(trace, &c).unwrap();
            c.cache = CacheKind::Radix;
            let b = block_replay(trace, &c).unwrap();
            // Memory pressure: every run but admission control's (which caches little)
            // evicts.
            assert!(admission || a.evicted_blocks > 0, "capacity {capacity}");
            assert!(a.hit_tokens > 0);
            assert_eq!(
                (
                    a.hit_tokens,
                    a.evicted_blocks,
                    a.cached_blocks_at_end,
                    a.blocks_in_use_at_end
                ),
                (
                    b.hit_tokens,
                    b.evicted_blocks,
                    b.cached_blocks_at_end,
                    b.blocks_in_use_at_end
                ),
                "capacity {capacity}, admission {admission}"
            );
            assert_eq!((a.cache, b.cache), ("prefix", "radix"));
        }
        c_radix_needs_lru();
    }

    fn c_radix_needs_lru() {
        let mut c = cfg(100_000, 2);
        c.cache = CacheKind::Radix;
        c.policy = PolicyKind::S3Fifo;
        assert_eq!(
            block_replay(&[req(0, &[1], 100, 1)], &c),
            Err(BlockReplayError::RadixNeedsLru { policy: "s3fifo" })
        );
    }

    #[test]
    fn admission_caches_a_block_only_the_second_time_it_is_seen() {
        let trace = vec![
            req(0, &[1, 2], 1000, 20),
            req(1, &[1, 2], 1000, 20),
            req(2, &[1, 3], 1000, 20),
        ];
        let mut c = cfg(100_000, 2);
        c.admission = true;
        let r = block_replay(&trace, &c).unwrap();
        // The first request's blocks are only remembered, so the second one misses; it is
        // cached then, and the third request hits block 1's 512 tokens.
        assert_eq!(r.hit_tokens, 512);
        assert!(r.admission);
        assert_eq!(r.blocks_in_use_at_end, r.cached_blocks_at_end);
    }

    #[test]
    fn a_small_pool_evicts_and_a_too_small_one_says_so() {
        let trace: Vec<_> = (0..20)
            .map(|i| req(i, &[i as u32, 100 + i as u32], 1000, 8))
            .collect();
        let r = block_replay(&trace, &cfg(5_000, 2)).unwrap();
        assert!(r.evicted_blocks > 0);
        assert_eq!(r.blocks_in_use_at_end, r.cached_blocks_at_end);
        assert!(matches!(
            block_replay(&trace, &cfg(1_500, 2)),
            Err(BlockReplayError::DoesNotFit { .. })
        ));
        assert_eq!(
            block_replay(&[], &cfg(5_000, 2)),
            Err(BlockReplayError::EmptyTrace)
        );
        assert!(matches!(
            block_replay(&trace, &cfg(5_000, 0)),
            Err(BlockReplayError::Zero { .. })
        ));
    }

    #[test]
    fn huge_settings_run_as_an_unbounded_engine_would() {
        let trace: Vec<_> = (0..4)
            .map(|i| req(i, &[1, 2 + i as u32], 1000, 4))
            .collect();
        let big = block_replay(&trace, &cfg(u64::MAX, usize::MAX)).unwrap();
        let ample = block_replay(&trace, &cfg(1_000_000, 4)).unwrap();
        assert_eq!(big.hit_tokens, ample.hit_tokens);
        assert_eq!(big.decode_tokens, ample.decode_tokens);
        assert_eq!(big.evicted_blocks, 0);
        assert_eq!(big.capacity_tokens, u64::MAX);
    }
}
