//! Reuse for KV caches: a prefix cache keyed by chained block hashes, multi-turn session
//! contexts, pluggable eviction policies, invalidation, tenant isolation, and KV events.
//!
//! - [`hash`]: stable chained block hashes `h_i = H(h_{i-1}, tokens_i)` rooted in a
//!   [`HashExtra`] (model and version, adapter, tenant salt); [`Blake3Hasher`] and
//!   [`Blake3KeyedHasher`] and [`Sha256Hasher`] (collision resistant, safe across tenants that
//!   do not trust each other; the keyed one is about twice as fast as plain BLAKE3, and SHA-256
//!   with the CPU's SHA extensions faster still) and [`Xxh3Hasher`] (fastest, one tenant).
//! - [`PrefixCache`]: longest cached prefix lookup, insert, reference tracking, lazy
//!   leaf-first eviction through an [`EvictionPolicy`] ([`Lru`], [`S3Fifo`], ...), retention
//!   priorities with expiry, conversation ends ([`PrefixCache::end_conversation`]: an
//!   application's word that a chat is over demotes its own blocks), invalidation,
//!   [`KvEvent`]s and [`Metrics`] ([`RecentHitRate`]: the hit rate over the last requests).
//! - [`RadixCache`]: the same lookups and leaf-first LRU eviction over runs of blocks instead
//!   of single blocks (a radix tree of block hashes): several times less work per block, for
//!   engines that want plain LRU and none of the rest.
//! - [`SessionCache`]: multi-turn contexts bound to a session id, with truncation and idle
//!   expiry.
//!
//! The cache never frees memory: it holds [`BlockId`]s and hands them back from
//! [`PrefixCache::evict`] for the caller's allocator to release. Ownership follows one rule
//! (see [`ReuseIndex`]): every holder of a block (a running request, the cache, a session)
//! holds one pool reference on it; the cache counts the holders of each cached block other
//! than itself, and evicts only blocks no one else holds, so every eviction frees a block.
//!
//! ```
//! use kvc_reuse::{Blake3Hasher, BlockHasher, BlockId, HashExtra, PolicyKind, PrefixCache};
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
//! // A request computed the prompt into blocks 0, 1, 2 and offers the two full ones.
//! cache.insert(&ha, &[BlockId(0), BlockId(1)], 0, &mut newly)?;
//! assert_eq!(newly, [BlockId(0), BlockId(1)]); // take a pool reference on each for the cache
//! cache.release(&[BlockId(0), BlockId(1), BlockId(2)])?; // the request is done (2 is private)
//! assert_eq!(cache.evictable_blocks(), 2);
//!
//! let hit = cache.lookup(&ha, prompt.len(), 1);
//! assert_eq!(hit.tokens, 32);
//! assert_eq!(cache.evictable_blocks(), 0); // in use again
//! cache.release(&hit.blocks)?;
//! let other = cache.lookup(&hb, prompt.len(), 2); // another tenant's salt: no hit
//! assert_eq!(other.tokens, 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]
// One reviewed exception: the prefetch hint in `prefetch.rs` (see its docs).
#![deny(unsafe_code)]

mod adaptive;
mod cache;
mod continuation;
mod events;
mod fifo_map;
pub mod hash;
mod index;
mod lru;
mod odds;
pub mod policy;
mod prefetch;
mod radix;
mod recency;
mod recent;
mod session;
mod table;
#[cfg(test)]
mod test_replay;

pub use adaptive::Adaptive;
pub use cache::{ConversationEnd, EndError, PrefixCache};
pub use events::{EventRecord, KvEvent, Metrics};
pub use hash::{
    Blake3Hasher, Blake3KeyedHasher, BlockHash, BlockHasher, HashExtra, HasherKind, Sha256Hasher,
    Xxh3Hasher,
};
pub use index::ScopedIndex;
/// The `kvc-core` types this crate's API takes and returns, so users need not depend on
/// `kvc-core` directly.
pub use kvc_core::{
    Adopted, BlockId, NoReuse, Offer, OfferRole, PrefixHit, Retention, ReuseError, ReuseIndex,
    ReuseScope, SessionId, TenantId,
};
pub use odds::ReuseOdds;
pub use policy::{Access, BlockInfo, Conversation, EvictionPolicy, Lru, PolicyKind, S3Fifo};
pub use radix::{RadixCache, RadixError, RadixHold, RadixStats};
pub use recent::RecentHitRate;
pub use session::{
    SessionCache, SessionConfig, SessionConfigError, SessionError, Truncation, Turn,
};
