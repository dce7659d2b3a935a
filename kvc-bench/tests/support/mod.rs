//! Helpers of the engine's equality tests: the tiny engine's configuration, prompts, and the
//! check of every generated token's logits against the contiguous f64 reference.
#![allow(dead_code)]

use kvc_bench::engine::model::ModelConfig;
use kvc_bench::engine::{Completed, Engine, EngineConfig, EngineRequest};
use kvc_core::{PinPolicy, QosClass, ReuseIndex, TenantId};
use kvc_reuse::{HashExtra, PolicyKind, PrefixCache, ScopedIndex, Xxh3Hasher};

/// The largest difference allowed between a logit and its reference.
pub const TOL: f32 = 2e-3;

/// The tiny model over `blocks` blocks of 4 tokens, recording logits.
pub fn config(blocks: u32) -> EngineConfig {
    let mut cfg = EngineConfig::new(ModelConfig::tiny(), blocks);
    cfg.block_size = 4;
    cfg.record_logits = true;
    cfg.sched.max_batch_tokens = 48;
    cfg
}

/// A prefix cache (LRU) over 4-token blocks.
pub fn index() -> ScopedIndex<Xxh3Hasher> {
    ScopedIndex::new(
        PrefixCache::new(4, PolicyKind::Lru),
        Xxh3Hasher,
        HashExtra::new("tiny", 1),
    )
}

/// A standard request for `new` tokens after `prompt`.
pub fn request(prompt: Vec<u32>, new: u32) -> EngineRequest {
    EngineRequest {
        tenant: TenantId(0),
        qos: QosClass::STANDARD,
        session: None,
        prompt,
        max_new_tokens: new,
    }
}

/// A prompt of `len` tokens only `seed` produces.
pub fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 37 + seed * 101) % 256)
        .collect()
}

/// Checks every generated token's logits against the contiguous reference.
pub fn check<P: PinPolicy, R: ReuseIndex>(engine: &Engine<P, R>, done: &[Completed]) {
    for c in done {
        assert_eq!(c.logits.len(), c.output.len(), "{}", c.id);
        let mut tokens = c.prompt.clone();
        tokens.extend(&c.output[..c.output.len() - 1]);
        let reference = engine.model().reference_logits(&tokens);
        for (i, got) in c.logits.iter().enumerate() {
            let want = &reference[c.prompt.len() - 1 + i];
            let diff = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(diff < TOL, "{}: token {i} differs by {diff}", c.id);
        }
    }
}
