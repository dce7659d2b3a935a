//! The `replay` subcommand end to end: JSON output on small inline traces, one-line errors
//! with non-zero exit codes, and (when the shared trace is present) the Mooncake trace.
// The Mooncake test prints why it skips when the shared trace is absent.
#![allow(clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kvc_bench::replay::{ReplayConfig, replay};
use kvc_bench::trace::read_trace;
use kvc_reuse::{HasherKind, PolicyKind};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kvc-bench"))
}

/// Writes `text` to a fresh file under the target directory and returns its path.
fn trace_file(name: &str, text: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("replay-cli");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn run(trace: &Path, extra: &[&str]) -> Output {
    bin()
        .args(["replay", "--trace"])
        .arg(trace)
        .args(extra)
        .output()
        .unwrap()
}

const TWO_TURNS: &str = "\
{\"timestamp\": 0, \"input_length\": 1000, \"output_length\": 10, \"hash_ids\": [1, 2]}
{\"timestamp\": 5, \"input_length\": 1500, \"output_length\": 10, \"hash_ids\": [1, 3, 4]}
";

#[test]
fn json_output_has_every_field() {
    let path = trace_file("two-turns.jsonl", TWO_TURNS);
    let out = run(
        &path,
        &[
            "--capacity-tokens",
            "100000",
            "--policy",
            "lru",
            "--optimal",
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["requests"], 2);
    assert_eq!(v["input_tokens"], 2500);
    assert_eq!(
        v["hit_tokens"], 512,
        "the second request shares Mooncake block 0"
    );
    assert_eq!(v["policy"], "lru");
    assert_eq!(v["capacity_tokens"], 100000);
    assert_eq!(v["block_size"], 16);
    assert_eq!(v["evicted_blocks"], 0);
    let rate = v["hit_rate"].as_f64().unwrap();
    assert!((rate - 512.0 / 2500.0).abs() < 1e-12);
    assert!(
        v["elapsed_s"].is_f64(),
        "the replay's wall time is reported"
    );
    assert_eq!(v["optimal_hit_rate"].as_f64(), Some(rate));
    assert_eq!(v["infinite_hit_rate"].as_f64(), Some(rate));
}

#[test]
fn every_policy_and_hasher_runs() {
    let path = trace_file("two-turns-all.jsonl", TWO_TURNS);
    for policy in PolicyKind::ALL {
        for hasher in ["xxh3", "blake3"] {
            let out = run(
                &path,
                &[
                    "--capacity-tokens",
                    "100000",
                    "--policy",
                    policy.name(),
                    "--hasher",
                    hasher,
                    "--block-size",
                    "32",
                ],
            );
            assert!(out.status.success(), "{policy:?} {hasher}");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("hit rate 20.48%"), "{text}");
        }
    }
}

fn assert_fails(out: &Output, needles: &[&str]) {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    for n in needles {
        assert!(err.contains(n), "`{err}` should mention `{n}`");
    }
}

#[test]
fn malformed_lines_name_the_line_and_field() {
    let path = trace_file(
        "malformed.jsonl",
        "{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [0]}\n\
         {\"timestamp\": 1, \"input_length\": \"many\", \"output_length\": 1, \"hash_ids\": [0]}\n",
    );
    let out = run(&path, &["--capacity-tokens", "1000"]);
    assert_fails(&out, &["line 2", "input_length"]);
    let path = trace_file("missing.jsonl", "{\"timestamp\": 1, \"input_length\": 3}\n");
    assert_fails(
        &run(&path, &["--capacity-tokens", "1000"]),
        &["line 1", "output_length"],
    );
}

#[test]
fn every_malformed_trace_is_one_line_naming_the_line_and_reason() {
    let good = "{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [0]}";
    let line2 = |bad: &str| format!("{good}\n\n{bad}\n");
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "bad-json",
            line2("{bad json"),
            vec!["line 3", "not a JSON object", "column 2"],
        ),
        ("array", line2("[1, 2]"), vec!["line 3", "found an array"]),
        ("null", line2("null"), vec!["line 3", "found null"]),
        (
            "two-objects",
            line2(&format!("{good} {{}}")),
            vec!["line 3", "trailing characters"],
        ),
        (
            "missing",
            line2("{\"timestamp\": 0, \"input_length\": 10, \"hash_ids\": [0]}"),
            vec!["line 3", "missing field `output_length`"],
        ),
        (
            "string-number",
            line2(&good.replace("10,", "\"10\",")),
            vec!["line 3", "input_length", "\"10\""],
        ),
        (
            "negative",
            line2(&good.replace("10,", "-10,")),
            vec!["line 3", "input_length", "-10"],
        ),
        (
            "negative-timestamp",
            line2(&good.replace("\"timestamp\": 0", "\"timestamp\": -5")),
            vec!["line 3", "timestamp", "-5"],
        ),
        (
            "negative-hash-id",
            line2(&good.replace("[0]", "[-1]")),
            vec!["line 3", "hash_ids", "-1"],
        ),
        (
            "fraction",
            line2(&good.replace("10,", "10.5,")),
            vec!["line 3", "input_length", "10.5"],
        ),
        (
            "huge",
            line2(&good.replace("10,", "99999999999999999999999,")),
            vec!["line 3", "input_length"],
        ),
        (
            "u64-max",
            line2(&good.replace("10,", "18446744073709551615,")),
            vec!["line 3", "input_length", "over the limit"],
        ),
        (
            "huge-timestamp",
            line2(&good.replace("\"timestamp\": 0", "\"timestamp\": 1e300")),
            vec!["line 3", "timestamp"],
        ),
        ("blank-only", "\n  \n\n".to_owned(), vec!["no request"]),
        ("empty", String::new(), vec!["no request"]),
    ];
    for (name, text, needles) in cases {
        let path = trace_file(&format!("malformed-{name}.jsonl"), &text);
        let out = run(&path, &["--capacity-tokens", "1000"]);
        assert_fails(&out, &needles);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{name}: {err}"
        );
        // Each position is said once: the trace's line, never the JSON parser's own "line 1".
        let shown = path.display().to_string();
        let message = err
            .split_once(shown.as_str())
            .map_or(&*err, |(_, rest)| rest);
        let lines = needles.iter().filter(|n| n.starts_with("line")).count();
        assert_eq!(message.matches("line").count(), lines, "{name}: {err}");
    }
    let path = trace_file("binary.jsonl", "");
    std::fs::write(&path, [0xff, 0xfe, b'\n']).unwrap();
    assert_fails(
        &run(&path, &["--capacity-tokens", "1000"]),
        &["line 1", "not UTF-8"],
    );
}

