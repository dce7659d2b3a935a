//! Content-checked property tests of the composed system: the real pool (kvc-alloc), pin
//! policy (kvc-pin) and reuse index (kvc-reuse, every eviction policy), driven through
//! [`KvManager`] and through the [`Scheduler`].
//!
//! The test model gives every device block slot a fingerprint of the tokens whose KV was
//! written there (tenant and the whole prefix up to that token), copies fingerprints for
//! copy-on-write and swaps, and after every step checks that every position a sequence reads
//! holds its own KV (so no cache hit ever serves stale KV), that no block is both free and
//! held, that free + evictable + held = capacity per region, and that when everything is done
//! every block is free or evictable.
//!
//! With tiers below device memory, the test engine keeps a store of offloaded blocks (their
//! fingerprints, by key) that loses blocks now and then, executes the plan's offloads first,
//! fills the blocks of each load with poison until the load completes (some steps later), and
//! reports partial loads as failed: a block read before its load completed, or a load that
//! brought back the wrong KV, fails the same read checks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use kvc_alloc::{BlockAllocator, BlockPool, PoolConfig};
use kvc_core::{
    BlockCopy, BlockId, LowerTiers, PinPolicy, QosClass, RegionId, ReuseIndex, ReuseScope, SeqId,
    SessionId, StoreKey, TenantId,
};
use kvc_pin::{
    PinRequest, PinTarget, PinningPolicy, PolicyConfig, Reserve, SoftPinConfig, StaticReserve,
};
use kvc_reuse::{HashExtra, KvEvent, PolicyKind, PrefixCache, ScopedIndex, Xxh3Hasher};
use kvc_sched::{
    KvManager, KvManagerConfig, LoadJob, LoadResult, Request, Scheduler, SchedulerConfig, SeqOwner,
    SessionContext, SlotGrant, SlotRequest, StepPlan, TierMode,
};
use proptest::prelude::*;

const BS: u32 = 4;

/// A reuse index the test can also invalidate wholesale.
trait Index: ReuseIndex {
    fn invalidate_all(&mut self);
}

impl Index for ScopedIndex<Xxh3Hasher> {
    /// Invalidates every chain ever stored (as a document update would), blocks in use
    /// included: those are handed back by eviction once their holders release them.
    fn invalidate_all(&mut self) {
        let mut events = Vec::new();
        self.cache_mut().drain_events(&mut events);
        for record in events {
            if let KvEvent::BlockStored { hashes, .. } = record.event {
                for h in hashes {
                    let _blocks = self.cache_mut().invalidate(h);
                }
            }
        }
    }
}

fn index(policy: PolicyKind) -> ScopedIndex<Xxh3Hasher> {
    let mut cache = PrefixCache::new(BS, policy);
    cache.subscribe();
    ScopedIndex::new(cache, Xxh3Hasher, HashExtra::new("test-model", 1))
}

fn pin_policy(pool_blocks: usize) -> PinningPolicy {
    let soft = SoftPinConfig::new(1 << 10, pool_blocks, 0.25).unwrap();
    PinningPolicy::new(PolicyConfig::new(
        Reserve::Static(StaticReserve::blocks(4)),
        soft,
    ))
    .unwrap()
}

/// Fingerprint of the KV of token `tokens[p]`: the tenant and the whole prefix up to it.
fn fingerprints(tenant: TenantId, tokens: &[u32]) -> Vec<u64> {
    let mut h = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(tenant.get());
    tokens
        .iter()
        .map(|&t| {
            h = (h ^ u64::from(t))
                .wrapping_mul(0x1000_0000_01b3)
                .rotate_left(17);
            h
        })
        .collect()
}

/// The KV a test engine has written: one fingerprint per device slot and per host slot.
#[derive(Default)]
struct Kv {
    device: HashMap<BlockId, Vec<Option<u64>>>,
    host: HashMap<u32, Vec<Option<u64>>>,
}

