//! The [`BlockAllocator`] trait that schedulers and caches use to get and share blocks,
//! and the errors of its two operation families (allocation and reference counting).

use thiserror::Error;

use crate::{BlockId, RegionId};

/// Why blocks could not be allocated. Nothing was allocated when this is returned.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AllocError {
    /// The region has fewer free blocks than asked for.
    #[error("out of KV blocks in {region}: requested {requested}, free {free}")]
    OutOfBlocks {
        /// The region asked.
        region: RegionId,
        /// Blocks asked for.
        requested: usize,
        /// Blocks free in that region at the time.
        free: usize,
    },
    /// The pool has no such region.
    #[error("unknown region {region}")]
    UnknownRegion {
        /// The region asked.
        region: RegionId,
    },
    /// A sequence would hold more than `u64::MAX` tokens.
    #[error("{tokens} tokens plus {extra} more overflow a token count")]
    TooManyTokens {
        /// Tokens already written.
        tokens: u64,
        /// Tokens asked to append.
        extra: u64,
    },
}

/// Why a reference-count operation (retain or release) failed. The pool is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RefError {
    /// The id is outside the pool.
    #[error("unknown {block}: the pool has {num_blocks} blocks")]
    UnknownBlock {
        /// The id given.
        block: BlockId,
        /// Blocks in the pool.
        num_blocks: usize,
    },
    /// The block is free: releasing it again (a double release) or retaining it is a bug.
    #[error("{block} is not allocated (double release, or retain of a free block)")]
    NotAllocated {
        /// The id given.
        block: BlockId,
    },
    /// The block already has `u32::MAX` owners.
    #[error("{block} reference count would overflow")]
    RefcountOverflow {
        /// The id given.
        block: BlockId,
    },
}

/// Why blocks could not be moved between regions. Nothing moved.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ResizeError {
    /// The pool has no such region.
    #[error("unknown region {region}")]
    UnknownRegion {
        /// The region named.
        region: RegionId,
    },
    /// The source region has fewer free blocks than asked to move; in-use blocks never move.
    #[error("cannot move {requested} blocks out of {region}: only {free} are free")]
    NotEnoughFree {
        /// The source region.
        region: RegionId,
        /// Blocks asked to move.
        requested: usize,
        /// Free blocks there.
        free: usize,
    },
}

/// What a release did to the block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a release tells whether the block became free"]
pub enum Released {
    /// That was the last reference: the block is back on its region's free list.
    Freed,
    /// Other owners remain.
    Shared {
        /// References left after this release.
        remaining: u32,
    },
}

impl Released {
    /// Whether the block became free.
    #[must_use]
    pub const fn is_freed(self) -> bool {
        matches!(self, Released::Freed)
    }
}

/// Whether a request for blocks can be served, as an admission controller needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Enough free blocks now, leaving the watermark reserve intact.
    Now,
    /// Not now, but it would fit if blocks were freed: queue or preempt.
    Later,
    /// Never: even with every block of the region free it would not fit. Reject the request.
    Impossible,
}

/// Why a block could not be made writable. The block and the pool are unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CowError {
    /// The block is not a valid allocated block.
    #[error(transparent)]
    Ref(#[from] RefError),
    /// The block is shared and no block was free for the private copy.
    #[error(transparent)]
    Alloc(#[from] AllocError),
}

/// A block copy the kernels must perform (copy-on-write, compaction): copy all of `src`'s
/// K/V, in every layer, into `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockCopy {
    /// The block to read.
    pub src: BlockId,
    /// The block to write.
    pub dst: BlockId,
}

/// The result of [`BlockAllocator::make_writable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a copied block must be copied by the kernels and put in the block table"]
pub enum Writable {
    /// The caller was the only owner: write in place.
    Exclusive(BlockId),
    /// The block was shared: the caller's reference moved to a fresh block, whose contents must
    /// first be copied from the old one.
    Copied(BlockCopy),
}

impl Writable {
    /// The block the caller may now write into.
    #[must_use]
    pub const fn block(self) -> BlockId {
        match self {
            Writable::Exclusive(block) => block,
            Writable::Copied(copy) => copy.dst,
        }
    }
}

