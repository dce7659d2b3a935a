//! The `tiers` scenario's device memory, run by the memory manager: a [`KvManager`] over a
//! [`BlockPool`] of the device's blocks, the LRU [`PrefixCache`] (through a [`ScopedIndex`])
//! as its reuse index, and the [`TierStack`] below it as its `kvc_core::LowerTiers`.
//!
//! The manager decides everything a serving engine's memory manager decides: the device
//! lookup, whether and where the tiers continue the prefix (`load_prefix`), which cached
//! blocks to evict when a request needs room, and which blocks to write down
//! (`drain_offloads`: evicted blocks under write-back, newly cached ones under write-through).
//! [`ManagedDevice`] only plays the engine's part, in the order the step plan prescribes
//! (`docs/tiers.md`, "Tiers inside the scheduler"): it executes each batch of offloads before
//! writing into any block allocated since, copies each load from the tiers into its device
//! blocks and reports it with `complete_load`, "computes" the rest of the prompt, offers its
//! full blocks with `cache_blocks` and frees the request.
//!
//! Device memory holds real bytes: one 32-byte stand-in payload per block (the key of the
//! tokens it holds, twice, from the replay's own hash of the prompt). Offloads are gathered
//! from device memory and checked against the key the manager names; loads are checked
//! against the key they were stored with before they are scattered into device memory. A
//! block whose bytes disagree with its key is an error ([`TiersError::WrongBytes`],
//! [`TiersError::WrongOffload`]), never a silent hit.

use std::sync::Arc;

use kvc_alloc::{BlockPool, PoolConfig};
use kvc_core::{
    BlockAllocator, BlockId, LowerTiers, QosClass, RegionId, Retention, ReuseIndex, ReuseScope,
    SeqId, StoreKey, TenantId,
};
use kvc_reuse::{BlockHash, HashExtra, PolicyKind, PrefixCache, ScopedIndex, Xxh3Hasher};
use kvc_sched::{
    BlockOffload, DynamicOnly, KvManager, KvManagerConfig, KvStats, KvUsage, LoadJob, LoadResult,
    PrefixLoad, SeqOwner, SlotGrant, SlotRequest, TierMode,
};
use kvc_tier::{DeviceEvent, OffloadMode, TierKind, TierStack};

use super::{STAND_IN_BYTES, TiersError, stand_in};

/// The manager the scenario runs: device pool, no pinning, the scoped LRU prefix cache.
type Manager = KvManager<BlockPool, DynamicOnly, ScopedIndex<Xxh3Hasher>>;

/// The one tenant of the replay.
const SCOPE: ReuseScope = ReuseScope {
    tenant: TenantId(0),
    session: None,
};

const OWNER: SeqOwner = SeqOwner {
    tenant: TenantId(0),
    class: QosClass::STANDARD,
    session: None,
};

/// Bytes written into a block that holds no full block of tokens (a prompt's partial tail,
/// never cached): the stand-in of the all-ones key, which no chained hash is in practice.
const UNKEYED: [u8; STAND_IN_BYTES] = [0xFF; STAND_IN_BYTES];

/// Sequence ids of promotions, apart from the requests' (`SeqId(request index)`).
const PROMOTION_SEQS: u64 = 1 << 63;

/// Clears `b`'s mark in `marks` (counted in `count`); returns whether it was marked.
fn unmark(marks: &mut [bool], count: &mut u64, b: BlockId) -> bool {
    let was = marks
        .get_mut(b.index())
        .is_some_and(|m| std::mem::replace(m, false));
    *count -= u64::from(was);
    was
}

fn mem_err<E: std::fmt::Display>(e: E) -> TiersError {
    TiersError::Cache(e.to_string())
}

/// What serving one request took from where.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Full blocks of the prompt.
    pub full_blocks: usize,
    /// Leading blocks hit in device memory.
    pub device_blocks: usize,
    /// Blocks after the device hit loaded from the host, disk and shared tiers (each checked
    /// byte for byte).
    pub tier_blocks: [usize; 3],
}

