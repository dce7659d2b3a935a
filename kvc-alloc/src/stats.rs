//! Pool statistics: occupancy per region, operation counters and fragmentation.

use kvc_core::RegionId;

/// Occupancy of one region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionStats {
    /// The region.
    pub region: RegionId,
    /// Blocks it holds, free or in use.
    pub capacity: usize,
    /// Free blocks.
    pub free: usize,
    /// Blocks in use (`capacity - free`).
    pub used: usize,
}

/// A snapshot of a pool's occupancy and counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolStats {
    /// Blocks in the pool.
    pub total: usize,
    /// Occupancy per region, indexed by region id.
    pub regions: Vec<RegionStats>,
    /// Blocks handed out (including copy-on-write destinations).
    pub allocations: u64,
    /// References dropped (including the writer's reference moved by copy-on-write).
    pub releases: u64,
    /// Releases that returned a block to a free list.
    pub frees: u64,
    /// Copy-on-write copies requested.
    pub cow_copies: u64,
}

impl PoolStats {
    /// Free blocks over all regions.
    #[must_use]
    pub fn free(&self) -> usize {
        self.regions.iter().map(|r| r.free).sum()
    }

    /// Blocks in use over all regions.
    #[must_use]
    pub fn used(&self) -> usize {
        self.regions.iter().map(|r| r.used).sum()
    }
}

/// How contiguous a region's free space is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragmentation {
    /// Free blocks in the region.
    pub free_blocks: usize,
    /// The longest run of physically adjacent free blocks.
    pub largest_free_run: usize,
}

impl Fragmentation {
    /// `largest_free_run / free_blocks`: 1.0 when all free space is one run, near 0 when it is
    /// scattered. 1.0 for an empty free set.
    #[must_use]
    pub fn contiguity(&self) -> f64 {
        if self.free_blocks == 0 {
            1.0
        } else {
            self.largest_free_run as f64 / self.free_blocks as f64
        }
    }
}