/// A source of KV blocks with reference counting.
///
/// Implemented by `kvc_alloc::BlockPool` (single-threaded) and `kvc_alloc::SharedBlockPool`
/// (thread-safe). Schedulers and caches are written against this trait.
pub trait BlockAllocator {
    /// Takes one free block from `region`, with a reference count of one.
    fn allocate(&mut self, region: RegionId) -> Result<BlockId, AllocError>;

    /// Like [`allocate`](Self::allocate), but prefers the block physically after `prev`, so a
    /// sequence's blocks form contiguous runs. Falls back to any free block of the region.
    fn allocate_after(
        &mut self,
        region: RegionId,
        prev: Option<BlockId>,
    ) -> Result<BlockId, AllocError> {
        let _ = prev;
        self.allocate(region)
    }

    /// Appends `count` blocks from `region` to `out`, all or nothing: on error the blocks
    /// this call took are released and `out` is as before. Each block prefers the physical
    /// successor of the block before it in `out` (so appending to a sequence's block list
    /// continues its run). The one allocate-with-rollback loop: callers that need several
    /// blocks call this rather than looping over [`allocate_after`](Self::allocate_after).
    fn allocate_many(
        &mut self,
        region: RegionId,
        count: usize,
        out: &mut Vec<BlockId>,
    ) -> Result<(), AllocError> {
        let free = self.free_blocks(region)?;
        if free < count {
            return Err(AllocError::OutOfBlocks {
                region,
                requested: count,
                free,
            });
        }
        allocate_into(self, region, count, out)
    }

    /// Adds an owner to an allocated block (sharing). Returns the new reference count.
    fn retain(&mut self, block: BlockId) -> Result<u32, RefError>;

    /// Adds an owner to each block in `blocks`, in order, as one [`retain`](Self::retain) per
    /// block would (a block named twice gains two owners). All or nothing.
    ///
    /// The default retains block by block and, on an error, gives back the references it took
    /// through [`release`](Self::release); an allocator may override it to take the whole
    /// batch in one pass, with the same result.
    ///
    /// # Errors
    /// The first [`RefError`] of the batch (an unknown id, a free block, or a reference count
    /// at its limit); no block keeps a reference from this call.
    fn retain_many(&mut self, blocks: &[BlockId]) -> Result<(), RefError> {
        for (i, &block) in blocks.iter().enumerate() {
            if let Err(err) = self.retain(block) {
                for &taken in &blocks[..i] {
                    // Taken just above: giving it back cannot fail unless the allocator is
                    // broken.
                    if let Err(e) = self.release(taken) {
                        debug_assert!(false, "undoing a retain of {taken}: {e}");
                    }
                }
                return Err(err);
            }
        }
        Ok(())
    }

    /// Drops one owner of a block; the last release returns it to its region's free list.
    fn release(&mut self, block: BlockId) -> Result<Released, RefError>;

    /// Drops one owner of each block in `blocks`, in order, exactly as one
    /// [`release`](Self::release) per block would, and returns how many blocks became free.
    /// Every block is processed, even after an error.
    ///
    /// The default calls `release` per block; an allocator may override it to take the whole
    /// batch in one pass, with the same result. [`BlockTable::release_all`] uses it.
    ///
    /// [`BlockTable::release_all`]: crate::BlockTable::release_all
    ///
    /// # Errors
    /// The first [`RefError`] of the batch (an unknown id, or a block with no owner left);
    /// the blocks after it are still released.
    fn release_each(&mut self, blocks: &[BlockId]) -> Result<usize, RefError> {
        release_one_by_one(self, blocks)
    }

    /// The reference count of an allocated block.
    fn refcount(&self, block: BlockId) -> Result<u32, RefError>;

    /// Copy-on-write: prepares `block`, which the caller holds one reference on, for writing.
    ///
    /// If the caller is its only owner the block is returned as is. Otherwise a block is
    /// allocated from `region`, the caller's reference moves to it, and the pair to copy is
    /// returned. On error nothing changes.
    fn make_writable(&mut self, block: BlockId, region: RegionId) -> Result<Writable, CowError> {
        if self.refcount(block)? == 1 {
            return Ok(Writable::Exclusive(block));
        }
        let dst = self.allocate(region)?;
        // Shared (refcount >= 2): this release cannot free the block.
        let released = self.release(block)?;
        debug_assert!(
            matches!(released, Released::Shared { .. }),
            "{block} was shared"
        );
        Ok(Writable::Copied(BlockCopy { src: block, dst }))
    }

