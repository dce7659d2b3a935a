//! The host tier under concurrent readers and writers: a read racing an eviction returns the
//! whole block it asked for or a miss, never another block's bytes. And its eviction order
//! against a model: lowest priority in force first, then least recently used.

mod common;

use std::sync::Arc;

use common::{BLOCK, blocks, ns};
use kvc_core::{BlockStore, Retention, StoreKey};
use kvc_tier::{HostConfig, HostTier};
use proptest::prelude::*;

#[test]
fn reads_racing_evictions_see_whole_blocks_or_misses() {
    // 16 pages of 4 blocks; writers push 4x as many blocks through.
    let host = Arc::new(HostTier::new(ns("m"), HostConfig::new(16 * 4 * BLOCK as u64, 4)).unwrap());
    let writers: Vec<_> = (0..2u128)
        .map(|w| {
            let host = Arc::clone(&host);
            std::thread::spawn(move || {
                for b in 0..64u128 {
                    let base = 1_000 * (w + 1) + 4 * b;
                    let (keys, src) = blocks(base..base + 4);
                    let _ = host.put(&keys, &src, 0).unwrap();
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..2u128)
        .map(|r| {
            let host = Arc::clone(&host);
            std::thread::spawn(move || {
                let mut seen = 0;
                for i in 0..400u128 {
                    let base = 1_000 * (r + 1) + 4 * ((i * 7) % 64);
                    let (keys, src) = blocks(base..base + 4);
                    let mut dst = vec![0; 4 * BLOCK];
                    let mut found = Vec::new();
                    let n = host.get(&keys, &mut dst, &mut found).unwrap();
                    assert_eq!(n, found.iter().filter(|&&f| f).count());
                    for (j, &f) in found.iter().enumerate() {
                        if f {
                            assert_eq!(
                                dst[j * BLOCK..(j + 1) * BLOCK],
                                src[j * BLOCK..(j + 1) * BLOCK]
                            );
                        }
                    }
                    seen += found.len();
                }
                seen
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    for r in readers {
        assert_eq!(r.join().unwrap(), 1_600);
    }
    let s = host.stats();
    assert!(s.evicted_pages > 0, "the writers forced evictions");
    assert_eq!(host.usage().blocks, 64);
}

#[derive(Clone, Debug)]
enum Op {
    Put {
        key: u8,
        priority: u8,
        /// How long the pin lasts from now, if it expires.
        lasts: Option<u8>,
        /// How far the clock moves first.
        dt: u8,
    },
    Get(u8),
    Remove(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..10u8, prop_oneof![Just(10u8), Just(35), Just(60), Just(90)],
              proptest::option::of(1..20u8), 0..6u8)
            .prop_map(|(key, priority, lasts, dt)| Op::Put { key, priority, lasts, dt }),
        2 => (0..10u8).prop_map(Op::Get),
        1 => (0..10u8).prop_map(Op::Remove),
    ]
}

/// The host tier with pages of one block, as a list: key, retention, last use.
#[derive(Default)]
struct Model {
    held: Vec<(u8, Retention, u64)>,
    now: u64,
    tick: u64,
}

impl Model {
    const PAGES: usize = 4;

    fn put(&mut self, key: u8, retention: Retention) {
        self.tick += 1;
        if let Some(e) = self.held.iter_mut().find(|e| e.0 == key) {
            e.1 = retention;
            e.2 = self.tick;
            return;
        }
        if self.held.len() == Self::PAGES {
            let now = self.now;
            let victim = (0..self.held.len())
                .min_by_key(|&i| (self.held[i].1.priority_at(now), self.held[i].2))
                .unwrap();
            self.held.remove(victim);
        }
        self.held.push((key, retention, self.tick));
    }

    fn get(&mut self, key: u8) {
        if let Some(e) = self.held.iter_mut().find(|e| e.0 == key) {
            self.tick += 1;
            e.2 = self.tick;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn eviction_follows_priority_in_force_then_recency(ops in proptest::collection::vec(op(), 1..60)) {
        let host = HostTier::new(ns("p"), HostConfig::new(Model::PAGES as u64 * BLOCK as u64, 1)).unwrap();
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Put { key, priority, lasts, dt } => {
                    model.now += u64::from(dt);
                    let retention = Retention {
                        priority,
                        until: lasts.map(|l| model.now + u64::from(l)),
                    };
                    let (keys, src) = blocks([u128::from(key)]);
                    let out = host.put_retained(&keys, &src, retention, model.now).unwrap();
                    prop_assert_eq!(out.stored + out.present, 1);
                    model.put(key, retention);
                }
                Op::Get(key) => {
                    let (keys, src) = blocks([u128::from(key)]);
                    let mut dst = vec![0; BLOCK];
                    let mut found = Vec::new();
                    if host.get(&keys, &mut dst, &mut found).unwrap() == 1 {
                        prop_assert_eq!(&dst, &src, "a hit holds its own bytes");
                    }
                    model.get(key);
                }
                Op::Remove(key) => {
                    let removed = host.remove(&[StoreKey(u128::from(key))]).unwrap();
                    let before = model.held.len();
                    model.held.retain(|e| e.0 != key);
                    prop_assert_eq!(removed, before - model.held.len());
                }
            }
            let keys: Vec<StoreKey> = (0..10u128).map(StoreKey).collect();
            let mut found = Vec::new();
            host.contains(&keys, &mut found).unwrap();
            let want: Vec<bool> = (0..10u8).map(|k| model.held.iter().any(|e| e.0 == k)).collect();
            prop_assert_eq!(found, want);
        }
    }
}
