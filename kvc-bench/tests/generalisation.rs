//! The adaptive eviction policy generalises: on every generated workload shape (including
//! `abandoned`, built to mislead the continuation signal it learns), at three cache sizes,
//! its hit rate is within half a point of LRU's or better.

use kvc_bench::workload::{Shape, block_hit_rate, generate};
use kvc_reuse::PolicyKind;

/// Requests per shape: enough for the cache to fill and churn many times, small enough for a
/// test build to replay every shape at three sizes with two policies in seconds.
const REQUESTS: usize = 3000;

/// Cache sizes as fractions of the blocks an unbounded cache would hold.
const FRACTIONS: [f64; 3] = [0.05, 0.15, 0.4];

#[test]
fn adaptive_is_never_more_than_half_a_point_below_lru() {
    let mut failures = Vec::new();
    let mut compared = 0;
    for shape in Shape::ALL {
        let trace = generate(shape, REQUESTS, 2026).unwrap();
        let distinct = block_hit_rate(&trace, usize::MAX >> 1, PolicyKind::Lru)
            .map_or(0, |r| r.distinct_blocks);
        for fraction in FRACTIONS {
            let cap = ((distinct as f64 * fraction) as usize).max(1);
            let lru = block_hit_rate(&trace, cap, PolicyKind::Lru).map_or(0.0, |r| r.hit_rate);
            let adaptive =
                block_hit_rate(&trace, cap, PolicyKind::Adaptive).map_or(0.0, |r| r.hit_rate);
            compared += 1;
            if adaptive < lru - 0.005 {
                failures.push(format!(
                    "{} at {cap} blocks: adaptive {:.2}% < lru {:.2}%",
                    shape.name(),
                    100.0 * adaptive,
                    100.0 * lru
                ));
            }
        }
    }
    assert_eq!(compared, Shape::ALL.len() * FRACTIONS.len());
    assert!(failures.is_empty(), "{}", failures.join("; "));
}
