//! The plain replay with a simulated conversation-end signal
//! ([`kvc_bench::replay::replay_with_end_signal`]) on the shipped Mooncake synthetic trace:
//! at share 0 it is the plain replay exactly, and telling the cache every ended conversation
//! never lowers LRU's hit rate; a late signal; and the `--end-signal` options of
//! `kvc-bench replay`.

use std::path::PathBuf;
use std::process::Command;

use kvc_bench::replay::{
    EndSignal, ReplayConfig, ReplayError, SharedPrefix, replay, replay_with_end_signal,
};
use kvc_bench::trace::{TraceRequest, read_trace};
use kvc_reuse::{HasherKind, PolicyKind};

fn trace_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/mooncake-synthetic.jsonl")
}

fn trace() -> Vec<TraceRequest> {
    let path = trace_path();
    read_trace(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The trace's own 512-token blocks keep the replays to a fraction of a second.
fn cfg(capacity_tokens: u64) -> ReplayConfig {
    ReplayConfig {
        capacity_tokens,
        block_size: 512,
        policy: PolicyKind::Lru,
        hasher: HasherKind::Xxh3,
        optimal: false,
    }
}

fn signal(share: f64, shared: SharedPrefix) -> EndSignal {
    EndSignal {
        share,
        seed: 1,
        shared,
        delay_ms: 0,
    }
}

#[test]
fn share_zero_is_the_plain_replay_and_share_one_helps_lru() {
    let trace = trace();
    for capacity in [1_000_000, 3_000_000] {
        let plain = replay(&trace, &cfg(capacity)).unwrap();
        let zero = replay_with_end_signal(
            &trace,
            &cfg(capacity),
            &signal(0.0, SharedPrefix::Hindsight),
        )
        .unwrap();
        assert_eq!(zero.hit_tokens, plain.hit_tokens, "{capacity}");
        assert_eq!(zero.evicted_blocks, plain.evicted_blocks, "{capacity}");
        let ends = zero.end_signal.as_ref().unwrap();
        assert_eq!((ends.signalled_requests, ends.demoted_blocks), (0, 0));
        // Most first turns of this trace are never continued.
        assert!(ends.ended_requests > trace.len() as u64 / 3, "{ends:?}");

        let mut last = zero.hit_tokens;
        for share in [0.5, 1.0] {
            let r = replay_with_end_signal(
                &trace,
                &cfg(capacity),
                &signal(share, SharedPrefix::Hindsight),
            )
            .unwrap();
            let ends = r.end_signal.as_ref().unwrap();
            assert!(ends.demoted_blocks > 0, "{capacity} {share}: {ends:?}");
            assert!(
                r.hit_tokens >= last,
                "{capacity}: share {share} hit {} tokens, less than {last}",
                r.hit_tokens
            );
            last = r.hit_tokens;
        }
        assert!(
            last > plain.hit_tokens,
            "{capacity}: the signal buys nothing"
        );
    }
}

#[test]
fn every_ended_request_is_signalled_at_share_one_and_none_at_zero() {
    let trace = trace();
    let one = replay_with_end_signal(
        &trace,
        &cfg(3_000_000),
        &signal(1.0, SharedPrefix::CacheOnly),
    )
    .unwrap();
    let ends = one.end_signal.unwrap();
    assert_eq!(ends.signalled_requests, ends.ended_requests);
    assert_eq!(ends.shared, "cache-only");
    assert_eq!(
        replay_with_end_signal(
            &trace,
            &cfg(3_000_000),
            &signal(1.5, SharedPrefix::Hindsight)
        ),
        Err(ReplayError::BadShare { share: 1.5 })
    );
}

#[test]
fn a_late_end_is_told_later_and_one_past_the_trace_never() {
    let trace = trace();
    let cfg = cfg(3_000_000);
    let plain = replay(&trace, &cfg).unwrap();
    let at = |delay_ms| {
        let s = EndSignal {
            delay_ms,
            ..signal(1.0, SharedPrefix::Hindsight)
        };
        replay_with_end_signal(&trace, &cfg, &s).unwrap()
    };
    let span = trace.last().unwrap().timestamp_ms - trace[0].timestamp_ms;
    // Told after the last request: never told at all, the plain replay exactly.
    let never = at(span + 1);
    assert_eq!(never.hit_tokens, plain.hit_tokens);
    assert_eq!(never.evicted_blocks, plain.evicted_blocks);
    let ends = never.end_signal.unwrap();
    assert_eq!((ends.signalled_requests, ends.delay_ms), (0, span + 1));
    // A minute late: ends of requests in the trace's last minute are never told, the
    // others are, and the blocks they demote are fewer than at once (some were evicted or
    // reused meanwhile).
    let now = at(0).end_signal.unwrap();
    let late = at(60_000).end_signal.unwrap();
    let last_minute = trace
        .iter()
        .filter(|r| r.timestamp_ms + 60_000 > trace.last().unwrap().timestamp_ms)
        .count() as u64;
    assert!(late.signalled_requests < now.signalled_requests, "{late:?}");
    assert!(
        late.signalled_requests + last_minute >= now.signalled_requests,
        "{late:?} {now:?}"
    );
    assert!(late.demoted_blocks > 0 && late.demoted_blocks <= now.demoted_blocks);
}

#[test]
fn the_cli_reports_the_signal_and_refuses_a_bad_share() {
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kvc-bench"))
            .args(["replay", "--trace"])
            .arg(trace_path())
            .args(["--capacity-tokens", "1M", "--block-size", "512"])
            .args(["--hasher", "xxh3", "--json"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&["--end-signal", "0.5", "--end-signal-seed", "3"]);
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ends = &json["end_signal"];
    assert_eq!(ends["share"], 0.5);
    assert_eq!(ends["seed"], 3);
    assert_eq!(ends["shared"], "hindsight");
    let (ended, told) = (
        ends["ended_requests"].as_u64().unwrap(),
        ends["signalled_requests"].as_u64().unwrap(),
    );
    assert!(told > 0 && told < ended, "{ends}");
    // Without the option the report has no such field.
    let plain = run(&[]);
    let json: serde_json::Value = serde_json::from_slice(&plain.stdout).unwrap();
    assert!(json.get("end_signal").is_none());

    let bad = run(&["--end-signal", "2"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("between 0 and 1"), "{err}");

    let late = run(&["--end-signal", "1", "--end-signal-delay", "5m"]);
    assert!(late.status.success(), "{late:?}");
    let json: serde_json::Value = serde_json::from_slice(&late.stdout).unwrap();
    assert_eq!(json["end_signal"]["delay_ms"], 300_000);
    for bad in ["5 minutes", "3x", "1.5m", "99999999999999999999h"] {
        let out = run(&["--end-signal", "1", "--end-signal-delay", bad]);
        assert!(!out.status.success(), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not a duration"), "{bad}: {err}");
    }
}
