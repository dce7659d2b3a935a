//! Placement, degradation, exhaustion responses, tenant quotas and swapping policies behind the
//! `PinPolicy` trait, on hand-built pool views.

use kvc_core::{
    ClassBlocks, LoadSample, PinPolicy, PinReleaseError, PlaceRequest, Placement, PoolView,
    QosClass, QosClasses, Refusal, RegionBlocks, Resize, Retention, Route, SeqId, TenantId,
    WaitReason,
};
use kvc_pin::{
    AdaptiveConfig, AdaptiveReserve, OnExhausted, OverQuota, PinRequest, PinTarget, PinningPolicy,
    PolicyConfig, PolicyConfigError, Reserve, SoftPinConfig, StaticReserve,
};

const CRIT: QosClass = QosClass::CRITICAL;
const STD: QosClass = QosClass::STANDARD;
const BE: QosClass = QosClass::BEST_EFFORT;

fn soft() -> SoftPinConfig {
    SoftPinConfig::new(1 << 20, 100, 0.1).unwrap()
}

fn policy(configure: impl FnOnce(&mut PolicyConfig)) -> PinningPolicy {
    let mut c = PolicyConfig::new(Reserve::Static(StaticReserve::blocks(20)), soft());
    configure(&mut c);
    PinningPolicy::new(c).unwrap()
}

fn view(pinned: usize, pinned_free: usize, dynamic: usize, dynamic_free: usize) -> PoolView {
    PoolView {
        pinned_capacity: pinned,
        pinned_free,
        dynamic_capacity: dynamic,
        dynamic_free,
    }
}

fn req(seq: u64, tenant: u32, class: QosClass, blocks: usize) -> PlaceRequest {
    PlaceRequest {
        seq: SeqId(seq),
        tenant: TenantId(tenant),
        class,
        blocks,
        now_ms: 0,
    }
}

fn alloc(pinned: usize, dynamic: usize, route: Route) -> Placement {
    Placement::Allocate {
        blocks: RegionBlocks { pinned, dynamic },
        route,
    }
}

#[test]
fn low_classes_never_take_pinned_blocks_even_when_pinned_is_idle() {
    let mut p = policy(|_| {});
    let pool = view(20, 20, 80, 5);
    assert_eq!(
        p.place(&req(1, 1, STD, 5), &pool),
        alloc(0, 5, Route::Normal)
    );
    // Dynamic has nothing left; pinned is all free, but not for standard traffic.
    assert_eq!(
        p.place(&req(2, 1, BE, 1), &view(20, 20, 80, 0)),
        Placement::Wait {
            reason: WaitReason::Exhausted
        }
    );
    assert_eq!(
        p.class_blocks(STD),
        RegionBlocks {
            pinned: 0,
            dynamic: 5
        }
    );
    assert_eq!(p.class_running(STD), 1);
    // Nor may they reuse cached blocks of the pinned region.
    assert!(p.may_hold_pinned(CRIT));
    assert!(!p.may_hold_pinned(STD));
    assert!(!p.may_hold_pinned(BE));
    let none = PinningPolicy::new(PolicyConfig::unpinned(soft())).unwrap();
    assert!(!none.may_hold_pinned(CRIT));
}

#[test]
fn critical_uses_pinned_then_borrows_from_dynamic() {
    let mut p = policy(|_| {});
    assert_eq!(
        p.place(&req(1, 1, CRIT, 4), &view(20, 10, 80, 80)),
        alloc(4, 0, Route::Normal)
    );
    assert_eq!(
        p.place(&req(2, 1, CRIT, 10), &view(20, 6, 80, 80)),
        alloc(6, 4, Route::Borrowed)
    );
    assert_eq!(p.stats().borrowed, 1);
    assert_eq!(p.tenant_pinned(TenantId(1)), 10);
    // Both regions short: the configured response (queue).
    assert_eq!(
        p.place(&req(3, 1, CRIT, 10), &view(20, 0, 80, 3)),
        Placement::Wait {
            reason: WaitReason::Exhausted
        }
    );
}

#[test]
fn requests_that_can_never_fit_are_refused() {
    let mut p = policy(|_| {});
    let pool = view(20, 20, 80, 80);
    assert_eq!(
        p.place(&req(1, 1, CRIT, 101), &pool),
        Placement::Refuse {
            reason: Refusal::Impossible
        }
    );
    // Standard traffic can only ever use dynamic.
    assert_eq!(
        p.place(&req(2, 1, STD, 81), &pool),
        Placement::Refuse {
            reason: Refusal::Impossible
        }
    );
    assert_eq!(
        p.place(&req(3, 1, QosClass(9), 1), &pool),
        Placement::Refuse {
            reason: Refusal::UnknownClass
        }
    );
    assert_eq!(p.stats().refusals, 3);
}

