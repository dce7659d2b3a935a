//! Reuse for KV caches: a prefix cache keyed by chained block hashes, multi-turn session
//! contexts, pluggable eviction policies (LRU, scan-resistant, retention-priority aware),
//! invalidation on model or document change, tenant isolation, and KV events.
//!
//! Not built yet: this crate holds only its description until the reuse work lands.
#![warn(missing_docs)]