#[test]
fn a_missing_trace_is_named_once() {
    let missing = Path::new(env!("CARGO_TARGET_TMPDIR")).join("no-such-trace.jsonl");
    let out = run(&missing, &["--capacity-tokens", "1000"]);
    assert_fails(&out, &["cannot read trace", "no-such-trace.jsonl"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("no-such-trace.jsonl").count(), 1, "{err}");
}

#[test]
fn empty_trace_zero_capacity_and_unknown_names_are_errors() {
    let empty = trace_file("empty.jsonl", "\n");
    assert_fails(
        &run(&empty, &["--capacity-tokens", "1000"]),
        &["no request"],
    );
    let path = trace_file("ok.jsonl", TWO_TURNS);
    assert_fails(&run(&path, &["--capacity-tokens", "0"]), &["capacity"]);
    assert_fails(
        &run(&path, &["--capacity-tokens", "10", "--block-size", "16"]),
        &["capacity of 10 token(s)"],
    );
    assert_fails(
        &run(&path, &["--capacity-tokens", "1000", "--policy", "mru"]),
        &["'mru'", "lru"],
    );
    assert_fails(
        &run(
            &path,
            &[
                "--capacity-tokens",
                "1000",
                "--engine-like",
                "--cache",
                "radix",
                "--policy",
                "s3fifo",
            ],
        ),
        &["radix cache evicts by LRU only, not s3fifo"],
    );
    assert_fails(
        &run(&path, &["--capacity-tokens", "1000", "--cache", "radix"]),
        &["--engine-like"],
    );
    let missing = Path::new(env!("CARGO_TARGET_TMPDIR")).join("no-such-trace.jsonl");
    assert_fails(
        &run(&missing, &["--capacity-tokens", "1000"]),
        &["cannot read trace"],
    );
}

#[test]
fn mooncake_trace_prefix_orders_lru_optimum_and_infinite() {
    // Needs the Mooncake conversation trace at `../shared/traces/` (see the README). Without
    // it the test skips, except under CI=true, where a skip nobody sees would be a test that
    // never ran, so it fails.
    let Some(path) = kvc_bench::trace::find_default_trace() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but {} is missing",
            kvc_bench::trace::DEFAULT_TRACE
        );
        eprintln!(
            "skipped: {} is absent (the inline traces above still test the replay)",
            kvc_bench::trace::DEFAULT_TRACE
        );
        return;
    };
    let trace = read_trace(&path).unwrap();
    assert_eq!(trace.len(), 12_031);
    // The first 3,000 requests keep the test quick; the full figures are in docs/benchmarks.md.
    let head = &trace[..3_000];
    let mut rates = Vec::new();
    for policy in [PolicyKind::Lru, PolicyKind::Conversation] {
        let cfg = ReplayConfig {
            capacity_tokens: 1_000_000,
            block_size: 16,
            policy,
            hasher: HasherKind::Xxh3,
            optimal: policy == PolicyKind::Lru,
        };
        let r = replay(head, &cfg).unwrap();
        assert!(r.evicted_blocks > 0);
        if let (Some(opt), Some(inf)) = (r.optimal_hit_rate, r.infinite_hit_rate) {
            assert!(r.hit_rate < opt && opt <= inf && inf < 1.0, "{r:?}");
        }
        rates.push(r.hit_rate);
    }
    assert!(
        rates[1] > rates[0],
        "conversation {} vs LRU {}",
        rates[1],
        rates[0]
    );
}
