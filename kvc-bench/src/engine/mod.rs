//! A real CPU engine: a small llama-style transformer ([`model`]) served through the kvc stack
//! — the scheduler, the block pool, the pin policy, the reuse index — with every plan executed
//! by the `kvc-kernels` CPU ops (`write_kv`, `paged_prefill`, `copy_blocks`, `swap_out`, `swap_in`).
//!
//! It exists to show the stack end to end and to prove it: the logits of every generated token
//! equal, within the kernels' tolerance, those of the same model run alone on contiguous K/V,
//! whether the request ran in a batch, after a prefix hit, as a session's next turn, after
//! being preempted (recomputed or swapped), or after its prefix went down to the tiers below
//! device memory (host, disk, a shared server) as real bytes and came back ([`tiers`]).

mod metrics;
pub mod model;
pub mod tiers;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use kvc_alloc::{BlockPool, PoolConfig};
use kvc_core::{
    LowerTiers, PageTableError, PagedLayout, PagedLayoutError, PinPolicy, QosClass, Retention,
    ReuseIndex, SeqId, SessionId, SlotMappingError, StoreKey, TenantId,
};
use kvc_kernels::{
    AttnParams, BlockSwap, ShapeError, copy_blocks, paged_prefill, swap_in, swap_out, write_kv,
};
use kvc_sched::{
    BlockOffload, CompleteError, ConfigError, LoadError, LoadJob, LoadResult, Request, Scheduler,
    SchedulerConfig, StepPlan, SubmitError, SwapPair, TierMode,
};
use kvc_tier::{DeviceEvent, OffloadMode, StackStats, TierStack};
use thiserror::Error;

use crate::sim::engine::{ClassLatency, class_name, percentile};
use metrics::EngineMetrics;
use model::{Model, ModelConfig, Qkv, argmax};
use tiers::{EngineTiers, PayloadError, TierOptions, TierReport, TierSetupError};

