//! Pinning for KV caches: a pinned region of KV memory reserved for high-priority traffic, sized
//! from observed demand, with graceful degradation, tenant quotas, soft prefix pins and
//! placement of reservations across devices.
//!
//! [`PinningPolicy`] implements [`kvc_core::PinPolicy`], the trait a scheduler consults:
//!
//! - **placement**: reserved classes (by default `critical`) allocate from
//!   `RegionId::PINNED`; the others only from `RegionId::DYNAMIC`, never from pinned. When the
//!   pinned region is full, reserved classes borrow from dynamic (`Route::Borrowed`). When
//!   dynamic is exhausted the decision is to wait, preempt the lowest class or downgrade it
//!   ([`OnExhausted`]);
//! - **sizing**: [`Reserve`] is none, a [`StaticReserve`] or an [`AdaptiveReserve`] (a demand
//!   percentile over a sliding [`PercentileWindow`] plus headroom, with bounds, hysteresis and
//!   cool-downs). Resizes move free blocks only;
//! - **tenant quotas**: each tenant's share of the pinned region ([`OverQuota`]) and of the
//!   soft-pin budget;
//! - **retention**: [`SoftPins`] raise the retention priority of cached prefix blocks for a TTL,
//!   under a byte budget; the output is plain `kvc_core::Retention` data for a prefix cache;
//! - **devices**: [`place_tenants`] and [`rebalance`] assign tenants' reservations to devices.
//!
//! The crate depends on `kvc-core` only; it never touches memory. The scheduler applies its
//! decisions to an allocator. Times are caller-supplied milliseconds. The `kvc-core`
//! vocabulary a policy user needs (the [`PinPolicy`] trait and its plain data, QoS classes,
//! sequence and tenant ids) is re-exported, so depending on this crate alone is enough.
//!
//! `examples/admission.rs` (`cargo run -p kvc-pin --example admission`) is a whole program: a
//! static reserve, high- and low-priority requests, overflow, release, soft pins and every
//! error an adopter meets.
//!
//! ```
//! use kvc_pin::{LoadSample, PinPolicy, PlaceRequest, Placement, PoolView, QosClass,
//!     RegionBlocks, Resize, Route, SeqId, TenantId};
//! use kvc_pin::{AdaptiveConfig, AdaptiveReserve, PinningPolicy, PolicyConfig, Reserve,
//!     SoftPinConfig};
//!
//! let pool_blocks = 1_000;
//! let mut cfg = AdaptiveConfig::new(pool_blocks); // p99 + 10%, bounds, hysteresis, cool-downs
//! cfg.min_samples = 1; // follow demand from the first observation (the default waits for 100)
//! let adaptive = AdaptiveReserve::new(cfg)?;
//! let soft = SoftPinConfig::new(2 << 20, pool_blocks, 0.05)?;
//! let mut policy =
//!     PinningPolicy::new(PolicyConfig::new(Reserve::Adaptive(Box::new(adaptive)), soft))?;
//!
//! let mut pool = PoolView { pinned_capacity: 0, pinned_free: 0, dynamic_capacity: 1_000,
//!     dynamic_free: 1_000 };
//! // A best-effort request never gets pinned blocks.
//! let batch = PlaceRequest { seq: SeqId(1), tenant: TenantId(1), class: QosClass::BEST_EFFORT,
//!     blocks: 8, now_ms: 0 };
//! assert_eq!(policy.place(&batch, &pool), Placement::Allocate {
//!     blocks: RegionBlocks { pinned: 0, dynamic: 8 }, route: Route::Normal });
//! pool.dynamic_free -= 8;
//!
//! // Critical demand of 100 blocks: the reserve grows to its p99 plus 10% headroom.
//! let chat = PlaceRequest { seq: SeqId(2), tenant: TenantId(2), class: QosClass::CRITICAL,
//!     blocks: 100, now_ms: 0 };
//! let _ = policy.place(&chat, &pool); // borrows from dynamic: the reserve is still empty
//! pool.dynamic_free -= 100;
//! let resize = policy.tick(&LoadSample { now_ms: 0, pool, waiting: &[] });
//! assert_eq!(resize, Resize::Grow { blocks: 110, target: 110 });
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod devices;
mod policy;
mod reserve;
mod soft;
mod window;

pub use kvc_core::{
    ClassBlocks, LoadSample, PinPolicy, PinReleaseError, PlaceRequest, Placement, PoolView,
    QosClass, QosClasses, QosError, Refusal, RegionBlocks, RegionId, Resize, Retention,
    RetentionUpdate, Route, SeqId, TenantId, WaitReason,
};

pub use devices::{
    Assignment, Demand, Device, DeviceId, DevicePlan, DevicePlanError, Move, Rebalanced,
    place_tenants, rebalance,
};
pub use policy::{
    OnExhausted, OverQuota, PinningPolicy, PolicyConfig, PolicyConfigError, PolicyStats,
};
pub use reserve::{
    AdaptiveConfig, AdaptiveReserve, Reserve, ReserveError, StaticReserve, StaticSize,
};
pub use soft::{
    PinError, PinGrant, PinId, PinRequest, PinTarget, SoftPinConfig, SoftPinConfigError, SoftPins,
    UnpinError,
};
pub use window::PercentileWindow;
