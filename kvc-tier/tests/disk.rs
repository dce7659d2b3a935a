//! The disk tier against real files: restart, corruption, truncation, the byte budget, the
//! retention order, other namespaces, and reads racing evictions.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;

use common::{BLOCK, TempDir, blocks, ns, payload};
use kvc_core::{BlockStore, Retention, StoreKey};
use kvc_tier::{DiskConfig, DiskOpenError, DiskTier};

fn pages(tier: &DiskTier) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(tier.dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "kvcpage"))
        .collect();
    v.sort();
    v
}

fn get_all(tier: &DiskTier, keys: &[StoreKey]) -> (usize, Vec<bool>, Vec<u8>) {
    let mut dst = vec![0; keys.len() * BLOCK];
    let mut found = Vec::new();
    let n = tier.get(keys, &mut dst, &mut found).unwrap();
    (n, found, dst)
}

#[test]
fn pages_round_trip_and_are_found_again_after_a_restart() {
    let tmp = TempDir::new("restart");
    let cfg = DiskConfig::new(&tmp.0, 1 << 20, 4);
    let (keys, src) = blocks(1..=10);
    {
        let disk = DiskTier::open(ns("m"), &cfg).unwrap();
        let out = disk.put(&keys, &src, 0).unwrap();
        assert_eq!((out.stored, out.present), (10, 0));
        assert_eq!(pages(&disk).len(), 3, "10 blocks in pages of 4");
        assert_eq!(
            disk.put(&keys[..3], &src[..3 * BLOCK], 0).unwrap().present,
            3
        );
        let (n, _, dst) = get_all(&disk, &keys);
        assert_eq!(n, 10);
        assert_eq!(dst, src);
    }
    let disk = DiskTier::open(ns("m"), &cfg).unwrap();
    assert_eq!(disk.stats().recovered_pages, 3);
    assert_eq!(disk.usage().blocks, 10);
    let (n, _, dst) = get_all(&disk, &keys);
    assert_eq!(n, 10);
    assert_eq!(dst, src);
    // Removing every block of a page deletes its file.
    assert_eq!(disk.remove(&keys[..4]).unwrap(), 4);
    assert_eq!(pages(&disk).len(), 2);
}

#[test]
fn a_corrupt_page_is_dropped_and_never_read_as_kv() {
    let tmp = TempDir::new("corrupt");
    let cfg = DiskConfig::new(&tmp.0, 1 << 20, 2);
    let disk = DiskTier::open(ns("m"), &cfg).unwrap();
    let (keys, src) = blocks(1..=4);
    let _ = disk.put(&keys, &src, 0).unwrap();
    let files = pages(&disk);
    assert_eq!(files.len(), 2);
    // Flip one byte of the last block's payload in the second page.
    let len = fs::metadata(&files[1]).unwrap().len();
    let mut f = OpenOptions::new().write(true).open(&files[1]).unwrap();
    f.seek(SeekFrom::Start(len - 10)).unwrap();
    f.write_all(&[0xFF ^ payload(4)[BLOCK - 10]]).unwrap();
    drop(f);
    let (n, found, dst) = get_all(&disk, &keys);
    assert_eq!(n, 2);
    assert_eq!(
        found,
        [true, true, false, false],
        "the whole page is dropped"
    );
    assert_eq!(dst[..2 * BLOCK], src[..2 * BLOCK]);
    assert_eq!(disk.stats().corrupt_pages, 1);
    assert!(!files[1].exists(), "the corrupt page file is deleted");
    assert_eq!(disk.contains_prefix(&keys).unwrap(), 2);
}

#[test]
fn truncated_and_damaged_pages_are_dropped_at_open_and_on_read() {
    let tmp = TempDir::new("truncated");
    let cfg = DiskConfig::new(&tmp.0, 1 << 20, 2);
    let (keys, src) = blocks(1..=6);
    let files = {
        let disk = DiskTier::open(ns("m"), &cfg).unwrap();
        let _ = disk.put(&keys, &src, 0).unwrap();
        pages(&disk)
    };
    // A page cut short (a crash mid-write), a page with a damaged header, an unfinished write.
    let len = fs::metadata(&files[0]).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&files[0])
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let mut bytes = fs::read(&files[1]).unwrap();
    bytes[20] ^= 1;
    fs::write(&files[1], bytes).unwrap();
    fs::write(files[2].with_extension("tmp"), b"half").unwrap();
    let disk = DiskTier::open(ns("m"), &cfg).unwrap();
    let s = disk.stats();
    assert_eq!((s.recovered_pages, s.dropped_at_open), (1, 3));
    let (n, found, dst) = get_all(&disk, &keys);
    assert_eq!(n, 2);
    assert_eq!(found, [false, false, false, false, true, true]);
    assert_eq!(dst[4 * BLOCK..], src[4 * BLOCK..]);
    // Truncated after it was indexed: the read comes up short, a miss, and the page goes.
    OpenOptions::new()
        .write(true)
        .open(&files[2])
        .unwrap()
        .set_len(100)
        .unwrap();
    let (n, _, _) = get_all(&disk, &keys);
    assert_eq!(n, 0);
    assert_eq!(disk.stats().corrupt_pages, 1);
}

