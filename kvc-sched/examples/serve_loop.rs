//! A complete engine loop around kvc: a block pool, a pin policy, a prefix cache and the
//! scheduler, with a stand-in for the model. `docs/getting-started.md` walks through it.
//!
//! Run with `cargo run -p kvc-sched --example serve_loop`.
#![allow(clippy::print_stdout)]

use kvc_alloc::{BlockPool, PoolConfig};
use kvc_pin::{PinningPolicy, PolicyConfig, Reserve, SoftPinConfig, StaticReserve};
use kvc_reuse::{HashExtra, PolicyKind, PrefixCache, ScopedIndex, Xxh3Hasher};
use kvc_sched::{
    PagedLayout, QosClass, Request, Scheduler, SchedulerConfig, SeqId, StepPlan, TenantId,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const BLOCK: u32 = 16;
    const BLOCKS: u64 = 4_096;

    // Paging: 4,096 blocks of 16 tokens, 512 of them pinned for critical traffic, 1% kept
    // free for running sequences to grow into.
    let pool = BlockPool::new(PoolConfig::new(BLOCKS).pinned(512).watermark(BLOCKS / 100))?;

    // Pinning: the critical class allocates from the pinned region, borrowing when it is full.
    let soft = SoftPinConfig::new(2 << 20, BLOCKS as usize, 0.05)?;
    let pin = PinningPolicy::new(PolicyConfig::new(
        Reserve::Static(StaticReserve::blocks(512)),
        soft,
    ))?;

    // Reuse: a prefix cache keyed by chained hashes under this model's namespace.
    let reuse = ScopedIndex::new(
        PrefixCache::new(BLOCK, PolicyKind::Lru),
        Xxh3Hasher,
        HashExtra::new("my-model", 1),
    );

    let cfg = SchedulerConfig {
        block_size: BLOCK,
        ..SchedulerConfig::default()
    };
    let mut sched = Scheduler::new(cfg, pool, pin, reuse)?;

    // The KV tensor the kernels will read, one layer: [blocks, 2, kv_heads, block, head_dim].
    let layout = PagedLayout::hnd(BLOCKS as u32, 8, BLOCK, 128)?;

    // Eight requests share a 200-token system prompt. The first arrives alone; the rest
    // arrive once its prompt is computed, and reuse the cached blocks. (Had the first been
    // critical, its blocks would sit in the pinned region, which standard requests may not
    // hold: they would recompute the prefix instead.)
    let system_prompt: Vec<u32> = (0..200).collect();
    let request = |i: u64| {
        let mut prompt = system_prompt.clone();
        prompt.extend([1_000 + i as u32, 7, 7]);
        Request {
            id: SeqId(i),
            tenant: TenantId(0),
            qos: if i == 7 {
                QosClass::CRITICAL
            } else {
                QosClass::STANDARD
            },
            session: None,
            prompt,
            max_new_tokens: 16,
            arrival_ms: i,
        }
    };
    sched.submit(request(0))?;

    let mut plan = StepPlan::default();
    let mut now_ms = 0;
    while !sched.is_idle() {
        sched.step_into(now_ms, &mut plan);
        // An engine runs the plan here: swap_out, copies, swap_in, then the batch with
        // `plan.page_table(&layout)` and `plan.slots(&layout)` passed to kvc-kernels.
        let pages = plan.page_table(&layout)?;
        let slots = plan.slots(&layout)?;
        assert_eq!(slots.len(), pages.total_queries());
        // The stand-in model samples token 42 for every sequence that asked for a token.
        let sampled: Vec<(SeqId, u32)> = plan
            .seqs
            .iter()
            .filter(|s| s.samples)
            .map(|s| (s.seq, 42))
            .collect();
        for done in sched.complete_step(&sampled)? {
            println!(
                "{} finished: {} tokens, {} prompt tokens from the cache",
                done.seq,
                done.output.len(),
                done.cached_tokens
            );
        }
        if now_ms == 0 {
            for i in 1..8 {
                sched.submit(request(i))?;
            }
        }
        now_ms += 20;
    }
    let stats = sched.stats();
    println!(
        "{} steps, {} of {} prompt tokens served from the cache",
        stats.steps, stats.cached_tokens, stats.prompt_tokens
    );
    Ok(())
}