impl Kv {
    fn write(&mut self, slot: i64, fp: u64) {
        let block = BlockId((slot / i64::from(BS)) as u32);
        let slots = self
            .device
            .entry(block)
            .or_insert_with(|| vec![None; BS as usize]);
        slots[(slot % i64::from(BS)) as usize] = Some(fp);
    }
    fn read(&self, block: BlockId, offset: u64) -> Option<u64> {
        self.device
            .get(&block)?
            .get(offset as usize)
            .copied()
            .flatten()
    }
    fn copy(&mut self, copies: &[BlockCopy]) {
        for c in copies {
            let v = self.device.get(&c.src).cloned().unwrap_or_default();
            self.device.insert(c.dst, v);
        }
    }
}

/// Every position `0..upto` of a sequence with blocks `blocks` reads its own KV.
fn check_reads(
    kv: &Kv,
    blocks: &[BlockId],
    fps: &[u64],
    upto: usize,
    who: &str,
) -> Result<(), TestCaseError> {
    for (p, &fp) in fps.iter().enumerate().take(upto) {
        let b = blocks[p / BS as usize];
        prop_assert_eq!(
            kv.read(b, (p % BS as usize) as u64),
            Some(fp),
            "{} reads stale KV at position {} in {}",
            who,
            p,
            b
        );
    }
    Ok(())
}

/// free + evictable + held = capacity per region; every held block is allocated.
fn check_memory<P: PinPolicy, R: ReuseIndex>(
    kv: &KvManager<BlockPool, P, R>,
    held: &HashSet<BlockId>,
) -> Result<(), TestCaseError> {
    let pool = kv.allocator();
    let mut per_region: BTreeMap<RegionId, usize> = BTreeMap::new();
    for &b in held {
        prop_assert!(pool.refcount(b).is_ok(), "{} is held and free", b);
        *per_region.entry(pool.region_of(b).unwrap()).or_default() += 1;
    }
    let u = kv.usage();
    for (region, r) in [(RegionId::PINNED, u.pinned), (RegionId::DYNAMIC, u.dynamic)] {
        let held = per_region.get(&region).copied().unwrap_or(0);
        prop_assert_eq!(
            r.free + r.evictable + held,
            r.capacity,
            "{}: {:?}, {} held",
            region,
            r,
            held
        );
    }
    pool.audit()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    Ok(())
}

// ---------------------------------------------------------------- through the KvManager

#[derive(Clone, Debug)]
enum Op {
    New {
        prefix: u8,
        extra: u8,
        tenant: u8,
        class: u8,
    },
    Decode {
        pick: u8,
        n: u8,
    },
    /// Two requests of one tenant with the same prefix, both looked up before either is
    /// offered, so both compute it; offered with adoption (or without).
    Twin {
        prefix: u8,
        tenant: u8,
        class: u8,
        adopt: bool,
    },
    Fork {
        pick: u8,
    },
    Preempt {
        pick: u8,
    },
    Free {
        pick: u8,
    },
    KeepSession {
        pick: u8,
        session: u8,
    },
    EndSession {
        session: u8,
    },
    EndConversation {
        pick: u8,
        keep_first: u8,
    },
    Evict {
        n: u8,
    },
    SoftPin {
        hash: u8,
    },
    Invalidate,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 0u8..12, 0u8..2, 0u8..3)
            .prop_map(|(prefix, extra, tenant, class)| Op::New { prefix, extra, tenant, class }),
        6 => (any::<u8>(), 1u8..6).prop_map(|(pick, n)| Op::Decode { pick, n }),
        2 => (0u8..3, 0u8..2, 0u8..3, any::<bool>())
            .prop_map(|(prefix, tenant, class, adopt)| Op::Twin { prefix, tenant, class, adopt }),
        1 => any::<u8>().prop_map(|pick| Op::Fork { pick }),
        1 => any::<u8>().prop_map(|pick| Op::Preempt { pick }),
        2 => any::<u8>().prop_map(|pick| Op::Free { pick }),
        1 => (any::<u8>(), 0u8..3).prop_map(|(pick, session)| Op::KeepSession { pick, session }),
        1 => (0u8..3).prop_map(|session| Op::EndSession { session }),
        1 => (any::<u8>(), 0u8..3)
            .prop_map(|(pick, keep_first)| Op::EndConversation { pick, keep_first }),
        1 => (1u8..6).prop_map(|n| Op::Evict { n }),
        1 => any::<u8>().prop_map(|hash| Op::SoftPin { hash }),
        1 => Just(Op::Invalidate),
    ]
}

