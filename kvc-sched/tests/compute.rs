//! The compute reserve inside the scheduler: reserved classes are never starved of step
//! tokens, best-effort work is never starved forever, and a reserved admission preempts
//! best-effort work when a running slot is what it waits for.

use kvc_alloc::{BlockPool, PoolConfig};
use kvc_core::{NoReuse, QosClass, SeqId, TenantId};
use kvc_sched::{
    AdaptiveShare, ClassShare, ComputeReserveConfig, DynamicOnly, Request, Scheduler,
    SchedulerConfig, StepPlan,
};
use proptest::prelude::*;

type Sched = Scheduler<BlockPool, DynamicOnly, NoReuse>;

fn scheduler(
    budget: usize,
    max_running: usize,
    aging_ms: Option<u64>,
    reserve: ComputeReserveConfig,
) -> Sched {
    let cfg = SchedulerConfig {
        block_size: 16,
        max_running,
        max_batch_tokens: budget,
        max_model_len: 4_096,
        num_classes: 3,
        aging_ms,
        ..SchedulerConfig::default()
    };
    // Memory is ample: these tests are about compute.
    let pool = BlockPool::new(PoolConfig::new(20_000)).unwrap();
    Scheduler::new(
        cfg,
        pool,
        DynamicOnly::default(),
        NoReuse { block_size: 16 },
    )
    .unwrap()
    .with_compute_reserve(reserve)
    .unwrap()
}

fn request(id: u64, qos: QosClass, prompt: usize, new: u32, now: u64) -> Request {
    Request {
        id: SeqId(id),
        tenant: TenantId(u32::from(qos.get())),
        qos,
        session: None,
        prompt: vec![1; prompt],
        max_new_tokens: new,
        arrival_ms: now,
    }
}

/// Runs one step at `now` and samples token 7 for every sampling sequence; returns the plan
/// and the sequences that finished.
fn step(s: &mut Sched, now: u64) -> (StepPlan, Vec<SeqId>) {
    let plan = s.step(now);
    let sampled: Vec<_> = plan
        .seqs
        .iter()
        .filter(|q| q.samples)
        .map(|q| (q.seq, 7))
        .collect();
    let done = s.complete_step(&sampled).unwrap();
    (plan, done.into_iter().map(|f| f.seq).collect())
}

fn tokens_of(plan: &StepPlan, class: QosClass) -> usize {
    plan.seqs
        .iter()
        .filter(|q| q.qos == class)
        .map(|q| (q.positions.end - q.positions.start) as usize)
        .sum()
}

#[test]
fn a_critical_prefill_is_not_queued_behind_best_effort_work() {
    let share = ComputeReserveConfig::new(vec![Some(ClassShare::Static { tokens: 256 })]);
    for reserved in [false, true] {
        let mut s = if reserved {
            scheduler(512, 64, None, share.clone())
        } else {
            let cfg = ComputeReserveConfig::new(vec![None]);
            scheduler(512, 64, None, cfg)
        };
        // Best-effort prefills fill the budget.
        for i in 0..8 {
            s.submit(request(i, QosClass::BEST_EFFORT, 2_000, 50, 0))
                .unwrap();
        }
        step(&mut s, 0);
        s.submit(request(100, QosClass::CRITICAL, 200, 5, 1))
            .unwrap();
        let (plan, _) = step(&mut s, 2);
        let critical = tokens_of(&plan, QosClass::CRITICAL);
        if reserved {
            assert_eq!(critical, 200, "the whole critical prompt runs at once");
            assert!(plan.seqs.iter().any(|q| q.seq == SeqId(100) && q.samples));
            let stats = s.compute_reserve().unwrap().stats();
            assert_eq!(stats.reserved_tokens, 200);
            assert!(stats.chunks_shrunk + stats.chunks_deferred > 0);
        } else {
            assert_eq!(
                critical, 0,
                "without a share it waits behind the running prefill"
            );
        }
    }
}

#[test]
fn a_critical_admission_preempts_best_effort_for_a_running_slot() {
    let cfg = ComputeReserveConfig::new(vec![Some(ClassShare::Static { tokens: 128 })]);
    let mut s = scheduler(512, 4, None, cfg);
    for i in 0..4 {
        s.submit(request(i, QosClass::BEST_EFFORT, 32, 100, 0))
            .unwrap();
    }
    step(&mut s, 0);
    assert_eq!(s.num_running(), 4);
    s.submit(request(9, QosClass::CRITICAL, 64, 3, 1)).unwrap();
    let (plan, _) = step(&mut s, 2);
    assert_eq!(plan.preempted.len(), 1);
    assert_eq!(tokens_of(&plan, QosClass::CRITICAL), 64);
    assert_eq!(s.compute_reserve().unwrap().stats().preemptions, 1);
    assert_eq!(s.num_running(), 4);
}