#[test]
fn preempt_lowest_names_the_lowest_class_holding_dynamic_blocks() {
    let mut p = policy(|c| c.on_exhausted = OnExhausted::PreemptLowest);
    let pool = view(20, 0, 80, 80);
    let _ = p.place(&req(1, 1, STD, 30), &pool);
    let _ = p.place(&req(2, 1, BE, 30), &pool);
    let full = view(20, 0, 80, 0);
    assert_eq!(
        p.place(&req(3, 1, CRIT, 5), &full),
        Placement::PreemptLowest { victim: BE }
    );
    // Standard may preempt best-effort; best-effort has nobody below it.
    assert_eq!(
        p.place(&req(4, 1, STD, 5), &full),
        Placement::PreemptLowest { victim: BE }
    );
    assert_eq!(
        p.place(&req(5, 1, BE, 5), &full),
        Placement::Wait {
            reason: WaitReason::Exhausted
        }
    );
    // Once best-effort is gone, standard is next.
    p.release(
        SeqId(2),
        RegionBlocks {
            pinned: 0,
            dynamic: 30,
        },
    )
    .unwrap();
    assert_eq!(
        p.place(&req(3, 1, CRIT, 5), &full),
        Placement::PreemptLowest { victim: STD }
    );
}

#[test]
fn downgrade_caps_the_lowest_class_then_loosens() {
    let mut p = policy(|c| c.on_exhausted = OnExhausted::Downgrade);
    let pool = view(0, 0, 100, 100);
    for s in 0..8 {
        assert!(matches!(
            p.place(&req(s, 1, BE, 10), &pool),
            Placement::Allocate { .. }
        ));
    }
    let full = view(0, 0, 100, 20);
    assert_eq!(
        p.place(&req(100, 1, STD, 30), &full),
        Placement::Downgrade {
            class: BE,
            max_running: 4
        }
    );
    // While best-effort still runs above the cap, asking again keeps the same cap.
    assert_eq!(
        p.place(&req(100, 1, STD, 30), &full),
        Placement::Downgrade {
            class: BE,
            max_running: 4
        }
    );
    for s in 0..4 {
        p.release(
            SeqId(s),
            RegionBlocks {
                pinned: 0,
                dynamic: 10,
            },
        )
        .unwrap();
    }
    // A new best-effort sequence waits at the cap; a running one still grows.
    assert_eq!(
        p.place(&req(50, 1, BE, 1), &view(0, 0, 100, 60)),
        Placement::Wait {
            reason: WaitReason::Capped
        }
    );
    assert_eq!(
        p.place(&req(5, 1, BE, 1), &view(0, 0, 100, 60)),
        alloc(0, 1, Route::Normal)
    );
    // With enough free, each tick loosens the cap by one; when it no longer binds it goes.
    let tick = |p: &mut PinningPolicy, free| {
        p.tick(&LoadSample {
            now_ms: 0,
            pool: view(0, 0, 100, free),
            waiting: &[],
        })
    };
    let _ = tick(&mut p, 2);
    assert_eq!(p.class_cap(BE), Some(4));
    let _ = tick(&mut p, 59);
    assert_eq!(p.class_cap(BE), Some(5));
    p.release(
        SeqId(7),
        RegionBlocks {
            pinned: 0,
            dynamic: 10,
        },
    )
    .unwrap();
    let _ = tick(&mut p, 69);
    assert_eq!(p.class_cap(BE), None);
    // The lowest class itself, or nothing to cap: just wait.
    assert_eq!(
        p.place(&req(60, 1, BE, 90), &view(0, 0, 100, 0)),
        Placement::Wait {
            reason: WaitReason::Exhausted
        }
    );
}

