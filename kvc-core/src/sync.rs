//! The synchronisation shim: std types normally, loom's under `--cfg kvc_loom`.
//!
//! Concurrent code in kvc imports `Arc`, `Mutex`, `RwLock` and atomics from here, so `cargo xtask loom`
//! can model-check it without a global `--cfg loom` that would change third-party crates.

#[cfg(not(kvc_loom))]
pub use std::sync::{Arc, Mutex, MutexGuard, RwLock, atomic};

#[cfg(kvc_loom)]
pub use loom::sync::{Arc, Mutex, MutexGuard, RwLock, atomic};
