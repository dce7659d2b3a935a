//! [`KvManager`]: the per-request KV memory layer (its docs say what it does and how).

mod types;

use std::collections::VecDeque;
use std::sync::Arc;

use ahash::AHashMap as HashMap;
use kvc_core::{
    Admission, Adopted, BlockAllocator, BlockCopy, BlockId, LowerTiers, Offer, OfferRole,
    PinPolicy, PlaceRequest, Placement, PoolView, RegionBlocks, RegionId, Released, Retention,
    ReuseIndex, ReuseScope, SeqId, SessionId, StoreKey, TierKey,
};

use crate::tier::{
    BlockLoad, BlockOffload, LoadDone, LoadError, LoadId, LoadJob, LoadResult, PrefixLoad, TierMode,
};

pub use types::{
    KvConfigError, KvError, KvManagerConfig, KvStats, KvUsage, Pressure, RegionUsage, SeqOwner,
    SlotGrant, SlotRequest,
};

/// One open sequence's memory.
#[derive(Clone, Debug)]
struct SeqKv {
    owner: SeqOwner,
    /// Physical blocks in logical order; this sequence holds one pool reference on each.
    blocks: Vec<BlockId>,
    /// Token slots assigned.
    tokens: u64,
    /// Leading blocks already offered to the reuse index.
    offered: usize,
    /// Blocks obtained through the pin policy, per region, to give back to it.
    placed: RegionBlocks,
    /// The load from the tiers this sequence waits for, if any.
    loading: Option<LoadId>,
    /// The keys of its blocks as far as they were computed, so each block is hashed once,
    /// and what it offered.
    keys: KeyMemo,
}

/// What a sequence offered to the reuse index, so that its prompt is offered as such once
/// and every other offer as more blocks of the same request ([`ReuseIndex::offer`]).
#[derive(Clone, Copy, Debug, Default)]
struct SeqOffers {
    /// Full blocks of the prompt given to `lookup_prefix` (0 without a lookup).
    prompt_blocks: usize,
    /// Whether the offer covering the prompt was made.
    prompt_offered: bool,
    /// Leading blocks the sequence itself offered (hit blocks are not counted).
    offered: usize,
}

impl SeqOffers {
    /// The role of an offer of the first `full` blocks.
    fn role(&self, full: usize) -> OfferRole {
        if !self.prompt_offered && full >= self.prompt_blocks {
            OfferRole::Prompt
        } else {
            OfferRole::More {
                offered_before: self.offered.min(full),
            }
        }
    }

    /// Records an offer of the first `full` blocks made with `role`.
    fn made(&mut self, full: usize, role: OfferRole) {
        self.prompt_offered |= role == OfferRole::Prompt;
        self.offered = self.offered.max(full);
    }
}

/// The keys of a sequence's leading full blocks, kept between the calls that name its
/// blocks (lookup, tier lookup, each offer), so each block is hashed once
/// ([`ReuseIndex::extend_keys`]) instead of once per call. The tokens they were made from
/// are kept too: each call compares them with the tokens it is given and keys again from
/// the first block that differs, so a caller passing other tokens than before gets the keys
/// of what it passed, never stale ones.
#[derive(Clone, Debug, Default)]
struct KeyMemo {
    /// The chain root the keys were made under ([`ReuseIndex::chain_root`]); a change
    /// (a new tenant salt) discards them.
    root: Option<StoreKey>,
    /// The tokens of the keyed blocks: `keys.len()` × the block size.
    tokens: Vec<u32>,
    keys: Vec<StoreKey>,
    /// What the request offered to the index ([`OfferRole`]): one offer is its prompt. Kept
    /// with the tokens, so a request freed and opened again (preempted and readmitted) is
    /// still one request, and forgotten with them when other tokens come under its id.
    offers: SeqOffers,
}

/// A load from the tiers in flight.
#[derive(Clone, Debug)]
struct PendingLoad {
    seq: SeqId,
    /// Whether the sequence was freed meanwhile: the load alone holds `blocks` then.
    orphan: bool,
    /// The sequence's block index of the first loaded block (its device prefix).
    first: usize,
    /// The device blocks loaded into, in prompt order.
    blocks: Vec<BlockId>,
    /// Their keys, in the same order.
    keys: Vec<StoreKey>,
    /// The prompt's tokens up to the end of the last loaded block (to cache them).
    tokens: Vec<u32>,
    /// The caller's time when the load was issued (the loaded blocks' time of caching).
    issued_ms: u64,
}

/// The lower tiers and their bookkeeping.
#[derive(Debug)]
struct TierState {
    lower: Arc<dyn LowerTiers>,
    mode: TierMode,
    /// Offloads not yet handed out with `drain_offloads`.
    offloads: Vec<BlockOffload>,
    loads: HashMap<LoadId, PendingLoad>,
    /// The key of every block a load in flight brings in (whose result will be cached), so
    /// a second sequence with the same prefix waits for it instead of loading it again.
    in_flight: HashMap<StoreKey, LoadId>,
    next_load: u64,
}

impl TierState {
    /// The load in flight bringing in any of `keys`, if one is.
    fn loading_any(&self, keys: &[StoreKey]) -> Option<LoadId> {
        if self.in_flight.is_empty() {
            return None;
        }
        keys.iter().find_map(|k| self.in_flight.get(k).copied())
    }

    /// Forgets the keys of `load` (completed, or its sequence freed).
    fn land(&mut self, id: LoadId, keys: &[StoreKey]) {
        for k in keys {
            if self.in_flight.get(k) == Some(&id) {
                self.in_flight.remove(k);
            }
        }
    }
}

/// A session's pinned context.
#[derive(Clone, Debug)]
struct SessionKv {
    blocks: Vec<BlockId>,
    expires_ms: Option<u64>,
}

/// [`KvManager`]: the per-request KV memory layer, for an engine that runs its own scheduler
/// (or for [`Scheduler`](crate::Scheduler), which is built on it).
///
/// It composes a block allocator, a pin policy and a reuse index through the `kvc-core`
/// traits and keeps one ownership rule: **every holder of a block holds one pool reference**
/// (a running sequence, the reuse index, a session). A cached block that only the index holds
/// is *evictable*; eviction only ever takes evictable blocks, so every eviction frees a block;
/// and an allocation compares its need with free + evictable blocks before it evicts
/// anything, so a request that cannot fit evicts nothing.
///
/// Per sequence: [`open`](KvManager::open), [`lookup_prefix`](KvManager::lookup_prefix) (the
/// computed prefix, never the last prompt token), [`allocate_slots`](KvManager::allocate_slots)
/// (with lookahead; [`SlotGrant::Now`], [`Later`](SlotGrant::Later) or
/// [`Never`](SlotGrant::Never)), [`cache_blocks`](KvManager::cache_blocks) (offer the
/// computed full blocks), [`fork`](KvManager::fork) (shared blocks; the shared partial block
/// is copied on the next write, and the copy pair is returned), [`free`](KvManager::free).
/// Per session: [`keep_session`](KvManager::keep_session) pins a finished turn's cached
/// context until [`end_session`](KvManager::end_session) or its TTL
/// ([`expire_sessions`](KvManager::expire_sessions)). [`usage`](KvManager::usage) reports free,
/// evictable and in-use blocks per region, in O(1).
///
/// # Lower tiers
///
/// With [`with_tiers`](KvManager::with_tiers), the manager also consults the tiers below
/// device memory (`kvc_core::LowerTiers`, for example a `kvc_tier::TierStack`), naming blocks
/// by the reuse index's keys (the chained hash, tenant salt included):
///
/// - after [`lookup_prefix`](KvManager::lookup_prefix), [`load_prefix`](KvManager::load_prefix)
///   continues the prefix into the tiers: device blocks are allocated for the blocks the
///   tiers hold (as any allocation; when that is not possible now, nothing happens and the
///   prompt is recomputed), and a [`LoadJob`](crate::LoadJob) names them. The sequence waits
///   ([`KvError::Loading`] for allocation, forks, caching) until
///   [`complete_load`](KvManager::complete_load) reports the load; then the loaded blocks
///   are its computed prefix and are cached on the device. A failed load keeps its leading
///   loaded blocks; the rest are recomputed in place;
/// - cached blocks the device evicts ([`TierMode::WriteBack`](crate::TierMode)) or caches
///   ([`TierMode::WriteThrough`](crate::TierMode)) are listed by
///   [`drain_offloads`](KvManager::drain_offloads) for the engine to copy down before it
///   writes into any block allocated since;
/// - a sequence freed while its load is in flight gives its other blocks back at once; the
///   blocks being loaded stay held (in use) until the load is reported, then are freed.
///
/// ```
/// use kvc_alloc::{BlockPool, PoolConfig};
/// use kvc_sched::{NoReuse, QosClass, SeqId, TenantId};
/// use kvc_sched::{DynamicOnly, KvManager, KvManagerConfig, SeqOwner, SlotGrant, SlotRequest};
///
/// let pool = BlockPool::new(PoolConfig::new(8))?;
/// let cfg = KvManagerConfig { block_size: 4, ..KvManagerConfig::default() };
/// let mut kv = KvManager::new(cfg, pool, DynamicOnly::default(), NoReuse { block_size: 4 })?;
/// let owner = SeqOwner { tenant: TenantId(0), class: QosClass::STANDARD, session: None };
/// let prompt: Vec<u32> = (0..10).collect();
///
/// kv.open(SeqId(1), owner)?;
/// let computed = kv.lookup_prefix(SeqId(1), &prompt, 0)?; // nothing cached yet
/// assert_eq!(computed, 0);
/// let mut copies = Vec::new();
/// let ask = SlotRequest { new_tokens: 10, lookahead: 0, admission: true };
/// assert_eq!(kv.allocate_slots(SeqId(1), ask, 0, &mut copies)?, SlotGrant::Now);
/// assert_eq!(kv.blocks(SeqId(1))?.len(), 3); // 10 tokens in blocks of 4
///
/// // Beam search: the child shares every block; the shared partial block is copied on write.
/// kv.fork(SeqId(1), SeqId(2))?;
/// let one = SlotRequest { new_tokens: 1, ..SlotRequest::default() };
/// assert_eq!(kv.allocate_slots(SeqId(2), one, 1, &mut copies)?, SlotGrant::Now);
/// assert_eq!(copies.len(), 1);
///
/// let huge = SlotRequest { new_tokens: 100, ..SlotRequest::default() };
/// assert!(matches!(kv.allocate_slots(SeqId(1), huge, 1, &mut copies)?, SlotGrant::Never(_)));
///
/// kv.free(SeqId(1))?;
/// kv.free(SeqId(2))?;
/// assert_eq!(kv.usage().total().free, 8);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct KvManager<A, P, R> {
    cfg: KvManagerConfig,
    alloc: A,
    pin: P,
    reuse: R,
    seqs: HashMap<SeqId, SeqKv>,
    sessions: HashMap<SessionId, SessionKv>,
    /// Per block: whether the reuse index holds a reference on it.
    cached: Vec<bool>,
    /// Per region: cached blocks held by the index alone.
    evictable: Vec<usize>,
    stats: KvStats,
    scratch: Vec<BlockId>,
    tiers: Option<TierState>,
    /// The keys of the last sequences freed, most recent last, given back if one is opened
    /// again (a scheduler retries a waiting request's admission under the same id every step
    /// while memory is short). At most [`Self::PARKED_KEYS`].
    parked: VecDeque<(SeqId, KeyMemo)>,
}

