//! The storage behaviours LMCache's tests check of its local CPU backend and its lookups
//! (chunked put and get, `contains`, a prefix retrieval that stops at the first missing chunk,
//! LRU eviction when the backend is full, re-puts, removal, bad buffers), re-expressed against
//! [`HostTier`] (one block per page, so eviction is per block as in LMCache's backend) and
//! [`TierStack`]'s lookup across the host and disk tiers.
//!
//! Difference by design: a chunk here is one KV block of the device's block size, named by its
//! chained block hash ([`StoreKey`]), where LMCache names chunks of its own size by a prefix
//! hash of their tokens. Priorities (which LMCache's CPU backend does not have) are left at 0.

mod common;

use common::{BLOCK, TempDir, blocks, ns, payload};
use kvc_core::{BlockStore, StoreError, StoreKey};
use kvc_tier::{
    DeviceEvent, DiskConfig, DiskTier, HostConfig, HostTier, OffloadMode, TierKind, TierStack,
};

/// A host tier of `n` blocks, one block per page.
fn host(n: u64) -> HostTier {
    HostTier::new(ns("m"), HostConfig::new(n * BLOCK as u64, 1)).unwrap()
}

fn keys(list: &[u128]) -> Vec<StoreKey> {
    list.iter().copied().map(StoreKey).collect()
}

fn held(store: &dyn BlockStore, list: &[u128]) -> Vec<bool> {
    let mut found = Vec::new();
    store.contains(&keys(list), &mut found).unwrap();
    found
}

// LMCache `test_put_and_get` (batched): chunks stored in one call come back byte for byte;
// a missing chunk in the batch is reported missing and the others are still returned.
#[test]
fn a_batch_put_comes_back_whole_and_a_missing_chunk_is_only_marked() {
    let h = host(8);
    let (k, src) = blocks([1, 2, 3]);
    let out = h.put(&k, &src, 0).unwrap();
    assert_eq!((out.stored, out.present, out.evicted), (3, 0, 0));
    let ask = keys(&[3, 9, 1]);
    let mut dst = vec![0; 3 * BLOCK];
    let mut found = Vec::new();
    assert_eq!(h.get(&ask, &mut dst, &mut found).unwrap(), 2);
    assert_eq!(found, [true, false, true]);
    assert_eq!(&dst[..BLOCK], payload(3).as_slice());
    assert_eq!(&dst[2 * BLOCK..], payload(1).as_slice());
    assert_eq!(h.usage().blocks, 3);
}

// LMCache `test_contains` and its prefix lookup: `contains` answers per chunk, and the
// prefix a store can serve ends at the first chunk it does not hold, whatever follows.
#[test]
fn contains_is_per_chunk_and_the_prefix_ends_at_the_first_miss() {
    let h = host(8);
    let (k, src) = blocks([1, 2, 4]);
    let _ = h.put(&k, &src, 0).unwrap();
    assert_eq!(held(&h, &[1, 2, 3, 4]), [true, true, false, true]);
    assert_eq!(h.contains_prefix(&keys(&[1, 2, 3, 4])).unwrap(), 2);
    assert_eq!(h.contains_prefix(&keys(&[3, 1, 2])).unwrap(), 0);
    assert_eq!(h.contains_prefix(&keys(&[])).unwrap(), 0);
}

// LMCache's lookup across storage backends: each chunk of the prefix is served by the first
// backend holding it, and the prefix ends at the first chunk no backend holds.
#[test]
fn a_lookup_across_tiers_stops_at_the_first_chunk_no_tier_holds() {
    let dir = TempDir::new("lmcache-parity");
    let disk = DiskTier::open(ns("m"), &DiskConfig::new(&dir.0, 1 << 20, 1)).unwrap();
    let (k, src) = blocks([2, 5]);
    let _ = disk.put(&k, &src, 0).unwrap();
    let h = host(8);
    let (k, src) = blocks([1, 2]);
    let _ = h.put(&k, &src, 0).unwrap();
    let stack = TierStack::new(h, Some(disk), None, OffloadMode::WriteBack);
    // 1 on the host, 2 on both (the host answers), 3 nowhere: 5 is never reached.
    assert_eq!(
        stack.lookup(&keys(&[1, 2, 3, 5])).unwrap(),
        [TierKind::Host, TierKind::Host]
    );
    assert_eq!(
        stack.lookup(&keys(&[5, 1, 3])).unwrap(),
        [TierKind::Disk, TierKind::Host]
    );
    assert!(stack.lookup(&keys(&[3, 1])).unwrap().is_empty());
}

// LMCache `LocalCPUBackend` eviction: when full, a put evicts the least recently used chunk;
// a get hit counts as a use.
#[test]
fn a_full_backend_evicts_the_least_recently_used_chunk() {
    let h = host(4);
    for key in 1..=4 {
        let (k, src) = blocks([key]);
        let _ = h.put(&k, &src, 0).unwrap();
    }
    // Use chunk 1: chunk 2 is now the least recently used.
    let mut dst = vec![0; BLOCK];
    let mut found = Vec::new();
    assert_eq!(h.get(&keys(&[1]), &mut dst, &mut found).unwrap(), 1);
    let (k, src) = blocks([5]);
    let out = h.put(&k, &src, 0).unwrap();
    assert_eq!((out.stored, out.evicted), (1, 1));
    assert_eq!(held(&h, &[1, 2, 3, 4, 5]), [true, false, true, true, true]);
    // Then 3, 4 and 1 in that order.
    for (key, gone) in [(6, 3), (7, 4), (8, 1)] {
        let (k, src) = blocks([key]);
        let _ = h.put(&k, &src, 0).unwrap();
        assert_eq!(held(&h, &[gone]), [false], "{gone} evicted for {key}");
    }
    assert_eq!(h.usage().blocks, 4);
}

