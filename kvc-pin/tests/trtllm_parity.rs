//! TensorRT-LLM's per-token-range retention (`KvCacheRetentionConfig` with
//! `TokenRangeRetentionConfig`s: a priority and an optional duration per range of a prompt's
//! tokens) re-expressed against [`SoftPins`] with [`PinTarget::TokenRange`]: which blocks a
//! range covers, the priority while the pin lives, and the default once its TTL runs out. The
//! updates reach the prefix cache through `ReuseIndex::set_retention` (the cache's side is
//! tested in `kvc-reuse/tests/trtllm_parity.rs`).
//!
//! Differences by design: a pin's TTL is mandatory and bounded (TensorRT-LLM's duration is
//! optional), so a pin can never hold blocks forever; and ranges are separate pins that may
//! overlap, the highest priority in force winning, where TensorRT-LLM refuses overlapping
//! ranges within one config.

use kvc_pin::{PinError, PinRequest, PinTarget, Retention, SoftPinConfig, SoftPins, TenantId};

const BS: u32 = 4;
const CHAIN: [u64; 4] = [0xa0, 0xa1, 0xa2, 0xa3];

fn pins() -> SoftPins {
    // 1 KiB blocks, a pool of 100 blocks, half of it for pins.
    SoftPins::new(SoftPinConfig::new(1024, 100, 0.5).unwrap())
}

fn range(start: u64, end: u64, priority: u8, ttl_ms: u64, now_ms: u64) -> PinRequest<'static> {
    PinRequest {
        tenant: TenantId(1),
        target: PinTarget::TokenRange {
            chain: &CHAIN,
            block_size: BS,
            start,
            end,
        },
        priority,
        ttl_ms,
        now_ms,
    }
}

fn priorities(p: &SoftPins, now: u64) -> Vec<u8> {
    CHAIN
        .iter()
        .map(|&h| p.retention(h, now).priority)
        .collect()
}

// TensorRT-LLM: a token range's priority applies to every block holding a token of the range
// (tokens 2..9 touch blocks 0, 1 and 2 of 4-token blocks).
#[test]
fn a_token_range_covers_every_block_holding_one_of_its_tokens() {
    let mut p = pins();
    let grant = p.pin(&range(2, 9, 80, 1_000, 0)).unwrap();
    let mut pinned: Vec<u64> = grant.updates.iter().map(|u| u.block_hash).collect();
    pinned.sort_unstable();
    assert_eq!(pinned, &CHAIN[..3]);
    assert!(grant.updates.iter().all(|u| u.retention
        == Retention {
            priority: 80,
            until: Some(1_000)
        }));
    assert_eq!(grant.bytes, 3 * 1024);
    assert_eq!(priorities(&p, 1), [80, 80, 80, Retention::DEFAULT_PRIORITY]);
}

// TensorRT-LLM's retention duration: after it the blocks are ranked at the default priority,
// and the cache is told so.
#[test]
fn a_range_decays_to_the_default_after_its_duration() {
    let mut p = pins();
    let _ = p.pin(&range(0, 8, 90, 100, 0)).unwrap();
    assert_eq!(p.retention(CHAIN[1], 99).priority, 90);
    assert_eq!(p.retention(CHAIN[1], 100), Retention::DEFAULT);
    let mut changed = Vec::new();
    p.expire(99, &mut changed);
    assert!(changed.is_empty(), "nothing expired yet");
    p.expire(100, &mut changed);
    let mut hashes: Vec<u64> = changed.iter().map(|u| u.block_hash).collect();
    hashes.sort_unstable();
    assert_eq!(hashes, &CHAIN[..2]);
    assert!(changed.iter().all(|u| u.retention == Retention::DEFAULT));
    assert_eq!(p.used_bytes(), 0);
}

// TensorRT-LLM gives a system prompt range one priority and the rest of the prompt another.
// Here: two pins; where they overlap the higher one in force wins, and when it expires the
// lower one still live takes over.
#[test]
fn overlapping_ranges_take_the_highest_priority_in_force() {
    let mut p = pins();
    let _ = p.pin(&range(0, 8, 90, 100, 0)).unwrap();
    let _ = p.pin(&range(4, 16, 20, 1_000, 0)).unwrap();
    assert_eq!(priorities(&p, 50), [90, 90, 20, 20]);
    let mut changed = Vec::new();
    p.expire(100, &mut changed);
    assert_eq!(
        priorities(&p, 100),
        [Retention::DEFAULT_PRIORITY, 20, 20, 20]
    );
    // The update for block 1 names the pin still in force.
    let b1 = changed.iter().find(|u| u.block_hash == CHAIN[1]).unwrap();
    assert_eq!(
        b1.retention,
        Retention {
            priority: 20,
            until: Some(1_000)
        }
    );
}

// TensorRT-LLM validates its ranges (start before end, within the sequence); so does a pin,
// with a typed error, and an unbounded duration is refused here by design.
#[test]
fn bad_ranges_and_unbounded_durations_are_refused() {
    let mut p = pins();
    for (start, end) in [(8, 8), (9, 4), (0, 17)] {
        assert_eq!(
            p.pin(&range(start, end, 50, 10, 0)),
            Err(PinError::BadRange {
                start,
                end,
                blocks: 4,
                block_size: BS
            })
        );
    }
    assert!(matches!(
        p.pin(&range(0, 4, 50, 0, 0)),
        Err(PinError::InvalidTtl { ttl_ms: 0, .. })
    ));
    assert!(matches!(
        p.pin(&range(0, 4, 101, 10, 0)),
        Err(PinError::InvalidPriority { priority: 101 })
    ));
    assert!(p.is_empty());
}