struct Live {
    tenant: TenantId,
    class: QosClass,
    tokens: Vec<u32>,
    written: usize,
}

fn prompt(prefix: u8, extra: u8, salt: u64) -> Vec<u32> {
    let mut p: Vec<u32> = (0..10).map(|i| u32::from(prefix) * 1_000 + i).collect();
    p.extend((0..u32::from(extra) + 1).map(|i| 50_000 + (salt as u32) * 100 + i));
    p
}

/// Opens `id` for `owner`, looks `tokens` up (the hit must hold their KV and never cover the
/// last token) and computes the rest into `model`. Returns whether it was admitted; a
/// sequence the pool cannot take now is freed.
fn admit<P: PinPolicy, R: ReuseIndex>(
    kv: &mut KvManager<BlockPool, P, R>,
    model: &mut Kv,
    id: SeqId,
    owner: SeqOwner,
    tokens: &[u32],
    now: u64,
) -> Result<bool, TestCaseError> {
    kv.open(id, owner).unwrap();
    let hit = kv.lookup_prefix(id, tokens, now).unwrap() as usize;
    prop_assert!(hit < tokens.len(), "the last prompt token is computed");
    let fps = fingerprints(owner.tenant, tokens);
    check_reads(model, kv.blocks(id).unwrap(), &fps, hit, "a prefix hit")?;
    let ask = SlotRequest {
        new_tokens: (tokens.len() - hit) as u64,
        lookahead: 0,
        admission: true,
    };
    let mut copies = Vec::new();
    match kv.allocate_slots(id, ask, now, &mut copies).unwrap() {
        SlotGrant::Now => {
            model.copy(&copies);
            for (p, &fp) in fps.iter().enumerate().skip(hit) {
                model.write(kv.slot(id, p as u64).unwrap(), fp);
            }
            Ok(true)
        }
        SlotGrant::Later(_) | SlotGrant::Never(_) => {
            kv.free(id).unwrap();
            Ok(false)
        }
    }
}

