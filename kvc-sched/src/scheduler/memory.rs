//! Memory and preemption: slots for scheduled tokens through the [`KvManager`], preemption
//! (swap out to the host pool, or drop for recompute after offering the computed blocks),
//! reuse offers, expiring pins and sessions, and the pin policy's region resizes.
//!
//! [`KvManager`]: crate::KvManager

use kvc_core::{
    BlockAllocator, ClassBlocks, LoadSample, PinPolicy, RegionId, Resize, RetentionUpdate,
    ReuseIndex, SeqId,
};

use super::{Scheduler, Seq, State};
use crate::PrefixLoad;
use crate::manager::{KvError, KvManager, Pressure, SeqOwner, SlotGrant, SlotRequest};
use crate::plan::{Rejection, StepPlan, SwapPair};

/// What a tier lookup at admission started.
pub(super) enum TierStart {
    /// No load: compute the rest of the prompt.
    Compute,
    /// A load started: admit the sequence to wait for it.
    Loading,
    /// Its blocks are being loaded for another sequence: admit it in a later step.
    Wait,
}

/// How a request for more slots ended.
pub(super) enum Grow {
    Done,
    Wait,
    PreemptedSelf,
    Refused(Rejection),
}

impl<A: BlockAllocator, P: PinPolicy, R: ReuseIndex> Scheduler<A, P, R> {
    /// Opens a waiting sequence in the KV manager and takes its computed prefix (unless it
    /// is swapped out: its KV comes back from the host pool instead).
    pub(super) fn open_kv(&mut self, id: SeqId) -> Result<(), KvError> {
        let Some(s) = self.seqs.get(&id) else {
            return Ok(());
        };
        if self.kv.contains(id) {
            return Ok(());
        }
        let owner = SeqOwner {
            tenant: s.req.tenant,
            class: s.req.qos,
            session: s.req.session,
        };
        self.kv.open(id, owner)?;
        if s.swapped.is_empty() {
            let tokens = self.kv.lookup_prefix(id, &s.tokens, self.now_ms)?;
            if let Some(s) = self.seqs.get_mut(&id) {
                s.computed = tokens;
                s.cached_tokens = tokens;
            }
        }
        Ok(())
    }

    /// With tiers: continues the just-opened sequence's prefix into the lower tiers. On a
    /// hit its device blocks are allocated and the load joins the plan; the caller admits it
    /// (running, out of the batch until `complete_load`). When the blocks are being loaded
    /// for another sequence already, the caller puts the admission off until that load is
    /// reported, when they are device hits.
    pub(super) fn start_load(&mut self, id: SeqId, plan: &mut StepPlan) -> TierStart {
        if self.kv.tier_mode().is_none() {
            return TierStart::Compute;
        }
        let Some(s) = self.seqs.get(&id) else {
            return TierStart::Compute;
        };
        match self.kv.load_prefix(id, &s.tokens, self.now_ms) {
            Ok(PrefixLoad::Started(job)) => {
                if let Some(s) = self.seqs.get_mut(&id) {
                    s.loading = Some(job.id);
                }
                self.loads.insert(job.id, (id, plan.step, self.now_ms));
                plan.loads.push(job);
                self.stats.loads_issued += 1;
                TierStart::Loading
            }
            Ok(PrefixLoad::InFlight { load }) => {
                if let Some(s) = self.seqs.get_mut(&id) {
                    s.waits_for = Some(load);
                }
                self.stats.load_waits += 1;
                TierStart::Wait
            }
            Ok(PrefixLoad::None) => TierStart::Compute,
            Err(err) => {
                self.note(Err(err));
                TierStart::Compute
            }
        }
    }

    /// Gives back a waiting sequence's memory when it could not be admitted after all.
    pub(super) fn close_kv(&mut self, id: SeqId) {
        if !self.kv.contains(id) {
            return;
        }
        let freed = self.kv.free(id);
        self.note(freed);
        if let Some(s) = self.seqs.get_mut(&id)
            && s.swapped.is_empty()
        {
            s.computed = 0;
            s.cached_tokens = 0;
        }
    }

