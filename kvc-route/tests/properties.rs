//! Property tests of the index and the ingest: random event sequences against a plain model
//! (the overlaps agree with a per-engine set walk), replays change nothing, and corrupted or
//! truncated frames never reach the index.

use std::collections::{HashMap, HashSet};

use kvc_route::{
    ChainHash, EngineId, Event, EventBody, Ingest, KvIndex, Offer, OverlapScratch, Removed, SaltId,
    Scope, Stored, Tier, TierOverlap, encode_event,
};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Store(u32, Tier, u64, Vec<u128>),
    Remove(u32, Tier, u64, Vec<u128>),
    Clear(u32, Option<Tier>),
}

fn tier() -> impl Strategy<Value = Tier> {
    prop_oneof![Just(Tier::Device), Just(Tier::Host), Just(Tier::Shared)]
}

fn op() -> impl Strategy<Value = Op> {
    let hashes = proptest::collection::vec(0u128..12, 1..6);
    prop_oneof![
        4 => (0u32..5, tier(), 0u64..2, hashes.clone()).prop_map(|(e, t, s, h)| Op::Store(e, t, s, h)),
        2 => (0u32..5, tier(), 0u64..2, hashes).prop_map(|(e, t, s, h)| Op::Remove(e, t, s, h)),
        1 => (0u32..5, proptest::option::of(tier())).prop_map(|(e, t)| Op::Clear(e, t)),
    ]
}

fn scope(salt: u64) -> Scope {
    Scope {
        salt: SaltId(salt),
        adapter: None,
    }
}

fn body(op: &Op) -> (u32, EventBody) {
    match op {
        Op::Store(e, t, s, h) => (
            *e,
            EventBody::Stored(Stored {
                tier: *t,
                scope: scope(*s),
                parent: None,
                block_size: 16,
                token_count: 16 * h.len() as u32,
                hashes: h.iter().map(|&x| ChainHash(x)).collect(),
            }),
        ),
        Op::Remove(e, t, s, h) => (
            *e,
            EventBody::Removed(Removed {
                tier: *t,
                scope: scope(*s),
                hashes: h.iter().map(|&x| ChainHash(x)).collect(),
            }),
        ),
        Op::Clear(e, t) => (*e, EventBody::Cleared { tier: *t }),
    }
}

type Model = HashMap<u32, HashSet<(Tier, u64, u128)>>;

fn model_apply(m: &mut Model, op: &Op) {
    match op {
        Op::Store(e, t, s, h) => m
            .entry(*e)
            .or_default()
            .extend(h.iter().map(|&x| (*t, *s, x))),
        Op::Remove(e, t, s, h) => {
            if let Some(set) = m.get_mut(e) {
                for &x in h {
                    set.remove(&(*t, *s, x));
                }
            }
        }
        Op::Clear(e, t) => {
            if let Some(set) = m.get_mut(e) {
                set.retain(|(tt, _, _)| t.is_some_and(|c| c != *tt));
            }
        }
    }
}

/// The model's overlap of engine `e` for `request` under `salt`.
fn model_overlap(m: &Model, e: u32, salt: u64, request: &[u128]) -> TierOverlap {
    let holds = |eng: u32, t: Tier, x: u128| m.get(&eng).is_some_and(|s| s.contains(&(t, salt, x)));
    let shared = |x: u128| m.keys().any(|&eng| holds(eng, Tier::Shared, x));
    let mut o = TierOverlap::default();
    for &x in request {
        if holds(e, Tier::Device, x) {
            o.device += 1;
        } else if holds(e, Tier::Host, x) {
            o.host += 1;
        } else if shared(x) {
            o.shared += 1;
        } else {
            break;
        }
    }
    o
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn overlaps_match_the_model_and_replays_change_nothing(
        ops in proptest::collection::vec(op(), 1..40),
        request in proptest::collection::vec(0u128..12, 0..8),
        salt in 0u64..2,
    ) {
        let mut index = KvIndex::new(16);
        let mut ingest = Ingest::new();
        let mut model = Model::new();
        let mut seqs: HashMap<u32, u64> = HashMap::new();
        let mut frames = Vec::new();
        for o in &ops {
            let (engine, body) = body(o);
            let seq = seqs.entry(engine).or_insert(0);
            *seq += 1;
            let frame = encode_event(&Event { engine: EngineId(engine), seq: *seq, time_ms: 0, body });
            prop_assert!(matches!(ingest.offer(&mut index, &frame, 0), Offer::Applied(_)));
            model_apply(&mut model, o);
            frames.push(frame);
        }
        // Every frame again: all duplicates, nothing changes.
        let hashes: Vec<ChainHash> = request.iter().map(|&x| ChainHash(x)).collect();
        let mut before = Vec::new();
        index.overlaps(scope(salt), &hashes, &mut OverlapScratch::default(), &mut before);
        for f in &frames {
            prop_assert!(matches!(ingest.offer(&mut index, f, 0), Offer::Duplicate(_)));
        }
        let mut after = Vec::new();
        index.overlaps(scope(salt), &hashes, &mut OverlapScratch::default(), &mut after);
        prop_assert_eq!(&before, &after);
        for (engine, overlap) in after {
            prop_assert_eq!(overlap, model_overlap(&model, engine.0, salt, &request), "{:?}", engine);
        }
        // Block counts per engine agree with the model.
        for (&e, set) in &model {
            if let Some(info) = index.engine(EngineId(e)) {
                for t in Tier::ALL {
                    let n = set.iter().filter(|(tt, _, _)| *tt == t).count() as u64;
                    prop_assert_eq!(info.blocks[usize::from(t.code())], n);
                }
            }
        }
    }

    #[test]
    fn damaged_frames_never_reach_the_index(
        hashes in proptest::collection::vec(any::<u128>(), 1..6),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let frame = encode_event(&Event {
            engine: EngineId(1),
            seq: 1,
            time_ms: 0,
            body: EventBody::Stored(Stored {
                tier: Tier::Device,
                scope: Scope::default(),
                parent: Some(ChainHash(7)),
                block_size: 16,
                token_count: 16 * hashes.len() as u32,
                hashes: hashes.iter().map(|&x| ChainHash(x)).collect(),
            }),
        });
        let mut index = KvIndex::new(16);
        let mut ingest = Ingest::new();
        let truncated = &frame[..cut.index(frame.len())];
        prop_assert!(matches!(ingest.offer(&mut index, truncated, 0), Offer::Malformed(_)));
        let mut flipped = frame.clone();
        flipped[flip.index(frame.len())] ^= 1 << bit;
        prop_assert!(matches!(ingest.offer(&mut index, &flipped, 0), Offer::Malformed(_)));
        prop_assert!(index.is_empty());
        prop_assert_eq!(index.engines().count(), 0);
        prop_assert_eq!(ingest.stats().malformed, 2);
    }
}
