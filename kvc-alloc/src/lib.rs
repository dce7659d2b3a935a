//! Paging for KV caches: the physical block pool.
//!
//! KV memory is split into fixed-size blocks; a sequence's blocks are found through its block
//! table, allocated on demand and freed at once. This crate owns the pool:
//!
//! - [`BlockPool`]: a flat metadata array with intrusive doubly linked free lists. Allocate,
//!   release, retain and removal from the middle of a free list are O(1) with no heap
//!   allocation. Reference counts let sequences share blocks; copy-on-write
//!   ([`make_writable`](kvc_core::BlockAllocator::make_writable), or
//!   [`BlockTable::make_last_writable`] for a forked table) hands back the pair to copy.
//!   [`BlockPool::release_many`] releases a batch (a cache's eviction victims) in one pass,
//!   all or nothing.
//! - Regions ([`PoolConfig::pinned`], [`resize`](kvc_core::BlockAllocator::resize)): the pinned region for
//!   high-priority traffic and the dynamic region, each with its own free list and quota.
//! - Admission with a watermark reserve:
//!   [`can_allocate`](kvc_core::BlockAllocator::can_allocate) answers `Now`, `Later` or
//!   `Impossible`.
//! - Contiguity: [`allocate_after`](kvc_core::BlockAllocator::allocate_after) prefers the
//!   physically next block; [`BlockPool::fragmentation`] reports the largest free run.
//! - [`ChunkedBlockTable`]: a block table whose fork is O(chunks), for long sequences.
//! - [`SharedBlockPool`]: the pool for schedulers with several threads, model-checked with loom.
//!
//! The `kvc-core` types a pool user needs are re-exported, so depending on this crate alone
//! is enough. It knows nothing of hashes, tokens, tenants or CUDA; those live in sibling crates.
//!
//! ```
//! use kvc_alloc::{Admission, AllocError, BlockAllocator, BlockPool, BlockTable, PoolConfig};
//! use kvc_alloc::{RefError, RegionId};
//!
//! let mut pool = BlockPool::new(PoolConfig::new(1024).pinned(64).watermark(8))?;
//!
//! // A request of 100 tokens in blocks of 16: admit it, then allocate as it grows.
//! assert_eq!(pool.can_allocate(RegionId::DYNAMIC, 7)?, Admission::Now);
//! let mut table = BlockTable::new(16);
//! table.append_tokens(&mut pool, RegionId::DYNAMIC, 100)?;
//! assert_eq!(table.num_blocks(), 7);
//!
//! // Parallel sampling: the fork shares every block, including the partly filled last one.
//! // Before the fork writes its next token there, copy it on write.
//! let mut sample = table.fork(&mut pool)?;
//! let copy = sample.make_last_writable(&mut pool, RegionId::DYNAMIC)?.expect("shared");
//! assert_eq!(copy.src, table.blocks()[6]); // the kernels copy src -> dst first
//! assert_eq!(copy.dst, sample.blocks()[6]); // the fork now owns dst
//! sample.append_tokens(&mut pool, RegionId::DYNAMIC, 1)?;
//!
//! // Running out is a typed error, and changes nothing.
//! let mut huge = BlockTable::new(16);
//! let err = huge.append_tokens(&mut pool, RegionId::DYNAMIC, 16 * 2_000).unwrap_err();
//! assert!(matches!(err, AllocError::OutOfBlocks { requested: 2_000, .. }));
//! assert_eq!(pool.can_allocate(RegionId::DYNAMIC, 2_000)?, Admission::Impossible);
//!
//! sample.release_all(&mut pool)?;
//! table.release_all(&mut pool)?;
//! assert_eq!(pool.free_blocks(RegionId::DYNAMIC)?, 960);
//! assert_eq!(pool.stats().cow_copies, 1);
//! // A double release is an error, not a panic.
//! let block = pool.allocate(RegionId::DYNAMIC)?;
//! let _ = pool.release(block)?;
//! assert!(matches!(pool.release(block), Err(RefError::NotAllocated { .. })));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `examples/paging.rs` (`cargo run -p kvc-alloc --example paging`) is a whole program:
//! several sequences, a fork, regions, every error an adopter meets, and the thread-safe pool.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod chunked;
mod config;
mod pool;
mod shared;
mod stats;

pub use kvc_core::{
    Admission, AllocError, BlockAllocator, BlockCopy, BlockId, BlockTable, CowError, RefError,
    RegionId, Released, ResizeError, Writable,
};

pub use chunked::{AppendOutcome, CHUNK_BLOCKS, ChunkedBlockTable, TableError};
pub use config::{ConfigError, MAX_REGIONS, PoolConfig};
pub use pool::{AuditError, BlockPool};
pub use shared::SharedBlockPool;
pub use stats::{Fragmentation, PoolStats, RegionStats};