    /// Free blocks in `region`.
    fn free_blocks(&self, region: RegionId) -> Result<usize, AllocError>;

    /// Blocks in the whole pool, free or not.
    fn total_blocks(&self) -> usize;

    /// The region a block belongs to.
    fn region_of(&self, block: BlockId) -> Result<RegionId, RefError>;

    /// Blocks `region` holds, free or in use.
    fn capacity(&self, region: RegionId) -> Result<usize, AllocError>;

    /// Moves `count` free blocks from region `from` to region `to` (to grow or shrink the
    /// pinned region). Blocks in use never move. All or nothing.
    fn resize(&mut self, from: RegionId, to: RegionId, count: usize) -> Result<(), ResizeError>;

    /// Whether `count` more blocks from `region` can be admitted now, later, or never.
    fn can_allocate(&self, region: RegionId, count: usize) -> Result<Admission, AllocError>;
}

/// A list blocks can be appended to and taken back from: `Vec` and the `SmallVec` of
/// [`BlockTable`](crate::BlockTable).
pub(crate) trait BlockList {
    fn len(&self) -> usize;
    fn last(&self) -> Option<BlockId>;
    fn push(&mut self, block: BlockId);
    fn pop(&mut self) -> Option<BlockId>;
}

impl BlockList for Vec<BlockId> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn last(&self) -> Option<BlockId> {
        self.as_slice().last().copied()
    }
    fn push(&mut self, block: BlockId) {
        Vec::push(self, block);
    }
    fn pop(&mut self) -> Option<BlockId> {
        Vec::pop(self)
    }
}

impl<const N: usize> BlockList for smallvec::SmallVec<[BlockId; N]> {
    fn len(&self) -> usize {
        smallvec::SmallVec::len(self)
    }
    fn last(&self) -> Option<BlockId> {
        self.as_slice().last().copied()
    }
    fn push(&mut self, block: BlockId) {
        smallvec::SmallVec::push(self, block);
    }
    fn pop(&mut self) -> Option<BlockId> {
        smallvec::SmallVec::pop(self)
    }
}

/// The one allocate-with-rollback loop: appends `count` blocks from `region` to `out`, each
/// preferring the physical successor of the block before it; on an error releases the blocks
/// it took, leaving `out` as it was. The caller has checked that `count` blocks are free.
pub(crate) fn allocate_into<A: BlockAllocator + ?Sized>(
    alloc: &mut A,
    region: RegionId,
    count: usize,
    out: &mut impl BlockList,
) -> Result<(), AllocError> {
    let start = out.len();
    for _ in 0..count {
        match alloc.allocate_after(region, out.last()) {
            Ok(block) => out.push(block),
            Err(err) => {
                while out.len() > start {
                    if let Some(block) = out.pop() {
                        // Freshly allocated, single owner: release cannot fail unless the
                        // allocator is broken.
                        if let Err(e) = alloc.release(block) {
                            debug_assert!(false, "undoing an allocation of {block}: {e}");
                        }
                    }
                }
                return Err(err);
            }
        }
    }
    Ok(())
}

/// [`BlockAllocator::release_each`] as its default does it: one
/// [`release`](BlockAllocator::release) per block, past the errors, returning how many blocks
/// became free or the first error. For an allocator whose own batch path falls back to it.
///
/// # Errors
/// The first [`RefError`] of the batch; the blocks after it are still released.
pub fn release_one_by_one<A: BlockAllocator + ?Sized>(
    alloc: &mut A,
    blocks: &[BlockId],
) -> Result<usize, RefError> {
    let mut freed = 0;
    let mut first_err = None;
    for &block in blocks {
        match alloc.release(block) {
            Ok(Released::Freed) => freed += 1,
            Ok(Released::Shared { .. }) => {}
            Err(err) => {
                first_err.get_or_insert(err);
            }
        }
    }
    first_err.map_or(Ok(freed), Err)
}
