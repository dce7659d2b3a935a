//! Property tests: random operation sequences against the pool and the chunked block table,
//! checked against a simple model after every step.
//!
//! Invariants: free + used = capacity per region and capacities sum to the pool size; every
//! block's reference count equals the references the model holds (never negative, never a
//! block both free and allocated); bad operations are errors that change nothing; when every
//! owner releases, each block is freed exactly once and the whole pool is free again.

use std::collections::HashMap;

use kvc_alloc::{BlockPool, ChunkedBlockTable, PoolConfig};
use kvc_core::{AllocError, BlockAllocator, BlockId, RefError, RegionId, Released, Writable};
use proptest::prelude::*;

const BLOCKS: u64 = 24;

#[derive(Clone, Debug)]
enum Op {
    Allocate(u8),
    AllocateAfter(u8, usize),
    AllocateMany(u8, usize),
    Retain(usize),
    Release(usize),
    ReleaseRaw(u32),
    /// Ids, unknown ones and repeats included, for `release_many`.
    ReleaseMany(Vec<u32>),
    /// Picks among the held references, for a `release_many` that succeeds.
    ReleaseHeld(Vec<usize>),
    Resize(u8, u8, usize),
    MakeWritable(usize, u8),
}

fn op() -> impl Strategy<Value = Op> {
    // Region 2 does not exist: operations on it must fail cleanly.
    let region = 0u8..3;
    prop_oneof![
        3 => region.clone().prop_map(Op::Allocate),
        2 => (region.clone(), any::<usize>()).prop_map(|(r, i)| Op::AllocateAfter(r, i)),
        1 => (region.clone(), 0usize..8).prop_map(|(r, n)| Op::AllocateMany(r, n)),
        2 => any::<usize>().prop_map(Op::Retain),
        4 => any::<usize>().prop_map(Op::Release),
        1 => (0u32..BLOCKS as u32 + 3).prop_map(Op::ReleaseRaw),
        1 => prop::collection::vec(0u32..BLOCKS as u32 + 2, 0..6).prop_map(Op::ReleaseMany),
        2 => prop::collection::vec(any::<usize>(), 0..8).prop_map(Op::ReleaseHeld),
        1 => (region.clone(), region.clone(), 0usize..6).prop_map(|(a, b, n)| Op::Resize(a, b, n)),
        2 => (any::<usize>(), region).prop_map(|(i, r)| Op::MakeWritable(i, r)),
    ]
}

/// The references the caller holds, one entry per reference.
struct Model {
    held: Vec<BlockId>,
}

impl Model {
    fn refs(&self, block: BlockId) -> u32 {
        self.held.iter().filter(|&&b| b == block).count() as u32
    }
    fn pick(&self, i: usize) -> Option<(usize, BlockId)> {
        (!self.held.is_empty()).then(|| {
            let at = i % self.held.len();
            (at, self.held[at])
        })
    }
}

fn check(pool: &BlockPool, model: &Model) -> Result<(), TestCaseError> {
    pool.audit()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let stats = pool.stats();
    let mut capacity = 0;
    for r in &stats.regions {
        prop_assert_eq!(r.free + r.used, r.capacity);
        capacity += r.capacity;
    }
    prop_assert_eq!(capacity, BLOCKS as usize);
    for id in 0..BLOCKS as u32 {
        let block = BlockId(id);
        let want = model.refs(block);
        match pool.refcount(block) {
            Ok(n) => prop_assert_eq!(n, want),
            Err(RefError::NotAllocated { .. }) => {
                prop_assert_eq!(want, 0);
                prop_assert!(pool.is_free(block).unwrap());
            }
            Err(e) => prop_assert!(false, "unexpected {e}"),
        }
    }
    Ok(())
}

