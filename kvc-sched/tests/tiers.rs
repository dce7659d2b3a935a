//! Tiers below device memory through the [`KvManager`] and the [`Scheduler`], with an
//! in-memory stand-in for the tiers (a set of keys): tier hits become load jobs naming the
//! right keys and device blocks, a loading sequence waits out of the batch, completed loads
//! become computed (and cached) prefixes, failed loads are recomputed, evictions and caching
//! become offloads, and a sequence freed during its load never hands its loading blocks to
//! anyone before the load reports.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use kvc_alloc::{BlockPool, PoolConfig};
use kvc_core::{
    BlockId, LowerTiers, QosClass, Retention, ReuseIndex, ReuseScope, SeqId, StoreKey, TenantId,
};
use kvc_reuse::{BlockHash, HashExtra, PolicyKind, PrefixCache, ScopedIndex, Xxh3Hasher};
use kvc_sched::{
    BlockLoad, DynamicOnly, KvError, KvManager, KvManagerConfig, LoadDone, LoadError, LoadId,
    LoadResult, PrefixLoad, Request, Scheduler, SchedulerConfig, SeqOwner, SlotGrant, SlotRequest,
    TierMode,
};

const BS: u32 = 4;

/// Tiers that hold a set of keys (the bytes are the engine's business).
#[derive(Debug, Default)]
struct FakeTiers(Mutex<HashSet<StoreKey>>);

impl FakeTiers {
    fn put(&self, keys: &[StoreKey]) {
        self.0.lock().unwrap().extend(keys.iter().copied());
    }
    fn remove(&self, key: StoreKey) {
        self.0.lock().unwrap().remove(&key);
    }
    fn contains(&self, key: StoreKey) -> bool {
        self.0.lock().unwrap().contains(&key)
    }
}

impl LowerTiers for FakeTiers {
    fn longest_prefix(&self, keys: &[StoreKey]) -> usize {
        let held = self.0.lock().unwrap();
        keys.iter().take_while(|k| held.contains(k)).count()
    }
}

type Index = ScopedIndex<Xxh3Hasher>;
type Manager = KvManager<BlockPool, DynamicOnly, Index>;

fn index() -> Index {
    ScopedIndex::new(
        PrefixCache::new(BS, PolicyKind::Lru),
        Xxh3Hasher,
        HashExtra::new("test-model", 1),
    )
}

fn manager(blocks: u64, tiers: &Arc<FakeTiers>, mode: TierMode) -> Manager {
    let pool = BlockPool::new(PoolConfig::new(blocks)).unwrap();
    let cfg = KvManagerConfig {
        block_size: BS,
        session_ttl_ms: None,
    };
    KvManager::new(cfg, pool, DynamicOnly::default(), index())
        .unwrap()
        .with_tiers(Arc::clone(tiers) as Arc<dyn LowerTiers>, mode)
}

fn owner(tenant: u32) -> SeqOwner {
    SeqOwner {
        tenant: TenantId(tenant),
        class: QosClass::STANDARD,
        session: None,
    }
}

fn scope(tenant: u32) -> ReuseScope {
    ReuseScope {
        tenant: TenantId(tenant),
        session: None,
    }
}

/// The keys of `tokens`' full blocks for `tenant`, as the index names them.
fn keys_of<R: ReuseIndex>(index: &mut R, tenant: u32, tokens: &[u32]) -> Vec<StoreKey> {
    let mut keys = Vec::new();
    index.block_keys(&scope(tenant), tokens, &mut keys);
    keys
}

fn ask(new_tokens: u64) -> SlotRequest {
    SlotRequest {
        new_tokens,
        lookahead: 0,
        admission: true,
    }
}

fn check_usage(kv: &Manager) {
    let u = kv.usage().total();
    assert_eq!(u.free + u.evictable + u.in_use, u.capacity, "{u:?}");
}

/// Opens `seq` for `tenant` and looks `prompt` up on the device, then in the tiers.
fn open_and_load(kv: &mut Manager, seq: u64, tenant: u32, prompt: &[u32], now: u64) -> PrefixLoad {
    kv.open(SeqId(seq), owner(tenant)).unwrap();
    let _ = kv.lookup_prefix(SeqId(seq), prompt, now).unwrap();
    kv.load_prefix(SeqId(seq), prompt, now).unwrap()
}

/// Opens `seq`, computes `prompt` from scratch and caches it; returns its blocks.
fn compute(kv: &mut Manager, seq: u64, tenant: u32, prompt: &[u32]) -> Vec<BlockId> {
    kv.open(SeqId(seq), owner(tenant)).unwrap();
    let hit = kv.lookup_prefix(SeqId(seq), prompt, 0).unwrap();
    let grant = kv
        .allocate_slots(
            SeqId(seq),
            ask(prompt.len() as u64 - hit),
            0,
            &mut Vec::new(),
        )
        .unwrap();
    assert_eq!(grant, SlotGrant::Now);
    kv.cache_blocks(SeqId(seq), prompt, 0).unwrap();
    kv.blocks(SeqId(seq)).unwrap().to_vec()
}

