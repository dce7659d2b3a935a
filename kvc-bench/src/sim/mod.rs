//! The serving simulator: a deterministic discrete-event simulation of an inference engine that
//! drives the real scheduler, allocator, pin policy and reuse index, with a cost model in place
//! of the GPU.

pub mod cost;
pub mod engine;
pub mod qos;
pub mod rng;
pub mod scenarios;
pub mod workload;
