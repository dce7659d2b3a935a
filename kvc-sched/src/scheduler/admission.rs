//! Admission and QoS ordering: which running sequences are served first, which waiting
//! requests are admitted (effective class with aging, FCFS within a class; `Downgrade` caps
//! are kept and lifted by the pin policy), and the submissions and cancellations queued by
//! other threads.

use kvc_core::{BlockAllocator, PinPolicy, QosClass, ReuseIndex, SeqId};

use super::memory::{Grow, TierStart};
use super::{Scheduler, State};
use crate::LoadId;
use crate::plan::{Rejection, StepPlan};
use crate::queue::Command;

impl<A: BlockAllocator, P: PinPolicy, R: ReuseIndex> Scheduler<A, P, R> {
    /// Running sequences, most important first: one decode token each or their next prefill
    /// chunk, under the budget.
    pub(super) fn schedule_running(
        &mut self,
        scheduled: &mut Vec<(SeqId, u64)>,
        budget: &mut usize,
        plan: &mut StepPlan,
    ) {
        for id in self.ordered(&self.running, false) {
            if *budget == 0 {
                break;
            }
            let Some(s) = self.seqs.get(&id) else {
                continue;
            };
            // A sequence waiting for its load from the tiers is in no batch.
            if s.state != State::Running || s.awaiting_sample || s.loading.is_some() {
                continue;
            }
            // Compute reserve hook: the gate may shrink or defer best-effort work.
            let (qos, decode) = (s.req.qos, s.pending() == 1 && s.generated() > 0);
            let n = match self.gate.as_mut() {
                Some(g) => g.grant(qos, s.pending(), decode, *budget),
                None => s.pending(),
            }
            .min(*budget as u64);
            if n == 0 {
                continue;
            }
            match self.grow(id, n, scheduled, budget, plan) {
                Grow::Done => {
                    scheduled.push((id, n));
                    *budget -= n as usize;
                    if let Some(g) = self.gate.as_mut() {
                        g.commit(qos, n, decode);
                    }
                }
                Grow::PreemptedSelf | Grow::Wait => {}
                Grow::Refused(why) => self.reject(id, why, plan),
            }
        }
    }

