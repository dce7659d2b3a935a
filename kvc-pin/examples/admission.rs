//! A scheduler's use of the pin policy, from `kvc-pin` alone: reserve a pinned region, admit
//! high- and low-priority requests, overflow both regions, give blocks back, soft-pin a
//! cached prefix, and meet the typed errors of bad input.
//!
//! The policy never touches memory: it answers with plain data, and the scheduler applies it
//! to its allocator. Here a [`PoolView`] stands in for the allocator.
//!
//! ```sh
//! cargo run -p kvc-pin --example admission
//! ```

#![allow(clippy::print_stdout)] // a program: it says what it did

use kvc_pin::{
    LoadSample, OnExhausted, PinError, PinPolicy, PinReleaseError, PinRequest, PinTarget,
    PinningPolicy, PlaceRequest, Placement, PolicyConfig, PolicyConfigError, PoolView, QosClass,
    Refusal, RegionBlocks, Reserve, Resize, Route, SeqId, SoftPinConfig, StaticReserve, TenantId,
    UnpinError, WaitReason,
};

/// Applies a decision to the stand-in allocator, as a scheduler applies it to its pool.
fn apply(decision: &Placement, pool: &mut PoolView) {
    if let Placement::Allocate { blocks, .. } = decision {
        pool.pinned_free -= blocks.pinned;
        pool.dynamic_free -= blocks.dynamic;
    }
}