impl Served {
    /// Blocks loaded from any tier.
    #[must_use]
    pub fn loaded_blocks(&self) -> usize {
        self.tier_blocks.iter().sum()
    }
}

/// Counters of the engine's side of the protocol since the device was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineCounters {
    /// Offloads the manager handed out, gathered from device memory and written down.
    pub offloads: u64,
    /// Load jobs the manager issued.
    pub load_jobs: u64,
    /// Blocks loaded from the tiers, checked against their key and scattered into device
    /// memory (requests' and promotions').
    pub loaded_blocks: u64,
    /// Loads that brought back fewer blocks than the job named (reported `Failed`).
    pub short_loads: u64,
    /// Device blocks written by computing a full block of a prompt.
    pub computed_blocks: u64,
}

/// The device memory of the `tiers` scenario, driven through the memory manager: see the
/// [module docs](self).
pub struct ManagedDevice {
    kv: Manager,
    stack: Option<Arc<TierStack>>,
    block_size: usize,
    /// Device memory: one stand-in payload per block.
    memory: Vec<[u8; STAND_IN_BYTES]>,
    /// Per block: the key it is cached under, until it is written again.
    key_of: Vec<Option<StoreKey>>,
    /// Per block: when a request last used it.
    last_use: Vec<u64>,
    /// Blocks cached by a promotion and not hit since.
    promoted: Vec<bool>,
    /// Blocks marked in `promoted`.
    promoted_now: u64,
    promoted_used: u64,
    promoted_evicted: u64,
    /// How long the youngest block of the latest eviction had been unused: the device
    /// residence. The manager evicts only when a request (or a promotion) needs the room, so
    /// the blocks it evicts are the cached blocks that request writes again.
    last_eviction_age: Option<u64>,
    /// The youngest such block of the request or promotion being served.
    eviction_age: Option<u64>,
    next_promotion: u64,
    counters: EngineCounters,
    keys: Vec<StoreKey>,
    load_keys: Vec<StoreKey>,
    offloads: Vec<BlockOffload>,
    offload_keys: Vec<StoreKey>,
    staging: Vec<u8>,
    buf: Vec<u8>,
    blocks: Vec<BlockId>,
}

