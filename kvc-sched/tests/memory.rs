//! Memory regressions of the composed scheduler, each reproduced from outside through the
//! public API: evictions that freed nothing, a partial pin grant, and a step taken again
//! before the last one completed. Block size 16, as in the original reports.

mod support;

use kvc_alloc::{BlockAllocator, BlockPool, PoolConfig};
use kvc_core::{
    LoadSample, PinPolicy, PinReleaseError, PlaceRequest, Placement, PoolView, QosClass,
    RegionBlocks, Resize, Retention, RetentionUpdate, ReuseIndex, Route, SeqId, TenantId,
};
use kvc_sched::{
    DynamicOnly, Finished, KvError, Rejection, Request, Scheduler, SchedulerConfig, StepPlan,
};
use support::TestIndex;

const BS: u32 = 16;

fn cfg() -> SchedulerConfig {
    SchedulerConfig {
        block_size: BS,
        max_batch_tokens: 512,
        max_model_len: 1024,
        aging_ms: None,
        ..SchedulerConfig::default()
    }
}

fn request(id: u64, qos: QosClass, prompt: Vec<u32>, new: u32, arrival_ms: u64) -> Request {
    Request {
        id: SeqId(id),
        tenant: TenantId(0),
        qos,
        session: None,
        prompt,
        max_new_tokens: new,
        arrival_ms,
    }
}

fn tokens(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| seed * 100_000 + i).collect()
}

fn sched<P: PinPolicy>(blocks: u64, pin: P) -> Scheduler<BlockPool, P, TestIndex> {
    let pool = BlockPool::new(PoolConfig::new(blocks)).unwrap();
    Scheduler::new(cfg(), pool, pin, TestIndex::new(BS)).unwrap()
}

fn complete<P: PinPolicy, R: ReuseIndex>(
    s: &mut Scheduler<BlockPool, P, R>,
    plan: &StepPlan,
) -> Vec<Finished> {
    let sampled: Vec<_> = plan
        .seqs
        .iter()
        .filter(|x| x.samples)
        .map(|x| (x.seq, 7))
        .collect();
    s.complete_step(&sampled).unwrap()
}

/// Pool of 12: A (48-token prompt P, 60 new) runs; B (160 unrelated tokens) cannot fit and
/// must evict nothing, since P's blocks are in use by A; C (P + 5 tokens) then reuses all
/// 48 tokens of P while A still runs.
#[test]
fn a_request_that_does_not_fit_leaves_a_running_prompt_cached() {
    let mut s = sched(12, DynamicOnly::default());
    let p = tokens(1, 48);
    s.submit(request(1, QosClass::STANDARD, p.clone(), 60, 0))
        .unwrap();
    let plan = s.step(0);
    complete(&mut s, &plan);
    s.submit(request(2, QosClass::STANDARD, tokens(2, 160), 4, 1))
        .unwrap();
    let plan = s.step(1);
    complete(&mut s, &plan);
    assert_eq!(s.num_waiting(), 1, "B cannot fit");
    assert_eq!(s.stats().evicted_blocks, 0, "nothing evictable was evicted");
    assert_eq!(s.reuse_index().cached_blocks(), 3, "P is still cached");

    let mut c = p.clone();
    c.extend(tokens(3, 5));
    s.submit(request(3, QosClass::CRITICAL, c, 2, 2)).unwrap();
    let before = s.stats().cached_tokens;
    let plan = s.step(2);
    let c_sched = plan.seqs.iter().find(|x| x.seq == SeqId(3)).unwrap();
    assert_eq!(
        c_sched.positions,
        48..53,
        "C computes only its 5 new tokens"
    );
    assert_eq!(s.stats().cached_tokens - before, 48);
}

/// Pool of 10: A (32 + 40) and B (64 + 60) outgrow the pool together. B is preempted, and
/// comes back reusing the prompt it had computed instead of recomputing all of it; no
/// eviction ever takes a block a running request holds (the manager asserts it).
#[test]
fn a_preempted_request_comes_back_reusing_its_computed_prompt() {
    let mut s = sched(10, DynamicOnly::default());
    s.submit(request(1, QosClass::STANDARD, tokens(1, 32), 40, 0))
        .unwrap();
    s.submit(request(2, QosClass::STANDARD, tokens(2, 64), 60, 1))
        .unwrap();
    let mut done = Vec::new();
    for now in 0..1_000 {
        if s.is_idle() {
            break;
        }
        let plan = s.step(now);
        done.extend(complete(&mut s, &plan));
    }
    assert!(s.is_idle());
    let b = done.iter().find(|f| f.seq == SeqId(2)).unwrap();
    assert!(b.preemptions >= 1, "the pool is too small for both");
    assert!(
        b.cached_tokens >= 64,
        "B reused {} tokens at readmission",
        b.cached_tokens
    );
    assert_eq!(b.output.len(), 60);
}

/// A request larger than free + evictable blocks waits without evicting anything.
#[test]
fn a_request_that_cannot_fit_even_after_eviction_evicts_nothing() {
    let mut s = sched(10, DynamicOnly::default());
    // A finishes: its 2 prompt blocks stay cached, evictable.
    s.submit(request(1, QosClass::STANDARD, tokens(1, 33), 1, 0))
        .unwrap();
    let plan = s.step(0);
    complete(&mut s, &plan);
    assert!(s.is_idle());
    assert_eq!(s.kv_manager().evictable_blocks(), 2);
    // B runs and holds 6 blocks.
    s.submit(request(2, QosClass::STANDARD, tokens(2, 90), 50, 1))
        .unwrap();
    let plan = s.step(1);
    complete(&mut s, &plan);
    let cached = s.reuse_index().cached_blocks();
    // C needs 5 blocks: 2 free + 2 evictable are not enough.
    s.submit(request(3, QosClass::STANDARD, tokens(3, 70), 2, 2))
        .unwrap();
    let plan = s.step(2);
    assert!(plan.seqs.iter().all(|x| x.seq != SeqId(3)));
    assert_eq!(s.stats().evicted_blocks, 0);
    assert_eq!(s.kv_manager().evictable_blocks(), 2);
    assert_eq!(s.reuse_index().cached_blocks(), cached);
}

