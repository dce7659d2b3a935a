//! Property tests: random operation sequences against a simulated pool.
//!
//! - low-QoS traffic never holds a pinned-region block, and every decision is feasible;
//! - resizes move free blocks only, and the adaptive reserve stays within its bounds;
//! - tenant shares of the pinned region hold at every grant;
//! - the soft-pin budget and tenant shares are never exceeded, and expired pins decay;
//! - under stationary demand (deterministic clock) the adaptive reserve converges to the demand
//!   percentile and stops moving: exactly (within the hysteresis band, no move once the window
//!   is full and a cool-down has passed) for periodic demand, and within 6% with at most 3 moves
//!   for independent random demand.

use std::collections::HashMap;

use kvc_core::{
    ClassBlocks, LoadSample, PinPolicy, PlaceRequest, Placement, PoolView, QosClass, RegionBlocks,
    Resize, Retention, SeqId, TenantId,
};
use kvc_pin::{
    AdaptiveConfig, AdaptiveReserve, OnExhausted, OverQuota, PinError, PinId, PinRequest,
    PinTarget, PinningPolicy, PolicyConfig, Reserve, SoftPinConfig, SoftPins, StaticReserve,
};
use proptest::prelude::*;

const TOTAL: usize = 200;

#[derive(Clone, Debug)]
enum Op {
    Place {
        seq: u64,
        tenant: u32,
        class: u8,
        blocks: usize,
    },
    Release {
        seq: u64,
        fraction: u8,
    },
    Tick {
        waiting: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..24u64, 0..4u32, 0..3u8, 0..24usize).prop_map(|(seq, tenant, class, blocks)| {
            Op::Place { seq, tenant, class, blocks }
        }),
        2 => (0..24u64, 0..=4u8).prop_map(|(seq, fraction)| Op::Release { seq, fraction }),
        1 => (0..40usize).prop_map(|waiting| Op::Tick { waiting }),
    ]
}

#[derive(Clone, Debug)]
struct Setup {
    reserve: u8,
    min: usize,
    span: usize,
    on_exhausted: u8,
    refuse_over_quota: bool,
    share_pct: u8,
    initial_pinned: usize,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        0..3u8,
        0..60usize,
        0..100usize,
        0..3u8,
        any::<bool>(),
        10..=100u8,
        0..TOTAL,
    )
        .prop_map(
            |(reserve, min, span, on_exhausted, refuse_over_quota, share_pct, initial_pinned)| {
                Setup {
                    reserve,
                    min,
                    span,
                    on_exhausted,
                    refuse_over_quota,
                    share_pct,
                    initial_pinned,
                }
            },
        )
}

