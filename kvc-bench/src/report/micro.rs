//! Quick in-process micro-benchmarks: the allocator's allocate+release pair, prefix-cache
//! hash+lookup, and one scheduler step with 256 decoding sequences. Each is timed with
//! [`Instant`] over batches of iterations and reported as the median batch's time per
//! iteration — a quick measurement, not criterion's statistics (`cargo xtask bench
//! --criterion` runs those).

use std::hint::black_box;
use std::time::Instant;

use kvc_alloc::{BlockPool, PoolConfig};
use kvc_core::{BlockAllocator, BlockId, NoReuse, QosClass, RegionId, SeqId, TenantId};
use kvc_reuse::{BlockHasher, HashExtra, HasherKind, PolicyKind, PrefixCache};
use kvc_sched::{DynamicOnly, Request, Scheduler, SchedulerConfig, StepPlan};
use serde::Serialize;

use super::ReportError;

/// One quick measurement.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MicroResult {
    /// What was measured.
    pub name: String,
    /// Median time per iteration over the batches, in nanoseconds.
    pub median_ns: f64,
    /// Fastest batch's time per iteration, in nanoseconds.
    pub min_ns: f64,
    /// Batches timed.
    pub batches: usize,
    /// Iterations per batch.
    pub iters: usize,
}

/// Times `batches` batches of `iters` calls of `f` (after one warm-up batch) and returns the
/// median and minimum time per call, in nanoseconds.
fn time_batches<E>(
    batches: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<(), E>,
) -> Result<(f64, f64), E> {
    let iters = iters.max(1);
    for _ in 0..iters {
        f()?;
    }
    let mut per_iter = Vec::with_capacity(batches.max(1));
    for _ in 0..batches.max(1) {
        let start = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        per_iter.push(start.elapsed().as_secs_f64() * 1e9 / iters as f64);
    }
    per_iter.sort_by(f64::total_cmp);
    Ok((per_iter[per_iter.len() / 2], per_iter[0]))
}

fn micro_err<E: std::fmt::Display>(bench: &'static str) -> impl Fn(E) -> ReportError {
    move |e| ReportError::Micro {
        bench,
        message: e.to_string(),
    }
}

/// How much to measure: batches, and a scale on the iterations per batch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MicroBudget {
    pub(crate) batches: usize,
    pub(crate) scale: f64,
}

impl MicroBudget {
    fn iters(self, base: usize) -> usize {
        ((base as f64 * self.scale) as usize).max(1)
    }
}

/// Runs every quick micro-benchmark.
pub(crate) fn run(budget: MicroBudget) -> Result<Vec<MicroResult>, ReportError> {
    let mut out = Vec::new();
    out.push(alloc_pair(budget)?);
    out.extend(prefix_lookup(budget)?);
    out.push(sched_step(budget)?);
    Ok(out)
}

fn result(name: &str, budget: MicroBudget, iters: usize, (median, min): (f64, f64)) -> MicroResult {
    MicroResult {
        name: name.to_string(),
        median_ns: median,
        min_ns: min,
        batches: budget.batches,
        iters,
    }
}

fn alloc_pair(budget: MicroBudget) -> Result<MicroResult, ReportError> {
    const BENCH: &str = "allocator pair";
    let mut pool = BlockPool::new(PoolConfig::new(4096)).map_err(micro_err(BENCH))?;
    let iters = budget.iters(200_000);
    let t = time_batches(budget.batches, iters, || {
        let block = pool
            .allocate(black_box(RegionId::DYNAMIC))
            .map_err(micro_err(BENCH))?;
        let _ = black_box(pool.release(black_box(block)).map_err(micro_err(BENCH))?);
        Ok::<(), ReportError>(())
    })?;
    Ok(result(
        "kvc-alloc: allocate + release one block (pool of 4,096)",
        budget,
        iters,
        t,
    ))
}