#[test]
fn a_tier_hit_is_loaded_then_served_as_the_computed_and_cached_prefix() {
    let tiers = Arc::new(FakeTiers::default());
    let mut kv = manager(16, &tiers, TierMode::WriteBack);
    let prompt: Vec<u32> = (0..14).collect();
    let keys = keys_of(kv.reuse_index_mut(), 0, &prompt);
    assert_eq!(keys.len(), 3);
    tiers.put(&keys);

    kv.open(SeqId(1), owner(0)).unwrap();
    assert_eq!(kv.lookup_prefix(SeqId(1), &prompt, 0).unwrap(), 0);
    let job = kv
        .load_prefix(SeqId(1), &prompt, 0)
        .unwrap()
        .started()
        .expect("a tier hit");
    let blocks = kv.blocks(SeqId(1)).unwrap().to_vec();
    assert_eq!(blocks.len(), 3);
    assert_eq!(job.seq, SeqId(1));
    let expected: Vec<BlockLoad> = keys
        .iter()
        .zip(&blocks)
        .map(|(&key, &device)| BlockLoad { key, device })
        .collect();
    assert_eq!(job.blocks, expected);
    assert!(kv.is_loading(SeqId(1)));
    assert_eq!(kv.pending_loads(), 1);
    // The loading blocks hold no KV yet: nothing may grow, fork or cache over them.
    assert_eq!(
        kv.allocate_slots(SeqId(1), ask(2), 0, &mut Vec::new()),
        Err(KvError::Loading { seq: SeqId(1) })
    );
    assert_eq!(
        kv.fork(SeqId(1), SeqId(9)),
        Err(KvError::Loading { seq: SeqId(1) })
    );
    assert_eq!(
        kv.cache_blocks(SeqId(1), &prompt, 0),
        Err(KvError::Loading { seq: SeqId(1) })
    );
    // Nobody else hits them before the load completes.
    kv.open(SeqId(2), owner(0)).unwrap();
    assert_eq!(kv.lookup_prefix(SeqId(2), &prompt, 0).unwrap(), 0);
    kv.free(SeqId(2)).unwrap();
    check_usage(&kv);

    let done = kv.complete_load(job.id, LoadResult::Loaded).unwrap();
    assert_eq!(
        done,
        LoadDone {
            seq: SeqId(1),
            loaded_blocks: 3,
            computed: Some(12),
        }
    );
    assert!(!kv.is_loading(SeqId(1)));
    assert_eq!(kv.num_tokens(SeqId(1)).unwrap(), 12);
    // The rest of the prompt: one more block.
    assert_eq!(
        kv.allocate_slots(SeqId(1), ask(2), 0, &mut Vec::new()),
        Ok(SlotGrant::Now)
    );
    assert_eq!(kv.blocks(SeqId(1)).unwrap()[..3], blocks[..]);
    // The loaded blocks are cached on the device now, under the same keys.
    kv.open(SeqId(3), owner(0)).unwrap();
    assert_eq!(kv.lookup_prefix(SeqId(3), &prompt, 1).unwrap(), 12);
    assert_eq!(kv.blocks(SeqId(3)).unwrap(), &blocks[..]);
    for (&b, &k) in blocks.iter().zip(&keys) {
        assert_eq!(kv.reuse_index().cached_key(b).map(|t| t.key), Some(k));
    }
    let stats = kv.stats();
    assert_eq!(
        (
            stats.tier_lookups,
            stats.tier_hit_blocks,
            stats.loaded_blocks,
            stats.load_failures
        ),
        (1, 3, 3, 0),
        "{stats:?}"
    );
    // A load is reported once; ids never issued are unknown.
    assert_eq!(
        kv.complete_load(job.id, LoadResult::Loaded),
        Err(LoadError::AlreadyCompleted { id: job.id })
    );
    assert_eq!(
        kv.complete_load(LoadId(7), LoadResult::Loaded),
        Err(LoadError::Unknown { id: LoadId(7) })
    );
    kv.free(SeqId(1)).unwrap();
    kv.free(SeqId(3)).unwrap();
    assert_eq!(kv.usage().total().in_use, 0);
    check_usage(&kv);
}

#[test]
fn the_tiers_continue_a_device_hit_and_never_cover_the_last_prompt_token() {
    let tiers = Arc::new(FakeTiers::default());
    let mut kv = manager(16, &tiers, TierMode::WriteBack);
    let prompt: Vec<u32> = (100..116).collect(); // 4 full blocks, the last token in block 3
    let keys = keys_of(kv.reuse_index_mut(), 0, &prompt);
    tiers.put(&keys);
    // The device caches the first block.
    compute(&mut kv, 1, 0, &prompt[..5]);
    kv.open(SeqId(2), owner(0)).unwrap();
    assert_eq!(kv.lookup_prefix(SeqId(2), &prompt, 0).unwrap(), 4);
    let job = kv
        .load_prefix(SeqId(2), &prompt, 0)
        .unwrap()
        .started()
        .unwrap();
    // Blocks 1 and 2 from the tiers; block 3 holds the last prompt token: computed.
    let got: Vec<StoreKey> = job.blocks.iter().map(|l| l.key).collect();
    assert_eq!(got, keys[1..3]);
    assert_eq!(
        job.blocks.iter().map(|l| l.device).collect::<Vec<_>>(),
        kv.blocks(SeqId(2)).unwrap()[1..3]
    );
    let done = kv.complete_load(job.id, LoadResult::Loaded).unwrap();
    assert_eq!(done.computed, Some(12));
    // Nothing more to load (block 3 holds the last prompt token); once the sequence holds
    // more than its prefix, a continuation is refused.
    assert_eq!(kv.load_prefix(SeqId(2), &prompt, 0), Ok(PrefixLoad::None));
    assert_eq!(
        kv.allocate_slots(SeqId(2), ask(4), 0, &mut Vec::new()),
        Ok(SlotGrant::Now)
    );
    assert_eq!(
        kv.load_prefix(SeqId(2), &prompt, 0),
        Err(KvError::NotAtPrefix { seq: SeqId(2) })
    );
}

