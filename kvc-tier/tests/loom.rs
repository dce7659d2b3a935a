//! loom models of the host tier's copies outside its lock: every interleaving of a read with
//! the eviction that reuses its page, of two writers offering the same block, and of a writer
//! with a removal. Run with `cargo xtask loom` (builds with `--cfg kvc_loom`).
#![cfg(kvc_loom)]

use kvc_core::{BlockStore, DType, KvLayout, StoreKey, StoreNamespace};
use kvc_tier::{HostConfig, HostTier};
use loom::sync::Arc;
use loom::thread;

/// 64-byte blocks.
fn ns() -> StoreNamespace {
    StoreNamespace::new("loom", KvLayout::new(1, 1, 4, 4, DType::F16).unwrap(), 0, 1).unwrap()
}

const BLOCK: usize = 64;

/// A host tier of `pages` pages of `per_page` blocks.
fn host(pages: u64, per_page: u32) -> Arc<HostTier> {
    let bytes = pages * u64::from(per_page) * BLOCK as u64;
    Arc::new(HostTier::new(ns(), HostConfig::new(bytes, per_page)).unwrap())
}

/// Keys and payloads: every byte of block `k` is `k`.
fn blocks(keys: &[u8]) -> (Vec<StoreKey>, Vec<u8>) {
    (
        keys.iter().map(|&k| StoreKey(u128::from(k))).collect(),
        keys.iter()
            .flat_map(|&k| std::iter::repeat_n(k, BLOCK))
            .collect(),
    )
}

fn put(host: &HostTier, keys: &[u8]) -> kvc_core::PutOutcome {
    let (k, src) = blocks(keys);
    host.put(&k, &src, 50).unwrap()
}

/// Every block `keys` the tier holds reads back whole; returns how many it holds.
fn check_held(host: &HostTier, keys: &[u8]) -> usize {
    let (k, src) = blocks(keys);
    let mut dst = vec![0xEE; src.len()];
    let mut found = Vec::new();
    let hits = host.get(&k, &mut dst, &mut found).unwrap();
    for (j, &f) in found.iter().enumerate() {
        if f {
            assert_eq!(
                dst[j * BLOCK..(j + 1) * BLOCK],
                src[j * BLOCK..(j + 1) * BLOCK]
            );
        }
    }
    hits
}

/// A read of A races the put that evicts A's page and writes C into it: the read returns A's
/// bytes or a miss, never C's.
#[test]
fn a_read_racing_the_reuse_of_its_page_sees_its_block_or_a_miss() {
    loom::model(|| {
        let host = host(2, 1);
        let _ = put(&host, &[1]);
        let _ = put(&host, &[2]);
        let writer = {
            let host = Arc::clone(&host);
            thread::spawn(move || put(&host, &[3]))
        };
        let _ = check_held(&host, &[1]);
        let out = writer.join().unwrap();
        assert_eq!(out.stored, 1);
        assert_eq!(check_held(&host, &[3]), 1);
        assert_eq!(host.usage().blocks, 2);
    });
}

/// Two writers offer the same block at once: it is held once, whole, and the page the loser
/// copied into is freed with the block.
#[test]
fn two_writers_of_one_block_store_it_once() {
    loom::model(|| {
        let host = host(1, 2);
        let other = {
            let host = Arc::clone(&host);
            thread::spawn(move || put(&host, &[7]))
        };
        let mine = put(&host, &[7]);
        let theirs = other.join().unwrap();
        assert_eq!(mine.stored + theirs.stored, 1);
        assert_eq!(mine.present + theirs.present, 1);
        assert_eq!(host.usage().blocks, 1);
        assert_eq!(check_held(&host, &[7]), 1);
        // Once the block is removed its page, dead slot or not, is free again.
        assert_eq!(host.remove(&[StoreKey(7)]).unwrap(), 1);
        let out = put(&host, &[8, 9]);
        assert_eq!((out.stored, out.evicted, out.skipped), (2, 0, 0));
        assert_eq!(check_held(&host, &[8, 9]), 2);
    });
}

/// A put that evicts races a removal of the blocks it writes and evicts: the tier's count and
/// its contents agree afterwards, and every page is usable again.
#[test]
fn a_put_racing_a_removal_leaves_the_tier_consistent() {
    loom::model(|| {
        let host = host(2, 1);
        let _ = put(&host, &[1]);
        let remover = {
            let host = Arc::clone(&host);
            thread::spawn(move || {
                let (k, _) = blocks(&[1, 2]);
                host.remove(&k).unwrap()
            })
        };
        let out = put(&host, &[2, 3]);
        let _ = remover.join().unwrap();
        assert_eq!(out.stored + out.skipped, 2, "{out:?}");
        let held = check_held(&host, &[1, 2, 3]);
        assert_eq!(held as u64, host.usage().blocks);
        let (k, _) = blocks(&[1, 2, 3]);
        let _ = host.remove(&k).unwrap();
        let out = put(&host, &[4, 5]);
        assert_eq!((out.stored, out.evicted, out.skipped), (2, 0, 0));
    });
}

/// Two writers of different blocks, one page of one block: the second never evicts the page
/// the first is copying into (it gives up its block instead), so no two blocks share a slot.
#[test]
fn a_page_being_written_is_never_evicted_under_its_writer() {
    loom::model(|| {
        let host = host(1, 1);
        let other = {
            let host = Arc::clone(&host);
            thread::spawn(move || put(&host, &[1]))
        };
        let mine = put(&host, &[2]);
        let theirs = other.join().unwrap();
        assert_eq!(mine.stored + mine.skipped, 1, "{mine:?}");
        assert_eq!(theirs.stored + theirs.skipped, 1, "{theirs:?}");
        let held = check_held(&host, &[1, 2]);
        assert_eq!(held as u64, host.usage().blocks);
        assert!(held <= 1);
    });
}

/// A removal empties the page a writer is copying into: the page is not freed under it, and
/// the block it then publishes is not overwritten by the next page opened.
#[test]
fn a_page_being_written_is_never_freed_under_its_writer() {
    loom::model(|| {
        let host = host(1, 2);
        let _ = put(&host, &[1]);
        let remover = {
            let host = Arc::clone(&host);
            thread::spawn(move || host.remove(&[StoreKey(1)]).unwrap())
        };
        let out = put(&host, &[2]);
        assert_eq!(remover.join().unwrap(), 1);
        assert_eq!(out.stored, 1);
        let _ = put(&host, &[3, 4]);
        let held = check_held(&host, &[2, 3, 4]);
        assert_eq!(held as u64, host.usage().blocks);
    });
}
