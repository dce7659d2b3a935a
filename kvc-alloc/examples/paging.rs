//! An engine's paging, from `kvc-alloc` alone: admit and grow a few sequences, fork one for
//! parallel sampling with copy-on-write, run out of blocks and handle the typed error, resize
//! the pinned region, meet every misuse error, and share the pool between threads.
//!
//! ```sh
//! cargo run -p kvc-alloc --example paging
//! ```

#![allow(clippy::print_stdout)] // a program: it says what it did

use std::sync::Arc;

use kvc_alloc::{
    Admission, AllocError, BlockAllocator, BlockId, BlockPool, BlockTable, ChunkedBlockTable,
    ConfigError, PoolConfig, RefError, RegionId, ResizeError, SharedBlockPool,
};

const BLOCK: u32 = 16;
const D: RegionId = RegionId::DYNAMIC;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 64 blocks: 8 pinned for critical traffic, 2 of the dynamic 56 kept back at admission.
    let mut pool = BlockPool::new(PoolConfig::new(64).pinned(8).watermark(2))?;

    // Admit three prompts, then allocate their blocks.
    let mut seqs: Vec<BlockTable> = Vec::new();
    for prompt in [40, 100, 250] {
        let mut table = BlockTable::new(BLOCK);
        match pool.can_allocate(D, table.blocks_needed(prompt))? {
            Admission::Now => table.append_tokens(&mut pool, D, prompt)?,
            Admission::Later => unreachable!("the pool is nearly empty"),
            Admission::Impossible => unreachable!("each prompt fits the pool"),
        }
        seqs.push(table);
    }
    assert_eq!(seqs[2].num_blocks(), 16);
    // Token 249's K/V goes to slot `block * 16 + 9` of the paged layout.
    let (block, offset) = seqs[2].slot(249).ok_or("token 249 is written")?;
    assert_eq!(seqs[2].slot_index(249), Some(u64::from(block.0) * 16 + 9));
    assert_eq!(offset, 9);

    // Decode one token per sequence.
    for table in &mut seqs {
        table.append_tokens(&mut pool, D, 1)?;
    }

    // Parallel sampling on the first sequence (41 tokens: its last block holds 9).
    let mut sample = seqs[0].fork(&mut pool)?;
    let shared = seqs[0].blocks()[2];
    assert_eq!(pool.refcount(shared)?, 2);
    let copy = sample
        .make_last_writable(&mut pool, D)?
        .ok_or("the last block is shared")?;
    assert_eq!((copy.src, copy.dst), (shared, sample.blocks()[2]));
    // ... the kernels copy block copy.src into copy.dst, then the fork writes its token.
    sample.append_tokens(&mut pool, D, 1)?;
    assert_eq!(pool.refcount(shared)?, 1);

    // A prompt too long for what is left: a typed error, and nothing changed.
    let free = pool.free_blocks(D)?;
    let mut long = BlockTable::new(BLOCK);
    match long.append_tokens(&mut pool, D, 1_000) {
        Err(AllocError::OutOfBlocks {
            requested, free: f, ..
        }) => assert_eq!((requested, f), (63, free)),
        other => return Err(format!("expected OutOfBlocks, got {other:?}").into()),
    }
    assert_eq!(pool.free_blocks(D)?, free);
    assert_eq!(pool.can_allocate(D, 63)?, Admission::Impossible);
    assert_eq!(pool.can_allocate(D, free)?, Admission::Later); // it would eat the reserve

    // Grow the pinned region by 4 free dynamic blocks; in-use blocks never move.
    pool.resize(D, RegionId::PINNED, 4)?;
    assert_eq!(pool.capacity(RegionId::PINNED)?, 12);
    assert!(matches!(
        pool.resize(D, RegionId::PINNED, 1_000),
        Err(ResizeError::NotEnoughFree { .. })
    ));

    // Misuse is a typed error, never a panic.
    let b = pool.allocate(D)?;
    let _ = pool.release(b)?;
    assert!(matches!(
        pool.release(b),
        Err(RefError::NotAllocated { .. })
    ));
    assert!(matches!(
        pool.release(BlockId(10_000)),
        Err(RefError::UnknownBlock { .. })
    ));
    assert!(matches!(
        pool.allocate(RegionId(9)),
        Err(AllocError::UnknownRegion { .. })
    ));
    for (cfg, what) in [
        (PoolConfig::new(0), "an empty pool"),
        (PoolConfig::new(8).pinned(9), "more pinned than the pool"),
        (
            PoolConfig::new(8).watermark(8),
            "a reserve of the whole pool",
        ),
    ] {
        let err: ConfigError = BlockPool::new(cfg).err().ok_or(what)?;
        assert!(!err.to_string().is_empty());
    }

    // A long prompt whose fork costs O(chunks), with the copy done inside append_tokens.
    let mut doc = ChunkedBlockTable::new(BLOCK);
    let _ = doc.append_tokens(&mut pool, RegionId::PINNED, 100)?;
    let mut branch = doc.fork();
    let out = branch.append_tokens(&mut pool, RegionId::PINNED, 1)?;
    assert!(out.copy.is_some());
    branch.release(&mut pool)?;
    doc.release(&mut pool)?;

    // Done: every table gives its references back.
    sample.release_all(&mut pool)?;
    for table in &mut seqs {
        table.release_all(&mut pool)?;
    }
    pool.audit()?;
    let stats = pool.stats();
    assert_eq!(stats.used(), 0);
    assert_eq!(stats.cow_copies, 2);

    // The same pool for a scheduler with several threads.
    let pool = Arc::new(SharedBlockPool::new(pool));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || -> Result<(), RefError> {
                for _ in 0..100 {
                    let Ok(b) = pool.allocate(D) else { continue };
                    let _ = pool.release(b)?;
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| "worker panicked")??;
    }
    assert_eq!(pool.free_blocks(D)?, 52);
    println!(
        "paging: {} allocations, {} copy-on-write copies, every block back",
        stats.allocations, stats.cow_copies
    );
    Ok(())
}
