//! The Prometheus endpoint, scraped over HTTP on loopback: the engine's families from a real
//! `kvc-bench engine --metrics-addr` run, and the router's from an in-process router.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use kvc_bench::metrics_export::{MetricsEndpoint, Sample, parse_exposition, scrape};
use kvc_route::{
    ChainHash, EngineId, Event, EventBody, KvIndex, RouteConfig, RouteRequest, Router, Scope,
    Stored, Tier,
};

fn value(samples: &[Sample], name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| label.is_none_or(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v)))
        .map(|s| s.value)
        .reduce(|a, b| a + b)
}

#[test]
fn the_engine_serves_its_metrics_over_http() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvc-bench"))
        .args([
            "engine",
            "--requests",
            "3",
            "--new-tokens",
            "3",
            "--metrics-addr",
            "127.0.0.1:0",
            "--metrics-linger-s",
            "60",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kvc-bench runs");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    stderr.read_line(&mut line).expect("first stderr line");
    let addr = line
        .trim()
        .strip_prefix("metrics: http://")
        .and_then(|a| a.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    // The run is over when its summary ("N requests in S s: ...") is printed on stdout,
    // after the model and pool lines.
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut summary = String::new();
    while !summary.contains(" requests in ") {
        summary.clear();
        let n = stdout.read_line(&mut summary).expect("stdout line");
        assert!(n > 0, "the engine ended without printing its summary");
    }
    let body = scrape(addr.as_str());
    let _ = child.kill();
    let _ = child.wait();
    let body = body.expect("scrape answers 200");
    let (types, samples) = parse_exposition(&body).expect("valid exposition text");
    let kind = |name: &str| {
        types
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, k)| k.as_str())
    };
    assert_eq!(kind("kvc_ttft_seconds"), Some("histogram"));
    assert_eq!(kind("kvc_tbt_seconds"), Some("histogram"));
    assert_eq!(kind("kvc_prompt_tokens_total"), Some("counter"));
    assert_eq!(kind("kvc_kv_region_utilisation"), Some("gauge"));
    // Three requests, each with one first token and two tokens after it.
    assert_eq!(value(&samples, "kvc_ttft_seconds_count", None), Some(3.0));
    assert_eq!(value(&samples, "kvc_tbt_seconds_count", None), Some(6.0));
    assert_eq!(
        value(&samples, "kvc_requests_finished_total", None),
        Some(3.0)
    );
    // Prompts of a 256-token system prompt and 64 tokens of their own.
    let prompt = value(&samples, "kvc_prompt_tokens_total", None).expect("prompt tokens");
    assert_eq!(prompt, 3.0 * 320.0);
    let cached = value(&samples, "kvc_prefix_cached_tokens_total", None).expect("cached");
    let hit = value(&samples, "kvc_prefix_hit_rate", None).expect("hit rate");
    assert!(
        (hit - cached / prompt).abs() < 1e-9,
        "{hit} vs {cached} / {prompt}"
    );
    let reuse = value(&samples, "kvc_reuse_rate", None).expect("reuse rate");
    assert!((0.0..=1.0).contains(&reuse));
    for cause in ["make_room", "preempt_recompute", "preempt_swap"] {
        assert!(value(&samples, "kvc_evictions_total", Some(("cause", cause))).is_some());
    }
    assert!(value(&samples, "kvc_preemptions_total", Some(("mode", "swap"))).is_some());
    for region in ["pinned", "dynamic"] {
        let u = value(
            &samples,
            "kvc_kv_region_utilisation",
            Some(("region", region)),
        )
        .expect("utilisation");
        assert!((0.0..=1.0).contains(&u));
    }
    // Critical requests (every third, class rank 0) have their own TTFT series.
    assert_eq!(
        value(&samples, "kvc_ttft_seconds_count", Some(("qos", "0"))),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, "kvc_ttft_seconds_count", Some(("qos", "1"))),
        Some(2.0)
    );
}

#[test]
fn routing_decisions_are_exported() {
    let endpoint = MetricsEndpoint::serve("127.0.0.1:0").expect("endpoint");
    let mut index = KvIndex::new(16);
    let hashes: Vec<ChainHash> = (1..=4).map(ChainHash).collect();
    let e = Event {
        engine: EngineId(3),
        seq: 1,
        time_ms: 0,
        body: EventBody::Stored(Stored {
            tier: Tier::Device,
            scope: Scope::default(),
            parent: None,
            block_size: 16,
            token_count: 64,
            hashes: hashes.clone(),
        }),
    };
    index.apply(&e, 0).expect("apply");
    let mut router = Router::new(index, RouteConfig::default()).expect("router");
    for _ in 0..5 {
        let d = router
            .route(&RouteRequest {
                scope: Scope::default(),
                hashes: &hashes,
            })
            .expect("route");
        assert_eq!(d.chosen.engine, EngineId(3));
    }
    let body = scrape(endpoint.local_addr()).expect("scrape");
    let (_, samples) = parse_exposition(&body).expect("valid text");
    assert_eq!(
        value(&samples, "kvc_route_decisions_total", Some(("engine", "3"))),
        Some(5.0)
    );
    assert_eq!(
        value(
            &samples,
            "kvc_route_cached_blocks_total",
            Some(("tier", "device"))
        ),
        Some(20.0)
    );
}