impl<A: BlockAllocator, P: PinPolicy, R: ReuseIndex> KvManager<A, P, R> {
    /// A manager over an allocator, a pin policy and a reuse index.
    pub fn new(cfg: KvManagerConfig, alloc: A, pin: P, reuse: R) -> Result<Self, KvConfigError> {
        if cfg.block_size == 0 {
            return Err(KvConfigError::ZeroBlockSize);
        }
        if reuse.block_size() != cfg.block_size {
            return Err(KvConfigError::BlockSizeMismatch {
                manager: cfg.block_size,
                index: reuse.block_size(),
            });
        }
        let total = alloc.total_blocks();
        Ok(Self {
            cfg,
            alloc,
            pin,
            reuse,
            seqs: HashMap::new(),
            sessions: HashMap::new(),
            cached: vec![false; total],
            evictable: vec![0; 2],
            stats: KvStats::default(),
            scratch: Vec::new(),
            tiers: None,
            parked: VecDeque::new(),
        })
    }

    /// Adds tiers below device memory. Without it nothing is offloaded or loaded. With it:
    ///
    /// - after [`lookup_prefix`](Self::lookup_prefix), [`load_prefix`](Self::load_prefix)
    ///   continues the prefix into `tiers`: device blocks are allocated for the blocks the
    ///   tiers hold (as any allocation; when that is not possible now, nothing happens and the
    ///   prompt is recomputed), and a [`LoadJob`](crate::LoadJob) names them. The sequence
    ///   waits ([`KvError::Loading`] for allocation, forks, caching) until
    ///   [`complete_load`](Self::complete_load) reports the load; then the loaded blocks are
    ///   its computed prefix and are cached on the device. A failed load keeps its leading
    ///   loaded blocks; the rest are recomputed in place;
    /// - cached blocks the device evicts ([`TierMode::WriteBack`]) or caches
    ///   ([`TierMode::WriteThrough`]) are listed by [`drain_offloads`](Self::drain_offloads),
    ///   for the engine to copy down before it writes into any block allocated since;
    /// - a sequence freed while its load is in flight gives its other blocks back at once;
    ///   the blocks being loaded stay held (in use) until the load is reported, then are
    ///   freed.
    ///
    /// The tiers are named by the reuse index's keys
    /// ([`ReuseIndex::block_keys`](kvc_core::ReuseIndex::block_keys)): an index that cannot
    /// name its blocks never hits in the tiers and offloads nothing.
    #[must_use]
    pub fn with_tiers(mut self, tiers: Arc<dyn LowerTiers>, mode: TierMode) -> Self {
        self.set_tiers(tiers, mode);
        self
    }

    /// [`with_tiers`](Self::with_tiers) on a built manager.
    pub(crate) fn set_tiers(&mut self, tiers: Arc<dyn LowerTiers>, mode: TierMode) {
        let (offloads, loads, in_flight, next_load) = match self.tiers.take() {
            Some(t) => (t.offloads, t.loads, t.in_flight, t.next_load),
            None => (Vec::new(), HashMap::new(), HashMap::new(), 0),
        };
        self.tiers = Some(TierState {
            lower: tiers,
            mode,
            offloads,
            loads,
            in_flight,
            next_load,
        });
    }

    /// The tier mode, when tiers are configured.
    #[must_use]
    pub fn tier_mode(&self) -> Option<TierMode> {
        self.tiers.as_ref().map(|t| t.mode)
    }

    /// The settings.
    #[must_use]
    pub fn config(&self) -> &KvManagerConfig {
        &self.cfg
    }

    /// The allocator (read only: every reference goes through the manager).
    pub fn allocator(&self) -> &A {
        &self.alloc
    }

    /// The pin policy.
    pub fn pin_policy(&self) -> &P {
        &self.pin
    }

    /// The pin policy, for soft pins and other policy settings.
    pub fn pin_policy_mut(&mut self) -> &mut P {
        &mut self.pin
    }

    /// The reuse index.
    pub fn reuse_index(&self) -> &R {
        &self.reuse
    }

    /// The reuse index, for tenant salts, invalidation and KV events. Invalidated blocks
    /// still count as evictable until the next eviction hands them back.
    pub fn reuse_index_mut(&mut self) -> &mut R {
        &mut self.reuse
    }