#[test]
fn a_failed_load_keeps_its_leading_blocks_and_recomputes_the_rest_in_place() {
    let tiers = Arc::new(FakeTiers::default());
    let mut kv = manager(16, &tiers, TierMode::WriteBack);
    let prompt: Vec<u32> = (0..14).collect();
    let keys = keys_of(kv.reuse_index_mut(), 0, &prompt);
    tiers.put(&keys);
    let job = open_and_load(&mut kv, 1, 0, &prompt, 0).started().unwrap();
    let blocks = kv.blocks(SeqId(1)).unwrap().to_vec();
    // More loaded blocks than the job has: refused, nothing changed.
    assert_eq!(
        kv.complete_load(job.id, LoadResult::Failed { loaded_blocks: 4 }),
        Err(LoadError::TooManyBlocks {
            id: job.id,
            loaded_blocks: 4,
            blocks: 3
        })
    );
    assert!(kv.is_loading(SeqId(1)));
    let done = kv
        .complete_load(job.id, LoadResult::Failed { loaded_blocks: 1 })
        .unwrap();
    assert_eq!((done.loaded_blocks, done.computed), (1, Some(4)));
    assert_eq!(kv.num_tokens(SeqId(1)).unwrap(), 4);
    // The sequence keeps its blocks and computes tokens 4..14 into them (one block more).
    assert_eq!(
        kv.allocate_slots(SeqId(1), ask(10), 0, &mut Vec::new()),
        Ok(SlotGrant::Now)
    );
    assert_eq!(kv.blocks(SeqId(1)).unwrap()[..3], blocks[..]);
    assert_eq!(kv.blocks(SeqId(1)).unwrap().len(), 4);
    // Only the loaded block is cached so far.
    kv.open(SeqId(2), owner(0)).unwrap();
    assert_eq!(kv.lookup_prefix(SeqId(2), &prompt, 0).unwrap(), 4);
    let stats = kv.stats();
    assert_eq!((stats.loaded_blocks, stats.load_failures), (1, 1));
    kv.free(SeqId(1)).unwrap();
    kv.free(SeqId(2)).unwrap();
    check_usage(&kv);
}

#[test]
fn a_tier_hit_without_room_falls_back_to_recompute_and_changes_nothing() {
    let tiers = Arc::new(FakeTiers::default());
    let mut kv = manager(4, &tiers, TierMode::WriteBack);
    let prompt: Vec<u32> = (0..14).collect();
    let keys = keys_of(kv.reuse_index_mut(), 0, &prompt);
    tiers.put(&keys);
    // Another sequence holds 3 of the 4 blocks (uncached: nothing to evict).
    kv.open(SeqId(9), owner(1)).unwrap();
    assert_eq!(
        kv.allocate_slots(SeqId(9), ask(12), 0, &mut Vec::new()),
        Ok(SlotGrant::Now)
    );
    let before = kv.usage();
    kv.open(SeqId(1), owner(0)).unwrap();
    let _ = kv.lookup_prefix(SeqId(1), &prompt, 0).unwrap();
    assert_eq!(
        kv.load_prefix(SeqId(1), &prompt, 0).unwrap(),
        PrefixLoad::None
    );
    assert!(kv.blocks(SeqId(1)).unwrap().is_empty());
    assert!(!kv.is_loading(SeqId(1)));
    assert_eq!(kv.usage(), before);
    let stats = kv.stats();
    assert_eq!((stats.tier_hit_blocks, stats.tier_fallback_blocks), (3, 3));
}

#[test]
fn tenants_do_not_hit_each_others_blocks_in_the_tiers() {
    let tiers = Arc::new(FakeTiers::default());
    let mut kv = manager(16, &tiers, TierMode::WriteBack);
    let prompt: Vec<u32> = (0..14).collect();
    let mine = keys_of(kv.reuse_index_mut(), 0, &prompt);
    let theirs = keys_of(kv.reuse_index_mut(), 1, &prompt);
    assert!(mine.iter().all(|k| !theirs.contains(k)));
    tiers.put(&mine);
    kv.open(SeqId(1), owner(1)).unwrap();
    let _ = kv.lookup_prefix(SeqId(1), &prompt, 0).unwrap();
    assert_eq!(
        kv.load_prefix(SeqId(1), &prompt, 0).unwrap(),
        PrefixLoad::None
    );
    assert_eq!(kv.stats().tier_lookups, 1);
}

#[test]
fn write_back_offloads_the_blocks_the_device_evicts_under_their_keys() {
    let tiers = Arc::new(FakeTiers::default());
    let mut kv = manager(6, &tiers, TierMode::WriteBack);
    let a: Vec<u32> = (0..9).collect();
    let blocks = compute(&mut kv, 1, 0, &a);
    kv.free(SeqId(1)).unwrap();
    let mut offloads = Vec::new();
    kv.drain_offloads(&mut offloads);
    assert!(offloads.is_empty(), "nothing evicted yet");
    assert_eq!(kv.evictable_blocks(), 2);
    // A request for the whole pool evicts both cached blocks.
    kv.open(SeqId(2), owner(0)).unwrap();
    assert_eq!(
        kv.allocate_slots(SeqId(2), ask(24), 0, &mut Vec::new()),
        Ok(SlotGrant::Now)
    );
    kv.drain_offloads(&mut offloads);
    let keys = keys_of(kv.reuse_index_mut(), 0, &a);
    let got: HashSet<(BlockId, StoreKey)> = offloads.iter().map(|o| (o.device, o.key)).collect();
    let want: HashSet<(BlockId, StoreKey)> = blocks[..2]
        .iter()
        .copied()
        .zip(keys.iter().copied())
        .collect();
    assert_eq!(got, want);
    assert!(offloads.iter().all(|o| o.retention == Retention::DEFAULT));
    assert_eq!(kv.stats().offloaded_blocks, 2);
    offloads.clear();
    kv.drain_offloads(&mut offloads);
    assert!(offloads.is_empty(), "drained once");
}