impl std::fmt::Debug for ManagedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedDevice")
            .field("blocks", &self.memory.len())
            .field("block_size", &self.block_size)
            .field("tiers", &self.stack.is_some())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl ManagedDevice {
    /// A device of `blocks` blocks of `block_size` tokens (an LRU prefix cache over a pool
    /// with no reserve), with `stack` below it when given, written down in `mode`.
    ///
    /// # Errors
    /// [`TiersError::Setup`] when the pool or the manager refuse the configuration (a block
    /// size of 0).
    pub fn new(
        blocks: usize,
        block_size: u32,
        stack: Option<Arc<TierStack>>,
        mode: OffloadMode,
    ) -> Result<Self, TiersError> {
        let blocks = blocks.max(1);
        let pool = BlockPool::new(PoolConfig::new(blocks as u64)).map_err(super::setup)?;
        let cache = PrefixCache::with_policy(block_size, PolicyKind::Lru.build(blocks));
        let index = ScopedIndex::new(cache, Xxh3Hasher, HashExtra::new("mooncake-replay", 1));
        let cfg = KvManagerConfig {
            block_size,
            session_ttl_ms: None,
        };
        let mut kv =
            KvManager::new(cfg, pool, DynamicOnly::default(), index).map_err(super::setup)?;
        if let Some(stack) = &stack {
            let tier_mode = match mode {
                OffloadMode::WriteThrough => TierMode::WriteThrough,
                _ => TierMode::WriteBack,
            };
            let lower: Arc<dyn LowerTiers> = stack.clone();
            kv = kv.with_tiers(lower, tier_mode);
        }
        Ok(Self {
            kv,
            stack,
            block_size: block_size as usize,
            memory: vec![UNKEYED; blocks],
            key_of: vec![None; blocks],
            last_use: vec![0; blocks],
            promoted: vec![false; blocks],
            promoted_now: 0,
            promoted_used: 0,
            promoted_evicted: 0,
            last_eviction_age: None,
            eviction_age: None,
            next_promotion: 0,
            counters: EngineCounters::default(),
            keys: Vec::new(),
            load_keys: Vec::new(),
            offloads: Vec::new(),
            offload_keys: Vec::new(),
            staging: Vec::new(),
            buf: Vec::new(),
            blocks: Vec::new(),
        })
    }

    /// Serves request `seq` (its prompt `tokens`, arriving at `now`): the device lookup, the
    /// load of what the tiers hold after it, the prefill of the rest, caching its full blocks
    /// and freeing it, every step decided by the manager.
    ///
    /// # Errors
    /// [`TiersError::PromptTooLarge`] when the prompt cannot fit the whole device;
    /// [`TiersError::WrongBytes`] or [`TiersError::WrongOffload`] when a block loaded or
    /// offloaded does not hold the bytes of its key; [`TiersError::Tier`] for a tier's error;
    /// [`TiersError::Cache`] for a broken invariant of the manager.
    pub fn serve(&mut self, seq: SeqId, tokens: &[u32], now: u64) -> Result<Served, TiersError> {
        self.kv.open(seq, OWNER).map_err(mem_err)?;
        self.eviction_age = None;
        let served = self.serve_open(seq, tokens, now);
        self.end_eviction();
        let freed = self.kv.free(seq).map_err(mem_err);
        let served = served?;
        freed?;
        Ok(served)
    }

    fn serve_open(&mut self, seq: SeqId, tokens: &[u32], now: u64) -> Result<Served, TiersError> {
        let bs = self.block_size;
        let device_tokens = self.kv.lookup_prefix(seq, tokens, now).map_err(mem_err)?;
        let device_blocks = usize::try_from(device_tokens).map_err(mem_err)? / bs;
        for b in &self.kv.blocks(seq).map_err(mem_err)?[..device_blocks] {
            self.promoted_used += u64::from(unmark(&mut self.promoted, &mut self.promoted_now, *b));
        }
        let mut served = Served {
            prompt_tokens: tokens.len() as u64,
            full_blocks: tokens.len() / bs,
            device_blocks,
            tier_blocks: [0; 3],
        };
        match self.kv.load_prefix(seq, tokens, now).map_err(mem_err)? {
            PrefixLoad::Started(job) => served.tier_blocks = self.execute_load(&job, now)?.0,
            // Requests arrive one at a time and every load is reported before the next, so
            // no load is ever in flight for another sequence.
            PrefixLoad::None | PrefixLoad::InFlight { .. } => {}
        }
        let computed = self.kv.num_tokens(seq).map_err(mem_err)?;
        let ask = SlotRequest {
            new_tokens: (tokens.len() as u64).saturating_sub(computed),
            lookahead: 0,
            admission: true,
        };
        let mut copies = Vec::new();
        match self
            .kv
            .allocate_slots(seq, ask, now, &mut copies)
            .map_err(mem_err)?
        {
            SlotGrant::Now => {}
            SlotGrant::Never(_) => {
                return Err(TiersError::PromptTooLarge {
                    tokens: tokens.len() as u64,
                    device_tokens: (self.memory.len() * bs) as u64,
                });
            }
            SlotGrant::Later(pressure) => {
                return Err(TiersError::Cache(format!(
                    "{seq}: a request alone on the device waits ({pressure:?})"
                )));
            }
        }
        // The allocation may have evicted: write those blocks down before computing into any.
        self.execute_offloads(now)?;
        self.keys.clear();
        self.kv
            .reuse_index_mut()
            .block_keys(&SCOPE, tokens, &mut self.keys);
        self.blocks.clear();
        self.blocks
            .extend_from_slice(self.kv.blocks(seq).map_err(mem_err)?);
        let first = usize::try_from(computed).map_err(mem_err)? / bs;
        for i in first..self.blocks.len() {
            let b = self.blocks[i];
            self.rewrite(b, now);
            self.memory[b.index()] = match self.keys.get(i) {
                Some(&key) => {
                    self.counters.computed_blocks += 1;
                    stand_in(key)
                }
                None => UNKEYED,
            };
        }
        self.kv.cache_blocks(seq, tokens, now).map_err(mem_err)?;
        // Write-through: the blocks just cached.
        self.execute_offloads(now)?;
        for (i, &b) in self.blocks.iter().enumerate() {
            self.last_use[b.index()] = now;
            // The device hit's blocks stay cached under their keys.
            if i >= device_blocks {
                self.key_of[b.index()] = self.kv.reuse_index().cached_key(b).map(|t| t.key);
            }
        }
        Ok(served)
    }

    /// Notes that device block `b` is about to be written: if it was cached, the manager
    /// evicted it for this request (its age counts for the device residence), and a promoted
    /// block evicted before any hit was wasted.
    fn rewrite(&mut self, b: BlockId, now: u64) {
        if self.key_of[b.index()].take().is_some() {
            let age = now.saturating_sub(self.last_use[b.index()]);
            self.eviction_age = Some(self.eviction_age.map_or(age, |y| y.min(age)));
        }
        if unmark(&mut self.promoted, &mut self.promoted_now, b) {
            self.promoted_evicted += 1;
        }
    }

    /// The request or promotion served evicted: its youngest evicted block is the latest
    /// eviction's.
    fn end_eviction(&mut self) {
        if let Some(age) = self.eviction_age.take() {
            self.last_eviction_age = Some(age);
        }
    }

    /// Executes a load the manager issued: writes down what its allocation evicted, finds its
    /// blocks in the tiers, loads the longest prefix held (every byte checked against its
    /// key), scatters it into device memory and reports it. Returns the blocks loaded per
    /// tier and in all.
    fn execute_load(&mut self, job: &LoadJob, now: u64) -> Result<([usize; 3], usize), TiersError> {
        self.execute_offloads(now)?;
        let Some(stack) = self.stack.clone() else {
            // No tiers, no loads: report it as failed so nothing stays held.
            let failed = LoadResult::Failed { loaded_blocks: 0 };
            self.kv.complete_load(job.id, failed).map_err(mem_err)?;
            return Ok(([0; 3], 0));
        };
        self.load_keys.clear();
        self.load_keys.extend(job.blocks.iter().map(|l| l.key));
        for l in &job.blocks {
            self.rewrite(l.device, now);
        }
        let found = stack.lookup(&self.load_keys).map_err(super::tier_err)?;
        let (per_tier, n) = if found.is_empty() {
            ([0; 3], 0)
        } else {
            let out = super::load_checked(&stack, &self.load_keys, &found, &mut self.buf)?;
            (out.per_tier, out.blocks)
        };
        for (l, src) in job.blocks[..n]
            .iter()
            .zip(self.buf.chunks_exact(STAND_IN_BYTES))
        {
            self.memory[l.device.index()].copy_from_slice(src);
            self.last_use[l.device.index()] = now;
        }
        self.counters.load_jobs += 1;
        self.counters.loaded_blocks += n as u64;
        let result = if n == job.blocks.len() {
            LoadResult::Loaded
        } else {
            self.counters.short_loads += 1;
            LoadResult::Failed { loaded_blocks: n }
        };
        self.kv.complete_load(job.id, result).map_err(mem_err)?;
        Ok((per_tier, n))
    }

    /// Executes the offloads the manager decided since the last call: each block's bytes are
    /// gathered from device memory (checked against the key the manager names) and written
    /// down with the retention it had on the device, one call per retention.
    fn execute_offloads(&mut self, now: u64) -> Result<(), TiersError> {
        self.offloads.clear();
        self.kv.drain_offloads(&mut self.offloads);
        if self.offloads.is_empty() {
            return Ok(());
        }
        let Some(stack) = self.stack.clone() else {
            return Ok(());
        };
        let event = match stack.mode() {
            OffloadMode::WriteThrough => DeviceEvent::Cached,
            _ => DeviceEvent::Evicted,
        };
        // Stable: the manager's order within each retention.
        self.offloads
            .sort_by_key(|o| (o.retention.priority, o.retention.until));
        let mut start = 0;
        while start < self.offloads.len() {
            let retention: Retention = self.offloads[start].retention;
            let end = start
                + self.offloads[start..]
                    .iter()
                    .take_while(|o| o.retention == retention)
                    .count();
            self.offload_keys.clear();
            self.staging.clear();
            for o in &self.offloads[start..end] {
                let bytes = &self.memory[o.device.index()];
                if *bytes != stand_in(o.key) {
                    return Err(TiersError::WrongOffload {
                        key: o.key.to_string(),
                        block: o.device,
                    });
                }
                self.offload_keys.push(o.key);
                self.staging.extend_from_slice(bytes);
            }
            let _ = stack
                .offload_retained(event, &self.offload_keys, &self.staging, retention, now)
                .map_err(super::tier_err)?;
            start = end;
        }
        self.counters.offloads += self.offloads.len() as u64;
        Ok(())
    }

    /// Promotes the blocks of the first `depth` full blocks of `tokens` that the device lost
    /// and the host tier holds (its leading run after the device's part) back into device
    /// memory at `now`, through the manager: a promotion is a sequence of its own whose
    /// prefix continues into the host tier, loaded (every byte checked), cached and freed.
    /// Returns how many blocks came back. Nothing happens (and no recency is touched) when
    /// the device still holds the chain or the host tier does not hold what follows it.
    pub(crate) fn promote(
        &mut self,
        tokens: &[u32],
        depth: usize,
        now: u64,
    ) -> Result<usize, TiersError> {
        let bs = self.block_size;
        let Some(stack) = self.stack.clone() else {
            return Ok(0);
        };
        let depth = depth.min(tokens.len() / bs);
        self.keys.clear();
        self.kv
            .reuse_index_mut()
            .block_keys(&SCOPE, &tokens[..depth * bs], &mut self.keys);
        let cache = self.kv.reuse_index().cache();
        let on_device = self
            .keys
            .iter()
            .take_while(|k| cache.contains(BlockHash(k.0)))
            .count();
        if on_device >= depth {
            return Ok(0);
        }
        let found = stack
            .lookup(&self.keys[on_device..depth])
            .map_err(super::tier_err)?;
        let host = found.iter().take_while(|t| **t == TierKind::Host).count();
        if host == 0 {
            return Ok(0);
        }
        // A prompt whose blocks past the last token are exactly the device's part and the
        // host tier's run: those blocks and one more token.
        let end = on_device + host;
        let mut prompt = tokens[..end * bs].to_vec();
        prompt.push(tokens.get(end * bs).copied().unwrap_or(0));
        let seq = SeqId(PROMOTION_SEQS | self.next_promotion);
        self.next_promotion += 1;
        self.kv.open(seq, OWNER).map_err(mem_err)?;
        self.eviction_age = None;
        let promoted = self.promote_open(seq, &prompt, on_device, now);
        self.end_eviction();
        let freed = self.kv.free(seq).map_err(mem_err);
        let promoted = promoted?;
        freed?;
        Ok(promoted)
    }

    fn promote_open(
        &mut self,
        seq: SeqId,
        prompt: &[u32],
        on_device: usize,
        now: u64,
    ) -> Result<usize, TiersError> {
        let device_tokens = self.kv.lookup_prefix(seq, prompt, now).map_err(mem_err)?;
        if device_tokens != (on_device * self.block_size) as u64 {
            return Ok(0);
        }
        let PrefixLoad::Started(job) = self.kv.load_prefix(seq, prompt, now).map_err(mem_err)?
        else {
            return Ok(0);
        };
        let (_, n) = self.execute_load(&job, now)?;
        for l in &job.blocks[..n] {
            if !std::mem::replace(&mut self.promoted[l.device.index()], true) {
                self.promoted_now += 1;
            }
        }
        self.blocks.clear();
        self.blocks
            .extend_from_slice(self.kv.blocks(seq).map_err(mem_err)?);
        for &b in &self.blocks {
            self.last_use[b.index()] = now;
            self.key_of[b.index()] = self.kv.reuse_index().cached_key(b).map(|t| t.key);
        }
        Ok(n)
    }

    /// Appends the key of each full block of `tokens` to `out`: the chained hash the manager
    /// names the block by, on the device and in the tiers.
    pub fn block_keys(&mut self, tokens: &[u32], out: &mut Vec<StoreKey>) {
        self.kv.reuse_index_mut().block_keys(&SCOPE, tokens, out);
    }

    /// [`block_keys`](Self::block_keys) as the predictor's block hashes, into `out` (cleared
    /// first).
    pub(crate) fn block_hashes(&mut self, tokens: &[u32], out: &mut Vec<BlockHash>) {
        self.keys.clear();
        self.kv
            .reuse_index_mut()
            .block_keys(&SCOPE, tokens, &mut self.keys);
        out.clear();
        out.extend(self.keys.iter().map(|k| BlockHash(k.0)));
    }

    /// The device residence seen by the latest requests (see [`ManagedDevice`]'s fields),
    /// once: the age of the youngest cached block a request had to write again.
    pub(crate) fn take_eviction_age(&mut self) -> Option<u64> {
        self.last_eviction_age.take()
    }

    /// Promoted blocks hit by a request, evicted before any hit, and still unused.
    pub(crate) fn promotion_use(&self) -> (u64, u64, u64) {
        (self.promoted_used, self.promoted_evicted, self.promoted_now)
    }

    /// Counters of the engine's side (offloads, loads, computed blocks).
    #[must_use]
    pub fn counters(&self) -> EngineCounters {
        self.counters
    }

    /// The manager's counters (hits, evictions, tier lookups, loads, offloads).
    #[must_use]
    pub fn kv_stats(&self) -> KvStats {
        self.kv.stats()
    }

    /// Free, evictable and in-use device blocks.
    #[must_use]
    pub fn usage(&self) -> KvUsage {
        self.kv.usage()
    }

    /// Blocks the device's prefix cache holds.
    #[must_use]
    pub fn cached_blocks(&self) -> usize {
        self.kv.reuse_index().cache().len()
    }

    /// Blocks the pool has handed out (not on its free list).
    #[must_use]
    pub fn allocated_blocks(&self) -> usize {
        let pool = self.kv.allocator();
        pool.total_blocks() - pool.free_blocks(RegionId::DYNAMIC).unwrap_or(0)
    }

    /// Checks device memory: every block the prefix cache holds must hold the stand-in of
    /// the key it is cached under (loaded blocks included). Returns how many were checked.
    ///
    /// # Errors
    /// [`TiersError::WrongBytes`] (tier `"device"`) for the first block that does not.
    pub fn verify_cached(&self) -> Result<usize, TiersError> {
        let mut checked = 0;
        for (i, bytes) in self.memory.iter().enumerate() {
            let b = BlockId(u32::try_from(i).map_err(mem_err)?);
            if let Some(t) = self.kv.reuse_index().cached_key(b) {
                if *bytes != stand_in(t.key) {
                    return Err(TiersError::WrongBytes {
                        key: t.key.to_string(),
                        tier: "device",
                    });
                }
                checked += 1;
            }
        }
        Ok(checked)
    }
}