    /// Moves `count` free blocks between regions (a pin policy's resize).
    pub fn resize(
        &mut self,
        from: RegionId,
        to: RegionId,
        count: usize,
    ) -> Result<(), kvc_core::ResizeError> {
        self.alloc.resize(from, to, count)
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> KvStats {
        self.stats
    }

    /// Sequences open.
    #[must_use]
    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// Whether `seq` is open.
    #[must_use]
    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// A sequence's blocks, in logical order.
    pub fn blocks(&self, seq: SeqId) -> Result<&[BlockId], KvError> {
        Ok(&self.seq(seq)?.blocks)
    }

    /// A sequence's assigned token slots.
    pub fn num_tokens(&self, seq: SeqId) -> Result<u64, KvError> {
        Ok(self.seq(seq)?.tokens)
    }

    /// The flat slot (`block × block_size + offset`) of position `pos` of `seq`, if assigned.
    #[must_use]
    pub fn slot(&self, seq: SeqId, pos: u64) -> Option<i64> {
        let s = self.seqs.get(&seq)?;
        if pos >= s.tokens {
            return None;
        }
        let bs = u64::from(self.cfg.block_size);
        let block = s.blocks.get(usize::try_from(pos / bs).ok()?)?;
        i64::try_from(u64::from(block.get()) * bs + pos % bs).ok()
    }

    /// Blocks a session holds.
    pub fn session_blocks(&self, session: SessionId) -> Result<&[BlockId], KvError> {
        self.sessions
            .get(&session)
            .map(|s| s.blocks.as_slice())
            .ok_or(KvError::UnknownSession { session })
    }

    /// Cached blocks only the reuse index holds, in both regions.
    #[must_use]
    pub fn evictable_blocks(&self) -> usize {
        self.evictable.iter().sum()
    }

    /// Free, evictable and in-use blocks per region.
    #[must_use]
    pub fn usage(&self) -> KvUsage {
        let region = |r: RegionId| {
            let capacity = self.alloc.capacity(r).unwrap_or(0);
            let free = self.alloc.free_blocks(r).unwrap_or(0);
            let evictable = self.evictable.get(r.index()).copied().unwrap_or(0);
            RegionUsage {
                capacity,
                free,
                evictable,
                in_use: capacity.saturating_sub(free + evictable),
            }
        };
        KvUsage {
            pinned: region(RegionId::PINNED),
            dynamic: region(RegionId::DYNAMIC),
        }
    }

    /// The regions as the allocator reports them (free blocks only).
    #[must_use]
    pub fn pool_view(&self) -> PoolView {
        let u = self.usage();
        PoolView {
            pinned_capacity: u.pinned.capacity,
            pinned_free: u.pinned.free,
            dynamic_capacity: u.dynamic.capacity,
            dynamic_free: u.dynamic.free,
        }
    }

    /// The regions as an allocation sees them: evictable blocks count as free.
    #[must_use]
    pub fn available_view(&self) -> PoolView {
        let u = self.usage();
        PoolView {
            pinned_capacity: u.pinned.capacity,
            pinned_free: u.pinned.available(),
            dynamic_capacity: u.dynamic.capacity,
            dynamic_free: u.dynamic.available(),
        }
    }

    /// Opens a sequence holding nothing.
    pub fn open(&mut self, seq: SeqId, owner: SeqOwner) -> Result<(), KvError> {
        if self.seqs.contains_key(&seq) {
            return Err(KvError::DuplicateSeq { seq });
        }
        let keys = self.unpark_keys(seq);
        self.seqs.insert(
            seq,
            SeqKv {
                owner,
                blocks: Vec::new(),
                tokens: 0,
                offered: 0,
                placed: RegionBlocks::default(),
                loading: None,
                keys,
            },
        );
        Ok(())
    }

    /// Looks up the longest computed prefix of `prompt` and takes its blocks into the
    /// sequence, which must hold none yet. Returns the tokens computed: whole blocks, never
    /// the last prompt token (it must be computed to yield logits). A class the pin policy
    /// keeps out of the pinned region stops at the first pinned block.
    pub fn lookup_prefix(
        &mut self,
        seq: SeqId,
        prompt: &[u32],
        now_ms: u64,
    ) -> Result<u64, KvError> {
        let s = self.seq(seq)?;
        if !s.blocks.is_empty() || s.tokens > 0 {
            return Err(KvError::HoldsBlocks { seq });
        }
        if prompt.len() < 2 {
            return Ok(0);
        }
        let owner = s.owner;
        let scope = scope(&owner);
        let bs = self.cfg.block_size as usize;
        let mut memo = self.keys_of(seq, &scope, prompt)?;
        let full = (prompt.len() / bs).min(memo.keys.len());
        let hit = self
            .reuse
            .lookup_keyed(&scope, prompt, &memo.keys[..full], now_ms);
        memo.offers.prompt_blocks = prompt.len() / bs;
        self.seq_mut(seq)?.keys = memo;
        let usable = (prompt.len() - 1) / bs;
        let mut keep = hit.blocks.len().min(usable);
        if !self.pin.may_hold_pinned(owner.class) {
            keep = hit.blocks[..keep]
                .iter()
                .position(|&b| self.alloc.region_of(b) == Ok(RegionId::PINNED))
                .unwrap_or(keep);
        }
        // Take a reference on each kept block; a block the pool does not know ends the hit.
        let mut taken = 0;
        let mut first_err = None;
        for &b in &hit.blocks[..keep] {
            match self.take_ref(b) {
                Ok(()) => taken += 1,
                Err(err) => {
                    debug_assert!(false, "the reuse index returned {b}, unknown to the pool");
                    first_err = Some(KvError::from(err));
                    break;
                }
            }
        }
        if taken < hit.blocks.len() {
            self.index_release(&hit.blocks[taken..])?;
        }
        let s = self.seq_mut(seq)?;
        s.blocks.extend_from_slice(&hit.blocks[..taken]);
        s.tokens = (taken * bs) as u64;
        s.offered = taken;
        self.stats.hit_blocks += taken as u64;
        // On an error the sequence holds the blocks taken before it: free it to give them back.
        match first_err {
            Some(err) => Err(err),
            None => Ok((taken * bs) as u64),
        }
    }

    /// Continues the sequence's prefix into the lower tiers, right after
    /// [`lookup_prefix`](Self::lookup_prefix) and before any
    /// [`allocate_slots`](Self::allocate_slots): the blocks of `prompt` past the device hit
    /// that some tier holds (whole blocks, never the last prompt token) get device blocks
    /// through the normal allocation path (the pin policy's placement, eviction only when it
    /// makes room, an admission's watermark), and the returned [`PrefixLoad::Started`] job
    /// lists them for the engine to fill from the tiers.
    ///
    /// The sequence then holds those blocks with their slots assigned, but waits: it may not
    /// allocate, fork or cache ([`KvError::Loading`]) until
    /// [`complete_load`](Self::complete_load) reports the load. Returns
    /// [`PrefixLoad::None`] (nothing changed) without tiers, when no tier holds the next
    /// block, or when the blocks cannot be allocated now (counted in `tier_fallback_blocks`:
    /// the prompt is recomputed), and [`PrefixLoad::InFlight`] (nothing changed, counted in
    /// `tier_in_flight`) when a load in flight for another sequence brings in any of those
    /// blocks already: they are device hits once it is reported, so they are not loaded twice.
    ///
    /// ```
    /// use std::collections::HashSet;
    /// use std::sync::{Arc, Mutex};
    ///
    /// use kvc_alloc::{BlockPool, PoolConfig};
    /// use kvc_sched::{LowerTiers, QosClass, ReuseIndex, ReuseScope, SeqId, StoreKey, TenantId};
    /// use kvc_reuse::{HashExtra, PolicyKind, PrefixCache, ScopedIndex, Xxh3Hasher};
    /// use kvc_sched::{
    ///     DynamicOnly, KvManager, KvManagerConfig, LoadResult, SeqOwner, SlotGrant, SlotRequest,
    ///     TierMode,
    /// };
    ///
    /// /// Tiers that hold a set of blocks (an engine would use a `kvc_tier::TierStack`).
    /// #[derive(Debug, Default)]
    /// struct Held(Mutex<HashSet<StoreKey>>);
    /// impl LowerTiers for Held {
    ///     fn longest_prefix(&self, keys: &[StoreKey]) -> usize {
    ///         let held = self.0.lock().unwrap();
    ///         keys.iter().take_while(|k| held.contains(k)).count()
    ///     }
    /// }
    ///
    /// let index = ScopedIndex::new(PrefixCache::new(4, PolicyKind::Lru), Xxh3Hasher,
    ///                              HashExtra::new("m", 1));
    /// let cfg = KvManagerConfig { block_size: 4, ..KvManagerConfig::default() };
    /// let tiers = Arc::new(Held::default());
    /// let mut kv = KvManager::new(cfg, BlockPool::new(PoolConfig::new(16))?, DynamicOnly::default(), index)?
    ///     .with_tiers(tiers.clone(), TierMode::WriteBack);
    ///
    /// // The tiers hold the first two blocks of a 10-token prompt (written down earlier).
    /// let prompt: Vec<u32> = (0..10).collect();
    /// let scope = ReuseScope { tenant: TenantId(0), session: None };
    /// let mut keys = Vec::new();
    /// kv.reuse_index_mut().block_keys(&scope, &prompt, &mut keys);
    /// tiers.0.lock().unwrap().extend(keys.iter().copied());
    ///
    /// let owner = SeqOwner { tenant: TenantId(0), class: QosClass::STANDARD, session: None };
    /// kv.open(SeqId(1), owner)?;
    /// assert_eq!(kv.lookup_prefix(SeqId(1), &prompt, 0)?, 0); // a device miss
    /// let job = kv.load_prefix(SeqId(1), &prompt, 0)?.started().expect("a tier hit");
    /// assert_eq!(job.blocks.len(), 2);
    /// // ... the engine copies each `job.blocks[i].key` into `job.blocks[i].device` ...
    /// let done = kv.complete_load(job.id, LoadResult::Loaded)?;
    /// assert_eq!(done.computed, Some(8));
    /// let rest = SlotRequest { new_tokens: 2, lookahead: 0, admission: true };
    /// assert_eq!(kv.allocate_slots(SeqId(1), rest, 0, &mut Vec::new())?, SlotGrant::Now);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn load_prefix(
        &mut self,
        seq: SeqId,
        prompt: &[u32],
        now_ms: u64,
    ) -> Result<PrefixLoad, KvError> {
        let bs = self.cfg.block_size as usize;
        let s = self.seq(seq)?;
        if s.loading.is_some() {
            return Err(KvError::Loading { seq });
        }
        let first = s.blocks.len();
        if s.tokens != (first * bs) as u64 || s.offered != first {
            return Err(KvError::NotAtPrefix { seq });
        }
        let owner = s.owner;
        if self.tiers.is_none() {
            return Ok(PrefixLoad::None);
        }
        let usable = prompt.len().saturating_sub(1) / bs;
        if first >= usable {
            return Ok(PrefixLoad::None);
        }
        let memo = self.keys_of(seq, &scope(&owner), &prompt[..usable * bs])?;
        let usable = usable.min(memo.keys.len());
        let keys = memo.keys[..usable].to_vec();
        self.seq_mut(seq)?.keys = memo;
        let Some(tiers) = self.tiers.as_ref().filter(|_| first < usable) else {
            return Ok(PrefixLoad::None);
        };
        // The block right after the device prefix already on its way: no tier round trip.
        if let Some(load) = tiers.loading_any(&keys[first..=first]) {
            self.stats.tier_in_flight += 1;
            return Ok(PrefixLoad::InFlight { load });
        }
        let lower = Arc::clone(&tiers.lower);
        self.stats.tier_lookups += 1;
        let hit = lower
            .longest_prefix(&keys[first..usable])
            .min(usable - first);
        if hit == 0 {
            return Ok(PrefixLoad::None);
        }
        // A later block on its way (this sequence's device prefix is shorter than that load's).
        if let Some(load) = tiers.loading_any(&keys[first..first + hit]) {
            self.stats.tier_in_flight += 1;
            return Ok(PrefixLoad::InFlight { load });
        }
        self.stats.tier_hit_blocks += hit as u64;
        let ask = SlotRequest {
            new_tokens: (hit * bs) as u64,
            lookahead: 0,
            admission: true,
        };
        let mut copies = Vec::new();
        if self.allocate_slots(seq, ask, now_ms, &mut copies)? != SlotGrant::Now {
            self.stats.tier_fallback_blocks += hit as u64;
            return Ok(PrefixLoad::None);
        }
        debug_assert!(
            copies.is_empty(),
            "a block-aligned sequence copied on write"
        );
        let blocks = self.seq(seq)?.blocks[first..first + hit].to_vec();
        let tiers = self.tiers.as_mut().ok_or(KvError::UnknownSeq { seq })?;
        let id = LoadId(tiers.next_load);
        tiers.next_load += 1;
        let keys = keys[first..first + hit].to_vec();
        let job = LoadJob {
            id,
            seq,
            blocks: keys
                .iter()
                .zip(&blocks)
                .map(|(&key, &device)| BlockLoad { key, device })
                .collect(),
        };
        tiers.in_flight.extend(keys.iter().map(|&k| (k, id)));
        tiers.loads.insert(
            id,
            PendingLoad {
                seq,
                orphan: false,
                first,
                blocks,
                keys,
                tokens: prompt[..(first + hit) * bs].to_vec(),
                issued_ms: now_ms,
            },
        );
        self.seq_mut(seq)?.loading = Some(id);
        Ok(PrefixLoad::Started(job))
    }

