//! The serving scenarios: each runs variants of kvc on one workload through the simulator and
//! reports them side by side, with the goal each scenario checks.
//!
//! - `memory`: contiguous max-length reservation against paging at block sizes 8/16/32.
//! - `qos-overload`, `qos-finance`, `qos-degradation`: memory and compute reservation for
//!   critical traffic under overload (in [`super::qos`]).
//! - `shared-prefix`: many questions over a few long documents, reuse off and on.
//! - `multi-turn`: chat sessions that resend the conversation each turn, reuse off and on.
//! - `trace`: a Mooncake-format trace replayed by its timestamps, reuse off and on.

use kvc_alloc::{BlockPool, PoolConfig};
use std::path::Path;

use kvc_core::{NoReuse, PinPolicy, ReuseIndex};
use kvc_reuse::{HashExtra, PolicyKind, PrefixCache, ScopedIndex, Xxh3Hasher};
use kvc_sched::{Scheduler, SchedulerConfig};
use serde::Serialize;
use thiserror::Error;

use super::cost::CostModel;
use super::engine::{SimResult, simulate};
use super::qos::{QosCounters, qos_degradation, qos_finance, qos_overload};
use super::workload::{self, SimRequest};
use crate::profiles::{self, GpuProfile, ModelProfile};
use crate::replay::synth_prompt;
use crate::trace::{TraceError, read_trace};

/// How big a run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// Seconds, for tests and smoke runs.
    Small,
    /// The default: stable figures in about a minute.
    Default,
    /// Long runs for the record.
    Full,
}

/// Why a scenario could not run.
#[derive(Clone, Debug, PartialEq, Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// No scenario has this name.
    #[error("unknown scenario `{name}` (known: {known})")]
    Unknown {
        /// The name given.
        name: String,
        /// The names known.
        known: String,
    },
    /// A building block refused its configuration (a bug in the scenario's settings).
    #[error("scenario setup failed: {0}")]
    Setup(String),
    /// The trace could not be read (or none was found).
    #[error("{0}")]
    Trace(String),
}

pub(super) fn setup<E: std::fmt::Display>(e: E) -> ScenarioError {
    ScenarioError::Setup(e.to_string())
}

/// One variant's results.
#[derive(Clone, Debug, Serialize)]
pub struct Variant {
    /// What differs in this variant.
    pub name: String,
    /// KV blocks in the pool and tokens per block.
    pub blocks: usize,
    /// Tokens per block.
    pub block_size: u32,
    /// The measurements.
    pub result: SimResult,
    /// How the QoS reservations acted (QoS scenarios only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qos: Option<QosCounters>,
    /// A fingerprint of the workload this variant ran: variants compare ("vs baseline") only
    /// with a variant of the same workload.
    #[serde(skip)]
    pub workload_id: u64,
}

/// A fingerprint of a workload (arrivals, classes, prompts, output lengths).
pub(crate) fn workload_id(workload: &[SimRequest]) -> u64 {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same workload gives the same id in every run.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    for r in workload {
        r.arrival_s.to_bits().hash(&mut h);
        (r.tenant, r.qos, r.session).hash(&mut h);
        (&r.prompt, r.max_new_tokens, r.after).hash(&mut h);
    }
    h.finish()
}

/// A goal of the scenario and whether this run met it.
#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    /// The goal, in words.
    pub goal: String,
    /// The measured figure, in words.
    pub measured: String,
    /// Whether it was met.
    pub met: bool,
}

/// A scenario's report: the variants side by side and the goals.
#[derive(Clone, Debug, Serialize)]
pub struct ScenarioReport {
    /// Scenario name.
    pub scenario: String,
    /// The workload, in words.
    pub workload: String,
    /// The simulated machine and model.
    pub machine: String,
    /// The variants.
    pub variants: Vec<Variant>,
    /// The goals.
    pub goals: Vec<Goal>,
}

