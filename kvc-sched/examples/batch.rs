//! A handful of requests driven to completion, from `kvc-sched` and `kvc-alloc` alone: no
//! pinning (`DynamicOnly`), no prefix cache (`NoReuse`), a stand-in for the model. Shows
//! chunked prefill under a token budget, a critical request going first, an end-of-sequence
//! token, the page tables a plan builds for the kernels, and the typed errors of bad input.
//!
//! ```sh
//! cargo run -p kvc-sched --example batch
//! ```

#![allow(clippy::print_stdout)] // a program: it says what it did

use kvc_alloc::{BlockPool, PoolConfig};
use kvc_sched::{
    CancelError, CompleteError, ConfigError, DynamicOnly, FinishReason, NoReuse, PagedLayout,
    QosClass, Request, Scheduler, SchedulerConfig, SeqId, StepPlan, SubmitError, TenantId,
};

const BLOCK: u32 = 16;
const BLOCKS: u64 = 24;
const EOS: u32 = 2;

fn request(id: u64, prompt_tokens: u32, qos: QosClass) -> Request {
    Request {
        id: SeqId(id),
        tenant: TenantId(0),
        qos,
        session: None,
        prompt: (0..prompt_tokens).collect(),
        max_new_tokens: 4,
        arrival_ms: 0,
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pool = BlockPool::new(PoolConfig::new(BLOCKS))?;
    let cfg = SchedulerConfig {
        block_size: BLOCK,
        max_batch_tokens: 64, // small, so long prompts are prefilled in chunks
        eos_token: Some(EOS),
        ..SchedulerConfig::default()
    };
    let mut sched = Scheduler::new(
        cfg,
        pool,
        DynamicOnly::default(),
        NoReuse { block_size: BLOCK },
    )?;
    // The kernels' view of the KV pool: 24 blocks, 1 KV head of 8 dims (HND).
    let layout = PagedLayout::hnd(BLOCKS as u32, 1, BLOCK, 8)?;

    for (id, tokens) in [(1, 40), (2, 100), (3, 70), (5, 130)] {
        sched.submit(request(id, tokens, QosClass::STANDARD))?;
    }
    sched.submit(request(4, 20, QosClass::CRITICAL))?;

    // Bad input is refused at submit, with the reason.
    assert!(matches!(
        sched.submit(request(1, 10, QosClass::STANDARD)),
        Err(SubmitError::DuplicateId { .. })
    ));
    assert!(matches!(
        sched.submit(request(9, 0, QosClass::STANDARD)),
        Err(SubmitError::EmptyPrompt { .. })
    ));
    assert!(matches!(
        sched.submit(request(10, 30 * BLOCK, QosClass::STANDARD)),
        Err(SubmitError::Impossible { .. }) // 30 blocks, the pool has 24
    ));
    assert!(matches!(
        sched.submit(request(11, 10, QosClass(7))),
        Err(SubmitError::UnknownClass { .. })
    ));
    assert!(matches!(
        sched.cancel(SeqId(99)),
        Err(CancelError::Unknown { .. })
    ));

    let mut plan = StepPlan::default(); // reused across steps
    let mut finished = Vec::new();
    let mut now_ms = 0;
    while !sched.is_idle() {
        sched.step_into(now_ms, &mut plan);
        assert!(plan.num_tokens() <= 64);
        if plan.step == 0 {
            assert_eq!(plan.seqs[0].seq, SeqId(4)); // the critical request goes first
        }
        // Validated CSR page table and slot mapping for the attention kernels.
        let pages = plan.page_table(&layout)?;
        let slots = plan.slots(&layout)?;
        assert_eq!(pages.batch(), plan.seqs.len());
        assert_eq!(slots.len(), plan.num_tokens());
        // ... run the model here; sample one token for each sequence that samples.
        // Sequence 3 produces the end-of-sequence token at once; the others produce 7s.
        let sampled: Vec<(SeqId, u32)> = plan
            .seqs
            .iter()
            .filter(|s| s.samples)
            .map(|s| (s.seq, if s.seq == SeqId(3) { EOS } else { 7 }))
            .collect();
        if plan.step == 0 {
            // A token for a sequence the plan did not sample is refused; nothing applies.
            assert!(matches!(
                sched.complete_step(&[(SeqId(99), 1)]),
                Err(CompleteError::NotSampled { .. })
            ));
        }
        finished.extend(sched.complete_step(&sampled)?);
        now_ms += 10;
    }

    assert_eq!(finished.len(), 5);
    for f in &finished {
        if f.seq == SeqId(3) {
            assert_eq!(
                (f.reason, f.output.as_slice()),
                (FinishReason::Eos, &[EOS][..])
            );
        } else {
            assert_eq!(
                (f.reason, f.output.as_slice()),
                (FinishReason::Length, &[7; 4][..])
            );
        }
    }
    // Everything was given back.
    assert_eq!(sched.kv_manager().usage().dynamic.free, BLOCKS as usize);

    // A configuration that cannot work is refused when the scheduler is built.
    let mismatch = Scheduler::new(
        SchedulerConfig::default(), // blocks of 16 tokens
        BlockPool::new(PoolConfig::new(4))?,
        DynamicOnly::default(),
        NoReuse { block_size: 32 },
    );
    assert!(matches!(
        mismatch.err(),
        Some(ConfigError::BlockSizeMismatch { .. })
    ));

    let stats = sched.stats();
    println!(
        "batch: {} requests in {} steps, {} prompt tokens, {} preemptions",
        stats.finished, stats.steps, stats.prompt_tokens, stats.preempted
    );
    Ok(())
}
