//! Criterion benchmark: one scheduler step with 256 running sequences in decode. A sequence
//! that finishes is replaced by a new request, so the batch stays at 256 (continuous
//! batching: now and then a step also carries a new prompt's prefill).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use kvc_alloc::{BlockPool, PoolConfig};
use kvc_core::{NoReuse, QosClass, SeqId, TenantId};
use kvc_sched::{DynamicOnly, Request, Scheduler, SchedulerConfig, StepPlan};

fn step_256(c: &mut Criterion) {
    let cfg = SchedulerConfig {
        block_size: 16,
        max_running: 256,
        max_batch_tokens: 1 << 20,
        max_model_len: 4096,
        ..SchedulerConfig::default()
    };
    let pool = BlockPool::new(PoolConfig::new(1 << 16)).unwrap();
    let mut sched = Scheduler::new(
        cfg,
        pool,
        DynamicOnly::default(),
        NoReuse { block_size: 16 },
    )
    .unwrap();
    let request = |i: u64| Request {
        id: SeqId(i),
        tenant: TenantId(0),
        qos: QosClass((i % 3) as u8),
        session: None,
        prompt: vec![1; 500 + (i as usize * 37) % 1500],
        max_new_tokens: 1000 + (i as u32 * 53) % 1000,
        arrival_ms: i,
    };
    for i in 0..256u64 {
        sched.submit(request(i)).unwrap();
    }
    let mut next_id = 256u64;
    // Prefill everything once; from then on every step decodes 256 sequences.
    let mut now = 0;
    let mut sampled: Vec<(SeqId, u32)> = Vec::with_capacity(256);
    let mut plan = StepPlan::default();
    let mut run = |sched: &mut Scheduler<_, _, _>, now: u64| {
        sched.step_into(now, &mut plan);
        let plan = &plan;
        sampled.clear();
        sampled.extend(plan.seqs.iter().filter(|s| s.samples).map(|s| (s.seq, 5)));
        let done = sched.complete_step(&sampled).unwrap();
        for _ in &done {
            sched.submit(request(next_id)).unwrap();
            next_id += 1;
        }
        black_box((plan.num_tokens(), done));
    };
    run(&mut sched, now);
    assert_eq!(sched.num_running(), 256);
    c.bench_function("sched/step with 256 decoding sequences", |b| {
        b.iter(|| {
            now += 1;
            run(&mut sched, now);
        })
    });
}

criterion_group!(benches, step_256);
criterion_main!(benches);
