//! A small llama-style transformer with seeded random weights: RMSNorm, rotary position
//! embeddings, grouped-query attention, a SwiGLU feed-forward block and tied embeddings.
//!
//! The model computes everything except attention itself; the engine does attention over the
//! paged cache with `kvc-kernels`, and [`Model::reference_logits`] does it over contiguous
//! K/V, so the two can be compared.

use rayon::prelude::*;
use thiserror::Error;

use crate::sim::rng::Rng;

/// Why a [`ModelConfig`] cannot be built into a [`Model`].
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A dimension the model divides by or indexes with is 0.
    #[error("model dimension `{field}` must be at least 1")]
    ZeroDimension {
        /// The field of [`ModelConfig`].
        field: &'static str,
    },
    /// The query heads do not split evenly over the KV heads (grouped-query attention).
    #[error("{q_heads} query heads do not split evenly over {kv_heads} KV heads")]
    Grouping {
        /// Query heads.
        q_heads: usize,
        /// KV heads.
        kv_heads: usize,
    },
    /// The weights would hold more than [`Model::MAX_WEIGHTS`] values (or overflow).
    #[error("the model's weights would take more than {max} values", max = Model::MAX_WEIGHTS)]
    TooLarge,
}

/// The shape of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelConfig {
    /// Transformer layers.
    pub layers: usize,
    /// Model width.
    pub d_model: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Feed-forward width.
    pub ffn: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Seed of the random weights.
    pub seed: u64,
}

impl ModelConfig {
    /// The engine's default: 4 layers, width 256, 8 query heads over 2 KV heads of 32.
    #[must_use]
    pub const fn small() -> Self {
        Self {
            layers: 4,
            d_model: 256,
            q_heads: 8,
            kv_heads: 2,
            head_dim: 32,
            ffn: 512,
            vocab: 1024,
            seed: 1,
        }
    }

    /// A model small enough for tests: 2 layers, width 64, 4 query heads over 2 KV heads of 16.
    #[must_use]
    pub const fn tiny() -> Self {
        Self {
            layers: 2,
            d_model: 64,
            q_heads: 4,
            kv_heads: 2,
            head_dim: 16,
            ffn: 128,
            vocab: 256,
            seed: 7,
        }
    }

    /// The model id KV blocks are stored under (a tier's namespace): every field, so that
    /// models of another shape or other weights never read each other's blocks.
    #[must_use]
    pub fn store_id(&self) -> String {
        format!(
            "kvc-engine/l{}-d{}-q{}-kv{}-hd{}-ffn{}-v{}-seed{}",
            self.layers,
            self.d_model,
            self.q_heads,
            self.kv_heads,
            self.head_dim,
            self.ffn,
            self.vocab,
            self.seed
        )
    }

    /// Whether the config can be built: every dimension at least 1, query heads a multiple
    /// of KV heads, and the weights within [`Model::MAX_WEIGHTS`] values.
    pub fn check(&self) -> Result<(), ModelError> {
        for (value, field) in [
            (self.layers, "layers"),
            (self.d_model, "d_model"),
            (self.q_heads, "q_heads"),
            (self.kv_heads, "kv_heads"),
            (self.head_dim, "head_dim"),
            (self.ffn, "ffn"),
            (self.vocab, "vocab"),
        ] {
            if value == 0 {
                return Err(ModelError::ZeroDimension { field });
            }
        }
        if !self.q_heads.is_multiple_of(self.kv_heads) {
            return Err(ModelError::Grouping {
                q_heads: self.q_heads,
                kv_heads: self.kv_heads,
            });
        }
        let d = self.d_model;
        let per_layer = || {
            let qd = self.q_heads.checked_mul(self.head_dim)?;
            let kvd = self.kv_heads.checked_mul(self.head_dim)?;
            // wq and wo, wk and wv, the three feed-forward matrices, two norms.
            let attn = d.checked_mul(qd)?.checked_mul(2)?;
            let kv = d.checked_mul(kvd)?.checked_mul(2)?;
            let ffn = d.checked_mul(self.ffn)?.checked_mul(3)?;
            attn.checked_add(kv)?.checked_add(ffn)?.checked_add(2 * d)
        };
        let total = per_layer()
            .and_then(|l| l.checked_mul(self.layers))
            .and_then(|w| w.checked_add(self.vocab.checked_mul(d)?));
        match total {
            Some(w) if w <= Model::MAX_WEIGHTS => Ok(()),
            _ => Err(ModelError::TooLarge),
        }
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
    ffn_norm: Vec<f32>,
    w_gate: Vec<f32>,
    w_up: Vec<f32>,
    w_down: Vec<f32>,
}

/// The model's weights.
pub struct Model {
    /// Its shape.
    pub cfg: ModelConfig,
    embed: Vec<f32>,
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
}

/// `x [n × k] · w [k × m]`.
fn matmul(x: &[f32], k: usize, w: &[f32], m: usize) -> Vec<f32> {
    let n = x.len() / k;
    let mut out = vec![0.0f32; n * m];
    out.par_chunks_mut(m).enumerate().for_each(|(i, row)| {
        let xi = &x[i * k..(i + 1) * k];
        for (kk, &a) in xi.iter().enumerate() {
            let wr = &w[kk * m..(kk + 1) * m];
            for (o, &b) in row.iter_mut().zip(wr) {
                *o += a * b;
            }
        }
    });
    out
}

fn rms_norm(x: &[f32], d: usize, weight: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for (row, o) in x.chunks(d).zip(out.chunks_mut(d)) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + 1e-5).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = v * inv * w;
        }
    }
    out
}