// LMCache: putting a chunk the backend already holds stores nothing new (and keeps one copy).
#[test]
fn a_repeated_put_keeps_one_copy() {
    let h = host(4);
    let (k, src) = blocks([1, 2]);
    let _ = h.put(&k, &src, 0).unwrap();
    let (k, src) = blocks([2, 3]);
    let out = h.put(&k, &src, 0).unwrap();
    assert_eq!((out.stored, out.present), (1, 1));
    assert_eq!(h.usage().blocks, 3);
}

// LMCache `test_remove`: a removed chunk is no longer held; removing what is not held counts
// nothing.
#[test]
fn removed_chunks_are_gone() {
    let h = host(4);
    let (k, src) = blocks([1, 2, 3]);
    let _ = h.put(&k, &src, 0).unwrap();
    assert_eq!(h.remove(&keys(&[2, 9])).unwrap(), 1);
    assert_eq!(held(&h, &[1, 2, 3]), [true, false, true]);
    assert_eq!(h.remove(&keys(&[2])).unwrap(), 0);
    assert_eq!(h.usage().blocks, 2);
}

// LMCache checks the shapes of what it stores; here a buffer that is not one block per key
// is a typed error and nothing is stored or read.
#[test]
fn a_buffer_of_the_wrong_size_is_refused() {
    let h = host(4);
    let (k, mut src) = blocks([1, 2]);
    src.pop();
    assert_eq!(
        h.put(&k, &src, 0),
        Err(StoreError::BufferSize {
            blocks: 2,
            block_bytes: BLOCK as u64,
            len: 2 * BLOCK - 1
        })
    );
    assert_eq!(h.usage().blocks, 0);
    let mut dst = vec![0; BLOCK];
    let mut found = Vec::new();
    assert!(matches!(
        h.get(&k, &mut dst, &mut found),
        Err(StoreError::BufferSize { blocks: 2, .. })
    ));
}

// LMCache with a CPU and a local disk backend: a chunk the full CPU backend drops is still
// served from disk, and a retrieval from disk brings it back into CPU memory. Differs by
// design: a chunk reaches the disk when the host tier evicts it (LMCache writes every put to
// every backend), so the disk holds only what the host could not.
#[test]
fn a_chunk_evicted_from_host_memory_is_served_from_disk_and_promoted() {
    let dir = TempDir::new("lmcache-spill");
    let disk = DiskTier::open(ns("m"), &DiskConfig::new(&dir.0, 1 << 20, 1)).unwrap();
    let stack = TierStack::new(host(2), Some(disk), None, OffloadMode::WriteBack);
    let (k, src) = blocks([1, 2, 3]);
    let out = stack.offload(DeviceEvent::Evicted, &k, &src, 0).unwrap();
    assert_eq!((out.stored, out.evicted), (3, 1));
    assert_eq!(stack.stats().demoted, 1);
    assert_eq!(held(stack.host(), &[1, 2, 3]), [false, true, true]);
    let tiers = stack.lookup(&k).unwrap();
    assert_eq!(tiers, [TierKind::Disk, TierKind::Host, TierKind::Host]);
    let mut dst = vec![0; 3 * BLOCK];
    let loaded = stack.load(&k, &tiers, &mut dst).unwrap();
    assert_eq!((loaded.blocks, loaded.per_tier), (3, [2, 1, 0]));
    assert_eq!(dst, src);
    // Chunk 1 is back in host memory; the least recently used of the others (2, read just
    // before 3) went down to disk.
    assert_eq!(stack.stats().promoted, 1);
    assert_eq!(stack.stats().demoted, 2);
    assert_eq!(held(stack.host(), &[1, 2, 3]), [true, false, true]);
    assert_eq!(stack.lookup(&k).unwrap().len(), 3);
}

// LMCache's retrieval returns the prefix it could read: a chunk gone between the lookup and
// the read (evicted or removed meanwhile) ends the loaded prefix there, and the chunks after
// it are not used even though they were read.
#[test]
fn a_load_ends_at_a_chunk_gone_since_the_lookup() {
    let stack = TierStack::new(host(8), None, None, OffloadMode::WriteBack);
    let (k, src) = blocks([1, 2, 3]);
    let _ = stack.offload(DeviceEvent::Evicted, &k, &src, 0).unwrap();
    let tiers = stack.lookup(&k).unwrap();
    assert_eq!(tiers.len(), 3);
    assert_eq!(stack.host().remove(&keys(&[2])).unwrap(), 1);
    let mut dst = vec![0; 3 * BLOCK];
    let loaded = stack.load(&k, &tiers, &mut dst).unwrap();
    assert_eq!((loaded.blocks, loaded.per_tier), (1, [1, 0, 0]));
    assert_eq!(&dst[..BLOCK], payload(1).as_slice());
}
