//! loom models of `SharedBlockPool`: every interleaving of 2–3 threads allocating, sharing and
//! releasing blocks. Run with `cargo xtask loom` (builds with `--cfg kvc_loom`).
#![cfg(kvc_loom)]

use kvc_alloc::{BlockPool, PoolConfig, SharedBlockPool};
use kvc_core::{AllocError, BlockId, RegionId};
use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;

const D: RegionId = RegionId::DYNAMIC;

fn shared(blocks: u64) -> Arc<SharedBlockPool> {
    Arc::new(SharedBlockPool::new(
        BlockPool::new(PoolConfig::new(blocks)).unwrap(),
    ))
}

/// Two threads allocate concurrently: they never get the same block, and after both release
/// the pool is whole.
#[test]
fn no_block_is_handed_out_twice() {
    loom::model(|| {
        let pool = shared(2);
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let pool = Arc::clone(&pool);
                thread::spawn(move || pool.allocate(D).unwrap())
            })
            .collect();
        let got: Vec<BlockId> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        assert_ne!(got[0], got[1]);
        for b in got {
            assert!(pool.release(b).unwrap().is_freed());
        }
        assert_eq!(pool.free_blocks(D).unwrap(), 2);
        pool.with(|p| p.audit()).unwrap();
    });
}

/// Three threads share one block; each releases its reference concurrently. Exactly one
/// release frees it, and nothing is lost or freed twice.
#[test]
fn shared_block_is_freed_exactly_once() {
    loom::model(|| {
        let pool = shared(2);
        let block = pool.allocate(D).unwrap();
        pool.retain(block).unwrap();
        pool.retain(block).unwrap();
        let freed = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let (pool, freed) = (Arc::clone(&pool), Arc::clone(&freed));
                thread::spawn(move || {
                    if pool.release(block).unwrap().is_freed() {
                        freed.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(freed.load(Ordering::SeqCst), 1);
        assert!(pool.release(block).is_err());
        assert_eq!(pool.free_blocks(D).unwrap(), 2);
    });
}

/// Three threads race for two blocks while retaining and releasing: one of them may find the
/// pool empty (a typed error, not a panic), no block is lost.
#[test]
fn contention_for_the_last_blocks_loses_nothing() {
    loom::model(|| {
        let pool = shared(2);
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let pool = Arc::clone(&pool);
                thread::spawn(move || match pool.allocate(D) {
                    Ok(b) => {
                        assert_eq!(pool.retain(b).unwrap(), 2);
                        assert!(!pool.release(b).unwrap().is_freed());
                        assert!(pool.release(b).unwrap().is_freed());
                        true
                    }
                    Err(AllocError::OutOfBlocks { free: 0, .. }) => false,
                    Err(e) => panic!("unexpected {e}"),
                })
            })
            .collect();
        let served = workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .filter(|&ok| ok)
            .count();
        assert!(served >= 2);
        assert_eq!(pool.free_blocks(D).unwrap(), 2);
        pool.with(|p| p.audit()).unwrap();
    });
}