#[test]
fn blocks_are_written_back_with_the_retention_they_had_on_the_device() {
    let tiers = Arc::new(FakeTiers::default());
    let mut kv = manager(6, &tiers, TierMode::WriteBack);
    let a: Vec<u32> = (0..9).collect();
    compute(&mut kv, 1, 0, &a);
    kv.free(SeqId(1)).unwrap();
    // A system prompt pinned softly (through the index, as a pin policy's soft pins are),
    // and its tail demoted below the default.
    let keys = keys_of(kv.reuse_index_mut(), 0, &a);
    let short = |k: StoreKey| BlockHash(k.0).short();
    let pin = |priority, until| Retention { priority, until };
    kv.reuse_index_mut()
        .set_retention(short(keys[0]), pin(80, Some(1_000)));
    kv.reuse_index_mut()
        .set_retention(short(keys[1]), pin(10, None));
    kv.open(SeqId(2), owner(0)).unwrap();
    assert_eq!(
        kv.allocate_slots(SeqId(2), ask(24), 0, &mut Vec::new()),
        Ok(SlotGrant::Now)
    );
    let mut offloads = Vec::new();
    kv.drain_offloads(&mut offloads);
    let got: Vec<(StoreKey, Retention)> = offloads.iter().map(|o| (o.key, o.retention)).collect();
    assert_eq!(
        got,
        [(keys[1], pin(10, None)), (keys[0], pin(80, Some(1_000)))],
        "low priority first, each with its expiry for the tier below"
    );
    kv.free(SeqId(2)).unwrap();
    check_usage(&kv);
}

#[test]
fn an_invalidated_block_is_never_written_back() {
    let tiers = Arc::new(FakeTiers::default());
    let mut kv = manager(6, &tiers, TierMode::WriteBack);
    let a: Vec<u32> = (0..9).collect();
    compute(&mut kv, 1, 0, &a);
    kv.free(SeqId(1)).unwrap();
    let first = keys_of(kv.reuse_index_mut(), 0, &a)[0];
    let dropped = kv
        .reuse_index_mut()
        .cache_mut()
        .invalidate(kvc_reuse::BlockHash(first.0));
    assert_eq!(dropped, 2);
    assert_eq!(kv.evict(2, 1).unwrap(), 2);
    let mut offloads = Vec::new();
    kv.drain_offloads(&mut offloads);
    assert!(offloads.is_empty(), "{offloads:?}");
}

#[test]
fn write_through_offers_a_block_pinned_after_caching_again_when_it_is_evicted() {
    let tiers = Arc::new(FakeTiers::default());
    let mut kv = manager(16, &tiers, TierMode::WriteThrough);
    let a: Vec<u32> = (0..9).collect();
    let blocks = compute(&mut kv, 1, 0, &a);
    kv.free(SeqId(1)).unwrap();
    let mut offloads = Vec::new();
    kv.drain_offloads(&mut offloads);
    assert!(offloads.iter().all(|o| o.retention == Retention::DEFAULT));
    // The application pins the first block after it was written through.
    let keys = keys_of(kv.reuse_index_mut(), 0, &a);
    let pin = Retention {
        priority: 80,
        until: Some(1_000),
    };
    kv.reuse_index_mut()
        .set_retention(BlockHash(keys[0].0).short(), pin);
    assert_eq!(kv.evict(2, 5).unwrap(), 2);
    offloads.clear();
    kv.drain_offloads(&mut offloads);
    let got: Vec<_> = offloads
        .iter()
        .map(|o| (o.device, o.key, o.retention))
        .collect();
    assert_eq!(
        got,
        [(blocks[0], keys[0], pin)],
        "only the pinned block, with its pin; the other is below as it was"
    );
    assert_eq!(kv.stats().offloaded_blocks, 3);
}

#[test]
fn write_through_offloads_at_cache_time_once_and_not_what_came_from_the_tiers() {
    let tiers = Arc::new(FakeTiers::default());
    let mut kv = manager(16, &tiers, TierMode::WriteThrough);
    let a: Vec<u32> = (0..9).collect();
    let blocks = compute(&mut kv, 1, 0, &a);
    let mut offloads = Vec::new();
    kv.drain_offloads(&mut offloads);
    let keys = keys_of(kv.reuse_index_mut(), 0, &a);
    assert_eq!(
        offloads
            .iter()
            .map(|o| (o.device, o.key))
            .collect::<Vec<_>>(),
        blocks[..2]
            .iter()
            .copied()
            .zip(keys.clone())
            .collect::<Vec<_>>()
    );
    // Caching again, or evicting, writes nothing more.
    kv.cache_blocks(SeqId(1), &a, 1).unwrap();
    kv.free(SeqId(1)).unwrap();
    assert_eq!(kv.evict(2, 2).unwrap(), 2);
    offloads.clear();
    kv.drain_offloads(&mut offloads);
    assert!(offloads.is_empty(), "{offloads:?}");
    // Loaded from the tiers and cached again: not copied back down.
    tiers.put(&keys);
    kv.open(SeqId(2), owner(0)).unwrap();
    let _ = kv.lookup_prefix(SeqId(2), &a, 3).unwrap();
    let job = kv.load_prefix(SeqId(2), &a, 3).unwrap().started().unwrap();
    assert_eq!(job.blocks.len(), 2);
    kv.complete_load(job.id, LoadResult::Loaded).unwrap();
    kv.drain_offloads(&mut offloads);
    assert!(offloads.is_empty(), "{offloads:?}");
    assert_eq!(kv.stats().offloaded_blocks, 2);
}

#[test]
fn a_sequence_freed_during_its_load_holds_the_loading_blocks_until_the_load_reports() {
    let tiers = Arc::new(FakeTiers::default());
    let mut kv = manager(8, &tiers, TierMode::WriteBack);
    let prompt: Vec<u32> = (0..14).collect();
    let keys = keys_of(kv.reuse_index_mut(), 0, &prompt);
    tiers.put(&keys);
    let job = open_and_load(&mut kv, 1, 0, &prompt, 0).started().unwrap();
    kv.free(SeqId(1)).unwrap();
    assert!(!kv.contains(SeqId(1)));
    let u = kv.usage().total();
    assert_eq!(
        (u.in_use, u.free),
        (3, 5),
        "the load still holds its blocks"
    );
    check_usage(&kv);
    // No allocation can be handed a loading block meanwhile.
    kv.open(SeqId(2), owner(1)).unwrap();
    assert_eq!(
        kv.allocate_slots(SeqId(2), ask(20), 0, &mut Vec::new()),
        Ok(SlotGrant::Now)
    );
    let loading: HashSet<BlockId> = job.blocks.iter().map(|l| l.device).collect();
    assert!(
        kv.blocks(SeqId(2))
            .unwrap()
            .iter()
            .all(|b| !loading.contains(b))
    );
    kv.free(SeqId(2)).unwrap();
    let done = kv.complete_load(job.id, LoadResult::Loaded).unwrap();
    assert_eq!(done.computed, None);
    assert_eq!(kv.pending_loads(), 0);
    let u = kv.usage().total();
    assert_eq!((u.in_use, u.free), (0, 8));
}

