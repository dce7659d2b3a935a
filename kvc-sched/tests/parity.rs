//! Parity with vLLM v1's prefix caching, one test per behaviour, through the composed
//! [`Scheduler`] (and its [`KvManager`](kvc_sched::KvManager) where the behaviour is about
//! memory alone).

mod support;

use kvc_alloc::{BlockAllocator, BlockPool, PoolConfig};
use kvc_core::{QosClass, SeqId, TenantId};
use kvc_sched::{
    DynamicOnly, Finished, KvManager, KvManagerConfig, Pressure, Request, Scheduler,
    SchedulerConfig, SeqOwner, SlotGrant, SlotRequest, StepPlan,
};
use support::TestIndex;

const BS: u32 = 4;

fn sched(blocks: u64) -> Scheduler<BlockPool, DynamicOnly, TestIndex> {
    let cfg = SchedulerConfig {
        block_size: BS,
        max_batch_tokens: 256,
        max_model_len: 256,
        aging_ms: None,
        ..SchedulerConfig::default()
    };
    let pool = BlockPool::new(PoolConfig::new(blocks)).unwrap();
    Scheduler::new(cfg, pool, DynamicOnly::default(), TestIndex::new(BS)).unwrap()
}

fn request(id: u64, prompt: Vec<u32>, new: u32) -> Request {
    Request {
        id: SeqId(id),
        tenant: TenantId(0),
        qos: QosClass::STANDARD,
        session: None,
        prompt,
        max_new_tokens: new,
        arrival_ms: id,
    }
}

fn complete(
    s: &mut Scheduler<BlockPool, DynamicOnly, TestIndex>,
    plan: &StepPlan,
) -> Vec<Finished> {
    let sampled: Vec<_> = plan
        .seqs
        .iter()
        .filter(|x| x.samples)
        .map(|x| (x.seq, 1_000 + x.positions.end as u32))
        .collect();
    s.complete_step(&sampled).unwrap()
}

fn run(s: &mut Scheduler<BlockPool, DynamicOnly, TestIndex>, from: u64) -> Vec<Finished> {
    let mut done = Vec::new();
    for now in from..from + 500 {
        if s.is_idle() {
            break;
        }
        let plan = s.step(now);
        done.extend(complete(s, &plan));
    }
    done
}

fn manager(blocks: u64) -> KvManager<BlockPool, DynamicOnly, TestIndex> {
    let pool = BlockPool::new(PoolConfig::new(blocks)).unwrap();
    let cfg = KvManagerConfig {
        block_size: BS,
        ..KvManagerConfig::default()
    };
    KvManager::new(cfg, pool, DynamicOnly::default(), TestIndex::new(BS)).unwrap()
}

const OWNER: SeqOwner = SeqOwner {
    tenant: TenantId(0),
    class: QosClass::STANDARD,
    session: None,
};

fn new_tokens(n: u64) -> SlotRequest {
    SlotRequest {
        new_tokens: n,
        ..SlotRequest::default()
    }
}

#[test]
fn a_preempted_request_reuses_its_own_computed_prompt() {
    // 10 blocks of 4: A (12 + 6, 5 blocks) and B (16 + 14, 8 blocks) cannot both run to the
    // end, but A and B's prompt fit together.
    let mut s = sched(10);
    s.submit(request(1, (0..12).collect(), 6)).unwrap();
    s.submit(request(2, (100..116).collect(), 14)).unwrap();
    let done = run(&mut s, 0);
    let b = done.iter().find(|f| f.seq == SeqId(2)).unwrap();
    assert!(b.preemptions > 0);
    assert!(b.cached_tokens >= 16, "B reused {} tokens", b.cached_tokens);
    assert_eq!(done.len(), 2);
}

#[test]
fn a_request_that_cannot_fit_evicts_nothing() {
    let mut kv = manager(8);
    let prompt: Vec<u32> = (0..9).collect();
    kv.open(SeqId(1), OWNER).unwrap();
    assert_eq!(
        kv.allocate_slots(SeqId(1), new_tokens(9), 0, &mut Vec::new())
            .unwrap(),
        SlotGrant::Now
    );
    kv.cache_blocks(SeqId(1), &prompt, 0).unwrap();
    kv.free(SeqId(1)).unwrap(); // 2 evictable
    kv.open(SeqId(9), OWNER).unwrap();
    assert_eq!(
        kv.allocate_slots(SeqId(9), new_tokens(8), 0, &mut Vec::new())
            .unwrap(),
        SlotGrant::Now
    ); // 2 running, 4 free
    kv.open(SeqId(2), OWNER).unwrap();
    let grant = kv
        .allocate_slots(SeqId(2), new_tokens(28), 1, &mut Vec::new())
        .unwrap();
    // The pin policy sees free + evictable (6) and says wait; nothing was evicted.
    assert!(matches!(
        grant,
        SlotGrant::Later(Pressure::Wait { .. } | Pressure::Exhausted { .. })
    ));
    assert_eq!(kv.stats().evicted_blocks, 0);
    assert_eq!(kv.evictable_blocks(), 2);
    // One that fits after eviction evicts exactly what it needs.
    let grant = kv
        .allocate_slots(SeqId(2), new_tokens(20), 1, &mut Vec::new())
        .unwrap();
    assert_eq!(grant, SlotGrant::Now);
    assert_eq!(kv.stats().evicted_blocks, 1);
}

