//! The discrete-event serving simulator: the real scheduler, allocator, pin policy and reuse
//! index, with a [`CostModel`] in place of the GPU.
//!
//! Time advances by the cost of each planned step. Requests arrive at their times (follow-up
//! turns a think time after their predecessor finishes); sampled tokens come from
//! [`generated_token`], so a session's next turn can quote the answer it got.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};

use kvc_alloc::{BlockAllocator, BlockPool};
use kvc_core::{PinPolicy, QosClass, ReuseIndex, SeqId};
use kvc_sched::{Request, Scheduler, StepPlan};

use super::cost::CostModel;
use super::workload::{SimRequest, generated_token};

/// Latency percentiles of one QoS class, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct ClassLatency {
    /// The class's rank (0 = most important).
    pub qos: u8,
    /// The class's name in [`kvc_core::QosClasses::default`]: `critical`, `standard`,
    /// `best-effort` (or `qos#N` beyond them).
    pub name: String,
    /// Requests of the class that finished.
    pub finished: usize,
    /// Time to first token, p50.
    pub ttft_p50_ms: f64,
    /// Time to first token, p99.
    pub ttft_p99_ms: f64,
    /// Time between tokens, p50.
    pub tbt_p50_ms: f64,
    /// Time between tokens, p99.
    pub tbt_p99_ms: f64,
}

/// What a simulation measured.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct SimResult {
    /// Requests in the workload.
    pub requests: usize,
    /// Requests that finished.
    pub finished: usize,
    /// Requests refused.
    pub rejected: usize,
    /// Simulated seconds from the first arrival to the last finish.
    pub makespan_s: f64,
    /// Generated tokens per simulated second.
    pub throughput_tok_s: f64,
    /// Prompt tokens computed (prefill work), excluding cache hits.
    pub prefill_tokens: u64,
    /// Preemptions.
    pub preemptions: u64,
    /// Peak share of KV blocks in use.
    pub peak_kv_util: f64,
    /// Time-weighted mean share of KV blocks in use.
    pub mean_kv_util: f64,
    /// Running tokens / slots in use: the tokens of the running sequences over the token slots
    /// of every allocated block (cached blocks included), time-weighted.
    pub token_util: f64,
    /// Time-weighted mean of running sequences (admitted concurrency).
    pub mean_running: f64,
    /// Peak running sequences.
    pub peak_running: usize,
    /// Prompt tokens served from the cache over prompt tokens admitted.
    pub prefix_hit_rate: f64,
    /// Mean end-to-end latency per request (arrival to last token), in milliseconds.
    pub mean_latency_ms: f64,
    /// Latency per class, most important first.
    pub classes: Vec<ClassLatency>,
    /// Scheduler steps.
    pub steps: u64,
    /// Every time to first token per class rank, sorted (ms); for budgets and shares.
    #[serde(skip)]
    pub ttft_ms: Vec<Vec<f64>>,
}

/// The name of `class` in the default set of classes (`critical`, `standard`,
/// `best-effort`), or its rank as `qos#N` beyond them.
#[must_use]
pub fn class_name(class: QosClass) -> String {
    kvc_core::QosClasses::default()
        .name(class)
        .map_or_else(|| class.to_string(), str::to_owned)
}

/// Nearest-rank percentile of sorted values (0 for none).
#[must_use]
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A request due at a time; ordered by time, then index.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Due(f64, usize);

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

#[derive(Default)]
struct Track {
    arrival: f64,
    last_token: Option<f64>,
    stream: u64,
}

