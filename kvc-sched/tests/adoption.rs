//! Two requests that compute the same prefix at once (both looked it up before either had
//! cached it). Offered with [`KvManager::cache_blocks`], the later request's copies stay
//! private and none of its later blocks is cached, so its next turn recomputes everything
//! past the shared part. With [`KvManager::cache_blocks_adopting`], which the
//! [`Scheduler`] uses, the later request takes the cached copies (its own are freed, its
//! placement given back to the pin policy) and its later blocks are cached after them.

use kvc_alloc::{BlockPool, PoolConfig};
use kvc_core::{QosClass, ReuseIndex, SeqId, TenantId};
use kvc_pin::{PinningPolicy, PolicyConfig, Reserve, SoftPinConfig};
use kvc_reuse::{HashExtra, PolicyKind, PrefixCache, ScopedIndex, Xxh3Hasher};
use kvc_sched::{
    Adopted, DynamicOnly, Finished, KvManager, KvManagerConfig, Request, Scheduler,
    SchedulerConfig, SeqOwner, SlotGrant, SlotRequest, StepPlan,
};

const BS: u32 = 4;

type Index = ScopedIndex<Xxh3Hasher>;

fn index() -> Index {
    let cache = PrefixCache::new(BS, PolicyKind::Lru);
    ScopedIndex::new(cache, Xxh3Hasher, HashExtra::new("m", 1))
}

/// A manager of `blocks` pool blocks with the pin policy of the product (no reserve).
fn manager(blocks: u64) -> KvManager<BlockPool, PinningPolicy, Index> {
    let cfg = KvManagerConfig {
        block_size: BS,
        ..KvManagerConfig::default()
    };
    let pool = BlockPool::new(PoolConfig::new(blocks)).unwrap();
    let soft = SoftPinConfig::new(64, blocks as usize, 0.25).unwrap();
    let pin = PinningPolicy::new(PolicyConfig::new(Reserve::None, soft)).unwrap();
    KvManager::new(cfg, pool, pin, index()).unwrap()
}

fn owner() -> SeqOwner {
    SeqOwner {
        tenant: TenantId(0),
        class: QosClass::STANDARD,
        session: None,
    }
}

/// Opens `seq`, looks `tokens` up and allocates the rest; returns the hit tokens.
fn admit(kv: &mut KvManager<BlockPool, PinningPolicy, Index>, seq: u64, tokens: &[u32]) -> u64 {
    let id = SeqId(seq);
    kv.open(id, owner()).unwrap();
    let hit = kv.lookup_prefix(id, tokens, 0).unwrap();
    let ask = SlotRequest {
        new_tokens: tokens.len() as u64 - hit,
        lookahead: 0,
        admission: true,
    };
    assert_eq!(
        kv.allocate_slots(id, ask, 0, &mut Vec::new()).unwrap(),
        SlotGrant::Now
    );
    hit
}

/// 8 shared blocks, then 2 blocks of `tail` and a partial block.
fn prompt(tail: u32) -> Vec<u32> {
    let mut p: Vec<u32> = (0..32).collect();
    p.extend((0..10).map(|i| tail * 100 + i));
    p
}

