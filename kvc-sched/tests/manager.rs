//! [`KvManager`] on its own, as an engine with its own scheduler uses it: prefix reuse,
//! slots with lookahead, forks with copy-on-write, sessions, usage figures and typed errors.

mod support;

use kvc_alloc::{BlockAllocator, BlockPool, PoolConfig};
use kvc_core::{QosClass, RegionId, SeqId, SessionId, TenantId};
use kvc_sched::{
    DynamicOnly, KvError, KvManager, KvManagerConfig, Pressure, SeqOwner, SlotGrant, SlotRequest,
};
use support::TestIndex;

const BS: u32 = 4;

type Manager = KvManager<BlockPool, DynamicOnly, TestIndex>;

fn manager(blocks: u64, ttl: Option<u64>) -> Manager {
    let pool = BlockPool::new(PoolConfig::new(blocks)).unwrap();
    let cfg = KvManagerConfig {
        block_size: BS,
        session_ttl_ms: ttl,
    };
    KvManager::new(cfg, pool, DynamicOnly::default(), TestIndex::new(BS)).unwrap()
}

fn owner(session: Option<u64>) -> SeqOwner {
    SeqOwner {
        tenant: TenantId(0),
        class: QosClass::STANDARD,
        session: session.map(SessionId),
    }
}

fn ask(new_tokens: u64) -> SlotRequest {
    SlotRequest {
        new_tokens,
        lookahead: 0,
        admission: false,
    }
}

/// Opens `seq`, reuses what it can of `prompt`, and assigns slots for the rest.
fn prefill(kv: &mut Manager, seq: u64, prompt: &[u32]) -> (u64, SlotGrant) {
    kv.open(SeqId(seq), owner(None)).unwrap();
    let hit = kv.lookup_prefix(SeqId(seq), prompt, 0).unwrap();
    let grant = kv
        .allocate_slots(
            SeqId(seq),
            ask(prompt.len() as u64 - hit),
            0,
            &mut Vec::new(),
        )
        .unwrap();
    (hit, grant)
}

fn check_usage(kv: &Manager) {
    let u = kv.usage();
    for r in [u.pinned, u.dynamic] {
        assert_eq!(r.free + r.evictable + r.in_use, r.capacity);
    }
    assert_eq!(u.total().evictable, kv.evictable_blocks());
}

#[test]
fn a_cached_prompt_is_reused_and_becomes_evictable_when_its_last_user_frees_it() {
    let mut kv = manager(16, None);
    let prompt: Vec<u32> = (0..13).collect();
    assert_eq!(prefill(&mut kv, 1, &prompt), (0, SlotGrant::Now));
    assert_eq!(kv.cache_blocks(SeqId(1), &prompt, 0).unwrap(), 3);
    check_usage(&kv);
    assert_eq!(kv.evictable_blocks(), 0, "in use by seq 1");
    let (hit, grant) = prefill(&mut kv, 2, &prompt);
    assert_eq!((hit, grant), (12, SlotGrant::Now));
    assert_eq!(
        kv.blocks(SeqId(2)).unwrap()[..3],
        kv.blocks(SeqId(1)).unwrap()[..3]
    );
    kv.free(SeqId(1)).unwrap();
    assert_eq!(kv.evictable_blocks(), 0, "still in use by seq 2");
    kv.free(SeqId(2)).unwrap();
    assert_eq!(kv.evictable_blocks(), 3);
    assert_eq!(kv.usage().dynamic.free, 13);
    check_usage(&kv);
    assert_eq!(kv.evict(10, 1).unwrap(), 3);
    assert_eq!(kv.usage().dynamic.free, 16);
}

#[test]
fn allocation_answers_now_later_or_never_and_later_changes_nothing() {
    let mut kv = manager(8, None);
    let prompt: Vec<u32> = (0..20).collect();
    assert_eq!(prefill(&mut kv, 1, &prompt).1, SlotGrant::Now); // 5 blocks
    kv.open(SeqId(2), owner(None)).unwrap();
    let before = kv.usage();
    let grant = kv
        .allocate_slots(SeqId(2), ask(16), 0, &mut Vec::new())
        .unwrap();
    assert!(matches!(
        grant,
        SlotGrant::Later(Pressure::Exhausted { .. }) | SlotGrant::Later(Pressure::Wait { .. })
    ));
    assert_eq!(kv.usage(), before);
    assert_eq!(kv.num_tokens(SeqId(2)).unwrap(), 0);
    let grant = kv
        .allocate_slots(SeqId(2), ask(40), 0, &mut Vec::new())
        .unwrap();
    assert!(matches!(grant, SlotGrant::Never(_)));
    // Lookahead holds blocks without assigning their slots.
    let look = SlotRequest {
        new_tokens: 1,
        lookahead: 6,
        admission: false,
    };
    assert_eq!(
        kv.allocate_slots(SeqId(2), look, 0, &mut Vec::new())
            .unwrap(),
        SlotGrant::Now
    );
    assert_eq!(kv.num_tokens(SeqId(2)).unwrap(), 1);
    assert_eq!(kv.blocks(SeqId(2)).unwrap().len(), 2);
    assert!(kv.slot(SeqId(2), 0).is_some());
    assert!(kv.slot(SeqId(2), 1).is_none());
    check_usage(&kv);
}

