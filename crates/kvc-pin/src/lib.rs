//! Pinning for KV caches: QoS reservation of a pinned region of KV memory for high-priority
//! traffic, adaptive sizing of that region from observed demand, graceful degradation when it
//! overflows, soft prefix pins (retention priority with a TTL, under a budget) and tenant quotas.
//!
//! Not built yet: this crate holds only its description until the pinning work lands.
#![warn(missing_docs)]
