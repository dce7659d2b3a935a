//! Scheduling over paged KV: continuous batching that composes a block allocator, a pin
//! policy and a reuse index through the `kvc-core` traits, and emits plain-data step plans.
//!
//! The scheduler owns no memory layout and launches no kernel. Each [`Scheduler::step`]
//! admits requests by QoS class (FCFS within a class, with aging), reuses cached prefixes,
//! allocates blocks on demand from the region the pin policy names, builds a batch of chunked
//! prefills and decodes under a token budget, and preempts the least important sequence when
//! memory runs out. The engine executes the [`StepPlan`] and hands the sampled tokens back with
//! [`Scheduler::complete_step`]. Other threads submit and cancel through a [`Submitter`].
//!
//! Memory goes through [`KvManager`], which an engine with its own scheduler can use alone:
//! computed-prefix lookup, slots with lookahead (`Now` / `Later` / `Never`), cached full
//! blocks, forks with copy-on-write, session contexts and usage figures, under one ownership
//! rule (every holder of a block holds one pool reference; eviction only takes blocks nothing
//! but the cache holds, and only when that makes room).
//!
//! Compute, like memory, can be reserved: [`Scheduler::with_compute_reserve`] holds a share of
//! every step's token budget for the critical classes ([`ComputeReserve`]), so their prefills
//! do not queue behind best-effort work, while best-effort work keeps a floor.
//!
//! Below device memory, [`Scheduler::with_tiers`] (or [`KvManager::with_tiers`]) continues a
//! device miss into host, disk or shared tiers (`kvc_core::LowerTiers`): a tier hit becomes a
//! [`LoadJob`] in the plan's `loads`, the sequence waits out of the batch until the engine
//! reports it with [`Scheduler::complete_load`], and evicted (or newly cached) blocks become
//! the plan's `offloads`.
//!
//! Preemption recomputes by default (after offering the computed blocks, so the request reuses
//! them when it comes back); with `host_blocks` configured it swaps the KV out to a
//! host pool and the plan carries the swap-out and swap-in lists. A session's request that
//! has outgrown the model is refused, or truncated when `session_truncation` is set (keep the
//! system prefix and the latest tokens).
//!
//! What to depend on: `kvc-sched` and a block allocator, normally `kvc-alloc`'s `BlockPool`
//! (the scheduler takes any [`BlockAllocator`]); a pin policy ([`DynamicOnly`] here, or `kvc-pin`'s `PinningPolicy`)
//! and a reuse index ([`NoReuse`], or `kvc-reuse`'s prefix cache). The `kvc-core` types the
//! scheduler's API takes and returns (ids, QoS classes, [`NoReuse`], the paged layout and the
//! page tables a plan builds, the traits) are re-exported here.
//!
//! ```
//! use kvc_alloc::{BlockPool, PoolConfig};
//! use kvc_sched::{DynamicOnly, NoReuse, QosClass, Request, Scheduler, SchedulerConfig, SeqId};
//! use kvc_sched::TenantId;
//!
//! let pool = BlockPool::new(PoolConfig::new(64))?;
//! let cfg = SchedulerConfig { block_size: 16, ..SchedulerConfig::default() };
//! let mut sched = Scheduler::new(cfg, pool, DynamicOnly::default(), NoReuse { block_size: 16 })?;
//! sched.submit(Request {
//!     id: SeqId(1),
//!     tenant: TenantId(0),
//!     qos: QosClass::STANDARD,
//!     session: None,
//!     prompt: vec![7; 40],
//!     max_new_tokens: 2,
//!     arrival_ms: 0,
//! })?;
//!
//! let plan = sched.step(0); // prefill of 40 tokens over 3 blocks
//! assert_eq!(plan.num_tokens(), 40);
//! assert_eq!(plan.kv_indptr, [0, 3]);
//! assert!(plan.seqs[0].samples);
//! assert!(sched.complete_step(&[(SeqId(1), 11)])?.is_empty());
//!
//! let plan = sched.step(1); // one decode token
//! assert_eq!(plan.seqs[0].positions, 40..41);
//! let done = sched.complete_step(&[(SeqId(1), 12)])?;
//! assert_eq!(done[0].output, [11, 12]);
//! assert!(sched.is_idle());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `examples/batch.rs` (`cargo run -p kvc-sched --example batch`) drives a handful of
//! requests to completion through chunked prefill, an end-of-sequence token and the typed
//! errors of bad input; `examples/serve_loop.rs` adds pinning and a prefix cache.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod compute;
mod manager;
mod plan;
mod policy;
mod queue;
mod request;
mod scheduler;
mod tier;

pub use kvc_core::{
    Adopted, BlockAllocator, BlockCopy, BlockId, HostBlockId, KvLayout, LowerTiers, NoReuse, Offer,
    OfferRole, PageTable, PageTableError, PagedLayout, PagedLayoutError, PinPolicy, QosClass,
    QosClasses, RegionId, Retention, ReuseError, ReuseIndex, ReuseScope, SeqId, SessionId,
    SlotMapping, SlotMappingError, StoreKey, TenantId,
};

pub use compute::{
    AdaptiveShare, ClassDemand, ClassShare, ComputeConfigError, ComputeReserve,
    ComputeReserveConfig, ComputeStats, StepGate,
};
pub use manager::{
    KvConfigError, KvError, KvManager, KvManagerConfig, KvStats, KvUsage, Pressure, RegionUsage,
    SeqOwner, SlotGrant, SlotRequest,
};
pub use plan::{FinishReason, Finished, Rejection, ScheduledSeq, StepPlan, SwapPair};
pub use policy::DynamicOnly;
pub use queue::{Command, QueueClosed, SubmitQueue, Submitter};
pub use request::{Request, SubmitError};
pub use scheduler::{
    CancelError, CompleteError, ConfigError, SchedStats, Scheduler, SchedulerConfig,
    SessionContext, SessionTruncation,
};
pub use tier::{
    BlockLoad, BlockOffload, LoadDone, LoadError, LoadId, LoadJob, LoadResult, PrefixLoad, TierMode,
};