#[test]
fn tenant_over_its_pinned_share_falls_to_dynamic_or_is_refused() {
    let mut p = policy(|c| c.tenant_pinned_share = 0.25);
    // Pinned region of 20: each tenant may hold 5 pinned blocks.
    assert_eq!(
        p.place(&req(1, 1, CRIT, 4), &view(20, 20, 80, 80)),
        alloc(4, 0, Route::Normal)
    );
    assert_eq!(
        p.place(&req(2, 1, CRIT, 4), &view(20, 16, 80, 80)),
        alloc(1, 3, Route::OverQuota)
    );
    assert_eq!(p.tenant_pinned(TenantId(1)), 5);
    // Another tenant still gets its share.
    assert_eq!(
        p.place(&req(3, 2, CRIT, 5), &view(20, 15, 77, 77)),
        alloc(5, 0, Route::Normal)
    );
    assert_eq!(p.stats().over_quota, 1);

    let mut strict = policy(|c| {
        c.over_quota = OverQuota::Refuse;
        c.tenant_pinned_limits.insert(TenantId(7), 2);
    });
    assert_eq!(
        strict.place(&req(1, 7, CRIT, 3), &view(20, 20, 80, 80)),
        Placement::Refuse {
            reason: Refusal::TenantOverQuota
        }
    );
    assert_eq!(
        strict.place(&req(1, 7, CRIT, 2), &view(20, 20, 80, 80)),
        alloc(2, 0, Route::Normal)
    );
    // A full pinned region is not a quota problem: borrowing is still allowed.
    assert_eq!(
        strict.place(&req(2, 8, CRIT, 2), &view(20, 0, 80, 80)),
        alloc(0, 2, Route::Borrowed)
    );
}

#[test]
fn release_is_checked_against_what_was_placed() {
    let mut p = policy(|_| {});
    let _ = p.place(&req(1, 3, CRIT, 12), &view(20, 10, 80, 80));
    assert_eq!(
        p.seq_blocks(SeqId(1)),
        Some(RegionBlocks {
            pinned: 10,
            dynamic: 2
        })
    );
    assert_eq!(
        p.release(
            SeqId(1),
            RegionBlocks {
                pinned: 11,
                dynamic: 0
            }
        ),
        Err(PinReleaseError::MoreThanHeld {
            seq: SeqId(1),
            returned: RegionBlocks {
                pinned: 11,
                dynamic: 0
            },
            held: RegionBlocks {
                pinned: 10,
                dynamic: 2
            }
        })
    );
    p.release(
        SeqId(1),
        RegionBlocks {
            pinned: 4,
            dynamic: 0,
        },
    )
    .unwrap();
    assert_eq!(p.tenant_pinned(TenantId(3)), 6);
    p.release(
        SeqId(1),
        RegionBlocks {
            pinned: 6,
            dynamic: 2,
        },
    )
    .unwrap();
    assert_eq!(p.seq_blocks(SeqId(1)), None);
    assert_eq!(p.class_running(CRIT), 0);
    assert_eq!(
        p.release(SeqId(1), RegionBlocks::default()),
        Err(PinReleaseError::UnknownSeq { seq: SeqId(1) })
    );
}

#[test]
fn a_pool_view_of_absurd_sizes_is_answered_not_a_panic() {
    // Plain data from the caller: regions of usize::MAX blocks overflowed the view's total.
    let huge = view(usize::MAX, usize::MAX, usize::MAX, usize::MAX);
    for reserve in [
        Reserve::Static(StaticReserve::fraction(0.5).unwrap()),
        Reserve::Adaptive(Box::new(
            AdaptiveReserve::new(AdaptiveConfig::new(100)).unwrap(),
        )),
    ] {
        let mut p = PinningPolicy::new(PolicyConfig::new(reserve, soft())).unwrap();
        assert_eq!(
            p.place(&req(1, 1, CRIT, 5), &huge),
            alloc(5, 0, Route::Normal)
        );
        assert_eq!(
            p.place(&req(2, 1, BE, 5), &huge),
            alloc(0, 5, Route::Normal)
        );
        let _ = p.tick(&LoadSample {
            now_ms: 0,
            pool: huge,
            waiting: &[],
        });
        assert_eq!(p.class_blocks(CRIT).total(), 5);
    }
}

#[test]
fn configuration_errors_are_typed() {
    let mut c = PolicyConfig::new(Reserve::None, soft());
    c.tenant_pinned_share = 1.5;
    assert!(matches!(
        PinningPolicy::new(c),
        Err(PolicyConfigError::BadFraction { .. })
    ));
    let mut c = PolicyConfig::new(Reserve::None, soft());
    c.classes = QosClasses::new(["only"]).unwrap();
    c.reserved = Some(QosClass(1));
    assert_eq!(
        PinningPolicy::new(c).unwrap_err(),
        PolicyConfigError::UnknownReservedClass {
            class: QosClass(1),
            count: 1
        }
    );
}

