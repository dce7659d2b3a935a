//! The QoS scenarios: pinning that holds under overload, with memory and compute reserved.
//!
//! - `qos-overload`: a steady critical stream and a best-effort surge of about twice the KV
//!   capacity; critical latency without pinning, with a static or adaptive memory reserve, and
//!   with the adaptive memory reserve plus the adaptive compute reserve.
//! - `qos-finance`: critical interactive questions with a 100 ms first-token budget against
//!   best-effort report generation; the share of questions answered within budget, with and
//!   without pinning.
//! - `qos-degradation`: critical load raised past its (bounded) reserves, to show what gives
//!   first: borrowing (memory from the dynamic region, step tokens from the unheld budget),
//!   then queueing, with the lowest class preempted for critical memory.

use kvc_alloc::{BlockPool, PoolConfig};
use kvc_core::NoReuse;
use kvc_pin::{
    AdaptiveConfig, AdaptiveReserve, OnExhausted, PinningPolicy, PolicyConfig, Reserve,
    SoftPinConfig, StaticReserve,
};
use kvc_sched::{
    AdaptiveShare, ClassShare, ComputeReserveConfig, ComputeStats, Scheduler, SchedulerConfig,
};
use serde::Serialize;

use super::engine::simulate;
use super::scenarios::{
    Deployment, Goal, ScenarioError, ScenarioReport, Size, Variant, pct, sched_config, setup,
};
use super::workload::{self, SimRequest};

/// How a variant's reservations acted: the memory policy's decisions and the compute
/// reserve's counters.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct QosCounters {
    /// Memory: allocations that borrowed dynamic blocks because the pinned region was full.
    pub mem_borrowed: u64,
    /// Memory: requests told to wait.
    pub mem_waits: u64,
    /// Memory: preemptions of a lower class the policy asked for.
    pub mem_preemptions: u64,
    /// Memory: downgrades (the lowest class capped).
    pub mem_downgrades: u64,
    /// The compute reserve's counters, when one was configured.
    pub compute: Option<ComputeCounters>,
}

/// The compute reserve's counters (see `kvc_sched::ComputeStats`) and its final share.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ComputeCounters {
    /// The critical class's share at the end of the run (tokens per step).
    pub final_share_tokens: usize,
    /// The reserve's counters (written flat into the JSON, beside the share).
    #[serde(flatten)]
    pub stats: ComputeStats,
}

/// A QoS variant: a pin policy, the pinned blocks it starts with, and an optional compute
/// reserve.
struct QosSetup {
    name: String,
    pinned: usize,
    policy: PinningPolicy,
    compute: Option<ComputeReserveConfig>,
}

fn run_variant(
    dep: &Deployment,
    cfg: SchedulerConfig,
    setup_: QosSetup,
    workload: &[SimRequest],
) -> Result<Variant, ScenarioError> {
    let block_size = cfg.block_size;
    let blocks = dep.blocks(block_size);
    // vLLM's default: keep 1% of the blocks for running sequences to grow into.
    let pool = BlockPool::new(
        PoolConfig::new(blocks as u64)
            .pinned(setup_.pinned as u64)
            .watermark(blocks as u64 / 100),
    )
    .map_err(setup)?;
    let mut sched =
        Scheduler::new(cfg, pool, setup_.policy, NoReuse { block_size }).map_err(setup)?;
    if let Some(compute) = setup_.compute {
        sched = sched.with_compute_reserve(compute).map_err(setup)?;
    }
    let cost = dep.cost(block_size)?;
    let result = simulate(&mut sched, workload, &cost, 2_000_000);
    let p = sched.pin_policy().stats();
    let compute = sched.compute_reserve().map(|c| ComputeCounters {
        final_share_tokens: c.share_tokens(kvc_core::QosClass::CRITICAL),
        stats: c.stats(),
    });
    Ok(Variant {
        name: setup_.name,
        blocks,
        block_size,
        result,
        workload_id: super::scenarios::workload_id(workload),
        qos: Some(QosCounters {
            mem_borrowed: p.borrowed,
            mem_waits: p.waits,
            mem_preemptions: p.preemptions,
            mem_downgrades: p.downgrades,
            compute,
        }),
    })
}