fn request(seq: u64, tenant: u32, class: QosClass, blocks: usize) -> PlaceRequest {
    PlaceRequest {
        seq: SeqId(seq),
        tenant: TenantId(tenant),
        class,
        blocks,
        now_ms: 0,
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 100 blocks of 1 MiB; 20 reserved for critical traffic; soft pins get 10% of the pool.
    let soft = SoftPinConfig::new(1 << 20, 100, 0.1)?;
    let mut cfg = PolicyConfig::new(Reserve::Static(StaticReserve::blocks(20)), soft);
    cfg.on_exhausted = OnExhausted::PreemptLowest;
    let mut policy = PinningPolicy::new(cfg)?;

    // The pool starts with no pinned region; the first tick asks to move 20 free blocks.
    let mut pool = PoolView {
        pinned_capacity: 0,
        pinned_free: 0,
        dynamic_capacity: 100,
        dynamic_free: 100,
    };
    let resize = policy.tick(&LoadSample {
        now_ms: 0,
        pool,
        waiting: &[],
    });
    let Resize::Grow { blocks: 20, .. } = resize else {
        return Err(format!("expected to grow by 20, got {resize:?}").into());
    };
    // ... the scheduler calls BlockAllocator::resize(DYNAMIC, PINNED, 20) on its pool.
    pool.pinned_capacity += 20;
    pool.pinned_free += 20;
    pool.dynamic_capacity -= 20;
    pool.dynamic_free -= 20;

    // A critical request takes pinned blocks; a best-effort one never does.
    let critical = policy.place(&request(1, 1, QosClass::CRITICAL, 15), &pool);
    assert_eq!(
        critical,
        Placement::Allocate {
            blocks: RegionBlocks {
                pinned: 15,
                dynamic: 0
            },
            route: Route::Normal
        }
    );
    apply(&critical, &mut pool);
    let batch = policy.place(&request(2, 2, QosClass::BEST_EFFORT, 75), &pool);
    assert_eq!(
        batch,
        Placement::Allocate {
            blocks: RegionBlocks {
                pinned: 0,
                dynamic: 75
            },
            route: Route::Normal
        }
    );
    apply(&batch, &mut pool);

    // Dynamic is now 5 blocks short of what another best-effort request needs: it waits.
    let more = policy.place(&request(3, 2, QosClass::BEST_EFFORT, 10), &pool);
    assert_eq!(
        more,
        Placement::Wait {
            reason: WaitReason::Exhausted
        }
    );
    // A critical request larger than the pinned free space borrows the rest from dynamic.
    let burst = policy.place(&request(4, 1, QosClass::CRITICAL, 10), &pool);
    assert_eq!(
        burst,
        Placement::Allocate {
            blocks: RegionBlocks {
                pinned: 5,
                dynamic: 5
            },
            route: Route::Borrowed
        }
    );
    apply(&burst, &mut pool);
    // Both regions full: the critical request preempts the lowest class (OnExhausted).
    let squeeze = policy.place(&request(5, 1, QosClass::CRITICAL, 4), &pool);
    assert_eq!(
        squeeze,
        Placement::PreemptLowest {
            victim: QosClass::BEST_EFFORT
        }
    );
    // More than the regions could ever hold, or a class nobody configured: refused at once.
    let never = policy.place(&request(6, 1, QosClass::CRITICAL, 1_000), &pool);
    assert_eq!(
        never,
        Placement::Refuse {
            reason: Refusal::Impossible
        }
    );
    let unknown = policy.place(&request(7, 1, QosClass(9), 1), &pool);
    assert_eq!(
        unknown,
        Placement::Refuse {
            reason: Refusal::UnknownClass
        }
    );

    // The preempted best-effort sequence gives its blocks back; so does a finished one.
    let all_of_batch = RegionBlocks {
        pinned: 0,
        dynamic: 75,
    };
    policy.release(SeqId(2), all_of_batch)?;
    pool.dynamic_free += 75;
    // Now the request that waited fits.
    let retry = policy.place(&request(3, 2, QosClass::BEST_EFFORT, 10), &pool);
    assert!(matches!(retry, Placement::Allocate { .. }));
    assert!(matches!(
        policy.release(SeqId(2), all_of_batch),
        Err(PinReleaseError::UnknownSeq { .. })
    ));
    assert!(matches!(
        policy.release(
            SeqId(1),
            RegionBlocks {
                pinned: 100,
                dynamic: 0
            }
        ),
        Err(PinReleaseError::MoreThanHeld { .. })
    ));

    // Soft-pin a cached system prompt of 10 blocks at priority 90 for a minute.
    let chain: Vec<u64> = (1..=10).collect(); // the prefix's chained block hashes
    let grant = policy.pin(&PinRequest {
        tenant: TenantId(1),
        target: PinTarget::Blocks(&chain),
        priority: 90,
        ttl_ms: 60_000,
        now_ms: 0,
    })?;
    assert_eq!(grant.updates.len(), 10); // push each to the prefix cache
    assert_eq!(policy.retention(5, 1_000).priority, 90);
    let bad = PinRequest {
        tenant: TenantId(1),
        target: PinTarget::Blocks(&chain),
        priority: 101,
        ttl_ms: 60_000,
        now_ms: 0,
    };
    assert!(matches!(
        policy.pin(&bad),
        Err(PinError::InvalidPriority { .. })
    ));
    let updates = policy.unpin(grant.id, 1_000)?;
    assert_eq!(updates.len(), 10);
    assert!(matches!(
        policy.unpin(grant.id, 1_000),
        Err(UnpinError::NotPinned { .. })
    ));

    // A configuration that cannot work is refused when the policy is built.
    let mut wrong = PolicyConfig::new(
        Reserve::Static(StaticReserve::blocks(20)),
        SoftPinConfig::new(1 << 20, 100, 0.1)?,
    );
    wrong.reserved = Some(QosClass(7)); // only 3 classes are configured
    assert!(matches!(
        PinningPolicy::new(wrong),
        Err(PolicyConfigError::UnknownReservedClass { .. })
    ));

    let stats = policy.stats();
    println!(
        "admission: {} allocations ({} borrowed), {} waits, {} preemptions, {} refusals",
        stats.allocations, stats.borrowed, stats.waits, stats.preemptions, stats.refusals
    );
    Ok(())
}