/// A scheduler-like loop written once against the trait, run with each policy.
fn drive(policy: &mut dyn PinPolicy) -> (usize, Vec<Placement>) {
    let mut pool = view(10, 10, 90, 90);
    let mut decisions = Vec::new();
    for step in 0..50u64 {
        let class = [CRIT, STD, BE][(step % 3) as usize];
        let d = policy.place(
            &PlaceRequest {
                seq: SeqId(step),
                tenant: TenantId(1),
                class,
                blocks: 3,
                now_ms: step * 100,
            },
            &pool,
        );
        if let Placement::Allocate { blocks, .. } = d {
            pool.pinned_free -= blocks.pinned;
            pool.dynamic_free -= blocks.dynamic;
        }
        decisions.push(d);
        if step >= 10 {
            // Sequences finish ten steps after they start.
            let old = SeqId(step - 10);
            if let Some(blocks) = decisions[(step - 10) as usize].allocated() {
                policy.release(old, blocks).unwrap();
                pool.pinned_free += blocks.pinned;
                pool.dynamic_free += blocks.dynamic;
            }
        }
        match policy.tick(&LoadSample {
            now_ms: step * 100,
            pool,
            waiting: &[ClassBlocks {
                class: CRIT,
                blocks: 0,
            }],
        }) {
            Resize::Grow { blocks, .. } => {
                pool.dynamic_free -= blocks;
                pool.dynamic_capacity -= blocks;
                pool.pinned_free += blocks;
                pool.pinned_capacity += blocks;
            }
            Resize::Shrink { blocks, .. } => {
                pool.pinned_free -= blocks;
                pool.pinned_capacity -= blocks;
                pool.dynamic_free += blocks;
                pool.dynamic_capacity += blocks;
            }
            Resize::Hold => {}
        }
    }
    (pool.pinned_capacity, decisions)
}

trait Allocated {
    fn allocated(&self) -> Option<RegionBlocks>;
}

impl Allocated for Placement {
    fn allocated(&self) -> Option<RegionBlocks> {
        match *self {
            Placement::Allocate { blocks, .. } => Some(blocks),
            _ => None,
        }
    }
}

#[test]
fn the_same_loop_runs_with_no_static_or_adaptive_pinning() {
    let mut none = PinningPolicy::new(PolicyConfig::unpinned(soft())).unwrap();
    let mut fixed = PinningPolicy::new(PolicyConfig::new(
        Reserve::Static(StaticReserve::blocks(30)),
        soft(),
    ))
    .unwrap();
    let mut cfg = AdaptiveConfig::new(100);
    cfg.min_blocks = 2;
    cfg.min_samples = 5;
    cfg.grow_cooldown_ms = 0;
    let adaptive = Reserve::Adaptive(Box::new(AdaptiveReserve::new(cfg).unwrap()));
    let mut adaptive = PinningPolicy::new(PolicyConfig::new(adaptive, soft())).unwrap();
    assert_eq!(none.reserve_name(), "none");
    assert_eq!(adaptive.reserve_name(), "adaptive");

    let (none_pinned, none_decisions) = drive(&mut none);
    let (fixed_pinned, fixed_decisions) = drive(&mut fixed);
    let (adaptive_pinned, _) = drive(&mut adaptive);
    assert_eq!(none_pinned, 0);
    assert!(
        none_decisions
            .iter()
            .filter_map(Allocated::allocated)
            .all(|b| b.pinned == 0)
    );
    assert_eq!(fixed_pinned, 30);
    assert!(
        fixed_decisions
            .iter()
            .filter_map(Allocated::allocated)
            .any(|b| b.pinned > 0)
    );
    // Critical demand is 4 sequences × 3 blocks at most: the reserve follows it, not 30.
    assert!((2..=14).contains(&adaptive_pinned), "{adaptive_pinned}");
}

#[test]
fn soft_pins_flow_through_the_trait() {
    let mut p = policy(|_| {});
    let hashes = [11, 12];
    let grant = p
        .pin(&PinRequest {
            tenant: TenantId(1),
            target: PinTarget::Blocks(&hashes),
            priority: 80,
            ttl_ms: 1_000,
            now_ms: 0,
        })
        .unwrap();
    assert_eq!(grant.updates.len(), 2);
    assert_eq!(p.retention(12, 10).priority, 80);
    let mut changed = Vec::new();
    p.expire(999, &mut changed);
    assert!(changed.is_empty());
    p.expire(1_000, &mut changed);
    assert_eq!(changed.len(), 2);
    assert!(changed.iter().all(|u| u.retention == Retention::DEFAULT));
    assert_eq!(p.soft_pins().used_bytes(), 0);
}