/// The policies of the QoS scenarios, for a pool of `blocks` blocks of `block_bytes` each.
struct Policies {
    blocks: usize,
    block_bytes: u64,
}

impl Policies {
    fn soft(&self) -> Result<SoftPinConfig, ScenarioError> {
        SoftPinConfig::new(self.block_bytes, self.blocks, 0.05).map_err(setup)
    }

    fn unpinned(&self) -> Result<PinningPolicy, ScenarioError> {
        PinningPolicy::new(PolicyConfig::unpinned(self.soft()?)).map_err(setup)
    }

    /// A reserved critical class; when the pinned region overflows and dynamic is full it does
    /// `on_exhausted`.
    fn pinned(
        &self,
        reserve: Reserve,
        on_exhausted: OnExhausted,
    ) -> Result<PinningPolicy, ScenarioError> {
        let mut c = PolicyConfig::new(reserve, self.soft()?);
        c.on_exhausted = on_exhausted;
        PinningPolicy::new(c).map_err(setup)
    }

    fn statik(&self, blocks: usize) -> Result<PinningPolicy, ScenarioError> {
        self.pinned(
            Reserve::Static(StaticReserve::blocks(blocks)),
            OnExhausted::PreemptLowest,
        )
    }

    /// The adaptive memory reserve (p99 of critical block demand + 25%), at most `max_blocks`.
    fn adaptive(
        &self,
        max_blocks: usize,
        on_exhausted: OnExhausted,
    ) -> Result<PinningPolicy, ScenarioError> {
        self.adaptive_at(0.99, 0.25, max_blocks, on_exhausted)
    }

    /// The adaptive memory reserve at `percentile` of critical block demand plus `headroom`
    /// (a fraction), at most `max_blocks`.
    fn adaptive_at(
        &self,
        percentile: f64,
        headroom: f64,
        max_blocks: usize,
        on_exhausted: OnExhausted,
    ) -> Result<PinningPolicy, ScenarioError> {
        let mut a = AdaptiveConfig::new(self.blocks);
        a.headroom_fraction = headroom;
        a.percentile = percentile;
        a.max_blocks = max_blocks;
        self.pinned(
            Reserve::Adaptive(Box::new(AdaptiveReserve::new(a).map_err(setup)?)),
            on_exhausted,
        )
    }
}

/// The adaptive compute reserve of the critical class, at most `max_tokens` per step.
fn compute_reserve(max_tokens: usize) -> ComputeReserveConfig {
    ComputeReserveConfig::new(vec![Some(ClassShare::Adaptive(AdaptiveShare {
        max_tokens,
        ..AdaptiveShare::default()
    }))])
}

/// Best-effort tokens per step while critical traffic is live, in `qos-finance`'s short-step
/// variants (of a 512-token step).
const SHORT_STEP_CAPS: [usize; 3] = [256, 64, 16];

/// The adaptive compute reserve, with best effort held to `tokens` a step while critical
/// traffic is live (it had work in the last second).
fn short_steps(tokens: usize) -> ComputeReserveConfig {
    let mut cfg = compute_reserve(usize::MAX);
    cfg.best_effort_tokens_while_live = Some(tokens);
    cfg
}

fn critical_p99(v: &Variant) -> f64 {
    v.result.classes.first().map_or(0.0, |c| c.ttft_p99_ms)
}

/// Share of the critical class's first tokens within `budget_ms`.
fn within(v: &Variant, budget_ms: f64) -> f64 {
    let Some(ttft) = v.result.ttft_ms.first() else {
        return 0.0;
    };
    if ttft.is_empty() {
        return 0.0;
    }
    ttft.iter().filter(|&&t| t <= budget_ms).count() as f64 / ttft.len() as f64
}