#[test]
fn a_prefix_already_on_its_way_is_not_loaded_twice() {
    let tiers = Arc::new(FakeTiers::default());
    let mut kv = manager(16, &tiers, TierMode::WriteBack);
    let prompt: Vec<u32> = (0..14).collect();
    let keys = keys_of(kv.reuse_index_mut(), 0, &prompt);
    tiers.put(&keys);
    kv.open(SeqId(1), owner(0)).unwrap();
    assert_eq!(kv.lookup_prefix(SeqId(1), &prompt, 0).unwrap(), 0);
    let job = kv
        .load_prefix(SeqId(1), &prompt, 0)
        .unwrap()
        .started()
        .unwrap();

    // The same prompt, and a longer one continuing it: both wait for the load in flight.
    let longer: Vec<u32> = (0..30).collect();
    tiers.put(&keys_of(kv.reuse_index_mut(), 0, &longer));
    for (seq, p) in [(2, &prompt), (3, &longer)] {
        kv.open(SeqId(seq), owner(0)).unwrap();
        assert_eq!(kv.lookup_prefix(SeqId(seq), p, 0).unwrap(), 0);
        assert_eq!(
            kv.load_prefix(SeqId(seq), p, 0),
            Ok(PrefixLoad::InFlight { load: job.id })
        );
        assert!(
            kv.blocks(SeqId(seq)).unwrap().is_empty(),
            "nothing allocated"
        );
        assert!(!kv.is_loading(SeqId(seq)));
    }
    assert_eq!(kv.stats().tier_in_flight, 2);
    assert_eq!(
        kv.stats().tier_lookups,
        1,
        "no tier round trip for a block on its way"
    );
    assert_eq!(kv.usage().total().in_use, 3, "one copy of the prefix");
    // Another tenant's prompt with the same tokens has other keys: it loads its own.
    let other = keys_of(kv.reuse_index_mut(), 1, &prompt);
    tiers.put(&other);
    let job4 = open_and_load(&mut kv, 4, 1, &prompt, 0).started().unwrap();
    assert_eq!(job4.blocks.len(), 3);

    kv.complete_load(job.id, LoadResult::Loaded).unwrap();
    // Looked up again, the waiting prompts hit the loaded blocks on the device.
    let loaded: Vec<BlockId> = job.blocks.iter().map(|l| l.device).collect();
    for (seq, p) in [(2, &prompt), (3, &longer)] {
        kv.free(SeqId(seq)).unwrap();
        kv.open(SeqId(seq), owner(0)).unwrap();
        assert_eq!(kv.lookup_prefix(SeqId(seq), p, 1).unwrap(), 12);
        assert_eq!(kv.blocks(SeqId(seq)).unwrap(), &loaded[..]);
    }
    // The longer prompt continues into the tiers past them.
    let rest = kv
        .load_prefix(SeqId(3), &longer, 1)
        .unwrap()
        .started()
        .unwrap();
    assert_eq!(rest.blocks.len(), 4);
    assert_eq!(
        rest.blocks[0].key,
        keys_of(kv.reuse_index_mut(), 0, &longer)[3]
    );
    kv.complete_load(rest.id, LoadResult::Loaded).unwrap();
    kv.complete_load(job4.id, LoadResult::Loaded).unwrap();
    for seq in 1..=4 {
        kv.free(SeqId(seq)).unwrap();
    }
    check_usage(&kv);
    assert_eq!(kv.usage().total().in_use, 0);
}

#[test]
fn a_load_whose_sequence_was_freed_is_not_waited_for() {
    let tiers = Arc::new(FakeTiers::default());
    let mut kv = manager(16, &tiers, TierMode::WriteBack);
    let prompt: Vec<u32> = (0..14).collect();
    let keys = keys_of(kv.reuse_index_mut(), 0, &prompt);
    tiers.put(&keys);
    let first = open_and_load(&mut kv, 1, 0, &prompt, 0).started().unwrap();
    // Freed while loading: its blocks will not be cached, so the next prompt loads its own.
    kv.free(SeqId(1)).unwrap();
    let second = open_and_load(&mut kv, 2, 0, &prompt, 0).started().unwrap();
    assert_ne!(first.id, second.id);
    kv.complete_load(first.id, LoadResult::Loaded).unwrap();
    // The second load is still the one in flight for these keys.
    assert_eq!(
        open_and_load(&mut kv, 3, 0, &prompt, 0),
        PrefixLoad::InFlight { load: second.id }
    );
    kv.complete_load(second.id, LoadResult::Failed { loaded_blocks: 1 })
        .unwrap();
    // A failed load caches only its loaded block: the rest is in flight no more.
    kv.free(SeqId(3)).unwrap();
    kv.open(SeqId(3), owner(0)).unwrap();
    assert_eq!(kv.lookup_prefix(SeqId(3), &prompt, 1).unwrap(), 4);
    let third = kv
        .load_prefix(SeqId(3), &prompt, 1)
        .unwrap()
        .started()
        .unwrap();
    assert_eq!(third.blocks.len(), 2);
    kv.complete_load(third.id, LoadResult::Loaded).unwrap();
    for seq in 2..=3 {
        kv.free(SeqId(seq)).unwrap();
    }
    check_usage(&kv);
    assert_eq!(kv.usage().total().in_use, 0);
}

