//! [`ShapeError`]: why a kernel call was rejected before touching memory.

use kvc_core::{BlockId, HostBlockId};
use thiserror::Error;

/// Why a kernel's arguments were rejected. Every op checks its arguments against the layout
/// and page table before reading or writing, so a bad call is this error, never an
/// out-of-bounds access; nothing was written when it is returned.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ShapeError {
    /// A buffer has the wrong number of elements.
    #[error("`{buffer}` has {len} elements, expected {expected}")]
    BufferLength {
        /// Which argument.
        buffer: &'static str,
        /// Its length.
        len: u64,
        /// The length the shapes require.
        expected: u64,
    },
    /// A KV cache buffer is shorter than its layout.
    #[error("KV cache `{buffer}` has {len} elements but its layout spans {needed}")]
    CacheTooSmall {
        /// Which argument.
        buffer: &'static str,
        /// Its length.
        len: u64,
        /// Elements the layout needs.
        needed: u64,
    },
    /// Query heads are not a positive multiple of KV heads.
    #[error("{q_heads} query heads is not a positive multiple of {kv_heads} KV heads")]
    HeadRatio {
        /// Query heads.
        q_heads: u32,
        /// KV heads.
        kv_heads: u32,
    },
    /// The page table was validated against a different layout (block size or pool size).
    #[error(
        "the page table does not fit this layout (block size {block_size}, {num_blocks} blocks)"
    )]
    TableMismatch {
        /// The layout's tokens per block.
        block_size: u32,
        /// The layout's blocks.
        num_blocks: u32,
    },
    /// The slot mapping was validated against a different block size.
    #[error("the slot mapping was built for block size {mapping}, the layout has {layout}")]
    SlotMismatch {
        /// Block size of the mapping.
        mapping: u32,
        /// Block size of the layout.
        layout: u32,
    },
    /// A slot lies past this pool (the mapping was validated against a larger one).
    #[error("slot {slot} of token {token} is past this pool's {slots} slots")]
    SlotOutOfPool {
        /// The token's index.
        token: usize,
        /// Its slot.
        slot: i64,
        /// Slots in the pool.
        slots: u64,
    },
    /// Decode was given a table whose sequence has other than one query token.
    #[error("decode needs one query token per sequence; sequence {seq} has {queries}")]
    NotDecode {
        /// Index of the sequence.
        seq: usize,
        /// Its query tokens.
        queries: usize,
    },
    /// A head dimension of 0 was given (attention states have at least one element a head).
    #[error("head_dim must be at least 1")]
    ZeroHeadDim,
    /// Two layouts that must share a block shape do not (heads, block size, head size).
    #[error("source and destination layouts differ in block shape")]
    BlockShapeMismatch,
    /// Different numbers of layers were given for source and destination.
    #[error("{src} source layers but {dst} destination layers")]
    LayerCount {
        /// Source layers.
        src: usize,
        /// Destination layers.
        dst: usize,
    },
    /// A copy names a block outside its pool.
    #[error("copy {pair} names {block}, outside a pool of {num_blocks} blocks")]
    BlockOutOfRange {
        /// Index of the copy pair.
        pair: usize,
        /// The block named.
        block: BlockId,
        /// Blocks in that pool.
        num_blocks: u32,
    },
    /// A swap names a host block outside the host pool.
    #[error("swap {pair} names {block}, outside a host pool of {num_blocks} blocks")]
    HostBlockOutOfRange {
        /// Index of the swap pair.
        pair: usize,
        /// The host block named.
        block: HostBlockId,
        /// Blocks in the host pool.
        num_blocks: u32,
    },
    /// Two swap-outs write the same host block.
    #[error("swap {pair} writes {block}, which another swap also writes")]
    HostBlockConflict {
        /// Index of the swap pair.
        pair: usize,
        /// The host block.
        block: HostBlockId,
    },
    /// Two copies write the same block, or a copy writes a block another copy reads, so the
    /// result would depend on the order of the copies.
    #[error("copy {pair} writes {block}, which another copy also reads or writes")]
    CopyConflict {
        /// Index of the copy pair.
        pair: usize,
        /// The destination block.
        block: BlockId,
    },
}

pub(crate) fn check_len(buffer: &'static str, len: usize, expected: u64) -> Result<(), ShapeError> {
    if len as u64 == expected {
        Ok(())
    } else {
        Err(ShapeError::BufferLength {
            buffer,
            len: len as u64,
            expected,
        })
    }
}

pub(crate) fn check_cache(buffer: &'static str, len: usize, needed: u64) -> Result<(), ShapeError> {
    if len as u64 >= needed {
        Ok(())
    } else {
        Err(ShapeError::CacheTooSmall {
            buffer,
            len: len as u64,
            needed,
        })
    }
}
