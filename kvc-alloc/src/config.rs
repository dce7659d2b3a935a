//! [`PoolConfig`]: how many blocks, how they split into regions, how large a reserve to keep.

use smallvec::SmallVec;
use thiserror::Error;

use kvc_core::RegionId;

/// The most regions a pool may have.
pub const MAX_REGIONS: usize = 16;

/// Why a [`PoolConfig`] cannot build a pool.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A pool needs at least one block.
    #[error("a block pool needs at least one block")]
    Empty,
    /// Block ids are `u32` and `u32::MAX` marks list ends.
    #[error("{requested} blocks is more than the {max} a pool can address")]
    TooManyBlocks {
        /// Blocks asked for.
        requested: u64,
        /// The limit.
        max: u64,
    },
    /// The regions carved out of the pool take more blocks than it has.
    #[error("regions take {carved} blocks but the pool has only {total}")]
    RegionsExceedPool {
        /// Blocks carved out for non-dynamic regions.
        carved: u64,
        /// Blocks in the pool.
        total: u64,
    },
    /// More than [`MAX_REGIONS`] regions.
    #[error("at most {max} regions are supported")]
    TooManyRegions {
        /// The limit.
        max: usize,
    },
    /// The watermark reserve takes the whole dynamic region, so admission
    /// ([`can_allocate`](kvc_core::BlockAllocator::can_allocate)) could never say anything but
    /// `Impossible` there.
    #[error(
        "a watermark of {watermark} blocks leaves nothing to admit in a dynamic region of {dynamic} blocks"
    )]
    WatermarkTooLarge {
        /// The reserve asked for.
        watermark: u64,
        /// Blocks in the dynamic region.
        dynamic: u64,
    },
    /// The pool's bookkeeping (16 bytes a block, allocated when the pool is built) could not
    /// be allocated: the block count is far larger than the machine's memory allows.
    #[error(
        "a pool of {blocks} blocks needs {bytes} bytes of bookkeeping, which could not be allocated"
    )]
    OutOfMemory {
        /// Blocks asked for.
        blocks: u64,
        /// Bytes the bookkeeping needs.
        bytes: u64,
    },
}

/// The shape of a [`BlockPool`](crate::BlockPool).
///
/// Blocks are laid out region by region: the pinned region takes the lowest ids, the dynamic
/// region the rest, extra regions are carved from the top of the dynamic range.
///
/// ```
/// use kvc_alloc::{BlockAllocator, BlockPool, PoolConfig, RegionId};
///
/// let pool = BlockPool::new(PoolConfig::new(1024).pinned(128).watermark(16))?;
/// assert_eq!(pool.capacity(RegionId::PINNED)?, 128);
/// assert_eq!(pool.capacity(RegionId::DYNAMIC)?, 896);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    pub(crate) num_blocks: u64,
    pub(crate) pinned: u64,
    pub(crate) extra: SmallVec<[u64; 2]>,
    pub(crate) watermark: u64,
}

impl PoolConfig {
    /// A pool of `num_blocks` blocks, all in the dynamic region, with no reserve.
    #[must_use]
    pub fn new(num_blocks: u64) -> Self {
        Self {
            num_blocks,
            pinned: 0,
            extra: SmallVec::new(),
            watermark: 0,
        }
    }

    /// Carves `blocks` out of the pool for the pinned region.
    #[must_use]
    pub fn pinned(mut self, blocks: u64) -> Self {
        self.pinned = blocks;
        self
    }

    /// Keeps `blocks` of the dynamic region in reserve: admission
    /// ([`can_allocate`](kvc_core::BlockAllocator::can_allocate)) says `Later` once taking a request's
    /// blocks would dip into it, so running sequences can still grow during a burst.
    /// Allocation itself may use the reserve. It must be smaller than the dynamic region
    /// (or 0): [`BlockPool::new`](crate::BlockPool::new) rejects a reserve that would leave
    /// nothing to admit ([`ConfigError::WatermarkTooLarge`]).
    #[must_use]
    pub fn watermark(mut self, blocks: u64) -> Self {
        self.watermark = blocks;
        self
    }

    /// Adds one more region of `blocks` blocks; regions are numbered from 2 in the order added.
    #[must_use]
    pub fn region(mut self, blocks: u64) -> Self {
        self.extra.push(blocks);
        self
    }

    /// The region the next [`region`](Self::region) call will create.
    #[must_use]
    pub fn next_region_id(&self) -> RegionId {
        RegionId(2 + self.extra.len() as u8)
    }

    /// Region sizes indexed by region id, after validation.
    pub(crate) fn region_sizes(&self) -> Result<SmallVec<[u32; 4]>, ConfigError> {
        if self.num_blocks == 0 {
            return Err(ConfigError::Empty);
        }
        let max = u64::from(u32::MAX - 1);
        if self.num_blocks > max {
            return Err(ConfigError::TooManyBlocks {
                requested: self.num_blocks,
                max,
            });
        }
        if 2 + self.extra.len() > MAX_REGIONS {
            return Err(ConfigError::TooManyRegions { max: MAX_REGIONS });
        }
        let carved = self
            .extra
            .iter()
            .try_fold(self.pinned, |acc, &b| acc.checked_add(b))
            .filter(|&c| c <= self.num_blocks)
            .ok_or(ConfigError::RegionsExceedPool {
                carved: self
                    .extra
                    .iter()
                    .fold(self.pinned, |acc, &b| acc.saturating_add(b)),
                total: self.num_blocks,
            })?;
        let dynamic = self.num_blocks - carved;
        if self.watermark > 0 && self.watermark >= dynamic {
            return Err(ConfigError::WatermarkTooLarge {
                watermark: self.watermark,
                dynamic,
            });
        }
        // All values are below u32::MAX now.
        let mut sizes: SmallVec<[u32; 4]> = SmallVec::new();
        sizes.push(self.pinned as u32);
        sizes.push(dynamic as u32);
        sizes.extend(self.extra.iter().map(|&b| b as u32));
        Ok(sizes)
    }
}
