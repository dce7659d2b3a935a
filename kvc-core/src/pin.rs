//! The [`PinPolicy`] trait a scheduler consults about KV memory reservation, and its plain-data
//! inputs and outputs.
//!
//! A pin policy answers three questions, each with plain data so that a scheduler, an allocator
//! and a prefix cache can act on the answer without knowing the policy's type:
//!
//! - **placement** ([`PinPolicy::place`]): which region a sequence's next blocks come from, and
//!   what to do when that region is exhausted ([`Placement`]);
//! - **sizing** ([`PinPolicy::tick`]): given the observed load, grow or shrink the pinned region
//!   ([`Resize`]), by moving free blocks only;
//! - **retention** ([`PinPolicy::retention`], [`PinPolicy::expire`]): how long cached prefix
//!   blocks should be kept ([`Retention`], a priority 0–100 with an expiry).
//!
//! Times are caller-supplied milliseconds (`now_ms`) from any monotonic clock, so policies are
//! deterministic under test.

use thiserror::Error;

use crate::{QosClass, SeqId, TenantId};

/// Free and total blocks of the two regions a pin policy places into, as the allocator reports
/// them (`BlockAllocator::free_blocks` and the region capacities).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PoolView {
    /// Blocks in the pinned region, free or not.
    pub pinned_capacity: usize,
    /// Free blocks in the pinned region.
    pub pinned_free: usize,
    /// Blocks in the dynamic region, free or not.
    pub dynamic_capacity: usize,
    /// Free blocks in the dynamic region.
    pub dynamic_free: usize,
}

impl PoolView {
    /// Blocks in both regions (saturating: a view no allocator could report, with regions of
    /// `usize::MAX` blocks, is not a reason to panic).
    #[must_use]
    pub const fn total(&self) -> usize {
        self.pinned_capacity.saturating_add(self.dynamic_capacity)
    }
}

/// A number of blocks in each region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RegionBlocks {
    /// Blocks in the pinned region (`RegionId::PINNED`).
    pub pinned: usize,
    /// Blocks in the dynamic region (`RegionId::DYNAMIC`).
    pub dynamic: usize,
}

impl RegionBlocks {
    /// Blocks in both regions (saturating, like [`PoolView::total`]).
    #[must_use]
    pub const fn total(&self) -> usize {
        self.pinned.saturating_add(self.dynamic)
    }
}

/// A sequence asks for more blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PlaceRequest {
    /// The sequence (new or running).
    pub seq: SeqId,
    /// Its tenant.
    pub tenant: TenantId,
    /// Its QoS class.
    pub class: QosClass,
    /// Blocks it needs now (for a new request: its prompt; later: one decode block at a time).
    pub blocks: usize,
    /// The caller's clock, in milliseconds.
    pub now_ms: u64,
}

/// How an [`Placement::Allocate`] decision was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Route {
    /// All blocks from the region the class is meant to use (pinned for reserved classes,
    /// dynamic for the others).
    Normal,
    /// A reserved class found the pinned region full and borrows the rest from dynamic
    /// (graceful degradation).
    Borrowed,
    /// The tenant is over its share of the pinned region: the rest comes from dynamic.
    OverQuota,
}

/// Why a request waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WaitReason {
    /// The region it may use has too few free blocks (the configured response is to queue, or
    /// nothing of lower rank could be preempted or capped).
    Exhausted,
    /// Its class is capped (see [`Placement::Downgrade`]) and already runs at the cap.
    Capped,
}

/// Why a request is refused outright.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// More blocks than the regions it may use hold even when empty: it can never fit.
    Impossible,
    /// The tenant is over its share of the pinned region and the policy refuses, rather than
    /// falling back to the dynamic region.
    TenantOverQuota,
    /// The class is not one of the policy's configured classes.
    UnknownClass,
}

/// Where a sequence's blocks come from, or what to do instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[must_use = "a placement is a decision the scheduler must carry out"]
pub enum Placement {
    /// Allocate this many blocks from each region. The policy now counts them as held by the
    /// sequence; return them with [`PinPolicy::release`] (also when the allocation fails).
    Allocate {
        /// Blocks to take from each region.
        blocks: RegionBlocks,
        /// Whether that was the normal route or a degradation.
        route: Route,
    },
    /// Keep the request waiting and ask again later.
    Wait {
        /// Why.
        reason: WaitReason,
    },
    /// Preempt (recompute or swap out) a running sequence of class `victim`, which ranks below
    /// the requester and holds dynamic blocks, then ask again.
    PreemptLowest {
        /// The class to preempt from.
        victim: QosClass,
    },
    /// The request waits, and class `class` (the lowest) is capped at `max_running` concurrent
    /// sequences until pressure eases: admit no more of it, and preempt down to the cap.
    Downgrade {
        /// The capped class.
        class: QosClass,
        /// Sequences of that class allowed to run.
        max_running: usize,
    },
    /// Never serve the request.
    Refuse {
        /// Why.
        reason: Refusal,
    },
}

/// The load the scheduler observed at one tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSample<'a> {
    /// The caller's clock, in milliseconds.
    pub now_ms: u64,
    /// The regions as they are now.
    pub pool: PoolView,
    /// Blocks wanted by requests that are waiting, per class (classes not listed wait for
    /// nothing). Together with the blocks the policy knows are held, this is the demand.
    pub waiting: &'a [ClassBlocks],
}

/// A number of blocks for one QoS class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClassBlocks {
    /// The class.
    pub class: QosClass,
    /// Blocks.
    pub blocks: usize,
}

