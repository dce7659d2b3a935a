//! [`BlockPool`]: the physical block pool.
//!
//! One flat array of block metadata; each region threads an intrusive doubly linked free list
//! through it, so allocate, release, retain and removal from the middle of a free list are
//! O(1) and never touch the heap.

use thiserror::Error;

use kvc_core::{
    Admission, AllocError, BlockAllocator, BlockId, CowError, RefError, RegionId, Released,
    ResizeError, Writable,
};

use crate::config::{ConfigError, PoolConfig};
use crate::stats::{Fragmentation, PoolStats, RegionStats};

/// End of a free list.
const NIL: u32 = u32::MAX;

/// A pool invariant found broken by [`BlockPool::audit`]. Seeing one is a bug in kvc.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("block pool invariant broken: {0}")]
pub struct AuditError(String);

/// Per-block metadata. `prev`/`next` link the block into its region's free list while free.
#[derive(Clone, Copy, Debug)]
struct Meta {
    prev: u32,
    next: u32,
    refcount: u32,
    region: u8,
}

#[derive(Clone, Copy, Debug)]
struct Region {
    head: u32,
    tail: u32,
    free: u32,
    capacity: u32,
}

/// A fixed pool of KV blocks with reference counts, regions and copy-on-write.
///
/// ```
/// use kvc_alloc::{BlockPool, PoolConfig};
/// use kvc_alloc::{BlockAllocator, RegionId};
///
/// let mut pool = BlockPool::new(PoolConfig::new(8))?;
/// let a = pool.allocate(RegionId::DYNAMIC)?;
/// pool.retain(a)?; // shared by a second sequence
/// assert!(!pool.release(a)?.is_freed());
/// assert!(pool.release(a)?.is_freed());
/// assert!(pool.release(a).is_err()); // a double release is an error, not a panic
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct BlockPool {
    meta: Box<[Meta]>,
    regions: Box<[Region]>,
    watermark: u32,
    allocations: u64,
    releases: u64,
    frees: u64,
    cow_copies: u64,
}

impl BlockPool {
    /// Builds a pool; every block starts free, in ascending id order within its region.
    pub fn new(config: PoolConfig) -> Result<Self, ConfigError> {
        let sizes = config.region_sizes()?;
        let total: u32 = sizes.iter().sum();
        // The metadata (16 bytes a block) is reserved fallibly: a pool of billions of blocks
        // is a typed error where memory cannot hold it, not an aborted process.
        let mut meta: Vec<Meta> = Vec::new();
        meta.try_reserve_exact(total as usize)
            .map_err(|_| ConfigError::OutOfMemory {
                blocks: u64::from(total),
                bytes: u64::from(total).saturating_mul(std::mem::size_of::<Meta>() as u64),
            })?;
        let mut regions = Vec::with_capacity(sizes.len());
        let mut start = 0u32;
        for (index, &size) in sizes.iter().enumerate() {
            let end = start + size;
            meta.extend((start..end).map(|id| Meta {
                prev: if id == start { NIL } else { id - 1 },
                next: if id + 1 == end { NIL } else { id + 1 },
                refcount: 0,
                region: index as u8,
            }));
            regions.push(Region {
                head: if size == 0 { NIL } else { start },
                tail: if size == 0 { NIL } else { end - 1 },
                free: size,
                capacity: size,
            });
            start = end;
        }
        let watermark = u32::try_from(config.watermark).unwrap_or(u32::MAX);
        Ok(Self {
            meta: meta.into_boxed_slice(),
            regions: regions.into_boxed_slice(),
            watermark,
            allocations: 0,
            releases: 0,
            frees: 0,
            cow_copies: 0,
        })
    }

    /// Regions in the pool (ids `0..num_regions`).
    #[must_use]
    pub fn num_regions(&self) -> usize {
        self.regions.len()
    }

    /// Whether a block is free.
    pub fn is_free(&self, block: BlockId) -> Result<bool, RefError> {
        Ok(self.meta_of(block)?.refcount == 0)
    }

    /// Blocks of the dynamic region kept back from admission.
    #[must_use]
    pub fn watermark(&self) -> usize {
        self.watermark as usize
    }

    /// Changes the admission reserve of the dynamic region, under the rule of
    /// [`PoolConfig::watermark`]: smaller than the dynamic region's current capacity, or 0.
    /// (Moving blocks out of the dynamic region later may still leave it no larger than the
    /// reserve; admissions there are then [`Admission::Impossible`] until it grows back.)
    ///
    /// # Errors
    /// [`ConfigError::WatermarkTooLarge`] when the reserve would leave nothing to admit; the
    /// reserve is unchanged.
    pub fn set_watermark(&mut self, blocks: usize) -> Result<(), ConfigError> {
        let dynamic = self.regions[RegionId::DYNAMIC.index()].capacity;
        match u32::try_from(blocks) {
            Ok(w) if w == 0 || w < dynamic => {
                self.watermark = w;
                Ok(())
            }
            _ => Err(ConfigError::WatermarkTooLarge {
                watermark: blocks as u64,
                dynamic: u64::from(dynamic),
            }),
        }
    }