#[test]
fn a_fork_shares_blocks_and_copies_the_partial_block_on_write() {
    let mut kv = manager(8, None);
    let prompt: Vec<u32> = (0..6).collect();
    assert_eq!(prefill(&mut kv, 1, &prompt).1, SlotGrant::Now); // one full block, one half
    kv.fork(SeqId(1), SeqId(2)).unwrap();
    let parent = kv.blocks(SeqId(1)).unwrap().to_vec();
    assert_eq!(kv.blocks(SeqId(2)).unwrap(), parent);
    assert_eq!(kv.allocator().refcount(parent[1]), Ok(2));
    let mut copies = Vec::new();
    assert_eq!(
        kv.allocate_slots(SeqId(2), ask(1), 0, &mut copies).unwrap(),
        SlotGrant::Now
    );
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0].src, parent[1]);
    let child = kv.blocks(SeqId(2)).unwrap().to_vec();
    assert_eq!(child[0], parent[0], "the full block stays shared");
    assert_eq!(child[1], copies[0].dst);
    assert_eq!(kv.allocator().refcount(parent[1]), Ok(1));
    // The parent now writes in place: it is the only owner left.
    copies.clear();
    assert_eq!(
        kv.allocate_slots(SeqId(1), ask(1), 0, &mut copies).unwrap(),
        SlotGrant::Now
    );
    assert!(copies.is_empty());
    assert_eq!(
        kv.fork(SeqId(1), SeqId(2)),
        Err(KvError::DuplicateSeq { seq: SeqId(2) })
    );
    kv.free(SeqId(1)).unwrap();
    kv.free(SeqId(2)).unwrap();
    assert_eq!(kv.usage().dynamic.free, 8);
}

#[test]
fn a_fork_of_cached_blocks_keeps_them_unevictable_until_both_free() {
    let mut kv = manager(8, None);
    let prompt: Vec<u32> = (0..9).collect();
    assert_eq!(prefill(&mut kv, 1, &prompt).1, SlotGrant::Now);
    kv.fork(SeqId(1), SeqId(2)).unwrap(); // forked before the blocks were cached
    kv.cache_blocks(SeqId(1), &prompt, 0).unwrap();
    kv.free(SeqId(1)).unwrap();
    assert_eq!(kv.evictable_blocks(), 0);
    assert_eq!(kv.evict(8, 0).unwrap(), 0, "seq 2 still reads them");
    kv.free(SeqId(2)).unwrap();
    assert_eq!(kv.evictable_blocks(), 2);
    check_usage(&kv);
}

#[test]
fn a_fork_rewound_into_a_cached_block_gives_the_index_its_use_back_when_it_copies_it() {
    let mut kv = manager(8, None);
    let prompt: Vec<u32> = (0..9).collect();
    assert_eq!(prefill(&mut kv, 1, &prompt).1, SlotGrant::Now);
    kv.fork(SeqId(1), SeqId(2)).unwrap();
    kv.cache_blocks(SeqId(1), &prompt, 0).unwrap(); // caches the 2 full blocks, counting both
    // The child rejects its last 4 tokens: its second block is partial again, and cached.
    kv.rewind(SeqId(2), 5).unwrap();
    let cached = kv.blocks(SeqId(2)).unwrap()[1];
    let mut copies = Vec::new();
    assert_eq!(
        kv.allocate_slots(SeqId(2), ask(1), 0, &mut copies).unwrap(),
        SlotGrant::Now
    );
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0].src, cached, "the child writes into its own copy");
    kv.free(SeqId(1)).unwrap();
    kv.free(SeqId(2)).unwrap();
    check_usage(&kv);
    assert_eq!(kv.usage().total().in_use, 0);
    // Nothing holds the cached blocks any more: the index must agree and give them back.
    assert_eq!(kv.evictable_blocks(), 2);
    assert_eq!(kv.evict(8, 0).unwrap(), 2);
    assert_eq!(kv.usage().total().free, 8);
}