    /// Waiting requests, by effective class then arrival. A class whose head cannot be
    /// placed admits nothing more this step (FCFS within a class); nothing is admitted in a
    /// step that preempted, except a class with a compute share.
    pub(super) fn admit_waiting(
        &mut self,
        scheduled: &mut Vec<(SeqId, u64)>,
        budget: &mut usize,
        plan: &mut StepPlan,
    ) {
        let preempted_now = !plan.preempted.is_empty();
        let order = self.ordered(&self.waiting, true);
        let mut blocked = vec![false; usize::from(self.cfg.num_classes)];
        for id in order {
            if *budget == 0 {
                break;
            }
            let Some(s) = self.seqs.get(&id) else {
                continue;
            };
            // Put off for another sequence's load of its next blocks: nothing to try (no
            // lookup, no memory) until that load is reported, or its sequence is gone (its
            // blocks will not be cached then).
            if s.waits_for
                .is_some_and(|load| self.load_serves_a_sequence(load))
            {
                continue;
            }
            let (qos, swapped) = (s.req.qos, !s.swapped.is_empty());
            let class = qos.index();
            // Compute reserve hook: a class with a share is admitted even after a preemption
            // this step, and may preempt best-effort work for a running slot.
            let reserved = self.gate.as_ref().is_some_and(|g| g.is_reserved(qos));
            if (preempted_now && !reserved) || blocked[class] {
                continue;
            }
            if self.running.len() >= self.cfg.max_running
                && !(reserved && self.preempt_for_reserved(id, scheduled, budget, plan))
            {
                continue;
            }
            // Compute reserve hook: best-effort prefill the gate defers waits unopened.
            if let (Some(g), Some(s)) = (self.gate.as_mut(), self.seqs.get(&id))
                && g.grant(qos, s.pending(), false, *budget) == 0
            {
                blocked[class] = true;
                continue;
            }
            if let Err(err) = self.open_kv(id) {
                self.reject(id, Rejection::Memory(err), plan);
                continue;
            }
            // Tiers: a prompt that continues into blocks a lower tier holds is admitted to
            // wait for its load, out of this step's batch. One whose blocks are being loaded
            // for another sequence waits for that load (they are device hits after it), is not
            // tried again before it is reported, and holds up no one behind it.
            if !swapped {
                match self.start_load(id, plan) {
                    TierStart::Loading => {
                        self.admit(id);
                        continue;
                    }
                    TierStart::Wait => {
                        self.close_kv(id);
                        continue;
                    }
                    TierStart::Compute => {}
                }
            }
            let Some(s) = self.seqs.get(&id) else {
                continue;
            };
            // Compute reserve hook: the gate may shrink best-effort prefill (positive here,
            // as it was before the prefix lookup).
            let n = match self.gate.as_ref() {
                Some(g) => g.allowance(qos, s.pending(), false, *budget),
                None => s.pending(),
            }
            .min(*budget as u64);
            // A swapped-out sequence needs slots for its whole context again.
            let want = if swapped { s.computed + n } else { n };
            let mut outcome = self.grow(id, want, scheduled, budget, plan);
            // Compute reserve hook: a reserved admission that waits for memory preempts
            // best-effort sequences, a few per step at most.
            while matches!(outcome, Grow::Wait)
                && reserved
                && self.preempt_for_reserved(id, scheduled, budget, plan)
            {
                outcome = self.grow(id, want, scheduled, budget, plan);
            }
            match outcome {
                Grow::Done => {
                    if swapped {
                        self.swap_in(id, plan);
                    }
                    self.admit(id);
                    scheduled.push((id, n));
                    *budget -= n as usize;
                    if let Some(g) = self.gate.as_mut() {
                        g.commit(qos, n, false);
                    }
                }
                Grow::Wait | Grow::PreemptedSelf => {
                    self.close_kv(id);
                    blocked[class] = true;
                }
                Grow::Refused(why) => self.reject(id, why, plan),
            }
        }
    }

    /// Whether `load` is in flight for a sequence still here (whose blocks it will cache).
    fn load_serves_a_sequence(&self, load: LoadId) -> bool {
        self.loads.get(&load).is_some_and(|&(seq, _, _)| {
            self.seqs.get(&seq).is_some_and(|s| s.loading == Some(load))
        })
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

    pub(super) fn reject(&mut self, id: SeqId, why: Rejection, plan: &mut StepPlan) {
        if let Some(mut s) = self.seqs.remove(&id) {
            self.drop_memory(&mut s);
        }
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&w| w != id);
        plan.rejected.push((id, why));
        self.stats.rejected += 1;
    }

    /// `ids` by rank key, most important first (keys computed once, not per comparison).
    pub(super) fn ordered(&self, ids: &[SeqId], aging: bool) -> Vec<SeqId> {
        let mut keyed: Vec<_> = ids.iter().map(|&id| self.rank_key(id, aging)).collect();
        keyed.sort_unstable();
        keyed.into_iter().map(|(_, _, id)| id).collect()
    }

    pub(super) fn rank_key(&self, id: SeqId, aging: bool) -> (u8, u64, SeqId) {
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

    pub(super) fn count_running(&self, class: QosClass) -> usize {
        self.running
            .iter()
            .filter(|id| self.seqs.get(id).is_some_and(|s| s.req.qos == class))
            .count()
    }

    /// The least important, latest running sequence (of `class`, if given), other than `not`.
    /// Never one waiting for a load from the tiers: its blocks stay held until the load is
    /// reported, so preempting it would free nothing.
    pub(super) fn victim(&self, class: Option<QosClass>, not: SeqId) -> Option<SeqId> {
        self.running
            .iter()
            .copied()
            .filter(|&id| id != not)
            .filter(|id| self.seqs.get(id).is_some_and(|s| s.loading.is_none()))
            .filter(|id| class.is_none_or(|c| self.seqs.get(id).is_some_and(|s| s.req.qos == c)))
            .max_by_key(|&id| self.rank_key(id, false))
    }

    pub(super) fn apply_commands(&mut self, plan: &mut StepPlan) {
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
}
