//! [`KvManager`] names each block of a sequence once. It hashes each block once: the keys
//! named at the lookup serve the tier lookup and every later offer, and only blocks past them
//! are hashed (checked with a hasher that counts its calls, and, since kept keys must never
//! outlive what they name, against tokens that change between calls and a tenant salt that
//! changes under a sequence). And it offers each request's prompt to the eviction policy
//! once: a prefix loaded from the tiers and the reply are more blocks of the same request
//! (checked with a policy that records what it is told).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kvc_alloc::{BlockPool, PoolConfig};
use kvc_core::{BlockId, LowerTiers, QosClass, ReuseIndex, ReuseScope, SeqId, StoreKey, TenantId};
use kvc_reuse::{
    Access, BlockHash, BlockHasher, BlockInfo, EvictionPolicy, HashExtra, Lru, PolicyKind,
    PrefixCache, ScopedIndex, Xxh3Hasher,
};
use kvc_sched::{
    DynamicOnly, Finished, KvManager, KvManagerConfig, LoadResult, Request, Scheduler,
    SchedulerConfig, SeqOwner, SlotGrant, SlotRequest, StepPlan, TierMode,
};

const BS: u32 = 4;

/// XXH3 chaining that counts the blocks it hashes.
#[derive(Clone, Debug, Default)]
struct Counting(Arc<AtomicUsize>);