#[test]
fn a_fork_rewound_below_shared_blocks_lets_them_go_so_every_evictable_block_can_be_evicted() {
    let mut kv = manager(8, None);
    let prompt: Vec<u32> = (0..13).collect();
    assert_eq!(prefill(&mut kv, 1, &prompt).1, SlotGrant::Now); // 3 full blocks and 1 token
    kv.fork(SeqId(1), SeqId(2)).unwrap();
    let shared = kv.blocks(SeqId(1)).unwrap().to_vec();
    kv.rewind(SeqId(2), 5).unwrap(); // the child keeps 1 full block and 1 token of the next
    assert_eq!(
        kv.blocks(SeqId(2)).unwrap(),
        &shared[..2],
        "blocks past its end let go"
    );
    kv.cache_blocks(SeqId(1), &prompt, 0).unwrap(); // the parent caches its 3 full blocks
    let mut copies = Vec::new();
    assert_eq!(
        kv.allocate_slots(SeqId(2), ask(1), 0, &mut copies).unwrap(),
        SlotGrant::Now
    );
    assert_eq!(
        copies.len(),
        1,
        "the child copies the shared block it writes into"
    );
    kv.free(SeqId(1)).unwrap();
    check_usage(&kv);
    // The child holds the first cached block only: the other two can be evicted.
    assert_eq!(kv.evictable_blocks(), 2);
    assert_eq!(kv.evict(8, 0).unwrap(), 2);
    kv.free(SeqId(2)).unwrap();
    assert_eq!(kv.evict(8, 0).unwrap(), 1);
    assert_eq!(kv.usage().total().free, 8);
}

#[test]
fn a_session_context_stays_pinned_until_the_session_ends_or_expires() {
    let mut kv = manager(8, Some(100));
    let prompt: Vec<u32> = (0..9).collect();
    kv.open(SeqId(1), owner(Some(5))).unwrap();
    assert_eq!(
        kv.allocate_slots(SeqId(1), ask(9), 0, &mut Vec::new())
            .unwrap(),
        SlotGrant::Now
    );
    kv.cache_blocks(SeqId(1), &prompt, 0).unwrap();
    assert_eq!(kv.keep_session(SessionId(5), SeqId(1), 10).unwrap(), 2);
    kv.free(SeqId(1)).unwrap();
    assert_eq!(kv.evictable_blocks(), 0, "the session holds its context");
    assert_eq!(kv.evict(8, 20).unwrap(), 0);
    assert_eq!(kv.expire_sessions(109).unwrap(), 0);
    assert_eq!(kv.expire_sessions(110).unwrap(), 1);
    assert_eq!(kv.evictable_blocks(), 2);
    assert_eq!(
        kv.end_session(SessionId(5)),
        Err(KvError::UnknownSession {
            session: SessionId(5)
        })
    );
    check_usage(&kv);
}

#[test]
fn misuse_is_a_typed_error_that_changes_nothing() {
    let mut kv = manager(8, None);
    assert_eq!(
        kv.free(SeqId(9)),
        Err(KvError::UnknownSeq { seq: SeqId(9) })
    );
    kv.open(SeqId(1), owner(None)).unwrap();
    assert_eq!(
        kv.open(SeqId(1), owner(None)),
        Err(KvError::DuplicateSeq { seq: SeqId(1) })
    );
    assert_eq!(
        kv.allocate_slots(SeqId(1), ask(3), 0, &mut Vec::new())
            .unwrap(),
        SlotGrant::Now
    );
    assert_eq!(
        kv.lookup_prefix(SeqId(1), &[1, 2, 3, 4, 5], 0),
        Err(KvError::HoldsBlocks { seq: SeqId(1) })
    );
    assert_eq!(
        kv.allocate_slots(SeqId(1), ask(u64::MAX), 0, &mut Vec::new()),
        Err(KvError::TokenOverflow { seq: SeqId(1) })
    );
    kv.free(SeqId(1)).unwrap();
    assert_eq!(
        kv.free(SeqId(1)),
        Err(KvError::UnknownSeq { seq: SeqId(1) })
    );
    assert_eq!(kv.allocator().free_blocks(RegionId::DYNAMIC), Ok(8));
}