    /// Counters and per-region occupancy.
    #[must_use]
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            total: self.meta.len(),
            regions: self
                .regions
                .iter()
                .enumerate()
                .map(|(i, r)| RegionStats {
                    region: RegionId(i as u8),
                    capacity: r.capacity as usize,
                    free: r.free as usize,
                    used: (r.capacity - r.free) as usize,
                })
                .collect(),
            allocations: self.allocations,
            releases: self.releases,
            frees: self.frees,
            cow_copies: self.cow_copies,
        }
    }

    /// How fragmented a region's free space is: its largest run of physically adjacent free
    /// blocks against its free blocks. O(pool size): for reports, not the hot path.
    pub fn fragmentation(&self, region: RegionId) -> Result<Fragmentation, AllocError> {
        let free = self.region(region)?.free as usize;
        let (mut largest, mut run) = (0usize, 0usize);
        for m in self.meta.iter() {
            if m.refcount == 0 && m.region == region.0 {
                run += 1;
                largest = largest.max(run);
            } else {
                run = 0;
            }
        }
        Ok(Fragmentation {
            free_blocks: free,
            largest_free_run: largest,
        })
    }

    /// Walks every free list and checks the pool's invariants: each free block is listed once
    /// in its own region's list, links are symmetric, counts match, allocated blocks are on no
    /// list. O(pool size); meant for tests and debugging.
    pub fn audit(&self) -> Result<(), AuditError> {
        let fail = |msg: String| Err(AuditError(msg));
        let mut seen = vec![false; self.meta.len()];
        let mut capacity_sum = 0usize;
        for (ri, r) in self.regions.iter().enumerate() {
            capacity_sum += r.capacity as usize;
            let (mut count, mut prev, mut cur) = (0u32, NIL, r.head);
            while cur != NIL {
                let Some(m) = self.meta.get(cur as usize) else {
                    return fail(format!("region {ri} lists unknown block {cur}"));
                };
                if seen[cur as usize] {
                    return fail(format!("block {cur} listed twice"));
                }
                seen[cur as usize] = true;
                if m.refcount != 0 {
                    return fail(format!(
                        "block {cur} is free-listed with refcount {}",
                        m.refcount
                    ));
                }
                if m.region as usize != ri || m.prev != prev {
                    return fail(format!("block {cur} has a broken link or region"));
                }
                count += 1;
                prev = cur;
                cur = m.next;
            }
            if prev != r.tail || count != r.free {
                return fail(format!(
                    "region {ri}: list of {count} ends at {prev}, header says {} free ending at {}",
                    r.free, r.tail
                ));
            }
        }
        if capacity_sum != self.meta.len() {
            return fail(format!(
                "capacities sum to {capacity_sum}, pool has {}",
                self.meta.len()
            ));
        }
        let mut used = vec![0u32; self.regions.len()];
        for (i, m) in self.meta.iter().enumerate() {
            if m.refcount == 0 && !seen[i] {
                return fail(format!("free block {i} is on no list"));
            }
            if m.refcount > 0 {
                used[m.region as usize] += 1;
            }
        }
        for (ri, r) in self.regions.iter().enumerate() {
            if r.capacity - r.free != used[ri] {
                return fail(format!(
                    "region {ri}: {} used counted, header says {}",
                    used[ri],
                    r.capacity - r.free
                ));
            }
        }
        Ok(())
    }

    /// Drops one owner of every block in `blocks`, in order, as that many
    /// [`release`](BlockAllocator::release) calls would: a block whose last owner goes returns
    /// to the tail of its region's free list. Returns how many blocks became free.
    ///
    /// One pass for a whole batch (a cache's eviction victims, a finished sequence's blocks),
    /// without a call and a [`Released`] per block.
    ///
    /// # Errors
    /// All or nothing: [`RefError::UnknownBlock`] for an id outside the pool,
    /// [`RefError::NotAllocated`] for a free block, or for one named more times than it has
    /// owners; the error names the first such block and the pool is exactly as before the
    /// call (every release this call had applied is undone, free-list order included).
    ///
    /// ```
    /// use kvc_alloc::{BlockAllocator, BlockId, BlockPool, PoolConfig, RefError, RegionId};
    ///
    /// let mut pool = BlockPool::new(PoolConfig::new(8))?;
    /// let mut blocks = Vec::new();
    /// pool.allocate_many(RegionId::DYNAMIC, 3, &mut blocks)?;
    /// pool.retain(blocks[0])?; // shared by a second owner
    /// assert_eq!(pool.release_many(&blocks)?, 2); // blocks[0] keeps one owner
    /// assert_eq!(pool.free_blocks(RegionId::DYNAMIC)?, 7);
    ///
    /// // blocks[1] is free already: nothing is released, not even blocks[0].
    /// let err = pool.release_many(&[blocks[0], blocks[1]]).unwrap_err();
    /// assert_eq!(err, RefError::NotAllocated { block: blocks[1] });
    /// assert_eq!(pool.refcount(blocks[0])?, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn release_many(&mut self, blocks: &[BlockId]) -> Result<usize, RefError> {
        let num_blocks = self.meta.len();
        let mut freed = 0usize;
        for (done, &block) in blocks.iter().enumerate() {
            let err = match self.meta.get_mut(block.index()) {
                Some(m) if m.refcount > 1 => {
                    m.refcount -= 1;
                    continue;
                }
                Some(m) if m.refcount == 1 => {
                    // `push_tail`, with the metadata already in hand.
                    m.refcount = 0;
                    m.next = NIL;
                    let r = &mut self.regions[usize::from(m.region)];
                    let tail = std::mem::replace(&mut r.tail, block.0);
                    m.prev = tail;
                    r.free += 1;
                    if tail == NIL {
                        r.head = block.0;
                    } else {
                        self.meta[tail as usize].next = block.0;
                    }
                    freed += 1;
                    continue;
                }
                Some(_) => RefError::NotAllocated { block },
                None => RefError::UnknownBlock { block, num_blocks },
            };
            self.undo_releases(&blocks[..done]);
            return Err(err);
        }
        self.releases += blocks.len() as u64;
        self.frees += freed as u64;
        Ok(freed)
    }

    /// Takes back the releases [`Self::release_many`] applied to `done` (all valid), last
    /// first: a block freed by them is the free list's tail by then, so unlinking it restores
    /// the list as it was.
    #[cold]
    fn undo_releases(&mut self, done: &[BlockId]) {
        for &block in done.iter().rev() {
            let id = block.0;
            if self.meta[id as usize].refcount == 0 {
                self.unlink(id);
            }
            self.meta[id as usize].refcount += 1;
        }
    }

    /// Takes back the retains [`BlockAllocator::retain_many`] applied to `done` (all valid:
    /// each count was raised from at least 1, so lowering it frees nothing).
    #[cold]
    fn undo_retains(&mut self, done: &[BlockId]) {
        for &block in done {
            self.meta[block.index()].refcount -= 1;
        }
    }

    fn region(&self, region: RegionId) -> Result<&Region, AllocError> {
        self.regions
            .get(region.index())
            .ok_or(AllocError::UnknownRegion { region })
    }

    fn meta_of(&self, block: BlockId) -> Result<&Meta, RefError> {
        self.meta.get(block.index()).ok_or(RefError::UnknownBlock {
            block,
            num_blocks: self.meta.len(),
        })
    }

    /// The metadata of an allocated block: unknown ids and free blocks are errors.
    #[inline]
    fn allocated_mut(&mut self, block: BlockId) -> Result<&mut Meta, RefError> {
        let num_blocks = self.meta.len();
        let m = self
            .meta
            .get_mut(block.index())
            .ok_or(RefError::UnknownBlock { block, num_blocks })?;
        if m.refcount == 0 {
            return Err(RefError::NotAllocated { block });
        }
        Ok(m)
    }

    /// Removes a free block from its region's free list (O(1), from anywhere in the list).
    #[inline]
    fn unlink(&mut self, id: u32) {
        let Meta {
            prev, next, region, ..
        } = self.meta[id as usize];
        let r = &mut self.regions[region as usize];
        if prev == NIL {
            r.head = next;
        } else {
            self.meta[prev as usize].next = next;
        }
        if next == NIL {
            r.tail = prev;
        } else {
            self.meta[next as usize].prev = prev;
        }
        r.free -= 1;
        let m = &mut self.meta[id as usize];
        m.prev = NIL;
        m.next = NIL;
    }

    /// Appends a block to the tail of its region's free list.
    #[inline]
    fn push_tail(&mut self, id: u32) {
        let region = self.meta[id as usize].region as usize;
        let r = &mut self.regions[region];
        let tail = r.tail;
        r.tail = id;
        if tail == NIL {
            r.head = id;
        } else {
            self.meta[tail as usize].next = id;
        }
        r.free += 1;
        let m = &mut self.meta[id as usize];
        m.prev = tail;
        m.next = NIL;
    }

    #[inline]
    fn take(&mut self, id: u32) -> BlockId {
        self.unlink(id);
        self.meta[id as usize].refcount = 1;
        self.allocations += 1;
        BlockId(id)
    }
}