impl Counting {
    fn hashed(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

impl BlockHasher for Counting {
    fn name(&self) -> &'static str {
        "counting-xxh3"
    }
    fn root(&self, extra: &HashExtra) -> BlockHash {
        Xxh3Hasher.root(extra)
    }
    fn chain(&self, parent: BlockHash, tokens: &[u32]) -> BlockHash {
        self.0.fetch_add(1, Ordering::Relaxed);
        Xxh3Hasher.chain(parent, tokens)
    }
}

type Manager = KvManager<BlockPool, DynamicOnly, ScopedIndex<Counting>>;

/// An LRU index whose hasher counts the blocks it hashes.
fn counting_index() -> (ScopedIndex<Counting>, Counting) {
    let hasher = Counting::default();
    let cache = PrefixCache::new(BS, PolicyKind::Lru);
    let index = ScopedIndex::new(cache, hasher.clone(), HashExtra::new("m", 1));
    (index, hasher)
}

/// A manager of `blocks` pool blocks over `index`.
fn manager_over<R: ReuseIndex>(index: R, blocks: u64) -> KvManager<BlockPool, DynamicOnly, R> {
    let cfg = KvManagerConfig {
        block_size: BS,
        ..KvManagerConfig::default()
    };
    let pool = BlockPool::new(PoolConfig::new(blocks)).unwrap();
    KvManager::new(cfg, pool, DynamicOnly::default(), index).unwrap()
}

fn manager(blocks: u64) -> (Manager, Counting) {
    let (index, hasher) = counting_index();
    (manager_over(index, blocks), hasher)
}

/// A scheduler of `blocks` pool blocks over `index`.
fn scheduler<R: ReuseIndex>(index: R, blocks: u64) -> Scheduler<BlockPool, DynamicOnly, R> {
    let cfg = SchedulerConfig {
        block_size: BS,
        max_running: 4,
        max_batch_tokens: 64,
        max_model_len: 256,
        ..SchedulerConfig::default()
    };
    let pool = BlockPool::new(PoolConfig::new(blocks)).unwrap();
    Scheduler::new(cfg, pool, DynamicOnly::default(), index).unwrap()
}

/// One scheduler step at `now`: every sampling sequence samples `50 + its id`.
fn step<R: ReuseIndex>(
    sched: &mut Scheduler<BlockPool, DynamicOnly, R>,
    now: u64,
    plan: &mut StepPlan,
) -> Vec<Finished> {
    sched.step_into(now, plan);
    let sampled: Vec<(SeqId, u32)> = plan
        .seqs
        .iter()
        .filter(|s| s.samples)
        .map(|s| (s.seq, 50 + s.seq.get() as u32))
        .collect();
    sched.complete_step(&sampled).unwrap()
}

fn owner(tenant: u32) -> SeqOwner {
    SeqOwner {
        tenant: TenantId(tenant),
        class: QosClass::STANDARD,
        session: None,
    }
}

fn grow<R: ReuseIndex>(kv: &mut KvManager<BlockPool, DynamicOnly, R>, seq: u64, tokens: u64) {
    let ask = SlotRequest {
        new_tokens: tokens,
        lookahead: 0,
        admission: false,
    };
    let grant = kv.allocate_slots(SeqId(seq), ask, 0, &mut Vec::new());
    assert_eq!(grant.unwrap(), SlotGrant::Now);
}

/// Opens `seq` for `tenant`, looks `prompt` up and assigns slots for the rest of it.
fn prefill<R: ReuseIndex>(
    kv: &mut KvManager<BlockPool, DynamicOnly, R>,
    seq: u64,
    tenant: u32,
    prompt: &[u32],
) -> u64 {
    kv.open(SeqId(seq), owner(tenant)).unwrap();
    let hit = kv.lookup_prefix(SeqId(seq), prompt, 0).unwrap();
    grow(kv, seq, prompt.len() as u64 - hit);
    hit
}

/// The blocks another sequence of `tenant` hits for `prompt` (it is freed again).
fn hit_blocks(kv: &mut Manager, tenant: u32, prompt: &[u32]) -> Vec<BlockId> {
    let probe = SeqId(9_999);
    kv.open(probe, owner(tenant)).unwrap();
    kv.lookup_prefix(probe, prompt, 0).unwrap();
    let blocks = kv.blocks(probe).unwrap().to_vec();
    kv.free(probe).unwrap();
    blocks
}

#[test]
fn a_request_hashes_each_block_once_from_lookup_to_its_last_offer() {
    let (mut kv, hasher) = manager(64);
    // 10 full blocks and 2 tokens: the lookup names 10 blocks, the prompt's offer no more.
    let prompt: Vec<u32> = (0..42).collect();
    assert_eq!(prefill(&mut kv, 1, 0, &prompt), 0);
    assert_eq!(hasher.hashed(), 10);
    assert_eq!(kv.cache_blocks(SeqId(1), &prompt, 0).unwrap(), 10);
    assert_eq!(hasher.hashed(), 10, "the offer reuses the lookup's keys");
    // Six tokens decoded: blocks 10 and 11 fill, and only they are hashed.
    let mut tokens = prompt.clone();
    tokens.extend(1_000..1_006);
    grow(&mut kv, 1, 6);
    assert_eq!(kv.cache_blocks(SeqId(1), &tokens, 0).unwrap(), 2);
    assert_eq!(hasher.hashed(), 12);
    // A fork starts from its parent's keys: its offer of a new block hashes one block.
    kv.fork(SeqId(1), SeqId(2)).unwrap();
    let mut child = tokens.clone();
    child.extend(2_000..2_004);
    grow(&mut kv, 2, 4);
    assert_eq!(kv.cache_blocks(SeqId(2), &child, 0).unwrap(), 1);
    assert_eq!(hasher.hashed(), 13);
    // What was cached is what the tokens name: another request hits every block but the
    // one holding its last token, in the offering sequences' blocks.
    let hit = hit_blocks(&mut kv, 0, &child);
    assert_eq!(hit.len(), 12);
    assert_eq!(hit, kv.blocks(SeqId(2)).unwrap()[..12]);
    assert_eq!(hit[..12], kv.blocks(SeqId(1)).unwrap()[..12]);
}

#[test]
fn an_offer_of_other_tokens_than_the_lookups_caches_the_tokens_offered() {
    // The same calls on two managers, one of which saw a lookup of other tokens first.
    let seen: Vec<u32> = (0..32).collect();
    let offered: Vec<u32> = (0..20).chain(500..512).collect(); // differs from block 5 on
    let (mut plain, _) = manager(32);
    let (mut kept, hasher) = manager(32);
    plain.open(SeqId(1), owner(0)).unwrap();
    grow(&mut plain, 1, 32);
    assert_eq!(prefill(&mut kept, 1, 0, &seen), 0);
    assert_eq!(hasher.hashed(), 8);
    for kv in [&mut plain, &mut kept] {
        assert_eq!(kv.cache_blocks(SeqId(1), &offered, 0).unwrap(), 8);
    }
    assert_eq!(hasher.hashed(), 8 + 3, "blocks 5 to 7 keyed again");
    for kv in [&mut plain, &mut kept] {
        let own = kv.blocks(SeqId(1)).unwrap().to_vec();
        let probe: Vec<u32> = offered.iter().copied().chain([7]).collect();
        assert_eq!(hit_blocks(kv, 0, &probe), own);
        assert_eq!(hit_blocks(kv, 0, &seen), own[..5]);
    }
}

#[test]
fn a_new_salt_under_a_running_request_is_not_bypassed_by_its_kept_keys() {
    let (mut kv, _) = manager(64);
    // Tenants 1 and 2 share a salt, then tenant 1 is given its own while a request runs.
    kv.reuse_index_mut().set_salt(TenantId(1), *b"team");
    kv.reuse_index_mut().set_salt(TenantId(2), *b"team");
    let prompt: Vec<u32> = (0..17).collect();
    prefill(&mut kv, 1, 1, &prompt);
    kv.reuse_index_mut().set_salt(TenantId(1), *b"solo");
    assert_eq!(kv.cache_blocks(SeqId(1), &prompt, 0).unwrap(), 4);
    // Cached under tenant 1's new salt: tenant 2 sees none of it, tenant 1 all of it.
    assert!(hit_blocks(&mut kv, 2, &prompt).is_empty());
    assert_eq!(
        hit_blocks(&mut kv, 1, &prompt),
        kv.blocks(SeqId(1)).unwrap()[..4]
    );
}

/// Tiers holding a set of keys.
#[derive(Debug, Default)]
struct Held(Mutex<HashSet<StoreKey>>);

impl LowerTiers for Held {
    fn longest_prefix(&self, keys: &[StoreKey]) -> usize {
        let held = self.0.lock().unwrap();
        keys.iter().take_while(|k| held.contains(k)).count()
    }
}

#[test]
fn a_load_from_the_tiers_names_its_blocks_with_the_lookups_keys() {
    let (kv, hasher) = manager(32);
    let tiers = Arc::new(Held::default());
    let mut kv = kv.with_tiers(tiers.clone(), TierMode::WriteBack);
    let prompt: Vec<u32> = (0..26).collect(); // 6 full blocks; 6 usable
    let scope = ReuseScope {
        tenant: TenantId(0),
        session: None,
    };
    let mut keys = Vec::new();
    kv.reuse_index_mut().block_keys(&scope, &prompt, &mut keys);
    tiers.0.lock().unwrap().extend(keys[..4].iter().copied());
    let before = hasher.hashed();
    kv.open(SeqId(1), owner(0)).unwrap();
    assert_eq!(kv.lookup_prefix(SeqId(1), &prompt, 0).unwrap(), 0);
    let job = kv.load_prefix(SeqId(1), &prompt, 0).unwrap().started();
    let job = job.expect("the tiers hold 4 blocks");
    let loaded: Vec<StoreKey> = job.blocks.iter().map(|b| b.key).collect();
    assert_eq!(loaded, keys[..4]);
    let done = kv.complete_load(job.id, LoadResult::Loaded).unwrap();
    assert_eq!(done.computed, Some(16));
    grow(&mut kv, 1, 10);
    assert_eq!(kv.cache_blocks(SeqId(1), &prompt, 0).unwrap(), 2);
    assert_eq!(
        hasher.hashed() - before,
        6,
        "each of the 6 blocks hashed once"
    );
    assert_eq!(
        hit_blocks(&mut kv, 0, &prompt),
        kv.blocks(SeqId(1)).unwrap()[..6]
    );
}

#[test]
fn a_request_waiting_for_memory_is_not_hashed_again_at_every_try() {
    let (index, hasher) = counting_index();
    let mut sched = scheduler(index, 16);
    let request = |id: u64, len: u32, new: u32| Request {
        id: SeqId(id),
        tenant: TenantId(0),
        qos: QosClass::STANDARD,
        session: None,
        prompt: (0..len).map(|t| t + 1_000 * id as u32).collect(),
        max_new_tokens: new,
        arrival_ms: id,
    };
    // The first request takes 10 of the 16 blocks and grows; the second needs 9.
    sched.submit(request(1, 40, 20)).unwrap();
    sched.submit(request(2, 36, 4)).unwrap();
    let mut plan = StepPlan::default();
    let mut finished = Vec::new();
    let mut tries = 0;
    for now in 0..200 {
        let done = step(&mut sched, now, &mut plan);
        if !plan.seqs.iter().any(|s| s.seq == SeqId(2)) && finished.is_empty() {
            tries += 1;
        }
        finished.extend(done);
        if finished.len() == 2 {
            break;
        }
    }
    assert_eq!(finished.len(), 2);
    assert!(tries > 10, "the second request waited {tries} steps");
    // Each full block of what was computed hashed once: the first request's 59 computed
    // tokens (40 prompt, 19 of its 20 sampled) fill 14 blocks, the second's 39 fill 9.
    assert_eq!(hasher.hashed(), 14 + 9);
}

/// What an eviction policy was told, per call: the block's depth and the kind of access.
type Told = Arc<Mutex<Vec<(&'static str, u32, Access)>>>;

/// LRU behind the policy trait that records what the cache tells it.
#[derive(Debug)]
struct Recording {
    lru: Lru,
    told: Told,
}

impl EvictionPolicy for Recording {
    fn name(&self) -> &'static str {
        "recording"
    }
    fn on_insert(&mut self, slot: u32, info: &BlockInfo) {
        self.told
            .lock()
            .unwrap()
            .push(("insert", info.depth, info.access));
        self.lru.on_insert(slot, info);
    }
    fn on_hit(&mut self, slot: u32, info: &BlockInfo) {
        self.told
            .lock()
            .unwrap()
            .push(("hit", info.depth, info.access));
        self.lru.on_hit(slot, info);
    }
    fn on_release(&mut self, slot: u32, stamp: u64) {
        self.lru.on_release(slot, stamp);
    }
    fn on_evictable(&mut self, slot: u32) {
        self.lru.on_evictable(slot);
    }
    fn on_unevictable(&mut self, slot: u32) {
        self.lru.on_unevictable(slot);
    }
    fn on_remove(&mut self, slot: u32) {
        self.lru.on_remove(slot);
    }
    fn pop_victim(&mut self) -> Option<u32> {
        self.lru.pop_victim()
    }
}

/// How many blocks the policy was told of as more of a request (`Access::More`).
fn more_count(told: &Told) -> usize {
    let told = told.lock().unwrap();
    told.iter().filter(|t| t.2 == Access::More).count()
}

/// The lengths of the prompt walks the policy saw: runs of `Access::Insert` from depth 0.
fn walks(told: &Told) -> Vec<usize> {
    let told = told.lock().unwrap();
    let mut walks = Vec::new();
    for &(_, depth, access) in told.iter() {
        if access != Access::Insert {
            continue;
        }
        if depth == 0 {
            walks.push(0);
        }
        if let Some(last) = walks.last_mut() {
            assert_eq!(*last, depth as usize, "a walk skipped a block: {told:?}");
            *last += 1;
        }
    }
    walks
}

/// An index over a cache whose policy records what it is told.
fn recording_index() -> (ScopedIndex<Xxh3Hasher>, Told) {
    let told = Told::default();
    let policy = Recording {
        lru: Lru::default(),
        told: told.clone(),
    };
    let cache = PrefixCache::with_policy(BS, Box::new(policy));
    let index = ScopedIndex::new(cache, Xxh3Hasher, HashExtra::new("m", 1));
    (index, told)
}

#[test]
fn the_scheduler_shows_a_learning_policy_each_prompt_once() {
    let (index, told) = recording_index();
    let mut sched = scheduler(index, 64);
    // A conversation's two turns: the second prompt is the first with its reply and more.
    let first: Vec<u32> = (0..22).collect();
    let turn = |id: u64, prompt: Vec<u32>| Request {
        id: SeqId(id),
        tenant: TenantId(0),
        qos: QosClass::STANDARD,
        session: None,
        prompt,
        max_new_tokens: 9,
        arrival_ms: id,
    };
    sched.submit(turn(1, first.clone())).unwrap();
    let mut plan = StepPlan::default();
    let mut done = Vec::new();
    let mut now = 0;
    let mut run = |sched: &mut Scheduler<_, _, _>, done: &mut Vec<_>| {
        while done.is_empty() {
            now += 1;
            done.extend(step(sched, now, &mut plan));
        }
    };
    run(&mut sched, &mut done);
    let reply = done[0].output.clone();
    assert_eq!(walks(&told), [5], "the first prompt's 5 full blocks, once");
    // Its reply's blocks were cached too, as more of the same request.
    let more = more_count(&told);
    assert_eq!(more, 2, "blocks 5 and 6 of 30 computed tokens");
    let mut second = first;
    second.extend(&reply);
    second.extend(100..110);
    done.clear();
    sched.submit(turn(2, second.clone())).unwrap();
    run(&mut sched, &mut done);
    // The second turn hits the first's 7 cached blocks and walks its prompt once.
    assert_eq!(done[0].cached_tokens, 28);
    assert_eq!(walks(&told), [5, second.len() / BS as usize]);
}

#[test]
fn a_prefix_loaded_from_the_tiers_is_not_a_prompt_of_its_own() {
    let (index, told) = recording_index();
    let tiers = Arc::new(Held::default());
    let mut kv = manager_over(index, 32).with_tiers(tiers.clone(), TierMode::WriteBack);
    let prompt: Vec<u32> = (0..26).collect();
    let scope = ReuseScope {
        tenant: TenantId(0),
        session: None,
    };
    let mut keys = Vec::new();
    kv.reuse_index_mut().block_keys(&scope, &prompt, &mut keys);
    tiers.0.lock().unwrap().extend(keys[..4].iter().copied());
    kv.open(SeqId(1), owner(0)).unwrap();
    assert_eq!(kv.lookup_prefix(SeqId(1), &prompt, 0).unwrap(), 0);
    let job = kv
        .load_prefix(SeqId(1), &prompt, 0)
        .unwrap()
        .started()
        .unwrap();
    kv.complete_load(job.id, LoadResult::Loaded).unwrap();
    // The loaded blocks are cached as more of the request, not walked as a prompt.
    assert!(walks(&told).is_empty());
    grow(&mut kv, 1, 10);
    assert_eq!(kv.cache_blocks(SeqId(1), &prompt, 0).unwrap(), 2);
    // The prompt, once computed, is walked whole: the 4 loaded blocks and the 2 computed.
    assert_eq!(walks(&told), [6]);
    let more = more_count(&told);
    assert_eq!(more, 4);
}

#[test]
fn a_request_freed_and_opened_again_is_one_request_and_a_reused_id_another() {
    let (index, told) = recording_index();
    let mut kv = manager_over(index, 32);
    let prompt: Vec<u32> = (0..18).collect();
    let serve = |kv: &mut KvManager<_, _, _>, tokens: &[u32]| {
        prefill(kv, 1, 0, tokens);
        kv.cache_blocks(SeqId(1), tokens, 0).unwrap();
        kv.free(SeqId(1)).unwrap();
    };
    serve(&mut kv, &prompt);
    assert_eq!(walks(&told), [4]);
    // Preempted after its prompt was offered, readmitted under its id: the same request.
    serve(&mut kv, &prompt);
    assert_eq!(walks(&told), [4]);
    // The id given to another request (other tokens): a request of its own.
    let other: Vec<u32> = (100..110).collect();
    serve(&mut kv, &other);
    assert_eq!(walks(&told), [4, 2]);
}