/// `qos-overload`: a steady critical stream, then a best-effort surge that offers about twice
/// what the GPU can hold; critical latency without pinning, with a static memory reserve of
/// 20% of the blocks, with the adaptive memory reserve, and with the adaptive memory reserve
/// plus the adaptive compute reserve.
pub fn qos_overload(size: Size) -> Result<ScenarioReport, ScenarioError> {
    let dep = Deployment::new("A100-80GB", "Llama-2-13B", 0.9)?;
    let bs = 16u32;
    let blocks = dep.blocks(bs);
    let (duration, surge) = match size {
        Size::Small => (12.0, (3.0, 8.0)),
        Size::Default => (60.0, (10.0, 40.0)),
        Size::Full => (240.0, (30.0, 180.0)),
    };
    let max_len = 4096;
    let critical_rate = 3.0;
    let surge_rate = 16.0;
    let alone = workload::qos_overload(critical_rate, 0.0, duration, surge, max_len, 7);
    let loaded = workload::qos_overload(critical_rate, surge_rate, duration, surge, max_len, 7);
    let pol = Policies {
        blocks,
        block_bytes: dep.cost(bs)?.layout.bytes_per_block(),
    };
    // Small prefill chunks (512 tokens a step) bound how long a critical request waits behind
    // best-effort prefill.
    let budget = 512;
    let cfg = || sched_config(bs, max_len, budget);
    let setups = [
        (
            "critical alone (no surge)",
            0,
            pol.unpinned()?,
            None,
            &alone,
        ),
        ("surge, no pinning", 0, pol.unpinned()?, None, &loaded),
        (
            "surge, static memory reserve 20%",
            blocks / 5,
            pol.statik(blocks / 5)?,
            None,
            &loaded,
        ),
        (
            "surge, adaptive memory reserve",
            0,
            pol.adaptive(usize::MAX, OnExhausted::PreemptLowest)?,
            None,
            &loaded,
        ),
        (
            "surge, adaptive compute reserve only",
            0,
            pol.unpinned()?,
            Some(compute_reserve(usize::MAX)),
            &loaded,
        ),
        (
            "surge, adaptive memory + compute reserve",
            0,
            pol.adaptive(usize::MAX, OnExhausted::PreemptLowest)?,
            Some(compute_reserve(usize::MAX)),
            &loaded,
        ),
        (
            "surge, adaptive memory (p90) + compute reserve",
            0,
            pol.adaptive_at(0.90, 0.0, usize::MAX, OnExhausted::PreemptLowest)?,
            Some(compute_reserve(usize::MAX)),
            &loaded,
        ),
    ];
    let mut variants = Vec::with_capacity(setups.len());
    for (name, pinned, policy, compute, w) in setups {
        let s = QosSetup {
            name: name.to_string(),
            pinned,
            policy,
            compute,
        };
        variants.push(run_variant(&dep, cfg(), s, w)?);
    }
    let unloaded = critical_p99(&variants[0]).max(1e-9);
    let none = critical_p99(&variants[1]);
    let x = |i: usize| critical_p99(&variants[i]) / unloaded;
    // The goals are judged on the adaptive compute reserve, which gets critical memory by
    // preempting best-effort work; the variants that also pin memory are quoted beside it.
    const GOAL: usize = 4;
    let best = critical_p99(&variants[GOAL]);
    let tput = |v: &Variant| v.result.throughput_tok_s;
    let tput_share = |i: usize| pct(tput(&variants[i]) / tput(&variants[1]).max(1e-9));
    let goals = vec![
        Goal {
            goal: "with adaptive reservation (the compute reserve; critical memory by \
                   preemption), critical p99 TTFT within 1.25x of unloaded"
                .into(),
            measured: format!(
                "{best:.0} ms vs {unloaded:.0} ms ({:.2}x; adaptive memory reserve alone {:.2}x, \
                 memory p99+25% with compute {:.2}x, memory p90 with compute {:.2}x)",
                x(GOAL),
                x(3),
                x(5),
                x(6)
            ),
            met: best <= 1.25 * unloaded,
        },
        Goal {
            goal: "without pinning, critical p99 TTFT degrades by more than 3x".into(),
            measured: format!("{none:.0} ms ({:.2}x)", none / unloaded),
            met: none > 3.0 * unloaded,
        },
        Goal {
            goal: "throughput with adaptive reservation (the compute reserve) >= 95% of without \
                   pinning"
                .into(),
            measured: format!(
                "{:.0} vs {:.0} tokens/s ({}; adaptive memory reserve alone {}, memory p99+25% \
                 with compute {}, memory p90 with compute {})",
                tput(&variants[GOAL]),
                tput(&variants[1]),
                tput_share(GOAL),
                tput_share(3),
                tput_share(5),
                tput_share(6)
            ),
            met: tput(&variants[GOAL]) >= 0.95 * tput(&variants[1]),
        },
    ];
    Ok(ScenarioReport {
        scenario: "qos-overload".into(),
        workload: format!(
            "critical: Poisson {critical_rate}/s for {duration} s (input ~400, output ~150 \
             tokens); best-effort surge: {surge_rate}/s from {} s to {} s (input ~800, output \
             ~400), about twice the KV capacity; {budget} tokens per step; seed 7",
            surge.0, surge.1
        ),
        machine: dep.machine(),
        variants,
        goals,
    })
}