#[test]
fn a_folder_serves_one_open_tier_at_a_time() {
    let tmp = TempDir::new("in-use");
    let cfg = DiskConfig::new(&tmp.0, 1 << 20, 2);
    let (keys, src) = blocks(1..=4);
    let first = DiskTier::open(ns("m"), &cfg).unwrap();
    let _ = first.put(&keys, &src, 0).unwrap();
    // A second engine given the same folder would number its pages from the same id and
    // overwrite the first one's pages: it is refused, and the first tier keeps its blocks.
    let second = DiskTier::open(ns("m"), &cfg);
    assert!(
        matches!(second, Err(DiskOpenError::InUse { .. })),
        "{second:?}"
    );
    let (n, _, dst) = get_all(&first, &keys);
    assert_eq!(n, 4);
    assert_eq!(dst, src);
    // Another namespace has its own folder; and once the first tier is dropped, the folder
    // opens again with its pages.
    assert!(DiskTier::open(ns("other"), &cfg).is_ok());
    drop(first);
    let again = DiskTier::open(ns("m"), &cfg).unwrap();
    assert_eq!(get_all(&again, &keys).2, src);
}

#[test]
fn files_named_like_no_page_of_the_tier_are_left_alone_at_open() {
    let tmp = TempDir::new("names");
    let cfg = DiskConfig::new(&tmp.0, 1 << 20, 2);
    let (keys, src) = blocks(1..=4);
    let files = {
        let disk = DiskTier::open(ns("m"), &cfg).unwrap();
        let _ = disk.put(&keys, &src, 0).unwrap();
        pages(&disk)
    };
    let dir = files[0].parent().unwrap().to_path_buf();
    // The highest id a name can hold (the next page's id would overflow), and short or signed
    // names that parse as the id of a real page (taking one for the page, open deleted the
    // real file as a duplicate).
    fs::write(dir.join("ffffffffffffffff.kvcpage"), b"not a page").unwrap();
    let first = files[0].file_stem().unwrap().to_str().unwrap();
    let short = first.trim_start_matches('0');
    let short = if short.is_empty() { "0" } else { short };
    for alias in [short.to_string(), format!("+{short}")] {
        fs::copy(&files[0], dir.join(format!("{alias}.kvcpage"))).unwrap();
    }
    let disk = DiskTier::open(ns("m"), &cfg).unwrap();
    let s = disk.stats();
    assert_eq!((s.recovered_pages, s.dropped_at_open), (2, 0));
    assert!(files.iter().all(|f| f.exists()));
    let (n, _, dst) = get_all(&disk, &keys);
    assert_eq!(n, 4);
    assert_eq!(dst, src);
    // New pages get fresh ids beside them.
    let (more, more_src) = blocks(5..=6);
    assert_eq!(disk.put(&more, &more_src, 0).unwrap().stored, 2);
    assert_eq!(get_all(&disk, &more).2, more_src);
    assert_eq!(get_all(&disk, &keys).2, src);
}