/// The scenarios this module runs.
pub const SCENARIOS: &[&str] = &[
    "memory",
    "qos-overload",
    "qos-finance",
    "qos-degradation",
    "shared-prefix",
    "multi-turn",
    "trace",
];

/// The trace the `trace` scenario replays when none is given (see
/// [`crate::trace::DEFAULT_TRACE`]).
pub use crate::trace::DEFAULT_TRACE;

/// Runs a scenario by name; `trace` is the Mooncake file for the `trace` scenario (default
/// [`DEFAULT_TRACE`]).
pub fn run(name: &str, size: Size, trace: Option<&Path>) -> Result<ScenarioReport, ScenarioError> {
    match name {
        "memory" => memory(size),
        "qos-overload" => qos_overload(size),
        "qos-finance" => qos_finance(size),
        "qos-degradation" => qos_degradation(size),
        "shared-prefix" => shared_prefix(size),
        "multi-turn" => multi_turn(size),
        "trace" => trace_replay(size, trace),
        _ => Err(ScenarioError::Unknown {
            name: name.to_string(),
            known: SCENARIOS.join(", "),
        }),
    }
}

/// The simulated deployment: a GPU, a model, and the KV blocks left after the weights.
pub(super) struct Deployment {
    gpu: GpuProfile,
    model: ModelProfile,
    kv_tokens: u64,
}

impl Deployment {
    pub(super) fn new(gpu: &str, model: &str, utilisation: f64) -> Result<Self, ScenarioError> {
        let gpu = *profiles::gpu(gpu).ok_or_else(|| setup(format!("no GPU {gpu}")))?;
        let model = *profiles::model(model).ok_or_else(|| setup(format!("no model {model}")))?;
        let layout = model.kv_layout(1, kvc_core::DType::BF16).map_err(setup)?;
        let bytes = profiles::kv_capacity_bytes(&gpu, &model, utilisation)
            .ok_or_else(|| setup("weights do not fit"))?;
        Ok(Self {
            gpu,
            model,
            kv_tokens: bytes / layout.bytes_per_token(),
        })
    }

    pub(super) fn machine(&self) -> String {
        format!(
            "{} serving {} (simulated: roofline cost model), {} KV tokens",
            self.gpu.name, self.model.name, self.kv_tokens
        )
    }

    pub(super) fn blocks(&self, block_size: u32) -> usize {
        (self.kv_tokens / u64::from(block_size)) as usize
    }

    pub(super) fn cost(&self, block_size: u32) -> Result<CostModel, ScenarioError> {
        CostModel::new(self.gpu, self.model, block_size).map_err(setup)
    }
}

/// Scheduler limits of the simulated engine: `max_batch_tokens` new tokens per step (prefill
/// chunks plus decodes).
pub(super) fn sched_config(
    block_size: u32,
    max_model_len: u64,
    max_batch_tokens: usize,
) -> SchedulerConfig {
    SchedulerConfig {
        block_size,
        max_running: 256,
        max_batch_tokens,
        max_model_len,
        num_classes: 3,
        aging_ms: Some(30_000),
        eos_token: None,
        host_blocks: 0,
        session_truncation: None,
        session_context: None,
    }
}

/// Runs one variant: a fresh pool, policy and index over the workload.
fn variant<P: PinPolicy, R: ReuseIndex>(
    name: &str,
    dep: &Deployment,
    cfg: SchedulerConfig,
    pinned: usize,
    pin: P,
    reuse: R,
    workload: &[SimRequest],
) -> Result<Variant, ScenarioError> {
    let block_size = cfg.block_size;
    let blocks = dep.blocks(block_size);
    // vLLM's default: keep 1% of the blocks for running sequences to grow into.
    let watermark = blocks as u64 / 100;
    let pool = BlockPool::new(
        PoolConfig::new(blocks as u64)
            .pinned(pinned as u64)
            .watermark(watermark),
    )
    .map_err(setup)?;
    let mut sched = Scheduler::new(cfg, pool, pin, reuse).map_err(setup)?;
    let cost = dep.cost(block_size)?;
    let result = simulate(&mut sched, workload, &cost, 2_000_000);
    Ok(Variant {
        name: name.to_string(),
        blocks,
        block_size,
        result,
        qos: None,
        workload_id: workload_id(workload),
    })
}

