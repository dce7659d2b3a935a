//! [`Scheduler`]: continuous batching over paged KV, generic over the allocator, the pin
//! policy and the reuse index it composes.
//!
//! Each [`step`](Scheduler::step):
//! 1. applies queued submissions and cancellations, expired soft pins, and the pin policy's
//!    resize decision;
//! 2. schedules running sequences, most important first (QoS class, then arrival): one decode
//!    token each, or the next prefill chunk, under the token budget, allocating blocks from
//!    the region the pin policy names; when memory runs out it evicts cached blocks, then
//!    preempts the least important, latest running sequence (recompute);
//! 3. admits waiting requests by effective class (aging lifts a request one class per
//!    `aging_ms` waited), FCFS within a class: reuse lookup, then the first prefill chunk;
//! 4. emits a [`StepPlan`] with CSR page tables and slot mappings.
//!
//! [`complete_step`](Scheduler::complete_step) takes the sampled tokens back, offers computed
//! blocks to the reuse index, and finishes sequences, releasing everything they hold.

use ahash::{AHashMap as HashMap, AHashSet as HashSet};

use kvc_core::{
    Admission, BlockAllocator, BlockId, BlockTable, ClassBlocks, HostBlockId, LoadSample,
    PinPolicy, PlaceRequest, Placement, PoolView, QosClass, Refusal, RegionBlocks, RegionId,
    Resize, RetentionUpdate, ReuseIndex, ReuseScope, SeqId,
};
use thiserror::Error;

use crate::compute::{ClassDemand, ComputeConfigError, ComputeReserve, StepGate};
use crate::plan::{FinishReason, Finished, Rejection, ScheduledSeq, StepPlan, SwapPair};
use crate::queue::{Command, SubmitQueue, Submitter};
use crate::request::{Request, SubmitError};

/// Limits of a [`Scheduler`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Tokens per block; must equal the reuse index's.
    pub block_size: u32,
    /// Sequences running at once.
    pub max_running: usize,
    /// New tokens per step (prefill chunks plus decodes).
    pub max_batch_tokens: usize,
    /// The model's context: prompt plus new tokens may not exceed it.
    pub max_model_len: u64,
    /// QoS classes, ranks `0..num_classes`.
    pub num_classes: u8,
    /// A waiting request is lifted one class per this many milliseconds waited, so the
    /// lowest class cannot starve forever. `None`: no aging.
    pub aging_ms: Option<u64>,
    /// The end-of-sequence token, if generation stops on one.
    pub eos_token: Option<u32>,
    /// Blocks of the host-side pool that preempted sequences are swapped out to. 0: no host
    /// tier, preemption drops the KV and the sequence is recomputed.
    pub host_blocks: usize,
    /// What to do with a session's request whose conversation has outgrown the model:
    /// `None` refuses it (`SubmitError::TooLong`); `Some(t)` truncates its prompt.
    pub session_truncation: Option<SessionTruncation>,
}

/// How a session's prompt is cut to fit the model: keep its first `keep_prefix_tokens`
/// (the system prompt) and as many of its latest tokens as fit, dropping the oldest turns in
/// between. Cutting the middle of the context means the kept tail no longer matches cached
/// blocks after the prefix, so a truncated turn recomputes its tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionTruncation {
    /// Leading prompt tokens always kept.
    pub keep_prefix_tokens: u32,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            max_running: 256,
            max_batch_tokens: 8192,
            max_model_len: 131_072,
            num_classes: 3,
            aging_ms: Some(10_000),
            eos_token: None,
            host_blocks: 0,
            session_truncation: None,
        }
    }
}

/// Why a [`Scheduler`] could not be built.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A limit that must be at least 1 is 0.
    #[error("scheduler setting `{name}` must be at least 1")]
    Zero {
        /// The setting.
        name: &'static str,
    },
    /// The reuse index cuts blocks of another size.
    #[error("the reuse index uses blocks of {index} tokens, the scheduler {scheduler}")]
    BlockSizeMismatch {
        /// The scheduler's block size.
        scheduler: u32,
        /// The index's block size.
        index: u32,
    },
}

/// Why [`Scheduler::complete_step`] refused its input. Nothing was applied.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CompleteError {
    /// A token was given for a sequence the last plan did not ask to sample.
    #[error("{seq} was not sampled in the last step")]
    NotSampled {
        /// The sequence.
        seq: SeqId,
    },
    /// Two tokens were given for one sequence.
    #[error("{seq} has two sampled tokens")]
    Duplicate {
        /// The sequence.
        seq: SeqId,
    },
}

/// Why [`Scheduler::cancel`] did nothing.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CancelError {
    /// No waiting or running request has this id.
    #[error("{seq} is not waiting or running")]
    Unknown {
        /// The sequence.
        seq: SeqId,
    },
}

