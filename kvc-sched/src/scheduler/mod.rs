//! [`Scheduler`]: continuous batching over paged KV, generic over the allocator, the pin
//! policy and the reuse index it composes, built on [`KvManager`].
//!
//! Each [`step`](Scheduler::step):
//! 1. applies queued submissions and cancellations, expired soft pins and session contexts,
//!    and the pin policy's resize decision;
//! 2. schedules running sequences, most important first (QoS class, then arrival): one decode
//!    token each, or the next prefill chunk, under the token budget, with slots from the
//!    [`KvManager`] (which evicts cached blocks only when that makes room); when memory runs
//!    out it preempts the least important, latest running sequence (swap out or recompute);
//! 3. admits waiting requests by effective class (aging lifts a request one class per
//!    `aging_ms` waited), FCFS within a class: computed-prefix lookup, then the first prefill
//!    chunk;
//! 4. emits a [`StepPlan`] with CSR page tables, slot mappings and copy-on-write pairs.
//!
//! [`complete_step`](Scheduler::complete_step) takes the sampled tokens back, offers computed
//! blocks to the reuse index, and finishes sequences, releasing everything they hold. A
//! `step` called again before `complete_step` is safe: the previous plan's samples are
//! forfeited and those sequences recompute their last token.
//!
//! The code is split by concern: [`admission`] (QoS ordering, aging, submissions),
//! [`memory`] (slots, preemption, reuse offers, through the [`KvManager`]), [`swap`] (the
//! host pool, allocated lazily) and [`build`] (the plan's CSR arrays); [`reserve`] is the
//! glue of the optional compute reserve ([`ComputeReserve`](crate::ComputeReserve)).

mod admission;
mod build;
mod memory;
mod reserve;
mod swap;

use ahash::{AHashMap as HashMap, AHashSet as HashSet};
use kvc_core::{
    BlockAllocator, BlockId, HostBlockId, LowerTiers, PinPolicy, Refusal, ReuseIndex, ReuseScope,
    SeqId, SessionId,
};
use thiserror::Error;

use crate::manager::{KvConfigError, KvError, KvManager, KvManagerConfig};
use crate::plan::{FinishReason, Finished, Rejection, StepPlan};
use crate::queue::{Command, SubmitQueue, Submitter};
use crate::request::{Request, SubmitError};
use crate::tier::{LoadError, LoadId, LoadResult, TierMode};
use swap::HostPool;

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
    /// Whether a session's finished turn keeps its cached context pinned (never evicted) for
    /// the session's next turn, and for how long. `None`: nothing is pinned; the context
    /// stays cached like any prefix and may be evicted under pressure.
    pub session_context: Option<SessionContext>,
}

/// How long a session's context is pinned after each turn: until
/// [`Scheduler::end_session`], or until `ttl_ms` after the turn finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionContext {
    /// Milliseconds of the caller's clock; `None`: until the session is ended.
    pub ttl_ms: Option<u64>,
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
            session_context: None,
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
    /// Memory operations a component refused (a broken invariant in the pool, the pin
    /// policy or the reuse index; see [`Scheduler::last_kv_error`]).
    pub kv_errors: u64,
    /// Copy-on-write block copies planned.
    pub cow_copies: u64,
    /// Of `kv_errors`, reuse-index calls refused (the scheduler and its index disagreed on
    /// who holds a block; 0 unless an index breaks the ownership rule).
    pub reuse_errors: u64,
    /// Loads from the lower tiers planned (one per admission that hit in the tiers).
    pub loads_issued: u64,
    /// Admissions put off because the prompt's next blocks were being loaded from the tiers
    /// for another sequence, rather than loading them a second time: counted once per wait.
    /// The request is not tried again (no lookup, no memory held) until that load is
    /// reported; its blocks are device hits then.
    pub load_waits: u64,
    /// Loads reported with [`Scheduler::complete_load`].
    pub loads_completed: u64,
    /// Of those, loads reported `Failed` (their missing blocks are recomputed).
    pub load_failures: u64,
    /// Prompt tokens served from the lower tiers (loaded blocks × block size), apart from
    /// `cached_tokens` (served from device memory).
    pub tier_tokens: u64,
    /// Steps planned while loads were in flight, summed over loads: a load issued in step
    /// `s` and reported before step `t` waited `t − s` steps.
    pub load_wait_steps: u64,
    /// Milliseconds of the caller's clock loads waited, summed (from the step that issued
    /// each to the last step time before it was reported).
    pub load_wait_ms: u64,
    /// Blocks the plans asked the engine to copy down to the tiers.
    pub offloaded_blocks: u64,
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
    /// Tokens whose KV is (or, once the current plan runs, will be) written; the manager has
    /// assigned exactly this many slots while the sequence is open there.
    computed: u64,
    cached_tokens: u64,
    state: State,
    preemptions: u32,
    awaiting_sample: bool,
    /// Host blocks holding this sequence's KV while it is swapped out, in table order.
    swapped: Vec<HostBlockId>,
    /// The load from the tiers it waits for (running, but in no batch), if any.
    loading: Option<LoadId>,
    /// Waiting: another sequence's load that brings in this one's next blocks. Admission is
    /// not tried again until that load is reported (they are device hits then); kept once
    /// it is, harmlessly (load ids are never reused).
    waits_for: Option<LoadId>,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.req.prompt.len()
    }
    fn pending(&self) -> u64 {
        self.tokens.len() as u64 - self.computed
    }
}

