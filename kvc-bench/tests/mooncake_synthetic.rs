//! The recommended eviction policy on a second public trace: the Mooncake synthetic workload
//! (`tests/data/mooncake-synthetic.jsonl`, see the README beside it), whose traffic differs
//! from the conversation trace the policies were developed on. At three cache sizes its hit
//! rate must be within half a point of LRU's or better.

use std::path::PathBuf;

use kvc_bench::trace::{MOONCAKE_BLOCK_TOKENS, read_trace};
use kvc_bench::workload::block_hit_rate;
use kvc_reuse::PolicyKind;

/// The policy `docs/reuse.md` recommends when the traffic is not known in advance.
const RECOMMENDED: PolicyKind = PolicyKind::Adaptive;

/// Cache sizes in tokens: the sizes `docs/benchmarks.md` reports for every trace.
const CAPACITIES_TOKENS: [usize; 3] = [1_000_000, 3_000_000, 10_000_000];

/// How far below LRU, in hit-rate points, a policy may fall.
const TOLERANCE_POINTS: f64 = 0.5;

/// `(capacity in tokens, LRU hit rate, policy hit rate)` in percent, per capacity.
fn compare(policy: PolicyKind) -> Vec<(usize, f64, f64)> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/mooncake-synthetic.jsonl");
    let trace = read_trace(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(trace.len(), 3993, "the shipped trace holds 3,993 requests");
    CAPACITIES_TOKENS
        .iter()
        .map(|&tokens| {
            let blocks = tokens / MOONCAKE_BLOCK_TOKENS as usize;
            let rate = |p| block_hit_rate(&trace, blocks, p).map_or(0.0, |r| 100.0 * r.hit_rate);
            (tokens, rate(PolicyKind::Lru), rate(policy))
        })
        .collect()
}

/// The rows where `policy` falls more than the tolerance below LRU.
fn shortfalls(policy: PolicyKind, rows: &[(usize, f64, f64)]) -> Vec<String> {
    rows.iter()
        .filter(|&&(_, lru, p)| p < lru - TOLERANCE_POINTS)
        .map(|&(tokens, lru, p)| {
            format!(
                "{} at {tokens} tokens: {p:.2}% < lru {lru:.2}%",
                policy.name()
            )
        })
        .collect()
}

#[test]
fn recommended_policy_is_never_more_than_half_a_point_below_lru() {
    let rows = compare(RECOMMENDED);
    assert_eq!(rows.len(), CAPACITIES_TOKENS.len());
    // LRU must have something to lose at every size, or the comparison says nothing.
    assert!(rows.iter().all(|&(_, lru, _)| lru > 5.0), "{rows:?}");
    let failures = shortfalls(RECOMMENDED, &rows);
    assert!(failures.is_empty(), "{}", failures.join("; "));
}

#[test]
fn the_check_catches_a_policy_fitted_to_the_conversation_trace() {
    // `conversation` beats LRU on the conversation trace but loses points here at 10M tokens:
    // the comparison above would reject it.
    let rows = compare(PolicyKind::Conversation);
    assert!(
        !shortfalls(PolicyKind::Conversation, &rows).is_empty(),
        "{rows:?}"
    );
}
