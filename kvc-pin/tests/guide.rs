//! The worked example of `docs/pinning.md`, so that every figure the guide quotes is checked.

use kvc_core::{
    ClassBlocks, DType, KvLayout, LoadSample, PinPolicy, PlaceRequest, Placement, PoolView,
    QosClass, RegionBlocks, Resize, Route, SeqId, TenantId,
};
use kvc_pin::{
    AdaptiveConfig, AdaptiveReserve, PinError, PinRequest, PinTarget, PinningPolicy, PolicyConfig,
    Reserve, SoftPinConfig,
};

fn apply(pool: &mut PoolView, d: Resize) {
    match d {
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

/// Ticks every 100 ms and records the pinned capacity after each.
#[derive(Default)]
struct Clock {
    t: u64,
    history: Vec<(u64, usize)>,
}

impl Clock {
    fn tick(&mut self, policy: &mut PinningPolicy, pool: &mut PoolView, demand: usize) -> Resize {
        let d = policy.tick(&LoadSample {
            now_ms: self.t,
            pool: *pool,
            waiting: &[ClassBlocks {
                class: QosClass::CRITICAL,
                blocks: demand,
            }],
        });
        apply(pool, d);
        self.history.push((self.t, pool.pinned_capacity));
        self.t += 100;
        d
    }
}

#[test]
fn worked_example() {
    // Llama-3-8B, bf16, 16-token blocks: 2 MiB a block; 40 GiB of KV memory.
    let layout = KvLayout::new(32, 8, 128, 16, DType::BF16).unwrap();
    assert_eq!(layout.bytes_per_block(), 2 << 20);
    let total = layout.blocks_in_bytes(40 << 30) as usize;
    assert_eq!(total, 20_480);

    let mut adaptive = AdaptiveConfig::new(total);
    adaptive.min_blocks = 512;
    adaptive.max_blocks = total * 2 / 5; // 8,192
    let reserve = Reserve::Adaptive(Box::new(AdaptiveReserve::new(adaptive).unwrap()));
    let soft = SoftPinConfig::new(layout.bytes_per_block(), total, 0.05)
        .unwrap()
        .tenant_share(0.5)
        .unwrap();
    assert_eq!(soft.budget_bytes, 1_024 * (2 << 20));
    let mut policy = PinningPolicy::new(PolicyConfig::new(reserve, soft)).unwrap();

    // The pool starts with no pinned region. Critical demand (blocks held by critical
    // sequences) cycles through 1,000, 1,020, ..., 2,980, one observation every 100 ms.
    let mut pool = PoolView {
        pinned_capacity: 0,
        pinned_free: 0,
        dynamic_capacity: total,
        dynamic_free: total,
    };
    let mut clock = Clock::default();
    // First decision: the minimum of 512 blocks at once (out of bounds is fixed immediately);
    // then nothing until the window holds 100 observations (`min_samples`), at t = 9.9 s.
    for i in 0..1_200usize {
        let _ = clock.tick(&mut policy, &mut pool, 1_000 + 20 * (i % 100));
    }
    // p99 of the window (600 observations, each value 6 times) is 2,960; +10% = 3,256.
    assert_eq!(pool.pinned_capacity, 3_256);
    let settled = clock
        .history
        .iter()
        .rev()
        .find(|h| h.1 != 3_256)
        .map_or(0, |h| h.0 + 100);
    assert!(settled <= 20_000, "settled at {settled} ms");

    // A burst: 3 s at 5,000 blocks. 30 of 600 observations (5%) are above p99: it follows.
    for _ in 0..30 {
        let _ = clock.tick(&mut policy, &mut pool, 5_000);
    }
    assert_eq!(pool.pinned_capacity, 5_500);
    // Back to the cycle: the burst leaves the 60 s window, and the reserve shrinks back.
    let mut shrunk_at = None;
    for i in 0..900usize {
        let d = clock.tick(&mut policy, &mut pool, 1_000 + 20 * (i % 100));
        if matches!(d, Resize::Shrink { .. }) && shrunk_at.is_none() {
            shrunk_at = Some(i);
        }
    }
    // It shrinks in one step, 59.7 s after the burst began, when fewer than 7 of the burst's
    // 30 observations (1% of 600) remain in the window; the target then is p99 2,980 + 10% =
    // 3,278. The steady target 3,256 is within the 5% hysteresis band of that: no more moves.
    assert_eq!(shrunk_at, Some(593));
    assert_eq!(pool.pinned_capacity, 3_278);
    let changes: Vec<_> = clock
        .history
        .windows(2)
        .filter(|w| w[0].1 != w[1].1)
        .collect();
    assert_eq!(changes.last().map(|w| w[1]), Some((182_300, 3_278)));
    // Before: 512 at t = 0, 3,256 at t = 9.9 s (the p99 of the first full cycle is 2,960),
    // then 5,500 at t = 120.6 s (7 burst observations, more than 1% of 600).
    assert_eq!(clock.history[0], (0, 512));
    let steps: Vec<(u64, usize)> = changes.iter().map(|w| w[1]).collect();
    assert_eq!(steps, [(9_900, 3_256), (120_600, 5_500), (182_300, 3_278)]);

    // Degradation: the pinned region is nearly full; a critical request borrows.
    pool.pinned_free = 10;
    pool.dynamic_free = 500;
    let req = PlaceRequest {
        seq: SeqId(1),
        tenant: TenantId(1),
        class: QosClass::CRITICAL,
        blocks: 64,
        now_ms: clock.t,
    };
    assert_eq!(
        policy.place(&req, &pool),
        Placement::Allocate {
            blocks: RegionBlocks {
                pinned: 10,
                dynamic: 54
            },
            route: Route::Borrowed
        }
    );

    // Soft pin: a 2,000-token system prompt = 125 full blocks, priority 90,
    // 10 minutes.
    let chain: Vec<u64> = (0..125).map(|i| 0x5157_0000 + i).collect();
    let grant = policy
        .pin(&PinRequest {
            tenant: TenantId(1),
            target: PinTarget::TokenRange {
                chain: &chain,
                block_size: 16,
                start: 0,
                end: 2_000,
            },
            priority: 90,
            ttl_ms: 600_000,
            now_ms: clock.t,
        })
        .unwrap();
    assert_eq!(grant.bytes, 125 * (2 << 20));
    // Tenant 1 may pin half the 1,024-block budget: 512 blocks. A second 400-block pin fails.
    let big: Vec<u64> = (0..400).collect();
    assert_eq!(
        policy.pin(&PinRequest {
            tenant: TenantId(1),
            target: PinTarget::Blocks(&big),
            priority: 50,
            ttl_ms: 60_000,
            now_ms: clock.t,
        }),
        Err(PinError::TenantOverBudget {
            tenant: TenantId(1),
            requested_bytes: 400 * (2 << 20),
            used_bytes: 125 * (2 << 20),
            limit_bytes: 512 * (2 << 20),
        })
    );
}
