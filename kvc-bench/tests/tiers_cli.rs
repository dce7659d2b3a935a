//! `kvc-bench scenario tiers --json` end to end on the shared Mooncake trace: the host tier
//! raises the hit rate over the device cache alone, and the disk and shared tiers (on the
//! Redis server of `KVC_REDIS_URL`) serve hits of their own.
#![allow(clippy::print_stderr)]

use std::path::Path;
use std::process::Command;

fn trace() -> Option<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/traces/mooncake-conversation.jsonl");
    let alt =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/traces/mooncake-conversation.jsonl");
    [path, alt]
        .into_iter()
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
}

fn run(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_kvc-bench"))
        .args(["scenario", "tiers", "--json"])
        .args(args)
        .output()
        .expect("kvc-bench runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn rate(run: &serde_json::Value, tier: &str) -> f64 {
    run["hit_rate_per_tier"][tier].as_f64().expect("a rate")
}

#[test]
fn tiers_scenario_prints_json_with_hits_per_tier() {
    let Some(trace) = trace() else {
        eprintln!("skipped: ../shared/traces/mooncake-conversation.jsonl is absent");
        return;
    };
    // A small device and host so a short prefix of the trace reaches every tier.
    let small = [
        "--trace",
        &trace,
        "--requests",
        "150",
        "--device-tokens",
        "200000",
    ];
    let mut args = small.to_vec();
    args.extend(["--host-tokens", "2000000"]);
    let r = run(&args);
    assert_eq!(r["scenario"], "tiers");
    let runs = r["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2);
    let (base, tiered) = (&runs[0], &runs[1]);
    assert_eq!(rate(base, "host"), 0.0);
    assert!(rate(tiered, "host") > 0.0, "{tiered}");
    assert!(tiered["hit_rate"].as_f64() > base["hit_rate"].as_f64());
    assert!(tiered["pcie_s"].as_f64().expect("pcie") > 0.0);

    let mut args = small.to_vec();
    args.extend(["--host-tokens", "100000", "--disk-tokens", "2000000"]);
    let url = std::env::var("KVC_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty());
    match &url {
        Some(url) => args.extend(["--shared-url", url.as_str()]),
        None => {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "KVC_REDIS_URL is not set under CI=true; run the tests through cargo xtask test"
            );
            eprintln!("shared tier skipped: KVC_REDIS_URL is not set");
        }
    }
    let r = run(&args);
    let tiered = &r["runs"][1];
    assert!(rate(tiered, "disk") > 0.0, "{tiered}");
    assert!(tiered["demoted_blocks"].as_u64() > Some(0));
    if url.is_some() {
        assert_eq!(tiered["shared_unavailable_calls"], 0, "{tiered}");
        assert!(tiered["name"].as_str().unwrap_or("").contains("shared"));
    }
}