#[test]
fn the_later_copy_is_adopted_and_its_own_blocks_are_cached() {
    let mut kv = manager(64);
    let (a, b) = (prompt(1), prompt(2));
    assert_eq!(admit(&mut kv, 1, &a), 0);
    assert_eq!(admit(&mut kv, 2, &b), 0, "both computed the shared prefix");
    let free_before = kv.usage().total().free;
    let placed_before = kv.pin_policy().seq_blocks(SeqId(2)).unwrap().total();
    assert_eq!(kv.cache_blocks(SeqId(1), &a, 1).unwrap(), 10);
    let own: Vec<_> = kv.blocks(SeqId(2)).unwrap().to_vec();
    let mut adopted = Vec::new();
    let cached = kv
        .cache_blocks_adopting(SeqId(2), &b, 1, &mut adopted)
        .unwrap();
    assert_eq!(cached, 2, "the request's own two full blocks are cached");
    let first: Vec<_> = kv.blocks(SeqId(1)).unwrap()[..8].to_vec();
    let want: Vec<Adopted> = (0..8)
        .map(|i| Adopted {
            index: i,
            own: own[i],
            cached: first[i],
        })
        .collect();
    assert_eq!(adopted, want);
    let table = kv.blocks(SeqId(2)).unwrap();
    assert_eq!(&table[..8], &first[..], "the table holds the cached copies");
    assert_eq!(&table[8..], &own[8..], "and its own blocks after them");
    assert_eq!(
        kv.usage().total().free,
        free_before + 8,
        "the copies are freed"
    );
    assert_eq!(kv.stats().adopted_blocks, 8);
    assert_eq!(
        kv.pin_policy().seq_blocks(SeqId(2)).unwrap().total(),
        placed_before - 8,
        "the freed copies' placement is given back"
    );
    // Offering again adopts nothing more.
    adopted.clear();
    assert_eq!(
        kv.cache_blocks_adopting(SeqId(2), &b, 2, &mut adopted)
            .unwrap(),
        0
    );
    assert!(adopted.is_empty());
    kv.free(SeqId(1)).unwrap();
    kv.free(SeqId(2)).unwrap();
    // The next turn of the second conversation hits all its full blocks but the last token's.
    let mut next = b.clone();
    next.extend([7, 7]);
    assert_eq!(admit(&mut kv, 3, &next), 40);
    kv.free(SeqId(3)).unwrap();
    let total = kv.usage().total();
    assert_eq!(total.in_use, 0);
    assert_eq!(total.free + kv.reuse_index().evictable_blocks(), 64);
}

#[test]
fn without_adoption_the_later_copy_stays_private_and_its_tail_uncached() {
    let mut kv = manager(64);
    let (a, b) = (prompt(1), prompt(2));
    admit(&mut kv, 1, &a);
    admit(&mut kv, 2, &b);
    kv.cache_blocks(SeqId(1), &a, 1).unwrap();
    assert_eq!(kv.cache_blocks(SeqId(2), &b, 1).unwrap(), 0);
    kv.free(SeqId(1)).unwrap();
    kv.free(SeqId(2)).unwrap();
    let mut next = b.clone();
    next.extend([7, 7]);
    assert_eq!(admit(&mut kv, 3, &next), 32, "only the shared part hits");
    kv.free(SeqId(3)).unwrap();
}

#[test]
fn a_fork_keeps_the_copy_it_shares() {
    let mut kv = manager(64);
    let (a, b) = (prompt(1), prompt(2));
    admit(&mut kv, 1, &a);
    admit(&mut kv, 2, &b);
    kv.fork(SeqId(2), SeqId(4)).unwrap();
    kv.cache_blocks(SeqId(1), &a, 1).unwrap();
    let own: Vec<_> = kv.blocks(SeqId(2)).unwrap().to_vec();
    let free_before = kv.usage().total().free;
    let mut adopted = Vec::new();
    kv.cache_blocks_adopting(SeqId(2), &b, 1, &mut adopted)
        .unwrap();
    assert_eq!(adopted.len(), 8);
    assert_eq!(
        kv.usage().total().free,
        free_before,
        "the fork still holds them"
    );
    assert_eq!(&kv.blocks(SeqId(4)).unwrap()[..8], &own[..8]);
    // The fork adopts too, and only then are the copies freed.
    adopted.clear();
    kv.cache_blocks_adopting(SeqId(4), &b, 2, &mut adopted)
        .unwrap();
    assert_eq!(adopted.len(), 8);
    assert_eq!(kv.usage().total().free, free_before + 8);
    for seq in [1, 2, 4] {
        kv.free(SeqId(seq)).unwrap();
    }
    assert_eq!(kv.usage().total().in_use, 0);
}

fn scheduler(blocks: u64) -> Scheduler<BlockPool, DynamicOnly, Index> {
    let cfg = SchedulerConfig {
        block_size: BS,
        max_running: 4,
        max_batch_tokens: 128,
        max_model_len: 256,
        ..SchedulerConfig::default()
    };
    let pool = BlockPool::new(PoolConfig::new(blocks)).unwrap();
    Scheduler::new(cfg, pool, DynamicOnly::default(), index()).unwrap()
}

fn request(id: u64, prompt: Vec<u32>, now: u64) -> Request {
    Request {
        id: SeqId(id),
        tenant: TenantId(0),
        qos: QosClass::STANDARD,
        session: None,
        prompt,
        max_new_tokens: 6,
        arrival_ms: now,
    }
}