fn run_manager(
    ops: &[Op],
    policy: PolicyKind,
    pool_blocks: u64,
) -> Result<kvc_sched::KvStats, TestCaseError> {
    let pool = BlockPool::new(PoolConfig::new(pool_blocks).pinned(4)).unwrap();
    let cfg = KvManagerConfig {
        block_size: BS,
        session_ttl_ms: Some(40),
    };
    let mut kv =
        KvManager::new(cfg, pool, pin_policy(pool_blocks as usize), index(policy)).unwrap();
    let mut model = Kv::default();
    let mut live: BTreeMap<u64, Live> = BTreeMap::new();
    let mut next = 0u64;
    let mut copies = Vec::new();
    for (now, op) in ops.iter().enumerate() {
        let now = now as u64;
        let pick = |live: &BTreeMap<u64, Live>, k: u8| -> Option<u64> {
            (!live.is_empty()).then(|| *live.keys().nth(usize::from(k) % live.len()).unwrap())
        };
        match *op {
            Op::New {
                prefix,
                extra,
                tenant,
                class,
            } => {
                next += 1;
                let id = SeqId(next);
                let l = Live {
                    tenant: TenantId(u32::from(tenant)),
                    class: QosClass(class),
                    tokens: prompt(prefix, extra, next),
                    written: 0,
                };
                let owner = SeqOwner {
                    tenant: l.tenant,
                    class: l.class,
                    session: None,
                };
                if admit(&mut kv, &mut model, id, owner, &l.tokens, now)? {
                    let l = Live {
                        written: l.tokens.len(),
                        ..l
                    };
                    kv.cache_blocks(id, &l.tokens, now).unwrap();
                    live.insert(next, l);
                }
            }
            Op::Decode { pick: k, n } => {
                let Some(key) = pick(&live, k) else { continue };
                let id = SeqId(key);
                let ask = SlotRequest {
                    new_tokens: u64::from(n),
                    lookahead: 1,
                    admission: false,
                };
                copies.clear();
                if kv.allocate_slots(id, ask, now, &mut copies).unwrap() == SlotGrant::Now {
                    model.copy(&copies);
                    let l = live.get_mut(&key).unwrap();
                    for _ in 0..n {
                        let t = (key as u32).wrapping_mul(7) ^ l.tokens.len() as u32;
                        l.tokens.push(t);
                    }
                    let fps = fingerprints(l.tenant, &l.tokens);
                    for (p, &fp) in fps.iter().enumerate().skip(l.written) {
                        model.write(kv.slot(id, p as u64).unwrap(), fp);
                    }
                    l.written = l.tokens.len();
                    kv.cache_blocks(id, &l.tokens, now).unwrap();
                }
            }
            Op::Twin {
                prefix,
                tenant,
                class,
                adopt,
            } => {
                let tenant = TenantId(u32::from(tenant));
                let owner = SeqOwner {
                    tenant,
                    class: QosClass(class),
                    session: None,
                };
                let mut admitted = Vec::new();
                for extra in [2u8, 5] {
                    next += 1;
                    let id = SeqId(next);
                    let tokens = prompt(prefix, extra, next);
                    if admit(&mut kv, &mut model, id, owner, &tokens, now)? {
                        admitted.push((next, tokens));
                    }
                }
                // Both computed before either offers.
                for (key, tokens) in admitted {
                    let id = SeqId(key);
                    if adopt {
                        let before: Vec<BlockId> = kv.blocks(id).unwrap().to_vec();
                        let mut adopted = Vec::new();
                        kv.cache_blocks_adopting(id, &tokens, now, &mut adopted)
                            .unwrap();
                        let after = kv.blocks(id).unwrap();
                        for (i, (b, a)) in before.iter().zip(after).enumerate() {
                            let listed = adopted.iter().find(|x| x.index == i);
                            prop_assert_eq!(
                                listed.map_or(*b, |x| x.cached),
                                *a,
                                "only adopted positions change"
                            );
                        }
                    } else {
                        kv.cache_blocks(id, &tokens, now).unwrap();
                    }
                    let written = tokens.len();
                    live.insert(
                        key,
                        Live {
                            tenant,
                            class: QosClass(class),
                            tokens,
                            written,
                        },
                    );
                }
            }
            Op::Fork { pick: k } => {
                let Some(key) = pick(&live, k) else { continue };
                next += 1;
                kv.fork(SeqId(key), SeqId(next)).unwrap();
                let p = &live[&key];
                let child = Live {
                    tenant: p.tenant,
                    class: p.class,
                    tokens: p.tokens.clone(),
                    written: p.written,
                };
                live.insert(next, child);
            }
            Op::Preempt { pick: k } | Op::Free { pick: k } => {
                let Some(key) = pick(&live, k) else { continue };
                let l = live.remove(&key).unwrap();
                kv.cache_blocks(SeqId(key), &l.tokens[..l.written], now)
                    .unwrap();
                kv.free(SeqId(key)).unwrap();
                if matches!(op, Op::Preempt { .. }) {
                    // Recompute: the same tokens come back and reuse what is still cached.
                    next += 1;
                    let id = SeqId(next);
                    let owner = SeqOwner {
                        tenant: l.tenant,
                        class: l.class,
                        session: None,
                    };
                    kv.open(id, owner).unwrap();
                    let hit = kv.lookup_prefix(id, &l.tokens, now).unwrap() as usize;
                    let fps = fingerprints(l.tenant, &l.tokens);
                    check_reads(
                        &model,
                        kv.blocks(id).unwrap(),
                        &fps,
                        hit,
                        "a preempted request",
                    )?;
                    kv.free(id).unwrap();
                }
            }
            Op::KeepSession { pick: k, session } => {
                let Some(key) = pick(&live, k) else { continue };
                kv.keep_session(SessionId(u64::from(session)), SeqId(key), now)
                    .unwrap();
            }
            Op::EndSession { session } => {
                let _ended = kv.end_session(SessionId(u64::from(session)));
            }
            Op::EndConversation {
                pick: k,
                keep_first,
            } => {
                // The conversation's last request finishes and the application ends it: its
                // own blocks go first at the next eviction, and no later hit may read them
                // wrong (checked at every later lookup).
                let Some(key) = pick(&live, k) else { continue };
                let l = live.remove(&key).unwrap();
                let written = &l.tokens[..l.written];
                kv.cache_blocks(SeqId(key), written, now).unwrap();
                kv.free(SeqId(key)).unwrap();
                let scope = ReuseScope {
                    tenant: l.tenant,
                    session: None,
                };
                let demoted = kv
                    .end_conversation(&scope, written, usize::from(keep_first), now)
                    .unwrap();
                prop_assert!(demoted <= written.len() / BS as usize);
            }
            Op::Evict { n } => {
                let before = kv.usage().total().free;
                let freed = kv.evict(usize::from(n), now).unwrap();
                prop_assert_eq!(
                    kv.usage().total().free,
                    before + freed,
                    "every eviction frees"
                );
            }
            Op::SoftPin { hash } => {
                let hashes = [u64::from(hash)];
                let req = PinRequest {
                    tenant: TenantId(0),
                    target: PinTarget::Blocks(&hashes),
                    priority: 90,
                    ttl_ms: 5,
                    now_ms: now,
                };
                let _granted = kv.pin_policy_mut().pin(&req);
            }
            Op::Invalidate => kv.reuse_index_mut().invalidate_all(),
        }
        kv.expire_sessions(now).unwrap();
        // Every sequence reads its own KV; memory adds up.
        let mut held = HashSet::new();
        for (&key, l) in &live {
            let blocks = kv.blocks(SeqId(key)).unwrap();
            let fps = fingerprints(l.tenant, &l.tokens);
            check_reads(&model, blocks, &fps, l.written, "a running sequence")?;
            held.extend(blocks.iter().copied());
        }
        for s in 0..3 {
            if let Ok(blocks) = kv.session_blocks(SessionId(s)) {
                held.extend(blocks.iter().copied());
            }
        }
        check_memory(&kv, &held)?;
    }
    for key in std::mem::take(&mut live).into_keys() {
        kv.free(SeqId(key)).unwrap();
    }
    for s in 0..3 {
        let _ended = kv.end_session(SessionId(s));
    }
    let total = kv.usage().total();
    prop_assert_eq!(total.in_use, 0, "all done: every block free or evictable");
    check_memory(&kv, &HashSet::new())?;
    Ok(kv.stats())
}

