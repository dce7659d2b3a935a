//! The event stream over a real Redis server: publish, subscribe, gaps resynchronised from a
//! snapshot, replays and malformed frames, publisher restarts and silent engines.
//!
//! The server's address comes from `KVC_REDIS_URL` (`cargo xtask test` starts one). Without
//! it the tests are skipped with one line, except under `CI=true`, where they fail.
#![allow(clippy::print_stderr)]

use std::sync::atomic::{AtomicU32, Ordering};

use kvc_route::{
    ChainHash, EngineId, EventBody, KvIndex, LoadReport, OverlapScratch, Publisher,
    PublisherConfig, Removed, Scope, Stored, Subscriber, SubscriberConfig, Tier,
};

fn redis_url() -> Option<String> {
    match std::env::var("KVC_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("KVC_REDIS_URL is not set: the Redis tests need a server under CI")
        }
        _ => {
            eprintln!("skipped: KVC_REDIS_URL is not set (no Redis server to test against)");
            None
        }
    }
}

/// A key prefix of its own per test, so tests share one server.
fn prefix(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "kvc-test-{}-{}-{test}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn stored(tier: Tier, range: std::ops::Range<u128>) -> EventBody {
    let hashes: Vec<ChainHash> = range.map(ChainHash).collect();
    EventBody::Stored(Stored {
        tier,
        scope: Scope::default(),
        parent: None,
        block_size: 16,
        token_count: 16 * hashes.len() as u32,
        hashes,
    })
}

fn publisher(url: &str, prefix: &str, engine: u32, max_len: u64, every: u64) -> Publisher {
    let mut cfg = PublisherConfig::new(16);
    cfg.prefix = prefix.into();
    cfg.max_len = max_len;
    cfg.snapshot_every = every;
    Publisher::connect(url, EngineId(engine), cfg).expect("publisher connects")
}

fn subscriber(url: &str, prefix: &str) -> Subscriber {
    let mut cfg = SubscriberConfig::new();
    cfg.prefix = prefix.into();
    cfg.count = 50;
    Subscriber::connect(url, cfg).expect("subscriber connects")
}

fn poll_until_quiet(sub: &mut Subscriber, index: &mut KvIndex, now_ms: u64) {
    for _ in 0..100 {
        let r = sub.poll(index, now_ms).expect("poll");
        if r.frames == 0 && r.awaiting_snapshot == 0 {
            return;
        }
    }
    panic!("the subscriber did not catch up in 100 polls");
}

fn device_prefix(index: &KvIndex, engine: u32, request: std::ops::Range<u128>) -> u32 {
    let hashes: Vec<ChainHash> = request.map(ChainHash).collect();
    let mut out = Vec::new();
    index.overlaps(
        Scope::default(),
        &hashes,
        &mut OverlapScratch::default(),
        &mut out,
    );
    out.iter()
        .find(|(e, _)| *e == EngineId(engine))
        .map_or(0, |(_, o)| o.device)
}

#[test]
fn events_reach_the_index_in_order() {
    let Some(url) = redis_url() else { return };
    let p = prefix("order");
    let mut pubs: Vec<Publisher> = (0..3).map(|e| publisher(&url, &p, e, 1_000, 100)).collect();
    for (e, publ) in pubs.iter_mut().enumerate() {
        publ.publish(stored(Tier::Device, 0..(4 + e as u128)), 1)
            .unwrap();
        publ.publish(stored(Tier::Host, 100..110), 1).unwrap();
        publ.publish(
            EventBody::Load(LoadReport {
                queued: e as u32,
                running: 1,
                kv_used_blocks: 10,
                kv_total_blocks: 100,
            }),
            1,
        )
        .unwrap();
    }
    pubs[2]
        .publish(
            EventBody::Removed(Removed {
                tier: Tier::Device,
                scope: Scope::default(),
                hashes: vec![ChainHash(3)],
            }),
            2,
        )
        .unwrap();
    let mut index = KvIndex::new(16);
    let mut sub = subscriber(&url, &p);
    poll_until_quiet(&mut sub, &mut index, 10);
    assert_eq!(index.engines().count(), 3);
    assert_eq!(device_prefix(&index, 0, 0..10), 4);
    assert_eq!(device_prefix(&index, 1, 0..10), 5);
    assert_eq!(device_prefix(&index, 2, 0..10), 3, "block 3 was removed");
    let info = index.engine(EngineId(1)).unwrap();
    assert_eq!(info.blocks, [5, 10, 0]);
    assert_eq!(info.load.queued, 1);
    let s = sub.stats();
    assert_eq!((s.applied, s.gaps, s.malformed), (3 * 4 + 1, 0, 0));
}

