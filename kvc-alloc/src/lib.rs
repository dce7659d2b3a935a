//! Paging for KV caches: the physical block pool.
//!
//! KV memory is split into fixed-size blocks; a sequence's blocks are found through its block
//! table, allocated on demand and freed at once. This crate owns the pool:
//!
//! - [`BlockPool`]: a flat metadata array with intrusive doubly linked free lists. Allocate,
//!   release, retain and removal from the middle of a free list are O(1) with no heap
//!   allocation. Reference counts let sequences share blocks; copy-on-write
//!   ([`make_writable`](kvc_core::BlockAllocator::make_writable)) hands back the pair to copy.
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
//! use kvc_alloc::{Admission, BlockAllocator, BlockPool, BlockTable, PoolConfig};
//! use kvc_alloc::{RegionId, Writable};
//!
//! let mut pool = BlockPool::new(PoolConfig::new(1024).pinned(64).watermark(8))?;
//!
//! // A request of 100 tokens in blocks of 16: admit it, then allocate as it grows.
//! assert_eq!(pool.can_allocate(RegionId::DYNAMIC, 7)?, Admission::Now);
//! let mut table = BlockTable::new(16);
//! table.append_tokens(&mut pool, RegionId::DYNAMIC, 100)?;
//! assert_eq!(table.num_blocks(), 7);
//!
//! // A forked sequence shares the last block, then writes to it: copy on write.
//! let last = *table.blocks().last().unwrap();
//! pool.retain(last)?; // the fork's reference
//! let Writable::Copied(copy) = pool.make_writable(last, RegionId::DYNAMIC)? else {
//!     unreachable!("the block is shared");
//! };
//! assert_eq!(copy.src, last); // the kernels copy src -> dst; the fork now owns dst
//! let _ = pool.release(copy.dst)?; // the fork finishes
//! table.release_all(&mut pool)?;
//! assert_eq!(pool.free_blocks(RegionId::DYNAMIC)?, 960);
//! assert_eq!(pool.stats().cow_copies, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
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