impl BlockAllocator for BlockPool {
    #[inline]
    fn allocate(&mut self, region: RegionId) -> Result<BlockId, AllocError> {
        let head = self.region(region)?.head;
        if head == NIL {
            return Err(AllocError::OutOfBlocks {
                region,
                requested: 1,
                free: 0,
            });
        }
        Ok(self.take(head))
    }

    #[inline]
    fn allocate_after(
        &mut self,
        region: RegionId,
        prev: Option<BlockId>,
    ) -> Result<BlockId, AllocError> {
        if let Some(next) = prev.and_then(|p| p.0.checked_add(1))
            && let Some(m) = self.meta.get(next as usize)
            && m.refcount == 0
            && m.region == region.0
        {
            return Ok(self.take(next));
        }
        self.allocate(region)
    }

    /// Pops blocks in one pass over the free list, still preferring each block's physical
    /// successor (the first, that of `out`'s last block), without the per-call overhead of
    /// the trait's default.
    fn allocate_many(
        &mut self,
        region: RegionId,
        count: usize,
        out: &mut Vec<BlockId>,
    ) -> Result<(), AllocError> {
        let free = self.region(region)?.free as usize;
        if free < count {
            return Err(AllocError::OutOfBlocks {
                region,
                requested: count,
                free,
            });
        }
        // One run: the region's counters change once, and `out` grows without a capacity
        // check per block.
        let meta = &mut self.meta;
        let r = &mut self.regions[region.index()];
        let mut prev = out.last().map_or(NIL, |b| b.0);
        out.extend((0..count).map(|_| {
            let succ = prev.wrapping_add(1);
            // Each branch sets the taken block's metadata while it holds it.
            let id = match meta.get_mut(succ as usize) {
                Some(m) if prev != NIL && m.refcount == 0 && m.region == region.0 => {
                    // The physical successor, from anywhere in the free list.
                    let Meta { prev: p, next, .. } = *m;
                    *m = Meta {
                        prev: NIL,
                        next: NIL,
                        refcount: 1,
                        region: m.region,
                    };
                    if p == NIL {
                        r.head = next;
                    } else {
                        meta[p as usize].next = next;
                    }
                    if next == NIL {
                        r.tail = p;
                    } else {
                        meta[next as usize].prev = p;
                    }
                    succ
                }
                _ => {
                    // The head (the caller checked `count` blocks are free).
                    let head = r.head;
                    let m = &mut meta[head as usize];
                    let next = m.next;
                    *m = Meta {
                        prev: NIL,
                        next: NIL,
                        refcount: 1,
                        region: m.region,
                    };
                    r.head = next;
                    if next == NIL {
                        r.tail = NIL;
                    } else {
                        meta[next as usize].prev = NIL;
                    }
                    head
                }
            };
            prev = id;
            BlockId(id)
        }));
        r.free -= count as u32;
        self.allocations += count as u64;
        Ok(())
    }

