//! [`Ingest`]: the subscriber's side of the event stream, independent of the transport.
//!
//! It decodes frames, checks each engine's sequence numbers and applies events to a
//! [`KvIndex`] in order:
//!
//! - the next sequence number is applied;
//! - an old one (a replay or a duplicate) is skipped, so delivery twice changes nothing;
//! - a jump is a gap: the event is not applied and the engine waits for a snapshot
//!   ([`Ingest::resync`]), after which later events apply again;
//! - a malformed or truncated frame is counted and dropped before it reaches the index.
//!
//! An engine the ingest has never seen starts at sequence 1; one that joins later (or whose
//! early events were trimmed) shows a gap at once and is loaded from its snapshot. So does an
//! engine the index dropped since its last event (silent too long, [`KvIndex::expire`]): its
//! holdings are gone from the index, so its next event is a gap unless it starts afresh at 1.
//! An engine whose events the index has refused from the start (another block size) was
//! never in it: its later events are refused in turn, not gaps waiting for a snapshot the
//! index would refuse as well.

use std::collections::HashMap;

use crate::event::{DecodeError, EngineId, Snapshot, decode_event};
use crate::index::{ApplyError, KvIndex};

/// What became of one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub enum Offer {
    /// Applied to the index.
    Applied(EngineId),
    /// Already applied (a replay or duplicate): skipped.
    Duplicate(EngineId),
    /// A sequence jump: not applied; the engine needs a snapshot of at least `expected − 1`.
    Gap {
        /// The engine.
        engine: EngineId,
        /// The sequence number awaited.
        expected: u64,
        /// The one received.
        got: u64,
    },
    /// The frame failed to decode: dropped.
    Malformed(DecodeError),
    /// The event decoded but the index refused it (for example another block size).
    Refused(ApplyError),
}

/// Counters of everything offered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngestStats {
    /// Events applied.
    pub applied: u64,
    /// Replays and duplicates skipped.
    pub duplicates: u64,
    /// Sequence gaps seen.
    pub gaps: u64,
    /// Snapshots loaded.
    pub resyncs: u64,
    /// Frames that failed to decode.
    pub malformed: u64,
    /// Events the index refused.
    pub refused: u64,
}

/// Per-engine sequence tracking in front of an index.
#[derive(Clone, Debug, Default)]
pub struct Ingest {
    /// Last sequence number taken per engine, and whether the index has held the engine
    /// since (an event or a snapshot of it applied): an engine it held and no longer does
    /// was dropped, one whose every event was refused never got in.
    last: HashMap<EngineId, Seen>,
    stats: IngestStats,
}

/// What the ingest knows of one engine.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    seq: u64,
    admitted: bool,
}

impl Ingest {
    /// An ingest that has seen nothing.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The counters.
    #[must_use]
    pub fn stats(&self) -> IngestStats {
        self.stats
    }

    /// The last sequence number applied for `engine`.
    #[must_use]
    pub fn last_seq(&self, engine: EngineId) -> Option<u64> {
        self.last.get(&engine).map(|s| s.seq)
    }

    /// Decodes one frame and applies it in order; counts the outcome in
    /// `kvc_route_events_total{outcome}` through the `metrics` facade.
    pub fn offer(&mut self, index: &mut KvIndex, frame: &[u8], now_ms: u64) -> Offer {
        let offer = self.offer_inner(index, frame, now_ms);
        let outcome = match &offer {
            Offer::Applied(_) => "applied",
            Offer::Duplicate(_) => "duplicate",
            Offer::Gap { .. } => "gap",
            Offer::Malformed(_) => "malformed",
            Offer::Refused(_) => "refused",
        };
        metrics::counter!("kvc_route_events_total", "outcome" => outcome).increment(1);
        offer
    }

