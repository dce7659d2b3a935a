//! KV-aware routing across many engines.
//!
//! When one engine is not enough, requests must go where their prefix is already cached. Each
//! engine publishes what its KV cache holds as a stream of [`Event`]s (blocks stored, removed,
//! a tier cleared, load reports); routers subscribe, build a [`KvIndex`] of which engine holds
//! which block in which [`Tier`], and a [`Router`] scores every engine for a request by the
//! prefix it can serve, its queue and its KV load.
//!
//! - [`event`]: the events and their versioned binary encoding;
//! - [`ingest`]: in-order application with gap detection, snapshot resync, idempotent replays
//!   and malformed-frame accounting, independent of the transport;
//! - [`stream`]: the transport over Redis Streams ([`Publisher`], [`Subscriber`]);
//! - [`index`] and [`router`]: the index and the router.
//!
//! The router works on chained block hashes: the caller hashes a request's tokens the way its
//! engines do (kvc-reuse's `BlockHasher` with the same `HashExtra` and block size).
//!
//! ```
//! use kvc_route::{
//!     ChainHash, EngineId, Event, EventBody, KvIndex, RouteConfig, RouteRequest, Router,
//!     Scope, Stored, Tier,
//! };
//!
//! let mut index = KvIndex::new(16);
//! for (engine, blocks) in [(0u32, 2u128), (1, 5)] {
//!     let stored = Stored {
//!         tier: Tier::Device,
//!         scope: Scope::default(),
//!         parent: None,
//!         block_size: 16,
//!         token_count: 16 * blocks as u32,
//!         hashes: (1..=blocks).map(ChainHash).collect(),
//!     };
//!     let event = Event { engine: EngineId(engine), seq: 1, time_ms: 0, body: EventBody::Stored(stored) };
//!     index.apply(&event, 0)?;
//! }
//! let mut router = Router::new(index, RouteConfig::default())?;
//! let prompt: Vec<ChainHash> = (1..=6).map(ChainHash).collect();
//! let decision = router.route(&RouteRequest { scope: Scope::default(), hashes: &prompt })?;
//! assert_eq!(decision.chosen.engine, EngineId(1));
//! assert_eq!(decision.chosen.overlap.device, 5);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `examples/two_engines.rs` (`cargo run -p kvc-route --example two_engines`) is a whole
//! program without a Redis server: two engines' event frames through [`Ingest`], a replay, a
//! lost event repaired from a snapshot, a corrupt frame, and routing.
#![warn(missing_docs)]

pub mod event;
pub mod index;
pub mod ingest;
pub mod router;
pub mod stream;

pub use event::{
    AdapterId, ChainHash, DecodeError, EngineId, Event, EventBody, LoadReport, Removed, SaltId,
    Scope, Snapshot, SnapshotGroup, Stored, Tier, WIRE_VERSION, decode_event, decode_snapshot,
    encode_event, encode_snapshot,
};
pub use index::{ApplyError, EngineInfo, KvIndex, OverlapScratch, TierOverlap};
pub use ingest::{Ingest, IngestStats, Offer};
pub use router::{EngineScore, RouteConfig, RouteDecision, RouteError, RouteRequest, Router};
pub use stream::{
    PollReport, Publisher, PublisherConfig, StreamError, Subscriber, SubscriberConfig,
};