// ---------------------------------------------------------------- through the Scheduler

/// The tiers below device memory as the test engine keeps them: each stored block's
/// fingerprints, by key. The scheduler sees which keys are held.
#[derive(Debug, Default)]
struct TierStore(Mutex<HashMap<StoreKey, Vec<Option<u64>>>>);

impl LowerTiers for TierStore {
    fn longest_prefix(&self, keys: &[StoreKey]) -> usize {
        let held = self.0.lock().unwrap();
        keys.iter().take_while(|k| held.contains_key(k)).count()
    }
}

/// What a block holds while a load into it is in flight: any read of it is a failure.
const POISON: u64 = 0xdead_beef;

/// Tiers under the scheduler: the write mode, and how many steps each load takes.
#[derive(Clone, Copy, Debug)]
struct TierSetup {
    mode: TierMode,
    delay: u64,
}

/// The test engine's loads in flight: each job and the step after which it reports.
#[derive(Default)]
struct Loads {
    in_flight: Vec<(LoadJob, u64)>,
}

impl Loads {
    /// Reports the loads due by `now` (all with `None`): copies what the store still holds,
    /// block by block, and reports a partial load as failed.
    fn complete<A: kvc_core::BlockAllocator, P: PinPolicy, R: ReuseIndex>(
        &mut self,
        now: Option<u64>,
        store: &TierStore,
        model: &mut Kv,
        s: &mut Scheduler<A, P, R>,
    ) -> Result<(), TestCaseError> {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.in_flight)
            .into_iter()
            .partition(|(_, at)| now.is_none_or(|n| *at <= n));
        self.in_flight = later;
        for (job, _) in due {
            let held = store.0.lock().unwrap();
            let mut loaded = 0;
            for l in &job.blocks {
                let Some(v) = held.get(&l.key) else { break };
                model.device.insert(l.device, v.clone());
                loaded += 1;
            }
            drop(held);
            let result = if loaded == job.blocks.len() {
                LoadResult::Loaded
            } else {
                LoadResult::Failed {
                    loaded_blocks: loaded,
                }
            };
            prop_assert_eq!(s.complete_load(job.id, result), Ok(()));
        }
        Ok(())
    }

    fn held(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.in_flight
            .iter()
            .flat_map(|(job, _)| job.blocks.iter().map(|l| l.device))
    }
}