    fn offer_inner(&mut self, index: &mut KvIndex, frame: &[u8], now_ms: u64) -> Offer {
        let event = match decode_event(frame) {
            Ok(e) => e,
            Err(e) => {
                self.stats.malformed += 1;
                return Offer::Malformed(e);
            }
        };
        let seen = self.last.get(&event.engine).copied().unwrap_or_default();
        let mut last = seen.seq;
        if seen.admitted && index.engine(event.engine).is_none() {
            // The index dropped the engine and what it held (`KvIndex::expire`,
            // `remove_engine`) since its last event here: only a snapshot restores it.
            self.last.remove(&event.engine);
            last = 0;
        }
        if event.seq <= last {
            self.stats.duplicates += 1;
            index.touch(event.engine, now_ms);
            return Offer::Duplicate(event.engine);
        }
        if event.seq != last + 1 {
            self.stats.gaps += 1;
            return Offer::Gap {
                engine: event.engine,
                expected: last + 1,
                got: event.seq,
            };
        }
        if let Err(e) = index.apply(&event, now_ms) {
            self.stats.refused += 1;
            // The sequence moves on: the engine's later events are still in order. An engine
            // never admitted stays so (its later events are refused too, not gaps).
            let admitted = seen.admitted && last > 0;
            self.last.insert(
                event.engine,
                Seen {
                    seq: event.seq,
                    admitted,
                },
            );
            return Offer::Refused(e);
        }
        self.last.insert(
            event.engine,
            Seen {
                seq: event.seq,
                admitted: true,
            },
        );
        self.stats.applied += 1;
        Offer::Applied(event.engine)
    }

    /// Replaces the engine's holdings by `snap` and continues after its sequence number.
    /// A snapshot older than what was already applied is ignored (returns `Ok(false)`).
    ///
    /// # Errors
    /// The index's refusal (another block size); nothing changes.
    pub fn resync(
        &mut self,
        index: &mut KvIndex,
        snap: &Snapshot,
        now_ms: u64,
    ) -> Result<bool, ApplyError> {
        if self
            .last
            .get(&snap.engine)
            .is_some_and(|s| s.seq > snap.seq)
        {
            return Ok(false);
        }
        index.load_snapshot(snap, now_ms)?;
        self.last.insert(
            snap.engine,
            Seen {
                seq: snap.seq,
                admitted: true,
            },
        );
        self.stats.resyncs += 1;
        metrics::counter!("kvc_route_events_total", "outcome" => "resync").increment(1);
        Ok(true)
    }