/// Rotary embeddings on `[n × heads × head_dim]`, token `i` at `positions[i]`.
fn rope(x: &mut [f32], heads: usize, hd: usize, positions: &[u64]) {
    for (t, &pos) in positions.iter().enumerate() {
        for h in 0..heads {
            let v = &mut x[(t * heads + h) * hd..(t * heads + h + 1) * hd];
            for i in 0..hd / 2 {
                let theta = pos as f32 / 10_000f32.powf(2.0 * i as f32 / hd as f32);
                let (s, c) = theta.sin_cos();
                let (a, b) = (v[i], v[i + hd / 2]);
                v[i] = a * c - b * s;
                v[i + hd / 2] = a * s + b * c;
            }
        }
    }
}

fn random(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.uniform() as f32 * 2.0 - 1.0) * scale)
        .collect()
}

/// The query, key and value of a layer for `n` tokens.
pub struct Qkv {
    /// `[n × q_heads × head_dim]`.
    pub q: Vec<f32>,
    /// `[n × kv_heads × head_dim]`.
    pub k: Vec<f32>,
    /// `[n × kv_heads × head_dim]`.
    pub v: Vec<f32>,
}

impl Model {
    /// The most weight values a model may hold: 2^30 (4 GiB of f32), far above any model a
    /// CPU engine serves in reasonable time.
    pub const MAX_WEIGHTS: usize = 1 << 30;

    /// Random weights from the config's seed; a config that fails [`ModelConfig::check`] is
    /// refused.
    pub fn new(cfg: ModelConfig) -> Result<Self, ModelError> {
        cfg.check()?;
        let mut rng = Rng::new(cfg.seed);
        let d = cfg.d_model;
        let (qd, kvd) = (cfg.q_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim);
        let s = 1.0 / (d as f32).sqrt();
        let layers = (0..cfg.layers)
            .map(|_| Layer {
                attn_norm: vec![1.0; d],
                wq: random(&mut rng, d * qd, s),
                wk: random(&mut rng, d * kvd, s),
                wv: random(&mut rng, d * kvd, s),
                wo: random(&mut rng, qd * d, 1.0 / (qd as f32).sqrt()),
                ffn_norm: vec![1.0; d],
                w_gate: random(&mut rng, d * cfg.ffn, s),
                w_up: random(&mut rng, d * cfg.ffn, s),
                w_down: random(&mut rng, cfg.ffn * d, 1.0 / (cfg.ffn as f32).sqrt()),
            })
            .collect();
        Ok(Self {
            embed: random(&mut rng, cfg.vocab * d, 1.0),
            layers,
            final_norm: vec![1.0; d],
            cfg,
        })
    }

    /// The embeddings of `tokens`, `[n × d_model]` (token ids wrap around the vocabulary).
    #[must_use]
    pub fn embed(&self, tokens: &[u32]) -> Vec<f32> {
        let d = self.cfg.d_model;
        let mut x = Vec::with_capacity(tokens.len() * d);
        for &t in tokens {
            let t = t as usize % self.cfg.vocab;
            x.extend_from_slice(&self.embed[t * d..(t + 1) * d]);
        }
        x
    }

