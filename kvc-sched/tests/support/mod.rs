//! Test doubles for the scheduler's traits: a small exact prefix index and a pin policy that
//! reserves the pinned region for the critical class. Real implementations live in kvc-reuse
//! and kvc-pin; these keep the scheduler's tests independent of them.
#![allow(dead_code)]

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

use kvc_core::{
    BlockId, LoadSample, PinPolicy, PinReleaseError, PlaceRequest, Placement, PoolView, PrefixHit,
    QosClass, Refusal, RegionBlocks, Resize, Retention, RetentionUpdate, ReuseError, ReuseIndex,
    ReuseScope, Route, SeqId, WaitReason,
};

struct Entry {
    block: BlockId,
    parent: Option<u64>,
    children: usize,
    in_use: usize,
    last_used: u64,
}

/// An exact prefix index: chained hashes of full blocks (test-only hasher), LRU over unused
/// leaves.
pub struct TestIndex {
    pub block_size: u32,
    entries: HashMap<u64, Entry>,
    by_block: HashMap<BlockId, u64>,
    clock: u64,
}

impl TestIndex {
    pub fn new(block_size: u32) -> Self {
        Self {
            block_size,
            entries: HashMap::new(),
            by_block: HashMap::new(),
            clock: 0,
        }
    }

    pub fn cached_blocks(&self) -> usize {
        self.entries.len()
    }

    pub fn blocks(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.entries.values().map(|e| e.block)
    }

    fn hashes(&self, scope: &ReuseScope, tokens: &[u32]) -> Vec<u64> {
        let mut out = Vec::new();
        let mut prev = {
            let mut h = DefaultHasher::new();
            scope.tenant.hash(&mut h);
            h.finish()
        };
        for chunk in tokens.chunks_exact(self.block_size as usize) {
            let mut h = DefaultHasher::new();
            prev.hash(&mut h);
            chunk.hash(&mut h);
            prev = h.finish();
            out.push(prev);
        }
        out
    }
}

impl ReuseIndex for TestIndex {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn lookup(&mut self, scope: &ReuseScope, prompt: &[u32], _: u64) -> PrefixHit {
        self.clock += 1;
        let mut hit = PrefixHit::default();
        for h in self.hashes(scope, prompt) {
            let Some(e) = self.entries.get_mut(&h) else {
                break;
            };
            e.in_use += 1;
            e.last_used = self.clock;
            hit.blocks.push(e.block);
        }
        hit.tokens = hit.blocks.len() as u64 * u64::from(self.block_size);
        hit
    }

    fn insert(
        &mut self,
        scope: &ReuseScope,
        tokens: &[u32],
        blocks: &[BlockId],
        _: u64,
        newly: &mut Vec<BlockId>,
    ) -> Result<(), ReuseError> {
        self.clock += 1;
        let hashes = self.hashes(scope, tokens);
        if hashes.len() != blocks.len() {
            return Err(ReuseError::LengthMismatch {
                full_blocks: hashes.len(),
                blocks: blocks.len(),
            });
        }
        let mut parent = None;
        for (index, (h, &block)) in hashes.into_iter().zip(blocks).enumerate() {
            match self.entries.get(&h) {
                // Already cached here: the offering request holds it already.
                Some(e) if e.block == block => {}
                // Computed twice: the request's copy stays private, with the rest.
                Some(_) => break,
                None => {
                    if self.by_block.contains_key(&block) {
                        return Err(ReuseError::BlockAlreadyCached { block, index });
                    }
                    if let Some(p) = parent.and_then(|p| self.entries.get_mut(&p)) {
                        p.children += 1;
                    }
                    self.entries.insert(
                        h,
                        Entry {
                            block,
                            parent,
                            children: 0,
                            in_use: 1,
                            last_used: self.clock,
                        },
                    );
                    self.by_block.insert(block, h);
                    newly.push(block);
                }
            }
            parent = Some(h);
        }
        Ok(())
    }

