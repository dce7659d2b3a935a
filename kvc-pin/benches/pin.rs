//! Criterion benchmarks of the pin policy: one placement decision (with its release) against a
//! policy tracking 1,000 running sequences, a tick of the adaptive reserve with a full window of
//! 10,000 observations, a soft-pin retention lookup, and placing tenants across devices.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use kvc_core::{
    LoadSample, PinPolicy, PlaceRequest, Placement, PoolView, QosClass, RegionBlocks, SeqId,
    TenantId,
};
use kvc_pin::{
    AdaptiveConfig, AdaptiveReserve, Demand, Device, DeviceId, PinRequest, PinTarget,
    PinningPolicy, PolicyConfig, Reserve, SoftPinConfig, place_tenants,
};

const POOL: usize = 100_000;

fn adaptive(max_samples: usize) -> AdaptiveReserve {
    let mut c = AdaptiveConfig::new(POOL);
    c.max_samples = max_samples;
    c.window_ms = u64::MAX / 4;
    AdaptiveReserve::new(c).expect("valid adaptive settings")
}

/// A policy already tracking `running` sequences of mixed classes.
fn busy_policy(running: u64) -> PinningPolicy {
    let soft = SoftPinConfig::new(1 << 20, POOL, 0.05).expect("valid soft-pin settings");
    let reserve = Reserve::Adaptive(Box::new(adaptive(10_000)));
    let mut p = PinningPolicy::new(PolicyConfig::new(reserve, soft)).expect("valid policy");
    let pool = view();
    for s in 0..running {
        let class = QosClass((s % 3) as u8);
        let _ = p.place(&request(s, class, 4), &pool);
    }
    p
}

fn view() -> PoolView {
    PoolView {
        pinned_capacity: 20_000,
        pinned_free: 10_000,
        dynamic_capacity: 80_000,
        dynamic_free: 40_000,
    }
}

fn request(seq: u64, class: QosClass, blocks: usize) -> PlaceRequest {
    PlaceRequest {
        seq: SeqId(seq),
        tenant: TenantId((seq % 16) as u32),
        class,
        blocks,
        now_ms: seq,
    }
}

fn placement(c: &mut Criterion) {
    let mut g = c.benchmark_group("place");
    let pool = view();
    let mut borrowing = view();
    borrowing.pinned_free = 2;
    for (name, class, pool) in [
        ("critical from pinned", QosClass::CRITICAL, pool),
        (
            "critical borrowing from dynamic",
            QosClass::CRITICAL,
            borrowing,
        ),
        ("best-effort from dynamic", QosClass::BEST_EFFORT, pool),
    ] {
        let mut p = busy_policy(1_000);
        let req = request(1_000_000, class, 4);
        g.bench_function(format!("{name} + release (1k running)"), |b| {
            b.iter(|| {
                let d = p.place(black_box(&req), black_box(&pool));
                if let Placement::Allocate { blocks, .. } = d {
                    p.release(req.seq, blocks).expect("placed just now");
                }
                black_box(d)
            })
        });
    }
    // A running sequence asking for one more block: the decode-step case.
    let mut p = busy_policy(1_000);
    let seq = request(3, QosClass::CRITICAL, 1);
    g.bench_function("decode block for a running critical seq + release", |b| {
        b.iter(|| {
            let d = p.place(black_box(&seq), black_box(&pool));
            p.release(
                seq.seq,
                RegionBlocks {
                    pinned: 1,
                    dynamic: 0,
                },
            )
            .expect("placed just now");
            black_box(d)
        })
    });
    g.finish();
}

fn ticks(c: &mut Criterion) {
    let mut g = c.benchmark_group("tick");
    // A full window: 10,000 observations, each tick evicts one and adds one.
    let mut reserve = adaptive(10_000);
    let pool = view();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut now = 0;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % 15_000) as usize
    };
    for _ in 0..10_000 {
        now += 1;
        let _ = reserve.decide(now, next(), &pool);
    }
    assert_eq!(reserve.window().len(), 10_000);
    g.bench_function("adaptive reserve, window of 10k observations", |b| {
        b.iter(|| {
            now += 1;
            black_box(reserve.decide(now, black_box(next()), black_box(&pool)))
        })
    });
    // The whole policy tick (cap loosening, demand sum, reserve decision).
    let mut p = busy_policy(1_000);
    let mut t = 0;
    for _ in 0..10_000 {
        t += 1;
        let _ = p.tick(&LoadSample {
            now_ms: t,
            pool,
            waiting: &[],
        });
    }
    g.bench_function("PinningPolicy::tick, window of 10k observations", |b| {
        b.iter(|| {
            t += 1;
            black_box(p.tick(black_box(&LoadSample {
                now_ms: t,
                pool,
                waiting: &[],
            })))
        })
    });
    // 10,000 ticks from an empty window: the cost per observation of filling it.
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("10k ticks into an empty adaptive reserve", |b| {
        b.iter_batched(
            || adaptive(10_000),
            |mut r| {
                for i in 0..10_000u64 {
                    let _ = black_box(r.decide(i, (i * 7919 % 15_000) as usize, &pool));
                }
                r
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn retention(c: &mut Criterion) {
    let soft = SoftPinConfig::new(1 << 20, POOL, 0.05).expect("valid soft-pin settings");
    let mut p = PinningPolicy::new(PolicyConfig::new(Reserve::None, soft)).expect("valid policy");
    // 1,000 pins of 4 blocks each.
    for i in 0..1_000u64 {
        let hashes = [i * 4, i * 4 + 1, i * 4 + 2, i * 4 + 3];
        let _ = p
            .pin(&PinRequest {
                tenant: TenantId((i % 8) as u32),
                target: PinTarget::Blocks(&hashes),
                priority: 80,
                ttl_ms: 60_000,
                now_ms: 0,
            })
            .expect("within budget");
    }
    let mut h = 0u64;
    c.bench_function("retention/lookup among 4k pinned blocks", |b| {
        b.iter(|| {
            h = (h + 7) % 8_000; // half hit a pin, half miss
            black_box(p.retention(black_box(h), 10))
        })
    });
}

fn devices(c: &mut Criterion) {
    let devices: Vec<Device> = (0..8)
        .map(|i| Device {
            id: DeviceId(i),
            capacity: 10_000,
        })
        .collect();
    let demands: Vec<Demand> = (0..64u32)
        .map(|t| Demand {
            tenant: TenantId(t),
            blocks: 200 + (t as usize * 397) % 1_800,
        })
        .collect();
    c.bench_function("devices/place 64 tenants on 8 devices", |b| {
        b.iter(|| black_box(place_tenants(black_box(&devices), black_box(&demands))))
    });
}

criterion_group!(benches, placement, ticks, retention, devices);
criterion_main!(benches);
