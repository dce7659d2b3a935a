//! [`BlockTable`]: the logical-to-physical map of one sequence's KV.

use smallvec::SmallVec;

use crate::{
    AllocError, BlockAllocator, BlockCopy, BlockId, CowError, RefError, RegionId, Writable,
};

/// A sequence's block table: token `i` lives in block `blocks[i / block_size]` at offset
/// `i % block_size`. The table owns one reference on each of its blocks.
///
/// A table is not `Clone`: a copy would own no references of its own. [`fork`](Self::fork)
/// makes a second table that takes its own reference on every block through the allocator.
///
/// Short sequences keep their blocks inline (no heap allocation up to 8 blocks). For very
/// long sequences that fork (parallel sampling, beam search) see `kvc_alloc::ChunkedBlockTable`,
/// whose fork is O(chunks).
///
/// ```
/// use kvc_core::{BlockAllocator, BlockTable, RegionId};
/// # fn demo(pool: &mut impl BlockAllocator) -> Result<(), Box<dyn std::error::Error>> {
/// let mut table = BlockTable::new(16);
/// table.append_tokens(pool, RegionId::DYNAMIC, 40)?; // 3 blocks
/// assert_eq!(table.num_blocks(), 3);
/// let (block, offset) = table.slot(39).unwrap();
/// assert_eq!(offset, 7);
/// # let _ = block;
/// table.release_all(pool)?;
/// # Ok(()) }
/// ```
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a block table owns blocks; release them with `release_all`"]
pub struct BlockTable {
    blocks: SmallVec<[BlockId; 8]>,
    num_tokens: u64,
    block_size: u32,
}

impl BlockTable {
    /// An empty table for blocks of `block_size` tokens (treated as 1 if 0 is given).
    pub fn new(block_size: u32) -> Self {
        Self {
            blocks: SmallVec::new(),
            num_tokens: 0,
            block_size: block_size.max(1),
        }
    }

    /// Tokens per block.
    #[must_use]
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The physical blocks, in logical order.
    #[must_use]
    #[inline]
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Blocks held.
    #[must_use]
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Tokens written.
    #[must_use]
    #[inline]
    pub fn num_tokens(&self) -> u64 {
        self.num_tokens
    }

    /// Tokens the held blocks can hold.
    #[must_use]
    #[inline]
    pub fn capacity_tokens(&self) -> u64 {
        self.blocks.len() as u64 * u64::from(self.block_size)
    }

    /// Blocks that must be added before `extra` more tokens fit (`usize::MAX` if the token
    /// count would overflow).
    #[must_use]
    #[inline]
    pub fn blocks_needed(&self, extra: u64) -> usize {
        let Some(total) = self.num_tokens.checked_add(extra) else {
            return usize::MAX;
        };
        let want = total.div_ceil(u64::from(self.block_size));
        usize::try_from(want)
            .unwrap_or(usize::MAX)
            .saturating_sub(self.blocks.len())
    }

    /// Where token `pos` lives: its block and its offset in that block.
    #[must_use]
    pub fn slot(&self, pos: u64) -> Option<(BlockId, u32)> {
        if pos >= self.num_tokens {
            return None;
        }
        let bs = u64::from(self.block_size);
        let block = *self.blocks.get(usize::try_from(pos / bs).ok()?)?;
        Some((block, (pos % bs) as u32))
    }

    /// The flat slot index of token `pos` (`block × block_size + offset`), as a kernel's slot
    /// mapping wants it.
    #[must_use]
    pub fn slot_index(&self, pos: u64) -> Option<u64> {
        self.slot(pos)
            .map(|(b, off)| u64::from(b.get()) * u64::from(self.block_size) + u64::from(off))
    }

    /// Adds a block the caller already owns a reference on (for example a prefix-cache hit
    /// that was retained). The table takes over that reference. Only valid when the table is
    /// full to a block boundary.
    #[inline]
    pub fn push_block(&mut self, block: BlockId) {
        self.blocks.push(block);
    }

    /// Adds blocks the caller already owns a reference on, in order, as one
    /// [`push_block`](Self::push_block) per block would (for example a prefix-cache hit
    /// retained with [`BlockAllocator::retain_many`]), in one copy. The table takes over those
    /// references. Only valid when the table is full to a block boundary.
    #[inline]
    pub fn push_blocks(&mut self, blocks: &[BlockId]) {
        self.blocks.extend_from_slice(blocks);
    }

    /// Marks `n` more tokens as written into already-held blocks.
    ///
    /// Returns the tokens that did not fit (0 on success); nothing changes if any would not fit.
    #[inline]
    pub fn advance(&mut self, n: u64) -> Result<(), u64> {
        let room = self.capacity_tokens() - self.num_tokens;
        if n > room {
            return Err(n - room);
        }
        self.num_tokens += n;
        Ok(())
    }