    /// Layer `l`'s rotated query and key and its value, for hidden states `x` at `positions`.
    #[must_use]
    pub fn qkv(&self, l: usize, x: &[f32], positions: &[u64]) -> Qkv {
        let c = &self.cfg;
        let layer = &self.layers[l];
        let h = rms_norm(x, c.d_model, &layer.attn_norm);
        let mut q = matmul(&h, c.d_model, &layer.wq, c.q_heads * c.head_dim);
        let mut k = matmul(&h, c.d_model, &layer.wk, c.kv_heads * c.head_dim);
        let v = matmul(&h, c.d_model, &layer.wv, c.kv_heads * c.head_dim);
        rope(&mut q, c.q_heads, c.head_dim, positions);
        rope(&mut k, c.kv_heads, c.head_dim, positions);
        Qkv { q, k, v }
    }

    /// Finishes layer `l`: output projection of the attention result `attn`
    /// (`[n × q_heads × head_dim]`), residual, feed-forward, residual; updates `x`.
    pub fn finish(&self, l: usize, x: &mut [f32], attn: &[f32]) {
        let c = &self.cfg;
        let layer = &self.layers[l];
        let o = matmul(attn, c.q_heads * c.head_dim, &layer.wo, c.d_model);
        for (a, b) in x.iter_mut().zip(&o) {
            *a += b;
        }
        let h = rms_norm(x, c.d_model, &layer.ffn_norm);
        let gate = matmul(&h, c.d_model, &layer.w_gate, c.ffn);
        let up = matmul(&h, c.d_model, &layer.w_up, c.ffn);
        let act: Vec<f32> = gate
            .iter()
            .zip(&up)
            .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        let down = matmul(&act, c.ffn, &layer.w_down, c.d_model);
        for (a, b) in x.iter_mut().zip(&down) {
            *a += b;
        }
    }

    /// Logits of one hidden state (tied embeddings).
    #[must_use]
    pub fn logits(&self, x: &[f32]) -> Vec<f32> {
        let d = self.cfg.d_model;
        let h = rms_norm(x, d, &self.final_norm);
        self.embed
            .chunks(d)
            .map(|e| e.iter().zip(&h).map(|(a, b)| a * b).sum())
            .collect()
    }

    /// The logits at every position of `tokens`, computed alone with contiguous K/V and plain
    /// causal attention in f64: the reference the paged engine is checked against.
    #[must_use]
    pub fn reference_logits(&self, tokens: &[u32]) -> Vec<Vec<f32>> {
        let c = &self.cfg;
        let n = tokens.len();
        let positions: Vec<u64> = (0..n as u64).collect();
        let mut x = self.embed(tokens);
        let group = c.q_heads / c.kv_heads;
        let hd = c.head_dim;
        let scale = 1.0 / (hd as f64).sqrt();
        for l in 0..c.layers {
            let Qkv { q, k, v } = self.qkv(l, &x, &positions);
            let mut attn = vec![0.0f32; n * c.q_heads * hd];
            for t in 0..n {
                for h in 0..c.q_heads {
                    let kvh = h / group;
                    let qv = &q[(t * c.q_heads + h) * hd..(t * c.q_heads + h + 1) * hd];
                    let scores: Vec<f64> = (0..=t)
                        .map(|s| {
                            let kv =
                                &k[(s * c.kv_heads + kvh) * hd..(s * c.kv_heads + kvh + 1) * hd];
                            qv.iter()
                                .zip(kv)
                                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = w.iter().sum();
                    let out = &mut attn[(t * c.q_heads + h) * hd..(t * c.q_heads + h + 1) * hd];
                    for (s, ws) in w.iter().enumerate() {
                        let vv = &v[(s * c.kv_heads + kvh) * hd..(s * c.kv_heads + kvh + 1) * hd];
                        for (o, &b) in out.iter_mut().zip(vv) {
                            *o += (ws / z * f64::from(b)) as f32;
                        }
                    }
                }
            }
            self.finish(l, &mut x, &attn);
        }
        x.chunks(c.d_model).map(|row| self.logits(row)).collect()
    }
}

/// The index of the largest logit (greedy sampling).
#[must_use]
pub fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv { (i, v) } else { (bi, bv) }
        })
        .0 as u32
}
