//! Predictive promotion for the `tiers` scenario: which ended requests to bring back from the
//! host tier into device memory ahead of their next turn, and when.
//!
//! Everything is learned online from what the replay has shown so far; nothing is fitted to a
//! trace:
//!
//! - **Follow-ups.** Every full block a request is the first to cache is owned by it. A later
//!   request whose deepest known block is owned by request `P`, and which reuses more than
//!   half of `P`'s full blocks, continues `P` (its prompt extends `P`'s own blocks; a system
//!   prompt shared by every conversation does not make them one); its turn number is `P`'s
//!   plus one. The probability that a
//!   request gets a follow-up is counted per turn class (1, 2-3, 4-7, ..., 32+), with one
//!   success and one failure of prior (requests still waiting count as failures: the estimate
//!   leans low).
//! - **Gaps.** The times from a request to its follow-up, kept sorted.
//! - **Device residence.** How long an unused block stays on the device before the cache
//!   evicts it: the age of the youngest block of the latest eviction.
//! - **Unshared tail.** How many of a parent's last full blocks its follow-up did not reuse
//!   (the new turn rewrites the end of the prompt): the mean so far; promotion skips them.
//!
//! When a request ends, its promotion is planned `d` after it, with `d` no earlier than the
//! device residence `R` (before that the blocks are still on the device); promoted blocks stay
//! about `R` on the device, so the promotion serves follow-ups arriving in `[d, d + R]`. The
//! plan picks `d` among the residence and the gaps' quantiles to maximise the odds that the
//! promotion is used, `p·P(gap in [d, d+R]) / (1 - p·P(gap < d))` (a follow-up arriving
//! before `d` cancels it), and is kept when those odds reach the threshold.

use std::collections::HashMap;

use kvc_reuse::BlockHash;

/// Turn classes: 1, 2-3, 4-7, 8-15, 16-31, 32+.
const CLASSES: usize = 6;
/// Quantiles of the gaps tried as promotion delays.
const CANDIDATES: usize = 32;

fn class(turn: u32) -> usize {
    (turn.max(1).ilog2() as usize).min(CLASSES - 1)
}

#[derive(Clone, Copy, Debug)]
struct Ended {
    turn: u32,
    ts: u64,
    full_blocks: u32,
    followed: bool,
}

/// The online predictor: see the [module docs](self).
#[derive(Debug, Default)]
pub(crate) struct Predictor {
    owner: HashMap<u128, u32>,
    ended: Vec<Ended>,
    followed_per_class: [u64; CLASSES],
    ended_per_class: [u64; CLASSES],
    gaps: Vec<u64>,
    residence_ms: Option<u64>,
    tail_sum: u64,
    tail_count: u64,
}

/// A request that arrived, as the predictor saw it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Arrival {
    /// Its turn number (1: no earlier request it continues).
    pub turn: u32,
}

impl Predictor {
    /// Sees request `req` arrive at `now` with full blocks `hashes`: finds the request it
    /// continues and learns from it.
    pub(crate) fn arrive(&mut self, hashes: &[BlockHash], now: u64) -> Arrival {
        let found = hashes
            .iter()
            .enumerate()
            .rev()
            .find_map(|(i, h)| self.owner.get(&h.0).map(|&p| (i, p)));
        // A prefix shared with many (a system prompt) is no continuation: the request must
        // reuse more than half of its parent's full blocks.
        let Some((depth, parent)) = found.filter(|&(depth, parent)| {
            2 * (depth as u64 + 1) > u64::from(self.ended[parent as usize].full_blocks)
        }) else {
            return Arrival { turn: 1 };
        };
        let p = &mut self.ended[parent as usize];
        let turn = p.turn.saturating_add(1);
        if !p.followed {
            p.followed = true;
            self.followed_per_class[class(p.turn)] += 1;
            let gap = now.saturating_sub(p.ts);
            let at = self.gaps.partition_point(|&g| g <= gap);
            self.gaps.insert(at, gap);
            self.tail_sum += u64::from(p.full_blocks).saturating_sub(depth as u64 + 1);
            self.tail_count += 1;
        }
        Arrival { turn }
    }