/// `release_many(blocks)` against the model: valid (every id known, none named more often
/// than it has owners) it leaves the pool exactly as releasing one block at a time would and
/// counts the blocks freed; otherwise it is the error of the first bad block and the pool is
/// exactly as before, free-list order included.
fn release_many_like_one_by_one(
    pool: &mut BlockPool,
    model: &mut Model,
    blocks: &[BlockId],
) -> Result<(), TestCaseError> {
    let before = format!("{pool:?}");
    let mut one_by_one = pool.clone();
    let mut first_bad = None;
    let mut freed = 0;
    let mut left = model.held.clone();
    for &b in blocks {
        match left.iter().position(|&h| h == b) {
            Some(at) => {
                left.swap_remove(at);
                freed += usize::from(!left.contains(&b));
            }
            None => {
                first_bad = Some(b);
                break;
            }
        }
    }
    match (pool.release_many(blocks), first_bad) {
        (Ok(n), None) => {
            prop_assert_eq!(n, freed);
            for &b in blocks {
                let _ = one_by_one.release(b).unwrap();
            }
            prop_assert_eq!(format!("{pool:?}"), format!("{one_by_one:?}"));
            model.held = left;
        }
        (Err(RefError::UnknownBlock { block, .. }), Some(bad)) => {
            prop_assert_eq!(block, bad);
            prop_assert!(u64::from(bad.0) >= BLOCKS);
            prop_assert_eq!(format!("{pool:?}"), before);
        }
        (Err(RefError::NotAllocated { block }), Some(bad)) => {
            prop_assert_eq!(block, bad);
            prop_assert_eq!(format!("{pool:?}"), before);
        }
        (got, want) => prop_assert!(false, "release_many gave {got:?}, first bad {want:?}"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn pool_state_machine(ops in prop::collection::vec(op(), 1..120)) {
        let mut pool = BlockPool::new(PoolConfig::new(BLOCKS).pinned(6)).unwrap();
        let mut model = Model { held: Vec::new() };
        for op in ops {
            let before = pool.stats();
            match op {
                Op::Allocate(r) => match pool.allocate(RegionId(r)) {
                    Ok(b) => {
                        prop_assert_eq!(pool.region_of(b).unwrap(), RegionId(r));
                        prop_assert_eq!(model.refs(b), 0);
                        model.held.push(b);
                    }
                    Err(AllocError::OutOfBlocks { free, .. }) => prop_assert_eq!(free, 0),
                    Err(AllocError::UnknownRegion { .. }) => prop_assert_eq!(r, 2),
                    Err(e) => prop_assert!(false, "unexpected {e}"),
                },
                Op::AllocateAfter(r, i) => {
                    let prev = model.pick(i).map(|(_, b)| b);
                    if let Ok(b) = pool.allocate_after(RegionId(r), prev) {
                        prop_assert_eq!(model.refs(b), 0);
                        model.held.push(b);
                    }
                }
                Op::AllocateMany(r, n) => {
                    let mut out = Vec::new();
                    match pool.allocate_many(RegionId(r), n, &mut out) {
                        Ok(()) => {
                            prop_assert_eq!(out.len(), n);
                            model.held.extend(out);
                        }
                        Err(_) => {
                            prop_assert!(out.is_empty());
                            prop_assert_eq!(pool.stats().free(), before.free());
                        }
                    }
                }
                Op::Retain(i) => {
                    if let Some((_, b)) = model.pick(i) {
                        prop_assert_eq!(pool.retain(b).unwrap(), model.refs(b) + 1);
                        model.held.push(b);
                    }
                }
                Op::Release(i) => {
                    if let Some((at, b)) = model.pick(i) {
                        let last = model.refs(b) == 1;
                        prop_assert_eq!(pool.release(b).unwrap().is_freed(), last);
                        model.held.swap_remove(at);
                    }
                }
                Op::ReleaseRaw(id) => {
                    let block = BlockId(id);
                    let refs = model.refs(block);
                    match pool.release(block) {
                        Ok(rel) => {
                            prop_assert!(refs > 0);
                            prop_assert_eq!(rel.is_freed(), refs == 1);
                            let at = model.held.iter().position(|&b| b == block).unwrap();
                            model.held.swap_remove(at);
                        }
                        Err(RefError::NotAllocated { .. }) => prop_assert_eq!(refs, 0),
                        Err(RefError::UnknownBlock { .. }) => prop_assert!(u64::from(id) >= BLOCKS),
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    }
                }
                Op::ReleaseMany(ids) => {
                    let blocks: Vec<BlockId> = ids.iter().map(|&id| BlockId(id)).collect();
                    release_many_like_one_by_one(&mut pool, &mut model, &blocks)?;
                }
                Op::ReleaseHeld(picks) => {
                    // Distinct references the model holds: always valid.
                    let mut left = model.held.clone();
                    let mut blocks = Vec::new();
                    for i in picks {
                        if left.is_empty() {
                            break;
                        }
                        blocks.push(left.swap_remove(i % left.len()));
                    }
                    release_many_like_one_by_one(&mut pool, &mut model, &blocks)?;
                }
                Op::Resize(a, b, n) => {
                    if pool.resize(RegionId(a), RegionId(b), n).is_err() {
                        prop_assert_eq!(pool.stats(), before);
                    }
                }
                Op::MakeWritable(i, r) => {
                    if let Some((at, b)) = model.pick(i) {
                        let shared = model.refs(b) > 1;
                        match pool.make_writable(b, RegionId(r)) {
                            Ok(Writable::Exclusive(w)) => {
                                prop_assert!(!shared);
                                prop_assert_eq!(w, b);
                            }
                            Ok(Writable::Copied(copy)) => {
                                prop_assert!(shared);
                                prop_assert_eq!(copy.src, b);
                                model.held[at] = copy.dst;
                            }
                            Err(_) => prop_assert_eq!(pool.stats().free(), before.free()),
                        }
                    }
                }
            }
            check(&pool, &model)?;
        }
        // Every owner releases: each block is freed exactly once, the pool is whole again.
        let mut freed: HashMap<BlockId, u32> = HashMap::new();
        let distinct: std::collections::HashSet<_> = model.held.iter().copied().collect();
        for b in model.held.drain(..) {
            if pool.release(b).unwrap() == Released::Freed {
                *freed.entry(b).or_default() += 1;
            }
        }
        prop_assert_eq!(freed.len(), distinct.len());
        prop_assert!(freed.values().all(|&n| n == 1));
        prop_assert_eq!(pool.stats().free(), BLOCKS as usize);
        check(&pool, &model)?;
    }
}

#[derive(Clone, Debug)]
enum TableOp {
    New(u64),
    Fork(usize),
    Append(usize, u64),
    Release(usize),
}

fn table_op() -> impl Strategy<Value = TableOp> {
    prop_oneof![
        1 => (0u64..40).prop_map(TableOp::New),
        2 => any::<usize>().prop_map(TableOp::Fork),
        4 => (any::<usize>(), 1u64..12).prop_map(|(i, n)| TableOp::Append(i, n)),
        1 => any::<usize>().prop_map(TableOp::Release),
    ]
}

/// A live table with the token values it should read back.
struct Live {
    table: ChunkedBlockTable,
    tokens: Vec<u64>,
}

const BS: u32 = 3;

/// Writes `n` new tokens into `live`, simulating the kernels: copy-on-write pairs first.
fn append(
    pool: &mut BlockPool,
    memory: &mut HashMap<(BlockId, u32), u64>,
    live: &mut Live,
    n: u64,
    next_value: &mut u64,
) -> bool {
    let Ok(out) = live.table.append_tokens(pool, RegionId::DYNAMIC, n) else {
        return false;
    };
    if let Some(copy) = out.copy {
        for off in 0..BS {
            if let Some(&v) = memory.get(&(copy.src, off)) {
                memory.insert((copy.dst, off), v);
            }
        }
    }
    let start = live.tokens.len() as u64;
    for pos in start..start + n {
        let slot = live.table.slot(pos).unwrap();
        memory.insert(slot, *next_value);
        live.tokens.push(*next_value);
        *next_value += 1;
    }
    true
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Forks and appends never corrupt another table's tokens (copy-on-write is honoured),
    /// and releasing every table returns every block.
    #[test]
    fn chunked_tables_fork_and_copy_on_write(ops in prop::collection::vec(table_op(), 1..60)) {
        let total = 400u64;
        let mut pool = BlockPool::new(PoolConfig::new(total)).unwrap();
        let mut memory = HashMap::new();
        let mut tables: Vec<Live> = Vec::new();
        let mut next_value = 0u64;
        for op in ops {
            match op {
                TableOp::New(n) => {
                    let mut live = Live { table: ChunkedBlockTable::new(BS), tokens: Vec::new() };
                    if n == 0 || append(&mut pool, &mut memory, &mut live, n, &mut next_value) {
                        tables.push(live);
                    }
                }
                TableOp::Fork(i) if !tables.is_empty() => {
                    let src = &tables[i % tables.len()];
                    let fork = Live { table: src.table.fork(), tokens: src.tokens.clone() };
                    tables.push(fork);
                }
                TableOp::Append(i, n) if !tables.is_empty() => {
                    let at = i % tables.len();
                    let _ = append(&mut pool, &mut memory, &mut tables[at], n, &mut next_value);
                }
                TableOp::Release(i) if !tables.is_empty() => {
                    let mut live = tables.swap_remove(i % tables.len());
                    live.table.release(&mut pool).unwrap();
                }
                _ => {}
            }
            pool.audit().map_err(|e| TestCaseError::fail(e.to_string()))?;
            for live in &tables {
                prop_assert_eq!(live.table.num_tokens(), live.tokens.len() as u64);
                for (pos, &want) in live.tokens.iter().enumerate() {
                    let slot = live.table.slot(pos as u64).unwrap();
                    prop_assert!(pool.refcount(slot.0).is_ok());
                    prop_assert_eq!(memory.get(&slot).copied(), Some(want));
                }
            }
        }
        for mut live in tables.drain(..) {
            live.table.release(&mut pool).unwrap();
        }
        prop_assert_eq!(pool.stats().free(), total as usize);
        pool.audit().map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
}