fn build(s: &Setup) -> PinningPolicy {
    let reserve = match s.reserve {
        0 => Reserve::None,
        1 => Reserve::Static(StaticReserve::blocks(s.min + s.span)),
        _ => {
            let mut c = AdaptiveConfig::new(TOTAL);
            c.min_blocks = s.min;
            c.max_blocks = s.min + s.span;
            c.grow_cooldown_ms = 3;
            c.shrink_cooldown_ms = 10;
            c.window_ms = 50;
            c.min_samples = 1;
            Reserve::Adaptive(Box::new(AdaptiveReserve::new(c).unwrap()))
        }
    };
    let mut c = PolicyConfig::new(reserve, SoftPinConfig::new(1 << 20, TOTAL, 0.1).unwrap());
    c.on_exhausted = [
        OnExhausted::Queue,
        OnExhausted::PreemptLowest,
        OnExhausted::Downgrade,
    ][usize::from(s.on_exhausted)];
    c.over_quota = if s.refuse_over_quota {
        OverQuota::Refuse
    } else {
        OverQuota::Dynamic
    };
    c.tenant_pinned_share = f64::from(s.share_pct) / 100.0;
    PinningPolicy::new(c).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn placement_and_sizing_keep_every_invariant(
        s in setup(),
        ops in proptest::collection::vec(op(), 1..200),
    ) {
        let mut p = build(&s);
        let mut pool = PoolView {
            pinned_capacity: s.initial_pinned,
            pinned_free: s.initial_pinned,
            dynamic_capacity: TOTAL - s.initial_pinned,
            dynamic_free: TOTAL - s.initial_pinned,
        };
        // The simulation's own record: seq -> (class, tenant, held).
        let mut held: HashMap<u64, (QosClass, u32, RegionBlocks)> = HashMap::new();
        let bounds = (s.min.min(TOTAL), (s.min + s.span).min(TOTAL));
        for (step, op) in ops.into_iter().enumerate() {
            let now = step as u64 + 1;
            match op {
                Op::Place { seq, tenant, class, blocks } => {
                    let (class, tenant) = held
                        .get(&seq)
                        .map_or((QosClass(class), tenant), |&(c, t, _)| (c, t));
                    let limit = p.tenant_pinned_limit(TenantId(tenant), pool.pinned_capacity);
                    let before = p.tenant_pinned(TenantId(tenant));
                    let req = PlaceRequest {
                        seq: SeqId(seq), tenant: TenantId(tenant), class, blocks, now_ms: now,
                    };
                    match p.place(&req, &pool) {
                        Placement::Allocate { blocks: got, .. } => {
                            prop_assert_eq!(got.total(), blocks);
                            prop_assert!(got.pinned <= pool.pinned_free);
                            prop_assert!(got.dynamic <= pool.dynamic_free);
                            if class != QosClass::CRITICAL {
                                prop_assert_eq!(got.pinned, 0, "low QoS got pinned blocks");
                            }
                            if got.pinned > 0 {
                                prop_assert!(before + got.pinned <= limit, "tenant share");
                            }
                            pool.pinned_free -= got.pinned;
                            pool.dynamic_free -= got.dynamic;
                            if got.total() > 0 {
                                let e = held
                                    .entry(seq)
                                    .or_insert((class, tenant, RegionBlocks::default()));
                                e.2.pinned += got.pinned;
                                e.2.dynamic += got.dynamic;
                            }
                        }
                        Placement::PreemptLowest { victim } => {
                            prop_assert!(class.outranks(victim));
                            prop_assert!(p.class_blocks(victim).dynamic > 0);
                        }
                        Placement::Downgrade { class: capped, .. } => {
                            prop_assert_eq!(capped, QosClass::BEST_EFFORT);
                            prop_assert!(class.outranks(capped));
                        }
                        Placement::Wait { .. } | Placement::Refuse { .. } => {}
                    }
                }
                Op::Release { seq, fraction } => {
                    let Some(&(_, _, h)) = held.get(&seq) else {
                        prop_assert!(p.release(SeqId(seq), RegionBlocks::default()).is_err());
                        continue;
                    };
                    let back = RegionBlocks {
                        pinned: h.pinned * usize::from(fraction) / 4,
                        dynamic: h.dynamic * usize::from(fraction) / 4,
                    };
                    p.release(SeqId(seq), back).unwrap();
                    pool.pinned_free += back.pinned;
                    pool.dynamic_free += back.dynamic;
                    let left = RegionBlocks {
                        pinned: h.pinned - back.pinned,
                        dynamic: h.dynamic - back.dynamic,
                    };
                    if left.total() == 0 {
                        held.remove(&seq);
                    } else {
                        held.get_mut(&seq).unwrap().2 = left;
                    }
                }
                Op::Tick { waiting } => {
                    let cap_before = pool.pinned_capacity;
                    let d = p.tick(&LoadSample {
                        now_ms: now,
                        pool,
                        waiting: &[ClassBlocks { class: QosClass::CRITICAL, blocks: waiting }],
                    });
                    match d {
                        Resize::Grow { blocks, target } => {
                            prop_assert!(blocks <= pool.dynamic_free, "grow took used blocks");
                            prop_assert!(cap_before + blocks <= target);
                            pool.dynamic_free -= blocks;
                            pool.dynamic_capacity -= blocks;
                            pool.pinned_free += blocks;
                            pool.pinned_capacity += blocks;
                        }
                        Resize::Shrink { blocks, target } => {
                            prop_assert!(blocks <= pool.pinned_free, "shrink took used blocks");
                            prop_assert!(cap_before - blocks >= target);
                            pool.pinned_free -= blocks;
                            pool.pinned_capacity -= blocks;
                            pool.dynamic_free += blocks;
                            pool.dynamic_capacity += blocks;
                        }
                        Resize::Hold => {}
                    }
                    if s.reserve == 2 {
                        if let Resize::Grow { target, .. } | Resize::Shrink { target, .. } = d {
                            prop_assert!(bounds.0 <= target && target <= bounds.1);
                        }
                        let was_in = (bounds.0..=bounds.1).contains(&cap_before);
                        if was_in {
                            prop_assert!(
                                (bounds.0..=bounds.1).contains(&pool.pinned_capacity),
                                "left bounds {:?}: {} -> {}", bounds, cap_before, pool.pinned_capacity
                            );
                        }
                    }
                }
            }
            // The policy's accounting matches the simulation.
            for (&seq, &(_, _, h)) in &held {
                prop_assert_eq!(p.seq_blocks(SeqId(seq)), Some(h));
            }
            let pinned_held: usize = held.values().map(|v| v.2.pinned).sum();
            let dynamic_held: usize = held.values().map(|v| v.2.dynamic).sum();
            prop_assert_eq!(pool.pinned_free + pinned_held, pool.pinned_capacity);
            prop_assert_eq!(pool.dynamic_free + dynamic_held, pool.dynamic_capacity);
            prop_assert_eq!(p.class_blocks(QosClass::STANDARD).pinned, 0);
            prop_assert_eq!(p.class_blocks(QosClass::BEST_EFFORT).pinned, 0);
        }
    }
}

