//! The shared tier against a real Redis server (`KVC_REDIS_URL`, set by `cargo xtask test`),
//! and against servers these tests kill and restart themselves.

mod common;

use std::time::Duration;

use common::{BLOCK, OwnRedis, blocks, ns, redis_url};
use kvc_core::{BlockStore, StoreKey};
use kvc_tier::{SharedConfig, SharedTier};

/// A key prefix of its own per test and run, so tests sharing the server never meet.
fn config(url: &str, test: &str) -> SharedConfig {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let mut cfg = SharedConfig::new(url);
    cfg.prefix = format!("kvc-test-{test}-{}-{nanos:x}", std::process::id());
    cfg.ttl = Duration::from_secs(60);
    cfg.timeout = Duration::from_millis(500);
    cfg.retry_after = Duration::from_millis(100);
    cfg
}

fn raw(url: &str) -> redis::Connection {
    redis::Client::open(url)
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap()
}

fn get(tier: &SharedTier, keys: &[StoreKey]) -> (usize, Vec<bool>, Vec<u8>) {
    let mut dst = vec![0; keys.len() * BLOCK];
    let mut found = Vec::new();
    let n = tier.get(keys, &mut dst, &mut found).unwrap();
    (n, found, dst)
}

#[test]
fn blocks_round_trip_in_pipelined_batches_with_an_expiry() {
    let Some(url) = redis_url("blocks_round_trip_in_pipelined_batches_with_an_expiry") else {
        return;
    };
    let tier = SharedTier::new(ns("m"), config(&url, "roundtrip")).unwrap();
    let (keys, src) = blocks(1..=64);
    let out = tier.put(&keys, &src, 0).unwrap();
    assert_eq!((out.stored, out.present, out.unavailable), (64, 0, 0));
    assert_eq!(
        tier.put(&keys[..8], &src[..8 * BLOCK], 0).unwrap().present,
        8
    );
    let (n, _, dst) = get(&tier, &keys);
    assert_eq!(n, 64);
    assert_eq!(dst, src);
    let mut found = Vec::new();
    assert_eq!(tier.contains(&keys, &mut found).unwrap(), 64);
    // Soft retention: every value carries an expiry.
    let ttl: i64 = redis::cmd("PTTL")
        .arg(tier.server_key(keys[0]))
        .query(&mut raw(&url))
        .unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "{ttl}");
    assert_eq!(tier.remove(&keys[..4]).unwrap(), 4);
    assert_eq!(tier.contains_prefix(&keys).unwrap(), 0);
    assert_eq!(tier.stats().stored, 64);
}

#[test]
fn another_namespace_a_forged_value_and_a_half_written_value_are_misses() {
    let Some(url) =
        redis_url("another_namespace_a_forged_value_and_a_half_written_value_are_misses")
    else {
        return;
    };
    let cfg = config(&url, "namespace");
    let a = SharedTier::new(ns("model-a"), cfg.clone()).unwrap();
    let b = SharedTier::new(ns("model-b"), cfg).unwrap();
    let (keys, src) = blocks([7, 8]);
    let _ = a.put(&keys, &src, 0).unwrap();
    assert_eq!(get(&b, &keys).0, 0);
    // Copy a's value under b's key: b's header check refuses it.
    let mut con = raw(&url);
    let value: Vec<u8> = redis::cmd("GET")
        .arg(a.server_key(keys[0]))
        .query(&mut con)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(b.server_key(keys[0]))
        .arg(&value[..])
        .query(&mut con)
        .unwrap();
    // And a value cut short, as a writer dying mid-upload would leave with a non-atomic write.
    let _: () = redis::cmd("SET")
        .arg(b.server_key(keys[1]))
        .arg(&value[..value.len() / 2])
        .query(&mut con)
        .unwrap();
    let (n, found, _) = get(&b, &keys);
    assert_eq!((n, found), (0, vec![false, false]));
    assert_eq!(b.stats().corrupt_values, 2);
    assert_eq!(get(&a, &keys).0, 2);
}

#[test]
fn a_lease_held_by_another_engine_skips_the_upload() {
    let Some(url) = redis_url("a_lease_held_by_another_engine_skips_the_upload") else {
        return;
    };
    let cfg = config(&url, "lease");
    let tier = SharedTier::new(ns("m"), cfg.clone()).unwrap();
    let (keys, src) = blocks([1, 2]);
    // Another engine is uploading block 1.
    let lease = format!(
        "{}:lease:{:016x}:{}",
        cfg.prefix,
        ns("m").fingerprint(),
        keys[0]
    );
    let _: () = redis::cmd("SET")
        .arg(&lease)
        .arg("other")
        .arg("PX")
        .arg(10_000)
        .query(&mut raw(&url))
        .unwrap();
    let out = tier.put(&keys, &src, 0).unwrap();
    assert_eq!((out.stored, out.skipped), (1, 1));
    assert_eq!(tier.stats().leased_elsewhere, 1);
    let (_, found, _) = get(&tier, &keys);
    assert_eq!(found, [false, true]);
}

#[test]
fn a_killed_server_is_a_miss_and_the_tier_recovers_when_it_returns() {
    let test = "a_killed_server_is_a_miss_and_the_tier_recovers_when_it_returns";
    let Some(mut server) = OwnRedis::start(test) else {
        return;
    };
    let tier = SharedTier::new(ns("m"), config(&server.url(), "kill")).unwrap();
    let (keys, src) = blocks(1..=16);
    assert_eq!(tier.put(&keys, &src, 0).unwrap().stored, 16);
    assert_eq!(get(&tier, &keys).0, 16);

    server.kill();
    // Every call answers, as misses, without an error.
    for _ in 0..3 {
        let (n, found, _) = get(&tier, &keys);
        assert_eq!(n, 0);
        assert!(found.iter().all(|&f| !f));
        let mut f = Vec::new();
        assert_eq!(tier.contains(&keys, &mut f).unwrap(), 0);
        assert_eq!(tier.put(&keys, &src, 0).unwrap().unavailable, 16);
    }
    assert!(tier.stats().unavailable_calls >= 9);

    // Back (empty, as a restarted cache is): after the back-off the tier reconnects.
    server.restart().unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let out = tier.put(&keys, &src, 0).unwrap();
    assert_eq!(out.stored, 16);
    let (n, _, dst) = get(&tier, &keys);
    assert_eq!((n, dst), (16, src));
    assert!(tier.stats().connects >= 2);
}

#[test]
fn an_unreachable_server_at_start_is_a_miss_not_an_error() {
    // Nothing listens on this port.
    let url = format!("redis://127.0.0.1:{}/", common::free_port());
    let tier = SharedTier::new(ns("m"), config(&url, "nobody")).unwrap();
    let (keys, src) = blocks([1]);
    assert_eq!(get(&tier, &keys).0, 0);
    assert_eq!(tier.put(&keys, &src, 0).unwrap().unavailable, 1);
    assert!(SharedTier::new(ns("m"), SharedConfig::new("not a url")).is_err());
}
