//! TensorRT-LLM's offloading of evicted blocks to a secondary (host) pool, re-expressed against
//! [`HostTier`]: blocks below a minimum retention priority are not offloaded
//! (`LRUPolicyTest.PriorityTest`, `secondary_offload_min_priority`), and the host pool evicts
//! lower priorities first, least recently used among equals.

mod common;

use common::{BLOCK, blocks, ns};
use kvc_core::{BlockStore, StoreKey};
use kvc_tier::{HostConfig, HostTier};

fn host(n: u64, min_priority: u8) -> HostTier {
    let cfg = HostConfig {
        min_priority,
        ..HostConfig::new(n * BLOCK as u64, 1)
    };
    HostTier::new(ns("m"), cfg).unwrap()
}

fn held(h: &HostTier, keys: &[u128]) -> Vec<bool> {
    let keys: Vec<StoreKey> = keys.iter().copied().map(StoreKey).collect();
    let mut found = Vec::new();
    h.contains(&keys, &mut found).unwrap();
    found
}

// TensorRT-LLM: a block of a priority below the offload minimum is dropped, not offloaded;
// at or above it, it is.
#[test]
fn blocks_below_the_minimum_priority_are_not_offloaded() {
    let h = host(8, 35);
    for (key, priority) in [(1, 5), (2, 34), (3, 35), (4, 80)] {
        let (k, src) = blocks([key]);
        let out = h.put(&k, &src, priority).unwrap();
        assert_eq!(
            (out.stored, out.skipped),
            if priority < 35 { (0, 1) } else { (1, 0) },
            "priority {priority}"
        );
    }
    assert_eq!(held(&h, &[1, 2, 3, 4]), [false, false, true, true]);
    assert_eq!(h.stats().below_priority, 2);
}

// TensorRT-LLM's secondary pool frees the lowest priority first, then the least recently
// used: a full host tier takes a new block's room from the lowest priority, not the oldest.
#[test]
fn a_full_host_tier_evicts_the_lowest_priority_first() {
    let h = host(3, 0);
    for (key, priority) in [(1, 80), (2, 20), (3, 20)] {
        let (k, src) = blocks([key]);
        let _ = h.put(&k, &src, priority).unwrap();
    }
    // Block 1 is the oldest but ranks highest: 2 goes, then 3.
    for (key, gone) in [(4, 2), (5, 3)] {
        let (k, src) = blocks([key]);
        let _ = h.put(&k, &src, 35).unwrap();
        assert_eq!(held(&h, &[gone]), [false], "{gone} evicted for {key}");
    }
    assert_eq!(held(&h, &[1, 4, 5]), [true, true, true]);
}