    /// Makes room for `n` more tokens of `id`, preempting as the pin policy or memory
    /// pressure directs. The manager evicts cached blocks only when that makes room.
    pub(super) fn grow(
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
            let running = s.state == State::Running;
            let ask = SlotRequest {
                new_tokens: n,
                lookahead: 0,
                admission: !running,
            };
            let grant = match self
                .kv
                .allocate_slots(id, ask, self.now_ms, &mut plan.copies)
            {
                Ok(grant) => grant,
                Err(err) => {
                    // A component broke its contract (a pin policy granting another count
                    // than asked, a pool refusing what it reported free): refuse the request
                    // with the error rather than plan slots that do not exist.
                    self.stats.kv_errors += 1;
                    self.last_kv_error = Some(err.clone());
                    return Grow::Refused(Rejection::Memory(err));
                }
            };
            match grant {
                SlotGrant::Now => return Grow::Done,
                SlotGrant::Never(reason) => return Grow::Refused(reason.into()),
                SlotGrant::Later(Pressure::PreemptLowest { victim }) => {
                    if let Some(v) = self.victim(Some(victim), id) {
                        self.preempt(v, scheduled, budget, plan);
                        continue;
                    }
                }
                SlotGrant::Later(Pressure::Downgrade {
                    class: capped,
                    max_running,
                }) => {
                    // Preempt down to the cap now; the pin policy keeps the cap itself (it
                    // answers new sequences of the class with a wait) and lifts it as memory
                    // recovers, so the scheduler keeps no copy that could outlive it.
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
                SlotGrant::Later(_) => {}
            }
            // Out of memory: a waiting request waits; a running one preempts the least
            // important sequence, or itself when that is the least important.
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

    /// Takes a running sequence off the device: swaps its computed KV out to the host pool
    /// when it has room, otherwise offers its computed blocks to the reuse index (so it
    /// reuses them when it comes back) and drops them for recompute.
    pub(super) fn preempt(
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
        let bs = u64::from(self.cfg.block_size);
        let blocks: Vec<_> = self.kv.blocks(id).map(<[_]>::to_vec).unwrap_or_default();
        // Copies planned into this sequence's blocks no longer matter.
        plan.copies.retain(|c| !blocks.contains(&c.dst));
        let keep = usize::try_from(s.computed.div_ceil(bs))
            .unwrap_or(usize::MAX)
            .min(blocks.len());
        if keep > 0 && self.host.free() >= keep {
            // Swap out: the KV moves to the host pool and the sequence resumes where it was.
            for &device in &blocks[..keep] {
                if let Some(host) = self.host.take() {
                    plan.swap_out.push(SwapPair { device, host });
                    s.swapped.push(host);
                }
            }
            let computed = s.computed;
            let swapped = std::mem::take(&mut s.swapped);
            self.drop_memory(&mut s);
            s.swapped = swapped;
            s.computed = computed;
            self.stats.swapped_out += 1;
        } else {
            self.offer(&s);
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
    pub(super) fn swap_in(&mut self, id: SeqId, plan: &mut StepPlan) {
        let Some(s) = self.seqs.get_mut(&id) else {
            return;
        };
        let blocks = self.kv.blocks(id).unwrap_or_default();
        for (&host, &device) in s.swapped.iter().zip(blocks) {
            plan.swap_in.push(SwapPair { device, host });
        }
        self.host.give_back(&mut s.swapped);
        self.stats.swapped_in += 1;
    }

    /// Releases everything a sequence holds: its KV (through the manager) and host blocks.
    pub(super) fn drop_memory(&mut self, s: &mut Seq) {
        self.host.give_back(&mut s.swapped);
        let id = s.req.id;
        if self.kv.contains(id) {
            let freed = self.kv.free(id);
            self.note(freed);
        }
        s.computed = 0;
        s.cached_tokens = 0;
        s.awaiting_sample = false;
        s.loading = None;
    }

    /// Offers a sequence's computed full blocks to the reuse index (one taken out of `seqs`).
    pub(super) fn offer(&mut self, s: &Seq) {
        let cached = offer_computed(&mut self.kv, s, self.now_ms);
        self.note(cached);
    }

    /// [`offer`](Self::offer) for a sequence still in `seqs`, left there.
    pub(super) fn offer_in_place(&mut self, id: SeqId) {
        let Some(s) = self.seqs.get(&id) else {
            return;
        };
        let cached = offer_computed(&mut self.kv, s, self.now_ms);
        self.note(cached);
    }

    /// Expired soft pins reach the reuse index; expired session contexts are released.
    pub(super) fn apply_retention(&mut self) {
        let mut changed: Vec<RetentionUpdate> = Vec::new();
        self.kv.pin_policy_mut().expire(self.now_ms, &mut changed);
        for update in changed {
            self.kv
                .reuse_index_mut()
                .set_retention(update.block_hash, update.retention);
        }
        let expired = self.kv.expire_sessions(self.now_ms);
        self.note(expired.map(|_| ()));
    }

    /// Shows the pin policy the load and applies its resize of the pinned region.
    pub(super) fn apply_resize(&mut self) {
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
            pool: self.kv.pool_view(),
            waiting: &waiting,
        };
        let result = match self.kv.pin_policy_mut().tick(&sample) {
            Resize::Hold => Ok(()),
            Resize::Grow { blocks, .. } => {
                self.kv.resize(RegionId::DYNAMIC, RegionId::PINNED, blocks)
            }
            Resize::Shrink { blocks, .. } => {
                self.kv.resize(RegionId::PINNED, RegionId::DYNAMIC, blocks)
            }
        };
        if result.is_err() {
            self.stats.resize_failures += 1;
        }
    }
}

/// Offers `s`'s computed full blocks through `kv`, if the manager holds the sequence. A
/// block another sequence cached first is replaced by the cached copy
/// ([`KvManager::cache_blocks_adopting`]): offers happen between steps and every plan
/// carries whole block tables, so the next plan reads the new table.
fn offer_computed<A: BlockAllocator, P: PinPolicy, R: ReuseIndex>(
    kv: &mut KvManager<A, P, R>,
    s: &Seq,
    now_ms: u64,
) -> Result<(), KvError> {
    let id = s.req.id;
    if !kv.contains(id) {
        return Ok(());
    }
    let computed = usize::try_from(s.computed)
        .unwrap_or(usize::MAX)
        .min(s.tokens.len());
    let mut adopted = Vec::new();
    kv.cache_blocks_adopting(id, &s.tokens[..computed], now_ms, &mut adopted)
        .map(|_| ())
}
