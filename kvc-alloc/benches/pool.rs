//! Criterion benchmarks of the block pool: the hot-path pair, a large round trip, forking a
//! long sequence's block table, and the thread-safe pool with and without contention.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use kvc_alloc::{BlockPool, ChunkedBlockTable, PoolConfig, SharedBlockPool};
use kvc_core::{BlockAllocator, RegionId};

const D: RegionId = RegionId::DYNAMIC;

fn pool_pair(c: &mut Criterion) {
    let mut pool = BlockPool::new(PoolConfig::new(4096)).unwrap();
    c.bench_function("pool/allocate+release pair", |b| {
        b.iter(|| {
            let block = pool.allocate(black_box(D)).unwrap();
            black_box(pool.release(black_box(block)).unwrap())
        })
    });
}

fn round_trip(c: &mut Criterion) {
    let mut pool = BlockPool::new(PoolConfig::new(4096)).unwrap();
    let mut blocks = Vec::with_capacity(2048);
    c.bench_function("pool/allocate then release 2048 blocks", |b| {
        b.iter(|| {
            pool.allocate_many(D, 2048, &mut blocks).unwrap();
            for &block in &blocks {
                let _ = pool.release(block).unwrap();
            }
            blocks.clear();
        })
    });
}

fn fork(c: &mut Criterion) {
    let mut pool = BlockPool::new(PoolConfig::new(8192)).unwrap();
    let mut table = ChunkedBlockTable::new(16);
    let _ = table.append_tokens(&mut pool, D, 100_000).unwrap();
    assert_eq!(table.num_blocks(), 6_250);
    c.bench_function("table/fork 100k tokens (6,250 blocks)", |b| {
        b.iter(|| {
            let forked = black_box(&table).fork();
            // The original outlives the fork, so dropping the fork only drops chunk pointers.
            drop(black_box(forked));
        })
    });
    table.release(&mut pool).unwrap();
}

fn shared(c: &mut Criterion) {
    let pool = Arc::new(SharedBlockPool::new(
        BlockPool::new(PoolConfig::new(4096)).unwrap(),
    ));
    c.bench_function("shared/allocate+release pair, uncontended", |b| {
        b.iter(|| {
            let block = pool.allocate(D).unwrap();
            black_box(pool.release(block).unwrap())
        })
    });
    c.bench_function("shared/allocate+release pair, 2 threads", |b| {
        b.iter_custom(|iters| {
            let stop = Arc::new(AtomicBool::new(false));
            let other = {
                let (pool, stop) = (Arc::clone(&pool), Arc::clone(&stop));
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let block = pool.allocate(D).unwrap();
                        let _ = black_box(pool.release(block).unwrap());
                    }
                })
            };
            let start = Instant::now();
            for _ in 0..iters {
                let block = pool.allocate(D).unwrap();
                let _ = black_box(pool.release(block).unwrap());
            }
            let elapsed = start.elapsed();
            stop.store(true, Ordering::Relaxed);
            other.join().unwrap();
            elapsed
        })
    });
}

criterion_group!(benches, pool_pair, round_trip, fork, shared);
criterion_main!(benches);
