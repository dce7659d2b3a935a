//! The kvc workbench: workload generators and trace replay, a serving simulator with a cost
//! model, a real CPU engine, and the benchmark report that `cargo xtask bench` writes.
//!
//! - [`sim`]: the serving simulator and its scenarios (`kvc-bench scenario NAME`);
//! - [`engine`]: a small llama-style model served through the whole kvc stack on the CPU
//!   kernels (`kvc-bench engine`);
//! - [`replay`] and [`trace`]: Mooncake-format trace replay through the prefix cache
//!   (`kvc-bench replay`), and [`block_replay`], the engine-like replay of an engine's whole
//!   block management (`kvc-bench replay --engine-like`);
//! - [`kernel_kit`]: ready-made decode batches and a read-bandwidth probe for measuring the
//!   `kvc-kernels` CPU decode against the machine;
//! - [`tiers`]: the trace replayed through the memory manager (`kvc-sched`'s `KvManager`, an
//!   LRU device prefix cache) with the host, disk and shared tiers of `kvc-tier` below it
//!   (`kvc-bench scenario tiers`);
//! - [`report`]: the report of `cargo xtask bench` (`kvc-bench report`);
//! - [`metrics_export`]: the Prometheus endpoint of `kvc-bench engine --metrics-addr`;
//! - [`cluster`]: N simulated engines behind the KV-aware router (`kvc-bench scenario
//!   cluster`);
//! - [`analyze`]: the workload analyzer (`kvc-bench analyze`);
//! - [`profiles`] and [`size`]: GPU and model profiles and the capacity calculator
//!   (`kvc-bench size`);
//! - [`workload`]: seeded generators of workload shapes the shipped trace lacks, and a fast
//!   block-level hit-rate replay to compare eviction policies on them.
//!
//! - [`units`]: human sizes on the command line (`32k`, `3M`, `80GiB`).
//!
//! ```
//! use kvc_bench::size::{SizeQuery, size};
//!
//! // How many 1,024-token sequences of Llama-2-13B fit on an A100-80GB?
//! let r = size(&SizeQuery::new("Llama-2-13B", "A100-80GB"))?;
//! assert_eq!(r.kv_bytes_per_token, 800 * 1024); // 1K tokens ≈ 0.8 GB
//! assert!(r.sequences > 50);
//! # Ok::<(), kvc_bench::size::SizeError>(())
//! ```
#![warn(missing_docs)]
// Only measurement code needs `unsafe`: `kernel_kit`'s 2 MiB-aligned buffers and the replay's
// thread CPU clock; everything else is safe.
#![deny(unsafe_code)]

pub mod analyze;
pub mod block_replay;
pub mod cluster;
pub mod engine;
#[allow(unsafe_code)]
pub mod kernel_kit;
pub mod metrics_export;
pub mod profiles;
pub mod replay;
pub mod report;
pub mod sim;
pub mod size;
pub mod tiers;
pub mod trace;
pub mod units;
pub mod workload;

/// The guides' code blocks, compiled and run as doctests (`cargo test -p kvc-bench --doc`), so
/// the docs cannot drift from the API: a Rust block that no longer compiles fails the tests.
#[cfg(doctest)]
mod guides {
    #[doc = include_str!("../../README.md")]
    struct Readme;
    #[doc = include_str!("../../docs/getting-started.md")]
    struct GettingStarted;
    #[doc = include_str!("../../docs/architecture.md")]
    struct Architecture;
    #[doc = include_str!("../../docs/benchmarks.md")]
    struct Benchmarks;
    #[doc = include_str!("../../docs/choosing-a-block-size.md")]
    struct ChoosingABlockSize;
    #[doc = include_str!("../../docs/kernels.md")]
    struct Kernels;
    #[doc = include_str!("../../docs/pinning.md")]
    struct Pinning;
    #[doc = include_str!("../../docs/reading-the-report.md")]
    struct ReadingTheReport;
    #[doc = include_str!("../../docs/reuse.md")]
    struct Reuse;
    #[doc = include_str!("../../docs/tiers.md")]
    struct Tiers;
    #[doc = include_str!("../../docs/cluster.md")]
    struct Cluster;
}