#[test]
fn an_aged_best_effort_sequence_is_not_preempted_for_critical_work() {
    let cfg = ComputeReserveConfig::new(vec![Some(ClassShare::Static { tokens: 128 })]);
    let mut s = scheduler(512, 1, Some(10), cfg);
    s.submit(request(0, QosClass::BEST_EFFORT, 32, 100, 0))
        .unwrap();
    step(&mut s, 0);
    // 20 ms later it has aged two classes: as important as critical work.
    s.submit(request(1, QosClass::CRITICAL, 32, 3, 20)).unwrap();
    let (plan, _) = step(&mut s, 20);
    assert!(plan.preempted.is_empty());
    assert_eq!(tokens_of(&plan, QosClass::CRITICAL), 0);
}

/// One random load: per step, whether a critical and a best-effort request arrive, and their
/// sizes.
fn arrivals() -> impl Strategy<Value = Vec<(bool, bool, usize, u32)>> {
    proptest::collection::vec(
        (any::<bool>(), any::<bool>(), 1usize..400, 1u32..12),
        20..120,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Critical never starved: in every step in which a critical request is live, critical
    /// work runs; and where running slots do not bind, at least as many tokens as its share
    /// holds (its share, within the budget less the floor, or all it has pending).
    #[test]
    fn critical_is_never_starved(
        budget in 32usize..600,
        share_frac in 0.05f64..1.0,
        floor_frac in 0.0f64..0.5,
        max_running in prop_oneof![Just(1_024usize), 2usize..8],
        load in arrivals(),
        adaptive in any::<bool>(),
        live_cap in proptest::option::of(0usize..300),
    ) {
        let floor = ((budget as f64 * floor_frac) as usize).min(budget - 1);
        let share = ((budget as f64 * share_frac) as usize).max(1);
        let class_share = if adaptive {
            // An adaptive share never below `share` tokens.
            ClassShare::Adaptive(AdaptiveShare {
                min_tokens: share,
                initial_tokens: share,
                min_samples: 5,
                ..AdaptiveShare::default()
            })
        } else {
            ClassShare::Static { tokens: share }
        };
        let mut cfg = ComputeReserveConfig::new(vec![Some(class_share)]);
        cfg.best_effort_floor_tokens = floor;
        cfg.best_effort_tokens_while_live = live_cap;
        let mut s = scheduler(budget, max_running, None, cfg);
        // Per live critical request: prompt length and prompt tokens computed.
        let mut live = std::collections::HashMap::new();
        let mut id = 0u64;
        for (t, &(crit, be, prompt, new)) in load.iter().enumerate() {
            let now = t as u64 * 10;
            if crit {
                s.submit(request(id, QosClass::CRITICAL, prompt, new, now)).unwrap();
                live.insert(SeqId(id), (prompt as u64, 0u64));
                id += 1;
            }
            if be {
                s.submit(request(id, QosClass::BEST_EFFORT, prompt * 2, new * 4, now)).unwrap();
                id += 1;
            }
            // Pending: the rest of the prompt, or one decode.
            let pending: u64 = live.values().map(|&(p, c)| if c < p { p - c } else { 1 }).sum();
            let (plan, done) = step(&mut s, now);
            if !live.is_empty() {
                let got = tokens_of(&plan, QosClass::CRITICAL) as u64;
                prop_assert!(got >= 1, "step {t}: critical starved");
                if max_running > load.len() * 2 {
                    let owed = (share.min(budget - floor) as u64).min(pending);
                    prop_assert!(got >= owed, "step {t}: critical got {got}, owed {owed}");
                }
            }
            for q in &plan.seqs {
                if let Some((_, c)) = live.get_mut(&q.seq) {
                    *c = q.positions.end;
                }
            }
            for f in done {
                live.remove(&f);
            }
        }
    }

    /// Best effort never starved forever: under a critical stream that alone exceeds the step
    /// budget, with aging on, every best-effort request still finishes.
    #[test]
    fn best_effort_is_never_starved_forever(
        budget in 32usize..300,
        floor in 1usize..16,
        max_running in 2usize..8,
        be_requests in 1usize..4,
        adaptive in any::<bool>(),
        live_cap in proptest::option::of(0usize..64),
    ) {
        let class_share = if adaptive {
            ClassShare::Adaptive(AdaptiveShare { min_samples: 5, ..AdaptiveShare::default() })
        } else {
            ClassShare::Static { tokens: budget }
        };
        let mut cfg = ComputeReserveConfig::new(vec![Some(class_share)]);
        cfg.best_effort_floor_tokens = floor.min(budget - 1);
        // Critical is live throughout: best effort lives on the floor (and aging).
        cfg.best_effort_tokens_while_live = live_cap;
        let mut s = scheduler(budget, max_running, Some(50), cfg);
        for i in 0..be_requests {
            s.submit(request(1_000_000 + i as u64, QosClass::BEST_EFFORT, 300, 20, 0)).unwrap();
        }
        let mut left = be_requests;
        for t in 0..5_000u64 {
            let now = t * 10;
            // A critical request every step, each more than the budget: overload forever.
            s.submit(request(t, QosClass::CRITICAL, budget + 10, 4, now)).unwrap();
            let (_, done) = step(&mut s, now);
            left -= done.iter().filter(|f| f.get() >= 1_000_000).count();
            if left == 0 {
                break;
            }
        }
        prop_assert_eq!(left, 0, "best-effort requests still unfinished after 5,000 steps");
    }
}