#[test]
fn a_gap_is_resynchronised_from_the_snapshot() {
    let Some(url) = redis_url() else { return };
    let p = prefix("gap");
    // A short stream: early entries are trimmed before the subscriber first reads.
    let mut publ = publisher(&url, &p, 7, 20, 10);
    for i in 0..600u128 {
        publ.publish(stored(Tier::Device, i..i + 1), 1).unwrap();
        if i % 3 == 0 {
            publ.publish(
                EventBody::Removed(Removed {
                    tier: Tier::Device,
                    scope: Scope::default(),
                    hashes: vec![ChainHash(i)],
                }),
                1,
            )
            .unwrap();
        }
    }
    let mut index = KvIndex::new(16);
    let mut sub = subscriber(&url, &p);
    poll_until_quiet(&mut sub, &mut index, 10);
    let s = sub.stats();
    assert!(s.gaps >= 1, "the trimmed stream shows a gap: {s:?}");
    assert!(s.resyncs >= 1, "{s:?}");
    let expected = publ.snapshot(0);
    let held: usize = expected.groups.iter().map(|g| g.hashes.len()).sum();
    assert_eq!(held, 400);
    assert_eq!(index.engine(EngineId(7)).unwrap().blocks, [400, 0, 0]);
    assert_eq!(index.len(), 400);
    // Later events apply on top of the snapshot.
    publ.publish(EventBody::Cleared { tier: None }, 2).unwrap();
    poll_until_quiet(&mut sub, &mut index, 20);
    assert!(index.is_empty());
}

#[test]
fn replays_and_malformed_frames_change_nothing() {
    let Some(url) = redis_url() else { return };
    let p = prefix("malformed");
    let mut publ = publisher(&url, &p, 1, 1_000, 100);
    publ.publish(stored(Tier::Device, 0..8), 1).unwrap();
    let frame = kvc_route::encode_event(&kvc_route::Event {
        engine: EngineId(1),
        seq: publ.seq(),
        time_ms: 1,
        body: stored(Tier::Device, 50..60),
    });
    publ.publish_raw(&frame).unwrap(); // a replay of sequence 2 with other content
    publ.publish_raw(&frame[..frame.len() - 3]).unwrap(); // truncated
    publ.publish_raw(b"not an event").unwrap();
    let mut flipped = frame.clone();
    flipped[40] ^= 1;
    publ.publish_raw(&flipped).unwrap();
    publ.publish(stored(Tier::Host, 8..12), 2).unwrap();
    let mut index = KvIndex::new(16);
    let mut sub = subscriber(&url, &p);
    poll_until_quiet(&mut sub, &mut index, 10);
    let s = sub.stats();
    assert_eq!(s.malformed, 3);
    assert_eq!(s.duplicates, 1);
    assert_eq!(s.gaps, 0);
    assert_eq!(index.engine(EngineId(1)).unwrap().blocks, [8, 4, 0]);
    assert_eq!(device_prefix(&index, 1, 50..60), 0);
}

#[test]
fn an_event_subscribers_would_drop_is_refused_at_publish_and_leaves_no_gap() {
    let Some(url) = redis_url() else { return };
    let p = prefix("bad-event");
    let mut publ = publisher(&url, &p, 1, 1_000, 100);
    let first = publ.publish(stored(Tier::Device, 0..4), 1).unwrap();
    let mut other_size = stored(Tier::Device, 4..5);
    if let EventBody::Stored(s) = &mut other_size {
        s.block_size = 32;
        s.token_count = 32;
    }
    assert!(matches!(
        publ.publish(other_size, 2),
        Err(kvc_route::StreamError::BadEvent { .. })
    ));
    let mut bad_count = stored(Tier::Device, 4..5);
    if let EventBody::Stored(s) = &mut bad_count {
        s.token_count = 9_999;
    }
    assert!(matches!(
        publ.publish(bad_count, 2),
        Err(kvc_route::StreamError::BadEvent { .. })
    ));
    assert_eq!(publ.seq(), first);
    publ.publish(stored(Tier::Host, 4..8), 3).unwrap();
    let mut index = KvIndex::new(16);
    let mut sub = subscriber(&url, &p);
    poll_until_quiet(&mut sub, &mut index, 10);
    let s = sub.stats();
    assert_eq!((s.malformed, s.refused, s.gaps), (0, 0, 0));
    assert_eq!(index.engine(EngineId(1)).unwrap().blocks, [4, 4, 0]);
}