    /// Records request `req` (the `req`-th call of [`end`](Self::end)) ending at `now`.
    /// Returns the delay after `now` at which to promote its blocks, when the odds that the
    /// promotion is used reach `min_odds`.
    pub(crate) fn end(
        &mut self,
        hashes: &[BlockHash],
        turn: u32,
        now: u64,
        min_odds: f64,
    ) -> Option<u64> {
        let req = self.ended.len() as u32;
        for h in hashes {
            self.owner.entry(h.0).or_insert(req);
        }
        self.ended.push(Ended {
            turn,
            ts: now,
            full_blocks: hashes.len() as u32,
            followed: false,
        });
        let c = class(turn);
        self.ended_per_class[c] += 1;
        let residence = self.residence_ms?;
        let p = (self.followed_per_class[c] + 1) as f64 / (self.ended_per_class[c] + 2) as f64;
        let (delay, odds) = self.best_delay(p, residence);
        (odds >= min_odds).then_some(delay)
    }

    fn best_delay(&self, p: f64, residence: u64) -> (u64, f64) {
        let n = self.gaps.len();
        if n == 0 {
            return (residence, 0.0);
        }
        let below = |x: u64| self.gaps.partition_point(|&g| g < x) as f64 / n as f64;
        let upto = |x: u64| self.gaps.partition_point(|&g| g <= x) as f64 / n as f64;
        let odds = |d: u64| {
            let covered = upto(d.saturating_add(residence)) - below(d);
            let early = p * below(d);
            if early >= 1.0 {
                0.0
            } else {
                p * covered / (1.0 - early)
            }
        };
        let mut best = (residence, odds(residence));
        for j in 0..CANDIDATES {
            let d = self.gaps[j * n / CANDIDATES];
            if d > residence {
                let o = odds(d);
                if o > best.1 {
                    best = (d, o);
                }
            }
        }
        best
    }

    /// Learns the device residence from an eviction: the youngest evicted block was unused
    /// for `age_ms`.
    pub(crate) fn evicted(&mut self, age_ms: u64) {
        self.residence_ms = Some(age_ms.max(1));
    }

    /// Whether request `req` still waits for its follow-up.
    pub(crate) fn waiting(&self, req: u32) -> bool {
        self.ended.get(req as usize).is_some_and(|e| !e.followed)
    }

    /// How many of a request's `full_blocks` to promote: all but the mean unshared tail.
    pub(crate) fn promote_depth(&self, full_blocks: usize) -> usize {
        let tail = self.tail_sum.checked_div(self.tail_count).unwrap_or(0);
        full_blocks.saturating_sub(usize::try_from(tail).unwrap_or(usize::MAX))
    }

    /// The learned device residence, in milliseconds.
    pub(crate) const fn residence_ms(&self) -> Option<u64> {
        self.residence_ms
    }

    /// The median follow-up gap seen, in milliseconds.
    pub(crate) fn median_gap_ms(&self) -> Option<u64> {
        self.gaps.get(self.gaps.len() / 2).copied()
    }

    /// The learned follow-up probability per turn class, with its prior.
    pub(crate) fn follow_odds(&self) -> Vec<f64> {
        (0..CLASSES)
            .map(|c| (self.followed_per_class[c] + 1) as f64 / (self.ended_per_class[c] + 2) as f64)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(ids: &[u128]) -> Vec<BlockHash> {
        ids.iter().map(|&i| BlockHash(i)).collect()
    }

    #[test]
    fn a_prompt_extending_an_earlier_one_is_its_follow_up() {
        let mut p = Predictor::default();
        let a = p.arrive(&chain(&[1, 2, 3]), 0);
        assert_eq!(a.turn, 1);
        assert_eq!(
            p.end(&chain(&[1, 2, 3]), a.turn, 0, 0.0),
            None,
            "no residence yet"
        );
        assert!(p.waiting(0));
        // Shares two of the three blocks: a follow-up, the last block unshared.
        let b = p.arrive(&chain(&[1, 2, 9, 10]), 50);
        assert_eq!(b.turn, 2);
        assert!(!p.waiting(0));
        assert_eq!(p.gaps, vec![50]);
        assert_eq!(p.promote_depth(10), 9);
        assert!(p.follow_odds()[0] > 0.5);
        p.evicted(20);
        // Turn 2's class has seen no follow-up (odds 1/3); turn 1's has seen one in two (1/2).
        let d = p.end(&chain(&[1, 2, 9, 10]), b.turn, 50, 0.5);
        assert_eq!(d, None);
        let c = p.arrive(&chain(&[7]), 60);
        assert_eq!(c.turn, 1);
        let d = p.end(&chain(&[7]), c.turn, 60, 0.5);
        assert_eq!(d, Some(50), "promote at the learned gap, the only one seen");
    }
}
