//! [`SharedBlockPool`]: a [`BlockPool`] that several scheduler threads can use at once.

use kvc_core::sync::{Mutex, MutexGuard};
use kvc_core::{Admission, AllocError, BlockAllocator, BlockId, CowError, RefError, RegionId};
use kvc_core::{Released, ResizeError, Writable};

use crate::BlockPool;
use crate::stats::PoolStats;

/// A thread-safe block pool: a [`BlockPool`] behind a mutex, shared by reference or `Arc`.
///
/// Each call takes the lock once, so a single operation is atomic; use
/// [`with`](Self::with) to run several operations under one lock (for example a whole
/// request's allocation). The pool's operations never panic, so the lock is never poisoned
/// by kvc itself; a panic inside a caller's [`with`](Self::with) closure is recovered from,
/// since every pool operation leaves the pool consistent before returning.
///
/// ```
/// use std::sync::Arc;
/// use kvc_alloc::{BlockPool, PoolConfig, SharedBlockPool};
/// use kvc_alloc::RegionId;
///
/// let pool = Arc::new(SharedBlockPool::new(BlockPool::new(PoolConfig::new(64))?));
/// let workers: Vec<_> = (0..2)
///     .map(|_| {
///         let pool = Arc::clone(&pool);
///         std::thread::spawn(move || {
///             let b = pool.allocate(RegionId::DYNAMIC).unwrap();
///             pool.release(b).unwrap();
///         })
///     })
///     .collect();
/// for w in workers {
///     w.join().unwrap();
/// }
/// assert_eq!(pool.free_blocks(RegionId::DYNAMIC)?, 64);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct SharedBlockPool {
    inner: Mutex<BlockPool>,
}

impl SharedBlockPool {
    /// Wraps a pool.
    #[must_use]
    pub fn new(pool: BlockPool) -> Self {
        Self {
            inner: Mutex::new(pool),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BlockPool> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` with the pool locked: several operations, atomically.
    pub fn with<R>(&self, f: impl FnOnce(&mut BlockPool) -> R) -> R {
        f(&mut self.lock())
    }

    /// See [`BlockAllocator::allocate`].
    pub fn allocate(&self, region: RegionId) -> Result<BlockId, AllocError> {
        self.lock().allocate(region)
    }

    /// See [`BlockAllocator::allocate_after`].
    pub fn allocate_after(
        &self,
        region: RegionId,
        prev: Option<BlockId>,
    ) -> Result<BlockId, AllocError> {
        self.lock().allocate_after(region, prev)
    }

    /// See [`BlockAllocator::allocate_many`]; all blocks come from one lock hold.
    pub fn allocate_many(
        &self,
        region: RegionId,
        count: usize,
        out: &mut Vec<BlockId>,
    ) -> Result<(), AllocError> {
        self.lock().allocate_many(region, count, out)
    }

    /// See [`BlockAllocator::retain`].
    pub fn retain(&self, block: BlockId) -> Result<u32, RefError> {
        self.lock().retain(block)
    }

    /// See [`BlockAllocator::release`].
    pub fn release(&self, block: BlockId) -> Result<Released, RefError> {
        self.lock().release(block)
    }

    /// See [`BlockAllocator::make_writable`].
    pub fn make_writable(&self, block: BlockId, region: RegionId) -> Result<Writable, CowError> {
        self.lock().make_writable(block, region)
    }

    /// See [`BlockAllocator::free_blocks`].
    pub fn free_blocks(&self, region: RegionId) -> Result<usize, AllocError> {
        self.lock().free_blocks(region)
    }

    /// See [`BlockAllocator::can_allocate`].
    pub fn can_allocate(&self, region: RegionId, count: usize) -> Result<Admission, AllocError> {
        self.lock().can_allocate(region, count)
    }

    /// See [`BlockAllocator::resize`].
    pub fn resize(&self, from: RegionId, to: RegionId, count: usize) -> Result<(), ResizeError> {
        self.lock().resize(from, to, count)
    }

    /// See [`BlockPool::stats`].
    #[must_use]
    pub fn stats(&self) -> PoolStats {
        self.lock().stats()
    }

    /// Unwraps the pool.
    pub fn into_inner(self) -> BlockPool {
        self.inner
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A shared pool is an allocator through any reference to it.
impl BlockAllocator for &SharedBlockPool {
    fn allocate(&mut self, region: RegionId) -> Result<BlockId, AllocError> {
        SharedBlockPool::allocate(self, region)
    }
    fn allocate_after(
        &mut self,
        region: RegionId,
        prev: Option<BlockId>,
    ) -> Result<BlockId, AllocError> {
        SharedBlockPool::allocate_after(self, region, prev)
    }
    fn allocate_many(
        &mut self,
        region: RegionId,
        count: usize,
        out: &mut Vec<BlockId>,
    ) -> Result<(), AllocError> {
        SharedBlockPool::allocate_many(self, region, count, out)
    }
    fn retain(&mut self, block: BlockId) -> Result<u32, RefError> {
        SharedBlockPool::retain(self, block)
    }
    fn release(&mut self, block: BlockId) -> Result<Released, RefError> {
        SharedBlockPool::release(self, block)
    }
    fn refcount(&self, block: BlockId) -> Result<u32, RefError> {
        self.lock().refcount(block)
    }
    fn make_writable(&mut self, block: BlockId, region: RegionId) -> Result<Writable, CowError> {
        SharedBlockPool::make_writable(self, block, region)
    }
    fn free_blocks(&self, region: RegionId) -> Result<usize, AllocError> {
        SharedBlockPool::free_blocks(self, region)
    }
    fn total_blocks(&self) -> usize {
        self.lock().total_blocks()
    }
    fn can_allocate(&self, region: RegionId, count: usize) -> Result<Admission, AllocError> {
        SharedBlockPool::can_allocate(self, region, count)
    }
    fn region_of(&self, block: BlockId) -> Result<RegionId, RefError> {
        self.lock().region_of(block)
    }
    fn capacity(&self, region: RegionId) -> Result<usize, AllocError> {
        self.lock().capacity(region)
    }
    fn resize(&mut self, from: RegionId, to: RegionId, count: usize) -> Result<(), ResizeError> {
        SharedBlockPool::resize(self, from, to, count)
    }
}