/// Why the engine stopped.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The scheduler configuration was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The pool configuration was refused.
    #[error(transparent)]
    Pool(#[from] kvc_alloc::ConfigError),
    /// The KV layout was refused.
    #[error(transparent)]
    Layout(#[from] PagedLayoutError),
    /// A request was refused.
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// A plan's page table did not validate (a scheduler bug).
    #[error(transparent)]
    PageTable(#[from] PageTableError),
    /// A plan's slot mapping did not validate (a scheduler bug).
    #[error(transparent)]
    Slots(#[from] SlotMappingError),
    /// A kernel refused its arguments.
    #[error(transparent)]
    Kernel(#[from] ShapeError),
    /// The scheduler refused the sampled tokens (an engine bug).
    #[error(transparent)]
    Complete(#[from] CompleteError),
    /// The tiers below device memory could not be built.
    #[error(transparent)]
    Tiers(#[from] TierSetupError),
    /// A block could not be copied to or from its payload (a plan naming a block outside the
    /// pool: a scheduler bug).
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// The scheduler refused a load's completion (an engine bug).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The model's shape was refused.
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// The KV caches (f32, every layer) could not be allocated: more blocks, or larger ones,
    /// than this machine's memory holds.
    #[error("engine: {bytes} bytes of KV cache could not be allocated (lower the block count)")]
    OutOfMemory {
        /// Bytes one layer's cache (device or host) needed.
        bytes: u64,
    },
    /// A background load thread panicked (an engine bug); its loads were not reported.
    #[error("engine: a background load thread panicked")]
    LoadThread,
}

/// The engine's shape: model, KV pool, scheduler limits.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The model.
    pub model: ModelConfig,
    /// KV blocks on the "device".
    pub blocks: u32,
    /// Of those, pinned for critical traffic.
    pub pinned: u32,
    /// Blocks of the host tier for swapping (0: preemption recomputes).
    pub host_blocks: u32,
    /// Tokens per block.
    pub block_size: u32,
    /// Scheduler limits (block size and host blocks are taken from above).
    pub sched: SchedulerConfig,
    /// Keep every generated token's logits (for checking against the reference).
    pub record_logits: bool,
    /// Tiers below the device pool (host, disk, shared) that keep and reload evicted prefix
    /// blocks; `None`: blocks the device evicts are gone.
    pub tiers: Option<TierOptions>,
}

impl EngineConfig {
    /// A config for `model` with `blocks` blocks of 16 tokens.
    #[must_use]
    pub fn new(model: ModelConfig, blocks: u32) -> Self {
        Self {
            model,
            blocks,
            pinned: 0,
            host_blocks: 0,
            block_size: 16,
            sched: SchedulerConfig {
                max_running: 64,
                max_batch_tokens: 512,
                max_model_len: 4096,
                ..SchedulerConfig::default()
            },
            record_logits: false,
            tiers: None,
        }
    }
}

/// A zeroed f32 buffer of `len` values, or [`EngineError::OutOfMemory`] where memory cannot
/// hold it (a typed error, not an aborted process).
fn zeroed(len: u64) -> Result<Vec<f32>, EngineError> {
    let bytes = len.saturating_mul(4);
    let n = usize::try_from(len).map_err(|_| EngineError::OutOfMemory { bytes })?;
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| EngineError::OutOfMemory { bytes })?;
    v.resize(n, 0.0);
    Ok(v)
}

/// A request to the engine.
#[derive(Clone, Debug)]
pub struct EngineRequest {
    /// Tenant.
    pub tenant: TenantId,
    /// QoS class.
    pub qos: QosClass,
    /// Session, for multi-turn chat.
    pub session: Option<SessionId>,
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Tokens to generate.
    pub max_new_tokens: u32,
}

/// A finished request.
#[derive(Clone, Debug)]
pub struct Completed {
    /// Its id.
    pub id: SeqId,
    /// Its prompt.
    pub prompt: Vec<u32>,
    /// The generated tokens (greedy).
    pub output: Vec<u32>,
    /// The logits each generated token was sampled from (when recording).
    pub logits: Vec<Vec<f32>>,
    /// Prompt tokens served from the cache.
    pub cached_tokens: u64,
    /// Times it was preempted.
    pub preemptions: u32,
}

/// What a run measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EngineReport {
    /// Requests finished.
    pub requests: usize,
    /// Tokens computed (prefill and decode).
    pub computed_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Wall time, seconds.
    pub wall_s: f64,
    /// Computed tokens per second.
    pub tokens_per_s: f64,
    /// Generated tokens per second.
    pub generated_per_s: f64,
    /// Steps.
    pub steps: u64,
    /// Preemptions.
    pub preemptions: u64,
    /// Preemptions that swapped to the host tier.
    pub swapped_out: u64,
    /// Prompt tokens admitted.
    pub prompt_tokens: u64,
    /// Of those, served from the device prefix cache.
    pub device_hit_tokens: u64,
    /// Of those, loaded from the tiers below device memory.
    pub tier_hit_tokens: u64,
    /// Prompt tokens served from the cache (device or tiers) over prompt tokens admitted.
    pub prefix_hit_rate: f64,
    /// Peak blocks in use in the pinned region.
    pub peak_pinned_used: usize,
    /// Wall-clock latency per QoS class, most important first: time to first token from
    /// submission, and time between tokens.
    pub classes: Vec<ClassLatency>,
    /// What the tiers below the device pool did since the engine was built (absent without
    /// tiers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tiers: Option<TierReport>,
}

/// Where a [`Engine::serve_with_progress`] run stands, for a progress line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Progress {
    /// Requests finished so far.
    pub finished: usize,
    /// Requests submitted.
    pub total: usize,
    /// Tokens generated so far.
    pub generated: u64,
    /// Seconds since the run started.
    pub elapsed_s: f64,
}

/// Which way blocks move between the device pool and the host tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Swap {
    /// Device to host (preemption by swapping).
    Out,
    /// Host to device (resumption).
    In,
}

/// Per-request timing for the latency figures.
#[derive(Clone, Copy, Debug)]
struct Timing {
    qos: QosClass,
    submitted: Instant,
    last_token: Option<Instant>,
}

/// The engine: model weights, per-layer paged KV caches, and the kvc scheduler.
pub struct Engine<P, R> {
    model: Model,
    sched: Scheduler<BlockPool, P, R>,
    layout: PagedLayout,
    caches: Vec<Vec<f32>>,
    host_layout: Option<PagedLayout>,
    host: Vec<Vec<f32>>,
    tokens: HashMap<SeqId, Vec<u32>>,
    prompts: HashMap<SeqId, usize>,
    logits: HashMap<SeqId, Vec<Vec<f32>>>,
    record_logits: bool,
    next_id: u64,
    plan: StepPlan,
    computed: u64,
    generated: u64,
    peak_pinned_used: usize,
    timing: HashMap<SeqId, Timing>,
    /// Per class rank: time to first token and time between tokens, in milliseconds.
    latencies: Vec<(Vec<f64>, Vec<f64>)>,
    metrics: EngineMetrics,
    tiers: Option<EngineTiers>,
}

impl<P: PinPolicy, R: ReuseIndex> Engine<P, R> {
    /// Builds the engine: random weights, zeroed caches, a pool of `cfg.blocks`.
    pub fn new(cfg: &EngineConfig, pin: P, reuse: R) -> Result<Self, EngineError> {
        let m = cfg.model;
        let model = Model::new(m)?;
        let layout = PagedLayout::hnd(
            cfg.blocks,
            m.kv_heads as u32,
            cfg.block_size,
            m.head_dim as u32,
        )?;
        let pool = BlockPool::new(
            PoolConfig::new(u64::from(cfg.blocks))
                .pinned(u64::from(cfg.pinned))
                .watermark(u64::from(cfg.blocks) / 100),
        )?;
        let sched_cfg = SchedulerConfig {
            block_size: cfg.block_size,
            host_blocks: cfg.host_blocks as usize,
            ..cfg.sched.clone()
        };
        let host_layout = (cfg.host_blocks > 0)
            .then(|| {
                PagedLayout::hnd(
                    cfg.host_blocks,
                    m.kv_heads as u32,
                    cfg.block_size,
                    m.head_dim as u32,
                )
            })
            .transpose()?;
        let mut sched = Scheduler::new(sched_cfg, pool, pin, reuse)?;
        let tiers = match &cfg.tiers {
            Some(opts) => {
                let ns = tiers::namespace(&m, cfg.block_size)?;
                let stack = Arc::new(tiers::build_stack(&ns, opts)?);
                let mode = match opts.mode {
                    OffloadMode::WriteThrough => TierMode::WriteThrough,
                    _ => TierMode::WriteBack,
                };
                let lower: Arc<dyn LowerTiers> = stack.clone();
                sched = sched.with_tiers(lower, mode);
                let block_bytes = tiers::payload_bytes(&layout, m.layers);
                Some(EngineTiers::new(
                    stack,
                    block_bytes,
                    cfg.block_size,
                    opts.background_loads,
                ))
            }
            None => None,
        };
        let caches = (0..m.layers)
            .map(|_| zeroed(layout.len()))
            .collect::<Result<_, _>>()?;
        let host = match &host_layout {
            Some(h) => (0..m.layers)
                .map(|_| zeroed(h.len()))
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        Ok(Self {
            caches,
            host,
            host_layout,
            layout,
            model,
            sched,
            tokens: HashMap::new(),
            prompts: HashMap::new(),
            logits: HashMap::new(),
            record_logits: cfg.record_logits,
            next_id: 0,
            plan: StepPlan::default(),
            computed: 0,
            generated: 0,
            peak_pinned_used: 0,
            timing: HashMap::new(),
            latencies: Vec::new(),
            // f32 keys and values of every layer.
            metrics: EngineMetrics::new(
                2 * (m.kv_heads * m.head_dim * m.layers) as u64 * u64::from(cfg.block_size) * 4,
            ),
            tiers,
        })
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The scheduler.
    pub fn scheduler(&self) -> &Scheduler<BlockPool, P, R> {
        &self.sched
    }

    /// The prefix index, to pin or demote cached prefixes (`ReuseIndex::set_retention`) or
    /// invalidate them, as an application would between steps.
    pub fn reuse_index_mut(&mut self) -> &mut R {
        self.sched.reuse_index_mut()
    }

    /// The tiers below the device pool, if configured (their counters, for instance).
    pub fn tier_stack(&self) -> Option<&TierStack> {
        self.tiers.as_ref().map(|t| &*t.stack)
    }

    /// What the tiers did since the engine was built (absent without tiers).
    pub fn tier_report(&self) -> Option<TierReport> {
        self.tiers.as_ref().map(|t| {
            let mut report = t
                .report
                .clone()
                .with_stack(&StackStats::default(), &t.stack.stats());
            report.load_waits = self.sched.stats().load_waits;
            report
        })
    }

    /// Queues a request; it starts at the next step.
    pub fn submit(&mut self, req: EngineRequest) -> Result<SeqId, EngineError> {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.sched.submit(Request {
            id,
            tenant: req.tenant,
            qos: req.qos,
            session: req.session,
            prompt: req.prompt.clone(),
            max_new_tokens: req.max_new_tokens,
            arrival_ms: self.sched.stats().steps,
        })?;
        self.timing.insert(
            id,
            Timing {
                qos: req.qos,
                submitted: Instant::now(),
                last_token: None,
            },
        );
        self.metrics.submitted(id, req.qos);
        self.prompts.insert(id, req.prompt.len());
        self.tokens.insert(id, req.prompt);
        Ok(id)
    }

    /// Whether nothing is waiting or running.
    #[must_use]
    pub fn is_idle(&self) -> bool {
        self.sched.is_idle()
    }

    /// Runs one step: plans it, moves blocks, runs the model over the batch, samples greedily.
    pub fn step(&mut self) -> Result<Vec<Completed>, EngineError> {
        self.step_with(|_| {})
    }

    /// [`step`](Self::step), calling `between` with the plan after planning and before
    /// executing it: for fault tests (a shared server lost, a disk page damaged, while the
    /// plan's loads are in flight).
    pub fn step_with(
        &mut self,
        between: impl FnOnce(&StepPlan),
    ) -> Result<Vec<Completed>, EngineError> {
        // The last step's background loads, reported before this step is planned.
        self.finish_background_loads()?;
        let now = self.sched.stats().steps;
        let mut plan = std::mem::take(&mut self.plan);
        self.sched.step_into(now, &mut plan);
        between(&plan);
        let result = self.execute(&plan);
        self.plan = plan;
        result
    }

    fn swap(&mut self, pairs: &[SwapPair], direction: Swap) -> Result<(), EngineError> {
        let out = direction == Swap::Out;
        let Some(host_layout) = self.host_layout else {
            return Ok(());
        };
        if pairs.is_empty() {
            return Ok(());
        }
        self.metrics.swapped(pairs.len(), out);
        let swaps: Vec<BlockSwap> = pairs
            .iter()
            .map(|p| BlockSwap {
                device: p.device,
                host: p.host,
            })
            .collect();
        if out {
            let src: Vec<&[f32]> = self.caches.iter().map(Vec::as_slice).collect();
            let mut dst: Vec<&mut [f32]> = self.host.iter_mut().map(Vec::as_mut_slice).collect();
            swap_out(&self.layout, &src, &host_layout, &mut dst, &swaps)?;
        } else {
            let src: Vec<&[f32]> = self.host.iter().map(Vec::as_slice).collect();
            let mut dst: Vec<&mut [f32]> = self.caches.iter_mut().map(Vec::as_mut_slice).collect();
            swap_in(&host_layout, &src, &self.layout, &mut dst, &swaps)?;
        }
        Ok(())
    }

    /// Copies the plan's offloads down to the tiers: every block's K and V of every layer
    /// gathered into one payload, stored under its key with the retention it had on the
    /// device, pin expiry included, at the plan's clock (one store call per retention). A
    /// store error is counted and the blocks are simply not kept (a later request recomputes
    /// them).
    fn offload(&mut self, offloads: &[BlockOffload], now_ms: u64) -> Result<(), EngineError> {
        let Some(t) = self.tiers.as_mut() else {
            return Ok(());
        };
        if offloads.is_empty() {
            return Ok(());
        }
        let start = Instant::now();
        let bb = t.block_bytes;
        let event = match t.stack.mode() {
            OffloadMode::WriteThrough => DeviceEvent::Cached,
            _ => DeviceEvent::Evicted,
        };
        // One call per retention (almost always just the default).
        let mut retentions: Vec<Retention> = offloads.iter().map(|o| o.retention).collect();
        retentions.sort_unstable_by_key(|r| (r.priority, r.until));
        retentions.dedup();
        for retention in retentions {
            let group: Vec<&BlockOffload> = offloads
                .iter()
                .filter(|o| o.retention == retention)
                .collect();
            let buf = t.staging(group.len());
            for (o, dst) in group.iter().zip(buf.chunks_exact_mut(bb)) {
                tiers::gather_block(&self.layout, &self.caches, o.device, dst)?;
            }
            let keys: Vec<StoreKey> = group.iter().map(|o| o.key).collect();
            let stored = t.stack.offload_retained(
                event,
                &keys,
                &t.buf[..keys.len() * bb],
                retention,
                now_ms,
            );
            if stored.is_err() {
                t.report.store_errors += 1;
            }
        }
        self.metrics.offloaded(offloads.len());
        t.report.offloaded_blocks += offloads.len() as u64;
        t.report.offloaded_bytes += (offloads.len() * bb) as u64;
        t.report.offload_s += start.elapsed().as_secs_f64();
        Ok(())
    }

    /// Runs the plan's loads: finds each job's blocks in the tiers, loads the longest prefix
    /// held, scatters it into the job's device blocks and reports the job: `Loaded`, or
    /// `Failed` with the leading blocks that came back (a block evicted since the plan, a
    /// corrupt disk page, a lost shared server, a store error). The scheduler recomputes the
    /// rest. With background loads the fetching runs on a thread while the step computes, and
    /// the rest happens at the start of the next step.
    fn load(&mut self, loads: &[LoadJob]) -> Result<(), EngineError> {
        if loads.is_empty() {
            return Ok(());
        }
        let Some(t) = self.tiers.as_mut() else {
            // Tiers not configured: the scheduler plans no loads; report any as failed.
            for job in loads {
                let failed = LoadResult::Failed { loaded_blocks: 0 };
                self.sched.complete_load(job.id, failed)?;
            }
            return Ok(());
        };
        let (stack, bb) = (Arc::clone(&t.stack), t.block_bytes);
        if t.background {
            // At most one batch in flight: the last one was reported before this plan.
            let jobs = loads.to_vec();
            t.in_flight = Some(std::thread::spawn(move || {
                jobs.into_iter()
                    .map(|job| {
                        let mut bytes = Vec::new();
                        let mut fetched = tiers::fetch(&stack, bb, job, &mut bytes);
                        fetched.bytes = bytes;
                        fetched
                    })
                    .collect()
            }));
            return Ok(());
        }
        let mut buf = std::mem::take(&mut t.buf);
        let mut result = Ok(());
        for job in loads {
            let fetched = tiers::fetch(&stack, bb, job.clone(), &mut buf);
            if let Some(t) = self.tiers.as_mut() {
                t.report.load_wait_s += fetched.seconds;
            }
            result = self.finish_load(&fetched, &buf);
            if result.is_err() {
                break;
            }
        }
        if let Some(t) = self.tiers.as_mut() {
            t.buf = buf;
        }
        result
    }

    /// Waits for the last step's background loads and finishes each.
    fn finish_background_loads(&mut self) -> Result<(), EngineError> {
        let Some(handle) = self.tiers.as_mut().and_then(|t| t.in_flight.take()) else {
            return Ok(());
        };
        let start = Instant::now();
        let fetched = handle.join().map_err(|_| EngineError::LoadThread)?;
        if let Some(t) = self.tiers.as_mut() {
            t.report.load_wait_s += start.elapsed().as_secs_f64();
        }
        for f in &fetched {
            self.finish_load(f, &f.bytes)?;
        }
        Ok(())
    }

    /// Scatters a fetched load's blocks (`bytes`, back to back) into its device blocks, counts
    /// it and reports it to the scheduler.
    fn finish_load(&mut self, f: &tiers::FetchedLoad, bytes: &[u8]) -> Result<(), EngineError> {
        let job = &f.job;
        let n = f.outcome.map_or(0, |o| o.blocks);
        let Some(t) = self.tiers.as_mut() else {
            return Ok(());
        };
        let bb = t.block_bytes;
        for (b, src) in job.blocks[..n].iter().zip(bytes.chunks_exact(bb)) {
            tiers::scatter_block(&self.layout, &mut self.caches, b.device, src)?;
        }
        let r = &mut t.report;
        r.store_errors += f.errors;
        r.load_jobs += 1;
        r.planned_load_blocks += job.blocks.len() as u64;
        if let Some(o) = f.outcome {
            r.loaded_host_blocks += o.per_tier[0] as u64;
            r.loaded_disk_blocks += o.per_tier[1] as u64;
            r.loaded_shared_blocks += o.per_tier[2] as u64;
        }
        r.loaded_bytes += (n * bb) as u64;
        r.loaded_tokens += n as u64 * t.tokens_per_block;
        r.missed_load_blocks += (job.blocks.len() - n) as u64;
        if n < job.blocks.len() {
            r.failed_loads += 1;
        }
        r.load_s += f.seconds;
        self.metrics.loaded(
            f.outcome.map_or([0; 3], |o| o.per_tier),
            n < job.blocks.len(),
        );
        let result = if n == job.blocks.len() {
            LoadResult::Loaded
        } else {
            LoadResult::Failed { loaded_blocks: n }
        };
        self.sched.complete_load(job.id, result)?;
        Ok(())
    }

    fn execute(&mut self, plan: &StepPlan) -> Result<Vec<Completed>, EngineError> {
        self.offload(&plan.offloads, plan.now_ms)?;
        self.swap(&plan.swap_out, Swap::Out)?;
        if !plan.copies.is_empty() {
            let mut layers: Vec<&mut [f32]> =
                self.caches.iter_mut().map(Vec::as_mut_slice).collect();
            copy_blocks(&self.layout, &mut layers, &plan.copies)?;
        }
        self.load(&plan.loads)?;
        self.swap(&plan.swap_in, Swap::In)?;
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        let table = plan.page_table(&self.layout)?;
        let slots = plan.slots(&self.layout)?;
        let mut tokens = Vec::with_capacity(plan.num_tokens());
        let mut positions = Vec::with_capacity(plan.num_tokens());
        for s in &plan.seqs {
            let seq_tokens = &self.tokens[&s.seq];
            for pos in s.positions.clone() {
                tokens.push(seq_tokens[pos as usize]);
                positions.push(pos);
            }
        }
        let c = self.model.cfg;
        let params = AttnParams::new(c.q_heads as u32, c.head_dim as u32);
        let mut x = self.model.embed(&tokens);
        let mut out = vec![0.0f32; tokens.len() * c.q_heads * c.head_dim];
        let mut lse = vec![0.0f32; tokens.len() * c.q_heads];
        for l in 0..c.layers {
            let Qkv { q, k, v } = self.model.qkv(l, &x, &positions);
            write_kv(&self.layout, &mut self.caches[l], &slots, &k, &v)?;
            paged_prefill(
                &self.layout,
                &self.caches[l],
                &table,
                &q,
                params,
                &mut out,
                &mut lse,
            )?;
            self.model.finish(l, &mut x, &out);
        }
        self.computed += tokens.len() as u64;
        let mut sampled = Vec::new();
        for (i, s) in plan.seqs.iter().enumerate().filter(|(_, s)| s.samples) {
            let row = plan.qo_indptr[i + 1] as usize - 1;
            let logits = self
                .model
                .logits(&x[row * c.d_model..(row + 1) * c.d_model]);
            let token = argmax(&logits);
            if self.record_logits {
                self.logits.entry(s.seq).or_default().push(logits);
            }
            if let Some(t) = self.tokens.get_mut(&s.seq) {
                t.push(token);
            }
            self.metrics.sampled(s.seq);
            sampled.push((s.seq, token));
        }
        self.generated += sampled.len() as u64;
        let now = Instant::now();
        for (seq, _) in &sampled {
            if let Some(t) = self.timing.get_mut(seq) {
                let class = t.qos.index();
                if self.latencies.len() <= class {
                    self.latencies.resize_with(class + 1, Default::default);
                }
                let (ttft, tbt) = &mut self.latencies[class];
                let since = t.last_token.unwrap_or(t.submitted);
                let ms = now.duration_since(since).as_secs_f64() * 1e3;
                if t.last_token.is_some() {
                    tbt.push(ms)
                } else {
                    ttft.push(ms)
                }
                t.last_token = Some(now);
            }
        }
        let pinned = self.sched.allocator().stats().regions[0].used;
        self.peak_pinned_used = self.peak_pinned_used.max(pinned);
        let mut done = Vec::new();
        let finished = self.sched.complete_step(&sampled)?;
        self.metrics
            .step(&self.sched.stats(), &self.sched.allocator().stats());
        for f in finished {
            self.timing.remove(&f.seq);
            self.metrics.finished(f.seq, f.cached_tokens);
            let mut tokens = self.tokens.remove(&f.seq).unwrap_or_default();
            let prompt_len = self.prompts.remove(&f.seq).unwrap_or(0);
            tokens.truncate(prompt_len);
            done.push(Completed {
                id: f.seq,
                prompt: tokens,
                output: f.output,
                logits: self.logits.remove(&f.seq).unwrap_or_default(),
                cached_tokens: f.cached_tokens,
                preemptions: f.preemptions,
            });
        }
        Ok(done)
    }

    /// Steps until every request has finished; returns them in finishing order. With tiers,
    /// the offloads still pending when the last request finishes are executed too
    /// ([`flush_offloads`](Self::flush_offloads)).
    pub fn run_until_idle(&mut self, max_steps: u64) -> Result<Vec<Completed>, EngineError> {
        let mut done = Vec::new();
        for _ in 0..max_steps {
            if self.is_idle() {
                break;
            }
            done.extend(self.step()?);
        }
        self.flush_offloads()?;
        Ok(done)
    }

    /// With nothing running and offloads pending (`Scheduler::pending_offloads`), plans and
    /// executes one empty step: the blocks cached by the last step (write-through) are listed
    /// in the next plan's offloads, and without another request that plan would never come,
    /// so other engines sharing the tiers would not see them.
    pub fn flush_offloads(&mut self) -> Result<(), EngineError> {
        if self.tiers.is_some() && self.is_idle() && self.sched.pending_offloads() > 0 {
            let done = self.step()?;
            debug_assert!(done.is_empty(), "an idle step finished requests");
        }
        Ok(())
    }

    /// Runs `requests` to completion and reports real throughput and the stack's statistics.
    pub fn serve(&mut self, requests: Vec<EngineRequest>) -> Result<EngineReport, EngineError> {
        self.serve_with_progress(requests, f64::INFINITY, &mut |_| {})
    }

    /// [`serve`](Self::serve), calling `progress` about every `every_s` seconds of the run.
    pub fn serve_with_progress(
        &mut self,
        requests: Vec<EngineRequest>,
        every_s: f64,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<EngineReport, EngineError> {
        let start = Instant::now();
        let (c0, g0) = (self.computed, self.generated);
        let total = requests.len();
        self.latencies.clear();
        for r in requests {
            self.submit(r)?;
        }
        let mut finished = 0;
        let mut next_report = every_s;
        while !self.is_idle() {
            finished += self.step()?.len();
            let elapsed_s = start.elapsed().as_secs_f64();
            if elapsed_s >= next_report {
                next_report = elapsed_s + every_s;
                progress(Progress {
                    finished,
                    total,
                    generated: self.generated - g0,
                    elapsed_s,
                });
            }
        }
        self.flush_offloads()?;
        let wall_s = start.elapsed().as_secs_f64();
        let mut classes = Vec::new();
        for (rank, (ttft, tbt)) in std::mem::take(&mut self.latencies).into_iter().enumerate() {
            if ttft.is_empty() {
                continue;
            }
            let (mut ttft, mut tbt) = (ttft, tbt);
            ttft.sort_by(f64::total_cmp);
            tbt.sort_by(f64::total_cmp);
            let class = QosClass(rank as u8);
            classes.push(ClassLatency {
                qos: class.get(),
                name: class_name(class),
                finished: ttft.len(),
                ttft_p50_ms: percentile(&ttft, 50.0),
                ttft_p99_ms: percentile(&ttft, 99.0),
                tbt_p50_ms: percentile(&tbt, 50.0),
                tbt_p99_ms: percentile(&tbt, 99.0),
            });
        }
        let s = self.sched.stats();
        let computed = self.computed - c0;
        let generated = self.generated - g0;
        Ok(EngineReport {
            requests: finished,
            computed_tokens: computed,
            generated_tokens: generated,
            wall_s,
            tokens_per_s: computed as f64 / wall_s.max(1e-9),
            generated_per_s: generated as f64 / wall_s.max(1e-9),
            steps: s.steps,
            preemptions: s.preempted,
            swapped_out: s.swapped_out,
            prompt_tokens: s.prompt_tokens,
            device_hit_tokens: s.cached_tokens,
            tier_hit_tokens: s.tier_tokens,
            prefix_hit_rate: if s.prompt_tokens == 0 {
                0.0
            } else {
                (s.cached_tokens + s.tier_tokens) as f64 / s.prompt_tokens as f64
            },
            peak_pinned_used: self.peak_pinned_used,
            classes,
            tiers: self.tier_report(),
        })
    }
}