#[test]
fn a_new_request_hits_the_computed_prompt_of_a_running_request() {
    let mut s = sched(32);
    let prompt: Vec<u32> = (0..13).collect();
    s.submit(request(1, prompt.clone(), 20)).unwrap();
    let plan = s.step(0);
    complete(&mut s, &plan); // A's prompt is computed; A keeps running
    let mut longer = prompt.clone();
    longer.extend([77, 78]);
    s.submit(request(2, longer, 2)).unwrap();
    let plan = s.step(1);
    let b = plan.seqs.iter().find(|x| x.seq == SeqId(2)).unwrap();
    assert_eq!(b.positions, 12..15);
    assert!(s.num_running() == 2);
}

#[test]
fn the_last_prompt_token_is_always_computed() {
    let mut s = sched(32);
    let prompt: Vec<u32> = (0..8).collect(); // exactly two blocks
    s.submit(request(1, prompt.clone(), 1)).unwrap();
    run(&mut s, 0);
    s.submit(request(2, prompt, 1)).unwrap();
    let plan = s.step(10);
    assert_eq!(
        plan.seqs[0].positions,
        4..8,
        "one block reused, the last one computed"
    );
    assert!(plan.seqs[0].samples);
}

#[test]
fn blocks_in_use_are_never_evicted() {
    let mut kv = manager(6);
    let prompt: Vec<u32> = (0..9).collect();
    kv.open(SeqId(1), OWNER).unwrap();
    assert_eq!(
        kv.allocate_slots(SeqId(1), new_tokens(9), 0, &mut Vec::new())
            .unwrap(),
        SlotGrant::Now
    );
    kv.cache_blocks(SeqId(1), &prompt, 0).unwrap();
    kv.free(SeqId(1)).unwrap();
    // A second request reads the cached prompt: its blocks are in use again.
    kv.open(SeqId(2), OWNER).unwrap();
    assert_eq!(kv.lookup_prefix(SeqId(2), &prompt, 1).unwrap(), 8);
    let held = kv.blocks(SeqId(2)).unwrap().to_vec();
    assert_eq!(kv.evictable_blocks(), 0);
    assert_eq!(kv.evict(10, 2).unwrap(), 0);
    // Pressure from a third request cannot take them either.
    kv.open(SeqId(3), OWNER).unwrap();
    let grant = kv
        .allocate_slots(SeqId(3), new_tokens(20), 3, &mut Vec::new())
        .unwrap();
    assert!(matches!(grant, SlotGrant::Later(_)));
    for b in held {
        assert_eq!(kv.allocator().refcount(b), Ok(2), "{b}: index and seq 2");
    }
}

// vLLM caches a request's full blocks as its prefill chunks are computed, so a request that
// arrives while an earlier one with the same prefix is still in chunked prefill hits the
// chunks done so far instead of computing them again.
#[test]
fn a_request_hits_the_completed_chunks_of_a_prefill_still_running() {
    let cfg = SchedulerConfig {
        block_size: BS,
        max_batch_tokens: 16,
        max_model_len: 256,
        aging_ms: None,
        ..SchedulerConfig::default()
    };
    let pool = BlockPool::new(PoolConfig::new(32)).unwrap();
    let mut s = Scheduler::new(cfg, pool, DynamicOnly::default(), TestIndex::new(BS)).unwrap();
    let prompt: Vec<u32> = (0..24).collect();
    s.submit(request(1, prompt.clone(), 4)).unwrap();
    let plan = s.step(0);
    assert_eq!(plan.seqs[0].positions, 0..16);
    assert!(!plan.seqs[0].samples, "a prefill chunk");
    assert!(complete(&mut s, &plan).is_empty());
    // The first chunk's 4 blocks are computed: a second request with the same prefix hits them
    // while the first computes its last chunk in the same step.
    let mut longer = prompt.clone();
    longer.push(99);
    s.submit(request(2, longer, 1)).unwrap();
    let plan = s.step(1);
    let a = plan.seqs.iter().find(|x| x.seq == SeqId(1)).unwrap();
    assert_eq!(a.positions, 16..24);
    let b = plan.seqs.iter().find(|x| x.seq == SeqId(2)).unwrap();
    assert_eq!(b.positions, 16..24, "16 tokens reused");
    let done = run(&mut s, 2);
    let b = done.iter().find(|f| f.seq == SeqId(2)).unwrap();
    assert_eq!(b.cached_tokens, 16);
}
