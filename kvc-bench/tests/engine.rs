//! End-to-end equality: the logits of every token the engine generates equal (within the
//! kernels' tolerance) those of the same model run alone on contiguous K/V, however the kvc
//! stack served the request: batched on the paged cache, after a prefix hit, as a session's
//! next turn, after a recompute preemption, after a swap to the host tier, pinned or not.

mod support;

use kvc_bench::engine::Engine;
use kvc_core::{NoReuse, QosClass, SessionId};
use kvc_pin::{PinningPolicy, PolicyConfig, Reserve, SoftPinConfig, StaticReserve};
use kvc_sched::DynamicOnly;
use support::{check, config, index, prompt, request};

#[test]
fn batched_paged_requests_match_the_contiguous_reference() {
    let mut e = Engine::new(
        &config(64),
        DynamicOnly::default(),
        NoReuse { block_size: 4 },
    )
    .unwrap();
    for i in 0..5 {
        e.submit(request(prompt(i, 9 + i as usize * 5), 6)).unwrap();
    }
    let done = e.run_until_idle(1_000).unwrap();
    assert_eq!(done.len(), 5);
    check(&e, &done);
}

#[test]
fn a_prefix_hit_gives_the_same_logits() {
    let mut e = Engine::new(&config(64), DynamicOnly::default(), index()).unwrap();
    let shared = prompt(3, 21);
    e.submit(request(shared.clone(), 4)).unwrap();
    let first = e.run_until_idle(1_000).unwrap();
    let mut p = shared.clone();
    p.extend([9, 8, 7]);
    e.submit(request(p, 5)).unwrap();
    let second = e.run_until_idle(1_000).unwrap();
    assert_eq!(
        second[0].cached_tokens, 20,
        "the shared 21 tokens give 5 full blocks"
    );
    check(&e, &first);
    check(&e, &second);
}

#[test]
fn a_prefix_computed_twice_and_adopted_gives_the_same_logits() {
    // Two requests with 5 shared blocks, prefilled in the same step: both compute the
    // shared blocks; the second takes the first one's copies when it offers, its own are
    // freed (and handed to other sequences), and its later blocks are cached after them.
    let mut e = Engine::new(&config(64), DynamicOnly::default(), index()).unwrap();
    let shared = prompt(3, 20);
    let (mut a, mut b) = (shared.clone(), shared);
    a.extend([5, 6, 7, 8, 9]);
    b.extend([9, 8, 7, 6, 5]);
    e.submit(request(a, 4)).unwrap();
    let second = e.submit(request(b.clone(), 6)).unwrap();
    let first = e.run_until_idle(1_000).unwrap();
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|c| c.cached_tokens == 0));
    assert_eq!(e.scheduler().kv_manager().stats().adopted_blocks, 5);
    check(&e, &first);
    // The second conversation's next turn reads its whole context from the cache: the
    // adopted copies and its own blocks cached after them.
    let done = first.iter().find(|c| c.id == second).unwrap();
    let mut next = b;
    next.extend(&done.output);
    next.extend([1, 2, 3]);
    e.submit(request(next, 5)).unwrap();
    let again = e.run_until_idle(1_000).unwrap();
    assert_eq!(
        again[0].cached_tokens, 28,
        "7 full blocks: the prompt's 6, the reply's 1"
    );
    check(&e, &again);
}

#[test]
fn a_session_continuation_gives_the_same_logits() {
    let mut e = Engine::new(&config(64), DynamicOnly::default(), index()).unwrap();
    let mut turn = request(prompt(5, 14), 5);
    turn.session = Some(SessionId(1));
    e.submit(turn.clone()).unwrap();
    let first = e.run_until_idle(1_000).unwrap();
    let mut next = turn;
    next.prompt.extend(&first[0].output);
    next.prompt.extend([3, 1, 4, 1, 5]);
    e.submit(next).unwrap();
    let second = e.run_until_idle(1_000).unwrap();
    assert!(
        second[0].cached_tokens >= 16,
        "cached {}",
        second[0].cached_tokens
    );
    check(&e, &first);
    check(&e, &second);
}