    /// Reports how a load from [`load_prefix`](Self::load_prefix) ended. The leading loaded
    /// blocks become part of the sequence's computed prefix and are cached in the reuse index
    /// (their KV is exactly what their keys name); the sequence's slots are set back to that
    /// prefix, so the blocks a failed load did not fill are recomputed in place (the sequence
    /// keeps them). For a sequence freed while the load was in flight, the blocks the load
    /// held are released now.
    ///
    /// # Errors
    /// [`LoadError::Unknown`], [`LoadError::AlreadyCompleted`] and
    /// [`LoadError::TooManyBlocks`] change nothing; [`LoadError::Memory`] reports a broken
    /// invariant in a component after the load was applied.
    pub fn complete_load(&mut self, id: LoadId, result: LoadResult) -> Result<LoadDone, LoadError> {
        let Some(tiers) = self.tiers.as_mut() else {
            return Err(LoadError::Unknown { id });
        };
        let Some(load) = tiers.loads.get(&id) else {
            return Err(if id.0 < tiers.next_load {
                LoadError::AlreadyCompleted { id }
            } else {
                LoadError::Unknown { id }
            });
        };
        let loaded = match result {
            LoadResult::Loaded => load.blocks.len(),
            LoadResult::Failed { loaded_blocks } if loaded_blocks > load.blocks.len() => {
                return Err(LoadError::TooManyBlocks {
                    id,
                    loaded_blocks,
                    blocks: load.blocks.len(),
                });
            }
            LoadResult::Failed { loaded_blocks } => loaded_blocks,
        };
        let Some(load) = tiers.loads.remove(&id) else {
            return Err(LoadError::Unknown { id });
        };
        tiers.land(id, &load.keys);
        self.stats.loaded_blocks += loaded as u64;
        if matches!(result, LoadResult::Failed { .. }) {
            self.stats.load_failures += 1;
        }
        let seq = load.seq;
        let memory = |source| LoadError::Memory { id, source };
        if load.orphan {
            // The sequence is gone: the load was the blocks' last holder.
            self.release_blocks(&load.blocks).map_err(memory)?;
            return Ok(LoadDone {
                seq,
                loaded_blocks: loaded,
                computed: None,
            });
        }
        let bs = self.cfg.block_size as usize;
        let end = load.first + loaded;
        let s = self.seq_mut(seq).map_err(memory)?;
        s.loading = None;
        s.tokens = (end * bs) as u64;
        let computed = s.tokens;
        self.cache_prefix(seq, &load.tokens[..end * bs], load.issued_ms, true, None)
            .map_err(memory)?;
        Ok(LoadDone {
            seq,
            loaded_blocks: loaded,
            computed: Some(computed),
        })
    }

    /// Whether `seq` waits for a load from the tiers.
    #[must_use]
    pub fn is_loading(&self, seq: SeqId) -> bool {
        self.seqs.get(&seq).is_some_and(|s| s.loading.is_some())
    }

    /// Loads issued and not yet reported (including those of sequences freed meanwhile).
    #[must_use]
    pub fn pending_loads(&self) -> usize {
        self.tiers.as_ref().map_or(0, |t| t.loads.len())
    }

    /// Offloads decided and not yet handed out with [`drain_offloads`](Self::drain_offloads).
    /// Write-through offloads of blocks cached by the last step wait here for the next plan,
    /// even when no sequence is open.
    #[must_use]
    pub fn pending_offloads(&self) -> usize {
        self.tiers.as_ref().map_or(0, |t| t.offloads.len())
    }

    /// Moves the blocks to copy down to the tiers into `out` (in the order they were decided).
    /// The engine copies them before writing into any block allocated since (a write-back
    /// offload names a block just evicted, which the next allocation may hand out): the
    /// [`Scheduler`](crate::Scheduler) puts them first in its plan.
    pub fn drain_offloads(&mut self, out: &mut Vec<BlockOffload>) {
        if let Some(t) = self.tiers.as_mut() {
            out.append(&mut t.offloads);
        }
    }