    fn acquire(&mut self, blocks: &[BlockId]) -> Result<(), ReuseError> {
        for b in blocks {
            if let Some(e) = self.by_block.get(b).and_then(|h| self.entries.get_mut(h)) {
                e.in_use += 1;
            }
        }
        Ok(())
    }

    fn release(&mut self, blocks: &[BlockId]) -> Result<(), ReuseError> {
        let mut result = Ok(());
        for &block in blocks {
            if let Some(e) = self
                .by_block
                .get(&block)
                .and_then(|h| self.entries.get_mut(h))
            {
                if e.in_use == 0 {
                    result = result.and(Err(ReuseError::NotInUse { block }));
                } else {
                    e.in_use -= 1;
                }
            }
        }
        result
    }

    fn evictable_blocks(&self) -> usize {
        self.entries.values().filter(|e| e.in_use == 0).count()
    }

    fn evict(&mut self, count: usize, _: u64, evicted: &mut Vec<BlockId>) -> usize {
        let mut n = 0;
        while n < count {
            let victim = self
                .entries
                .iter()
                .filter(|(_, e)| e.in_use == 0 && e.children == 0)
                .min_by_key(|(h, e)| (e.last_used, **h))
                .map(|(h, _)| *h);
            let Some(h) = victim else { break };
            let e = self.entries.remove(&h).unwrap();
            self.by_block.remove(&e.block);
            if let Some(p) = e.parent.and_then(|p| self.entries.get_mut(&p)) {
                p.children -= 1;
            }
            evicted.push(e.block);
            n += 1;
        }
        n
    }

    fn set_retention(&mut self, _: u64, _: Retention) {}
}

/// Critical traffic allocates from the pinned region and borrows from dynamic when it is full;
/// every other class uses the dynamic region only.
#[derive(Default)]
pub struct CriticalPinned {
    held: HashMap<SeqId, RegionBlocks>,
    pub borrowed: usize,
}

impl PinPolicy for CriticalPinned {
    fn place(&mut self, req: &PlaceRequest, pool: &PoolView) -> Placement {
        let blocks = if req.class == QosClass::CRITICAL {
            if req.blocks > pool.total() {
                return Placement::Refuse {
                    reason: Refusal::Impossible,
                };
            }
            let pinned = req.blocks.min(pool.pinned_free);
            let dynamic = req.blocks - pinned;
            if dynamic > pool.dynamic_free {
                return Placement::Wait {
                    reason: WaitReason::Exhausted,
                };
            }
            if dynamic > 0 {
                self.borrowed += 1;
            }
            RegionBlocks { pinned, dynamic }
        } else {
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
            RegionBlocks {
                pinned: 0,
                dynamic: req.blocks,
            }
        };
        let h = self.held.entry(req.seq).or_default();
        h.pinned += blocks.pinned;
        h.dynamic += blocks.dynamic;
        Placement::Allocate {
            blocks,
            route: Route::Normal,
        }
    }

    fn release(&mut self, seq: SeqId, blocks: RegionBlocks) -> Result<(), PinReleaseError> {
        if blocks.total() == 0 {
            return Ok(());
        }
        let h = self
            .held
            .get_mut(&seq)
            .ok_or(PinReleaseError::UnknownSeq { seq })?;
        if blocks.pinned > h.pinned || blocks.dynamic > h.dynamic {
            return Err(PinReleaseError::MoreThanHeld {
                seq,
                returned: blocks,
                held: *h,
            });
        }
        h.pinned -= blocks.pinned;
        h.dynamic -= blocks.dynamic;
        if h.total() == 0 {
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

    fn may_hold_pinned(&self, class: QosClass) -> bool {
        class == QosClass::CRITICAL
    }
}

impl CriticalPinned {
    pub fn holds_nothing(&self) -> bool {
        self.held.is_empty()
    }
    pub fn held_seqs(&self) -> HashSet<SeqId> {
        self.held.keys().copied().collect()
    }
}
