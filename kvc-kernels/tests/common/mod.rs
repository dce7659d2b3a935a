//! Shared test helpers: a seeded generator, random paged scenarios with NaN-poisoned unused
//! slots, and a naive f64 reference that gathers K/V through the page table.
#![allow(dead_code)]

use kvc_core::{BlockId, PageTable, PagedLayout};
use kvc_kernels::KvElem;

/// kvc's SplitMix64 ([`kvc_core::rng`]) over a visible state, with the draws the tests need.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(kvc_core::rng::GAMMA);
        kvc_core::rng::mix(self.0)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// Uniform in `[-1, 1)`.
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// `count` distinct values of `0..n`, in random order.
    pub fn distinct(&mut self, count: usize, n: u32) -> Vec<u32> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let v = self.below(u64::from(n)) as u32;
            if seen.insert(v) {
                out.push(v);
            }
        }
        out
    }
}

/// A pool filled with NaN except the rows of real tokens, and a page table over it.
pub struct Scenario<T> {
    pub layout: PagedLayout,
    pub cache: Vec<T>,
    pub table: PageTable,
}

#[allow(clippy::too_many_arguments)]
/// Builds a scenario: `seq_lens[i]` KV tokens and `q_lens[i]` queries per sequence, pages
/// picked at random from a pool of `num_blocks` (at least the pages needed), rows of real
/// tokens random in [-1, 1), every other element NaN.
pub fn scenario<T: KvElem>(
    rng: &mut Rng,
    nhd: bool,
    kv_heads: u32,
    block_size: u32,
    head_dim: u32,
    seq_lens: &[u32],
    q_lens: &[u32],
    num_blocks: Option<u32>,
) -> Scenario<T> {
    let pages: Vec<u32> = seq_lens.iter().map(|&l| l.div_ceil(block_size)).collect();
    let needed: u32 = pages.iter().sum();
    let num_blocks = num_blocks.unwrap_or(needed * 2 + 3).max(needed.max(1));
    let layout = if nhd {
        PagedLayout::nhd(num_blocks, kv_heads, block_size, head_dim)
    } else {
        PagedLayout::hnd(num_blocks, kv_heads, block_size, head_dim)
    }
    .unwrap();
    let ids = rng.distinct(needed as usize, num_blocks);
    let mut kv_indptr = vec![0u32];
    for p in &pages {
        kv_indptr.push(kv_indptr.last().unwrap() + p);
    }
    let mut qo_indptr = vec![0u32];
    for q in q_lens {
        qo_indptr.push(qo_indptr.last().unwrap() + q);
    }
    let kv_indices: Vec<BlockId> = ids.into_iter().map(BlockId).collect();
    let table =
        PageTable::new(qo_indptr, kv_indptr, kv_indices, seq_lens.to_vec(), &layout).unwrap();
    let mut cache = vec![T::from_f32(f32::NAN); layout.len() as usize];
    let d = head_dim as usize;
    for (seq, &len) in seq_lens.iter().enumerate() {
        for pos in 0..len {
            let block = table.pages(seq)[(pos / block_size) as usize].get();
            for kv in 0..2 {
                for h in 0..kv_heads {
                    let at = layout.offset(block, kv, h, pos % block_size) as usize;
                    for x in &mut cache[at..at + d] {
                        *x = T::from_f32(rng.unit());
                    }
                }
            }
        }
    }
    Scenario {
        layout,
        cache,
        table,
    }
}

/// Random queries `[rows, q_heads, head_dim]`.
pub fn queries<T: KvElem>(rng: &mut Rng, rows: usize, q_heads: u32, head_dim: u32) -> Vec<T> {
    (0..rows * q_heads as usize * head_dim as usize)
        .map(|_| T::from_f32(rng.unit()))
        .collect()
}

/// Naive attention in f64: gathers each sequence's K/V through the page table; query `j` of
/// `n` sees tokens `0..=L - n + j`. Returns `(out, lse)` shaped like the kernels'.
pub fn reference<T: KvElem>(
    s: &Scenario<T>,
    q: &[T],
    q_heads: u32,
    scale: f32,
) -> (Vec<f64>, Vec<f64>) {
    let l = &s.layout;
    let (d, bs) = (l.head_dim() as usize, l.block_size());
    let group = q_heads / l.kv_heads();
    let rows = s.table.total_queries() * q_heads as usize;
    let mut out = vec![0f64; rows * d];
    let mut lse = vec![0f64; rows];
    for seq in 0..s.table.batch() {
        let len = s.table.seq_len(seq);
        let qs = s.table.queries(seq);
        let row = |kv: u32, h: u32, pos: u32| -> Vec<f64> {
            let block = s.table.pages(seq)[(pos / bs) as usize].get();
            let at = l.offset(block, kv, h, pos % bs) as usize;
            s.cache[at..at + d]
                .iter()
                .map(|x| f64::from(x.to_f32()))
                .collect()
        };
        for (j, r) in qs.clone().enumerate() {
            let visible = len - qs.len() as u32 + j as u32 + 1;
            for qh in 0..q_heads {
                let h = qh / group;
                let at = (r * q_heads as usize + qh as usize) * d;
                let qv: Vec<f64> = q[at..at + d]
                    .iter()
                    .map(|x| f64::from(x.to_f32()))
                    .collect();
                let scores: Vec<f64> = (0..visible)
                    .map(|p| {
                        let k = row(0, h, p);
                        qv.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>() * f64::from(scale)
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let sum: f64 = w.iter().sum();
                let o = &mut out[at..at + d];
                for (p, wp) in w.iter().enumerate() {
                    let v = row(1, h, p as u32);
                    for (oi, vi) in o.iter_mut().zip(&v) {
                        *oi += wp / sum * vi;
                    }
                }
                lse[r * q_heads as usize + qh as usize] = m + sum.ln();
            }
        }
    }
    (out, lse)
}

/// Largest `|a - b| / (1 + |b|)`; NaN anywhere counts as infinite.
pub fn max_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            if f64::from(x) == y {
                return 0.0; // equal, including equal infinities
            }
            let e = (f64::from(x) - y).abs() / (1.0 + y.abs());
            if e.is_nan() { f64::INFINITY } else { e }
        })
        .fold(0.0, f64::max)
}
