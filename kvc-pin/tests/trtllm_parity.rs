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

// TensorRT-LLM refuses empty and reversed ranges; so does a pin, with a typed error.
// Differs by design: a range reaching past the chain is refused (TensorRT-LLM clips it to the
// prompt; a pin names the chain it covers, so a longer range is a caller's mistake), and an
// unbounded duration is refused.
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

/// The priority per block of a chain of `blocks` blocks of `bs` tokens under one pin per
/// `(start, end, priority)` range (0 for the default, as TensorRT-LLM's "no priority").
fn per_block(bs: u32, blocks: usize, ranges: &[(u64, u64, u8)]) -> Vec<u8> {
    let chain: Vec<u64> = (0..blocks as u64).map(|i| 0xc0 + i).collect();
    let mut p = SoftPins::new(SoftPinConfig::new(1, 1_000, 1.0).unwrap());
    for &(start, end, priority) in ranges {
        let _ = p
            .pin(&PinRequest {
                tenant: TenantId(1),
                target: PinTarget::TokenRange {
                    chain: &chain,
                    block_size: bs,
                    start,
                    end,
                },
                priority,
                ttl_ms: 1_000,
                now_ms: 0,
            })
            .unwrap();
    }
    chain
        .iter()
        .map(|&h| {
            let r = p.retention(h, 1);
            if r == Retention::DEFAULT {
                0
            } else {
                r.priority
            }
        })
        .collect()
}

// TensorRT-LLM `KvCacheRetentionConfigTest.BlockConfigTest`: the priority each block of a
// prompt gets from a set of token ranges. Where both rules agree the cases match exactly.
// Differs by design: TensorRT-LLM gives a block the range holding its first token; a pin here
// covers every block holding a token of its range (a pinned token's KV is always kept), and
// a block covered by two ranges takes the higher priority. TensorRT-LLM's open-ended ranges
// are written here with the prompt's end.
#[test]
fn per_block_priorities_of_token_ranges() {
    // The same under both rules.
    assert_eq!(
        per_block(64, 4, &[(0, 64, 80), (64, 128, 50)]),
        [80, 50, 0, 0]
    );
    assert_eq!(
        per_block(32, 4, &[(0, 63, 80), (63, 127, 30)]),
        [80, 80, 30, 30]
    );
    assert_eq!(per_block(32, 4, &[(0, 1, 80), (1, 2, 5)]), [80, 0, 0, 0]);
    assert_eq!(per_block(256, 1, &[(0, 128, 80)]), [80]);
    assert_eq!(
        per_block(64, 3, &[(0, 65, 80), (65, 129, 30)]),
        [80, 80, 30]
    );
    // Different: blocks holding only some tokens of a range are covered here.
    // TensorRT-LLM: [80, -, -, 50].
    assert_eq!(
        per_block(64, 4, &[(0, 64, 80), (129, 256, 50)]),
        [80, 0, 50, 50]
    );
    // TensorRT-LLM: [80, -, -, -].
    assert_eq!(
        per_block(64, 4, &[(0, 64, 80), (66, 67, 50)]),
        [80, 50, 0, 0]
    );
    // TensorRT-LLM: [-, -, 80, 80].
    assert_eq!(per_block(64, 4, &[(127, 193, 80)]), [0, 80, 80, 80]);
    // TensorRT-LLM: [-, 80].
    assert_eq!(per_block(64, 2, &[(1, 128, 80)]), [80, 80]);
}