/// Continuous batching over paged KV.
///
/// `A` is the block source, `P` the pin policy that places blocks in regions, `R` the reuse
/// index. They meet only through `kvc-core` traits, inside a [`KvManager`].
#[derive(Debug)]
pub struct Scheduler<A, P, R> {
    cfg: SchedulerConfig,
    kv: KvManager<A, P, R>,
    queue: SubmitQueue,
    submitter: Submitter,
    seqs: HashMap<SeqId, Seq>,
    waiting: Vec<SeqId>,
    running: Vec<SeqId>,
    /// Sequences cancelled since the last plan (their samples are ignored).
    cancelled_since_plan: HashSet<SeqId>,
    step: u64,
    now_ms: u64,
    stats: SchedStats,
    last_kv_error: Option<KvError>,
    commands: Vec<Command>,
    scheduled: Vec<(SeqId, u64)>,
    /// Sequences the last plan gave a prefill chunk that does not sample: their newly
    /// computed full blocks are offered to the reuse index when the step completes.
    chunked: Vec<SeqId>,
    host: HostPool,
    /// Loads in flight: the sequence, the step and the time each was issued.
    loads: HashMap<LoadId, (SeqId, u64, u64)>,
    /// The share of each step's tokens held for reserved classes, if configured.
    compute: Option<crate::compute::ComputeReserve>,
    /// The compute reserve's rationing of the step being planned.
    gate: Option<crate::compute::StepGate>,
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
        let kv_cfg = KvManagerConfig {
            block_size: cfg.block_size,
            session_ttl_ms: cfg.session_context.and_then(|s| s.ttl_ms),
        };
        let kv = KvManager::new(kv_cfg, alloc, pin, reuse).map_err(|err| match err {
            KvConfigError::BlockSizeMismatch { manager, index } => ConfigError::BlockSizeMismatch {
                scheduler: manager,
                index,
            },
            _ => ConfigError::Zero { name: "block_size" },
        })?;
        let (queue, submitter) = SubmitQueue::new();
        Ok(Self {
            host: HostPool::new(cfg.host_blocks),
            cfg,
            kv,
            queue,
            submitter,
            seqs: HashMap::new(),
            waiting: Vec::new(),
            running: Vec::new(),
            cancelled_since_plan: HashSet::new(),
            step: 0,
            now_ms: 0,
            stats: SchedStats::default(),
            last_kv_error: None,
            commands: Vec::new(),
            scheduled: Vec::new(),
            chunked: Vec::new(),
            loads: HashMap::new(),
            compute: None,
            gate: None,
        })
    }

    /// Adds tiers below device memory (host, disk, shared; `kvc_tier::TierStack` implements
    /// [`LowerTiers`]). From then on:
    ///
    /// - an admission whose prompt continues past the device-cached prefix into blocks some
    ///   tier holds gets device blocks for them (under the same pressure rules as any
    ///   allocation; when they cannot be had, the prompt is computed instead) and a
    ///   [`LoadJob`](crate::LoadJob) in the plan's `loads`. The sequence counts as running but
    ///   is in no batch until the engine reports the load with
    ///   [`complete_load`](Self::complete_load); the other sequences run meanwhile;
    /// - cached blocks the device evicts (`TierMode::WriteBack`) or caches
    ///   (`TierMode::WriteThrough`) are listed in the plan's `offloads`, which the engine
    ///   copies down first of all.
    ///
    /// A sequence waiting for its load is never chosen for preemption (its blocks would not
    /// free anything before the load is reported). Cancelled meanwhile, it is gone at once,
    /// but the blocks being loaded stay held until the load is reported, then are freed.
    ///
    /// ```
    /// use std::sync::Arc;
    ///
    /// use kvc_alloc::{BlockPool, PoolConfig};
    /// use kvc_sched::{LowerTiers, QosClass, SeqId, StoreKey, TenantId};
    /// use kvc_reuse::{HashExtra, PolicyKind, PrefixCache, ScopedIndex, Xxh3Hasher};
    /// use kvc_sched::{DynamicOnly, LoadResult, Request, Scheduler, SchedulerConfig, TierMode};
    ///
    /// /// Tiers that hold every block (an engine would use a `kvc_tier::TierStack`).
    /// #[derive(Debug)]
    /// struct Everything;
    /// impl LowerTiers for Everything {
    ///     fn longest_prefix(&self, keys: &[StoreKey]) -> usize {
    ///         keys.len()
    ///     }
    /// }
    ///
    /// let index = ScopedIndex::new(PrefixCache::new(4, PolicyKind::Lru), Xxh3Hasher,
    ///                              HashExtra::new("m", 1));
    /// let cfg = SchedulerConfig { block_size: 4, ..SchedulerConfig::default() };
    /// let pool = BlockPool::new(PoolConfig::new(16))?;
    /// let mut sched = Scheduler::new(cfg, pool, DynamicOnly::default(), index)?
    ///     .with_tiers(Arc::new(Everything), TierMode::WriteBack);
    /// sched.submit(Request {
    ///     id: SeqId(1),
    ///     tenant: TenantId(0),
    ///     qos: QosClass::STANDARD,
    ///     session: None,
    ///     prompt: (0..10).collect(),
    ///     max_new_tokens: 1,
    ///     arrival_ms: 0,
    /// })?;
    /// let plan = sched.step(0);
    /// assert!(plan.seqs.is_empty()); // waiting for its two blocks
    /// assert_eq!(plan.loads[0].blocks.len(), 2);
    /// // ... the engine loads them, then:
    /// sched.complete_load(plan.loads[0].id, LoadResult::Loaded)?;
    /// let plan = sched.step(1);
    /// assert_eq!(plan.seqs[0].positions, 8..10);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use]
    pub fn with_tiers(mut self, tiers: std::sync::Arc<dyn LowerTiers>, mode: TierMode) -> Self {
        self.kv.set_tiers(tiers, mode);
        self
    }

    /// Reports how the load `id` (from a plan's `loads`) ended: with
    /// [`LoadResult::Loaded`] its sequence is computed up to the end of the loaded blocks;
    /// with [`LoadResult::Failed`] up to its leading `loaded_blocks`, and the rest of the
    /// blocks are recomputed in place. Either way the sequence is scheduled again from the
    /// next step. The loaded blocks are cached on the device for other requests. A load of a
    /// sequence cancelled meanwhile only releases the blocks it held.
    ///
    /// # Errors
    /// [`LoadError::Unknown`] (never issued), [`LoadError::AlreadyCompleted`] (reported twice)
    /// and [`LoadError::TooManyBlocks`]: nothing changed. A component that breaks an invariant
    /// while the load is applied is counted in `kv_errors`, not returned.
    pub fn complete_load(&mut self, id: LoadId, result: LoadResult) -> Result<(), LoadError> {
        let done = match self.kv.complete_load(id, result) {
            Ok(done) => Some(done),
            Err(LoadError::Memory { source, .. }) => {
                self.note(Err(source));
                None
            }
            Err(err) => return Err(err),
        };
        self.stats.loads_completed += 1;
        if matches!(result, LoadResult::Failed { .. }) {
            self.stats.load_failures += 1;
        }
        let Some((seq, step, ms)) = self.loads.remove(&id) else {
            return Ok(());
        };
        self.stats.load_wait_steps += self.step.saturating_sub(step);
        self.stats.load_wait_ms += self.now_ms.saturating_sub(ms);
        let Some(s) = self.seqs.get_mut(&seq).filter(|s| s.loading == Some(id)) else {
            return Ok(()); // cancelled meanwhile: the manager released the load's blocks
        };
        s.loading = None;
        match done.and_then(|d| d.computed) {
            Some(computed) => {
                self.stats.tier_tokens += computed.saturating_sub(s.computed);
                s.cached_tokens += computed.saturating_sub(s.computed);
                s.computed = computed;
            }
            None => {
                // The manager could not apply the load: recompute from what it holds.
                let held = self.kv.num_tokens(seq).unwrap_or(0).min(s.computed);
                s.computed = held;
                let rewound = self.kv.rewind(seq, held);
                self.note(rewound);
            }
        }
        Ok(())
    }

    /// Loads issued and not yet reported.
    #[must_use]
    pub fn pending_loads(&self) -> usize {
        self.kv.pending_loads()
    }

    /// Blocks to copy down to the tiers that the next plan's `offloads` will list. With
    /// write-through, the blocks cached by the last step wait for the next plan even when
    /// the scheduler [`is_idle`](Self::is_idle): an engine that stops stepping when idle
    /// plans one more (empty) step while this is not zero, so engines sharing its tiers see
    /// those blocks.
    #[must_use]
    pub fn pending_offloads(&self) -> usize {
        self.kv.pending_offloads()
    }

    /// A handle other threads use to submit and cancel; commands apply at the next step.
    #[must_use]
    pub fn submitter(&self) -> Submitter {
        self.submitter.clone()
    }

    /// The allocator.
    pub fn allocator(&self) -> &A {
        self.kv.allocator()
    }

    /// The pin policy.
    pub fn pin_policy(&self) -> &P {
        self.kv.pin_policy()
    }

    /// The pin policy, for soft pins and other settings.
    pub fn pin_policy_mut(&mut self) -> &mut P {
        self.kv.pin_policy_mut()
    }

    /// The reuse index.
    pub fn reuse_index(&self) -> &R {
        self.kv.reuse_index()
    }

    /// The reuse index, for tenant salts, invalidation and KV events.
    pub fn reuse_index_mut(&mut self) -> &mut R {
        self.kv.reuse_index_mut()
    }

    /// The KV manager the scheduler allocates through (usage figures, sessions).
    pub fn kv_manager(&self) -> &KvManager<A, P, R> {
        &self.kv
    }

    /// The KV manager, for eviction and sessions. Freeing, forking or rewinding a sequence
    /// the scheduler runs through it breaks the scheduler's accounting: use
    /// [`cancel`](Self::cancel) for those.
    pub fn kv_manager_mut(&mut self) -> &mut KvManager<A, P, R> {
        &mut self.kv
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> SchedStats {
        let kv = self.kv.stats();
        SchedStats {
            evicted_blocks: kv.evicted_blocks,
            offloaded_blocks: kv.offloaded_blocks,
            ..self.stats
        }
    }

    /// The last memory error a component reported (a broken invariant), if any.
    #[must_use]
    pub fn last_kv_error(&self) -> Option<&KvError> {
        self.last_kv_error.as_ref()
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

    /// The blocks a waiting or running sequence holds, in logical order.
    #[must_use]
    pub fn seq_blocks(&self, seq: SeqId) -> Option<&[BlockId]> {
        self.kv.blocks(seq).ok()
    }

    /// Tokens of KV held by running sequences, counted per sequence (a block shared by two
    /// sequences counts twice): the memory a cache without paging or sharing would need.
    #[must_use]
    pub fn resident_tokens(&self) -> u64 {
        self.running
            .iter()
            .filter_map(|&id| self.kv.num_tokens(id).ok())
            .sum()
    }

    /// Whether no request is waiting or running.
    #[must_use]
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Host-pool blocks free.
    #[must_use]
    pub fn host_free_blocks(&self) -> usize {
        self.host.free()
    }

    /// Ends a session: its pinned context becomes evictable.
    pub fn end_session(&mut self, session: SessionId) -> Result<(), KvError> {
        self.kv.end_session(session)
    }

    /// The application's word that a conversation has ended: its blocks are evicted before
    /// every other block (see [`KvManager::end_conversation`]), at the clock of the last
    /// step. `tokens` is the conversation's latest context (the last turn's prompt and
    /// reply); `keep_first` full blocks at its start keep their standing. With
    /// [`SchedulerConfig::session_context`] set, call [`end_session`](Self::end_session)
    /// first, or the session's pinned context stays as it is. Returns how many blocks were
    /// demoted.
    ///
    /// # Errors
    /// As [`KvManager::end_conversation`].
    pub fn end_conversation(
        &mut self,
        scope: &ReuseScope,
        tokens: &[u32],
        keep_first: usize,
    ) -> Result<usize, KvError> {
        self.kv
            .end_conversation(scope, tokens, keep_first, self.now_ms)
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
        let total = self.kv.allocator().total_blocks() as u64;
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
                req,
                tokens,
                computed: 0,
                cached_tokens: 0,
                state: State::Waiting,
                preemptions: 0,
                awaiting_sample: false,
                swapped: Vec::new(),
                loading: None,
                waits_for: None,
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
        self.forfeit_unsampled();
        self.cancelled_since_plan.clear();
        plan.step = self.step;
        plan.now_ms = now_ms;
        self.step += 1;
        self.stats.steps += 1;
        self.apply_commands(plan);
        self.apply_retention();
        self.apply_resize();

        let mut budget = self.cfg.max_batch_tokens;
        let mut scheduled = std::mem::take(&mut self.scheduled);
        self.begin_compute_gate(budget); // compute reserve: ration this step's tokens
        self.schedule_running(&mut scheduled, &mut budget, plan);
        self.admit_waiting(&mut scheduled, &mut budget, plan);
        self.end_compute_gate(); // compute reserve: fold the step into its counters
        self.build_plan(&scheduled, plan);
        self.kv.drain_offloads(&mut plan.offloads);
        self.stats.cow_copies += plan.copies.len() as u64;
        scheduled.clear();
        self.scheduled = scheduled;
    }

    /// Takes the tokens sampled for the last plan's sampling sequences, finishes those that
    /// are done, and offers newly computed blocks to the reuse index (the prompt of a sequence
    /// that sampled its first token, the blocks of finished sequences, and the full blocks of
    /// the plan's prefill chunks). All or nothing.
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
                    if self.cfg.session_context.is_some()
                        && let Some(session) = s.req.session
                    {
                        let kept = self.kv.keep_session(session, seq, self.now_ms);
                        self.note(kept.map(|_| ()));
                    }
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
                self.offer_in_place(seq);
            }
        }
        // Prefill chunks computed by the step: their full blocks are shared at once, so a
        // request with the same prefix admitted while the prefill goes on reuses them.
        for seq in std::mem::take(&mut self.chunked) {
            self.offer_in_place(seq);
        }
        Ok(finished)
    }

    /// A plan whose samples never came back: its sampling sequences give up that sample and
    /// recompute their last token, so nothing stays stuck holding blocks.
    fn forfeit_unsampled(&mut self) {
        let stuck: Vec<SeqId> = self
            .running
            .iter()
            .copied()
            .filter(|id| self.seqs.get(id).is_some_and(|s| s.awaiting_sample))
            .collect();
        for id in stuck {
            let Some(s) = self.seqs.get_mut(&id) else {
                continue;
            };
            s.awaiting_sample = false;
            s.computed -= 1;
            let computed = s.computed;
            let rewound = self.kv.rewind(id, computed);
            self.note(rewound);
        }
    }

    /// Records a memory error a component reported: a broken invariant, never user input.
    fn note(&mut self, result: Result<(), KvError>) {
        if let Err(err) = result {
            debug_assert!(false, "KV manager error: {err}");
            self.stats.kv_errors += 1;
            if matches!(err, KvError::Reuse(_)) {
                self.stats.reuse_errors += 1;
            }
            self.last_kv_error = Some(err);
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