    #[inline]
    fn retain(&mut self, block: BlockId) -> Result<u32, RefError> {
        let m = self.allocated_mut(block)?;
        m.refcount = m
            .refcount
            .checked_add(1)
            .ok_or(RefError::RefcountOverflow { block })?;
        Ok(m.refcount)
    }

    /// One pass over the batch, without a call and a `Result` per block. On an error the
    /// counts this call raised are lowered again, so the pool is exactly as before the call
    /// (the trait's default gives them back through `release`, which also counts those
    /// releases in [`BlockPool::stats`]).
    fn retain_many(&mut self, blocks: &[BlockId]) -> Result<(), RefError> {
        for (done, &block) in blocks.iter().enumerate() {
            let err = match self.meta.get_mut(block.index()) {
                // Allocated, and one more owner fits.
                Some(m) if m.refcount.wrapping_sub(1) < u32::MAX - 1 => {
                    m.refcount += 1;
                    continue;
                }
                Some(m) if m.refcount == 0 => RefError::NotAllocated { block },
                Some(_) => RefError::RefcountOverflow { block },
                None => RefError::UnknownBlock {
                    block,
                    num_blocks: self.meta.len(),
                },
            };
            self.undo_retains(&blocks[..done]);
            return Err(err);
        }
        Ok(())
    }