#[test]
fn a_publish_that_timed_out_is_never_lost_to_a_router() {
    let Some(url) = redis_url() else { return };
    let p = prefix("timeout");
    let mut cfg = PublisherConfig::new(16);
    cfg.prefix = p.clone();
    cfg.timeout = std::time::Duration::from_millis(100);
    let mut publ = Publisher::connect(&url, EngineId(1), cfg).expect("publisher connects");
    let first = publ.publish(stored(Tier::Device, 0..4), 1).unwrap();
    // The server holds writes back: the next publish times out, and the server carries it
    // out once writes resume. Its outcome is unknown to the engine.
    let mut admin = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection())
        .expect("admin connection");
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(10_000)
        .arg("WRITE")
        .query(&mut admin)
        .expect("pause");
    let timed_out = publ.publish(stored(Tier::Device, 4..6), 2);
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query(&mut admin)
        .expect("unpause");
    assert!(timed_out.is_err(), "{timed_out:?}");
    assert_eq!(
        publ.seq(),
        first + 1,
        "the number is used: the event may be out"
    );
    // The next event must reach every router, whether or not the one before did.
    publ.publish(stored(Tier::Host, 10..12), 3).unwrap();
    let mut index = KvIndex::new(16);
    let mut sub = subscriber(&url, &p);
    poll_until_quiet(&mut sub, &mut index, 10);
    assert_eq!(index.engine(EngineId(1)).unwrap().blocks, [6, 2, 0]);
    assert_eq!(sub.stats().duplicates, 0, "{:?}", sub.stats());
}

/// A redis-server of this test's own on a free loopback port, to kill and restart; `None`
/// when there is none on PATH (skipped, or a failure under `CI=true`).
struct OwnServer {
    port: u16,
    child: Option<std::process::Child>,
}

