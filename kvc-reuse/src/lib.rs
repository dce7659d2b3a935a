//! Reuse for KV caches: a prefix cache keyed by chained block hashes, multi-turn session
//! contexts, pluggable eviction policies, invalidation, tenant isolation, and KV events.
//!
//! - [`hash`]: stable chained block hashes `h_i = H(h_{i-1}, tokens_i)` rooted in a
//!   [`HashExtra`] (model and version, adapter, tenant salt); [`Blake3Hasher`] and
//!   [`Blake3KeyedHasher`] (collision resistant, safe across tenants that do not trust each
//!   other; the keyed one is about twice as fast) and [`Xxh3Hasher`] (fastest, one tenant).
//! - [`PrefixCache`]: longest cached prefix lookup, insert, reference tracking, lazy
//!   leaf-first eviction through an [`EvictionPolicy`] ([`Lru`], [`S3Fifo`], ...), retention
//!   priorities with expiry, invalidation, [`KvEvent`]s and [`Metrics`].
//! - [`SessionCache`]: multi-turn contexts bound to a session id, with truncation and idle
//!   expiry.
//!
//! The cache never frees memory: it holds [`kvc_core::BlockId`]s and hands them back from
//! [`PrefixCache::evict`] for the caller's allocator to release.
//!
//! ```
//! use kvc_core::BlockId;
//! use kvc_reuse::{Blake3Hasher, BlockHasher, HashExtra, PolicyKind, PrefixCache};
//!
//! let hasher = Blake3Hasher;
//! let tenant_a = hasher.root(&HashExtra::new("llama-3", 1).with_salt(*b"a"));
//! let tenant_b = hasher.root(&HashExtra::new("llama-3", 1).with_salt(*b"b"));
//! let prompt: Vec<u32> = (0..33).collect();
//! let (mut ha, mut hb) = (Vec::new(), Vec::new());
//! hasher.hash_blocks(tenant_a, &prompt, 16, &mut ha);
//! hasher.hash_blocks(tenant_b, &prompt, 16, &mut hb);
//!
//! let mut cache = PrefixCache::new(16, PolicyKind::Lru);
//! let mut newly = Vec::new();
//! cache.insert(&ha, &[BlockId(0), BlockId(1)], 0, &mut newly)?;
//! let hit = cache.lookup(&ha, prompt.len(), 1);
//! assert_eq!(hit.tokens, 32);
//! cache.release(&hit.blocks)?;
//! let other = cache.lookup(&hb, prompt.len(), 2); // another tenant's salt: no hit
//! assert_eq!(other.tokens, 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod adaptive;
mod cache;
mod events;
pub mod hash;
mod index;
pub mod policy;
mod session;

pub use adaptive::Adaptive;
pub use cache::{InsertError, PrefixCache, ReleaseError};
pub use events::{EventRecord, KvEvent, Metrics};
pub use hash::{
    Blake3Hasher, Blake3KeyedHasher, BlockHash, BlockHasher, HashExtra, HasherKind, Xxh3Hasher,
};
pub use index::ScopedIndex;
pub use policy::{Access, BlockInfo, Conversation, EvictionPolicy, Lru, PolicyKind, S3Fifo};
pub use session::{SessionCache, SessionConfig, SessionError, Truncation, Turn};