    /// Forgets an engine (dropped from the index): its next event must start from a snapshot.
    /// [`offer`](Self::offer) also notices by itself an engine its index no longer holds.
    pub fn forget(&mut self, engine: EngineId) {
        self.last.remove(&engine);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{
        ChainHash, Event, EventBody, Scope, SnapshotGroup, Stored, Tier, encode_event,
    };

    fn frame(seq: u64, hash: u128) -> Vec<u8> {
        encode_event(&Event {
            engine: EngineId(1),
            seq,
            time_ms: 0,
            body: EventBody::Stored(Stored {
                tier: Tier::Device,
                scope: Scope::default(),
                parent: None,
                block_size: 16,
                token_count: 16,
                hashes: vec![ChainHash(hash)],
            }),
        })
    }

    /// Engine 1's snapshot after its events 1 and 2 (hashes 10 and 20 on the device).
    fn snapshot_at_2() -> Snapshot {
        Snapshot {
            engine: EngineId(1),
            seq: 2,
            time_ms: 0,
            block_size: 16,
            groups: vec![SnapshotGroup {
                tier: Tier::Device,
                scope: Scope::default(),
                hashes: vec![ChainHash(10), ChainHash(20)],
            }],
        }
    }

    #[test]
    fn in_order_applies_replays_skip_gaps_wait_for_a_snapshot() {
        let mut ix = KvIndex::new(16);
        let mut ing = Ingest::new();
        assert_eq!(
            ing.offer(&mut ix, &frame(1, 10), 0),
            Offer::Applied(EngineId(1))
        );
        assert_eq!(
            ing.offer(&mut ix, &frame(1, 10), 0),
            Offer::Duplicate(EngineId(1))
        );
        assert_eq!(
            ing.offer(&mut ix, &frame(3, 30), 0),
            Offer::Gap {
                engine: EngineId(1),
                expected: 2,
                got: 3
            }
        );
        assert_eq!(ix.len(), 1);
        let snap = snapshot_at_2();
        assert_eq!(ing.resync(&mut ix, &snap, 0), Ok(true));
        assert_eq!(
            ing.offer(&mut ix, &frame(3, 30), 0),
            Offer::Applied(EngineId(1))
        );
        assert_eq!(ix.len(), 3);
        // An older snapshot does not roll the engine back.
        assert_eq!(ing.resync(&mut ix, &snap, 0), Ok(false));
        assert_eq!(ix.len(), 3);
        let s = ing.stats();
        assert_eq!((s.applied, s.duplicates, s.gaps, s.resyncs), (2, 1, 1, 1));
    }

    #[test]
    fn an_engine_the_index_dropped_continues_only_from_a_snapshot() {
        let mut ix = KvIndex::new(16);
        let mut ing = Ingest::new();
        assert_eq!(
            ing.offer(&mut ix, &frame(1, 10), 0),
            Offer::Applied(EngineId(1))
        );
        // Silent too long: the index drops it and its block; nobody tells the ingest.
        let mut dropped = Vec::new();
        ix.expire(20_000, 10_000, &mut dropped);
        assert_eq!(dropped, [EngineId(1)]);
        // Its next event would leave the index believing it holds block 20 alone: a gap.
        assert_eq!(
            ing.offer(&mut ix, &frame(2, 20), 20_000),
            Offer::Gap {
                engine: EngineId(1),
                expected: 1,
                got: 2
            }
        );
        assert!(ix.is_empty() && ix.engine(EngineId(1)).is_none());
        // A replay of an old event is no heartbeat of a dropped engine either.
        assert!(matches!(
            ing.offer(&mut ix, &frame(2, 20), 20_000),
            Offer::Gap { .. }
        ));
        assert!(ix.engine(EngineId(1)).is_none());
        let snap = snapshot_at_2();
        assert_eq!(ing.resync(&mut ix, &snap, 20_000), Ok(true));
        assert_eq!(
            ing.offer(&mut ix, &frame(3, 30), 20_000),
            Offer::Applied(EngineId(1))
        );
        assert_eq!(ix.len(), 3);
    }

    #[test]
    fn an_engine_of_another_block_size_is_refused_event_after_event_not_a_gap() {
        let mut ix = KvIndex::new(32);
        let mut ing = Ingest::new();
        // `frame` makes 16-token events: the index of 32-token blocks refuses each of them,
        // and the engine's sequence still moves on (its later events are in order).
        for seq in 1..=3 {
            assert!(matches!(
                ing.offer(&mut ix, &frame(seq, u128::from(seq) * 10), 0),
                Offer::Refused(_)
            ));
        }
        let s = ing.stats();
        assert_eq!((s.refused, s.gaps, s.applied), (3, 0, 0));
        assert!(ix.engine(EngineId(1)).is_none());
        assert_eq!(ing.last_seq(EngineId(1)), Some(3));
    }

    #[test]
    fn malformed_frames_are_counted_and_change_nothing() {
        let mut ix = KvIndex::new(16);
        let mut ing = Ingest::new();
        let good = frame(1, 10);
        for len in [0, 5, 31, good.len() - 1] {
            assert!(matches!(
                ing.offer(&mut ix, &good[..len], 0),
                Offer::Malformed(_)
            ));
        }
        assert!(ix.is_empty());
        assert_eq!(ing.stats().malformed, 4);
        assert_eq!(ing.last_seq(EngineId(1)), None);
    }
}
