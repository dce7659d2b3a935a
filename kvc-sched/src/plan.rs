//! [`StepPlan`]: the plain-data output of one scheduling step, which an engine executes.

use std::ops::Range;

use kvc_core::{
    BlockCopy, BlockId, HostBlockId, PageTable, PageTableError, PagedLayout, QosClass, SeqId,
    SlotMapping, SlotMappingError,
};

use crate::manager::KvError;
use crate::request::SubmitError;
use crate::tier::{BlockOffload, LoadJob};

/// One sequence's work in a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledSeq {
    /// The sequence.
    pub seq: SeqId,
    /// Its class.
    pub qos: QosClass,
    /// Token positions computed this step (a prefill chunk, or one decode position).
    pub positions: Range<u64>,
    /// Whether this step computes the sequence's last known token, so the engine samples a
    /// new token for it and returns it through `complete_step`.
    pub samples: bool,
}

/// A block moved between the device pool and the host pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SwapPair {
    /// The device block.
    pub device: BlockId,
    /// The host block.
    pub host: HostBlockId,
}

/// The batch of one step, in the CSR form paged-attention kernels take.
///
/// An engine executes it in this order: `offloads` (device to the lower tiers), `swap_out`
/// (device to host), `copies`, `loads` (the lower tiers to device; they may complete later),
/// `swap_in` (host to device), then the batch. A device block offloaded or swapped out may be
/// handed to another sequence in the same plan, which is safe in that order; no block of a
/// load is read by the batch, nor cached, before the load is reported with
/// `Scheduler::complete_load`.
///
/// For the `i`-th scheduled sequence: its new tokens' queries are
/// `qo_indptr[i]..qo_indptr[i + 1]` of the batch, its pages are
/// `kv_indices[kv_indptr[i]..kv_indptr[i + 1]]`, and it attends to `seq_lens[i]` tokens
/// (everything up to and including this step's tokens). `slot_mapping[t]` is the flat slot
/// (`block × block_size + offset`) where new token `t` of the batch writes its K and V.
///
/// Read each sequence's pages from every plan, never from an earlier one: a sequence's
/// earlier pages can change between plans. Where two requests computed the same prefix at
/// once, the later one takes the first one's cached blocks once its own are computed and
/// offered, and its duplicates are freed and may be handed to another sequence
/// (`KvManager::cache_blocks_adopting`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Step number, from 0.
    pub step: u64,
    /// The clock the plan was made at (the `now_ms` given to `Scheduler::step`): the clock of
    /// retention expiries, to pass with `offloads` to the tiers
    /// (`TierStack::offload_retained`).
    pub now_ms: u64,
    /// Scheduled sequences, in batch order.
    pub seqs: Vec<ScheduledSeq>,
    /// Query offsets per sequence (`seqs.len() + 1` entries).
    pub qo_indptr: Vec<u32>,
    /// Page offsets per sequence (`seqs.len() + 1` entries).
    pub kv_indptr: Vec<u32>,
    /// Physical block ids, concatenated.
    pub kv_indices: Vec<u32>,
    /// Context length per sequence after this step.
    pub seq_lens: Vec<u32>,
    /// KV write slot of each new token.
    pub slot_mapping: Vec<i64>,
    /// Block copies to perform after `swap_out` and before `swap_in` and the batch: the
    /// copy-on-write of a partial block shared with a fork.
    pub copies: Vec<BlockCopy>,
    /// Blocks of preempted sequences to copy to the host pool, first of all.
    pub swap_out: Vec<SwapPair>,
    /// Blocks of resumed sequences to copy back from the host pool, before the batch.
    pub swap_in: Vec<SwapPair>,
    /// Device blocks to copy down to the lower tiers, FIRST of all (before `swap_out`,
    /// `copies`, `loads`, `swap_in` and the batch): cached blocks the device evicts
    /// (`TierMode::WriteBack`, and such a block may be handed to another sequence in this
    /// plan) or has just cached (`TierMode::WriteThrough`). Empty without tiers.
    pub offloads: Vec<BlockOffload>,
    /// Loads from the lower tiers into freshly allocated device blocks, after `copies` and
    /// before `swap_in` and the batch. They may complete later (asynchronously): the engine
    /// reports each with `Scheduler::complete_load`; until then its sequence is in no batch.
    /// Empty without tiers.
    pub loads: Vec<LoadJob>,
    /// Sequences preempted this step (their KV was swapped out, or dropped for recompute).
    pub preempted: Vec<SeqId>,
    /// Requests refused this step, with the reason.
    pub rejected: Vec<(SeqId, Rejection)>,
    /// Sequences cancelled this step.
    pub cancelled: Vec<SeqId>,
}

impl StepPlan {
    /// New tokens in the batch.
    #[must_use]
    pub fn num_tokens(&self) -> usize {
        self.slot_mapping.len()
    }

    /// Empties every list, keeping the buffers' capacity.
    pub fn clear(&mut self) {
        self.step = 0;
        self.now_ms = 0;
        self.seqs.clear();
        self.qo_indptr.clear();
        self.kv_indptr.clear();
        self.kv_indices.clear();
        self.seq_lens.clear();
        self.slot_mapping.clear();
        self.copies.clear();
        self.swap_out.clear();
        self.swap_in.clear();
        self.offloads.clear();
        self.loads.clear();
        self.preempted.clear();
        self.rejected.clear();
        self.cancelled.clear();
    }

    /// The batch page table as the kernels take it, validated against the engine's KV layout
    /// (every page in range, enough pages for every context).
    pub fn page_table(&self, layout: &PagedLayout) -> Result<PageTable, PageTableError> {
        PageTable::new(
            self.qo_indptr.clone(),
            self.kv_indptr.clone(),
            self.kv_indices.iter().map(|&b| BlockId(b)).collect(),
            self.seq_lens.clone(),
            layout,
        )
    }

    /// The slot mapping as the kernels take it, validated against the engine's KV layout.
    pub fn slots(&self, layout: &PagedLayout) -> Result<SlotMapping, SlotMappingError> {
        SlotMapping::new(self.slot_mapping.clone(), layout)
    }

    /// Whether the step has no batch to run. Its `offloads`, `loads`, copies and swaps are
    /// still to execute when it has any.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

/// Why the scheduler refused a request: one queued through a `Submitter` that failed
/// validation, or one the pin policy will never place.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// A queued submission was invalid.
    Invalid(SubmitError),
    /// The pin policy can never place it (too large for the regions its class may use).
    Impossible,
    /// Its tenant is over quota and the policy refuses.
    TenantOverQuota,
    /// The pin policy does not know its class.
    UnknownClass,
    /// A memory component broke its contract for this request (for example a pin policy
    /// granting fewer blocks than asked): it is refused rather than given missing slots.
    Memory(KvError),
}

/// Why a sequence finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced `max_new_tokens` tokens.
    Length,
    /// It produced the end-of-sequence token.
    Eos,
}

/// A sequence that finished in `complete_step`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finished {
    /// The sequence.
    pub seq: SeqId,
    /// Why.
    pub reason: FinishReason,
    /// The generated tokens.
    pub output: Vec<u32>,
    /// Prompt tokens served from the cache at its (last) admission: the device prefix cache
    /// plus blocks loaded from the lower tiers.
    pub cached_tokens: u64,
    /// Times it was preempted.
    pub preemptions: u32,
}
