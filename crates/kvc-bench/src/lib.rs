//! The kvc workbench: workload generators and trace replay, a serving simulator with a cost
//! model, baselines and reports. `cargo xtask bench` drives it.
//!
//! Not built yet: today `cargo xtask bench` runs the per-crate criterion benches.
#![warn(missing_docs)]

pub mod engine;
pub mod profiles;
pub mod replay;
pub mod report;
pub mod sim;
pub mod size;
pub mod trace;