    /// Assigns slots for `ask.new_tokens` more tokens and holds blocks for `ask.lookahead`
    /// beyond them, asking the pin policy where the blocks come from.
    ///
    /// Evicts cached blocks only when free + evictable blocks cover the placement; otherwise
    /// nothing changes and the answer is [`SlotGrant::Later`] (or [`SlotGrant::Never`] when
    /// the sequence could not fit in the whole pool). When the sequence's last block is a
    /// partial block it shares with a fork, writing into it first moves the sequence to a
    /// private copy: the pair is appended to `copies` for the kernels to copy before the step.
    pub fn allocate_slots(
        &mut self,
        seq: SeqId,
        ask: SlotRequest,
        now_ms: u64,
        copies: &mut Vec<BlockCopy>,
    ) -> Result<SlotGrant, KvError> {
        let bs = u64::from(self.cfg.block_size);
        let s = self.seq(seq)?;
        if s.loading.is_some() {
            return Err(KvError::Loading { seq });
        }
        let owner = s.owner;
        let end = s
            .tokens
            .checked_add(ask.new_tokens)
            .ok_or(KvError::TokenOverflow { seq })?;
        let reach = end.saturating_add(ask.lookahead);
        let want_blocks = usize::try_from(reach.div_ceil(bs)).unwrap_or(usize::MAX);
        let grow = want_blocks.saturating_sub(s.blocks.len());
        // Copy-on-write of a partial last block shared with a fork.
        let partial = usize::try_from(s.tokens / bs).ok();
        let cow_at = match partial {
            Some(i) if ask.new_tokens > 0 && i < s.blocks.len() => {
                let b = s.blocks[i];
                (self.alloc.refcount(b)? > 1).then_some(i)
            }
            _ => None,
        };
        let need = grow + usize::from(cow_at.is_some());
        if need == 0 {
            self.seq_mut(seq)?.tokens = end;
            return Ok(SlotGrant::Now);
        }
        if want_blocks.saturating_add(usize::from(cow_at.is_some())) > self.alloc.total_blocks() {
            return Ok(SlotGrant::Never(kvc_core::Refusal::Impossible));
        }
        let req = PlaceRequest {
            seq,
            tenant: owner.tenant,
            class: owner.class,
            blocks: need,
            now_ms,
        };
        let placement = self.pin.place(&req, &self.available_view());
        let blocks = match placement {
            Placement::Allocate { blocks, .. } => blocks,
            Placement::Refuse { reason } => return Ok(SlotGrant::Never(reason)),
            Placement::Wait { reason } => return Ok(SlotGrant::Later(Pressure::Wait { reason })),
            Placement::PreemptLowest { victim } => {
                return Ok(SlotGrant::Later(Pressure::PreemptLowest { victim }));
            }
            Placement::Downgrade { class, max_running } => {
                return Ok(SlotGrant::Later(Pressure::Downgrade { class, max_running }));
            }
        };
        if blocks.total() != need {
            self.pin.release(seq, blocks)?;
            return Err(KvError::PlacementMismatch {
                seq,
                asked: need,
                granted: blocks.total(),
            });
        }
        // Does free + evictable cover the placement, region by region, before any eviction?
        let mut short = false;
        let mut available = 0;
        for (region, count) in [
            (RegionId::PINNED, blocks.pinned),
            (RegionId::DYNAMIC, blocks.dynamic),
        ] {
            if count == 0 {
                continue;
            }
            let reserve = if ask.admission && region == RegionId::DYNAMIC {
                self.reserve(region)
            } else {
                0
            };
            let free = self.alloc.free_blocks(region)?;
            let ev = self.evictable.get(region.index()).copied().unwrap_or(0);
            available += (free + ev).saturating_sub(reserve);
            if free + ev < count + reserve {
                short = true;
            }
        }
        if short {
            self.pin.release(seq, blocks)?;
            return Ok(SlotGrant::Later(Pressure::Exhausted {
                needed: need,
                available,
            }));
        }
        // Evict until every region placed into has its blocks free (each eviction frees one).
        loop {
            let mut deficit = 0;
            for (region, count) in [
                (RegionId::PINNED, blocks.pinned),
                (RegionId::DYNAMIC, blocks.dynamic),
            ] {
                if count == 0 {
                    continue;
                }
                let reserve = if ask.admission && region == RegionId::DYNAMIC {
                    self.reserve(region)
                } else {
                    0
                };
                deficit += (count + reserve).saturating_sub(self.alloc.free_blocks(region)?);
            }
            if deficit == 0 || self.evict(deficit, now_ms)? == 0 {
                break;
            }
        }
        // Allocate, all or nothing.
        self.scratch.clear();
        let mut last = self.seq(seq)?.blocks.last().copied();
        let mut failed = None;
        'regions: for (region, count) in [
            (RegionId::PINNED, blocks.pinned),
            (RegionId::DYNAMIC, blocks.dynamic),
        ] {
            for _ in 0..count {
                match self.alloc.allocate_after(region, last) {
                    Ok(b) => {
                        self.scratch.push(b);
                        last = Some(b);
                    }
                    Err(err) => {
                        failed = Some(err);
                        break 'regions;
                    }
                }
            }
        }
        if let Some(err) = failed {
            // Roll back: the fresh blocks go back, and the placement to the pin policy.
            let mut rollback = Ok(());
            for b in std::mem::take(&mut self.scratch) {
                if let Err(e) = self.alloc.release(b) {
                    rollback = rollback.and(Err(KvError::from(e)));
                }
            }
            self.pin.release(seq, blocks)?;
            rollback?;
            // Plain exhaustion (another user of a shared pool took blocks meanwhile) is a
            // wait; anything else means the pool disagrees with what it reported.
            return match err {
                kvc_core::AllocError::OutOfBlocks { .. } => {
                    Ok(SlotGrant::Later(Pressure::Exhausted {
                        needed: need,
                        available,
                    }))
                }
                other => Err(other.into()),
            };
        }
        let mut fresh = std::mem::take(&mut self.scratch);
        let s = self.seqs.get_mut(&seq).ok_or(KvError::UnknownSeq { seq })?;
        let mut cow_src = None;
        if let Some(i) = cow_at
            && let Some(dst) = fresh.pop()
        {
            let src = s.blocks[i];
            s.blocks[i] = dst;
            copies.push(BlockCopy { src, dst });
            cow_src = Some(src);
        }
        s.blocks.extend_from_slice(&fresh);
        s.placed.pinned += blocks.pinned;
        s.placed.dynamic += blocks.dynamic;
        s.tokens = end;
        fresh.clear();
        self.scratch = fresh;
        if let Some(src) = cow_src {
            // Shared (refcount >= 2): this drops the sequence's reference only. A cached
            // block (a fork rewound into a block its parent cached since) also counted the
            // sequence as a user in the index: it stops being one.
            self.stats.cow_copies += 1;
            let index = if self.is_cached(src) {
                self.index_release(&[src])
            } else {
                Ok(())
            };
            let pool = self.drop_ref(src);
            index?;
            pool?;
        }
        Ok(SlotGrant::Now)
    }

    /// Offers the sequence's full blocks covering `computed` (its tokens whose KV is written,
    /// from position 0) to the reuse index. Returns the blocks newly cached; the index holds
    /// one pool reference on each from now on.
    ///
    /// Only full blocks within the slots the sequence holds are offered: a partial last block
    /// waits until it fills, and tokens past the sequence's slots (given by mistake, or
    /// sampled but not yet written) are ignored, since no KV of theirs can be in its blocks.
    /// Blocks offered before are not offered again: a call returns at once until another
    /// block of the sequence fills. Each block is hashed once per sequence: the manager keeps
    /// the keys of the blocks it named before (at the lookup, the tier lookup, earlier
    /// offers) with the tokens they were made from, and hashes only blocks past them or
    /// whose tokens differ (about 4 bytes per token per sequence). A call that does offer
    /// still hands the index the whole context from position 0, which walks the cached part
    /// again, so offer at milestones (each prefill chunk, the prompt computed, the request
    /// finished, before a preemption), as [`Scheduler`](crate::Scheduler) does, rather than
    /// at every block that fills during a long decode.
    /// A newly cached block a live soft pin of the pin policy names
    /// ([`PinPolicy::retention`](kvc_core::PinPolicy::retention)) takes the pin's retention at
    /// once: a pin may be placed before its prompt is computed, and a pinned block evicted
    /// anyway is ranked by its pin again when it is computed again.
    pub fn cache_blocks(
        &mut self,
        seq: SeqId,
        computed: &[u32],
        now_ms: u64,
    ) -> Result<usize, KvError> {
        if self.is_loading(seq) {
            return Err(KvError::Loading { seq });
        }
        self.cache_prefix(seq, computed, now_ms, false, None)
    }

    /// [`cache_blocks`](Self::cache_blocks) for an engine that reads the sequence's block
    /// table again after the call ([`blocks`](Self::blocks), or a [`Scheduler`](crate::Scheduler)
    /// plan, which carries whole tables every step): where another sequence cached the same
    /// tokens under other blocks first (both looked the prefix up before either had cached
    /// it), `cache_blocks` keeps the sequence's copies private and caches none of its later
    /// blocks, so its next turn misses everything past the shared part. Here the sequence
    /// takes the cached copies instead (see [`ReuseIndex::offer_adopting`]): its table holds
    /// them from now on, its own copies are freed, and its later blocks are cached after
    /// them. Each replacement is appended to `adopted`; positions not listed are unchanged.
    ///
    /// Call it between steps, as [`Scheduler`](crate::Scheduler) does, never while a step
    /// that reads the sequence's old blocks may still run: a freed copy can be handed to
    /// another sequence. With an index that does not adopt (the default of
    /// [`ReuseIndex::offer_adopting`]) it is `cache_blocks`; so it is for a sequence whose
    /// class the pin policy keeps out of the pinned region
    /// ([`PinPolicy::may_hold_pinned`](kvc_core::PinPolicy::may_hold_pinned)) while that
    /// region has blocks, since the cached copy could be one of them.
    ///
    /// # Errors
    /// As [`cache_blocks`](Self::cache_blocks).
    pub fn cache_blocks_adopting(
        &mut self,
        seq: SeqId,
        computed: &[u32],
        now_ms: u64,
        adopted: &mut Vec<Adopted>,
    ) -> Result<usize, KvError> {
        if self.is_loading(seq) {
            return Err(KvError::Loading { seq });
        }
        self.cache_prefix(seq, computed, now_ms, false, Some(adopted))
    }

    /// [`cache_blocks`](Self::cache_blocks); `from_tiers`: the blocks were just loaded from
    /// the tiers, so write-through does not copy them back down; `adopted`: as
    /// [`cache_blocks_adopting`](Self::cache_blocks_adopting).
    fn cache_prefix(
        &mut self,
        seq: SeqId,
        computed: &[u32],
        now_ms: u64,
        from_tiers: bool,
        adopted: Option<&mut Vec<Adopted>>,
    ) -> Result<usize, KvError> {
        let bs = self.cfg.block_size as usize;
        let s = self.seq(seq)?;
        let full = (computed.len() / bs)
            .min(s.blocks.len())
            .min(usize::try_from(s.tokens).unwrap_or(usize::MAX) / bs);
        if full <= s.offered {
            return Ok(0);
        }
        let scope = scope(&s.owner);
        let class = s.owner.class;
        let blocks: Vec<BlockId> = s.blocks[..full].to_vec();
        let mut newly = Vec::new();
        let tokens = &computed[..full * bs];
        let mut memo = self.keys_of(seq, &scope, tokens)?;
        let role = memo.offers.role(full);
        let offer = Offer {
            tokens,
            keys: &memo.keys[..full.min(memo.keys.len())],
            blocks: &blocks,
            role,
        };
        let mut taken = Vec::new();
        // A class kept out of the pinned region adopts only while that region holds no
        // block: the cached copy could lie there, and its lookups stop at such blocks too.
        let may_adopt = self.pin.may_hold_pinned(class)
            || self.alloc.capacity(RegionId::PINNED).is_ok_and(|c| c == 0);
        let result = if adopted.is_some() && may_adopt {
            self.index_offer_adopting(&scope, offer, now_ms, &mut newly, &mut taken)
        } else {
            self.index_offer(&scope, offer, now_ms, &mut newly)
        };
        memo.offers.made(full, role);
        let s = self.seq_mut(seq)?;
        s.keys = memo;
        s.offered = full;
        // Every adoption is carried out (the index counts the sequence on each copy), and the
        // newly cached blocks below get their references, whatever fails on the way.
        let mut result = result;
        for &a in &taken {
            if let Err(err) = self.adopt(seq, a) {
                result = result.and(Err(err));
            }
        }
        if let Some(adopted) = adopted {
            adopted.extend(taken.iter().filter(|a| {
                self.seqs
                    .get(&seq)
                    .is_some_and(|s| s.blocks.get(a.index) == Some(&a.cached))
            }));
        }
        let n = newly.len();
        for b in newly {
            // Holders before the index: the offering sequence (counted by insert) and any
            // fork that shares the block.
            let holders = self.alloc.refcount(b)?;
            self.alloc.retain(b)?;
            self.mark_cached(b, true);
            for _ in 1..holders {
                self.index_acquire(&[b])?;
            }
            self.apply_pin(b, now_ms);
            self.note_cached(b, from_tiers);
        }
        self.stats.cached_blocks += n as u64;
        result.map(|()| n)
    }

    /// Puts the index's cached copy in `seq`'s table in place of the sequence's own copy
    /// ([`ReuseIndex::offer_adopting`]; the index already counts the sequence on it).
    fn adopt(&mut self, seq: SeqId, a: Adopted) -> Result<(), KvError> {
        if self.seq(seq)?.blocks.get(a.index) != Some(&a.own) {
            // The index named a block the sequence does not hold there: it broke its
            // contract. Its count on the cached copy is given back.
            self.index_release(&[a.cached])?;
            return Err(KvError::AdoptMismatch {
                seq,
                index: a.index,
                block: a.own,
            });
        }
        self.take_ref(a.cached)?;
        let mut freed = RegionBlocks::default();
        self.drop_counting(a.own, &mut freed)?;
        self.seq_mut(seq)?.blocks[a.index] = a.cached;
        self.stats.adopted_blocks += 1;
        // The copy was the sequence's alone: its placement goes back to the pin policy (a
        // copy shared with a fork stays placed until the sequences let it go).
        self.give_back_placement(seq, freed)
    }

    /// Drops one holder's reference on `b` ([`Self::drop_ref`]); when it was the last, adds
    /// the block's region to `freed`, the placement a sequence can give back.
    fn drop_counting(
        &mut self,
        b: BlockId,
        freed: &mut RegionBlocks,
    ) -> Result<(), kvc_core::RefError> {
        let region = self.alloc.region_of(b);
        if self.alloc.refcount(b) == Ok(1) {
            match region {
                Ok(RegionId::PINNED) => freed.pinned += 1,
                Ok(RegionId::DYNAMIC) => freed.dynamic += 1,
                _ => {}
            }
        }
        self.drop_ref(b)
    }

    /// Gives the pin policy back the placement of blocks `seq` freed before it ends, as far
    /// as the sequence placed them itself (a fork's shared blocks were its parent's).
    fn give_back_placement(&mut self, seq: SeqId, freed: RegionBlocks) -> Result<(), KvError> {
        let s = self.seq_mut(seq)?;
        let back = RegionBlocks {
            pinned: freed.pinned.min(s.placed.pinned),
            dynamic: freed.dynamic.min(s.placed.dynamic),
        };
        s.placed.pinned -= back.pinned;
        s.placed.dynamic -= back.dynamic;
        if back.total() > 0 {
            self.pin.release(seq, back)?;
        }
        Ok(())
    }

    /// Forks `parent` into a new sequence `child` (parallel sampling, beam search): the child
    /// shares every block holding written tokens (not the parent's lookahead blocks). The shared partial last block is copied on the first
    /// write of either sequence (see [`allocate_slots`](Self::allocate_slots)).
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<(), KvError> {
        if self.seqs.contains_key(&child) {
            return Err(KvError::DuplicateSeq { seq: child });
        }
        let p = self.seq(parent)?;
        if p.loading.is_some() {
            return Err(KvError::Loading { seq: parent });
        }
        // The blocks holding written tokens; the parent's lookahead blocks stay its own.
        let written = usize::try_from(p.tokens.div_ceil(u64::from(self.cfg.block_size)))
            .unwrap_or(usize::MAX)
            .min(p.blocks.len());
        let mut kv = SeqKv {
            owner: p.owner,
            blocks: p.blocks[..written].to_vec(),
            tokens: p.tokens,
            offered: p.offered,
            placed: RegionBlocks::default(),
            loading: None,
            // The same leading tokens and the same request: the child's keys and offers
            // start as the parent's.
            keys: p.keys.clone(),
        };
        for i in 0..kv.blocks.len() {
            let b = kv.blocks[i];
            if let Err(err) = self.take_ref(b) {
                // Give back what was taken; the child is not opened.
                kv.blocks.truncate(i);
                self.release_blocks(&kv.blocks)?;
                return Err(err.into());
            }
        }
        let cached: Vec<BlockId> = kv
            .blocks
            .iter()
            .copied()
            .filter(|b| self.is_cached(*b))
            .collect();
        self.seqs.insert(child, kv);
        self.index_acquire(&cached)?;
        Ok(())
    }

    /// Sets the sequence's assigned slots back to `tokens` (rejected speculative tokens, or a
    /// step whose results never came). Its blocks stay held (lookahead included), except
    /// that a fork lets go of the blocks past its new end that it shares with another
    /// sequence, and of every block after the first of them: it would have copied each
    /// before writing into it. Refused below its cached blocks.
    pub fn rewind(&mut self, seq: SeqId, tokens: u64) -> Result<(), KvError> {
        let bs = u64::from(self.cfg.block_size);
        if self.is_loading(seq) {
            return Err(KvError::Loading { seq });
        }
        let cached: u64 = {
            let s = self.seq(seq)?;
            s.blocks
                .get(..s.offered)
                .unwrap_or_default()
                .iter()
                .take_while(|b| self.is_cached(**b))
                .count() as u64
                * bs
        };
        let s = self.seq_mut(seq)?;
        if tokens < cached {
            return Err(KvError::RewindIntoCached {
                seq,
                tokens,
                cached,
            });
        }
        s.tokens = s.tokens.min(tokens);
        // A fork rewound below blocks it shares lets them go, with every block after them:
        // it would copy each before writing into it, and held meanwhile, a shared block its
        // parent caches would sit after a block the fork copied, so that block, evictable,
        // could not be evicted before the fork freed them.
        let keep = usize::try_from(s.tokens.div_ceil(bs)).unwrap_or(usize::MAX);
        let blocks = std::mem::take(&mut s.blocks);
        let cut = blocks
            .iter()
            .enumerate()
            .skip(keep)
            .find(|(_, b)| self.alloc.refcount(**b).is_ok_and(|r| r > 1))
            .map(|(i, _)| i);
        let s = self.seq_mut(seq)?;
        s.blocks = blocks;
        let Some(cut) = cut else {
            return Ok(());
        };
        let dropped = s.blocks.split_off(cut);
        let cached: Vec<BlockId> = dropped
            .iter()
            .copied()
            .filter(|b| self.is_cached(*b))
            .collect();
        let mut result = self.index_release(&cached);
        // Blocks the fork allocated itself go back to the pin policy as they are freed.
        let mut freed = RegionBlocks::default();
        for &b in &dropped {
            if let Err(e) = self.drop_counting(b, &mut freed) {
                result = result.and(Err(e.into()));
            }
        }
        result.and(self.give_back_placement(seq, freed))
    }

    /// Closes a sequence, dropping its references (cached blocks become evictable when it
    /// was their last user). Everything is released even when a component reports an error.
    ///
    /// A sequence waiting for a load gives its other blocks back at once; the blocks being
    /// loaded stay held (in use) until the load is reported with
    /// [`complete_load`](Self::complete_load), so no other sequence is handed a block the
    /// engine may still be writing. Their pin-policy placement is given back now.
    ///
    /// The keys of its blocks (see [`cache_blocks`](Self::cache_blocks)) are kept for the
    /// last 16 sequences freed: a sequence opened again under the same id, as a scheduler
    /// retrying a waiting request's admission does every step while memory is short, does
    /// not hash its prompt again.
    pub fn free(&mut self, seq: SeqId) -> Result<(), KvError> {
        let mut s = self.seqs.remove(&seq).ok_or(KvError::UnknownSeq { seq })?;
        if let Some(id) = s.loading
            && let Some(tiers) = self.tiers.as_mut()
            && let Some(load) = tiers.loads.get_mut(&id)
        {
            // The load's blocks were allocated for it: uncached, held by nothing else.
            load.orphan = true;
            let end = (load.first + load.blocks.len()).min(s.blocks.len());
            s.blocks.drain(load.first.min(end)..end);
            // Its blocks will not be cached: sequences waiting for them load their own.
            let keys = std::mem::take(&mut load.keys);
            tiers.land(id, &keys);
        }
        self.park_keys(seq, std::mem::take(&mut s.keys));
        let index = self.index_release(&s.blocks);
        let refs = self.release_blocks(&s.blocks);
        // A sequence that placed nothing (it only reused cached blocks, or is a fork) is
        // unknown to the pin policy.
        let pin = if s.placed.total() > 0 {
            self.pin.release(seq, s.placed).map_err(KvError::from)
        } else {
            Ok(())
        };
        index.and(refs).and(pin)
    }

    /// Pins the cached leading blocks of `seq` (a finished turn, before `free`) as the
    /// context of `session`, replacing what the session held. They stay held (never evicted)
    /// until [`end_session`](Self::end_session) or, with a TTL configured, until
    /// [`expire_sessions`](Self::expire_sessions) runs after `now_ms + ttl`. Returns the
    /// blocks kept.
    pub fn keep_session(
        &mut self,
        session: SessionId,
        seq: SeqId,
        now_ms: u64,
    ) -> Result<usize, KvError> {
        let s = self.seq(seq)?;
        let blocks: Vec<BlockId> = s
            .blocks
            .get(..s.offered)
            .unwrap_or_default()
            .iter()
            .copied()
            .take_while(|b| self.is_cached(*b))
            .collect();
        for (i, &b) in blocks.iter().enumerate() {
            if let Err(err) = self.take_ref(b) {
                self.release_blocks(&blocks[..i])?;
                return Err(err.into());
            }
        }
        self.index_acquire(&blocks)?;
        let n = blocks.len();
        let expires_ms = self
            .cfg
            .session_ttl_ms
            .map(|ttl| now_ms.saturating_add(ttl));
        let old = self
            .sessions
            .insert(session, SessionKv { blocks, expires_ms });
        if let Some(old) = old {
            self.drop_session(&old)?;
        }
        Ok(n)
    }

    /// Ends a session: its context becomes evictable.
    pub fn end_session(&mut self, session: SessionId) -> Result<(), KvError> {
        let old = self
            .sessions
            .remove(&session)
            .ok_or(KvError::UnknownSession { session })?;
        self.drop_session(&old)
    }

    /// The application's word that a conversation has ended (the user closed the chat, its
    /// session expired): `tokens` is the conversation's latest context under `scope` (the last
    /// turn's prompt and reply). The reuse index evicts the blocks only that conversation used
    /// before every other block, until something uses them again; the first `keep_first` full
    /// blocks (a system prompt other conversations share) and blocks anything else still
    /// holds keep their standing. Returns how many blocks were demoted (0 with an index that
    /// has no notion of ending). See [`ReuseIndex::end_conversation`].
    ///
    /// Call it after the conversation's last request is freed and its session (if any)
    /// ended with [`end_session`](Self::end_session): blocks still held are kept as they are.
    ///
    /// # Errors
    /// [`KvError::Reuse`] with [`ReuseError::BrokenChain`](kvc_core::ReuseError::BrokenChain)
    /// if the index found the blocks cached out of chain order; nothing changed.
    pub fn end_conversation(
        &mut self,
        scope: &ReuseScope,
        tokens: &[u32],
        keep_first: usize,
        now_ms: u64,
    ) -> Result<usize, KvError> {
        Ok(self
            .reuse
            .end_conversation(scope, tokens, keep_first, now_ms)?)
    }

    /// Ends the sessions whose TTL ran out by `now_ms`; returns how many.
    pub fn expire_sessions(&mut self, now_ms: u64) -> Result<usize, KvError> {
        let expired: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.expires_ms.is_some_and(|t| t <= now_ms))
            .map(|(&id, _)| id)
            .collect();
        let mut result = Ok(());
        for id in &expired {
            result = result.and(self.end_session(*id));
        }
        self.stats.sessions_expired += expired.len() as u64;
        result.map(|()| expired.len())
    }

    /// Sessions holding context.
    #[must_use]
    pub fn num_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Evicts up to `count` evictable cached blocks, freeing each; returns how many.
    pub fn evict(&mut self, count: usize, now_ms: u64) -> Result<usize, KvError> {
        if count == 0 {
            return Ok(0);
        }
        let mut evicted = Vec::new();
        let mut keys = Vec::new();
        let n = if self.tiers.is_some() {
            self.reuse
                .evict_keyed(count, now_ms, &mut evicted, &mut keys)
        } else {
            self.reuse.evict(count, now_ms, &mut evicted)
        };
        debug_assert_eq!(n, evicted.len(), "the reuse index miscounted its evictions");
        let mut result = Ok(());
        let mut freed = 0;
        for (i, b) in evicted.into_iter().enumerate() {
            let was_evictable = self.is_cached(b) && self.alloc.refcount(b) == Ok(1);
            self.note_evicted(b, keys.get(i).copied().flatten());
            self.mark_cached(b, false);
            match self.alloc.release(b) {
                Ok(Released::Freed) => freed += 1,
                Ok(Released::Shared { .. }) => {
                    debug_assert!(was_evictable, "the reuse index evicted {b}, still in use");
                }
                Err(err) => result = result.and(Err(err.into())),
            }
        }
        self.stats.evicted_blocks += freed as u64;
        result.map(|()| freed)
    }

    /// A block just cached under a hash a live soft pin already names (pinned ahead of its
    /// prompt, or evicted anyway, since pins are soft, and computed or loaded again) takes
    /// the pin's retention at once, as if it had been cached when the pin was placed: the
    /// pin's own updates reached the index while the block was not cached, so they were
    /// dropped there.
    fn apply_pin(&mut self, b: BlockId, now_ms: u64) {
        let Some(TierKey { key, .. }) = self.reuse.cached_key(b) else {
            return;
        };
        // Pins name blocks by the low 64 bits of their key (`ReuseIndex::set_retention`).
        let short = key.0 as u64;
        let retention = self.pin.retention(short, now_ms);
        if retention != Retention::DEFAULT {
            self.reuse.set_retention(short, retention);
        }
    }

    /// The index just cached `b`: write it through in that mode (not a block just loaded
    /// from the tiers).
    fn note_cached(&mut self, b: BlockId, from_tiers: bool) {
        let Some(t) = self.tiers.as_mut() else {
            return;
        };
        if t.mode != TierMode::WriteThrough || from_tiers {
            return;
        }
        if let Some(TierKey { key, retention }) = self.reuse.cached_key(b) {
            t.offloads.push(BlockOffload {
                device: b,
                key,
                retention,
            });
            self.stats.offloaded_blocks += 1;
        }
    }

    /// The index evicted `b`, cached under `key` (its bytes are intact until the engine runs
    /// the next plan's offloads): write it back in that mode. In write-through mode the copy
    /// below was written at caching time, with the retention the block had then; a block
    /// evicted with a pin in force is offered again so that its pin reaches the tiers (a tier
    /// already holding it only takes the new retention).
    fn note_evicted(&mut self, b: BlockId, key: Option<TierKey>) {
        let Some(t) = self.tiers.as_mut() else {
            return;
        };
        let Some(TierKey { key, retention }) = key else {
            return;
        };
        let offer = match t.mode {
            TierMode::WriteBack => true,
            TierMode::WriteThrough => retention != Retention::DEFAULT,
        };
        if offer {
            t.offloads.push(BlockOffload {
                device: b,
                key,
                retention,
            });
            self.stats.offloaded_blocks += 1;
        }
    }

    /// `seq`'s key memo, taken out of the sequence (the caller puts it back), covering at
    /// least the full blocks of `tokens` when the index names blocks: the keys of blocks
    /// whose tokens match the memo's are kept, the rest hashed ([`KeyMemo`]).
    fn keys_of(
        &mut self,
        seq: SeqId,
        scope: &ReuseScope,
        tokens: &[u32],
    ) -> Result<KeyMemo, KvError> {
        let mut memo = std::mem::take(&mut self.seq_mut(seq)?.keys);
        let root = self.reuse.chain_root(scope);
        if root.is_none() || memo.root != root {
            // The same request: what it offered stays known.
            memo = KeyMemo {
                root,
                offers: memo.offers,
                ..KeyMemo::default()
            };
        }
        if root.is_none() {
            return Ok(memo);
        }
        let bs = self.cfg.block_size as usize;
        let full = tokens.len() / bs;
        let overlap = memo.keys.len().min(full) * bs;
        if memo.tokens[..overlap] != tokens[..overlap] {
            let same = memo.tokens[..overlap]
                .chunks_exact(bs)
                .zip(tokens.chunks_exact(bs))
                .take_while(|(kept, given)| kept == given)
                .count();
            memo.keys.truncate(same);
            memo.tokens.truncate(same * bs);
            if same < memo.offers.prompt_blocks.max(memo.offers.offered) {
                // Other tokens than the request's: another request under its id.
                memo.offers = SeqOffers::default();
            }
        }
        let known = memo.keys.len();
        if known < full {
            self.reuse
                .extend_keys(scope, &tokens[..full * bs], &mut memo.keys);
            let keyed = memo.keys.len().min(full);
            memo.keys.truncate(keyed);
            memo.tokens
                .extend_from_slice(&tokens[known * bs..keyed * bs]);
        }
        Ok(memo)
    }

    /// How many freed sequences' keys are kept for their reopening.
    const PARKED_KEYS: usize = 16;

    /// Keeps a freed sequence's keys (see `parked`); the oldest go first.
    fn park_keys(&mut self, seq: SeqId, memo: KeyMemo) {
        if memo.keys.is_empty() {
            return;
        }
        if self.parked.len() == Self::PARKED_KEYS {
            self.parked.pop_front();
        }
        self.parked.push_back((seq, memo));
    }

    /// The keys `seq` had when it was last freed, if still kept. They are checked against
    /// the tokens and chain root of each later call like any kept keys, so an id reused for
    /// another request gets keys of its own tokens.
    fn unpark_keys(&mut self, seq: SeqId) -> KeyMemo {
        match self.parked.iter().rposition(|(s, _)| *s == seq) {
            Some(at) => self.parked.remove(at).map(|(_, m)| m).unwrap_or_default(),
            None => KeyMemo::default(),
        }
    }

    fn seq(&self, seq: SeqId) -> Result<&SeqKv, KvError> {
        self.seqs.get(&seq).ok_or(KvError::UnknownSeq { seq })
    }

    fn seq_mut(&mut self, seq: SeqId) -> Result<&mut SeqKv, KvError> {
        self.seqs.get_mut(&seq).ok_or(KvError::UnknownSeq { seq })
    }

    fn is_cached(&self, b: BlockId) -> bool {
        self.cached.get(b.index()).copied().unwrap_or(false)
    }

    /// Records whether the index holds `b`, keeping the evictable counts right. Called with
    /// the pool's reference count as it is after the change.
    fn mark_cached(&mut self, b: BlockId, cached: bool) {
        let Some(slot) = self.cached.get_mut(b.index()) else {
            return;
        };
        if *slot == cached {
            return;
        }
        *slot = cached;
        if !cached && self.alloc.refcount(b) == Ok(1) {
            self.evictable_add(b, false);
        }
    }

    fn evictable_add(&mut self, b: BlockId, up: bool) {
        let Ok(region) = self.alloc.region_of(b) else {
            return;
        };
        let i = region.index();
        if self.evictable.len() <= i {
            self.evictable.resize(i + 1, 0);
        }
        if up {
            self.evictable[i] += 1;
        } else {
            self.evictable[i] = self.evictable[i].saturating_sub(1);
        }
    }

    /// One more holder of `b`.
    fn take_ref(&mut self, b: BlockId) -> Result<(), kvc_core::RefError> {
        let count = self.alloc.retain(b)?;
        if count == 2 && self.is_cached(b) {
            self.evictable_add(b, false);
        }
        Ok(())
    }

    /// One holder fewer of `b`.
    fn drop_ref(&mut self, b: BlockId) -> Result<(), kvc_core::RefError> {
        match self.alloc.release(b)? {
            Released::Shared { remaining: 1 } if self.is_cached(b) => self.evictable_add(b, true),
            Released::Freed if self.is_cached(b) => {
                debug_assert!(false, "{b} freed while the reuse index holds it");
                if let Some(slot) = self.cached.get_mut(b.index()) {
                    *slot = false;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Drops one reference on each block, all of them even after an error.
    fn release_blocks(&mut self, blocks: &[BlockId]) -> Result<(), KvError> {
        let mut result = Ok(());
        for &b in blocks {
            if let Err(err) = self.drop_ref(b) {
                result = result.and(Err(err.into()));
            }
        }
        result
    }

    fn drop_session(&mut self, s: &SessionKv) -> Result<(), KvError> {
        let index = self.index_release(&s.blocks);
        index.and(self.release_blocks(&s.blocks))
    }

    /// Blocks of the dynamic region's watermark reserve, which admissions leave free: the
    /// smallest reserve consistent with the allocator's `can_allocate` answers.
    fn reserve(&self, region: RegionId) -> usize {
        let cap = self.alloc.capacity(region).unwrap_or(0);
        // The largest count that is not `Impossible` is capacity - reserve.
        let (mut lo, mut hi) = (0usize, cap);
        if self.alloc.can_allocate(region, cap) != Ok(Admission::Impossible) {
            return 0;
        }
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if self.alloc.can_allocate(region, mid) == Ok(Admission::Impossible) {
                hi = mid - 1;
            } else {
                lo = mid;
            }
        }
        cap - lo
    }

    // The reuse index's ownership calls, in one place.

    fn index_offer(
        &mut self,
        scope: &ReuseScope,
        offer: Offer<'_>,
        now_ms: u64,
        newly: &mut Vec<BlockId>,
    ) -> Result<(), KvError> {
        Ok(self.reuse.offer(scope, offer, now_ms, newly)?)
    }

    fn index_offer_adopting(
        &mut self,
        scope: &ReuseScope,
        offer: Offer<'_>,
        now_ms: u64,
        newly: &mut Vec<BlockId>,
        adopted: &mut Vec<Adopted>,
    ) -> Result<(), KvError> {
        Ok(self
            .reuse
            .offer_adopting(scope, offer, now_ms, newly, adopted)?)
    }

    fn index_acquire(&mut self, blocks: &[BlockId]) -> Result<(), KvError> {
        Ok(self.reuse.acquire(blocks)?)
    }

    fn index_release(&mut self, blocks: &[BlockId]) -> Result<(), KvError> {
        Ok(self.reuse.release(blocks)?)
    }
}

fn scope(owner: &SeqOwner) -> ReuseScope {
    ReuseScope {
        tenant: owner.tenant,
        session: owner.session,
    }
}