pub(super) fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// `memory`: how much of the KV memory holds real tokens, and how many requests run at once,
/// when each request reserves the maximum length contiguously versus when KV is paged.
///
/// The contiguous baseline is paging with one block of the maximum length per request, which
/// is exactly a max-length reservation; it ignores the external fragmentation a real
/// contiguous allocator adds, so it flatters the baseline.
pub fn memory(size: Size) -> Result<ScenarioReport, ScenarioError> {
    let dep = Deployment::new("A100-80GB", "Llama-2-13B", 0.9)?;
    let max_len = 2048;
    let n = match size {
        Size::Small => 60,
        Size::Default => 1_000,
        Size::Full => 5_000,
    };
    // Arrivals fast enough that memory, not arrivals, bounds concurrency.
    let workload = workload::sharegpt(n, 50.0, max_len, 42);
    let mut variants = vec![variant(
        "contiguous (max-length reservation)",
        &dep,
        sched_config(max_len as u32, max_len, 8192),
        0,
        kvc_sched::DynamicOnly::default(),
        NoReuse {
            block_size: max_len as u32,
        },
        &workload,
    )?];
    for bs in [8u32, 16, 32] {
        variants.push(variant(
            &format!("paged, block {bs}"),
            &dep,
            sched_config(bs, max_len, 8192),
            0,
            kvc_sched::DynamicOnly::default(),
            NoReuse { block_size: bs },
            &workload,
        )?);
    }
    let b16 = &variants[2].result;
    let base = &variants[0].result;
    let goals = vec![
        Goal {
            goal: "paged at block 16 keeps running tokens / slots in use >= 97%".into(),
            measured: pct(b16.token_util),
            met: b16.token_util >= 0.97,
        },
        Goal {
            goal: "contiguous reservation wastes most of its memory: running tokens / slots in use < 50% (vLLM paper: 20.4-38.2%)"
                .into(),
            measured: pct(base.token_util),
            met: base.token_util < 0.5,
        },
        Goal {
            goal: "paging admits more concurrent requests than contiguous reservation".into(),
            measured: format!(
                "mean running {:.1} vs {:.1} ({:.2}x)",
                b16.mean_running,
                base.mean_running,
                b16.mean_running / base.mean_running.max(1e-9)
            ),
            met: b16.mean_running > base.mean_running,
        },
    ];
    Ok(ScenarioReport {
        scenario: "memory".into(),
        workload: format!(
            "{n} ShareGPT-like requests (log-normal lengths, input mean 161, output mean 338 \
             tokens, max 2,048), Poisson arrivals at 50/s, seed 42"
        ),
        machine: dep.machine(),
        variants,
        goals,
    })
}

/// The prefix cache of the reuse-on variants: LRU, fast hashing, one namespace.
fn prefix_index(block_size: u32, model: &str) -> ScopedIndex<Xxh3Hasher> {
    ScopedIndex::new(
        PrefixCache::new(block_size, PolicyKind::Lru),
        Xxh3Hasher,
        HashExtra::new(model, 1),
    )
}

/// Runs `workload` with reuse off and on; everything else equal.
fn reuse_pair(
    dep: &Deployment,
    cfg: SchedulerConfig,
    workload: &[SimRequest],
) -> Result<Vec<Variant>, ScenarioError> {
    let bs = cfg.block_size;
    Ok(vec![
        variant(
            "reuse off",
            dep,
            cfg.clone(),
            0,
            kvc_sched::DynamicOnly::default(),
            NoReuse { block_size: bs },
            workload,
        )?,
        variant(
            "reuse on (prefix cache, LRU)",
            dep,
            cfg,
            0,
            kvc_sched::DynamicOnly::default(),
            prefix_index(bs, dep.model.name),
            workload,
        )?,
    ])
}

