//! Shared vocabulary of the kvc KV-cache toolkit.
//!
//! Every kvc crate speaks through the types here, so that an inference engine can pick one
//! crate (an allocator, a prefix cache, a scheduler) and wire it to its own parts:
//!
//! - typed ids: [`BlockId`], [`SeqId`], [`SessionId`], [`TenantId`], [`RegionId`];
//! - [`KvLayout`]: bytes per token and per block of a model's KV cache;
//! - [`BlockTable`]: one sequence's logical-to-physical block map;
//! - [`PagedLayout`], [`PageTable`], [`SlotMapping`]: the memory layout with strides, the CSR
//!   batch page table and the slot mapping that kernels take, validated;
//! - [`BlockAllocator`]: the small trait every block source implements, with its errors;
//! - [`QosClass`] and [`QosClasses`]: request priority classes;
//! - [`PinPolicy`]: how a scheduler asks where blocks come from, how big the pinned region
//!   should be and how long cached prefixes are retained;
//! - [`ReuseIndex`]: how a scheduler asks a prefix or session cache for reusable KV;
//! - [`BlockStore`]: a store of KV blocks below device memory (host, disk, shared), keyed by
//!   [`StoreKey`] within a [`StoreNamespace`], and [`LowerTiers`], the lookup a memory manager
//!   makes into those tiers after a device miss;
//! - [`sync`]: std or loom synchronisation types, for model-checked concurrent code;
//! - [`rng`]: [`rng::SplitMix64`], the seeded generator every crate's tests and workloads use.
//!
//! ```
//! use kvc_core::{BlockId, DType, KvLayout};
//!
//! let layout = KvLayout::new(32, 8, 128, 16, DType::BF16)?; // Llama-3-8B
//! let blocks = layout.blocks_in_bytes(40 << 30); // 40 GiB of KV memory
//! assert_eq!(blocks, 20_480);
//! assert_eq!(BlockId(3).to_string(), "block#3");
//! # Ok::<(), kvc_core::LayoutError>(())
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod alloc;
mod block_table;
mod ids;
mod layout;
mod paged;
mod pin;
mod qos;
mod reuse;
pub mod rng;
mod store;
pub mod sync;

pub use alloc::{
    Admission, AllocError, BlockAllocator, BlockCopy, CowError, RefError, Released, ResizeError,
    Writable, release_one_by_one,
};
pub use block_table::BlockTable;
pub use ids::{BlockId, HostBlockId, RegionId, SeqId, SessionId, TenantId};
pub use layout::{DType, KvLayout, LayoutDim, LayoutError};
pub use paged::{
    PageTable, PageTableError, PagedLayout, PagedLayoutError, SlotMapping, SlotMappingError,
};
pub use pin::{
    ClassBlocks, LoadSample, PinPolicy, PinReleaseError, PlaceRequest, Placement, PoolView,
    Refusal, RegionBlocks, Resize, Retention, RetentionUpdate, Route, WaitReason,
};
pub use qos::{QosClass, QosClasses, QosError};
pub use reuse::{
    Adopted, NoReuse, Offer, OfferRole, PrefixHit, ReuseError, ReuseIndex, ReuseScope, TierKey,
};
pub use store::{
    BlockStore, LowerTiers, NamespaceError, PutOutcome, StoreError, StoreKey, StoreNamespace,
    StoreUsage, check_buffer,
};