#[derive(Clone, Debug)]
enum PinOp {
    Pin {
        tenant: u32,
        first: u64,
        len: u64,
        priority: u8,
        ttl: u64,
    },
    Unpin {
        nth: usize,
    },
    Advance {
        ms: u64,
    },
}

fn pin_op() -> impl Strategy<Value = PinOp> {
    prop_oneof![
        4 => (0..4u32, 0..40u64, 1..8u64, 0..=110u8, 0..40u64).prop_map(
            |(tenant, first, len, priority, ttl)| PinOp::Pin { tenant, first, len, priority, ttl }
        ),
        1 => (0..16usize).prop_map(|nth| PinOp::Unpin { nth }),
        2 => (1..20u64).prop_map(|ms| PinOp::Advance { ms }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn soft_pin_budgets_hold_and_expired_pins_decay(
        budget_blocks in 1..30u64,
        share_pct in 10..=100u8,
        ops in proptest::collection::vec(pin_op(), 1..150),
    ) {
        const BLOCK: u64 = 4096;
        let cfg = SoftPinConfig::new(BLOCK, 100, budget_blocks as f64 / 100.0)
            .unwrap()
            .tenant_share(f64::from(share_pct) / 100.0)
            .unwrap()
            .max_ttl_ms(30)
            .unwrap();
        let budget = cfg.budget_bytes;
        let mut pins = SoftPins::new(cfg.clone());
        // Our record of live pins: id -> (tenant, hashes, priority, until, bytes).
        let mut live: Vec<(PinId, u32, Vec<u64>, u8, u64, u64)> = Vec::new();
        let mut now = 0u64;
        let mut changed = Vec::new();
        for op in ops {
            match op {
                PinOp::Pin { tenant, first, len, priority, ttl } => {
                    let hashes: Vec<u64> = (first..first + len).collect();
                    let r = pins.pin(&PinRequest {
                        tenant: TenantId(tenant),
                        target: PinTarget::Blocks(&hashes),
                        priority,
                        ttl_ms: ttl,
                        now_ms: now,
                    });
                    live.retain(|l| l.4 > now); // pin collects expired pins first
                    match r {
                        Ok(g) => {
                            prop_assert!(priority <= 100 && (1..=30).contains(&ttl));
                            prop_assert_eq!(g.bytes, len * BLOCK);
                            live.push((g.id, tenant, hashes, priority, g.until, g.bytes));
                        }
                        Err(PinError::OverBudget { used_bytes, .. }) => {
                            prop_assert!(used_bytes + len * BLOCK > budget);
                        }
                        Err(PinError::TenantOverBudget { used_bytes, limit_bytes, .. }) => {
                            prop_assert!(used_bytes + len * BLOCK > limit_bytes);
                        }
                        Err(PinError::InvalidPriority { .. }) => prop_assert!(priority > 100),
                        Err(PinError::InvalidTtl { .. }) => prop_assert!(ttl == 0 || ttl > 30),
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    }
                }
                PinOp::Unpin { nth } => {
                    if live.is_empty() {
                        continue;
                    }
                    let (id, ..) = live.remove(nth % live.len());
                    // Expired but not yet collected pins can still be unpinned.
                    prop_assert!(pins.unpin(id, now).is_ok());
                    prop_assert!(pins.unpin(id, now).is_err());
                }
                PinOp::Advance { ms } => {
                    now += ms;
                    changed.clear();
                    pins.expire(now, &mut changed);
                    live.retain(|l| l.4 > now);
                    // Every update handed out is the retention now in force.
                    for u in &changed {
                        prop_assert_eq!(u.retention, pins.retention(u.block_hash, now));
                    }
                }
            }
            let used: u64 = live.iter().map(|l| l.5).sum();
            prop_assert_eq!(pins.used_bytes(), used);
            prop_assert!(used <= budget);
            for t in 0..4u32 {
                let tb: u64 = live.iter().filter(|l| l.1 == t).map(|l| l.5).sum();
                prop_assert_eq!(pins.tenant_bytes(TenantId(t)), tb);
                prop_assert!(tb <= cfg.limit_of(TenantId(t)));
            }
            // Retention: the highest live priority, or the default once every pin expired.
            for h in 0..48u64 {
                let best = live
                    .iter()
                    .filter(|l| l.4 > now && l.2.contains(&h))
                    .map(|l| (l.3, l.4))
                    .max();
                let want = best.map_or(Retention::DEFAULT, |(priority, until)| Retention {
                    priority,
                    until: Some(until),
                });
                prop_assert_eq!(pins.retention(h, now), want);
            }
        }
    }
}

/// Uniform integers in `lo..hi` from a fixed-seed xorshift generator.
struct Uniform {
    x: u64,
    lo: usize,
    hi: usize,
}

impl Uniform {
    fn next(&mut self) -> usize {
        self.x ^= self.x << 13;
        self.x ^= self.x >> 7;
        self.x ^= self.x << 17;
        self.lo + (self.x % (self.hi - self.lo) as u64) as usize
    }

    /// The exact nearest-rank p99 of the distribution.
    fn p99(&self) -> usize {
        let n = self.hi - self.lo;
        self.lo + (0.99 * n as f64).ceil() as usize - 1
    }
}

/// Applies a resize to a pool where nothing is allocated; returns whether it moved.
fn apply(pool: &mut PoolView, d: Resize) -> bool {
    match d {
        Resize::Grow { blocks, .. } => {
            pool.pinned_capacity += blocks;
            pool.pinned_free += blocks;
            pool.dynamic_capacity -= blocks;
            pool.dynamic_free -= blocks;
            true
        }
        Resize::Shrink { blocks, .. } => {
            pool.pinned_capacity -= blocks;
            pool.pinned_free -= blocks;
            pool.dynamic_capacity += blocks;
            pool.dynamic_free += blocks;
            true
        }
        Resize::Hold => false,
    }
}

fn empty_pool(total: usize, pinned: usize) -> PoolView {
    PoolView {
        pinned_capacity: pinned,
        pinned_free: pinned,
        dynamic_capacity: total - pinned,
        dynamic_free: total - pinned,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Demand that repeats a cycle whose length divides the window (one observation per
    /// 100 ms, a 60 s window of 600): once the window is full its percentile is constant. The
    /// reserve must then make at most one more move, within the grow or shrink cool-down, and
    /// end within the hysteresis band of percentile + headroom; after that it never moves.
    #[test]
    fn adaptive_reserve_converges_under_periodic_demand(
        cycle_len in prop::sample::select(vec![1usize, 20, 50, 100, 150, 200, 300, 600]),
        values in proptest::collection::vec(0..2_000usize, 600),
        pct in prop::sample::select(vec![0.5f64, 0.9, 0.99, 1.0]),
        headroom in prop::sample::select(vec![0.0f64, 0.1, 0.25]),
        start in 0..3_000usize,
    ) {
        let total = 6_000;
        let mut cfg = AdaptiveConfig::new(total);
        cfg.percentile = pct;
        cfg.headroom_fraction = headroom;
        let mut r = AdaptiveReserve::new(cfg).unwrap();
        let cycle = &values[..cycle_len];
        // The window's exact percentile, by sorting 600 observations.
        let mut window: Vec<usize> = (0..600).map(|i| cycle[i % cycle_len]).collect();
        window.sort_unstable();
        let rank = ((pct * 600.0).ceil() as usize).clamp(1, 600);
        let q = window[rank - 1];
        let want = q + ((q as f64 * headroom) - 1e-9).ceil().max(0.0) as usize;

        let mut pool = empty_pool(total, start);
        let mut last_move = None;
        for t in 0..3_000u64 {
            let d = r.decide(t * 100, cycle[t as usize % cycle_len], &pool);
            if apply(&mut pool, d) {
                last_move = Some(t);
            }
        }
        let cap = pool.pinned_capacity;
        let band = 1usize.max((cap as f64 * 0.05).ceil() as usize);
        prop_assert!(cap.abs_diff(want) <= band, "reserve {} vs {} (band {})", cap, want, band);
        // Full at tick 599; the shrink cool-down is 300 ticks, the grow one 10.
        if let Some(t) = last_move {
            prop_assert!(t <= 599 + 300, "moved at tick {}", t);
        }
    }

    /// Independent uniform demand, 20 simulated minutes: the window's p99 is noisy (6 of 600
    /// observations lie above it), so this checks looser claims: the reserve ends within 6%
    /// (+2 blocks) of the distribution's p99 and makes at most 3 moves in all. (Over 2,000
    /// seeded runs it made 0 to 2 moves and ended within 4.6%.)
    #[test]
    fn adaptive_reserve_settles_under_random_stationary_demand(
        seed in 1..u64::MAX,
        lo in 0..500usize,
        width in 20..1_500usize,
        start in 0..2_000usize,
    ) {
        let total = 4_000;
        let mut cfg = AdaptiveConfig::new(total);
        cfg.headroom_fraction = 0.0;
        let mut r = AdaptiveReserve::new(cfg).unwrap();
        let mut demand = Uniform { x: seed, lo, hi: lo + width };
        let mut pool = empty_pool(total, start);
        let mut moves = 0;
        for t in 0..12_000u64 {
            let d = r.decide(t * 100, demand.next(), &pool);
            if apply(&mut pool, d) {
                moves += 1;
            }
        }
        let p99 = demand.p99();
        let tolerance = (p99 as f64 * 0.06) as usize + 2;
        prop_assert!(
            pool.pinned_capacity.abs_diff(p99) <= tolerance,
            "reserve {} vs p99 {} (±{})", pool.pinned_capacity, p99, tolerance
        );
        prop_assert!(moves <= 3, "{} moves", moves);
    }
}
