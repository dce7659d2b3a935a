//! Plain data of the tiers below device memory as the [`KvManager`](crate::KvManager) and the
//! [`Scheduler`](crate::Scheduler) see them: when cached blocks are written down
//! ([`TierMode`]), the blocks to write down ([`BlockOffload`]) and to read back
//! ([`BlockLoad`], grouped per sequence in a [`LoadJob`]), what a tier lookup started
//! ([`PrefixLoad`]), how a load ended ([`LoadResult`]) and why a completion was refused
//! ([`LoadError`]).
//!
//! The manager only decides; the bytes move in the engine, which executes the offloads and
//! loads against its tiers (for example a `kvc_tier::TierStack`) and reports each load back.
//! See `docs/tiers.md`, "Tiers inside the scheduler".

use std::fmt;

use kvc_core::{BlockId, Retention, SeqId, StoreKey};
use thiserror::Error;

use crate::manager::KvError;

/// When the device's cached blocks are copied down to the tiers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TierMode {
    /// When the device evicts a cached block (its bytes are still intact until the plan that
    /// reports the offload has executed its offloads): no traffic for blocks that stay hot.
    #[default]
    WriteBack,
    /// When the device caches a block: eviction costs nothing and other engines sharing the
    /// tiers see the block at once, at the cost of copying blocks that are never evicted.
    WriteThrough,
}

/// A load batch's id, unique per manager (and so per scheduler), increasing from 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LoadId(pub u64);

impl fmt::Display for LoadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "load#{}", self.0)
    }
}

/// A device block to copy down to the tiers before anything else in the step: it is being
/// evicted (write-back) and may be handed to another sequence in this same plan, or it was
/// just cached (write-through).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockOffload {
    /// The device block whose K and V (every layer) to copy.
    pub device: BlockId,
    /// The key to store it under.
    pub key: StoreKey,
    /// Its retention on the device when it was evicted or cached: the priority in force
    /// (0–100; `Retention::DEFAULT_PRIORITY` unless a pin policy or the application set one)
    /// and when a pin decays to the default (the scheduler's clock). Pass it to the tiers
    /// (`TierStack::offload_retained`, with the step's clock), so a host tier's minimum
    /// priority keeps one-off blocks out and pinned blocks outlive the others there until
    /// their pin expires.
    pub retention: Retention,
}

/// A block to copy from the tiers into a freshly allocated device block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockLoad {
    /// The key to load.
    pub key: StoreKey,
    /// The device block to write its K and V into.
    pub device: BlockId,
}

/// One sequence's loads, in prompt order (the blocks continue the sequence's device-cached
/// prefix). The sequence is not in any batch until the load is reported with
/// `complete_load`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[must_use = "a load must be executed and reported with complete_load, or its blocks stay held"]
pub struct LoadJob {
    /// The load's id, for `complete_load`.
    pub id: LoadId,
    /// The sequence waiting for it.
    pub seq: SeqId,
    /// The blocks, in prompt order.
    pub blocks: Vec<BlockLoad>,
}

/// What [`KvManager::load_prefix`](crate::KvManager::load_prefix) did for a sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use = "a started load must be executed and reported with complete_load, or its blocks stay held"]
pub enum PrefixLoad {
    /// Nothing to load: no tier continues the sequence's device prefix, or device blocks
    /// could not be allocated for the blocks a tier holds. The rest of the prompt is computed.
    None,
    /// A load started: the engine copies its blocks in and reports it with `complete_load`.
    Started(LoadJob),
    /// Blocks this prefix continues into are being loaded already, for another sequence, by
    /// load `load`: nothing was allocated or issued, so the same blocks are not loaded twice.
    /// Once that load is reported they are cached on the device: give the sequence's blocks
    /// back (`free`) and look its prefix up again then, or compute the rest now.
    InFlight {
        /// The load bringing those blocks in.
        load: LoadId,
    },
}

impl PrefixLoad {
    /// The started load, if any (`Started`): for callers that treat a load in flight like
    /// no tier hit.
    pub fn started(self) -> Option<LoadJob> {
        match self {
            Self::Started(job) => Some(job),
            Self::None | Self::InFlight { .. } => None,
        }
    }
}

/// How a load ended, as the engine reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LoadResult {
    /// Every block holds its KV.
    Loaded,
    /// Only the leading `loaded_blocks` blocks hold their KV (a block evicted from the tiers
    /// since the lookup, a lost server, a corrupt page): the rest are recomputed.
    Failed {
        /// Leading blocks that hold their KV (at most the job's block count).
        loaded_blocks: usize,
    },
}

/// What a completed load did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LoadDone {
    /// The sequence the load was for.
    pub seq: SeqId,
    /// Leading blocks of the load that hold their KV (now cached on the device).
    pub loaded_blocks: usize,
    /// The sequence's computed tokens now (its device prefix plus the loaded blocks), or
    /// `None` when the sequence was freed while the load was in flight: its blocks were held
    /// for the load until now and are released.
    pub computed: Option<u64>,
}

/// Why a load completion was refused: nothing changed, except for [`LoadError::Memory`].
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum LoadError {
    /// No load with this id was ever issued.
    #[error("{id} was never issued")]
    Unknown {
        /// The load.
        id: LoadId,
    },
    /// The load was already reported.
    #[error("{id} was already completed")]
    AlreadyCompleted {
        /// The load.
        id: LoadId,
    },
    /// A failed load reported more loaded blocks than the job has.
    #[error("{id} has {blocks} blocks; {loaded_blocks} reported loaded")]
    TooManyBlocks {
        /// The load.
        id: LoadId,
        /// Blocks reported loaded.
        loaded_blocks: usize,
        /// Blocks in the job.
        blocks: usize,
    },
    /// The load was applied (the sequence's computed prefix moved, or its held blocks were
    /// released), but caching or releasing its blocks hit a broken invariant in a component
    /// (a pool or an index that disagrees with the manager).
    #[error("{id} applied, but a component refused: {source}")]
    Memory {
        /// The load.
        id: LoadId,
        /// The component's error.
        source: KvError,
    },
}