    /// A second table over the same blocks and tokens (parallel sampling, beam search): takes
    /// one more reference on every block through `alloc`. All or nothing. Before either table
    /// writes into a shared partly filled last block, make it writable with
    /// [`make_last_writable`](Self::make_last_writable), which copies it on write and puts the
    /// copy in the table.
    ///
    /// # Errors
    /// The pool refused a reference (a block released behind the table's back, or at its
    /// reference limit); the references taken are given back and nothing changes.
    pub fn fork(&self, alloc: &mut impl BlockAllocator) -> Result<Self, RefError> {
        for (i, &block) in self.blocks.iter().enumerate() {
            if let Err(err) = alloc.retain(block) {
                for &taken in &self.blocks[..i] {
                    // Taken just above: giving it back cannot fail unless the pool is broken.
                    if let Err(e) = alloc.release(taken) {
                        debug_assert!(false, "undoing a fork's retain of {taken}: {e}");
                    }
                }
                return Err(err);
            }
        }
        Ok(Self {
            blocks: self.blocks.clone(),
            num_tokens: self.num_tokens,
            block_size: self.block_size,
        })
    }

    /// Copy-on-write for the table's last block, before writing more tokens into it (after a
    /// [`fork`](Self::fork), both tables share a partly filled last block).
    ///
    /// Returns `None` when there is nothing to copy: the table is empty, full to a block
    /// boundary (the next token goes to a fresh block), or the only owner of its last block.
    /// Otherwise allocates a block from `region`, moves this table's reference to it, puts it
    /// in the table in place of the shared one, and returns the pair the kernels must copy
    /// before the write. On error nothing changes.
    ///
    /// ```
    /// use kvc_core::{BlockAllocator, BlockTable, RegionId};
    /// # fn demo(pool: &mut impl BlockAllocator) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut prompt = BlockTable::new(16);
    /// prompt.append_tokens(pool, RegionId::DYNAMIC, 40)?; // the last block holds 8 tokens
    /// let mut sample = prompt.fork(pool)?;
    /// let copy = sample.make_last_writable(pool, RegionId::DYNAMIC)?.expect("shared");
    /// assert_eq!(copy.src, prompt.blocks()[2]);
    /// assert_eq!(copy.dst, sample.blocks()[2]); // copy src -> dst, then write
    /// sample.append_tokens(pool, RegionId::DYNAMIC, 1)?;
    /// assert!(prompt.make_last_writable(pool, RegionId::DYNAMIC)?.is_none()); // sole owner now
    /// sample.release_all(pool)?;
    /// prompt.release_all(pool)?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`CowError::Ref`] if the pool does not know the last block (released behind the
    /// table's back); [`CowError::Alloc`] if `region` has no free block for the copy.
    pub fn make_last_writable(
        &mut self,
        alloc: &mut impl BlockAllocator,
        region: RegionId,
    ) -> Result<Option<BlockCopy>, CowError> {
        let Some(&last) = self.blocks.last() else {
            return Ok(None);
        };
        if self.num_tokens == self.capacity_tokens() {
            return Ok(None);
        }
        match alloc.make_writable(last, region)? {
            Writable::Exclusive(_) => Ok(None),
            Writable::Copied(copy) => {
                if let Some(slot) = self.blocks.last_mut() {
                    *slot = copy.dst;
                }
                Ok(Some(copy))
            }
        }
    }

    /// Makes room for `n` more tokens, allocating from `region` (preferring blocks physically
    /// after the last one), and marks them written. All or nothing: on error the table and
    /// the pool are as before.
    ///
    /// # Errors
    /// [`AllocError::TooManyTokens`] if the token count would overflow; otherwise the pool's
    /// error.
    pub fn append_tokens(
        &mut self,
        alloc: &mut impl BlockAllocator,
        region: RegionId,
        n: u64,
    ) -> Result<(), AllocError> {
        let Some(total) = self.num_tokens.checked_add(n) else {
            return Err(AllocError::TooManyTokens {
                tokens: self.num_tokens,
                extra: n,
            });
        };
        let needed = self.blocks_needed(n);
        if needed > 0 {
            let free = alloc.free_blocks(region)?;
            if free < needed {
                return Err(AllocError::OutOfBlocks {
                    region,
                    requested: needed,
                    free,
                });
            }
            // All or nothing, continuing the run after the table's last block.
            crate::alloc::allocate_into(alloc, region, needed, &mut self.blocks)?;
        }
        self.num_tokens = total;
        Ok(())
    }

    /// Releases every block reference the table holds and empties it.
    ///
    /// On an error (a block already released elsewhere: a bug in the caller) the remaining
    /// blocks are still released and the first error is returned.
    pub fn release_all(&mut self, alloc: &mut impl BlockAllocator) -> Result<(), RefError> {
        // One batch: an allocator may take it in one pass (`BlockAllocator::release_each`).
        let result = alloc.release_each(&self.blocks);
        self.blocks.clear();
        self.num_tokens = 0;
        result.map(|_| ())
    }
}