#[derive(Clone, Debug)]
struct Spec {
    qos: u8,
    prefix: u8,
    extra: u8,
    new: u8,
    tenant: u8,
    session: Option<u8>,
    cancel_at: Option<u8>,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        0u8..3,
        0u8..3,
        0u8..16,
        1u8..10,
        0u8..2,
        prop::option::weighted(0.3, 0u8..3),
        prop::option::weighted(0.1, 0u8..30),
    )
        .prop_map(
            |(qos, prefix, extra, new, tenant, session, cancel_at)| Spec {
                qos,
                prefix,
                extra,
                new,
                tenant,
                session,
                cancel_at,
            },
        )
}

fn run_scheduler(
    specs: &[Spec],
    policy: PolicyKind,
    pool_blocks: u64,
    host_blocks: usize,
    invalidate_at: Option<u64>,
    tiers: Option<TierSetup>,
) -> Result<(kvc_sched::SchedStats, kvc_sched::KvStats), TestCaseError> {
    let cfg = SchedulerConfig {
        block_size: BS,
        max_running: 6,
        max_batch_tokens: 48,
        max_model_len: 256,
        aging_ms: Some(20),
        host_blocks,
        session_context: Some(SessionContext { ttl_ms: Some(15) }),
        ..SchedulerConfig::default()
    };
    let pool = BlockPool::new(PoolConfig::new(pool_blocks).pinned(4)).unwrap();
    let mut s = Scheduler::new(cfg, pool, pin_policy(pool_blocks as usize), index(policy)).unwrap();
    let store = Arc::new(TierStore::default());
    if let Some(t) = tiers {
        s = s.with_tiers(Arc::clone(&store) as Arc<dyn LowerTiers>, t.mode);
    }
    let mut loads = Loads::default();
    let mut tokens: HashMap<SeqId, (TenantId, Vec<u32>)> = HashMap::new();
    for (i, sp) in specs.iter().enumerate() {
        let id = SeqId(i as u64);
        let r = Request {
            id,
            tenant: TenantId(u32::from(sp.tenant)),
            qos: QosClass(sp.qos),
            session: sp.session.map(|x| SessionId(u64::from(x))),
            prompt: prompt(sp.prefix, sp.extra, i as u64),
            max_new_tokens: u32::from(sp.new),
            arrival_ms: i as u64,
        };
        tokens.insert(id, (r.tenant, r.prompt.clone()));
        if s.submit(r).is_err() {
            tokens.remove(&id);
        }
    }
    let mut model = Kv::default();
    let mut plan = StepPlan::default();
    let mut now = 0;
    while !s.is_idle() {
        prop_assert!(now < 3_000, "no progress");
        for (i, sp) in specs.iter().enumerate() {
            if sp.cancel_at.map(u64::from) == Some(now) {
                let _cancelled = s.cancel(SeqId(i as u64));
            }
        }
        if invalidate_at == Some(now) {
            s.reuse_index_mut().invalidate_all();
        }
        if now % 5 == 0 {
            // Soft pins come and go (their expiry reaches the index at each step).
            let hashes = [now];
            let req = PinRequest {
                tenant: TenantId(0),
                target: PinTarget::Blocks(&hashes),
                priority: 80,
                ttl_ms: 7,
                now_ms: now,
            };
            let _granted = s.pin_policy_mut().pin(&req);
        }
        s.step_into(now, &mut plan);
        // The engine: offload, swap out, copy, load, swap in, then the batch writes its
        // tokens' KV.
        {
            let mut held = store.0.lock().unwrap();
            for o in &plan.offloads {
                let v = model.device.get(&o.device).cloned().unwrap_or_default();
                held.insert(o.key, v);
            }
            if now % 7 == 6 {
                // The tiers lose a block now and then (evicted, a server lost).
                if let Some(&k) = held.keys().min() {
                    held.remove(&k);
                }
            }
        }
        for p in &plan.swap_out {
            let v = model.device.get(&p.device).cloned().unwrap_or_default();
            model.host.insert(p.host.get(), v);
        }
        model.copy(&plan.copies);
        for job in &plan.loads {
            // A prefix is loaded once: no block a live sequence's load brings in is loaded
            // again (a cancelled sequence's load is not waited for: its blocks stay private).
            for (other, _) in &loads.in_flight {
                if s.seq_blocks(other.seq).is_some() {
                    prop_assert!(
                        job.blocks
                            .iter()
                            .all(|l| other.blocks.iter().all(|o| o.key != l.key)),
                        "{:?} loads a block {:?} brings in",
                        job.id,
                        other.id
                    );
                }
            }
            for l in &job.blocks {
                model
                    .device
                    .insert(l.device, vec![Some(POISON); BS as usize]);
            }
            loads
                .in_flight
                .push((job.clone(), now + tiers.map_or(0, |t| t.delay)));
        }
        for p in &plan.swap_in {
            let v = model.host.get(&p.host.get()).cloned().unwrap_or_default();
            model.device.insert(p.device, v);
        }
        for (i, x) in plan.seqs.iter().enumerate() {
            let (tenant, toks) = &tokens[&x.seq];
            let fps = fingerprints(*tenant, toks);
            let q0 = plan.qo_indptr[i] as usize;
            for (k, p) in (x.positions.start..x.positions.end).enumerate() {
                model.write(plan.slot_mapping[q0 + k], fps[p as usize]);
            }
        }
        // Attention reads every page of every scheduled sequence: all of it is its own KV.
        for (i, x) in plan.seqs.iter().enumerate() {
            let (tenant, toks) = &tokens[&x.seq];
            let fps = fingerprints(*tenant, toks);
            let pages: Vec<BlockId> = plan.kv_indices
                [plan.kv_indptr[i] as usize..plan.kv_indptr[i + 1] as usize]
                .iter()
                .map(|&b| BlockId(b))
                .collect();
            check_reads(
                &model,
                &pages,
                &fps,
                x.positions.end as usize,
                "a scheduled sequence",
            )?;
        }
        let sampled: Vec<_> = plan
            .seqs
            .iter()
            .filter(|x| x.samples)
            .map(|x| (x.seq, 900_000 + x.positions.end as u32))
            .collect();
        for &(seq, t) in &sampled {
            if let Some(entry) = tokens.get_mut(&seq) {
                entry.1.push(t);
            }
        }
        let _finished = s.complete_step(&sampled).unwrap();
        loads.complete(Some(now), &store, &mut model, &mut s)?;
        // Memory adds up: held = blocks of waiting and running sequences, of sessions and of
        // loads in flight (a cancelled sequence's loading blocks stay held until reported).
        let mut held: HashSet<BlockId> = loads.held().collect();
        for id in tokens.keys() {
            if let Some(blocks) = s.seq_blocks(*id) {
                held.extend(blocks.iter().copied());
            }
        }
        for x in 0..3 {
            if let Ok(blocks) = s.kv_manager().session_blocks(SessionId(x)) {
                held.extend(blocks.iter().copied());
            }
        }
        check_memory(s.kv_manager(), &held)?;
        prop_assert_eq!(s.stats().kv_errors, 0);
        now += 1;
    }
    loads.complete(None, &store, &mut model, &mut s)?;
    prop_assert_eq!(s.pending_loads(), 0);
    for x in 0..3 {
        let _ended = s.end_session(SessionId(x));
    }
    prop_assert_eq!(s.kv_manager().usage().total().in_use, 0);
    prop_assert_eq!(s.host_free_blocks(), host_blocks);
    Ok((s.stats(), s.kv_manager().stats()))
}

