//! Routing across two engines without a Redis server: the engines' events are encoded to
//! frames as a [`Publisher`](kvc_route::Publisher) would send them, and the router side feeds
//! them through [`Ingest`] (in order, duplicates skipped, gaps detected, bad frames dropped)
//! into the [`KvIndex`] its [`Router`] scores. Any transport (Redis Streams through
//! `Subscriber`, a message bus, a channel in one process) carries the same frames.
//!
//! ```sh
//! cargo run -p kvc-route --example two_engines
//! ```

#![allow(clippy::print_stdout)] // a program: it says what it did

use std::ops::RangeInclusive;

use kvc_route::{
    ApplyError, ChainHash, DecodeError, EngineId, Event, EventBody, Ingest, KvIndex, LoadReport,
    Offer, RouteConfig, RouteError, RouteRequest, Router, SaltId, Scope, Snapshot, SnapshotGroup,
    Stored, Tier, decode_snapshot, encode_event, encode_snapshot,
};

const BLOCK: u32 = 16;

/// One engine's event frame: `seq` counts from 1 per engine.
fn frame(engine: u32, seq: u64, body: EventBody) -> Vec<u8> {
    encode_event(&Event {
        engine: EngineId(engine),
        seq,
        time_ms: 0,
        body,
    })
}

/// Blocks stored in `tier`, named by their chained hashes (kvc-reuse's `BlockHasher` in an
/// engine; small integers here).
fn stored(tier: Tier, hashes: RangeInclusive<u128>) -> EventBody {
    let hashes: Vec<ChainHash> = hashes.map(ChainHash).collect();
    EventBody::Stored(Stored {
        tier,
        scope: Scope::default(),
        parent: None,
        block_size: BLOCK,
        token_count: BLOCK * hashes.len() as u32,
        hashes,
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut ingest = Ingest::new();
    let mut router = Router::new(KvIndex::new(BLOCK), RouteConfig::default())?;

    // Engine 0 holds blocks 1..=3 on its device; engine 1 holds 1..=2 on its device and
    // 3..=6 in host memory.
    for (engine, seq, body) in [
        (0, 1, stored(Tier::Device, 1..=3)),
        (1, 1, stored(Tier::Device, 1..=2)),
        (1, 2, stored(Tier::Host, 3..=6)),
    ] {
        let offer = ingest.offer(router.index_mut(), &frame(engine, seq, body), 0);
        assert_eq!(offer, Offer::Applied(EngineId(engine)));
    }
    // Engine 0 reports its load (also its heartbeat).
    let load = EventBody::Load(LoadReport {
        queued: 0,
        running: 1,
        kv_used_blocks: 10,
        kv_total_blocks: 100,
    });
    assert!(matches!(
        ingest.offer(router.index_mut(), &frame(0, 2, load), 0),
        Offer::Applied(_)
    ));

    // What a transport may do to frames: replay, lose, corrupt. None of it reaches the index.
    let replay = frame(1, 2, stored(Tier::Host, 3..=6));
    assert_eq!(
        ingest.offer(router.index_mut(), &replay, 0),
        Offer::Duplicate(EngineId(1))
    );
    let after_loss = frame(0, 5, stored(Tier::Host, 9..=9)); // events 3 and 4 were lost
    assert_eq!(
        ingest.offer(router.index_mut(), &after_loss, 0),
        Offer::Gap {
            engine: EngineId(0),
            expected: 3,
            got: 5
        }
    );
    let mut corrupt = frame(0, 3, stored(Tier::Device, 4..=4));
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    assert_eq!(
        ingest.offer(router.index_mut(), &corrupt, 0),
        Offer::Malformed(DecodeError::Checksum)
    );
    let other_block_size = encode_event(&Event {
        engine: EngineId(1),
        seq: 3,
        time_ms: 0,
        body: EventBody::Stored(Stored {
            tier: Tier::Device,
            scope: Scope::default(),
            parent: None,
            block_size: 2 * BLOCK,
            token_count: 2 * BLOCK,
            hashes: vec![ChainHash(77)],
        }),
    });
    assert!(matches!(
        ingest.offer(router.index_mut(), &other_block_size, 0),
        Offer::Refused(ApplyError::BlockSize { .. })
    ));

    // Route a 6-block prompt: engine 1 serves 2 blocks from device and 4 from host, engine 0
    // only 3 from device (and has a request running): engine 1 wins.
    let prompt: Vec<ChainHash> = (1..=6).map(ChainHash).collect();
    let request = RouteRequest {
        scope: Scope::default(),
        hashes: &prompt,
    };
    let decision = router.route(&request)?;
    assert_eq!(decision.chosen.engine, EngineId(1));
    assert_eq!(
        (decision.chosen.overlap.device, decision.chosen.overlap.host),
        (2, 4)
    );
    assert_eq!(router.scores().len(), 2);

    // The gap in engine 0's events is repaired from its snapshot (a Subscriber fetches it
    // from Redis): everything up to event 4, after which event 5 applies.
    let snapshot = encode_snapshot(&Snapshot {
        engine: EngineId(0),
        seq: 4,
        time_ms: 0,
        block_size: BLOCK,
        groups: vec![SnapshotGroup {
            tier: Tier::Device,
            scope: Scope::default(),
            hashes: prompt.clone(),
        }],
    });
    assert!(ingest.resync(router.index_mut(), &decode_snapshot(&snapshot)?, 0)?);
    assert_eq!(
        ingest.offer(router.index_mut(), &after_loss, 0),
        Offer::Applied(EngineId(0))
    );
    let decision = router.route(&request)?;
    assert_eq!(decision.chosen.engine, EngineId(0)); // now it holds all 6 on device
    assert_eq!(decision.chosen.overlap.device, 6);

    // Another tenant's salt matches none of these blocks: no overlap anywhere.
    let salted = RouteRequest {
        scope: Scope {
            salt: SaltId(5),
            ..Scope::default()
        },
        hashes: &prompt,
    };
    assert_eq!(router.route(&salted)?.chosen.overlap.device, 0);

    // Engines not heard from within the timeout are dropped; with none left, routing is an
    // error, not a panic.
    let mut dropped = Vec::new();
    router.index_mut().expire(60_000, 10_000, &mut dropped);
    assert_eq!(dropped.len(), 2);
    for engine in &dropped {
        ingest.forget(*engine);
    }
    assert!(matches!(router.route(&request), Err(RouteError::NoEngine)));
    // A weight that makes no sense is refused when the router is built.
    let bad = RouteConfig {
        queue_weight: -1.0,
        ..RouteConfig::default()
    };
    assert!(matches!(
        Router::new(KvIndex::new(BLOCK), bad),
        Err(RouteError::BadWeight { .. })
    ));

    let stats = ingest.stats();
    println!(
        "two engines: {} events applied, {} duplicate, {} gap, {} malformed, {} refused, {} resync",
        stats.applied, stats.duplicates, stats.gaps, stats.malformed, stats.refused, stats.resyncs
    );
    Ok(())
}
