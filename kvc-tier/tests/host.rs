//! The host tier under concurrent readers and writers: a read racing an eviction returns the
//! whole block it asked for or a miss, never another block's bytes.

mod common;

use std::sync::Arc;

use common::{BLOCK, blocks, ns};
use kvc_core::BlockStore;
use kvc_tier::{HostConfig, HostTier};

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