fn policy() -> impl Strategy<Value = PolicyKind> {
    prop::sample::select(PolicyKind::ALL.to_vec())
}

/// A fixed stream that the random ones generalise: it must exercise every path the checks
/// are about (hits, copy-on-write, eviction, sessions; preemption by swap and recompute).
#[test]
fn the_fixed_streams_exercise_reuse_forks_eviction_and_preemption() {
    let mut ops = Vec::new();
    for i in 0..40u8 {
        ops.push(Op::New {
            prefix: i % 3,
            extra: i % 7,
            tenant: i % 2,
            class: 1 + i % 2,
        });
        ops.push(Op::Decode {
            pick: i,
            n: 1 + i % 5,
        });
        if i % 4 == 0 {
            ops.push(Op::Fork { pick: i });
            ops.push(Op::Decode { pick: i + 1, n: 2 });
        }
        if i % 3 == 0 {
            ops.push(Op::KeepSession {
                pick: i,
                session: i % 3,
            });
            ops.push(Op::Free { pick: i / 2 });
        }
        if i % 5 == 0 {
            ops.push(Op::Preempt { pick: i });
        }
        if i % 6 == 1 {
            ops.push(Op::Invalidate);
            // Class 0 is the reserved one: the others may not hold pinned blocks, so they
            // offer without adopting while the pinned region has blocks.
            ops.push(Op::Twin {
                prefix: i % 3,
                tenant: i % 2,
                class: u8::from(i % 4 != 1),
                adopt: i % 4 == 1,
            });
        }
    }
    let kv = run_manager(&ops, PolicyKind::Lru, 24).unwrap();
    assert!(
        kv.hit_blocks > 0 && kv.cow_copies > 0 && kv.evicted_blocks > 0 && kv.adopted_blocks > 0,
        "{kv:?}"
    );

    let specs: Vec<Spec> = (0..24u8)
        .map(|i| Spec {
            qos: i % 3,
            prefix: i % 3,
            extra: i % 13,
            new: 3 + i % 7,
            tenant: i % 2,
            session: (i % 4 == 0).then_some(i % 3),
            cancel_at: None,
        })
        .collect();
    let (recompute, kv) = run_scheduler(&specs, PolicyKind::Lru, 20, 0, None, None).unwrap();
    assert!(
        recompute.cached_tokens > 0 && recompute.preempted > 0,
        "{recompute:?}"
    );
    assert!(kv.adopted_blocks > 0, "prefixes computed at once: {kv:?}");
    let (swap, _) = run_scheduler(&specs, PolicyKind::Lru, 20, 24, None, None).unwrap();
    assert!(swap.swapped_out > 0 && swap.swapped_in > 0, "{swap:?}");
    for mode in [TierMode::WriteBack, TierMode::WriteThrough] {
        for delay in [0, 2] {
            let tiers = Some(TierSetup { mode, delay });
            let (t, _) = run_scheduler(&specs, PolicyKind::Lru, 20, 0, None, tiers).unwrap();
            assert!(
                t.offloaded_blocks > 0
                    && t.loads_issued > 0
                    && t.loads_completed == t.loads_issued
                    && t.tier_tokens > 0,
                "{mode:?}, delay {delay}: {t:?}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn kv_manager_streams_never_serve_stale_kv_and_account_every_block(
        ops in prop::collection::vec(op(), 1..60),
        policy in policy(),
        pool in 14u64..32,
    ) {
        run_manager(&ops, policy, pool)?;
    }

    #[test]
    fn scheduler_streams_never_serve_stale_kv_and_account_every_block(
        specs in prop::collection::vec(spec(), 1..16),
        policy in policy(),
        pool in 16u64..32,
        host in prop_oneof![Just(0usize), 8usize..40],
        invalidate_at in prop::option::of(0u64..20),
    ) {
        run_scheduler(&specs, policy, pool, host, invalidate_at, None)?;
    }

    #[test]
    fn scheduler_streams_with_tiers_never_read_a_block_before_its_load_completed(
        specs in prop::collection::vec(spec(), 1..16),
        policy in policy(),
        pool in 16u64..32,
        host in prop_oneof![Just(0usize), 8usize..40],
        invalidate_at in prop::option::of(0u64..20),
        write_through in any::<bool>(),
        delay in 0u64..4,
    ) {
        let mode = if write_through { TierMode::WriteThrough } else { TierMode::WriteBack };
        let tiers = Some(TierSetup { mode, delay });
        run_scheduler(&specs, policy, pool, host, invalidate_at, tiers)?;
    }
}
