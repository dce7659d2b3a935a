//! Glue of the optional compute reserve ([`ComputeReserve`]): turning it on, the demand it
//! sizes from, the per-step gate the hooks in [`admission`](super::admission) consult, and
//! preemption of best-effort work for a reserved admission.

use kvc_core::{BlockAllocator, PinPolicy, ReuseIndex, SeqId};

use super::Scheduler;
use crate::compute::{ClassDemand, ComputeConfigError, ComputeReserve, ComputeReserveConfig};
use crate::plan::StepPlan;

impl<A: BlockAllocator, P: PinPolicy, R: ReuseIndex> Scheduler<A, P, R> {
    /// Reserves a share of every step's token budget for the classes `reserve` gives one
    /// (see [`ComputeReserve`]).
    pub fn with_compute_reserve(
        mut self,
        reserve: ComputeReserveConfig,
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

    /// Opens the step's gate from each class's pending tokens and oldest first-token wait.
    pub(super) fn begin_compute_gate(&mut self, budget: usize) {
        if self.compute.is_none() {
            return;
        }
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
        self.gate = self
            .compute
            .as_mut()
            .map(|c| c.begin_step(now, &demand, budget));
    }

    /// Folds the step's gate into the reserve's counters.
    pub(super) fn end_compute_gate(&mut self) {
        if let (Some(c), Some(g)) = (self.compute.as_mut(), self.gate.take()) {
            c.end_step(g);
        }
    }

    /// Preempts the least important, latest running sequence of a class without a share that
    /// ranks below `for_id`'s, if the gate has a preemption left; whether it did.
    pub(super) fn preempt_for_reserved(
        &mut self,
        for_id: SeqId,
        scheduled: &mut Vec<(SeqId, u64)>,
        budget: &mut usize,
        plan: &mut StepPlan,
    ) -> bool {
        let (Some(g), Some(qos)) = (
            self.gate.as_ref(),
            self.seqs.get(&for_id).map(|s| s.req.qos),
        ) else {
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
                        .is_some_and(|s| {
                            s.req.qos > qos && !g.is_reserved(s.req.qos) && s.loading.is_none()
                        })
                    // A sequence aged to the requester's rank is no longer preempted for it,
                    // so best-effort work cannot be starved forever.
                    && self.rank_key(v, true).0 > qos.get()
            })
            .max_by_key(|&v| self.rank_key(v, false));
        let Some(victim) = victim else {
            return false;
        };
        if !self.gate.as_mut().is_some_and(|g| g.take_preemption()) {
            return false;
        }
        self.preempt(victim, scheduled, budget, plan);
        true
    }
}
