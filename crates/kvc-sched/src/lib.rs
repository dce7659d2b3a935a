//! Scheduling over paged KV: continuous batching with QoS admission, prefix reuse, paged
//! allocation, preemption and eviction, composed through the `kvc-core` traits. Its output is a
//! plain-data step plan that an engine executes.
//!
//! Not built yet: this crate holds only its description until the scheduling work lands.
#![warn(missing_docs)]
