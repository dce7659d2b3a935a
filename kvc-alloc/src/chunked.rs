//! [`ChunkedBlockTable`]: a block table for long sequences whose fork is O(chunks).
//!
//! Blocks are grouped in chunks of [`CHUNK_BLOCKS`]. A chunk holds one pool reference on
//! each of its blocks and is itself shared between tables through an `Arc`, so forking a
//! 100k-token sequence (6,250 blocks of 16) for parallel sampling clones about a hundred
//! pointers instead of retaining 6,250 blocks. Only the last chunk is ever written; the first
//! write into a shared chunk copies that chunk alone (retaining its blocks), and a write into a
//! shared partly filled block goes through copy-on-write.

use kvc_core::sync::Arc;

use thiserror::Error;

use kvc_core::{AllocError, BlockAllocator, BlockCopy, BlockId, CowError, RefError, RegionId};
use kvc_core::{Released, Writable};

/// Blocks per chunk.
pub const CHUNK_BLOCKS: usize = 64;

/// Why a table operation failed. The table and the pool are as before the call.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TableError {
    /// Not enough free blocks for the new tokens.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// The pool rejected a reference-count operation (a block released behind the table's
    /// back, or a reference count at its limit).
    #[error(transparent)]
    Ref(#[from] RefError),
}

impl From<CowError> for TableError {
    fn from(err: CowError) -> Self {
        match err {
            CowError::Ref(e) => TableError::Ref(e),
            CowError::Alloc(e) => TableError::Alloc(e),
            // CowError is non-exhaustive; any future cause is a refusal to allocate.
            _ => TableError::Alloc(AllocError::OutOfBlocks {
                region: RegionId::DYNAMIC,
                requested: 1,
                free: 0,
            }),
        }
    }
}

/// What an append did that the engine must act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[must_use = "a copy-on-write pair must be executed by the kernels before writing"]
pub struct AppendOutcome {
    /// The shared last block was copied: copy `src` into `dst` before writing the new tokens.
    pub copy: Option<BlockCopy>,
    /// Blocks newly allocated.
    pub new_blocks: usize,
}

#[derive(Debug)]
struct Chunk {
    blocks: Vec<BlockId>,
}

/// A block table made of shared chunks.
///
/// Dropping a table without [`release`](Self::release) leaks its references (the table cannot
/// reach the pool from `Drop`); release every table you stop using.
///
/// ```
/// use kvc_alloc::{BlockPool, ChunkedBlockTable, PoolConfig};
/// use kvc_alloc::{BlockAllocator, RegionId};
///
/// let mut pool = BlockPool::new(PoolConfig::new(8_000))?;
/// let mut prompt = ChunkedBlockTable::new(16);
/// let _ = prompt.append_tokens(&mut pool, RegionId::DYNAMIC, 100_000)?; // 6,250 blocks
///
/// let mut sample = prompt.fork(); // O(chunks): no block is touched
/// let out = sample.append_tokens(&mut pool, RegionId::DYNAMIC, 1)?;
/// assert!(out.copy.is_none()); // 100,000 is block-aligned: a fresh block, no copy
///
/// sample.release(&mut pool)?;
/// prompt.release(&mut pool)?;
/// assert_eq!(pool.free_blocks(RegionId::DYNAMIC)?, 8_000);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
#[must_use = "a block table owns blocks; release them with `release`"]
pub struct ChunkedBlockTable {
    chunks: Vec<Arc<Chunk>>,
    num_blocks: usize,
    num_tokens: u64,
    block_size: u32,
}

impl ChunkedBlockTable {
    /// An empty table for blocks of `block_size` tokens (treated as 1 if 0 is given).
    pub fn new(block_size: u32) -> Self {
        Self {
            chunks: Vec::new(),
            num_blocks: 0,
            num_tokens: 0,
            block_size: block_size.max(1),
        }
    }

    /// Tokens written.
    #[must_use]
    pub fn num_tokens(&self) -> u64 {
        self.num_tokens
    }

    /// Blocks held.
    #[must_use]
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Chunks held.
    #[must_use]
    pub fn num_chunks(&self) -> usize {
        self.chunks.len()
    }

    /// The `i`-th block.
    #[must_use]
    pub fn block(&self, i: usize) -> Option<BlockId> {
        self.chunks
            .get(i / CHUNK_BLOCKS)?
            .blocks
            .get(i % CHUNK_BLOCKS)
            .copied()
    }

    /// The blocks in logical order.
    pub fn blocks(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.chunks.iter().flat_map(|c| c.blocks.iter().copied())
    }

    /// Where token `pos` lives: its block and offset.
    #[must_use]
    pub fn slot(&self, pos: u64) -> Option<(BlockId, u32)> {
        if pos >= self.num_tokens {
            return None;
        }
        let bs = u64::from(self.block_size);
        let block = self.block(usize::try_from(pos / bs).ok()?)?;
        Some((block, (pos % bs) as u32))
    }

