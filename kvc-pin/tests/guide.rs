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
    // The expected times, derived from the configuration rather than read off a run. The
    // window holds the observations of the last 60 s (`t > now - 60,000`): 600 at one per
    // 100 ms, of which p99 lets 1% (6) lie above it. Burst observation k is at
    // `burst_start + 100 k`, k < 30.
    let tick_ms = 100u64;
    let window = (60_000 / tick_ms) as usize;
    let above = window / 100;
    let burst_start = 1_200 * tick_ms;
    let burst_len = 30usize;
    // It follows the burst at the 7th burst observation (more than 1% of the window)...
    let follow_t = burst_start + above as u64 * tick_ms;
    // ...and shrinks back, in one step, once no more than 6 burst observations are in the
    // window: when observation `burst_len - above - 1` (the 24th) leaves it, 60 s later.
    let shrink_t = burst_start + (burst_len - above - 1) as u64 * tick_ms + 60_000;
    let after_burst = burst_start + burst_len as u64 * tick_ms;
    let shrink_i = ((shrink_t - after_burst) / tick_ms) as usize;
    assert_eq!((follow_t, shrink_t, shrink_i), (120_600, 182_300, 593));
    // The target then is p99 of the cycle alone: the cycle's top value 2,980 sits at rank
    // 595..600 of 600 once the last burst values count among the top 1%, so + 10% = 3,278.
    // The steady target 3,256 is within the 5% hysteresis band of that: no more moves.
    let p99 = |values: &mut Vec<usize>| {
        values.sort_unstable();
        values[(values.len() * 99).div_ceil(100) - 1]
    };
    let cycle: Vec<usize> = (0..window).map(|i| 1_000 + 20 * (i % 100)).collect();
    let steady = p99(&mut cycle.clone()) * 11 / 10;
    let mut after: Vec<usize> = cycle.clone();
    // At the shrink, `above` burst observations are still in the window beside 594 cycle
    // ones; which cycle values they displace does not move the rank that p99 reads.
    after[..above].fill(5_000);
    let shrunk = p99(&mut after) * 11 / 10;
    assert_eq!(shrunk_at, Some(shrink_i));
    assert_eq!(pool.pinned_capacity, shrunk);
    let changes: Vec<_> = clock
        .history
        .windows(2)
        .filter(|w| w[0].1 != w[1].1)
        .collect();
    assert_eq!(changes.last().map(|w| w[1]), Some((shrink_t, shrunk)));
    // Before: 512 (the minimum) at t = 0, the steady target once the window holds
    // `min_samples` = 100 observations (t = 9.9 s), then 5,000 + 10% when it follows.
    assert_eq!(clock.history[0], (0, 512));
    let steps: Vec<(u64, usize)> = changes.iter().map(|w| w[1]).collect();
    assert_eq!(
        steps,
        [
            (99 * tick_ms, steady),
            (follow_t, 5_000 * 11 / 10),
            (shrink_t, shrunk)
        ]
    );

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