/// A resize of the pinned region, taking free blocks only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[must_use = "a resize decision must be applied to the allocator"]
pub enum Resize {
    /// Leave the regions as they are.
    Hold,
    /// Move `blocks` free blocks from the dynamic region to the pinned one.
    Grow {
        /// Blocks to move (never more than the dynamic region has free).
        blocks: usize,
        /// The pinned capacity the policy aims for.
        target: usize,
    },
    /// Move `blocks` free blocks from the pinned region to the dynamic one.
    Shrink {
        /// Blocks to move (never more than the pinned region has free).
        blocks: usize,
        /// The pinned capacity the policy aims for.
        target: usize,
    },
}

/// How long a cached block should be kept: eviction takes low priorities first, and after
/// `until` the priority falls back to [`Retention::DEFAULT_PRIORITY`].
///
/// Plain data, so a prefix cache can take it without depending on any policy crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Retention {
    /// 0 (evict first) to 100 (evict last).
    pub priority: u8,
    /// When the priority decays to [`DEFAULT_PRIORITY`](Self::DEFAULT_PRIORITY) (caller's
    /// clock, ms); `None`: never, the priority holds until the retention is set again.
    pub until: Option<u64>,
}

impl Retention {
    /// The highest priority.
    pub const MAX_PRIORITY: u8 = 100;
    /// The priority of a block nobody pinned (TensorRT-LLM's default retention priority).
    pub const DEFAULT_PRIORITY: u8 = 35;
    /// The retention of a block nobody pinned.
    pub const DEFAULT: Retention = Retention::fixed(Self::DEFAULT_PRIORITY);

    /// `priority` with no expiry: it holds until the retention is set again. Priorities above
    /// [`MAX_PRIORITY`](Self::MAX_PRIORITY) are taken as it by the caches.
    ///
    /// ```
    /// use kvc_core::Retention;
    ///
    /// let pinned = Retention::fixed(90);
    /// assert_eq!(pinned, Retention { priority: 90, until: None });
    /// assert_eq!(pinned.priority_at(u64::MAX), 90);
    /// ```
    #[must_use]
    pub const fn fixed(priority: u8) -> Self {
        Self {
            priority,
            until: None,
        }
    }

    /// The priority in force at `now_ms`.
    #[must_use]
    pub const fn priority_at(&self, now_ms: u64) -> u8 {
        match self.until {
            Some(until) if now_ms >= until => Self::DEFAULT_PRIORITY,
            _ => self.priority,
        }
    }
}

impl Default for Retention {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A cached block's retention changed: push it to the prefix cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RetentionUpdate {
    /// The caller's hash of the block (or of the prefix ending at it).
    pub block_hash: u64,
    /// Its retention from now on.
    pub retention: Retention,
}

/// Why [`PinPolicy::release`] failed. The policy's accounting is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PinReleaseError {
    /// The policy holds nothing for this sequence.
    #[error("{seq} holds no blocks in the pin policy's accounting")]
    UnknownSeq {
        /// The sequence given.
        seq: SeqId,
    },
    /// More blocks returned than the sequence was placed.
    #[error("{seq} returns {returned:?} blocks but holds only {held:?}")]
    MoreThanHeld {
        /// The sequence given.
        seq: SeqId,
        /// Blocks returned.
        returned: RegionBlocks,
        /// Blocks the sequence holds.
        held: RegionBlocks,
    },
}

/// A policy for reserving KV memory: which region a request's blocks come from, how big the
/// pinned region should be, and how long cached prefixes are retained.
///
/// A scheduler written against this trait runs with any policy (no pinning, a static reserve,
/// an adaptive one) unchanged. Implemented by `kvc_pin::PinningPolicy`.
pub trait PinPolicy {
    /// Decides where `req.blocks` more blocks for `req.seq` come from, given the regions as
    /// they are now. An [`Placement::Allocate`] decision is counted as held by the sequence.
    fn place(&mut self, req: &PlaceRequest, pool: &PoolView) -> Placement;

    /// The sequence gave back blocks (finished, preempted, or the allocation failed). When it
    /// holds nothing more, the policy forgets it.
    fn release(&mut self, seq: SeqId, blocks: RegionBlocks) -> Result<(), PinReleaseError>;

    /// Observes one tick of load and decides whether to resize the pinned region.
    fn tick(&mut self, sample: &LoadSample<'_>) -> Resize;

    /// The retention of the cached block with this hash at `now_ms`.
    fn retention(&self, block_hash: u64, now_ms: u64) -> Retention;

    /// Drops pins that expired by `now_ms` and appends the retentions that changed.
    fn expire(&mut self, now_ms: u64, changed: &mut Vec<RetentionUpdate>);

    /// Whether sequences of `class` may hold blocks of the pinned region at all, including
    /// cached blocks they would reuse. A scheduler stops a prefix hit at the first pinned
    /// block for a class that may not, so the pinned region serves only its classes.
    /// The default allows every class; policies that reserve the region override it.
    fn may_hold_pinned(&self, class: QosClass) -> bool {
        let _ = class;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_decays_at_until() {
        let r = Retention {
            priority: 90,
            until: Some(1_000),
        };
        assert_eq!(r.priority_at(999), 90);
        assert_eq!(r.priority_at(1_000), Retention::DEFAULT_PRIORITY);
        assert_eq!(Retention::default().priority_at(u64::MAX), 35);
    }

    #[test]
    fn view_totals() {
        let v = PoolView {
            pinned_capacity: 4,
            pinned_free: 1,
            dynamic_capacity: 6,
            dynamic_free: 2,
        };
        assert_eq!(v.total(), 10);
        let b = RegionBlocks {
            pinned: 2,
            dynamic: 3,
        };
        assert_eq!(b.total(), 5);
    }
}