// ---------------------------------------------------------------- through the Scheduler

type Sched = Scheduler<BlockPool, DynamicOnly, Index>;

fn scheduler(blocks: u64, tiers: &Arc<FakeTiers>, mode: TierMode) -> Sched {
    let cfg = SchedulerConfig {
        block_size: BS,
        max_batch_tokens: 64,
        max_model_len: 256,
        ..SchedulerConfig::default()
    };
    let pool = BlockPool::new(PoolConfig::new(blocks)).unwrap();
    Scheduler::new(cfg, pool, DynamicOnly::default(), index())
        .unwrap()
        .with_tiers(Arc::clone(tiers) as Arc<dyn LowerTiers>, mode)
}

fn request(id: u64, qos: u8, prompt: Vec<u32>, new: u32) -> Request {
    Request {
        id: SeqId(id),
        tenant: TenantId(0),
        qos: QosClass(qos),
        session: None,
        prompt,
        max_new_tokens: new,
        arrival_ms: id,
    }
}

/// Samples a token for every sampling sequence of the last plan.
fn sample(s: &mut Sched, plan: &kvc_sched::StepPlan) -> Vec<kvc_sched::Finished> {
    let sampled: Vec<(SeqId, u32)> = plan
        .seqs
        .iter()
        .filter(|x| x.samples)
        .map(|x| (x.seq, 7))
        .collect();
    s.complete_step(&sampled).unwrap()
}

/// Steps from time `t` until every request finished; then nothing is in use.
fn run_to_idle(s: &mut Sched, mut t: u64) {
    while !s.is_idle() {
        let plan = s.step(t);
        sample(s, &plan);
        t += 1;
        assert!(t < 50, "not idle by step 50");
    }
    assert_eq!(s.kv_manager().usage().total().in_use, 0);
}

#[test]
fn a_loading_sequence_waits_out_of_the_batch_while_the_others_run() {
    let tiers = Arc::new(FakeTiers::default());
    let mut s = scheduler(32, &tiers, TierMode::WriteBack);
    let prompt: Vec<u32> = (0..14).collect();
    let keys = keys_of(s.reuse_index_mut(), 0, &prompt);
    tiers.put(&keys);
    s.submit(request(1, 1, prompt, 2)).unwrap();
    s.submit(request(2, 1, (500..506).collect(), 3)).unwrap();

    let plan = s.step(0);
    assert_eq!(plan.loads.len(), 1);
    let job = plan.loads[0].clone();
    assert_eq!(job.seq, SeqId(1));
    assert_eq!(job.blocks.iter().map(|l| l.key).collect::<Vec<_>>(), keys);
    assert_eq!(
        job.blocks.iter().map(|l| l.device).collect::<Vec<_>>(),
        s.seq_blocks(SeqId(1)).unwrap()
    );
    assert_eq!(plan.seqs.len(), 1, "only the other sequence runs");
    assert_eq!(plan.seqs[0].seq, SeqId(2));
    assert!(
        plan.kv_indices
            .iter()
            .all(|&b| job.blocks.iter().all(|l| l.device.get() != b))
    );
    assert_eq!(s.num_running(), 2);
    sample(&mut s, &plan);

    // Not reported yet: it keeps waiting, and nothing is loaded twice.
    let plan = s.step(1);
    assert!(plan.loads.is_empty());
    assert!(plan.seqs.iter().all(|x| x.seq != SeqId(1)));
    sample(&mut s, &plan);

    s.complete_load(job.id, LoadResult::Loaded).unwrap();
    let plan = s.step(5);
    let x = plan.seqs.iter().find(|x| x.seq == SeqId(1)).unwrap();
    assert_eq!(x.positions, 12..14, "the loaded prefix is computed");
    let i = plan.seqs.iter().position(|x| x.seq == SeqId(1)).unwrap();
    let pages = &plan.kv_indices[plan.kv_indptr[i] as usize..plan.kv_indptr[i + 1] as usize];
    let loaded: Vec<u32> = job.blocks.iter().map(|l| l.device.get()).collect();
    assert_eq!(pages[..3], loaded[..]);
    let stats = s.stats();
    assert_eq!(
        (
            stats.loads_issued,
            stats.loads_completed,
            stats.load_failures,
            stats.tier_tokens,
            stats.load_wait_steps,
            stats.load_wait_ms,
        ),
        (1, 1, 0, 12, 2, 1),
        "{stats:?}"
    );
    assert_eq!(
        s.complete_load(job.id, LoadResult::Loaded),
        Err(LoadError::AlreadyCompleted { id: job.id })
    );
    assert_eq!(
        s.complete_load(LoadId(3), LoadResult::Loaded),
        Err(LoadError::Unknown { id: LoadId(3) })
    );
    // Both finish; everything is free or cached.
    sample(&mut s, &plan);
    run_to_idle(&mut s, 6);
}

