//! Plain-data inputs and outputs of [`KvManager`](super::KvManager): its configuration, what a
//! sequence asks for, the answer to an allocation, usage figures and errors.

use kvc_core::{
    AllocError, BlockId, PinReleaseError, QosClass, RefError, Refusal, ReuseError, SeqId,
    SessionId, TenantId, WaitReason,
};
use thiserror::Error;

/// Settings of a [`KvManager`](super::KvManager).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvManagerConfig {
    /// Tokens per block; must equal the reuse index's.
    pub block_size: u32,
    /// How long a session's context stays pinned after its last turn, in milliseconds of the
    /// caller's clock. `None`: until the session is ended.
    pub session_ttl_ms: Option<u64>,
}

impl Default for KvManagerConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            session_ttl_ms: None,
        }
    }
}

/// Why a [`KvManager`](super::KvManager) could not be built.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum KvConfigError {
    /// The block size is 0.
    #[error("the block size must be at least 1 token")]
    ZeroBlockSize,
    /// The reuse index cuts blocks of another size.
    #[error("the reuse index uses blocks of {index} tokens, the manager {manager}")]
    BlockSizeMismatch {
        /// The manager's block size.
        manager: u32,
        /// The index's block size.
        index: u32,
    },
}

/// Who a sequence belongs to: what the pin policy places by and the reuse index scopes by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeqOwner {
    /// Its tenant (cache isolation, quotas).
    pub tenant: TenantId,
    /// Its QoS class.
    pub class: QosClass,
    /// The multi-turn session it continues, if any.
    pub session: Option<SessionId>,
}

/// What [`KvManager::allocate_slots`](super::KvManager::allocate_slots) is asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotRequest {
    /// Token slots to assign now, after those the sequence already has.
    pub new_tokens: u64,
    /// Further tokens to hold blocks for without assigning their slots (speculative decoding,
    /// multi-step decoding).
    pub lookahead: u64,
    /// Whether this is an admission (a sequence not yet running): an admission may not dip
    /// into the dynamic region's watermark reserve, which running sequences grow into.
    pub admission: bool,
}

/// Why an allocation has to wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Pressure {
    /// Even evicting every evictable cached block would not free enough.
    Exhausted {
        /// Blocks the request needs, per the pin policy's placement.
        needed: usize,
        /// Free plus evictable blocks in the regions placed into.
        available: usize,
    },
    /// The pin policy says wait.
    Wait {
        /// Its reason.
        reason: WaitReason,
    },
    /// The pin policy asks the caller to preempt a running sequence of `victim`, then retry.
    PreemptLowest {
        /// The class to preempt from.
        victim: QosClass,
    },
    /// The pin policy caps class `class` at `max_running` sequences; the request waits.
    Downgrade {
        /// The capped class.
        class: QosClass,
        /// Sequences of that class allowed to run.
        max_running: usize,
    },
}

/// The answer to an allocation: slots assigned now, later, or never.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[must_use = "an allocation that did not happen must be waited on, preempted for, or refused"]
pub enum SlotGrant {
    /// The blocks are held and the slots assigned.
    Now,
    /// Not now: nothing was evicted or allocated; retry when memory frees up (or preempt).
    Later(Pressure),
    /// It can never fit (or the pin policy refuses it): nothing changed.
    Never(Refusal),
}

/// One region's blocks, by state. `free + evictable + in_use == capacity`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RegionUsage {
    /// Blocks the region holds.
    pub capacity: usize,
    /// Blocks on the free list.
    pub free: usize,
    /// Cached blocks nothing but the reuse index holds: free on demand.
    pub evictable: usize,
    /// Blocks a sequence, a session or a transfer holds.
    pub in_use: usize,
}

impl RegionUsage {
    /// Blocks that can be handed out now: free plus evictable.
    #[must_use]
    pub const fn available(&self) -> usize {
        self.free + self.evictable
    }
}

/// Usage of the pinned and dynamic regions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KvUsage {
    /// The pinned region.
    pub pinned: RegionUsage,
    /// The dynamic region.
    pub dynamic: RegionUsage,
}

impl KvUsage {
    /// Both regions together.
    #[must_use]
    pub const fn total(&self) -> RegionUsage {
        RegionUsage {
            capacity: self.pinned.capacity + self.dynamic.capacity,
            free: self.pinned.free + self.dynamic.free,
            evictable: self.pinned.evictable + self.dynamic.evictable,
            in_use: self.pinned.in_use + self.dynamic.in_use,
        }
    }
}