/// A pin policy that grants one block fewer than asked.
#[derive(Default)]
struct ShortGrant {
    held: usize,
}

impl PinPolicy for ShortGrant {
    fn place(&mut self, req: &PlaceRequest, _: &PoolView) -> Placement {
        let dynamic = req.blocks.saturating_sub(1).max(1);
        self.held += dynamic;
        Placement::Allocate {
            blocks: RegionBlocks { pinned: 0, dynamic },
            route: Route::Normal,
        }
    }
    fn release(&mut self, _: SeqId, blocks: RegionBlocks) -> Result<(), PinReleaseError> {
        self.held -= blocks.total();
        Ok(())
    }
    fn tick(&mut self, _: &LoadSample<'_>) -> Resize {
        Resize::Hold
    }
    fn retention(&self, _: u64, _: u64) -> Retention {
        Retention::DEFAULT
    }
    fn expire(&mut self, _: u64, _: &mut Vec<RetentionUpdate>) {}
}

/// A partial grant is a typed refusal: no page mapped to block 0, no panic, nothing leaked.
#[test]
fn a_partial_pin_grant_is_a_typed_error_never_block_zero() {
    let mut s = sched(8, ShortGrant::default());
    s.submit(request(1, QosClass::STANDARD, tokens(1, 40), 4, 0))
        .unwrap();
    let plan = s.step(0);
    assert!(plan.seqs.is_empty());
    assert!(matches!(
        plan.rejected.as_slice(),
        [(
            SeqId(1),
            Rejection::Memory(KvError::PlacementMismatch {
                asked: 3,
                granted: 2,
                ..
            })
        )]
    ));
    assert_eq!(
        s.allocator().free_blocks(kvc_core::RegionId::DYNAMIC),
        Ok(8)
    );
    assert_eq!(s.pin_policy().held, 0);
    assert!(s.is_idle());
}

/// A second `step` before `complete_step` forfeits the missing sample: the sequence
/// recomputes its last token in the new plan and still finishes, holding nothing after.
#[test]
fn stepping_again_without_completing_recomputes_instead_of_sticking() {
    let mut s = sched(8, DynamicOnly::default());
    s.submit(request(1, QosClass::STANDARD, tokens(1, 40), 3, 0))
        .unwrap();
    let first = s.step(0);
    assert_eq!(first.seqs[0].positions, 0..40);
    let second = s.step(1); // the engine lost the first plan's result
    assert_eq!(second.seqs.len(), 1);
    assert_eq!(second.seqs[0].positions, 39..40);
    assert!(second.seqs[0].samples);
    // The same slot is written again: the forfeited token's block is reused, not leaked.
    assert_eq!(first.slot_mapping[39], second.slot_mapping[0]);
    let mut done = complete(&mut s, &second);
    for now in 2..20 {
        if s.is_idle() {
            break;
        }
        let plan = s.step(now);
        done.extend(complete(&mut s, &plan));
    }
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].output.len(), 3);
    assert_eq!(
        s.allocator().stats().used(),
        s.reuse_index().cached_blocks()
    );
}

/// A `Downgrade` cap lasts only as long as the pin policy keeps it: once memory recovers the
/// policy lifts it, and the capped best-effort requests are served. (The scheduler used to keep
/// its own copy of the cap, which never lifted: a cap halved to zero stopped the class for
/// good.) Pool of 12: two best-effort requests grow until standard requests find no memory;
/// the policy caps best-effort at one running sequence, then at zero.
#[test]
fn a_downgraded_class_is_served_again_once_memory_recovers() {
    use kvc_pin::{
        OnExhausted, PinningPolicy, PolicyConfig, Reserve, SoftPinConfig, StaticReserve,
    };

    let soft = SoftPinConfig::new(1024, 12, 0.05).unwrap();
    let mut config = PolicyConfig::new(Reserve::Static(StaticReserve::blocks(0)), soft);
    config.on_exhausted = OnExhausted::Downgrade;
    let mut s = sched(12, PinningPolicy::new(config).unwrap());
    for i in 0..2 {
        s.submit(request(
            i,
            QosClass::BEST_EFFORT,
            tokens(i as u32 + 1, 64),
            100,
            0,
        ))
        .unwrap();
    }
    let mut finished = 0;
    let mut now = 0;
    for step in 0..5_000 {
        if step == 3 {
            for i in 2..4 {
                s.submit(request(
                    i,
                    QosClass::STANDARD,
                    tokens(i as u32 + 1, 64),
                    40,
                    now,
                ))
                .unwrap();
            }
        }
        if step > 3 && s.num_waiting() == 0 && s.num_running() == 0 {
            break;
        }
        let plan = s.step(now);
        finished += complete(&mut s, &plan).len();
        now += 10;
    }
    assert!(
        s.pin_policy().stats().downgrades > 0,
        "the standard requests found no memory and best-effort was downgraded"
    );
    assert_eq!(
        finished, 4,
        "every capped request is served once the cap lifts"
    );
}