    /// One pass of [`BlockPool::release_many`] for a valid batch; a batch with an error
    /// (which `release_many` leaves undone) is then released block by block, past its errors,
    /// as the trait's default does. The same pool either way.
    fn release_each(&mut self, blocks: &[BlockId]) -> Result<usize, RefError> {
        match self.release_many(blocks) {
            Ok(freed) => Ok(freed),
            Err(_) => kvc_core::release_one_by_one(self, blocks),
        }
    }

    #[inline]
    fn release(&mut self, block: BlockId) -> Result<Released, RefError> {
        let m = self.allocated_mut(block)?;
        m.refcount -= 1;
        let remaining = m.refcount;
        self.releases += 1;
        if remaining > 0 {
            return Ok(Released::Shared { remaining });
        }
        self.frees += 1;
        self.push_tail(block.0);
        Ok(Released::Freed)
    }

    fn refcount(&self, block: BlockId) -> Result<u32, RefError> {
        let m = self.meta_of(block)?;
        if m.refcount == 0 {
            return Err(RefError::NotAllocated { block });
        }
        Ok(m.refcount)
    }

    fn make_writable(&mut self, block: BlockId, region: RegionId) -> Result<Writable, CowError> {
        if self.refcount(block)? == 1 {
            return Ok(Writable::Exclusive(block));
        }
        let dst = self.allocate(region)?;
        self.meta[block.index()].refcount -= 1; // shared: stays allocated
        self.releases += 1;
        self.cow_copies += 1;
        Ok(Writable::Copied(kvc_core::BlockCopy { src: block, dst }))
    }

    fn free_blocks(&self, region: RegionId) -> Result<usize, AllocError> {
        Ok(self.region(region)?.free as usize)
    }

    fn total_blocks(&self) -> usize {
        self.meta.len()
    }

    fn region_of(&self, block: BlockId) -> Result<RegionId, RefError> {
        Ok(RegionId(self.meta_of(block)?.region))
    }

    fn capacity(&self, region: RegionId) -> Result<usize, AllocError> {
        Ok(self.region(region)?.capacity as usize)
    }

    fn resize(&mut self, from: RegionId, to: RegionId, count: usize) -> Result<(), ResizeError> {
        let src = self
            .regions
            .get(from.index())
            .ok_or(ResizeError::UnknownRegion { region: from })?;
        if to.index() >= self.regions.len() {
            return Err(ResizeError::UnknownRegion { region: to });
        }
        if (src.free as usize) < count {
            return Err(ResizeError::NotEnoughFree {
                region: from,
                requested: count,
                free: src.free as usize,
            });
        }
        if from == to {
            return Ok(());
        }
        for _ in 0..count {
            // Take from the tail: the most recently freed, least likely to extend a run.
            let id = self.regions[from.index()].tail;
            self.unlink(id);
            self.regions[from.index()].capacity -= 1;
            self.meta[id as usize].region = to.0;
            self.regions[to.index()].capacity += 1;
            self.push_tail(id);
        }
        Ok(())
    }

