//! The kvc workbench: workload generators and trace replay, a serving simulator with a cost
//! model, a real CPU engine, and the benchmark report that `cargo xtask bench` writes.
//!
//! - [`sim`]: the serving simulator and its scenarios (`kvc-bench scenario NAME`);
//! - [`engine`]: a small llama-style model served through the whole kvc stack on the CPU
//!   kernels (`kvc-bench engine`);
//! - [`replay`] and [`trace`]: Mooncake-format trace replay through the prefix cache
//!   (`kvc-bench replay`), and [`block_replay`], the engine-like replay of an engine's whole
//!   block management (`kvc-bench replay --engine-like`);
//! - [`report`]: the report of `cargo xtask bench` (`kvc-bench report`);
//! - [`profiles`] and [`size`]: GPU and model profiles and the capacity calculator
//!   (`kvc-bench size`);
//! - [`workload`]: seeded generators of workload shapes the shipped trace lacks, and a fast
//!   block-level hit-rate replay to compare eviction policies on them.
//!
//! ```
//! use kvc_bench::size::{SizeQuery, size};
//!
//! let r = size(&SizeQuery {
//!     model: "Llama-2-13B".into(),
//!     gpu: "A100-80GB".into(),
//!     tokens: 1024,
//!     block_size: 16,
//!     utilisation: 0.9,
//! })?;
//! assert_eq!(r.layout.bytes_per_token(), 800 * 1024); // 1K tokens ≈ 0.8 GB
//! # Ok::<(), kvc_bench::size::SizeError>(())
//! ```
#![warn(missing_docs)]

pub mod block_replay;
pub mod engine;
pub mod profiles;
pub mod replay;
pub mod report;
pub mod sim;
pub mod size;
pub mod trace;
pub mod workload;
