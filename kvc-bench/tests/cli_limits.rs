//! The command line never panics, hangs or exhausts memory on a typo: every case here once
//! did one of those, and now gets a one-line error that names the limit, or (where a huge
//! setting has a well-defined meaning) runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kvc-bench"))
}

fn kvc(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-limits");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

const TRACE: &str = "\
{\"timestamp\": 0, \"input_length\": 1000, \"output_length\": 10, \"hash_ids\": [1, 2]}
{\"timestamp\": 5, \"input_length\": 1500, \"output_length\": 10, \"hash_ids\": [1, 3, 4]}
";

/// Fails unless the run failed with exactly one line on stderr containing every needle.
#[track_caller]
fn one_line_error(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {err}");
    assert_eq!(
        out.status.code().map(|c| c < 100),
        Some(true),
        "no panic: {err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    for n in needles {
        assert!(err.contains(n), "`{err}` should mention `{n}`");
    }
}

#[track_caller]
fn succeeds(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn engine_like_replay_with_every_request_alive_and_a_2_pow_30_block_pool_runs() {
    let trace = file("two.jsonl", TRACE.as_bytes());
    let t = trace.to_str().unwrap();
    // --alive beyond the trace means every request alive at once (this used to panic with
    // a capacity overflow); a pool of 2^30 blocks is sized by what the trace can use.
    let out = kvc(&[
        "replay",
        "--trace",
        t,
        "--engine-like",
        "--alive",
        "18446744073709551615",
        "--capacity-tokens",
        "16Gi",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&succeeds(&out)).unwrap();
    assert_eq!(v["requests"], 2);
    assert_eq!(v["alive"], 2);
    assert_eq!(v["capacity_tokens"], 16u64 << 30);
    assert_eq!(v["hit_tokens"], 512);
    // `1e12` is not a count: a one-line parse error.
    let out = kvc(&[
        "replay",
        "--trace",
        t,
        "--engine-like",
        "--alive",
        "1e12",
        "--capacity-tokens",
        "1k",
    ]);
    one_line_error(&out, &["--alive", "1e12", "not a token count"]);
}

#[test]
fn engine_request_counts_are_bounded() {
    for n in ["18446744073709551615", "4294967296", "10001"] {
        one_line_error(
            &kvc(&["engine", "--requests", n]),
            &["--requests", n, "limit of 10000"],
        );
    }
    one_line_error(
        &kvc(&["engine", "--new-tokens", "4294967296"]),
        &["--new-tokens", "limit of 3776", "context"],
    );
    one_line_error(&kvc(&["engine", "--requests", "0"]), &["at least 1"]);
}

#[test]
fn traces_that_are_too_big_or_not_text_are_named_by_line() {
    let huge = format!(
        "{}{{\"timestamp\": 9, \"input_length\": {}, \"output_length\": 1, \"hash_ids\": [1]}}\n",
        TRACE,
        u32::MAX
    );
    let path = file("huge-request.jsonl", huge.as_bytes());
    one_line_error(
        &kvc(&[
            "replay",
            "--trace",
            path.to_str().unwrap(),
            "--capacity-tokens",
            "1M",
        ]),
        &["line 3", "input_length", "limit of 1048576"],
    );
    let mut garbage = TRACE.as_bytes().to_vec();
    garbage.extend_from_slice(&[0x7f, 0x45, 0x4c, 0x46, 0xff, 0xfe, 0x00, 0x01, b'\n']);
    let path = file("garbage.jsonl", &garbage);
    one_line_error(
        &kvc(&[
            "replay",
            "--trace",
            path.to_str().unwrap(),
            "--capacity-tokens",
            "1M",
        ]),
        &["line 3", "not UTF-8"],
    );
    // A file with no newline at all: read up to the line limit, then refused.
    if Path::new("/dev/zero").exists() {
        one_line_error(
            &kvc(&["replay", "--trace", "/dev/zero", "--capacity-tokens", "1M"]),
            &["line 1", "longer than 4194304 bytes"],
        );
    }
}

#[test]
fn a_trace_scenario_with_nothing_to_serve_fails() {
    let path = file(
        "no-output.jsonl",
        b"{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 0, \"hash_ids\": [1]}\n",
    );
    one_line_error(
        &kvc(&[
            "scenario",
            "trace",
            "--size",
            "small",
            "--trace",
            path.to_str().unwrap(),
        ]),
        &["none of the first 1 requests"],
    );
}

#[test]
fn size_questions_without_an_answer_say_so() {
    one_line_error(
        &kvc(&[
            "size",
            "--model",
            "Llama-3-8B",
            "--gpu",
            "H100",
            "--tokens",
            "0",
        ]),
        &["--tokens must be at least 1"],
    );
    one_line_error(
        &kvc(&[
            "size",
            "--model",
            "Llama-3-8B",
            "--gpu",
            "H100",
            "--tokens",
            "2Gi",
        ]),
        &["--tokens 2147483648 is over the limit of 1073741824"],
    );
    one_line_error(
        &kvc(&[
            "size",
            "--model",
            "Llama-3-8B",
            "--gpu",
            "H100",
            "--gpus",
            "18446744073709551615",
        ]),
        &["--gpus", "limit of 1024"],
    );
    one_line_error(
        &kvc(&[
            "size",
            "--model",
            "Llama-3-70B",
            "--gpu",
            "H100",
            "--tokens",
            "32k",
        ]),
        &["do not fit", "would fit: --gpus 4"],
    );
    let text = succeeds(&kvc(&[
        "size",
        "--model",
        "Llama-3-70B",
        "--gpu",
        "H100",
        "--gpus",
        "8",
        "--tokens",
        "32Ki",
    ]));
    assert!(text.contains("40 sequences of 32768 tokens"), "{text}");
    let config = file("huge-config.json", &vec![b' '; (1 << 20) + 10]);
    one_line_error(
        &kvc(&[
            "size",
            "--model-config",
            config.to_str().unwrap(),
            "--gpu",
            "H100",
        ]),
        &["limit of 1048576 bytes"],
    );
}

#[test]
fn a_hugging_face_config_sizes_a_model() {
    // The fields of meta-llama/Meta-Llama-3-8B/config.json that set its size.
    let config = file(
        "llama-3-8b-config.json",
        br#"{"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
            "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256}"#,
    );
    let from_config = succeeds(&kvc(&[
        "size",
        "--model-config",
        config.to_str().unwrap(),
        "--gpu-memory",
        "80GB",
        "--tokens",
        "8k",
    ]));
    let built_in = succeeds(&kvc(&[
        "size",
        "--model",
        "Llama-3-8B",
        "--gpu",
        "H100",
        "--tokens",
        "8k",
    ]));
    let fits = |t: &str| t.lines().find(|l| l.contains("fits:")).unwrap().to_owned();
    assert_eq!(fits(&from_config), fits(&built_in));
    assert!(
        from_config.contains("128.0 KiB (131072 bytes)"),
        "{from_config}"
    );
}

#[test]
fn replay_help_lists_policies_and_hashers_and_bad_names_are_one_line() {
    let help = succeeds(&kvc(&["replay", "--help"]));
    for name in [
        "lru",
        "s3fifo",
        "conversation",
        "blake3",
        "xxh3",
        "[default: blake3]",
    ] {
        assert!(help.contains(name), "help should list {name}");
    }
    let trace = file("two-help.jsonl", TRACE.as_bytes());
    one_line_error(
        &kvc(&[
            "replay",
            "--trace",
            trace.to_str().unwrap(),
            "--capacity-tokens",
            "1k",
            "--policy",
            "mru",
        ]),
        &["'mru'", "lru, s3fifo, conversation"],
    );
}

#[test]
fn huge_or_zero_counts_for_shapes_cluster_and_analyze_are_one_line_errors() {
    // Each of these three once panicked with a capacity overflow.
    let out = kvc(&["shapes", "--requests", "18446744073709551615"]);
    one_line_error(&out, &["--requests", "limit"]);
    let out = kvc(&["shapes", "--requests", "0"]);
    one_line_error(&out, &["--requests", "at least 1"]);
    let trace = file("cluster.jsonl", TRACE.as_bytes());
    let t = trace.to_str().unwrap();
    let out = kvc(&[
        "scenario",
        "cluster",
        "--size",
        "small",
        "--trace",
        t,
        "--engines",
        "18446744073709551615",
    ]);
    one_line_error(&out, &["--engines", "limit"]);
    let out = kvc(&["analyze", "--trace", t, "--points", "18446744073709551615"]);
    one_line_error(&out, &["--points", "limit"]);
    // Zero was taken silently as something else.
    let out = kvc(&["analyze", "--trace", t, "--points", "0"]);
    one_line_error(&out, &["--points", "at least 1"]);
    let out = kvc(&["analyze", "--trace", t, "--block-size", "0"]);
    one_line_error(&out, &["block size", "at least 1"]);
}

#[test]
fn an_unknown_scenario_lists_every_scenario() {
    let out = kvc(&["scenario", "nope"]);
    one_line_error(&out, &["`nope`", "cluster", "tiers", "memory", "trace"]);
}

#[test]
fn a_bad_trace_line_names_the_file_in_every_subcommand() {
    let trace = file("bad-line.jsonl", b"{\"timestamp\": 0, \"input_length\": 1000, \"output_length\": 10, \"hash_ids\": [1, 2]}\n{oops\n");
    let t = trace.to_str().unwrap();
    let out = kvc(&["scenario", "trace", "--size", "small", "--trace", t]);
    one_line_error(&out, &["bad-line.jsonl", "line 2"]);
}

#[test]
fn the_tiers_scenario_takes_token_counts_with_suffixes_and_refuses_odds_outside_0_to_1() {
    let trace = file("tiers.jsonl", TRACE.as_bytes());
    let t = trace.to_str().unwrap();
    let tiers = |extra: &[&str]| {
        let mut args = vec!["scenario", "tiers", "--size", "small", "--trace", t];
        args.extend_from_slice(extra);
        kvc(&args)
    };
    // `100k` was refused as "invalid digit", unlike every other token count of the CLI.
    let out = tiers(&["--device-tokens", "1M", "--host-tokens", "100k", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&succeeds(&out)).unwrap();
    assert!(v["runs"].as_array().is_some_and(|r| !r.is_empty()), "{v}");
    // NaN odds ran as if no promotion could ever be planned.
    for odds in ["NaN", "1.5"] {
        let out = tiers(&["--promote", "--promote-min-odds", odds]);
        one_line_error(&out, &["--promote-min-odds", "between 0 and 1"]);
    }
}

#[test]
fn a_zero_parameter_model_and_a_trace_for_a_scenario_without_one_are_refused() {
    let out = kvc(&[
        "size",
        "--model",
        "Llama-3-8B",
        "--gpu",
        "H100",
        "--params",
        "0",
    ]);
    one_line_error(&out, &["at least one parameter"]);
    let trace = file("scenario.jsonl", TRACE.as_bytes());
    let out = kvc(&["scenario", "memory", "--trace", trace.to_str().unwrap()]);
    one_line_error(&out, &["--trace", "`memory`"]);
}
