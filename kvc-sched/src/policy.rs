//! [`DynamicOnly`]: the pin policy of a deployment without pinning.

use std::collections::HashMap;

use kvc_core::{
    LoadSample, PinPolicy, PinReleaseError, PlaceRequest, Placement, PoolView, Refusal,
    RegionBlocks, Resize, Retention, RetentionUpdate, Route, SeqId, WaitReason,
};

/// Every class allocates from the dynamic region, first come first served; a request larger
/// than the dynamic region is refused; nothing is reserved, resized or retained.
///
/// The baseline against which pinning policies are measured, and the default for engines
/// that want paging and reuse without QoS reservation.
#[derive(Clone, Debug, Default)]
pub struct DynamicOnly {
    held: HashMap<SeqId, usize>,
}

impl PinPolicy for DynamicOnly {
    fn place(&mut self, req: &PlaceRequest, pool: &PoolView) -> Placement {
        if req.blocks > pool.dynamic_capacity {
            return Placement::Refuse {
                reason: Refusal::Impossible,
            };
        }
        if req.blocks > pool.dynamic_free {
            return Placement::Wait {
                reason: WaitReason::Exhausted,
            };
        }
        *self.held.entry(req.seq).or_default() += req.blocks;
        Placement::Allocate {
            blocks: RegionBlocks {
                pinned: 0,
                dynamic: req.blocks,
            },
            route: Route::Normal,
        }
    }

    fn release(&mut self, seq: SeqId, blocks: RegionBlocks) -> Result<(), PinReleaseError> {
        let Some(held) = self.held.get_mut(&seq) else {
            return if blocks.total() == 0 {
                Ok(())
            } else {
                Err(PinReleaseError::UnknownSeq { seq })
            };
        };
        if blocks.pinned > 0 || blocks.dynamic > *held {
            return Err(PinReleaseError::MoreThanHeld {
                seq,
                returned: blocks,
                held: RegionBlocks {
                    pinned: 0,
                    dynamic: *held,
                },
            });
        }
        *held -= blocks.dynamic;
        if *held == 0 {
            self.held.remove(&seq);
        }
        Ok(())
    }

    fn tick(&mut self, _: &LoadSample<'_>) -> Resize {
        Resize::Hold
    }

    fn retention(&self, _: u64, _: u64) -> Retention {
        Retention::DEFAULT
    }

    fn expire(&mut self, _: u64, _: &mut Vec<RetentionUpdate>) {}
}
