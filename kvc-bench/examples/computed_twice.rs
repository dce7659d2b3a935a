//! What adopting a prefix computed twice buys through the real `Scheduler`.
//!
//! Agents start together behind one long system prompt, each with its own task, and loop:
//! each turn's prompt is the previous prompt, the reply and a tool result. The first
//! requests are prefilled in the same steps, so they all compute the system prompt before
//! any of them has cached it. The scheduler offers through
//! `KvManager::cache_blocks_adopting`: a later request takes the cached copy, its duplicate
//! is freed and its own later blocks are cached. The same run with an index that does not
//! adopt (the later copy stays private and the offer ends there, what `insert` does) shows
//! the difference. Real pool, pin policy and prefix cache (LRU, xxh3); no engine: each step's
//! sampled tokens are made up.
//!
//! ```sh
//! cargo run --release -p kvc-bench --example computed_twice -- 32 16384 4096
//! ```
//!
//! Arguments: agents, the step's token budget (`max_batch_tokens`) and the system prompt's
//! tokens (each agent's task is 512 tokens, each tool result 256, each reply 64; 4 turns;
//! `max_model_len` 32,768). Prints, for each
//! mode, the prompt tokens, the tokens served from the cache, the blocks adopted and the
//! peak of blocks in use.

#![allow(clippy::print_stdout, clippy::print_stderr)] // a program: it reports in lines

use std::process::ExitCode;

use kvc_alloc::{BlockPool, PoolConfig};
use kvc_core::{
    BlockId, Offer, PrefixHit, QosClass, Retention, ReuseError, ReuseIndex, ReuseScope, SeqId,
    StoreKey, TenantId, TierKey,
};
use kvc_reuse::{HashExtra, PolicyKind, PrefixCache, ScopedIndex, Xxh3Hasher};
use kvc_sched::{DynamicOnly, Request, Scheduler, SchedulerConfig, StepPlan};

const BLOCK: u32 = 16;
const TASK: u32 = 512;
const TOOL: u32 = 256;
const REPLY: u32 = 64;
const TURNS: usize = 4;

/// An index that forwards everything but `offer_adopting`, which keeps the trait's default
/// (the offer ends at a block cached under another block): the behaviour before adoption.
struct NoAdopt<R>(R);

impl<R: ReuseIndex> ReuseIndex for NoAdopt<R> {
    fn block_size(&self) -> u32 {
        self.0.block_size()
    }
    fn lookup(&mut self, scope: &ReuseScope, prompt: &[u32], now_ms: u64) -> PrefixHit {
        self.0.lookup(scope, prompt, now_ms)
    }
    fn insert(
        &mut self,
        scope: &ReuseScope,
        tokens: &[u32],
        blocks: &[BlockId],
        now_ms: u64,
        newly: &mut Vec<BlockId>,
    ) -> Result<(), ReuseError> {
        self.0.insert(scope, tokens, blocks, now_ms, newly)
    }
    fn acquire(&mut self, blocks: &[BlockId]) -> Result<(), ReuseError> {
        self.0.acquire(blocks)
    }
    fn release(&mut self, blocks: &[BlockId]) -> Result<(), ReuseError> {
        self.0.release(blocks)
    }
    fn evictable_blocks(&self) -> usize {
        self.0.evictable_blocks()
    }
    fn evict(&mut self, count: usize, now_ms: u64, evicted: &mut Vec<BlockId>) -> usize {
        self.0.evict(count, now_ms, evicted)
    }
    fn set_retention(&mut self, block_hash: u64, retention: Retention) {
        self.0.set_retention(block_hash, retention);
    }
    fn end_conversation(
        &mut self,
        scope: &ReuseScope,
        tokens: &[u32],
        keep_first: usize,
        now_ms: u64,
    ) -> Result<usize, ReuseError> {
        self.0.end_conversation(scope, tokens, keep_first, now_ms)
    }
    fn block_keys(&mut self, scope: &ReuseScope, tokens: &[u32], keys: &mut Vec<StoreKey>) {
        self.0.block_keys(scope, tokens, keys);
    }
    fn chain_root(&mut self, scope: &ReuseScope) -> Option<StoreKey> {
        self.0.chain_root(scope)
    }
    fn extend_keys(&mut self, scope: &ReuseScope, tokens: &[u32], keys: &mut Vec<StoreKey>) {
        self.0.extend_keys(scope, tokens, keys);
    }
    fn lookup_keyed(
        &mut self,
        scope: &ReuseScope,
        prompt: &[u32],
        keys: &[StoreKey],
        now_ms: u64,
    ) -> PrefixHit {
        self.0.lookup_keyed(scope, prompt, keys, now_ms)
    }
    fn offer(
        &mut self,
        scope: &ReuseScope,
        offer: Offer<'_>,
        now_ms: u64,
        newly: &mut Vec<BlockId>,
    ) -> Result<(), ReuseError> {
        self.0.offer(scope, offer, now_ms, newly)
    }
    fn cached_key(&self, block: BlockId) -> Option<TierKey> {
        self.0.cached_key(block)
    }
    fn evict_keyed(
        &mut self,
        count: usize,
        now_ms: u64,
        evicted: &mut Vec<BlockId>,
        keys: &mut Vec<Option<TierKey>>,
    ) -> usize {
        self.0.evict_keyed(count, now_ms, evicted, keys)
    }
}