fn ratio_goal(goal: &str, measured: String, met: bool) -> Goal {
    Goal {
        goal: goal.into(),
        measured,
        met,
    }
}

/// `shared-prefix`: questions over a few long documents (retrieval-augmented chat), with the
/// prefix cache off and on.
pub fn shared_prefix(size: Size) -> Result<ScenarioReport, ScenarioError> {
    let dep = Deployment::new("H100", "Llama-3-8B", 0.9)?;
    let n = match size {
        Size::Small => 40,
        Size::Default => 1_000,
        Size::Full => 5_000,
    };
    let (docs, doc_len, question, output, rate) = (8, 4_000, 64, 128, 40.0);
    let workload = workload::shared_prefix(n, rate, docs, doc_len, question, output, 11);
    let variants = reuse_pair(&dep, sched_config(16, 8_192, 8_192), &workload)?;
    let (off, on) = (&variants[0].result, &variants[1].result);
    let saved = 1.0 - on.prefill_tokens as f64 / off.prefill_tokens.max(1) as f64;
    let speedup = on.throughput_tok_s / off.throughput_tok_s.max(1e-9);
    let goals = vec![
        ratio_goal(
            "reuse cuts prefill compute by >= 50%",
            format!(
                "{} of {} prompt tokens computed ({} less)",
                on.prefill_tokens,
                off.prefill_tokens,
                pct(saved)
            ),
            saved >= 0.5,
        ),
        ratio_goal(
            "reuse gives 2-3x throughput",
            format!(
                "{:.0} vs {:.0} tokens/s ({speedup:.2}x)",
                on.throughput_tok_s, off.throughput_tok_s
            ),
            speedup >= 2.0,
        ),
    ];
    Ok(ScenarioReport {
        scenario: "shared-prefix".into(),
        workload: format!(
            "{n} questions ({question} tokens, {output} generated) over {docs} documents of {doc_len} tokens, Poisson arrivals at {rate}/s, seed 11"
        ),
        machine: dep.machine(),
        variants,
        goals,
    })
}

/// `multi-turn`: chat sessions whose every turn resends the conversation so far, with reuse
/// off and on.
pub fn multi_turn(size: Size) -> Result<ScenarioReport, ScenarioError> {
    let dep = Deployment::new("H100", "Llama-3-8B", 0.9)?;
    let sessions = match size {
        Size::Small => 6,
        Size::Default => 150,
        Size::Full => 600,
    };
    let (turns, message, output, think, rate) = (6, 400, 200, 5.0, 2.0);
    let workload = workload::multi_turn(sessions, turns, rate, message, output, think, 13);
    let variants = reuse_pair(&dep, sched_config(16, 8_192, 8_192), &workload)?;
    let (off, on) = (&variants[0].result, &variants[1].result);
    let lower = 1.0 - on.mean_latency_ms / off.mean_latency_ms.max(1e-9);
    let goals = vec![ratio_goal(
        "session reuse lowers per-turn latency by 30-60%",
        format!(
            "mean turn latency {:.0} ms vs {:.0} ms ({} lower)",
            on.mean_latency_ms,
            off.mean_latency_ms,
            pct(lower)
        ),
        lower >= 0.3,
    )];
    Ok(ScenarioReport {
        scenario: "multi-turn".into(),
        workload: format!(
            "{sessions} sessions of {turns} turns ({message}-token messages, {output}-token answers, {think} s think time), sessions start at {rate}/s, seed 13"
        ),
        machine: dep.machine(),
        variants,
        goals,
    })
}