#[test]
fn requests_for_one_prefix_in_the_tiers_share_one_load() {
    let tiers = Arc::new(FakeTiers::default());
    let mut s = scheduler(32, &tiers, TierMode::WriteBack);
    let prompt: Vec<u32> = (0..14).collect();
    let keys = keys_of(s.reuse_index_mut(), 0, &prompt);
    tiers.put(&keys);
    s.submit(request(1, 1, prompt.clone(), 2)).unwrap();
    s.submit(request(2, 1, prompt.clone(), 2)).unwrap();
    s.submit(request(3, 1, (500..506).collect(), 2)).unwrap();

    let plan = s.step(0);
    assert_eq!(plan.loads.len(), 1, "one load for the shared prefix");
    let job = plan.loads[0].clone();
    assert_eq!(job.seq, SeqId(1));
    // The second waits unopened (holding nothing); the request behind it is not held up.
    assert_eq!(s.num_waiting(), 1);
    assert!(s.seq_blocks(SeqId(2)).is_none_or(|b| b.is_empty()));
    assert_eq!(plan.seqs.len(), 1);
    assert_eq!(plan.seqs[0].seq, SeqId(3));
    assert_eq!(s.stats().load_waits, 1);
    sample(&mut s, &plan);

    // Still in flight: still waiting, still one load, and the waiting request is not tried
    // again (no lookup) before the load is reported.
    let queries = s.reuse_index_mut().cache().metrics().queries;
    let plan = s.step(1);
    assert!(plan.loads.is_empty());
    assert!(plan.seqs.iter().all(|x| x.seq == SeqId(3)));
    assert_eq!(s.reuse_index_mut().cache().metrics().queries, queries);
    assert_eq!(s.stats().load_waits, 1, "one wait, however many steps");
    sample(&mut s, &plan);

    s.complete_load(job.id, LoadResult::Loaded).unwrap();
    let plan = s.step(2);
    assert!(
        plan.loads.is_empty(),
        "the loaded blocks are device hits now"
    );
    let loaded: Vec<u32> = job.blocks.iter().map(|l| l.device.get()).collect();
    for seq in [SeqId(1), SeqId(2)] {
        let i = plan.seqs.iter().position(|x| x.seq == seq).unwrap();
        assert_eq!(plan.seqs[i].positions, 12..14);
        let pages = &plan.kv_indices[plan.kv_indptr[i] as usize..plan.kv_indptr[i + 1] as usize];
        assert_eq!(pages[..3], loaded[..]);
    }
    let stats = s.stats();
    assert_eq!((stats.loads_issued, stats.load_waits), (1, 1), "{stats:?}");
    assert_eq!(s.kv_manager().stats().loaded_blocks, 3);
    sample(&mut s, &plan);
    run_to_idle(&mut s, 3);
}

#[test]
fn a_failed_load_is_recomputed_from_its_last_loaded_block() {
    let tiers = Arc::new(FakeTiers::default());
    let mut s = scheduler(32, &tiers, TierMode::WriteBack);
    let prompt: Vec<u32> = (0..14).collect();
    let keys = keys_of(s.reuse_index_mut(), 0, &prompt);
    tiers.put(&keys);
    s.submit(request(1, 1, prompt, 1)).unwrap();
    let plan = s.step(0);
    let job = plan.loads[0].clone();
    assert!(plan.seqs.is_empty());
    s.complete_load(job.id, LoadResult::Failed { loaded_blocks: 2 })
        .unwrap();
    let plan = s.step(1);
    assert_eq!(plan.seqs[0].positions, 8..14);
    let stats = s.stats();
    assert_eq!((stats.load_failures, stats.tier_tokens), (1, 8));
    assert_eq!(s.kv_manager().stats().loaded_blocks, 2);
    let done = sample(&mut s, &plan);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].cached_tokens, 8);
}

#[test]
fn a_cancelled_loading_sequence_frees_its_blocks_once_the_load_reports() {
    let tiers = Arc::new(FakeTiers::default());
    let mut s = scheduler(16, &tiers, TierMode::WriteBack);
    let prompt: Vec<u32> = (0..14).collect();
    let keys = keys_of(s.reuse_index_mut(), 0, &prompt);
    tiers.put(&keys);
    s.submit(request(1, 1, prompt, 1)).unwrap();
    let plan = s.step(0);
    let job = plan.loads[0].clone();
    s.cancel(SeqId(1)).unwrap();
    assert!(s.is_idle());
    assert_eq!(s.pending_loads(), 1);
    assert_eq!(s.kv_manager().usage().total().in_use, 3);
    // The pool hands out everything else, never a loading block.
    s.submit(request(2, 1, (300..349).collect(), 1)).unwrap();
    let plan = s.step(1);
    assert!(
        plan.kv_indices
            .iter()
            .all(|&b| job.blocks.iter().all(|l| l.device.get() != b))
    );
    sample(&mut s, &plan);
    s.complete_load(job.id, LoadResult::Loaded).unwrap();
    assert_eq!(s.pending_loads(), 0);
    assert_eq!(s.kv_manager().usage().total().in_use, 0);
    assert_eq!(s.stats().loads_completed, 1);
}

#[test]
fn a_request_waiting_on_a_cancelled_load_loads_its_prefix_itself() {
    let tiers = Arc::new(FakeTiers::default());
    let mut s = scheduler(32, &tiers, TierMode::WriteBack);
    let prompt: Vec<u32> = (0..14).collect();
    let keys = keys_of(s.reuse_index_mut(), 0, &prompt);
    tiers.put(&keys);
    s.submit(request(1, 1, prompt.clone(), 2)).unwrap();
    s.submit(request(2, 1, prompt, 2)).unwrap();
    let plan = s.step(0);
    let first = plan.loads[0].clone();
    assert_eq!((first.seq, s.stats().load_waits), (SeqId(1), 1));
    // The loading request goes away: its load will cache nothing, so the one waiting for it
    // is tried again at once and loads the prefix for itself (a second load, not a wait).
    s.cancel(SeqId(1)).unwrap();
    let plan = s.step(1);
    assert_eq!(plan.loads.len(), 1, "{plan:?}");
    let second = plan.loads[0].clone();
    assert_eq!(second.seq, SeqId(2));
    assert_ne!(second.id, first.id);
    assert_eq!((s.stats().loads_issued, s.stats().load_waits), (2, 1));
    s.complete_load(first.id, LoadResult::Loaded).unwrap();
    s.complete_load(second.id, LoadResult::Loaded).unwrap();
    let plan = s.step(2);
    assert_eq!(plan.seqs.len(), 1);
    assert_eq!(plan.seqs[0].positions, 12..14);
    sample(&mut s, &plan);
    run_to_idle(&mut s, 3);
}