    /// A second table over the same blocks, for parallel sampling or beam search.
    /// O(chunks): clones one pointer per chunk and touches no block.
    ///
    /// The pool references stay with the chunks: a chunk holds one reference on each of its
    /// blocks on behalf of every table that shares it, and gives them back when the last of
    /// those tables is released, so the fork needs no reference of its own until it writes
    /// (then [`append_tokens`](Self::append_tokens) copies the last chunk, taking one
    /// reference per block, and copies a shared partly filled block on write). If the blocks
    /// are cached in a `kvc_core::ReuseIndex`, the fork is another holder there: `acquire` its
    /// blocks, and `release` them when the fork is released.
    pub fn fork(&self) -> Self {
        Self {
            chunks: self.chunks.clone(),
            num_blocks: self.num_blocks,
            num_tokens: self.num_tokens,
            block_size: self.block_size,
        }
    }

    /// Appends `n` tokens, allocating blocks from `region` as needed (preferring physical
    /// neighbours). If the last chunk is shared with a fork it is copied first; if the partly
    /// filled last block is shared it is copied on write, and the pair to copy is returned.
    /// All or nothing.
    pub fn append_tokens(
        &mut self,
        alloc: &mut impl BlockAllocator,
        region: RegionId,
        n: u64,
    ) -> Result<AppendOutcome, TableError> {
        if n == 0 {
            return Ok(AppendOutcome::default());
        }
        let bs = u64::from(self.block_size);
        let Some(total_tokens) = self.num_tokens.checked_add(n) else {
            return Err(AllocError::TooManyTokens {
                tokens: self.num_tokens,
                extra: n,
            }
            .into());
        };
        let total_blocks = total_tokens.div_ceil(bs);
        let needed = usize::try_from(total_blocks)
            .unwrap_or(usize::MAX)
            .saturating_sub(self.num_blocks);
        let writes_last_block = !self.num_tokens.is_multiple_of(bs);
        let last_chunk_open = self
            .chunks
            .last()
            .is_some_and(|c| c.blocks.len() < CHUNK_BLOCKS);
        let last_chunk_shared = self.chunks.last().is_some_and(|c| Arc::strong_count(c) > 1);
        let unshare = last_chunk_shared && (writes_last_block || (last_chunk_open && needed > 0));
        let last_block = self.chunks.last().and_then(|c| c.blocks.last().copied());
        let cow = match (writes_last_block, last_block) {
            (true, Some(b)) => unshare || alloc.refcount(b)? > 1,
            _ => false,
        };
        let free = alloc.free_blocks(region)?;
        let want = needed + usize::from(cow);
        if free < want {
            return Err(AllocError::OutOfBlocks {
                region,
                requested: want,
                free,
            }
            .into());
        }

        // 1. The private copy of the last chunk: one more reference on each of its blocks.
        let mut private: Option<Vec<BlockId>> = None;
        if unshare {
            let shared = self
                .chunks
                .last()
                .map(|c| c.blocks.clone())
                .unwrap_or_default();
            for (i, &b) in shared.iter().enumerate() {
                if let Err(err) = alloc.retain(b) {
                    release_quietly(alloc, &shared[..i]);
                    return Err(err.into());
                }
            }
            private = Some(shared);
        }
        // 2. Copy-on-write of the partly filled last block.
        let mut copy = None;
        if cow {
            // `cow` implies a last block exists.
            let last = last_block.unwrap_or(BlockId(0));
            match alloc.make_writable(last, region) {
                Ok(Writable::Copied(pair)) => copy = Some(pair),
                Ok(Writable::Exclusive(_)) => {}
                Err(err) => {
                    release_quietly(alloc, private.as_deref().unwrap_or_default());
                    return Err(err.into());
                }
            }
        }
        // 3. Fresh blocks, all or nothing, continuing the run after the (copied) last block:
        // the hint heads the list `allocate_many` appends to and is dropped after.
        let hint = copy.map(|c| c.dst).or(last_block);
        let mut fresh: Vec<BlockId> = Vec::with_capacity(needed + 1);
        fresh.extend(hint);
        if let Err(err) = alloc.allocate_many(region, needed, &mut fresh) {
            if let Some(pair) = copy {
                release_quietly(alloc, &[pair.dst]);
                // Give the writer its reference on the source back.
                if let Err(e) = alloc.retain(pair.src) {
                    debug_assert!(false, "undoing a copy-on-write of {}: {e}", pair.src);
                }
            }
            release_quietly(alloc, private.as_deref().unwrap_or_default());
            return Err(err.into());
        }
        fresh.drain(..usize::from(hint.is_some()));

        // Commit: nothing below can fail.
        if let (Some(blocks), Some(last)) = (private, self.chunks.last_mut()) {
            *last = Arc::new(Chunk { blocks });
        }
        if let Some(pair) = copy
            && let Some(b) = self
                .chunks
                .last_mut()
                .and_then(Arc::get_mut)
                .and_then(|c| c.blocks.last_mut())
        {
            *b = pair.dst;
        }
        for b in fresh {
            match self.chunks.last_mut().and_then(Arc::get_mut) {
                Some(chunk) if chunk.blocks.len() < CHUNK_BLOCKS => chunk.blocks.push(b),
                _ => {
                    let mut blocks = Vec::with_capacity(CHUNK_BLOCKS);
                    blocks.push(b);
                    self.chunks.push(Arc::new(Chunk { blocks }));
                }
            }
        }
        self.num_blocks += needed;
        self.num_tokens = total_tokens;
        Ok(AppendOutcome {
            copy,
            new_blocks: needed,
        })
    }