/// Finds the trace: the given path, or [`DEFAULT_TRACE`] from the working directory or the
/// repository root.
fn locate_trace(given: Option<&Path>) -> Result<std::path::PathBuf, ScenarioError> {
    if let Some(path) = given {
        return Ok(path.to_path_buf());
    }
    crate::trace::find_default_trace().ok_or_else(|| {
        ScenarioError::Trace(format!(
            "no trace at {DEFAULT_TRACE}; pass --trace PATH (a Mooncake-format JSONL file; \
             the README says where to get the Mooncake conversation trace)"
        ))
    })
}

/// Arrivals of the `trace` scenario are stretched by this factor: the conversation trace at its
/// own pace offers several times the prefill one simulated H200 computes (at 2.5x the queue
/// still grew for the whole run and preemptions recomputed 12k-token prompts), and a run that
/// only measures a growing queue says little about the cache.
pub const TRACE_TIME_SCALE: f64 = 6.0;

/// `trace`: a Mooncake-format trace replayed by its timestamps (prompt tokens synthesised from
/// the hash ids, so equal ids share a prefix), reuse off and on.
pub fn trace_replay(size: Size, trace: Option<&Path>) -> Result<ScenarioReport, ScenarioError> {
    let path = locate_trace(trace)?;
    let requests = read_trace(&path).map_err(|e| {
        ScenarioError::Trace(match e {
            // Its message already names the file.
            TraceError::Io { .. } => e.to_string(),
            other => format!("{}: {other}", path.display()),
        })
    })?;
    let n = match size {
        Size::Small => 100,
        Size::Default => 1_500,
        Size::Full => usize::MAX,
    }
    .min(requests.len());
    let dep = Deployment::new("H200", "Llama-3-8B", 0.9)?;
    let max_len = 131_072;
    let mut prompt = Vec::new();
    let workload: Vec<SimRequest> = requests[..n]
        .iter()
        .filter(|r| u64::from(r.input_length) + u64::from(r.output_length) <= max_len)
        .filter(|r| r.input_length > 0 && r.output_length > 0)
        .map(|r| {
            prompt.clear();
            synth_prompt(r, &mut prompt);
            SimRequest {
                arrival_s: r.timestamp_ms as f64 / 1000.0 * TRACE_TIME_SCALE,
                tenant: kvc_core::TenantId(0),
                qos: kvc_core::QosClass::STANDARD,
                session: None,
                prompt: prompt.clone(),
                max_new_tokens: r.output_length,
                after: None,
            }
        })
        .collect();
    if workload.is_empty() {
        return Err(ScenarioError::Trace(format!(
            "none of the first {n} requests of {} can be served: each needs at least 1 prompt \
             and 1 output token and at most {max_len} tokens in all",
            path.display()
        )));
    }
    let cfg = sched_config(16, max_len, 8_192);
    let mut variants = reuse_pair(&dep, cfg.clone(), &workload)?;
    // The policy recommended for unknown traffic, through the same scheduler: it learns
    // from each request's prompt, which the memory manager offers it once.
    let adaptive = ScopedIndex::new(
        PrefixCache::with_capacity(16, PolicyKind::Adaptive, dep.blocks(16)),
        Xxh3Hasher,
        HashExtra::new(dep.model.name, 1),
    );
    let learned = variant(
        "reuse on (prefix cache, adaptive)",
        &dep,
        cfg,
        0,
        kvc_sched::DynamicOnly::default(),
        adaptive,
        &workload,
    )?;
    variants.push(learned);
    let (off, on) = (&variants[0].result, &variants[1].result);
    let goals = vec![ratio_goal(
        "reuse on serves part of the prompts from the cache and finishes sooner",
        format!(
            "hit rate {}, makespan {:.1} s vs {:.1} s",
            pct(on.prefix_hit_rate),
            on.makespan_s,
            off.makespan_s
        ),
        // "Sooner" is strict: equal makespans do not meet it.
        on.prefix_hit_rate > 0.0 && on.makespan_s < off.makespan_s,
    )];
    Ok(ScenarioReport {
        scenario: "trace".into(),
        workload: format!(
            "the first {} requests of {} (Mooncake format; prompts synthesised from hash ids), arrivals at their timestamps stretched {TRACE_TIME_SCALE}x",
            workload.len(),
            path.display()
        ),
        machine: dep.machine(),
        variants,
        goals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_scenarios_are_named_errors() {
        assert!(matches!(
            run("nope", Size::Small, None),
            Err(ScenarioError::Unknown { .. })
        ));
        let missing = Path::new("/nonexistent/trace.jsonl");
        assert!(matches!(
            run("trace", Size::Small, Some(missing)),
            Err(ScenarioError::Trace(_))
        ));
    }

    #[test]
    fn a_trace_with_nothing_to_serve_is_an_error() {
        let path = std::env::temp_dir().join(format!(
            "kvc-bench-nothing-to-serve-{}.jsonl",
            std::process::id()
        ));
        // Zero output tokens, and a prompt over the scenario's 131,072-token context.
        let ids: Vec<String> = (1..=275).map(|i| i.to_string()).collect();
        std::fs::write(
            &path,
            format!(
                "{{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 0, \"hash_ids\": [1]}}\n\
                 {{\"timestamp\": 1, \"input_length\": 140000, \"output_length\": 1, \"hash_ids\": [{}]}}\n",
                ids.join(",")
            ),
        )
        .unwrap();
        let result = trace_replay(Size::Small, Some(&path));
        let _ = std::fs::remove_file(&path);
        match result {
            Err(ScenarioError::Trace(msg)) => {
                assert!(msg.contains("none of the first 2 requests"), "{msg}");
                assert!(msg.contains("131072"), "{msg}");
            }
            other => panic!("expected a trace error, got {other:?}"),
        }
    }

    #[test]
    fn small_memory_scenario_runs_every_request() {
        let r = memory(Size::Small).unwrap();
        assert_eq!(r.variants.len(), 4);
        for v in &r.variants {
            assert_eq!(v.result.finished, 60, "{}", v.name);
            assert!(v.result.token_util > 0.0 && v.result.token_util <= 1.0);
        }
        // Paging keeps more of its memory busy with real tokens than reservation does.
        assert!(r.variants[2].result.token_util > r.variants[0].result.token_util);
    }

    #[test]
    fn small_reuse_scenarios_hit_and_save_prefill() {
        for report in [
            shared_prefix(Size::Small).unwrap(),
            multi_turn(Size::Small).unwrap(),
        ] {
            let (off, on) = (&report.variants[0].result, &report.variants[1].result);
            assert_eq!(off.finished, off.requests, "{}", report.scenario);
            assert_eq!(on.finished, on.requests, "{}", report.scenario);
            assert_eq!(off.prefix_hit_rate, 0.0);
            assert!(
                on.prefix_hit_rate > 0.2,
                "{}: {}",
                report.scenario,
                on.prefix_hit_rate
            );
            assert!(on.prefill_tokens < off.prefill_tokens);
        }
    }

    #[test]
    fn small_trace_scenario_runs_when_the_trace_is_present() {
        match trace_replay(Size::Small, None) {
            Ok(report) => {
                let on = &report.variants[1].result;
                assert_eq!(on.finished + on.rejected, on.requests);
                assert!(on.prefix_hit_rate > 0.0);
            }
            Err(ScenarioError::Trace(msg)) => {
                // The shared trace is not in this checkout; the error says what to do. Under
                // CI a missing trace is a failure: a skip CI cannot see is a test never run.
                assert!(msg.contains("--trace"), "{msg}");
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "CI=true but the Mooncake trace is missing: {msg}"
                );
            }
            Err(e) => panic!("{e}"),
        }
    }
}