#[test]
fn the_budget_is_never_exceeded_and_old_pages_go_first() {
    let tmp = TempDir::new("budget");
    let probe = DiskTier::open(ns("probe"), &DiskConfig::new(&tmp.0, 1 << 20, 2)).unwrap();
    let (k, s) = blocks([1, 2]);
    let _ = probe.put(&k, &s, 0).unwrap();
    let page_bytes = probe.usage().bytes;
    // Room for three pages.
    let cfg = DiskConfig::new(&tmp.0, 3 * page_bytes + page_bytes / 2, 2);
    let disk = DiskTier::open(ns("m"), &cfg).unwrap();
    let mut evicted = 0;
    for p in 0..10u128 {
        let (keys, src) = blocks([2 * p + 1, 2 * p + 2]);
        let out = disk.put(&keys, &src, 0).unwrap();
        assert_eq!(out.stored, 2);
        evicted += out.evicted;
        let u = disk.usage();
        assert!(u.bytes <= u.capacity_bytes.unwrap(), "{u:?}");
    }
    assert_eq!(evicted, 14);
    assert_eq!(pages(&disk).len(), 3);
    let (old, _) = blocks([1, 2]);
    assert_eq!(disk.contains_prefix(&old).unwrap(), 0);
    let (new, src) = blocks([19, 20]);
    let (n, _, dst) = get_all(&disk, &new);
    assert_eq!((n, dst), (2, src));
    // A page larger than the whole budget is declined, not an error.
    let tiny = DiskTier::open(ns("tiny"), &DiskConfig::new(&tmp.0, 100, 2)).unwrap();
    let out = tiny.put(&new, &blocks([19, 20]).1, 0).unwrap();
    assert_eq!((out.stored, out.skipped), (0, 2));
    assert_eq!(tiny.usage().bytes, 0);
}

/// A disk tier with room for three pages of two blocks, and the bytes of one page.
fn three_page_disk(tmp: &TempDir, name: &str) -> DiskTier {
    let probe = DiskTier::open(ns("probe"), &DiskConfig::new(&tmp.0, 1 << 20, 2)).unwrap();
    let (k, s) = blocks([1, 2]);
    let _ = probe.put(&k, &s, 0).unwrap();
    let page_bytes = probe.usage().bytes;
    let cfg = DiskConfig::new(&tmp.0, 3 * page_bytes + page_bytes / 2, 2);
    DiskTier::open(ns(name), &cfg).unwrap()
}

fn pin(priority: u8, until: Option<u64>) -> Retention {
    Retention { priority, until }
}

/// Puts page `p` (blocks `2p+1`, `2p+2`) with `retention` at `now_ms`.
fn put_page(disk: &DiskTier, p: u128, retention: Retention, now_ms: u64) -> usize {
    let (keys, src) = blocks([2 * p + 1, 2 * p + 2]);
    let out = disk.put_retained(&keys, &src, retention, now_ms).unwrap();
    out.stored
}

fn holds(disk: &DiskTier, p: u128) -> bool {
    let (keys, _) = blocks([2 * p + 1, 2 * p + 2]);
    disk.contains_prefix(&keys).unwrap() == 2
}

#[test]
fn a_pinned_page_outlives_churn_until_its_pin_expires() {
    let tmp = TempDir::new("pinned");
    let disk = three_page_disk(&tmp, "m");
    assert_eq!(put_page(&disk, 0, pin(80, Some(1_000)), 0), 2);
    // Default pages churn through the other two places; the pinned page is the oldest.
    for p in 1..=6 {
        assert_eq!(put_page(&disk, p, Retention::DEFAULT, 10 * p as u64), 2);
        assert!(holds(&disk, 0), "pinned page evicted by default page {p}");
    }
    assert!(!holds(&disk, 1), "the oldest default page goes instead");
    // Once the pin has expired the page ranks at the default and, least recently used, goes.
    assert_eq!(put_page(&disk, 7, Retention::DEFAULT, 1_000), 2);
    assert!(!holds(&disk, 0));
    assert!(holds(&disk, 5) && holds(&disk, 6) && holds(&disk, 7));
    let u = disk.usage();
    assert!(u.bytes <= u.capacity_bytes.unwrap(), "{u:?}");
}

#[test]
fn a_low_priority_page_goes_before_older_default_pages_and_a_hit_touches() {
    let tmp = TempDir::new("low");
    let disk = three_page_disk(&tmp, "m");
    assert_eq!(put_page(&disk, 0, Retention::DEFAULT, 0), 2);
    assert_eq!(put_page(&disk, 1, Retention::DEFAULT, 0), 2);
    assert_eq!(put_page(&disk, 2, pin(5, None), 0), 2);
    assert_eq!(put_page(&disk, 3, Retention::DEFAULT, 0), 2);
    assert!(
        !holds(&disk, 2),
        "the low-priority page goes first, though newest"
    );
    assert!(holds(&disk, 0) && holds(&disk, 1));
    // A read makes page 0 the most recently used: page 1 goes next.
    let (keys, src) = blocks([1, 2]);
    let (n, _, dst) = get_all(&disk, &keys);
    assert_eq!((n, dst), (2, src));
    assert_eq!(put_page(&disk, 4, Retention::DEFAULT, 0), 2);
    assert!(holds(&disk, 0) && !holds(&disk, 1));
}