/// Hash + lookup of a fully cached 32k-token prompt (16-token blocks) with each hasher, and
/// the lookup alone.
fn prefix_lookup(budget: MicroBudget) -> Result<Vec<MicroResult>, ReportError> {
    const BENCH: &str = "prefix lookup";
    const TOKENS: usize = 32 * 1024;
    const BS: u32 = 16;
    let tokens: Vec<u32> = (0..TOKENS as u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % 128_000)
        .collect();
    let extra = HashExtra::new("kvc-report", 1);
    let mut out = Vec::new();
    let mut last = None;
    for hasher in HasherKind::ALL {
        let root = hasher.root(&extra);
        let mut hashes = Vec::with_capacity(TOKENS / BS as usize);
        hasher.hash_blocks(root, &tokens, BS as usize, &mut hashes);
        let blocks: Vec<BlockId> = (0..hashes.len() as u32).map(BlockId).collect();
        let mut cache = PrefixCache::new(BS, PolicyKind::Lru);
        cache
            .insert(&hashes, &blocks, 0, &mut Vec::new())
            .map_err(micro_err(BENCH))?;
        let iters = budget.iters(40);
        let mut scratch = Vec::with_capacity(hashes.len());
        let t = time_batches(budget.batches, iters, || {
            scratch.clear();
            hasher.hash_blocks(root, black_box(&tokens), BS as usize, &mut scratch);
            let hit = cache.lookup(&scratch, tokens.len(), 1);
            cache.release(&hit.blocks).map_err(micro_err(BENCH))?;
            black_box(hit.tokens);
            Ok::<(), ReportError>(())
        })?;
        out.push(result(
            &format!(
                "kvc-reuse: hash ({}) + lookup of a cached 32k-token prompt (2,048 blocks)",
                hasher.name()
            ),
            budget,
            iters,
            t,
        ));
        last = Some((cache, hashes));
    }
    if let Some((mut cache, hashes)) = last {
        let iters = budget.iters(200);
        let t = time_batches(budget.batches, iters, || {
            let hit = cache.lookup(black_box(&hashes), TOKENS, 1);
            cache.release(&hit.blocks).map_err(micro_err(BENCH))?;
            black_box(hit.tokens);
            Ok::<(), ReportError>(())
        })?;
        out.push(result(
            "kvc-reuse: lookup only (hashes given), 2,048 cached blocks",
            budget,
            iters,
            t,
        ));
    }
    Ok(out)
}

/// One scheduler step with 256 running sequences in decode; a finished sequence is replaced by
/// a new request, so the batch stays full.
fn sched_step(budget: MicroBudget) -> Result<MicroResult, ReportError> {
    const BENCH: &str = "scheduler step";
    let cfg = SchedulerConfig {
        block_size: 16,
        max_running: 256,
        max_batch_tokens: 1 << 20,
        max_model_len: 4096,
        ..SchedulerConfig::default()
    };
    let pool = BlockPool::new(PoolConfig::new(1 << 16)).map_err(micro_err(BENCH))?;
    let mut sched = Scheduler::new(
        cfg,
        pool,
        DynamicOnly::default(),
        NoReuse { block_size: 16 },
    )
    .map_err(micro_err(BENCH))?;
    let request = |i: u64| Request {
        id: SeqId(i),
        tenant: TenantId(0),
        qos: QosClass((i % 3) as u8),
        session: None,
        prompt: vec![1; 500 + (i as usize * 37) % 1500],
        max_new_tokens: 1000 + (i as u32 * 53) % 1000,
        arrival_ms: i,
    };
    for i in 0..256u64 {
        sched.submit(request(i)).map_err(micro_err(BENCH))?;
    }
    let mut next_id = 256u64;
    let mut now = 0u64;
    let mut sampled: Vec<(SeqId, u32)> = Vec::with_capacity(256);
    let mut plan = StepPlan::default();
    let mut step = |sched: &mut Scheduler<_, _, _>| -> Result<(), ReportError> {
        now += 1;
        sched.step_into(now, &mut plan);
        sampled.clear();
        sampled.extend(plan.seqs.iter().filter(|s| s.samples).map(|s| (s.seq, 5)));
        let done = sched.complete_step(&sampled).map_err(micro_err(BENCH))?;
        for _ in &done {
            sched.submit(request(next_id)).map_err(micro_err(BENCH))?;
            next_id += 1;
        }
        black_box((plan.num_tokens(), done));
        Ok(())
    };
    // The first step prefills every prompt; from then on every step decodes 256 sequences.
    step(&mut sched)?;
    let running = sched.num_running();
    let iters = budget.iters(500);
    let t = time_batches(budget.batches, iters, || step(&mut sched))?;
    Ok(result(
        &format!("kvc-sched: one step with {running} decoding sequences"),
        budget,
        iters,
        t,
    ))
}