    fn can_allocate(&self, region: RegionId, count: usize) -> Result<Admission, AllocError> {
        let r = self.region(region)?;
        let reserve = if region == RegionId::DYNAMIC {
            self.watermark.min(r.capacity) as usize
        } else {
            0
        };
        Ok(if count > r.capacity as usize - reserve {
            Admission::Impossible
        } else if count + reserve <= r.free as usize {
            Admission::Now
        } else {
            Admission::Later
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: u64) -> BlockPool {
        BlockPool::new(PoolConfig::new(n)).unwrap()
    }

    #[test]
    fn allocation_order_is_ascending_and_exhaustion_is_typed() {
        let mut p = pool(3);
        let got: Vec<_> = (0..3)
            .map(|_| p.allocate(RegionId::DYNAMIC).unwrap())
            .collect();
        assert_eq!(got, [BlockId(0), BlockId(1), BlockId(2)]);
        assert_eq!(
            p.allocate(RegionId::DYNAMIC),
            Err(AllocError::OutOfBlocks {
                region: RegionId::DYNAMIC,
                requested: 1,
                free: 0
            })
        );
        p.audit().unwrap();
    }

    #[test]
    fn bad_releases_are_errors_and_change_nothing() {
        let mut p = pool(4);
        let a = p.allocate(RegionId::DYNAMIC).unwrap();
        assert!(p.release(a).unwrap().is_freed());
        assert_eq!(p.release(a), Err(RefError::NotAllocated { block: a }));
        assert_eq!(p.retain(a), Err(RefError::NotAllocated { block: a }));
        assert_eq!(
            p.release(BlockId(99)),
            Err(RefError::UnknownBlock {
                block: BlockId(99),
                num_blocks: 4
            })
        );
        assert_eq!(p.free_blocks(RegionId::DYNAMIC), Ok(4));
        assert_eq!(p.stats().frees, 1);
        p.audit().unwrap();
    }

    #[test]
    fn release_many_is_all_or_nothing_and_keeps_the_free_list_order() {
        let mut p = pool(6);
        let mut blocks = Vec::new();
        p.allocate_many(RegionId::DYNAMIC, 5, &mut blocks).unwrap();
        p.retain(blocks[1]).unwrap();
        let before = format!("{p:?}");
        // A repeat beyond the owners it has: the second blocks[0] is a double release.
        for bad in [
            vec![blocks[3], blocks[0], blocks[1], blocks[0]],
            vec![blocks[2], BlockId(6)],
            vec![blocks[4], BlockId(5)],
        ] {
            let err = p.release_many(&bad).unwrap_err();
            let want = match bad.last() {
                Some(&BlockId(6)) => RefError::UnknownBlock {
                    block: BlockId(6),
                    num_blocks: 6,
                },
                Some(&block) => RefError::NotAllocated { block },
                None => unreachable!(),
            };
            assert_eq!(err, want);
            assert_eq!(format!("{p:?}"), before, "{bad:?} changed the pool");
        }
        // Valid, with a block named twice (it has two owners): the same as one by one.
        let mut one_by_one = p.clone();
        let batch = [blocks[3], blocks[1], blocks[0], blocks[1]];
        assert_eq!(p.release_many(&batch), Ok(3));
        for b in batch {
            let _ = one_by_one.release(b).unwrap();
        }
        assert_eq!(format!("{p:?}"), format!("{one_by_one:?}"));
        assert_eq!(p.stats().releases, 4);
        assert_eq!(p.stats().frees, 3);
        assert_eq!(p.release_many(&[]), Ok(0));
        p.audit().unwrap();
    }

    /// `release_each` (one `release_many` pass, or block by block after an error) leaves the
    /// pool exactly as one `release` per block does, returns the same count of freed blocks
    /// or the same first error, and processes the blocks after an error.
    #[test]
    fn release_each_is_release_per_block() {
        let mut p = pool(8);
        let mut blocks = Vec::new();
        p.allocate_many(RegionId::DYNAMIC, 6, &mut blocks).unwrap();
        p.retain(blocks[1]).unwrap();
        p.retain(blocks[4]).unwrap();
        let one_by_one = |p: &mut BlockPool, batch: &[BlockId]| {
            let mut freed = 0;
            let mut first_err = None;
            for &b in batch {
                match p.release(b) {
                    Ok(Released::Freed) => freed += 1,
                    Ok(Released::Shared { .. }) => {}
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            first_err.map_or(Ok(freed), Err)
        };
        for batch in [
            // Valid, a block named twice (it has two owners).
            vec![blocks[3], blocks[1], blocks[1]],
            // An unknown id, then blocks that must still be released.
            vec![blocks[0], BlockId(99), blocks[4]],
            // A block freed above (no owner left) and a double release.
            vec![blocks[2], blocks[3], blocks[5], blocks[2], blocks[4]],
            vec![],
        ] {
            let mut want = p.clone();
            let expected = one_by_one(&mut want, &batch);
            assert_eq!(p.release_each(&batch), expected, "{batch:?}");
            assert_eq!(format!("{p:?}"), format!("{want:?}"), "{batch:?}");
        }
        assert_eq!(
            p.free_blocks(RegionId::DYNAMIC),
            Ok(8),
            "every block released"
        );
        p.audit().unwrap();
    }

    /// `retain_many` gives each block of a valid batch one more owner exactly as one `retain`
    /// per block does; on a batch with an error it returns the error the per-block path meets
    /// first and leaves the pool as before the call. The trait's default (through
    /// `&SharedBlockPool`, which does not override it) agrees on every result and leaves the
    /// same blocks, counts and free list (it only counts its give-backs as releases).
    #[test]
    fn retain_many_is_retain_per_block_all_or_nothing() {
        let mut p = pool(8);
        let mut blocks = Vec::new();
        p.allocate_many(RegionId::DYNAMIC, 6, &mut blocks).unwrap();
        let _ = p.release(blocks[4]).unwrap(); // free again
        p.meta[blocks[3].index()].refcount = u32::MAX - 2; // two owners short of the limit
        let per_block = |p: &mut BlockPool, batch: &[BlockId]| {
            batch.iter().try_for_each(|&b| p.retain(b).map(|_| ()))
        };
        for batch in [
            // Valid, a block named twice.
            vec![blocks[0], blocks[1], blocks[0]],
            // Errors after valid blocks: an unknown id, a free block, the limit reached by
            // the second naming of a block, and the limit reached by a block named three
            // times (valid up to the third).
            vec![blocks[2], BlockId(99), blocks[1]],
            vec![blocks[1], blocks[0], blocks[4], blocks[2]],
            vec![blocks[3], blocks[5], blocks[3], blocks[3]],
            vec![BlockId(8)],
            // Valid: the block reaches its limit exactly.
            vec![blocks[5], blocks[3], blocks[3]],
            vec![blocks[3]],
            vec![],
        ] {
            let before = p.clone();
            let mut want = p.clone();
            let expected = per_block(&mut want, &batch);
            let shared = crate::SharedBlockPool::new(p.clone());
            let default = (&shared).retain_many(&batch);
            let got = p.retain_many(&batch);
            assert_eq!(got, expected, "{batch:?}");
            assert_eq!(default, expected, "{batch:?}");
            let settled = if expected.is_ok() { &want } else { &before };
            assert_eq!(format!("{p:?}"), format!("{settled:?}"), "{batch:?}");
            let by_default = shared.into_inner();
            assert_eq!(
                format!("{:?}", (&by_default.meta, &by_default.regions)),
                format!("{:?}", (&p.meta, &p.regions)),
                "{batch:?}"
            );
        }
        assert_eq!(p.refcount(blocks[0]), Ok(3));
        assert_eq!(p.refcount(blocks[3]), Ok(u32::MAX));
        p.audit().unwrap();
    }

    #[test]
    fn refcount_overflow_is_an_error() {
        let mut p = pool(1);
        let a = p.allocate(RegionId::DYNAMIC).unwrap();
        p.meta[0].refcount = u32::MAX;
        assert_eq!(p.retain(a), Err(RefError::RefcountOverflow { block: a }));
        assert_eq!(p.refcount(a), Ok(u32::MAX));
    }

    #[test]
    fn allocate_after_prefers_the_next_block_even_from_the_middle_of_the_list() {
        let mut p = pool(8);
        let blocks: Vec<_> = (0..8)
            .map(|_| p.allocate(RegionId::DYNAMIC).unwrap())
            .collect();
        // Free 5, 2, 3 in that order: the free list is 5 -> 2 -> 3.
        for i in [5, 2, 3] {
            let _ = p.release(blocks[i]).unwrap();
        }
        assert_eq!(
            p.allocate_after(RegionId::DYNAMIC, Some(BlockId(1))),
            Ok(BlockId(2))
        );
        assert_eq!(
            p.allocate_after(RegionId::DYNAMIC, Some(BlockId(2))),
            Ok(BlockId(3))
        );
        // No free neighbour: falls back to the head.
        assert_eq!(
            p.allocate_after(RegionId::DYNAMIC, Some(BlockId(3))),
            Ok(BlockId(5))
        );
        p.audit().unwrap();
    }

    #[test]
    fn regions_are_separate_and_resize_moves_only_free_blocks() {
        let mut p = BlockPool::new(PoolConfig::new(10).pinned(4)).unwrap();
        let pinned: Vec<_> = (0..4)
            .map(|_| p.allocate(RegionId::PINNED).unwrap())
            .collect();
        assert!(pinned.iter().all(|b| b.0 < 4));
        assert!(p.allocate(RegionId::PINNED).is_err());
        assert_eq!(p.free_blocks(RegionId::DYNAMIC), Ok(6));
        assert_eq!(
            p.resize(RegionId::PINNED, RegionId::DYNAMIC, 1),
            Err(ResizeError::NotEnoughFree {
                region: RegionId::PINNED,
                requested: 1,
                free: 0
            })
        );
        p.resize(RegionId::DYNAMIC, RegionId::PINNED, 2).unwrap();
        assert_eq!(p.capacity(RegionId::PINNED), Ok(6));
        assert_eq!(p.free_blocks(RegionId::PINNED), Ok(2));
        let moved = p.allocate(RegionId::PINNED).unwrap();
        assert_eq!(p.region_of(moved), Ok(RegionId::PINNED));
        assert_eq!(
            p.resize(RegionId(7), RegionId::PINNED, 1),
            Err(ResizeError::UnknownRegion {
                region: RegionId(7)
            })
        );
        let s = p.stats();
        assert_eq!(s.regions[0].used, 5);
        assert_eq!(s.regions[1].capacity, 4);
        p.audit().unwrap();
    }

    #[test]
    fn admission_separates_later_from_impossible() {
        let mut p = BlockPool::new(PoolConfig::new(10).watermark(2)).unwrap();
        assert_eq!(p.can_allocate(RegionId::DYNAMIC, 8), Ok(Admission::Now));
        assert_eq!(
            p.can_allocate(RegionId::DYNAMIC, 9),
            Ok(Admission::Impossible)
        );
        let a = p.allocate(RegionId::DYNAMIC).unwrap();
        assert_eq!(p.can_allocate(RegionId::DYNAMIC, 8), Ok(Admission::Later));
        assert_eq!(p.can_allocate(RegionId::DYNAMIC, 7), Ok(Admission::Now));
        assert_eq!(
            p.can_allocate(RegionId::PINNED, 1),
            Ok(Admission::Impossible)
        );
        assert_eq!(
            p.can_allocate(RegionId(9), 1),
            Err(AllocError::UnknownRegion {
                region: RegionId(9)
            })
        );
        let _ = p.release(a).unwrap();
    }

    #[test]
    fn copy_on_write_moves_only_the_writers_reference() {
        let mut p = pool(4);
        let a = p.allocate(RegionId::DYNAMIC).unwrap();
        assert_eq!(
            p.make_writable(a, RegionId::DYNAMIC),
            Ok(Writable::Exclusive(a))
        );
        p.retain(a).unwrap();
        let Writable::Copied(copy) = p.make_writable(a, RegionId::DYNAMIC).unwrap() else {
            panic!("shared block must be copied");
        };
        assert_eq!(copy.src, a);
        assert_eq!(p.refcount(a), Ok(1));
        assert_eq!(p.refcount(copy.dst), Ok(1));
        assert_eq!(p.stats().cow_copies, 1);
        // Out of blocks: the shared block keeps both references.
        let _x = p.allocate(RegionId::DYNAMIC).unwrap();
        let _y = p.allocate(RegionId::DYNAMIC).unwrap();
        p.retain(a).unwrap();
        assert!(matches!(
            p.make_writable(a, RegionId::DYNAMIC),
            Err(CowError::Alloc(AllocError::OutOfBlocks { .. }))
        ));
        assert_eq!(p.refcount(a), Ok(2));
        p.audit().unwrap();
    }

    #[test]
    fn fragmentation_reports_the_largest_free_run() {
        let mut p = pool(8);
        let blocks: Vec<_> = (0..8)
            .map(|_| p.allocate(RegionId::DYNAMIC).unwrap())
            .collect();
        for i in [0, 2, 3, 4, 7] {
            let _ = p.release(blocks[i]).unwrap();
        }
        let f = p.fragmentation(RegionId::DYNAMIC).unwrap();
        assert_eq!((f.free_blocks, f.largest_free_run), (5, 3));
        assert!((f.contiguity() - 0.6).abs() < 1e-12);
    }

    #[test]
    fn bad_configs_are_rejected() {
        assert_eq!(
            BlockPool::new(PoolConfig::new(0)).err(),
            Some(ConfigError::Empty)
        );
        assert!(matches!(
            BlockPool::new(PoolConfig::new(4).pinned(5)).err(),
            Some(ConfigError::RegionsExceedPool {
                carved: 5,
                total: 4
            })
        ));
        assert!(matches!(
            BlockPool::new(PoolConfig::new(u64::from(u32::MAX))).err(),
            Some(ConfigError::TooManyBlocks { .. })
        ));
        // A reserve as large as the dynamic region would make every admission Impossible.
        assert_eq!(
            BlockPool::new(PoolConfig::new(8).pinned(4).watermark(4)).err(),
            Some(ConfigError::WatermarkTooLarge {
                watermark: 4,
                dynamic: 4
            })
        );
        let mut p = BlockPool::new(PoolConfig::new(8).pinned(4).watermark(3)).unwrap();
        assert_eq!(p.can_allocate(RegionId::DYNAMIC, 1), Ok(Admission::Now));
        // The same rule at run time; a refused reserve leaves the old one.
        assert_eq!(
            p.set_watermark(4),
            Err(ConfigError::WatermarkTooLarge {
                watermark: 4,
                dynamic: 4
            })
        );
        assert_eq!(p.watermark(), 3);
        assert_eq!(p.set_watermark(0), Ok(()));
        assert_eq!(p.can_allocate(RegionId::DYNAMIC, 4), Ok(Admission::Now));
        assert_eq!(p.set_watermark(2), Ok(()));
        assert_eq!(
            p.can_allocate(RegionId::DYNAMIC, 3),
            Ok(Admission::Impossible)
        );
        let cfg = PoolConfig::new(10).pinned(2);
        let extra = cfg.next_region_id();
        let p = BlockPool::new(cfg.region(3)).unwrap();
        assert_eq!(p.capacity(extra), Ok(3));
        assert_eq!(p.capacity(RegionId::DYNAMIC), Ok(5));
        p.audit().unwrap();
    }
}