#[test]
fn preempted_and_recomputed_requests_give_the_same_logits() {
    // 14 blocks of 4 tokens for four requests growing to 6 blocks each: preemption is forced.
    let mut e = Engine::new(
        &config(14),
        DynamicOnly::default(),
        NoReuse { block_size: 4 },
    )
    .unwrap();
    for i in 0..4 {
        let mut r = request(prompt(10 + i, 10), 12);
        r.qos = QosClass((i % 3) as u8);
        e.submit(r).unwrap();
    }
    let done = e.run_until_idle(5_000).unwrap();
    assert_eq!(done.len(), 4);
    assert!(
        e.scheduler().stats().preempted > 0,
        "the pool was meant to force preemption"
    );
    check(&e, &done);
}

#[test]
fn swapped_out_and_back_requests_give_the_same_logits() {
    let mut cfg = config(14);
    cfg.host_blocks = 32;
    let mut e = Engine::new(&cfg, DynamicOnly::default(), NoReuse { block_size: 4 }).unwrap();
    for i in 0..4 {
        let mut r = request(prompt(20 + i, 10), 12);
        r.qos = QosClass((i % 3) as u8);
        e.submit(r).unwrap();
    }
    let done = e.run_until_idle(5_000).unwrap();
    assert_eq!(done.len(), 4);
    assert!(
        e.scheduler().stats().swapped_out > 0,
        "the pool was meant to force a swap"
    );
    check(&e, &done);
}

#[test]
fn pinned_critical_traffic_gives_the_same_logits() {
    let mut cfg = config(48);
    cfg.pinned = 16;
    let soft = SoftPinConfig::new(1024, 48, 0.05).unwrap();
    let pin = PinningPolicy::new(PolicyConfig::new(
        Reserve::Static(StaticReserve::blocks(16)),
        soft,
    ))
    .unwrap();
    let mut e = Engine::new(&cfg, pin, index()).unwrap();
    for i in 0..6 {
        let mut r = request(prompt(30 + i, 12), 6);
        r.qos = if i % 2 == 0 {
            QosClass::CRITICAL
        } else {
            QosClass::BEST_EFFORT
        };
        e.submit(r).unwrap();
    }
    let report_done = e.run_until_idle(5_000).unwrap();
    assert_eq!(report_done.len(), 6);
    check(&e, &report_done);
}

#[test]
fn serve_reports_real_throughput() {
    let mut e = Engine::new(&config(64), DynamicOnly::default(), index()).unwrap();
    let reqs = (0..4).map(|i| request(prompt(40 + i, 8), 4)).collect();
    let report = e.serve(reqs).unwrap();
    assert_eq!(report.requests, 4);
    assert_eq!(report.generated_tokens, 16);
    assert_eq!(report.computed_tokens, 4 * 8 + 4 * 3);
    assert!(report.tokens_per_s > 0.0);
}

#[test]
fn a_model_shape_that_cannot_run_is_refused_before_serving() {
    use kvc_bench::engine::EngineError;
    use kvc_bench::engine::model::ModelError;
    // Each of these used to build an engine that panicked at its first step (a remainder by a
    // zero vocabulary, chunks of a zero width or feed-forward size).
    for field in ["vocab", "d_model", "ffn", "layers", "q_heads"] {
        let mut cfg = config(64);
        match field {
            "vocab" => cfg.model.vocab = 0,
            "d_model" => cfg.model.d_model = 0,
            "ffn" => cfg.model.ffn = 0,
            "layers" => cfg.model.layers = 0,
            _ => cfg.model.q_heads = 0,
        }
        let got = Engine::new(&cfg, DynamicOnly::default(), NoReuse { block_size: 4 }).err();
        assert!(
            matches!(got, Some(EngineError::Model(ModelError::ZeroDimension { field: f })) if f == field),
            "{field} = 0: {got:?}"
        );
    }
    // This one was refused, but only by the kernels at the first step.
    let mut cfg = config(64);
    cfg.model.q_heads = 3;
    let got = Engine::new(&cfg, DynamicOnly::default(), NoReuse { block_size: 4 }).err();
    assert!(
        matches!(
            got,
            Some(EngineError::Model(ModelError::Grouping {
                q_heads: 3,
                kv_heads: 2
            }))
        ),
        "{got:?}"
    );
    let mut cfg = config(64);
    cfg.model.vocab = usize::MAX / 2;
    let got = Engine::new(&cfg, DynamicOnly::default(), NoReuse { block_size: 4 }).err();
    assert!(
        matches!(got, Some(EngineError::Model(ModelError::TooLarge))),
        "{got:?}"
    );
}