/// Counters since the scheduler was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedStats {
    /// Steps taken.
    pub steps: u64,
    /// Requests accepted.
    pub submitted: u64,
    /// Admissions (a preempted request counts again when readmitted).
    pub admitted: u64,
    /// Sequences finished.
    pub finished: u64,
    /// Preemptions.
    pub preempted: u64,
    /// Of those, preemptions that swapped the KV out instead of dropping it.
    pub swapped_out: u64,
    /// Swapped-out sequences brought back.
    pub swapped_in: u64,
    /// Requests rejected after acceptance.
    pub rejected: u64,
    /// Requests cancelled.
    pub cancelled: u64,
    /// Prompt tokens at admission.
    pub prompt_tokens: u64,
    /// Of those, tokens served from the reuse index.
    pub cached_tokens: u64,
    /// Cached blocks evicted to make room.
    pub evicted_blocks: u64,
    /// Pin-policy resize decisions the allocator could not apply.
    pub resize_failures: u64,
    /// Prompt tokens dropped by session truncation.
    pub truncated_tokens: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
}

#[derive(Debug)]
struct Seq {
    req: Request,
    /// Prompt followed by generated tokens.
    tokens: Vec<u32>,
    table: BlockTable,
    /// Blocks obtained through the pin policy, per region, to give back to it.
    placed: RegionBlocks,
    /// Leading table blocks marked in use in the reuse index by a lookup.
    hit_blocks: usize,
    /// Tokens whose KV is (or, once the current plan runs, will be) in the table's blocks.
    computed: u64,
    cached_tokens: u64,
    state: State,
    preemptions: u32,
    awaiting_sample: bool,
    /// Host blocks holding this sequence's KV while it is swapped out, in table order.
    swapped: Vec<HostBlockId>,
}

impl Seq {
    fn scope(&self) -> ReuseScope {
        ReuseScope {
            tenant: self.req.tenant,
            session: self.req.session,
        }
    }
    fn generated(&self) -> usize {
        self.tokens.len() - self.req.prompt.len()
    }
    fn pending(&self) -> u64 {
        self.tokens.len() as u64 - self.computed
    }
}

/// How a request for more blocks ended.
enum Grow {
    Done,
    Wait,
    PreemptedSelf,
    Refused(Refusal),
}

/// Continuous batching over paged KV.
///
/// `A` is the block source, `P` the pin policy that places blocks in regions, `R` the reuse
/// index. They meet only through `kvc-core` traits.
#[derive(Debug)]
pub struct Scheduler<A, P, R> {
    cfg: SchedulerConfig,
    alloc: A,
    pin: P,
    reuse: R,
    queue: SubmitQueue,
    submitter: Submitter,
    seqs: HashMap<SeqId, Seq>,
    waiting: Vec<SeqId>,
    running: Vec<SeqId>,
    /// Per class: a concurrency cap set by a `Downgrade` placement.
    caps: Vec<Option<usize>>,
    /// Sequences cancelled since the last plan (their samples are ignored).
    cancelled_since_plan: HashSet<SeqId>,
    step: u64,
    now_ms: u64,
    stats: SchedStats,
    commands: Vec<Command>,
    scratch: Vec<BlockId>,
    scheduled: Vec<(SeqId, u64)>,
    /// Free blocks of the host pool.
    host_free: Vec<HostBlockId>,
    /// The share of each step's tokens held for reserved classes, if configured.
    compute: Option<ComputeReserve>,
}