impl OwnServer {
    fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let mut s = Self { port, child: None };
        if s.restart() {
            Some(s)
        } else {
            assert!(
                !std::env::var("CI").is_ok_and(|v| v == "true"),
                "no redis-server on PATH under CI"
            );
            eprintln!("skipped: no redis-server on PATH");
            None
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts the server (empty: no persistence) and waits until it accepts connections.
    fn restart(&mut self) -> bool {
        let Ok(child) = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        else {
            return false;
        };
        self.child = Some(child);
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn publisher_and_subscriber_carry_on_across_a_server_restart() {
    let Some(mut server) = OwnServer::start() else {
        return;
    };
    let url = server.url();
    let p = prefix("server-restart");
    // Every publish tries to connect again (the wait between attempts has its own test).
    let mut cfg = PublisherConfig::new(16);
    cfg.prefix = p.clone();
    cfg.retry_after = std::time::Duration::ZERO;
    let mut publ = Publisher::connect(&url, EngineId(1), cfg).expect("publisher connects");
    publ.publish(stored(Tier::Device, 0..4), 1).unwrap();
    let mut index = KvIndex::new(16);
    let mut sub = subscriber(&url, &p);
    poll_until_quiet(&mut sub, &mut index, 10);
    assert_eq!(index.engine(EngineId(1)).unwrap().blocks, [4, 0, 0]);

    // The server dies: the next publish fails (maybe out, maybe not), and so does a poll.
    server.kill();
    assert!(publ.publish(stored(Tier::Device, 4..6), 2).is_err());
    assert!(sub.poll(&mut index, 20).is_err());
    // While it is away, events still count: the engine does hold these blocks.
    assert!(publ.publish(stored(Tier::Device, 6..8), 2).is_err());
    // It comes back empty. The same publisher and subscriber carry on: the engine's holdings,
    // the event whose publish failed included, reach the router through the snapshot.
    assert!(server.restart(), "redis-server restarts");
    publ.publish(stored(Tier::Host, 10..12), 3).unwrap();
    poll_until_quiet(&mut sub, &mut index, 30);
    assert_eq!(index.engine(EngineId(1)).unwrap().blocks, [8, 2, 0]);
    assert_eq!(device_prefix(&index, 1, 0..10), 8);
}

#[test]
fn a_restarted_engine_continues_its_sequence_and_a_silent_one_is_dropped() {
    let Some(url) = redis_url() else { return };
    let p = prefix("restart");
    let mut a = publisher(&url, &p, 1, 1_000, 100);
    a.publish(stored(Tier::Device, 0..8), 1).unwrap();
    let mut b = publisher(&url, &p, 2, 1_000, 100);
    b.publish(stored(Tier::Device, 0..4), 1).unwrap();
    let mut index = KvIndex::new(16);
    let mut sub = subscriber(&url, &p);
    poll_until_quiet(&mut sub, &mut index, 1_000);
    assert_eq!(device_prefix(&index, 1, 0..8), 8);
    let before = a.seq();
    drop(a);
    let mut a = publisher(&url, &p, 1, 1_000, 100);
    assert!(a.seq() > before, "the sequence goes on after a restart");
    a.publish(stored(Tier::Device, 0..2), 2).unwrap();
    poll_until_quiet(&mut sub, &mut index, 2_000);
    assert_eq!(
        device_prefix(&index, 1, 0..8),
        2,
        "the restart cleared the old blocks"
    );
    // Engine 2 says nothing more; engine 1 keeps reporting load.
    a.publish(EventBody::Load(LoadReport::default()), 3)
        .unwrap();
    poll_until_quiet(&mut sub, &mut index, 11_500);
    assert!(
        index.engine(EngineId(2)).is_none(),
        "the silent engine is dropped"
    );
    assert!(index.engine(EngineId(1)).is_some());
    assert_eq!(device_prefix(&index, 2, 0..4), 0);
}

/// Something on a port that accepts connections and never answers (a server that stopped
/// answering, or a network that drops its packets), counting the connections.
struct BlackHole {
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BlackHole {
    fn bind(port: u16) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        let listener = (0..100)
            .find_map(|_| {
                let l = std::net::TcpListener::bind(("127.0.0.1", port));
                if l.is_err() {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                l.ok()
            })
            .expect("the port is free again");
        listener.set_nonblocking(true).expect("non-blocking");
        let (accepted, stop) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (a, st) = (Arc::clone(&accepted), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        a.fetch_add(1, Ordering::Relaxed);
                        held.push(stream);
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        });
        Self {
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_server_that_stops_answering_costs_one_timeout_per_retry_after() {
    let Some(mut server) = OwnServer::start() else {
        return;
    };
    let url = server.url();
    let p = prefix("black-hole");
    let mut cfg = PublisherConfig::new(16);
    cfg.prefix = p.clone();
    cfg.timeout = std::time::Duration::from_millis(200);
    cfg.retry_after = std::time::Duration::from_secs(2);
    let mut publ = Publisher::connect(&url, EngineId(1), cfg).expect("publisher connects");
    publ.publish(stored(Tier::Device, 0..4), 1).unwrap();
    // The server goes; something on its port accepts connections and never answers.
    server.kill();
    let hole = BlackHole::bind(server.port);
    // The first publish finds the connection dead, the second connects and times out.
    assert!(publ.publish(stored(Tier::Device, 4..6), 2).is_err());
    assert!(publ.publish(stored(Tier::Device, 6..8), 3).is_err());
    let failed_at = std::time::Instant::now();
    // Until `retry_after` has passed, publishes fail at once without trying; their events
    // still count as published.
    for i in 0..5u128 {
        let r = publ.publish(stored(Tier::Device, 8 + i..9 + i), 4);
        assert!(
            matches!(r, Err(kvc_route::StreamError::Unreachable { .. })),
            "{r:?}"
        );
    }
    assert_eq!(
        hole.accepted(),
        1,
        "one attempt to connect while the wait lasts"
    );
    drop(hole);
    // The server is back; once the wait is over the publisher connects again, and every
    // event counted while it was away reaches routers through the snapshot.
    assert!(server.restart(), "redis-server restarts");
    let wait = std::time::Duration::from_millis(2_100).saturating_sub(failed_at.elapsed());
    std::thread::sleep(wait);
    publ.publish(stored(Tier::Host, 20..22), 5).unwrap();
    let mut index = KvIndex::new(16);
    let mut sub = subscriber(&url, &p);
    poll_until_quiet(&mut sub, &mut index, 30);
    assert_eq!(index.engine(EngineId(1)).unwrap().blocks, [13, 2, 0]);
}