#[test]
fn a_loading_sequence_is_never_preempted_and_the_others_work_around_it() {
    let tiers = Arc::new(FakeTiers::default());
    let mut s = scheduler(8, &tiers, TierMode::WriteBack);
    let prompt: Vec<u32> = (0..14).collect();
    let keys = keys_of(s.reuse_index_mut(), 0, &prompt);
    tiers.put(&keys);
    // A standard request that grows to 6 blocks, and a best-effort one whose load holds 3.
    s.submit(request(1, 1, (900..904).collect(), 20)).unwrap();
    s.submit(request(2, 2, prompt, 1)).unwrap();
    let plan = s.step(0);
    assert_eq!(plan.loads.len(), 1);
    let job = plan.loads[0].clone();
    sample(&mut s, &plan);
    let mut t = 1;
    let mut preempted_self = false;
    while !preempted_self {
        let plan = s.step(t);
        assert!(!plan.preempted.contains(&SeqId(2)), "the loading one stays");
        preempted_self = plan.preempted.contains(&SeqId(1));
        sample(&mut s, &plan);
        t += 1;
        assert!(t < 40);
    }
    assert!(s.kv_manager().is_loading(SeqId(2)));
    s.complete_load(job.id, LoadResult::Loaded).unwrap();
    while !s.is_idle() {
        let plan = s.step(t);
        sample(&mut s, &plan);
        t += 1;
        assert!(t < 100, "both finish once the load reported");
    }
    assert_eq!(s.stats().finished, 2);
}

#[test]
fn plans_carry_write_back_offloads_and_later_requests_load_them() {
    let tiers = Arc::new(FakeTiers::default());
    let mut s = scheduler(10, &tiers, TierMode::WriteBack);
    let a: Vec<u32> = (0..14).collect();
    let a_keys = keys_of(s.reuse_index_mut(), 0, &a);
    s.submit(request(1, 1, a.clone(), 1)).unwrap();
    let plan = s.step(0);
    assert!(plan.offloads.is_empty());
    sample(&mut s, &plan);
    // A large request evicts a's cached blocks: the plan writes them back first.
    s.submit(request(2, 1, (700..740).collect(), 1)).unwrap();
    let plan = s.step(1);
    assert_eq!(plan.seqs.len(), 1);
    let offloaded: Vec<StoreKey> = plan.offloads.iter().map(|o| o.key).collect();
    assert_eq!(offloaded.len(), 3, "{:?}", plan.offloads);
    assert!(offloaded.iter().all(|k| a_keys.contains(k)));
    assert_eq!(s.stats().offloaded_blocks, 3);
    // The engine stores them; a's prompt comes back through the tiers.
    tiers.put(&offloaded);
    sample(&mut s, &plan);
    s.submit(request(3, 1, a.clone(), 1)).unwrap();
    let plan = s.step(2);
    assert_eq!(plan.loads.len(), 1);
    assert_eq!(
        plan.loads[0]
            .blocks
            .iter()
            .map(|l| l.key)
            .collect::<Vec<_>>(),
        a_keys
    );
    assert!(tiers.contains(a_keys[0]));
    tiers.remove(a_keys[2]);
    let id = plan.loads[0].id;
    s.complete_load(id, LoadResult::Failed { loaded_blocks: 2 })
        .unwrap();
    let plan = s.step(3);
    assert_eq!(plan.seqs[0].positions, 8..14);
}

#[test]
fn write_through_offloads_of_the_last_step_wait_for_one_more_plan_while_idle() {
    let tiers = Arc::new(FakeTiers::default());
    let mut s = scheduler(16, &tiers, TierMode::WriteThrough);
    let a: Vec<u32> = (0..14).collect();
    let a_keys = keys_of(s.reuse_index_mut(), 0, &a);
    s.submit(request(1, 1, a, 1)).unwrap();
    let plan = s.step(0);
    assert!(plan.offloads.is_empty());
    assert_eq!(s.pending_offloads(), 0);
    let finished = sample(&mut s, &plan);
    assert_eq!(finished.len(), 1);
    // The request is done and the scheduler idle, but its cached blocks are still to be
    // written through: one more (empty) plan carries them.
    assert!(s.is_idle());
    assert_eq!(s.pending_offloads(), a_keys.len());
    let plan = s.step(1);
    assert!(plan.is_empty());
    let offloaded: Vec<StoreKey> = plan.offloads.iter().map(|o| o.key).collect();
    assert_eq!(offloaded, a_keys);
    assert_eq!(s.pending_offloads(), 0);
    assert!(s.step(2).offloads.is_empty());
}

#[test]
fn an_index_that_cannot_name_its_blocks_never_hits_in_the_tiers() {
    /// Tiers that would hold anything.
    #[derive(Debug)]
    struct Everything;
    impl LowerTiers for Everything {
        fn longest_prefix(&self, keys: &[StoreKey]) -> usize {
            keys.len()
        }
    }
    let pool = BlockPool::new(PoolConfig::new(16)).unwrap();
    let cfg = KvManagerConfig {
        block_size: BS,
        session_ttl_ms: None,
    };
    let mut kv = KvManager::new(
        cfg,
        pool,
        DynamicOnly::default(),
        kvc_core::NoReuse { block_size: BS },
    )
    .unwrap()
    .with_tiers(Arc::new(Everything), TierMode::WriteThrough);
    let prompt: Vec<u32> = (0..14).collect();
    kv.open(SeqId(1), owner(0)).unwrap();
    assert_eq!(kv.lookup_prefix(SeqId(1), &prompt, 0).unwrap(), 0);
    assert_eq!(
        kv.load_prefix(SeqId(1), &prompt, 0).unwrap(),
        PrefixLoad::None
    );
    assert_eq!(
        kv.allocate_slots(SeqId(1), ask(14), 0, &mut Vec::new()),
        Ok(SlotGrant::Now)
    );
    kv.cache_blocks(SeqId(1), &prompt, 0).unwrap();
    let mut offloads = Vec::new();
    kv.drain_offloads(&mut offloads);
    assert!(offloads.is_empty());
    assert_eq!(kv.stats().tier_lookups, 0);
}
