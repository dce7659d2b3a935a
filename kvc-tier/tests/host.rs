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

#[test]
fn writers_of_the_same_blocks_and_removals_race_without_losing_or_mixing_bytes() {
    // 3 pages of 2 blocks, three threads offering, reading and removing the same 12 keys.
    let host = Arc::new(HostTier::new(ns("m"), HostConfig::new(3 * 2 * BLOCK as u64, 2)).unwrap());
    let workers: Vec<_> = (0..3u128)
        .map(|t| {
            let host = Arc::clone(&host);
            std::thread::spawn(move || {
                let mut x = 0x2545_f491_4f6c_dd1d_u64 ^ (t as u64);
                for _ in 0..5_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let first = u128::from(x % 12);
                    let n = 1 + (x >> 8) % 3;
                    let (keys, src) = blocks(first..first + u128::from(n));
                    match (x >> 16) % 4 {
                        0 | 1 => {
                            let out = host.put(&keys, &src, ((x >> 24) % 100) as u8).unwrap();
                            assert_eq!(
                                out.stored + out.present + out.skipped,
                                keys.len(),
                                "{out:?}"
                            );
                        }
                        2 => {
                            let mut dst = vec![0; keys.len() * BLOCK];
                            let mut found = Vec::new();
                            let hits = host.get(&keys, &mut dst, &mut found).unwrap();
                            assert_eq!(hits, found.iter().filter(|&&f| f).count());
                            for (j, &f) in found.iter().enumerate() {
                                if f {
                                    assert_eq!(
                                        dst[j * BLOCK..(j + 1) * BLOCK],
                                        src[j * BLOCK..(j + 1) * BLOCK],
                                        "a hit holds its own block's bytes"
                                    );
                                }
                            }
                        }
                        _ => {
                            let _ = host.remove(&keys).unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    // Quiet now: whatever is held is whole, and the pool is still usable to the last slot.
    let (keys, src) = blocks(0..14);
    let mut found = Vec::new();
    let held = host.contains(&keys, &mut found).unwrap();
    assert!(held <= 6 && host.usage().blocks as usize == held);
    let mut dst = vec![0; keys.len() * BLOCK];
    assert_eq!(host.get(&keys, &mut dst, &mut found).unwrap(), held);
    for (j, &f) in found.iter().enumerate() {
        if f {
            assert_eq!(
                dst[j * BLOCK..(j + 1) * BLOCK],
                src[j * BLOCK..(j + 1) * BLOCK]
            );
        }
    }
    let _ = host.remove(&keys).unwrap();
    assert_eq!(host.usage().blocks, 0);
    let (fresh, fresh_src) = blocks(100..106);
    let out = host.put(&fresh, &fresh_src, 50).unwrap();
    assert_eq!(
        (out.stored, out.evicted, out.skipped),
        (6, 0, 0),
        "every page came back"
    );
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

/// The host tier recomputed from scratch: pages of `bpp` slots, ranks re-read from every live
/// block at each eviction (the tier keeps them incrementally, with queued expiries).
struct Model {
    bpp: usize,
    pages: Vec<Page>,
    free: Vec<usize>,
    open: Vec<(u8, usize)>,
    now: u64,
    tick: u64,
}

#[derive(Clone, Default)]
struct Page {
    slots: Vec<Option<(u8, Retention)>>,
    tick: u64,
    in_use: bool,
}

impl Model {
    const PAGES: usize = 4;

    fn new(bpp: usize) -> Self {
        Self {
            bpp,
            pages: vec![Page::default(); Self::PAGES],
            free: (0..Self::PAGES).rev().collect(),
            open: Vec::new(),
            now: 0,
            tick: 0,
        }
    }

    fn find(&self, key: u8) -> Option<(usize, usize)> {
        self.pages.iter().enumerate().find_map(|(p, page)| {
            let s = page
                .slots
                .iter()
                .position(|s| s.is_some_and(|(k, _)| k == key))?;
            Some((p, s))
        })
    }

    fn touch(&mut self, p: usize) {
        if self.pages[p].tick != self.tick {
            self.tick += 1;
            self.pages[p].tick = self.tick;
        }
    }

    fn rank(&self, p: usize) -> u8 {
        self.pages[p]
            .slots
            .iter()
            .flatten()
            .map(|(_, r)| r.priority_at(self.now))
            .max()
            .unwrap_or(Retention::DEFAULT_PRIORITY)
    }

    fn put(&mut self, key: u8, retention: Retention) {
        if let Some((p, s)) = self.find(key) {
            self.pages[p].slots[s] = Some((key, retention));
            self.touch(p);
            return;
        }
        let class = retention.priority_at(self.now);
        let open = self.open.iter().position(|&(c, _)| c == class);
        let (p, s) = match open.map(|i| (i, self.open[i].1)) {
            Some((_, p)) if self.pages[p].slots.len() < self.bpp => (p, self.pages[p].slots.len()),
            other => {
                if let Some((i, _)) = other {
                    self.open.swap_remove(i);
                }
                let p = match self.free.pop() {
                    Some(p) => p,
                    None => {
                        let victim = (0..Self::PAGES)
                            .filter(|&p| self.pages[p].in_use)
                            .min_by_key(|&p| (self.rank(p), self.pages[p].tick, p))
                            .unwrap();
                        self.open.retain(|&(_, o)| o != victim);
                        victim
                    }
                };
                self.tick += 1;
                self.pages[p] = Page {
                    slots: Vec::new(),
                    tick: self.tick,
                    in_use: true,
                };
                self.open.push((class, p));
                (p, 0)
            }
        };
        self.pages[p].slots.push(Some((key, retention)));
        debug_assert_eq!(self.pages[p].slots.len(), s + 1);
        self.touch(p);
    }

    fn get(&mut self, key: u8) {
        if let Some((p, _)) = self.find(key) {
            self.touch(p);
        }
    }

    fn remove(&mut self, key: u8) -> usize {
        let Some((p, s)) = self.find(key) else {
            return 0;
        };
        self.pages[p].slots[s] = None;
        if self.pages[p].slots.iter().all(Option::is_none) {
            self.pages[p] = Page::default();
            self.open.retain(|&(_, o)| o != p);
            self.free.push(p);
        }
        1
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn eviction_follows_priority_in_force_then_recency(
        bpp in 1..4usize,
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let cfg = HostConfig::new((Model::PAGES * bpp * BLOCK) as u64, bpp as u32);
        let host = HostTier::new(ns("p"), cfg).unwrap();
        let mut model = Model::new(bpp);
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
                    prop_assert_eq!(removed, model.remove(key));
                }
            }
            let keys: Vec<StoreKey> = (0..10u128).map(StoreKey).collect();
            let mut found = Vec::new();
            host.contains(&keys, &mut found).unwrap();
            let want: Vec<bool> = (0..10u8).map(|k| model.find(k).is_some()).collect();
            prop_assert_eq!(found, want);
        }
    }
}