impl<A: BlockAllocator, P: PinPolicy, R: ReuseIndex> Scheduler<A, P, R> {
    /// Builds a scheduler over an allocator, a pin policy and a reuse index.
    pub fn new(cfg: SchedulerConfig, alloc: A, pin: P, reuse: R) -> Result<Self, ConfigError> {
        for (value, name) in [
            (cfg.block_size as usize, "block_size"),
            (cfg.max_running, "max_running"),
            (cfg.max_batch_tokens, "max_batch_tokens"),
            (
                cfg.max_model_len.min(usize::MAX as u64) as usize,
                "max_model_len",
            ),
            (usize::from(cfg.num_classes), "num_classes"),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero { name });
            }
        }
        if cfg.aging_ms == Some(0) {
            return Err(ConfigError::Zero { name: "aging_ms" });
        }
        if reuse.block_size() != cfg.block_size {
            return Err(ConfigError::BlockSizeMismatch {
                scheduler: cfg.block_size,
                index: reuse.block_size(),
            });
        }
        let (queue, submitter) = SubmitQueue::new();
        let cfg_host_blocks = cfg.host_blocks.min(u32::MAX as usize);
        Ok(Self {
            caps: vec![None; usize::from(cfg.num_classes)],
            cfg,
            alloc,
            pin,
            reuse,
            queue,
            submitter,
            seqs: HashMap::new(),
            waiting: Vec::new(),
            running: Vec::new(),
            cancelled_since_plan: HashSet::new(),
            step: 0,
            now_ms: 0,
            stats: SchedStats::default(),
            commands: Vec::new(),
            scratch: Vec::new(),
            scheduled: Vec::new(),
            host_free: (0..cfg_host_blocks as u32).rev().map(HostBlockId).collect(),
            compute: None,
        })
    }

    /// Reserves a share of every step's token budget for the classes `reserve` gives one
    /// (see [`ComputeReserve`]).
    pub fn with_compute_reserve(
        mut self,
        reserve: crate::compute::ComputeReserveConfig,
    ) -> Result<Self, ComputeConfigError> {
        self.compute = Some(ComputeReserve::new(
            reserve,
            self.cfg.num_classes,
            self.cfg.max_batch_tokens,
        )?);
        Ok(self)
    }

    /// The compute reserve, if configured.
    #[must_use]
    pub fn compute_reserve(&self) -> Option<&ComputeReserve> {
        self.compute.as_ref()
    }

    /// A handle other threads use to submit and cancel; commands apply at the next step.
    #[must_use]
    pub fn submitter(&self) -> Submitter {
        self.submitter.clone()
    }

    /// The allocator.
    pub fn allocator(&self) -> &A {
        &self.alloc
    }

    /// The pin policy.
    pub fn pin_policy(&self) -> &P {
        &self.pin
    }

    /// The reuse index.
    pub fn reuse_index(&self) -> &R {
        &self.reuse
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> SchedStats {
        self.stats
    }

    /// Requests waiting (including preempted ones).
    #[must_use]
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences running.
    #[must_use]
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Tokens of KV held by running sequences, counted per sequence (a block shared by two
    /// sequences counts twice): the memory a cache without paging or sharing would need.
    #[must_use]
    pub fn resident_tokens(&self) -> u64 {
        self.running
            .iter()
            .filter_map(|id| self.seqs.get(id))
            .map(|s| s.table.num_tokens())
            .sum()
    }

    /// Whether no request is waiting or running.
    #[must_use]
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Accepts a request; it is considered from the next step on.
    pub fn submit(&mut self, mut req: Request) -> Result<(), SubmitError> {
        let seq = req.id;
        if req.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt { seq });
        }
        if req.max_new_tokens == 0 {
            return Err(SubmitError::NoNewTokens { seq });
        }
        if req.qos.get() >= self.cfg.num_classes {
            return Err(SubmitError::UnknownClass {
                seq,
                class: req.qos,
            });
        }
        let mut tokens = req.prompt.len() as u64 + u64::from(req.max_new_tokens);
        if let (Some(cut), Some(_)) = (self.cfg.session_truncation, req.session)
            && tokens > self.cfg.max_model_len
        {
            // Room for the prompt: the context less the new tokens; keep the prefix and the
            // latest tokens, at least one of them.
            let room = self
                .cfg
                .max_model_len
                .saturating_sub(u64::from(req.max_new_tokens)) as usize;
            let keep = (cut.keep_prefix_tokens as usize).min(room.saturating_sub(1));
            if room > keep {
                let tail = room - keep;
                let dropped = req.prompt.len() - keep - tail;
                req.prompt.drain(keep..keep + dropped);
                self.stats.truncated_tokens += dropped as u64;
                tokens = req.prompt.len() as u64 + u64::from(req.max_new_tokens);
            }
        }
        if tokens > self.cfg.max_model_len {
            return Err(SubmitError::TooLong {
                seq,
                tokens,
                max: self.cfg.max_model_len,
            });
        }
        // The KV of the last generated token is never written.
        let blocks = (tokens - 1).div_ceil(u64::from(self.cfg.block_size));
        let total = self.alloc.total_blocks() as u64;
        if blocks > total {
            return Err(SubmitError::Impossible { seq, blocks, total });
        }
        if self.seqs.contains_key(&seq) {
            return Err(SubmitError::DuplicateId { seq });
        }
        let tokens = req.prompt.clone();
        self.seqs.insert(
            seq,
            Seq {
                table: BlockTable::new(self.cfg.block_size),
                req,
                tokens,
                placed: RegionBlocks::default(),
                hit_blocks: 0,
                computed: 0,
                cached_tokens: 0,
                state: State::Waiting,
                preemptions: 0,
                awaiting_sample: false,
                swapped: Vec::new(),
            },
        );
        self.waiting.push(seq);
        self.stats.submitted += 1;
        Ok(())
    }

    /// Cancels a waiting or running request, releasing everything it holds.
    pub fn cancel(&mut self, seq: SeqId) -> Result<(), CancelError> {
        let Some(mut s) = self.seqs.remove(&seq) else {
            return Err(CancelError::Unknown { seq });
        };
        self.drop_memory(&mut s);
        self.waiting.retain(|&id| id != seq);
        self.running.retain(|&id| id != seq);
        self.cancelled_since_plan.insert(seq);
        self.stats.cancelled += 1;
        Ok(())
    }

    /// Plans one step at time `now_ms` (the caller's clock).
    pub fn step(&mut self, now_ms: u64) -> StepPlan {
        let mut plan = StepPlan::default();
        self.step_into(now_ms, &mut plan);
        plan
    }

    /// Like [`step`](Self::step), but writes into `plan`, reusing its buffers: an engine that
    /// keeps one plan across steps allocates nothing for it in steady state.
    pub fn step_into(&mut self, now_ms: u64, plan: &mut StepPlan) {
        plan.clear();
        self.now_ms = now_ms;
        self.cancelled_since_plan.clear();
        plan.step = self.step;
        self.step += 1;
        self.stats.steps += 1;
        self.apply_commands(plan);
        self.apply_retention();
        self.apply_resize();

        let mut budget = self.cfg.max_batch_tokens;
        let mut scheduled = std::mem::take(&mut self.scheduled);
        // Compute reserve hook (1/5): ration this step's tokens between classes.
        let mut gate = self.begin_compute_gate(budget);

        // Running sequences, most important first.
        for id in self.ordered(&self.running, false) {
            if budget == 0 {
                break;
            }
            let Some(s) = self.seqs.get(&id) else {
                continue;
            };
            if s.state != State::Running || s.awaiting_sample {
                continue;
            }
            // Compute reserve hook (2/5): the gate may shrink or defer best-effort work.
            let (qos, decode) = (s.req.qos, s.pending() == 1 && s.generated() > 0);
            let n = match gate.as_mut() {
                Some(g) => g.grant(qos, s.pending(), decode, budget),
                None => s.pending(),
            }
            .min(budget as u64);
            if n == 0 {
                continue;
            }
            match self.grow(id, n, &mut scheduled, &mut budget, plan) {
                Grow::Done => {
                    scheduled.push((id, n));
                    budget -= n as usize;
                    if let Some(g) = gate.as_mut() {
                        g.commit(qos, n, decode);
                    }
                }
                Grow::PreemptedSelf | Grow::Wait => {}
                Grow::Refused(reason) => self.reject(id, reason.into(), plan),
            }
        }

        // Waiting requests, by effective class then arrival. A class whose head cannot be
        // placed admits nothing more this step (FCFS within a class).
        let preempted_now = !plan.preempted.is_empty();
        let order = self.ordered(&self.waiting, true);
        let mut blocked = vec![false; usize::from(self.cfg.num_classes)];
        for id in order {
            if budget == 0 {
                break;
            }
            let Some(s) = self.seqs.get(&id) else {
                continue;
            };
            let qos = s.req.qos;
            let class = qos.index();
            // Compute reserve hook (3/5): a reserved class is admitted even after a
            // preemption this step, and may preempt best-effort work for a running slot.
            let reserved = gate.as_ref().is_some_and(|g| g.is_reserved(qos));
            if (preempted_now && !reserved) || blocked[class] || self.at_cap(qos) {
                continue;
            }
            if self.running.len() >= self.cfg.max_running
                && !(reserved
                    && self.preempt_for_reserved(id, &mut gate, &mut scheduled, &mut budget, plan))
            {
                continue;
            }
            self.lookup(id);
            let Some(s) = self.seqs.get(&id) else {
                continue;
            };
            let n = match gate.as_mut() {
                Some(g) => g.grant(qos, s.pending(), false, budget),
                None => s.pending(),
            }
            .min(budget as u64);
            // A swapped-out sequence needs blocks for its whole context again.
            let swapped = !s.swapped.is_empty();
            if n == 0 {
                if !swapped {
                    self.unlookup(id);
                }
                blocked[class] = true;
                continue;
            }
            let want = if swapped { s.computed + n } else { n };
            let mut outcome = self.grow(id, want, &mut scheduled, &mut budget, plan);
            // Compute reserve hook (4/5): a reserved admission that waits for memory
            // preempts best-effort sequences, a few per step at most.
            while matches!(outcome, Grow::Wait)
                && reserved
                && self.preempt_for_reserved(id, &mut gate, &mut scheduled, &mut budget, plan)
            {
                outcome = self.grow(id, want, &mut scheduled, &mut budget, plan);
            }
            match outcome {
                Grow::Done => {
                    if swapped {
                        self.swap_in(id, plan);
                    }
                    self.admit(id);
                    scheduled.push((id, n));
                    budget -= n as usize;
                    if let Some(g) = gate.as_mut() {
                        g.commit(qos, n, false);
                    }
                }
                Grow::Wait | Grow::PreemptedSelf => {
                    if !swapped {
                        self.unlookup(id);
                    }
                    blocked[class] = true;
                }
                Grow::Refused(reason) => self.reject(id, reason.into(), plan),
            }
        }

        // Compute reserve hook (5/5): fold the step's rationing into the counters.
        if let (Some(c), Some(g)) = (self.compute.as_mut(), gate) {
            c.end_step(g);
        }
        self.build_plan(&scheduled, plan);
        scheduled.clear();
        self.scheduled = scheduled;
    }

    // ---- Compute reserve glue: what the hooks above call. ----

    /// Each class's pending tokens and oldest first-token wait, for the compute reserve.
    fn begin_compute_gate(&mut self, budget: usize) -> Option<StepGate> {
        self.compute.as_ref()?;
        let mut demand = vec![ClassDemand::default(); usize::from(self.cfg.num_classes)];
        for id in self.running.iter().chain(&self.waiting) {
            let Some(s) = self.seqs.get(id) else {
                continue;
            };
            if s.awaiting_sample {
                continue;
            }
            let Some(d) = demand.get_mut(s.req.qos.index()) else {
                continue;
            };
            d.tokens = d
                .tokens
                .saturating_add(usize::try_from(s.pending()).unwrap_or(usize::MAX));
            if s.generated() == 0 {
                let since = d
                    .first_token_waiting_since_ms
                    .get_or_insert(s.req.arrival_ms);
                *since = (*since).min(s.req.arrival_ms);
            }
        }
        let now = self.now_ms;
        self.compute
            .as_mut()
            .map(|c| c.begin_step(now, &demand, budget))
    }

    /// Preempts the least important, latest running sequence of a class without a share that
    /// ranks below `for_id`'s, if the gate has a preemption left; whether it did.
    fn preempt_for_reserved(
        &mut self,
        for_id: SeqId,
        gate: &mut Option<StepGate>,
        scheduled: &mut Vec<(SeqId, u64)>,
        budget: &mut usize,
        plan: &mut StepPlan,
    ) -> bool {
        let (Some(g), Some(qos)) = (gate.as_mut(), self.seqs.get(&for_id).map(|s| s.req.qos))
        else {
            return false;
        };
        let victim = self
            .running
            .iter()
            .copied()
            .filter(|&v| {
                v != for_id
                    && self
                        .seqs
                        .get(&v)
                        .is_some_and(|s| s.req.qos > qos && !g.is_reserved(s.req.qos))
                    // A sequence aged to the requester's rank is no longer preempted for it,
                    // so best-effort work cannot be starved forever.
                    && self.rank_key(v, true).0 > qos.get()
            })
            .max_by_key(|&v| self.rank_key(v, false));
        let Some(victim) = victim else {
            return false;
        };
        if !g.take_preemption() {
            return false;
        }
        self.preempt(victim, scheduled, budget, plan);
        true
    }

    /// Takes the tokens sampled for the last plan's sampling sequences, finishes those that
    /// are done, and offers newly computed blocks to the reuse index. All or nothing.
    pub fn complete_step(
        &mut self,
        sampled: &[(SeqId, u32)],
    ) -> Result<Vec<Finished>, CompleteError> {
        let mut seen = HashSet::with_capacity(sampled.len());
        for &(seq, _) in sampled {
            if !seen.insert(seq) {
                return Err(CompleteError::Duplicate { seq });
            }
            let live = self.seqs.get(&seq).is_some_and(|s| s.awaiting_sample);
            if !live && !self.cancelled_since_plan.contains(&seq) {
                return Err(CompleteError::NotSampled { seq });
            }
        }
        let mut finished = Vec::new();
        for &(seq, token) in sampled {
            let Some(s) = self.seqs.get_mut(&seq) else {
                continue; // cancelled after the plan
            };
            s.awaiting_sample = false;
            s.tokens.push(token);
            let done = if self.cfg.eos_token == Some(token) {
                Some(FinishReason::Eos)
            } else if s.generated() >= s.req.max_new_tokens as usize {
                Some(FinishReason::Length)
            } else {
                None
            };
            let first_token = s.generated() == 1;
            if let Some(reason) = done {
                if let Some(mut s) = self.seqs.remove(&seq) {
                    self.offer(&s);
                    let cached_tokens = s.cached_tokens;
                    self.drop_memory(&mut s);
                    self.running.retain(|&id| id != seq);
                    self.stats.finished += 1;
                    finished.push(Finished {
                        seq,
                        reason,
                        output: s.tokens[s.req.prompt.len()..].to_vec(),
                        cached_tokens,
                        preemptions: s.preemptions,
                    });
                }
            } else if first_token {
                // The prompt's KV is complete: share it with requests that arrive meanwhile.
                if let Some(s) = self.seqs.remove(&seq) {
                    self.offer(&s);
                    self.seqs.insert(seq, s);
                }
            }
        }
        Ok(finished)
    }

    /// `ids` by rank key, most important first (keys computed once, not per comparison).
    fn ordered(&self, ids: &[SeqId], aging: bool) -> Vec<SeqId> {
        let mut keyed: Vec<_> = ids.iter().map(|&id| self.rank_key(id, aging)).collect();
        keyed.sort_unstable();
        keyed.into_iter().map(|(_, _, id)| id).collect()
    }

    fn rank_key(&self, id: SeqId, aging: bool) -> (u8, u64, SeqId) {
        let Some(s) = self.seqs.get(&id) else {
            return (u8::MAX, u64::MAX, id);
        };
        let mut rank = s.req.qos.get();
        if aging && let Some(aging_ms) = self.cfg.aging_ms {
            let lift = self.now_ms.saturating_sub(s.req.arrival_ms) / aging_ms;
            rank = rank.saturating_sub(u8::try_from(lift).unwrap_or(u8::MAX));
        }
        (rank, s.req.arrival_ms, id)
    }

    /// Whether `class` runs as many sequences as a `Downgrade` cap allows.
    fn at_cap(&self, class: QosClass) -> bool {
        self.caps
            .get(class.index())
            .copied()
            .flatten()
            .is_some_and(|cap| self.count_running(class) >= cap)
    }

    fn apply_commands(&mut self, plan: &mut StepPlan) {
        self.queue.drain_into(&mut self.commands);
        for command in std::mem::take(&mut self.commands) {
            match command {
                Command::Submit(req) => {
                    let id = req.id;
                    if let Err(err) = self.submit(req) {
                        plan.rejected.push((id, Rejection::Invalid(err)));
                        self.stats.rejected += 1;
                    }
                }
                Command::Cancel(id) => {
                    if self.cancel(id).is_ok() {
                        plan.cancelled.push(id);
                    }
                }
            }
        }
    }

    fn apply_retention(&mut self) {
        let mut changed: Vec<RetentionUpdate> = Vec::new();
        self.pin.expire(self.now_ms, &mut changed);
        for update in changed {
            self.reuse
                .set_retention(update.block_hash, update.retention);
        }
    }

    fn pool_view(&self) -> PoolView {
        let cap = |r| self.alloc.capacity(r).unwrap_or(0);
        let free = |r| self.alloc.free_blocks(r).unwrap_or(0);
        PoolView {
            pinned_capacity: cap(RegionId::PINNED),
            pinned_free: free(RegionId::PINNED),
            dynamic_capacity: cap(RegionId::DYNAMIC),
            dynamic_free: free(RegionId::DYNAMIC),
        }
    }

    fn apply_resize(&mut self) {
        let bs = u64::from(self.cfg.block_size);
        let mut waiting = vec![0usize; usize::from(self.cfg.num_classes)];
        for s in self.waiting.iter().filter_map(|id| self.seqs.get(id)) {
            waiting[s.req.qos.index()] += (s.tokens.len() as u64).div_ceil(bs) as usize;
        }
        let waiting: Vec<ClassBlocks> = waiting
            .into_iter()
            .enumerate()
            .filter(|&(_, b)| b > 0)
            .map(|(c, blocks)| ClassBlocks {
                class: (c as u8).into(),
                blocks,
            })
            .collect();
        let sample = LoadSample {
            now_ms: self.now_ms,
            pool: self.pool_view(),
            waiting: &waiting,
        };
        let result = match self.pin.tick(&sample) {
            Resize::Hold => Ok(()),
            Resize::Grow { blocks, .. } => {
                self.alloc
                    .resize(RegionId::DYNAMIC, RegionId::PINNED, blocks)
            }
            Resize::Shrink { blocks, .. } => {
                self.alloc
                    .resize(RegionId::PINNED, RegionId::DYNAMIC, blocks)
            }
        };
        if result.is_err() {
            self.stats.resize_failures += 1;
        }
    }

    /// Reuse lookup for a waiting sequence that holds no blocks.
    fn lookup(&mut self, id: SeqId) {
        let Some(mut s) = self.seqs.remove(&id) else {
            return;
        };
        if s.table.num_blocks() == 0 && s.computed == 0 {
            let hit = self.reuse.lookup(&s.scope(), &s.tokens, self.now_ms);
            let bs = u64::from(self.cfg.block_size);
            // Never the whole context: the last token must be computed to yield logits.
            let usable = ((s.tokens.len() as u64 - 1) / bs) as usize;
            let mut keep = hit.blocks.len().min(usable);
            // A class the pin policy keeps out of the pinned region may not reuse its blocks.
            if !self.pin.may_hold_pinned(s.req.qos) {
                keep = hit.blocks[..keep]
                    .iter()
                    .position(|&b| self.alloc.region_of(b) == Ok(RegionId::PINNED))
                    .unwrap_or(keep);
            }
            if keep < hit.blocks.len() {
                self.reuse.release(&hit.blocks[keep..]);
            }
            for (i, &b) in hit.blocks[..keep].iter().enumerate() {
                if self.alloc.retain(b).is_err() {
                    // The index named a block the pool does not hold: take no more of it.
                    self.reuse.release(&hit.blocks[i..keep]);
                    break;
                }
                s.table.push_block(b);
                s.hit_blocks += 1;
            }
            let tokens = s.hit_blocks as u64 * bs;
            let _ = s.table.advance(tokens);
            s.computed = tokens;
            s.cached_tokens = tokens;
        }
        self.seqs.insert(id, s);
    }

    /// Gives back a lookup's blocks when the sequence could not be admitted after all.
    fn unlookup(&mut self, id: SeqId) {
        if let Some(mut s) = self.seqs.remove(&id) {
            self.drop_memory(&mut s);
            self.seqs.insert(id, s);
        }
    }

    fn admit(&mut self, id: SeqId) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.state = State::Running;
            self.stats.admitted += 1;
            self.stats.prompt_tokens += s.tokens.len() as u64;
            self.stats.cached_tokens += s.cached_tokens;
        }
        self.waiting.retain(|&w| w != id);
        self.running.push(id);
    }

    fn reject(&mut self, id: SeqId, why: Rejection, plan: &mut StepPlan) {
        if let Some(mut s) = self.seqs.remove(&id) {
            self.drop_memory(&mut s);
        }
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&w| w != id);
        plan.rejected.push((id, why));
        self.stats.rejected += 1;
    }

    /// Makes room in `id`'s table for `n` more tokens, asking the pin policy where the
    /// blocks come from and evicting or preempting as it directs.
    fn grow(
        &mut self,
        id: SeqId,
        n: u64,
        scheduled: &mut Vec<(SeqId, u64)>,
        budget: &mut usize,
        plan: &mut StepPlan,
    ) -> Grow {
        loop {
            let Some(s) = self.seqs.get(&id) else {
                return Grow::PreemptedSelf;
            };
            let needed = s.table.blocks_needed(n);
            if needed == 0 {
                return Grow::Done;
            }
            let running = s.state == State::Running;
            let req = PlaceRequest {
                seq: id,
                tenant: s.req.tenant,
                class: s.req.qos,
                blocks: needed,
                now_ms: self.now_ms,
            };
            let placement = self.pin.place(&req, &self.pool_view());
            match placement {
                Placement::Allocate { blocks, .. } => {
                    // A new admission may not dip into the dynamic region's watermark reserve:
                    // that is kept for running sequences to grow into.
                    let admissible = running
                        || blocks.dynamic == 0
                        || self.alloc.can_allocate(RegionId::DYNAMIC, blocks.dynamic)
                            != Ok(Admission::Later);
                    if !admissible {
                        let _ = self.pin.release(id, blocks);
                    } else if self.take_blocks(id, blocks) {
                        return Grow::Done;
                    }
                    // Not admissible, or the policy's view counted cached blocks as free
                    // space: fall through to eviction.
                }
                Placement::Refuse { reason } => return Grow::Refused(reason),
                Placement::PreemptLowest { victim } => {
                    if let Some(v) = self.victim(Some(victim), id) {
                        self.preempt(v, scheduled, budget, plan);
                        continue;
                    }
                }
                Placement::Downgrade {
                    class: capped,
                    max_running,
                } => {
                    if let Some(cap) = self.caps.get_mut(capped.index()) {
                        *cap = Some(max_running);
                    }
                    let mut preempted = false;
                    while self.count_running(capped) > max_running {
                        match self.victim(Some(capped), id) {
                            Some(v) => {
                                self.preempt(v, scheduled, budget, plan);
                                preempted = true;
                            }
                            None => break,
                        }
                    }
                    if preempted {
                        continue;
                    }
                }
                Placement::Wait { .. } => {}
            }
            // Exhausted: evict cached blocks first, then (for a running sequence) preempt.
            if self.evict(needed) > 0 {
                continue;
            }
            if !running {
                return Grow::Wait;
            }
            match self.victim(None, id) {
                Some(v) if self.rank_key(v, false) > self.rank_key(id, false) => {
                    self.preempt(v, scheduled, budget, plan);
                }
                _ => {
                    self.preempt(id, scheduled, budget, plan);
                    return Grow::PreemptedSelf;
                }
            }
        }
    }

    fn count_running(&self, class: QosClass) -> usize {
        self.running
            .iter()
            .filter(|id| self.seqs.get(id).is_some_and(|s| s.req.qos == class))
            .count()
    }

    /// The least important, latest running sequence (of `class`, if given), other than `not`.
    fn victim(&self, class: Option<QosClass>, not: SeqId) -> Option<SeqId> {
        self.running
            .iter()
            .copied()
            .filter(|&id| id != not)
            .filter(|id| class.is_none_or(|c| self.seqs.get(id).is_some_and(|s| s.req.qos == c)))
            .max_by_key(|&id| self.rank_key(id, false))
    }

    /// Allocates a placement's blocks into `id`'s table; all or nothing.
    fn take_blocks(&mut self, id: SeqId, blocks: RegionBlocks) -> bool {
        let Some(mut s) = self.seqs.remove(&id) else {
            return false;
        };
        self.scratch.clear();
        let mut ok = true;
        for (region, count) in [
            (RegionId::PINNED, blocks.pinned),
            (RegionId::DYNAMIC, blocks.dynamic),
        ] {
            for _ in 0..count {
                let prev = self
                    .scratch
                    .last()
                    .copied()
                    .or(s.table.blocks().last().copied());
                match self.alloc.allocate_after(region, prev) {
                    Ok(b) => self.scratch.push(b),
                    Err(_) => {
                        ok = false;
                        break;
                    }
                }
            }
            if !ok {
                break;
            }
        }
        if ok {
            for &b in &self.scratch {
                s.table.push_block(b);
            }
            s.placed.pinned += blocks.pinned;
            s.placed.dynamic += blocks.dynamic;
        } else {
            for &b in &self.scratch {
                let _ = self.alloc.release(b);
            }
            let _ = self.pin.release(id, blocks);
        }
        self.scratch.clear();
        self.seqs.insert(id, s);
        ok
    }

    /// Evicts up to `count` cached blocks; returns how many went.
    fn evict(&mut self, count: usize) -> usize {
        let mut evicted = Vec::new();
        self.reuse.evict(count, self.now_ms, &mut evicted);
        for &b in &evicted {
            let _ = self.alloc.release(b);
        }
        self.stats.evicted_blocks += evicted.len() as u64;
        evicted.len()
    }

    /// Drops a running sequence's KV and sends it back to wait (recompute).
    fn preempt(
        &mut self,
        id: SeqId,
        scheduled: &mut Vec<(SeqId, u64)>,
        budget: &mut usize,
        plan: &mut StepPlan,
    ) {
        let Some(mut s) = self.seqs.remove(&id) else {
            return;
        };
        if let Some(at) = scheduled.iter().position(|&(sid, _)| sid == id) {
            let (_, n) = scheduled.remove(at);
            *budget += n as usize;
        }
        let blocks = s.table.num_blocks();
        if blocks > 0 && self.host_free.len() >= blocks {
            // Swap out: the KV moves to the host pool and the sequence resumes where it was.
            for i in 0..blocks {
                let (Some(host), Some(&device)) = (self.host_free.pop(), s.table.blocks().get(i))
                else {
                    break;
                };
                plan.swap_out.push(SwapPair { device, host });
                s.swapped.push(host);
            }
            let computed = s.computed.min(s.table.num_tokens());
            let swapped = std::mem::take(&mut s.swapped);
            self.drop_memory(&mut s);
            s.swapped = swapped;
            s.computed = computed;
            self.stats.swapped_out += 1;
        } else {
            self.drop_memory(&mut s);
        }
        s.state = State::Waiting;
        s.preemptions += 1;
        self.seqs.insert(id, s);
        self.running.retain(|&r| r != id);
        self.waiting.push(id);
        plan.preempted.push(id);
        self.stats.preempted += 1;
    }

    /// Brings a swapped-out sequence's KV back into the blocks just allocated for it.
    fn swap_in(&mut self, id: SeqId, plan: &mut StepPlan) {
        let Some(s) = self.seqs.get_mut(&id) else {
            return;
        };
        for (&host, &device) in s.swapped.iter().zip(s.table.blocks()) {
            plan.swap_in.push(SwapPair { device, host });
        }
        self.host_free.append(&mut s.swapped);
        let _ = s.table.advance(s.computed);
        self.stats.swapped_in += 1;
    }

    /// Host-pool blocks free.
    #[must_use]
    pub fn host_free_blocks(&self) -> usize {
        self.host_free.len()
    }

    /// Releases everything a sequence holds: block references, reuse marks, pin accounting,
    /// host blocks.
    fn drop_memory(&mut self, s: &mut Seq) {
        self.host_free.append(&mut s.swapped);
        self.reuse.release(&s.table.blocks()[..s.hit_blocks]);
        let _ = s.table.release_all(&mut self.alloc);
        let _ = self.pin.release(s.req.id, s.placed);
        s.placed = RegionBlocks::default();
        s.hit_blocks = 0;
        s.computed = 0;
        s.cached_tokens = 0;
        s.awaiting_sample = false;
    }

    /// Offers a sequence's computed full blocks to the reuse index.
    fn offer(&mut self, s: &Seq) {
        let bs = self.cfg.block_size as usize;
        let full = (s.computed as usize / bs).min(s.table.num_blocks());
        if full == 0 {
            return;
        }
        let mut newly = Vec::new();
        self.reuse.insert(
            &s.scope(),
            &s.tokens[..full * bs],
            &s.table.blocks()[..full],
            self.now_ms,
            &mut newly,
        );
        for b in newly {
            let _ = self.alloc.retain(b);
        }
    }

    fn build_plan(&mut self, scheduled: &[(SeqId, u64)], plan: &mut StepPlan) {
        let bs = u64::from(self.cfg.block_size);
        plan.qo_indptr.push(0);
        plan.kv_indptr.push(0);
        let mut pages_total = 0;
        for (id, n) in scheduled {
            if let Some(s) = self.seqs.get(id) {
                pages_total += (s.computed + n).div_ceil(bs) as usize;
            }
        }
        plan.kv_indices.reserve(pages_total);
        for &(id, n) in scheduled {
            let Some(s) = self.seqs.get_mut(&id) else {
                continue;
            };
            let start = s.computed;
            let end = start + n;
            // Blocks are held; mark the tokens written.
            let _ = s.table.advance(end - s.table.num_tokens());
            let blocks = s.table.blocks();
            let mut pos = start;
            while pos < end {
                // One block at a time: its slots are consecutive.
                let index = (pos / bs) as usize;
                let block_end = ((index as u64 + 1) * bs).min(end);
                let base = blocks
                    .get(index)
                    .map_or(0, |b| i64::from(b.get()) * bs as i64);
                let first = (pos % bs) as i64;
                plan.slot_mapping
                    .extend((0..(block_end - pos) as i64).map(|k| base + first + k));
                pos = block_end;
            }
            s.computed = end;
            let samples = end == s.tokens.len() as u64;
            s.awaiting_sample = samples;
            let pages = end.div_ceil(bs) as usize;
            plan.kv_indices
                .extend(s.table.blocks()[..pages].iter().map(|b| b.get()));
            plan.kv_indptr.push(plan.kv_indices.len() as u32);
            plan.qo_indptr.push(plan.slot_mapping.len() as u32);
            plan.seq_lens.push(end as u32);
            plan.seqs.push(ScheduledSeq {
                seq: id,
                qos: s.req.qos,
                positions: start..end,
                samples,
            });
        }
    }
}

impl From<Refusal> for Rejection {
    fn from(reason: Refusal) -> Self {
        match reason {
            Refusal::TenantOverQuota => Rejection::TenantOverQuota,
            Refusal::UnknownClass => Rejection::UnknownClass,
            _ => Rejection::Impossible,
        }
    }
}
