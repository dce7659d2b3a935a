//! The [`ReuseIndex`] trait a scheduler consults to reuse computed KV: the longest cached
//! prefix of a prompt (or a session's earlier turns), the offer of newly computed blocks, and
//! eviction when memory is needed.
//!
//! Ownership follows one rule: the index never allocates or frees memory. It tells the caller
//! which blocks to take or drop a reference on, and the caller does that through its
//! [`BlockAllocator`](crate::BlockAllocator).

use crate::{BlockId, Retention, SessionId, TenantId};

/// Whose cache a lookup or insert may touch: a tenant's, and optionally one session's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReuseScope {
    /// The tenant: lookups never hit another tenant's blocks unless their salts are shared.
    pub tenant: TenantId,
    /// The multi-turn session the request continues, if any.
    pub session: Option<SessionId>,
}

/// A cache hit: the first `blocks.len()` full blocks of the prompt are already computed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[must_use = "hit blocks are marked in use: take a reference on each or give them back"]
pub struct PrefixHit {
    /// The cached blocks, in prompt order.
    pub blocks: Vec<BlockId>,
    /// Tokens they cover (`blocks.len() × block size`; never the whole prompt, so the last
    /// prompt token is always computed and yields logits).
    pub tokens: u64,
}

/// A prefix and session cache as a scheduler sees it.
///
/// Implemented by `kvc_reuse` caches; a scheduler with reuse off uses an index that never hits.
pub trait ReuseIndex {
    /// Tokens per block of this index.
    fn block_size(&self) -> u32;

    /// The longest cached prefix of `prompt` for `scope`. The returned blocks are marked in
    /// use (never evicted) until [`release`](Self::release); the caller takes its own
    /// allocator reference on each for the sequence.
    fn lookup(&mut self, scope: &ReuseScope, prompt: &[u32], now_ms: u64) -> PrefixHit;

    /// Offers the computed full blocks of a sequence: `blocks[i]` holds
    /// `tokens[i × block_size..(i + 1) × block_size]`. Appends to `newly_cached` the blocks the
    /// index now keeps; the caller takes one allocator reference on each, on the index's
    /// behalf. Offering blocks marks nothing in use (only lookups do): evicting a block a
    /// running sequence still holds drops the index's reference only.
    fn insert(
        &mut self,
        scope: &ReuseScope,
        tokens: &[u32],
        blocks: &[BlockId],
        now_ms: u64,
        newly_cached: &mut Vec<BlockId>,
    );

    /// A sequence stopped using these blocks (finished, preempted or cancelled): they may now
    /// be evicted.
    fn release(&mut self, blocks: &[BlockId]);

    /// Forgets up to `count` cached blocks that no sequence uses, leaf first, appending them
    /// to `evicted`; the caller drops the index's allocator reference on each.
    fn evict(&mut self, count: usize, now_ms: u64, evicted: &mut Vec<BlockId>);

    /// Changes the retention of a cached block (from a pin policy's soft pins).
    fn set_retention(&mut self, block_hash: u64, retention: Retention);
}

/// The index of a deployment with reuse off: never hits, keeps nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoReuse {
    /// Tokens per block.
    pub block_size: u32,
}

impl ReuseIndex for NoReuse {
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn lookup(&mut self, _: &ReuseScope, _: &[u32], _: u64) -> PrefixHit {
        PrefixHit::default()
    }
    fn insert(&mut self, _: &ReuseScope, _: &[u32], _: &[BlockId], _: u64, _: &mut Vec<BlockId>) {}
    fn release(&mut self, _: &[BlockId]) {}
    fn evict(&mut self, _: usize, _: u64, _: &mut Vec<BlockId>) {}
    fn set_retention(&mut self, _: u64, _: Retention) {}
}
