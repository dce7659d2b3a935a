//! Tiers of KV memory below the GPU, behind [`kvc_core::BlockStore`]:
//!
//! - [`HostTier`]: a host memory pool whose pages hold several device blocks, with its own page
//!   eviction in the device's order (lowest retention priority first, pins expiring, then least
//!   recently used) and a minimum retention priority for offloading;
//! - [`DiskTier`]: one checksummed file per page under a folder, bounded by a byte budget and
//!   found again after a restart;
//! - [`SharedTier`]: blocks on a Redis or Valkey server shared by many engines, with soft
//!   retention, upload leases, pipelined batches, and a lost server answered as misses;
//! - [`TierStack`]: the three wired together: offload (write-back or write-through), lookup of
//!   the longest prefix across tiers, load with promotion, demotion of host evictions to disk.
//!
//! Every store is opened for one [`StoreNamespace`] (model, layout,
//! dtype, tensor-parallel rank, block size), and persisted blocks carry it, so a block of
//! another model or layout is never read back. The guide is `docs/tiers.md`.
//!
//! The `kvc-core` types a tier user needs (the [`BlockStore`] trait, keys, namespaces and
//! layouts, [`PutOutcome`], [`StoreError`], [`Retention`]) are re-exported, so depending on
//! this crate alone is enough. `examples/host_disk.rs` (`cargo run -p kvc-tier --example
//! host_disk`) is a whole program: a host and disk stack, offload, lookup, load, bad input,
//! and a restart that finds the disk pages again.
//!
//! ```
//! use kvc_tier::{DType, KvLayout, StoreKey, StoreNamespace};
//! use kvc_tier::{DeviceEvent, HostConfig, HostTier, OffloadMode, TierKind, TierStack};
//!
//! let layout = KvLayout::new(2, 2, 8, 16, DType::F16)?; // 2 KiB blocks
//! let ns = StoreNamespace::new("demo-model", layout, 0, 1)?;
//! let host = HostTier::new(ns, HostConfig::new(1 << 20, 4))?;
//! let tiers = TierStack::new(host, None, None, OffloadMode::WriteBack);
//!
//! // The device evicts two cached blocks: they go to the host tier.
//! let keys = [StoreKey(11), StoreKey(12)];
//! let bytes = vec![7u8; 2 * 2048];
//! let stored = tiers.offload(DeviceEvent::Evicted, &keys, &bytes, 50)?;
//! assert_eq!(stored.stored, 2);
//!
//! // A later prompt with the same first two blocks finds them and loads them back.
//! let prompt = [StoreKey(11), StoreKey(12), StoreKey(13)];
//! let found = tiers.lookup(&prompt)?;
//! assert_eq!(found, [TierKind::Host, TierKind::Host]);
//! let mut dst = vec![0u8; found.len() * 2048];
//! let loaded = tiers.load(&prompt, &found, &mut dst)?;
//! assert_eq!(loaded.blocks, 2);
//! assert_eq!(dst, bytes);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod clock;
mod codec;
pub mod disk;
pub mod host;
pub mod shared;
pub mod stack;

pub use kvc_core::{
    BlockStore, DType, KvLayout, LayoutError, LowerTiers, NamespaceError, PutOutcome, Retention,
    StoreError, StoreKey, StoreNamespace, StoreUsage,
};

pub use disk::{DiskConfig, DiskOpenError, DiskStats, DiskTier};
pub use host::{HostConfig, HostConfigError, HostStats, HostTier, Spill};
pub use shared::{SharedConfig, SharedConfigError, SharedStats, SharedTier};
pub use stack::{
    DeviceEvent, FlushOutcome, LoadOutcome, OffloadMode, StackStats, TierKind, TierStack,
};

/// The environment variable naming the Redis server of the shared-tier tests and benches
/// (`cargo xtask test` starts one and sets it).
pub const REDIS_URL_ENV: &str = "KVC_REDIS_URL";