/// Steps until every request finished; every sampling sequence samples `50 + its id`.
/// Returns the finished requests and the block tables each plan gave them.
fn run(
    sched: &mut Scheduler<BlockPool, DynamicOnly, Index>,
    now: &mut u64,
) -> (Vec<Finished>, Vec<(SeqId, Vec<u32>)>) {
    let (mut done, mut tables) = (Vec::new(), Vec::new());
    let mut plan = StepPlan::default();
    while !sched.is_idle() {
        sched.step_into(*now, &mut plan);
        for (i, s) in plan.seqs.iter().enumerate() {
            let pages = plan.kv_indices[plan.kv_indptr[i] as usize..plan.kv_indptr[i + 1] as usize]
                .to_vec();
            tables.push((s.seq, pages));
        }
        let sampled: Vec<(SeqId, u32)> = plan
            .seqs
            .iter()
            .filter(|s| s.samples)
            .map(|s| (s.seq, 50 + s.seq.get() as u32))
            .collect();
        done.extend(sched.complete_step(&sampled).unwrap());
        *now += 1;
    }
    (done, tables)
}

#[test]
fn through_the_scheduler_the_next_turn_hits_the_whole_context() {
    let mut sched = scheduler(64);
    let mut now = 0;
    sched.submit(request(1, prompt(1), now)).unwrap();
    sched.submit(request(2, prompt(2), now)).unwrap();
    let (done, tables) = run(&mut sched, &mut now);
    assert!(done.iter().all(|f| f.cached_tokens == 0), "{done:?}");
    assert_eq!(sched.kv_manager().stats().adopted_blocks, 8);
    // The plans after the prompt was computed give the second request the first one's blocks.
    let first = &tables.iter().find(|(s, _)| *s == SeqId(1)).unwrap().1[..8];
    let last = &tables.iter().rev().find(|(s, _)| *s == SeqId(2)).unwrap().1;
    assert_eq!(&last[..8], first);
    // The second conversation's next turn: its prompt, its reply, a new message.
    let second = done.iter().find(|f| f.seq == SeqId(2)).unwrap();
    let mut next = prompt(2);
    next.extend(&second.output);
    next.extend([9, 9, 9]);
    let full = (next.len() as u64 - 1) / u64::from(BS) * u64::from(BS);
    sched.submit(request(3, next, now)).unwrap();
    let (done, _) = run(&mut sched, &mut now);
    // Cached: the prompt's full blocks, and the reply's as far as its KV was written (the
    // last sampled token's never is).
    let cached = done[0].cached_tokens;
    assert!(cached > 32, "past the shared part: {cached} of {full}");
    assert_eq!(cached, 44, "the prompt and the reply's written full blocks");
    assert_eq!(sched.kv_manager().usage().total().in_use, 0);
}

#[test]
fn a_class_kept_out_of_the_pinned_region_does_not_adopt_while_it_has_blocks() {
    // (With no pinned region it adopts: the other tests' standard sequences do.)
    use kvc_pin::StaticReserve;
    // A pool with a pinned region reserved for critical traffic.
    let cfg = KvManagerConfig {
        block_size: BS,
        ..KvManagerConfig::default()
    };
    let pool = BlockPool::new(PoolConfig::new(64).pinned(16)).unwrap();
    let soft = SoftPinConfig::new(64, 64, 0.25).unwrap();
    let reserve = Reserve::Static(StaticReserve::blocks(16));
    let pin = PinningPolicy::new(PolicyConfig::new(reserve, soft)).unwrap();
    let mut kv = KvManager::new(cfg, pool, pin, index()).unwrap();
    let (a, b) = (prompt(1), prompt(2));
    for (seq, tokens) in [(1, &a), (2, &b)] {
        assert_eq!(admit(&mut kv, seq, tokens), 0);
    }
    kv.cache_blocks(SeqId(1), &a, 1).unwrap();
    // Standard traffic may not hold pinned blocks: it offers as `cache_blocks` does.
    let mut adopted = Vec::new();
    let own = kv.blocks(SeqId(2)).unwrap().to_vec();
    assert_eq!(
        kv.cache_blocks_adopting(SeqId(2), &b, 1, &mut adopted)
            .unwrap(),
        0
    );
    assert!(adopted.is_empty());
    assert_eq!(kv.blocks(SeqId(2)).unwrap(), &own[..]);
    for seq in [1, 2] {
        kv.free(SeqId(seq)).unwrap();
    }
    assert_eq!(kv.usage().total().in_use, 0);
}
