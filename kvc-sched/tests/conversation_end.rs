//! An application ending a conversation through the [`Scheduler`] (and the [`KvManager`]
//! under it) with the prefix cache of `kvc-reuse`: the ended conversation's own blocks are
//! the first to go under memory pressure, a shared system prompt stays, and a conversation
//! nobody ended keeps what plain LRU would have taken from it.

use kvc_alloc::{BlockPool, PoolConfig};
use kvc_reuse::{HashExtra, PolicyKind, PrefixCache, ScopedIndex, Xxh3Hasher};
use kvc_sched::{
    DynamicOnly, Finished, KvError, QosClass, Request, ReuseError, ReuseScope, Scheduler,
    SchedulerConfig, SeqId, TenantId,
};

const BS: u32 = 4;

type Sched = Scheduler<BlockPool, DynamicOnly, ScopedIndex<Xxh3Hasher>>;

fn scheduler(blocks: u64, policy: PolicyKind) -> Sched {
    let cfg = SchedulerConfig {
        block_size: BS,
        max_running: 4,
        max_batch_tokens: 128,
        max_model_len: 256,
        ..SchedulerConfig::default()
    };
    let index = ScopedIndex::new(
        PrefixCache::new(BS, policy),
        Xxh3Hasher,
        HashExtra::new("test-model", 1),
    );
    let pool = BlockPool::new(PoolConfig::new(blocks)).unwrap();
    Scheduler::new(cfg, pool, DynamicOnly::default(), index).unwrap()
}

/// Runs one request to the end and returns how it finished.
fn run(s: &mut Sched, now: &mut u64, id: u64, prompt: &[u32]) -> Finished {
    s.submit(Request {
        id: SeqId(id),
        tenant: TenantId(0),
        qos: QosClass::STANDARD,
        session: None,
        prompt: prompt.to_vec(),
        max_new_tokens: 2,
        arrival_ms: *now,
    })
    .unwrap();
    let mut done = Vec::new();
    while !s.is_idle() {
        assert!(*now < 1_000, "no progress");
        let plan = s.step(*now);
        let sampled: Vec<_> = plan
            .seqs
            .iter()
            .filter(|q| q.samples)
            .map(|q| (q.seq, 7))
            .collect();
        done.extend(s.complete_step(&sampled).unwrap());
        *now += 1;
    }
    assert_eq!(done.len(), 1);
    done.pop().unwrap()
}

/// A system prompt of one block, then `len` tokens of the conversation's own.
fn conversation(tag: u32, len: u32) -> Vec<u32> {
    let mut p: Vec<u32> = (0..BS).collect();
    p.extend((0..len).map(|i| tag * 1_000 + i));
    p
}

/// Conversations A, then B, finish; B may be ended; a large request C then needs three
/// of the cached blocks. Returns the tokens A's and B's prompts hit afterwards, and the
/// blocks the ending demoted.
fn scenario(policy: PolicyKind, end_b: bool) -> (u64, u64, usize) {
    let mut s = scheduler(24, policy);
    let mut now = 0;
    let a = conversation(1, 13); // 17 tokens: 4 full blocks, the system block shared
    let b = conversation(2, 13);
    assert_eq!(run(&mut s, &mut now, 1, &a).cached_tokens, 0);
    assert_eq!(
        run(&mut s, &mut now, 2, &b).cached_tokens,
        4,
        "the system block"
    );
    let demoted = if end_b {
        let scope = ReuseScope {
            tenant: TenantId(0),
            session: None,
        };
        s.end_conversation(&scope, &b, 1).unwrap()
    } else {
        0
    };
    // Cached now: the system block, three of A's, three of B's: 7 of 24. C takes 21 (three evicted).
    let c = conversation(3, 78);
    assert_eq!(run(&mut s, &mut now, 3, &c).cached_tokens, 4);
    let a_hit = run(&mut s, &mut now, 4, &a).cached_tokens;
    let b_hit = run(&mut s, &mut now, 5, &b).cached_tokens;
    (a_hit, b_hit, demoted)
}

#[test]
fn an_ended_conversation_goes_first_and_the_others_keep_their_blocks() {
    for policy in [PolicyKind::Lru, PolicyKind::Adaptive, PolicyKind::ReuseOdds] {
        let (a, b, demoted) = scenario(policy, true);
        assert_eq!(
            demoted, 3,
            "{policy:?}: B's own full blocks, not the system block"
        );
        assert_eq!(a, 16, "{policy:?}: A keeps its whole prefix");
        assert_eq!(b, 4, "{policy:?}: B keeps only the shared system block");
    }
    // Without the word, LRU takes the older conversation's blocks instead.
    // (B, in turn, loses its blocks to A's second run, which needs room of its own.)
    let (a, _, demoted) = scenario(PolicyKind::Lru, false);
    assert_eq!(demoted, 0);
    assert_eq!(
        a, 4,
        "LRU: A, the older conversation, lost its own blocks to C"
    );
}

#[test]
fn ending_twice_or_an_unknown_conversation_is_harmless() {
    let mut s = scheduler(24, PolicyKind::Lru);
    let mut now = 0;
    let a = conversation(1, 13);
    run(&mut s, &mut now, 1, &a);
    let scope = ReuseScope {
        tenant: TenantId(0),
        session: None,
    };
    assert_eq!(s.end_conversation(&scope, &a, 0).unwrap(), 4);
    assert_eq!(s.end_conversation(&scope, &a, 0).unwrap(), 4, "renewed");
    let unknown: Vec<u32> = (500..517).collect();
    assert_eq!(s.end_conversation(&scope, &unknown, 0).unwrap(), 0);
    let other = ReuseScope {
        tenant: TenantId(5),
        session: None,
    };
    assert_eq!(
        s.end_conversation(&other, &a, 0).unwrap(),
        0,
        "another tenant's cache"
    );
    // The conversation went on after all: its blocks are used again and rank as before.
    let mut next = a.clone();
    next.extend([7, 7, 50, 51]);
    assert_eq!(run(&mut s, &mut now, 2, &next).cached_tokens, 16);
}

#[test]
fn a_conversation_still_running_keeps_its_blocks() {
    let mut s = scheduler(24, PolicyKind::Lru);
    let a = conversation(1, 13);
    s.submit(Request {
        id: SeqId(1),
        tenant: TenantId(0),
        qos: QosClass::STANDARD,
        session: None,
        prompt: a.clone(),
        max_new_tokens: 8,
        arrival_ms: 0,
    })
    .unwrap();
    let plan = s.step(0);
    let sampled: Vec<_> = plan.seqs.iter().map(|q| (q.seq, 7)).collect();
    s.complete_step(&sampled).unwrap();
    let scope = ReuseScope {
        tenant: TenantId(0),
        session: None,
    };
    assert_eq!(s.end_conversation(&scope, &a, 0).unwrap(), 0, "in use");
    // The error type a broken chain would raise is the reuse index's, through KvError.
    let err = KvError::from(ReuseError::BrokenChain { index: 2 });
    assert!(err.to_string().contains("block 2"));
}