/// Counters since the manager was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvStats {
    /// Blocks served from the reuse index by lookups.
    pub hit_blocks: u64,
    /// Blocks newly cached by the reuse index.
    pub cached_blocks: u64,
    /// Cached blocks evicted (each one freed a block).
    pub evicted_blocks: u64,
    /// Blocks a sequence gave up for the index's cached copy of the same tokens
    /// ([`KvManager::cache_blocks_adopting`](super::KvManager::cache_blocks_adopting)): each
    /// freed a duplicate.
    pub adopted_blocks: u64,
    /// Copy-on-write copies of a shared partial block.
    pub cow_copies: u64,
    /// Sessions ended by their TTL.
    pub sessions_expired: u64,
    /// Prefix lookups that continued into the lower tiers (a device miss before the last
    /// usable block, with tiers configured).
    pub tier_lookups: u64,
    /// Blocks the lower tiers held past the device's prefix.
    pub tier_hit_blocks: u64,
    /// Of those, blocks not loaded because device blocks could not be allocated for them under
    /// the pressure rules (they are recomputed instead).
    pub tier_fallback_blocks: u64,
    /// Tier lookups answered [`PrefixLoad::InFlight`](crate::PrefixLoad::InFlight): the
    /// blocks were already being loaded for another sequence, so they were not loaded twice.
    pub tier_in_flight: u64,
    /// Blocks loaded from the tiers (reported loaded by `complete_load`).
    pub loaded_blocks: u64,
    /// Loads reported `Failed` (their missing blocks are recomputed).
    pub load_failures: u64,
    /// Blocks handed to the engine to copy down to the tiers.
    pub offloaded_blocks: u64,
}

/// Why a [`KvManager`](super::KvManager) operation failed.
///
/// `UnknownSeq`, `DuplicateSeq`, `UnknownSession`, `HoldsBlocks`, `TokenOverflow` and
/// `RewindIntoCached` are caller errors and change nothing. The others report a broken
/// invariant in a component (a pool, a pin policy or an index that disagrees with the
/// manager): the operation still released everything it was asked to release.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum KvError {
    /// No sequence with this id is open.
    #[error("{seq} is not open in the KV manager")]
    UnknownSeq {
        /// The sequence.
        seq: SeqId,
    },
    /// A sequence with this id is already open.
    #[error("{seq} is already open in the KV manager")]
    DuplicateSeq {
        /// The sequence.
        seq: SeqId,
    },
    /// No session with this id holds context.
    #[error("{session} holds no context")]
    UnknownSession {
        /// The session.
        session: SessionId,
    },
    /// A prefix lookup for a sequence that already holds blocks.
    #[error("{seq} already holds blocks: look up its prefix before allocating")]
    HoldsBlocks {
        /// The sequence.
        seq: SeqId,
    },
    /// The token count would overflow.
    #[error("{seq}: token count overflows")]
    TokenOverflow {
        /// The sequence.
        seq: SeqId,
    },
    /// A rewind below the sequence's cached blocks, which other requests may be reading.
    #[error("{seq}: cannot rewind to {tokens} tokens below its {cached} cached tokens")]
    RewindIntoCached {
        /// The sequence.
        seq: SeqId,
        /// The token count asked for.
        tokens: u64,
        /// Tokens in blocks the reuse index holds.
        cached: u64,
    },
    /// The pin policy granted another number of blocks than asked.
    #[error("{seq}: the pin policy granted {granted} blocks for a request of {asked}")]
    PlacementMismatch {
        /// The sequence.
        seq: SeqId,
        /// Blocks asked for.
        asked: usize,
        /// Blocks granted.
        granted: usize,
    },
    /// The operation is refused while the sequence waits for a load from the tiers (its
    /// loading blocks hold no KV yet): complete the load first.
    #[error("{seq} waits for a load from the tiers")]
    Loading {
        /// The sequence.
        seq: SeqId,
    },
    /// A tier lookup for a sequence that holds more than its device prefix: continue into
    /// the tiers right after `lookup_prefix`, before allocating slots.
    #[error("{seq} holds more than its computed prefix: look up the tiers before allocating")]
    NotAtPrefix {
        /// The sequence.
        seq: SeqId,
    },
    /// The reuse index said it counted the sequence on a cached copy of its block at
    /// `index`, but the sequence does not hold `block` there
    /// ([`ReuseIndex::offer_adopting`](kvc_core::ReuseIndex::offer_adopting)): the index's
    /// count was given back, the table is unchanged.
    #[error(
        "the reuse index adopted a cached copy for {block} at {index} of {seq}, which holds another block there"
    )]
    AdoptMismatch {
        /// The sequence.
        seq: SeqId,
        /// Position in its table.
        index: usize,
        /// The block the index named.
        block: BlockId,
    },
    /// The pool refused a reference operation.
    #[error(transparent)]
    Ref(#[from] RefError),
    /// The pool refused an allocation it had said it could serve.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// The pin policy refused a release.
    #[error(transparent)]
    Pin(#[from] PinReleaseError),
    /// The reuse index refused an operation.
    #[error(transparent)]
    Reuse(#[from] ReuseError),
}