/// The first-token budget of the finance example's interactive requests.
pub const FINANCE_TTFT_BUDGET_MS: f64 = 100.0;

/// `qos-finance`: critical interactive questions (short prompts and answers, a 100 ms
/// first-token budget) while best-effort report generation (long filings in, long reports
/// out) saturates the GPU; the share of questions answered within budget without pinning,
/// with the memory reserve, and with memory and compute reserved.
pub fn qos_finance(size: Size) -> Result<ScenarioReport, ScenarioError> {
    let dep = Deployment::new("A100-80GB", "Llama-2-13B", 0.9)?;
    let bs = 16u32;
    let blocks = dep.blocks(bs);
    let (duration, reports_from) = match size {
        Size::Small => (10.0, 2.0),
        Size::Default => (60.0, 5.0),
        Size::Full => (240.0, 10.0),
    };
    let max_len = 8192;
    let (critical_rate, report_rate) = (4.0, 3.0);
    let alone = workload::finance(critical_rate, 0.0, duration, reports_from, max_len, 17);
    let loaded = workload::finance(
        critical_rate,
        report_rate,
        duration,
        reports_from,
        max_len,
        17,
    );
    let pol = Policies {
        blocks,
        block_bytes: dep.cost(bs)?.layout.bytes_per_block(),
    };
    let budget = 512;
    let cfg = || sched_config(bs, max_len, budget);
    let setups = [
        (
            "questions alone (no reports)",
            pol.unpinned()?,
            None,
            &alone,
        ),
        ("reports, no pinning", pol.unpinned()?, None, &loaded),
        (
            "reports, adaptive memory reserve",
            pol.adaptive(usize::MAX, OnExhausted::PreemptLowest)?,
            None,
            &loaded,
        ),
        (
            "reports, adaptive memory + compute reserve",
            pol.adaptive(usize::MAX, OnExhausted::PreemptLowest)?,
            Some(compute_reserve(usize::MAX)),
            &loaded,
        ),
    ];
    let mut setups: Vec<_> = setups
        .into_iter()
        .map(|(name, policy, compute, w)| (name.to_string(), policy, compute, w))
        .collect();
    for cap in SHORT_STEP_CAPS {
        setups.push((
            format!("reports, memory + compute reserve, best effort <= {cap} tokens a step while critical is live"),
            pol.adaptive(usize::MAX, OnExhausted::PreemptLowest)?,
            Some(short_steps(cap)),
            &loaded,
        ));
    }
    let mut variants = Vec::with_capacity(setups.len());
    for (name, policy, compute, w) in setups {
        let s = QosSetup {
            name,
            pinned: 0,
            policy,
            compute,
        };
        variants.push(run_variant(&dep, cfg(), s, w)?);
    }
    let b = FINANCE_TTFT_BUDGET_MS;
    let share = |i: usize| within(&variants[i], b);
    let tput = |v: &Variant| v.result.throughput_tok_s;
    let goals = vec![
        Goal {
            goal: format!(
                "with memory + compute reserved, critical questions within the {b:.0} ms \
                 first-token budget as often as alone (within 1 point)"
            ),
            measured: format!(
                "{} pinned vs {} alone ({} without pinning, {} memory reserve only)",
                pct(share(3)),
                pct(share(0)),
                pct(share(1)),
                pct(share(2))
            ),
            met: share(3) + 0.01 >= share(0),
        },
        Goal {
            goal: "report throughput with reservation >= 95% of without pinning".into(),
            measured: format!(
                "{:.0} vs {:.0} tokens/s ({})",
                tput(&variants[3]),
                tput(&variants[1]),
                pct(tput(&variants[3]) / tput(&variants[1]).max(1e-9))
            ),
            met: tput(&variants[3]) >= 0.95 * tput(&variants[1]),
        },
        Goal {
            goal: format!(
                "with best effort held to short steps while critical traffic is live, critical \
                 questions within the {b:.0} ms budget as often as alone (within 1 point), at \
                 >= 95% of the report throughput without pinning"
            ),
            measured: (4..variants.len())
                .map(|i| {
                    format!(
                        "{} within budget at {:.0} tokens/s ({})",
                        pct(share(i)),
                        tput(&variants[i]),
                        SHORT_STEP_CAPS[i - 4]
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            met: (4..variants.len()).any(|i| {
                share(i) + 0.01 >= share(0) && tput(&variants[i]) >= 0.95 * tput(&variants[1])
            }),
        },
    ];
    Ok(ScenarioReport {
        scenario: "qos-finance".into(),
        workload: format!(
            "critical questions: Poisson {critical_rate}/s for {duration} s (input ~250, output \
             ~60 tokens), first-token budget {b:.0} ms; best-effort reports: {report_rate}/s from \
             {reports_from} s (input ~2,500, output ~600); {budget} tokens per step; seed 17"
        ),
        machine: dep.machine(),
        variants,
        goals,
    })
}

/// `qos-degradation`: the best-effort surge of `qos-overload` with the critical stream raised
/// step by step past reserves that are bounded (memory at most 5% of the pool, compute at
/// most 128 tokens a step), so the report shows the order in which the policy gives way.
///
/// Each rung runs twice: with the lowest class preempted when memory runs out
/// (`OnExhausted::PreemptLowest`), then capped instead (`OnExhausted::Downgrade`: the pin
/// policy halves the number of best-effort sequences allowed to run and loosens the cap as
/// memory recovers). The second goal checks that a cap never stops that class for good.
pub fn qos_degradation(size: Size) -> Result<ScenarioReport, ScenarioError> {
    let dep = Deployment::new("A100-80GB", "Llama-2-13B", 0.9)?;
    let bs = 16u32;
    let blocks = dep.blocks(bs);
    let (duration, surge) = match size {
        Size::Small => (8.0, (2.0, 6.0)),
        Size::Default => (40.0, (5.0, 30.0)),
        Size::Full => (120.0, (10.0, 100.0)),
    };
    let max_len = 4096;
    let surge_rate = 16.0;
    let pol = Policies {
        blocks,
        block_bytes: dep.cost(bs)?.layout.bytes_per_block(),
    };
    let (max_pinned, max_share) = (blocks / 20, 128);
    let budget = 512;
    let rates = [1.0, 3.0, 6.0, 12.0];
    let mut variants = Vec::with_capacity(2 * rates.len());
    for (on_exhausted, suffix) in [
        (OnExhausted::PreemptLowest, ""),
        (OnExhausted::Downgrade, ", downgrade"),
    ] {
        for rate in rates {
            let w = workload::qos_overload(rate, surge_rate, duration, surge, max_len, 7);
            let s = QosSetup {
                name: format!("critical {rate}/s{suffix}"),
                pinned: 0,
                policy: pol.adaptive(max_pinned, on_exhausted)?,
                compute: Some(compute_reserve(max_share)),
            };
            variants.push(run_variant(
                &dep,
                sched_config(bs, max_len, budget),
                s,
                w.as_slice(),
            )?);
        }
    }
    let downgraded = variants.split_off(rates.len());
    // The first rung at which each kind of degradation shows.
    let first = |f: &dyn Fn(&QosCounters) -> bool| {
        variants
            .iter()
            .position(|v| v.qos.as_ref().is_some_and(f))
            .unwrap_or(usize::MAX)
    };
    let borrow = first(&|q| {
        q.mem_borrowed > 0
            || q.compute
                .as_ref()
                .is_some_and(|c| c.stats.borrowed_tokens > 0)
    });
    // Queueing shows when the critical p99 TTFT passes 1.25x that of the lightest rung.
    let base = critical_p99(&variants[0]).max(1e-9);
    let queue = variants
        .iter()
        .position(|v| critical_p99(v) > 1.25 * base)
        .unwrap_or(usize::MAX);
    let rung = |i: usize| {
        rates
            .get(i)
            .map_or("never".to_string(), |r| format!("{r}/s"))
    };
    let p99s: Vec<String> = variants
        .iter()
        .map(|v| format!("{:.0} ms", critical_p99(v)))
        .collect();
    let served: Vec<String> = downgraded
        .iter()
        .map(|v| format!("{}/{}", v.result.finished, v.result.requests))
        .collect();
    let goals = vec![
        Goal {
            goal: "as critical load outgrows its reserves, it borrows first and queues (p99 TTFT \
                   above 1.25x the lightest rung's) only at a higher load"
                .into(),
            measured: format!(
                "borrowing from critical {}, queueing from critical {} (critical p99 {})",
                rung(borrow),
                rung(queue),
                p99s.join(", ")
            ),
            met: borrow != usize::MAX && borrow < queue,
        },
        Goal {
            goal: "capping best effort (Downgrade) instead of preempting it serves every request \
                   at every rung: the cap loosens as memory recovers"
                .into(),
            measured: format!(
                "finished / requests at critical {}: {}",
                rates.map(|r| format!("{r}/s")).join(", "),
                served.join(", ")
            ),
            met: downgraded
                .iter()
                .all(|v| v.result.finished == v.result.requests),
        },
    ];
    variants.extend(downgraded);
    Ok(ScenarioReport {
        scenario: "qos-degradation".into(),
        workload: format!(
            "critical: Poisson {} /s (one variant each) for {duration} s (input ~400, output \
             ~150); best-effort surge {surge_rate}/s from {} s to {} s; memory reserve at most \
             {max_pinned} blocks, compute share at most {max_share} of {budget} tokens a step; \
             when memory runs out the lowest class is preempted, or in the \"downgrade\" \
             variants capped; seed 7",
            rates.map(|r| r.to_string()).join(", "),
            surge.0,
            surge.1
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
    fn small_qos_scenarios_finish_and_are_deterministic() {
        for run in [qos_overload, qos_finance, qos_degradation] {
            let a = run(Size::Small).unwrap();
            let b = run(Size::Small).unwrap();
            for (x, y) in a.variants.iter().zip(&b.variants) {
                assert_eq!(x.result, y.result, "{}: {}", a.scenario, x.name);
                assert_eq!(
                    x.result.finished + x.result.rejected,
                    x.result.requests,
                    "{}: {}",
                    a.scenario,
                    x.name
                );
                assert!(x.qos.is_some());
            }
        }
    }

    #[test]
    fn the_compute_reserve_acts_under_the_surge() {
        let r = qos_overload(Size::Small).unwrap();
        let with = r.variants[6].qos.as_ref().unwrap();
        let c = with.compute.as_ref().unwrap().stats;
        assert!(c.steps > 0 && c.reserved_tokens > 0, "{c:?}");
        // Critical work ran ahead of best-effort work at least once.
        assert!(
            c.chunks_shrunk + c.chunks_deferred + c.decodes_deferred > 0,
            "{c:?}"
        );
        assert!(r.variants[1].qos.as_ref().unwrap().compute.is_none());
    }
}