#[test]
fn offering_a_held_block_with_a_higher_retention_raises_its_page() {
    let tmp = TempDir::new("raise");
    let disk = three_page_disk(&tmp, "m");
    for p in 0..3 {
        assert_eq!(put_page(&disk, p, Retention::DEFAULT, 0), 2);
    }
    // Page 0, the least recently used, is offered again with a pin: present, and now kept.
    let (keys, src) = blocks([1]);
    let out = disk.put_retained(&keys, &src, pin(90, None), 0).unwrap();
    assert_eq!((out.stored, out.present), (0, 1));
    // A lower offer does not lower it.
    let out = disk.put_retained(&keys, &src, pin(1, None), 0).unwrap();
    assert_eq!(out.present, 1);
    assert_eq!(put_page(&disk, 3, Retention::DEFAULT, 0), 2);
    assert_eq!(put_page(&disk, 4, Retention::DEFAULT, 0), 2);
    assert!(holds(&disk, 0), "the raised page stays");
    assert!(!holds(&disk, 1) && !holds(&disk, 2));
}

#[test]
fn pages_found_at_start_up_rank_at_the_default() {
    let tmp = TempDir::new("restart-rank");
    {
        let disk = three_page_disk(&tmp, "m");
        assert_eq!(put_page(&disk, 0, pin(90, None), 0), 2);
        assert_eq!(put_page(&disk, 1, Retention::DEFAULT, 0), 2);
    }
    let disk = three_page_disk(&tmp, "m");
    assert_eq!(disk.stats().recovered_pages, 2);
    assert_eq!(put_page(&disk, 2, Retention::DEFAULT, 0), 2);
    assert_eq!(put_page(&disk, 3, Retention::DEFAULT, 0), 2);
    // The pin did not survive the restart: the oldest page goes first.
    assert!(!holds(&disk, 0));
    assert!(holds(&disk, 1) && holds(&disk, 2) && holds(&disk, 3));
}

#[test]
fn a_block_of_another_namespace_is_never_read_back() {
    let tmp = TempDir::new("namespace");
    let cfg = DiskConfig::new(&tmp.0, 1 << 20, 2);
    let a = DiskTier::open(ns("model-a"), &cfg).unwrap();
    let b = DiskTier::open(ns("model-b"), &cfg).unwrap();
    let (keys, src) = blocks([1, 2]);
    let _ = a.put(&keys, &src, 0).unwrap();
    assert_eq!(b.contains_prefix(&keys).unwrap(), 0);
    assert_eq!(get_all(&b, &keys).0, 0);
    // Even a page file copied into the other namespace's folder is refused by its header.
    for f in pages(&a) {
        fs::copy(&f, b.dir().join(f.file_name().unwrap())).unwrap();
    }
    drop(b);
    let b = DiskTier::open(ns("model-b"), &cfg).unwrap();
    assert_eq!(b.stats().dropped_at_open, 1);
    assert_eq!(get_all(&b, &keys).0, 0);
}