/// Simulates `workload` through `sched` until every request has finished or been refused, or
/// `max_steps` steps have run.
pub fn simulate<P: PinPolicy, R: ReuseIndex>(
    sched: &mut Scheduler<BlockPool, P, R>,
    workload: &[SimRequest],
    cost: &CostModel,
    max_steps: u64,
) -> SimResult {
    let n = workload.len();
    let total_blocks = sched.allocator().total_blocks() as f64;
    let block_size = f64::from(cost.layout.block_size());
    // Requests due, earliest first: first turns now, follow-ups when their predecessor ends.
    let mut pending: BinaryHeap<Reverse<Due>> = workload
        .iter()
        .enumerate()
        .filter(|(_, r)| r.after.is_none())
        .map(|(i, r)| Reverse(Due(r.arrival_s, i)))
        .collect();
    let mut followers: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, r) in workload.iter().enumerate() {
        if let Some(p) = r.after {
            followers.entry(p).or_default().push(i);
        }
    }
    let mut track: HashMap<SeqId, Track> = HashMap::new();
    let mut ttft: Vec<Vec<f64>> = Vec::new();
    let mut tbt: Vec<Vec<f64>> = Vec::new();
    let mut finished_by_class: Vec<usize> = Vec::new();
    let mut latency_sum = 0.0;
    let mut result = SimResult {
        requests: n,
        ..SimResult::default()
    };
    let Some(&Reverse(Due(mut t, _))) = pending.peek() else {
        return result;
    };
    let start = t;
    let (mut util_area, mut tok_area, mut run_area, mut time_area) = (0.0, 0.0, 0.0, 0.0);
    let mut plan = StepPlan::default();
    let mut new_tokens = Vec::new();
    let mut sampled = Vec::new();
    let mut done_count = 0usize;
    while result.steps < max_steps {
        // Arrivals up to now.
        while let Some(&Reverse(Due(at, i))) = pending.peek() {
            if at > t {
                break;
            }
            pending.pop();
            let r = &workload[i];
            let id = SeqId(i as u64);
            let req = Request {
                id,
                tenant: r.tenant,
                qos: r.qos,
                session: r.session,
                prompt: r.prompt.clone(),
                max_new_tokens: r.max_new_tokens,
                arrival_ms: (at * 1000.0) as u64,
            };
            if sched.submit(req).is_ok() {
                track.insert(
                    id,
                    Track {
                        arrival: at,
                        last_token: None,
                        stream: r.session.map_or(i as u64, |s| s.get()),
                    },
                );
            } else {
                result.rejected += 1;
                done_count += 1;
            }
        }
        if sched.is_idle() {
            match pending.peek() {
                Some(&Reverse(Due(next, _))) => {
                    t = next;
                    continue;
                }
                None => break,
            }
        }
        sched.step_into((t * 1000.0) as u64, &mut plan);
        result.steps += 1;
        result.rejected += plan.rejected.len();
        done_count += plan.rejected.len();
        if plan.is_empty() {
            // Everything waits (on a predecessor, or on memory held by nothing runnable):
            // jump to the next arrival, or stop.
            match pending.peek() {
                Some(&Reverse(Due(next, _))) if next > t => {
                    t = next;
                    continue;
                }
                _ => break,
            }
        }
        new_tokens.clear();
        new_tokens.extend(
            plan.seqs
                .iter()
                .map(|s| (s.positions.end - s.positions.start) as u32),
        );
        let dt = cost.step_seconds(&new_tokens, &plan.seq_lens);
        // Occupancy during the step.
        let stats = sched.allocator().stats();
        let used = stats.used() as f64;
        util_area += dt * used / total_blocks;
        let resident = sched.resident_tokens() as f64;
        if used > 0.0 {
            tok_area += dt * (resident / (used * block_size)).min(1.0);
        }
        run_area += dt * sched.num_running() as f64;
        time_area += dt;
        result.peak_kv_util = result.peak_kv_util.max(used / total_blocks);
        result.peak_running = result.peak_running.max(sched.num_running());
        result.prefill_tokens += plan
            .seqs
            .iter()
            .filter(|s| !s.samples || s.positions.end - s.positions.start > 1)
            .map(|s| s.positions.end - s.positions.start)
            .sum::<u64>();
        t += dt;

        sampled.clear();
        for s in plan.seqs.iter().filter(|s| s.samples) {
            let Some(tr) = track.get_mut(&s.seq) else {
                continue;
            };
            let class = s.qos.index();
            if ttft.len() <= class {
                ttft.resize(class + 1, Vec::new());
                tbt.resize(class + 1, Vec::new());
                finished_by_class.resize(class + 1, 0);
            }
            match tr.last_token {
                None => ttft[class].push((t - tr.arrival) * 1000.0),
                Some(last) => tbt[class].push((t - last) * 1000.0),
            }
            tr.last_token = Some(t);
            sampled.push((s.seq, generated_token(tr.stream, s.positions.end)));
        }
        let Ok(finished) = sched.complete_step(&sampled) else {
            break;
        };
        for f in finished {
            done_count += 1;
            result.finished += 1;
            let i = f.seq.get() as usize;
            if let Some(tr) = track.remove(&f.seq) {
                latency_sum += (t - tr.arrival) * 1000.0;
            }
            let class = workload[i].qos.index();
            if finished_by_class.len() <= class {
                finished_by_class.resize(class + 1, 0);
            }
            finished_by_class[class] += 1;
            for &next in followers.get(&i).map_or(&[][..], Vec::as_slice) {
                pending.push(Reverse(Due(t + workload[next].arrival_s, next)));
            }
        }
        if done_count >= n {
            break;
        }
    }
    let s = sched.stats();
    result.preemptions = s.preempted;
    result.prefix_hit_rate = if s.prompt_tokens == 0 {
        0.0
    } else {
        s.cached_tokens as f64 / s.prompt_tokens as f64
    };
    result.makespan_s = t - start;
    let generated: u64 = tbt.iter().map(|v| v.len() as u64).sum::<u64>()
        + ttft.iter().map(|v| v.len() as u64).sum::<u64>();
    result.throughput_tok_s = if result.makespan_s > 0.0 {
        generated as f64 / result.makespan_s
    } else {
        0.0
    };
    if time_area > 0.0 {
        result.mean_kv_util = util_area / time_area;
        result.token_util = tok_area / time_area;
        result.mean_running = run_area / time_area;
    }
    result.mean_latency_ms = if result.finished > 0 {
        latency_sum / result.finished as f64
    } else {
        0.0
    };
    for (class, (mut a, mut b)) in ttft.into_iter().zip(tbt).enumerate() {
        if a.is_empty() {
            continue; // no request of this class
        }
        a.sort_by(f64::total_cmp);
        b.sort_by(f64::total_cmp);
        result.classes.push(ClassLatency {
            qos: QosClass(class as u8).get(),
            name: class_name(QosClass(class as u8)),
            finished: finished_by_class.get(class).copied().unwrap_or(0),
            ttft_p50_ms: percentile(&a, 50.0),
            ttft_p99_ms: percentile(&a, 99.0),
            tbt_p50_ms: percentile(&b, 50.0),
            tbt_p99_ms: percentile(&b, 99.0),
        });
        if result.ttft_ms.len() <= class {
            result.ttft_ms.resize(class + 1, Vec::new());
        }
        result.ttft_ms[class] = a;
    }
    result
}