    /// Drops this table's share of every chunk; chunks no other table holds release their
    /// blocks to the pool. The table is left empty.
    ///
    /// On an error (a block released behind the table's back) the rest are still released
    /// and the first error is returned.
    pub fn release(&mut self, alloc: &mut impl BlockAllocator) -> Result<(), RefError> {
        let mut first_err = None;
        for chunk in self.chunks.drain(..) {
            if let Ok(chunk) = Arc::try_unwrap(chunk) {
                for b in chunk.blocks {
                    if let Err(err) = alloc.release(b) {
                        first_err.get_or_insert(err);
                    }
                }
            }
        }
        self.num_blocks = 0;
        self.num_tokens = 0;
        first_err.map_or(Ok(()), Err)
    }
}

/// Releases references taken earlier in a failed operation (they are known to be valid: a
/// failure means the pool is broken).
fn release_quietly(alloc: &mut impl BlockAllocator, blocks: &[BlockId]) {
    for &b in blocks {
        let released: Result<Released, _> = alloc.release(b);
        if let Err(e) = released {
            debug_assert!(false, "undoing a reference on {b}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlockPool, PoolConfig};

    const D: RegionId = RegionId::DYNAMIC;

    #[test]
    fn fork_shares_chunks_and_the_first_write_copies_one_chunk() {
        let mut pool = BlockPool::new(PoolConfig::new(1_000)).unwrap();
        let mut a = ChunkedBlockTable::new(4);
        let _ = a.append_tokens(&mut pool, D, 4 * 130 + 2).unwrap(); // 131 blocks, 3 chunks
        assert_eq!((a.num_blocks(), a.num_chunks()), (131, 3));
        let used = 1_000 - pool.free_blocks(D).unwrap();
        let mut b = a.fork();
        assert_eq!(pool.free_blocks(D).unwrap(), 1_000 - used); // fork touches no block

        // b writes into the shared partial block: last chunk copied, last block copied.
        let out = b.append_tokens(&mut pool, D, 1).unwrap();
        let copy = out.copy.expect("shared partial block is copied");
        assert_eq!(copy.src, a.block(130).unwrap());
        assert_eq!(b.block(130), Some(copy.dst));
        assert_eq!(b.block(129), a.block(129)); // the rest of the chunk still shared
        assert_eq!(pool.refcount(a.block(128).unwrap()), Ok(2));
        assert_eq!(pool.refcount(a.block(0).unwrap()), Ok(1)); // earlier chunks untouched
        assert_eq!(pool.refcount(copy.src), Ok(1));

        // a writes its own partial block: now exclusive, no copy.
        let out = a.append_tokens(&mut pool, D, 1).unwrap();
        assert!(out.copy.is_none());

        b.release(&mut pool).unwrap();
        a.release(&mut pool).unwrap();
        assert_eq!(pool.free_blocks(D), Ok(1_000));
        pool.audit().unwrap();
    }

    #[test]
    fn append_is_all_or_nothing() {
        let mut pool = BlockPool::new(PoolConfig::new(10)).unwrap();
        let mut a = ChunkedBlockTable::new(16);
        let _ = a.append_tokens(&mut pool, D, 17).unwrap();
        let mut b = a.fork();
        let before = pool.stats();
        let err = b.append_tokens(&mut pool, D, 16 * 9).unwrap_err();
        assert!(matches!(
            err,
            TableError::Alloc(AllocError::OutOfBlocks { .. })
        ));
        assert_eq!(pool.stats().free(), before.free());
        assert_eq!(b.num_tokens(), 17);
        assert_eq!(pool.refcount(b.block(1).unwrap()), Ok(1));
        b.release(&mut pool).unwrap();
        a.release(&mut pool).unwrap();
        assert_eq!(pool.free_blocks(D), Ok(10));
    }

    #[test]
    fn slots_follow_the_blocks() {
        let mut pool = BlockPool::new(PoolConfig::new(10)).unwrap();
        let mut t = ChunkedBlockTable::new(5);
        let _ = t.append_tokens(&mut pool, D, 12).unwrap();
        assert_eq!(t.slot(11), Some((BlockId(2), 1)));
        assert_eq!(t.slot(12), None);
        assert_eq!(
            t.blocks().collect::<Vec<_>>(),
            [BlockId(0), BlockId(1), BlockId(2)]
        );
        t.release(&mut pool).unwrap();
    }
}