#[test]
fn reads_racing_evictions_see_whole_blocks_or_misses() {
    let tmp = TempDir::new("race");
    // Room for about eight pages of two blocks: writers keep evicting what readers read.
    let probe = DiskTier::open(ns("probe"), &DiskConfig::new(&tmp.0, 1 << 20, 2)).unwrap();
    let _ = probe.put(&blocks([1, 2]).0, &blocks([1, 2]).1, 0).unwrap();
    let page = probe.usage().bytes;
    let disk = Arc::new(DiskTier::open(ns("m"), &DiskConfig::new(&tmp.0, 8 * page, 2)).unwrap());
    let writers: Vec<_> = (0..2u128)
        .map(|w| {
            let disk = Arc::clone(&disk);
            std::thread::spawn(move || {
                for p in 0..150u128 {
                    let base = 10_000 * (w + 1) + 2 * p;
                    let (keys, src) = blocks([base, base + 1]);
                    let _ = disk.put(&keys, &src, 0).unwrap();
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..2u128)
        .map(|r| {
            let disk = Arc::clone(&disk);
            std::thread::spawn(move || {
                let (mut hits, mut misses) = (0, 0);
                for i in 0..300u128 {
                    let base = 10_000 * (r % 2 + 1) + 2 * (i / 2);
                    let (keys, src) = blocks([base, base + 1]);
                    let mut dst = vec![0; 2 * BLOCK];
                    let mut found = Vec::new();
                    let _ = disk.get(&keys, &mut dst, &mut found).unwrap();
                    for (j, &f) in found.iter().enumerate() {
                        if f {
                            assert_eq!(
                                dst[j * BLOCK..(j + 1) * BLOCK],
                                src[j * BLOCK..(j + 1) * BLOCK]
                            );
                            hits += 1;
                        } else {
                            misses += 1;
                        }
                    }
                }
                (hits, misses)
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let mut total = 0;
    for r in readers {
        let (h, m) = r.join().unwrap();
        total += h + m;
    }
    assert_eq!(total, 2 * 300 * 2);
    let u = disk.usage();
    assert!(u.bytes <= 8 * page);
    assert_eq!(
        disk.stats().corrupt_pages,
        0,
        "a race is a miss, not corruption"
    );
}

mod model {
    //! The disk tier's eviction order against a model: pages of one block each, written with
    //! a retention at a clock that moves forward, read back, and offered again.

    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        /// Offer block `key` with `priority`, pinned for `lasts` ms if any, `dt` ms later.
        Put {
            key: u8,
            priority: u8,
            lasts: Option<u8>,
            dt: u8,
        },
        Get(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..12u8, prop_oneof![Just(0u8), Just(35), Just(60), Just(90)],
                  proptest::option::of(1..40u8), 0..8u8)
                .prop_map(|(key, priority, lasts, dt)| Op::Put { key, priority, lasts, dt }),
            1 => (0..12u8).prop_map(Op::Get),
        ]
    }

    /// Held blocks: (key, retention, last use); the first in (priority in force, last use)
    /// order is evicted when a fourth page is written.
    #[derive(Default)]
    struct Model {
        held: Vec<(u8, Retention, u64)>,
        now: u64,
        tick: u64,
    }

    const PAGES: usize = 3;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn eviction_follows_priority_in_force_then_recency(
            ops in proptest::collection::vec(op(), 1..40),
        ) {
            let tmp = TempDir::new("model");
            let probe = DiskTier::open(ns("probe"), &DiskConfig::new(&tmp.0, 1 << 20, 1)).unwrap();
            let (k, s) = blocks([1]);
            let _ = probe.put(&k, &s, 0).unwrap();
            let page_bytes = probe.usage().bytes;
            let cfg = DiskConfig::new(&tmp.0, PAGES as u64 * page_bytes + page_bytes / 2, 1);
            let disk = DiskTier::open(ns("m"), &cfg).unwrap();
            let mut m = Model::default();
            for op in ops {
                m.tick += 1;
                match op {
                    Op::Put { key, priority, lasts, dt } => {
                        m.now += u64::from(dt);
                        let retention = Retention {
                            priority,
                            until: lasts.map(|l| m.now + u64::from(l)),
                        };
                        let (keys, src) = blocks([u128::from(key)]);
                        let out = disk.put_retained(&keys, &src, retention, m.now).unwrap();
                        let now = m.now;
                        if let Some(h) = m.held.iter_mut().find(|h| h.0 == key) {
                            prop_assert_eq!((out.stored, out.present), (0, 1));
                            if retention.priority_at(now) > h.1.priority_at(now) {
                                h.1 = retention;
                            }
                        } else {
                            prop_assert_eq!(out.stored, 1);
                            if m.held.len() == PAGES {
                                let victim = (0..PAGES)
                                    .min_by_key(|&i| (m.held[i].1.priority_at(now), m.held[i].2))
                                    .unwrap();
                                m.held.remove(victim);
                            }
                            m.held.push((key, retention, m.tick));
                        }
                    }
                    Op::Get(key) => {
                        let (keys, src) = blocks([u128::from(key)]);
                        let (n, _, dst) = get_all(&disk, &keys);
                        let held = m.held.iter_mut().find(|h| h.0 == key);
                        prop_assert_eq!(n == 1, held.is_some());
                        if let Some(h) = held {
                            prop_assert_eq!(&dst, &src, "a hit holds its own bytes");
                            h.2 = m.tick;
                        }
                    }
                }
                let mut want: Vec<u8> = m.held.iter().map(|h| h.0).collect();
                want.sort_unstable();
                let have: Vec<u8> = (0..12u8)
                    .filter(|&k| disk.contains_prefix(&blocks([u128::from(k)]).0).unwrap() == 1)
                    .collect();
                prop_assert_eq!(have, want);
                let u = disk.usage();
                prop_assert!(u.bytes <= u.capacity_bytes.unwrap());
            }
        }
    }
}
