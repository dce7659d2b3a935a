//! Plan building: the CSR page table, slot mapping and sampling flags of the scheduled
//! sequences, from the blocks the [`KvManager`](crate::KvManager) assigned.

use kvc_core::{BlockAllocator, PinPolicy, ReuseIndex, SeqId};

use super::Scheduler;
use crate::plan::{ScheduledSeq, StepPlan};

impl<A: BlockAllocator, P: PinPolicy, R: ReuseIndex> Scheduler<A, P, R> {
    pub(super) fn build_plan(&mut self, scheduled: &[(SeqId, u64)], plan: &mut StepPlan) {
        let bs = u64::from(self.cfg.block_size);
        self.chunked.clear();
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
            let pages = usize::try_from(end.div_ceil(bs)).unwrap_or(usize::MAX);
            let blocks = self.kv.blocks(id).unwrap_or_default();
            let Some(blocks) = blocks.get(..pages) else {
                // The manager granted these slots, so this is a broken invariant: leave the
                // sequence out of the plan rather than point it at another's blocks.
                debug_assert!(false, "{id} lacks pages for positions {start}..{end}");
                self.stats.kv_errors += 1;
                if let Err(err) = self.kv.rewind(id, start) {
                    self.last_kv_error = Some(err);
                }
                continue;
            };
            let mut pos = start;
            while pos < end {
                // One block at a time: its slots are consecutive.
                let index = (pos / bs) as usize;
                let block_end = ((index as u64 + 1) * bs).min(end);
                let base = i64::from(blocks[index].get()) * bs as i64;
                let first = (pos % bs) as i64;
                plan.slot_mapping
                    .extend((0..(block_end - pos) as i64).map(|k| base + first + k));
                pos = block_end;
            }
            plan.kv_indices.extend(blocks.iter().map(|b| b.get()));
            s.computed = end;
            let samples = end == s.tokens.len() as u64;
            s.awaiting_sample = samples;
            if !samples {
                // A prefill chunk: its full blocks are offered when the step completes.
                self.chunked.push(id);
            }
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