/// What one run served.
#[derive(Debug, Default)]
struct Served {
    prompt_tokens: u64,
    cached_tokens: u64,
    adopted_blocks: u64,
    peak_in_use: usize,
}

fn index() -> ScopedIndex<Xxh3Hasher> {
    let cache = PrefixCache::new(BLOCK, PolicyKind::Lru);
    ScopedIndex::new(cache, Xxh3Hasher, HashExtra::new("agents", 1))
}

fn run<R: ReuseIndex>(index: R, agents: u32, budget: u32, system: u32) -> Result<Served, String> {
    let cfg = SchedulerConfig {
        block_size: BLOCK,
        max_running: agents as usize,
        max_batch_tokens: budget as usize,
        max_model_len: 32_768,
        ..SchedulerConfig::default()
    };
    // Room for every agent's longest context at once: no eviction, no preemption.
    let longest = system + TASK + TURNS as u32 * (TOOL + REPLY);
    let blocks = u64::from(agents) * u64::from(longest.div_ceil(BLOCK) + 1);
    let pool = BlockPool::new(PoolConfig::new(blocks)).map_err(|e| e.to_string())?;
    let mut sched =
        Scheduler::new(cfg, pool, DynamicOnly::default(), index).map_err(|e| e.to_string())?;
    let system: Vec<u32> = (0..system).collect();
    let mut contexts: Vec<Vec<u32>> = (0..agents)
        .map(|a| {
            let mut c = system.clone();
            c.extend((0..TASK).map(|i| 1_000_000 + a * 10_000 + i));
            c
        })
        .collect();
    let mut turns = vec![0usize; agents as usize];
    let mut served = Served::default();
    let mut next_id = 0u64;
    let mut plan = StepPlan::default();
    let submit = |sched: &mut Scheduler<BlockPool, DynamicOnly, R>,
                  agent: usize,
                  prompt: Vec<u32>,
                  id: u64,
                  now: u64|
     -> Result<(), String> {
        let request = Request {
            id: SeqId(id << 8 | agent as u64),
            tenant: TenantId(0),
            qos: QosClass::STANDARD,
            session: None,
            prompt,
            max_new_tokens: REPLY,
            arrival_ms: now,
        };
        sched.submit(request).map_err(|e| e.to_string())
    };
    for (agent, context) in contexts.iter().enumerate() {
        served.prompt_tokens += context.len() as u64;
        submit(&mut sched, agent, context.clone(), next_id, 0)?;
        next_id += 1;
    }
    let mut now = 0u64;
    while !sched.is_idle() {
        sched.step_into(now, &mut plan);
        let sampled: Vec<(SeqId, u32)> = plan
            .seqs
            .iter()
            .filter(|s| s.samples)
            .map(|s| {
                (
                    s.seq,
                    2_000_000 + (s.seq.get() as u32 & 0xff) * 100_000 + s.positions.end as u32,
                )
            })
            .collect();
        let finished = sched.complete_step(&sampled).map_err(|e| e.to_string())?;
        served.peak_in_use = served
            .peak_in_use
            .max(sched.kv_manager().usage().total().in_use);
        now += 1;
        for f in finished {
            served.cached_tokens += f.cached_tokens;
            let agent = (f.seq.get() & 0xff) as usize;
            turns[agent] += 1;
            if turns[agent] == TURNS {
                continue;
            }
            let context = &mut contexts[agent];
            context.extend(&f.output);
            context.extend((0..TOOL).map(|i| 3_000_000 + agent as u32 * 10_000 + i));
            served.prompt_tokens += context.len() as u64;
            submit(&mut sched, agent, context.clone(), next_id, now)?;
            next_id += 1;
        }
    }
    served.adopted_blocks = sched.kv_manager().stats().adopted_blocks;
    Ok(served)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parse = |i: usize, default: u32| -> Result<u32, String> {
        args.get(i)
            .map_or(Ok(default), |s| s.parse().map_err(|e| format!("{s}: {e}")))
    };
    let result = (|| -> Result<(), String> {
        let (agents, budget, system) = (parse(0, 32)?, parse(1, 16_384)?, parse(2, 4_096)?);
        if agents == 0 || agents > 255 || budget == 0 || system > 24_000 {
            return Err(
                "usage: computed_twice [AGENTS 1..=255] [BUDGET_TOKENS >= 1] [SYSTEM_TOKENS <= 24000]"
                    .into(),
            );
        }
        for (mode, served) in [
            ("adopting", run(index(), agents, budget, system)?),
            (
                "not adopting",
                run(NoAdopt(index()), agents, budget, system)?,
            ),
        ] {
            let rate = served.cached_tokens as f64 / served.prompt_tokens.max(1) as f64;
            println!(
                "{mode:>12}: {agents} agents x {TURNS} turns, system prompt {system}, budget {budget}: \
                 prompt tokens {}, \
                 cached {} ({:.2}%), adopted blocks {}, peak blocks in use {}",
                served.prompt_tokens,
                served.cached_tokens,
                100.0 * rate,
                served.adopted_blocks,
                served.peak_in_use
            );
        }
        Ok(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("computed_twice: {e}");
            ExitCode::FAILURE
        }
    }
}
