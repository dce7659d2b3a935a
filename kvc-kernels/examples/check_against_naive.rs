//! Checks the CPU paged attention against a naive attention written from the textbook
//! formula, the way an engine author would before trusting the kernels: random pools (HND,
//! NHD and padded strides), block sizes, GQA head ratios, sequence lengths from 1 (partial
//! last blocks, scattered pages), f32/f16/bf16 storage, decode with every split-K setting and
//! ragged causal prefill. It also shows the documented argument errors.
//!
//! Everything is imported from `kvc_kernels` alone (it re-exports the `kvc-core` and `half`
//! types its API takes). Run with `cargo run --release -p kvc-kernels --example
//! check_against_naive`; it panics on the first mismatch.
#![allow(clippy::print_stdout)] // a program: it says what it checked

use kvc_kernels::{
    AttnParams, BlockId, DecodeArgs, DecodeOptions, KvElem, PageTable, PageTableError, PagedLayout,
    ShapeError, SlotMapping, bf16, f16, paged_decode, paged_prefill, write_kv,
};

/// A small deterministic generator (the example needs no other crate).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        self.below(1 << 24) as f32 / (1 << 23) as f32 - 1.0
    }
}

/// Attention of one query token (all heads) over the first `visible` tokens, in f64:
/// `softmax(scale · q·kᵀ) · v` and the natural-log sum of the exponentiated logits.
#[allow(clippy::too_many_arguments)]
fn naive(
    q: &[f32],
    k: &[Vec<f32>],
    v: &[Vec<f32>],
    visible: usize,
    kv_heads: usize,
    q_heads: usize,
    d: usize,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let group = q_heads / kv_heads;
    let (mut out, mut lse) = (vec![0.0; q_heads * d], vec![0.0; q_heads]);
    for h in 0..q_heads {
        let kh = h / group;
        let logits: Vec<f64> = (0..visible)
            .map(|t| {
                let dot: f64 = (0..d)
                    .map(|i| f64::from(q[h * d + i]) * f64::from(k[t][kh * d + i]))
                    .sum();
                dot * scale
            })
            .collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = logits.iter().map(|l| (l - max).exp()).sum();
        for (t, l) in logits.iter().enumerate() {
            let w = (l - max).exp() / sum;
            for i in 0..d {
                out[h * d + i] += w * f64::from(v[t][kh * d + i]);
            }
        }
        lse[h] = max + sum.ln();
    }
    (out, lse)
}

/// A random batch written into a random pool: the K/V rows each sequence holds (as the
/// storage type rounds them) and its query tokens.
struct Batch<T> {
    layout: PagedLayout,
    cache: Vec<T>,
    table: PageTable,
    keys: Vec<Vec<Vec<f32>>>,
    values: Vec<Vec<Vec<f32>>>,
    kv_heads: usize,
    d: usize,
}

fn batch<T: KvElem>(rng: &mut Rng, decode: bool) -> Batch<T> {
    let bs = rng.pick(&[1u32, 3, 16, 32]);
    let kv_heads = rng.pick(&[1u32, 2, 3]);
    let d = rng.pick(&[1u32, 5, 64, 128]);
    let seqs = 1 + rng.below(3) as usize;
    let lens: Vec<u32> = (0..seqs)
        .map(|_| {
            let longest = rng.pick(&[4, 300]);
            1 + rng.below(longest) as u32
        })
        .collect();
    let pages: Vec<u32> = lens.iter().map(|l| l.div_ceil(bs)).collect();
    let num_blocks = pages.iter().sum::<u32>() + 2;
    let layout = match rng.below(3) {
        0 => PagedLayout::hnd(num_blocks, kv_heads, bs, d),
        1 => PagedLayout::nhd(num_blocks, kv_heads, bs, d),
        _ => {
            // Padding between rows, heads, K/V and blocks.
            let token = u64::from(d) + 2;
            let head = token * u64::from(bs) + 1;
            let kv = head * u64::from(kv_heads) + 3;
            PagedLayout::with_strides(num_blocks, kv_heads, bs, d, [2 * kv + 5, kv, head, token])
        }
    }
    .expect("valid shapes");
    // Scatter the pages over the pool; unwritten elements are NaN, so reading one shows.
    let mut order: Vec<u32> = (0..num_blocks).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut cache = vec![T::from_f32(f32::NAN); layout.len() as usize];
    let (mut kv_indptr, mut kv_indices, mut qo_indptr) = (vec![0u32], Vec::new(), vec![0u32]);
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    let row = (kv_heads * d) as usize;
    for (s, &len) in lens.iter().enumerate() {
        let start = kv_indices.len();
        kv_indices.extend(
            order[start..start + pages[s] as usize]
                .iter()
                .map(|&b| BlockId(b)),
        );
        kv_indptr.push(kv_indices.len() as u32);
        let slots: Vec<i64> = (0..len)
            .map(|t| {
                let block = kv_indices[start + (t / bs) as usize].get();
                i64::from(block) * i64::from(bs) + i64::from(t % bs)
            })
            .collect();
        let k: Vec<T> = (0..len as usize * row)
            .map(|_| T::from_f32(3.0 * rng.unit()))
            .collect();
        let v: Vec<T> = (0..len as usize * row)
            .map(|_| T::from_f32(2.0 * rng.unit()))
            .collect();
        let mapping = SlotMapping::new(slots, &layout).expect("slots in the pool");
        write_kv(&layout, &mut cache, &mapping, &k, &v).expect("shapes match");
        let rows = |x: &[T]| -> Vec<Vec<f32>> {
            x.chunks(row)
                .map(|r| r.iter().map(|e| e.to_f32()).collect())
                .collect()
        };
        keys.push(rows(&k));
        values.push(rows(&v));
        let queries = if decode {
            1
        } else {
            1 + rng.below(u64::from(len.min(24))) as u32
        };
        qo_indptr.push(qo_indptr[s] + queries);
    }
    let table = PageTable::new(qo_indptr, kv_indptr, kv_indices, lens, &layout).expect("valid");
    Batch {
        layout,
        cache,
        table,
        keys,
        values,
        kv_heads: kv_heads as usize,
        d: d as usize,
    }
}

fn close(got: f32, want: f64, tol: f64, what: &str) {
    let err = (f64::from(got) - want).abs();
    assert!(
        err <= tol * (1.0 + want.abs()),
        "{what}: kernel {got}, naive {want}"
    );
}

/// Decode and prefill on `cases` random batches stored as `T`; returns the largest error.
fn check<T: KvElem>(rng: &mut Rng, cases: usize, tol: f64) -> f64 {
    let mut worst = 0f64;
    for case in 0..cases {
        let decode = case % 2 == 0;
        let b: Batch<T> = batch(rng, decode);
        let q_heads = b.kv_heads * rng.pick(&[1usize, 2, 4, 8]);
        let params = AttnParams::new(q_heads as u32, b.d as u32);
        let per_query = q_heads * b.d;
        let total = b.table.total_queries();
        let q: Vec<T> = (0..total * per_query)
            .map(|_| T::from_f32(rng.unit()))
            .collect();
        let (mut out, mut lse) = (vec![0f32; total * per_query], vec![0f32; total * q_heads]);
        if decode {
            let split_tokens = rng.pick(&[None, Some(1), Some(7), Some(u32::MAX)]);
            let args = DecodeArgs {
                layout: &b.layout,
                cache: b.cache.as_slice(),
                table: &b.table,
                q: q.as_slice(),
                params,
                options: DecodeOptions { split_tokens },
            };
            paged_decode(&args, &mut out, &mut lse).expect("valid arguments");
        } else {
            paged_prefill(
                &b.layout, &b.cache, &b.table, &q, params, &mut out, &mut lse,
            )
            .expect("valid arguments");
        }
        for s in 0..b.table.batch() {
            let len = b.table.seq_len(s) as usize;
            let rows = b.table.queries(s);
            let n = rows.len();
            for (j, r) in rows.enumerate() {
                // Causal, aligned bottom-right: query j of n sees tokens 0..=len - n + j.
                let visible = len - n + j + 1;
                let qf: Vec<f32> = q[r * per_query..(r + 1) * per_query]
                    .iter()
                    .map(|x| x.to_f32())
                    .collect();
                let (o, l) = naive(
                    &qf,
                    &b.keys[s],
                    &b.values[s],
                    visible,
                    b.kv_heads,
                    q_heads,
                    b.d,
                    f64::from(params.scale),
                );
                for (i, want) in o.iter().enumerate() {
                    let got = out[r * per_query + i];
                    close(got, *want, tol, "output");
                    worst = worst.max((f64::from(got) - want).abs());
                }
                for (h, want) in l.iter().enumerate() {
                    close(lse[r * q_heads + h], *want, tol, "lse");
                }
            }
        }
    }
    worst
}

fn main() {
    let mut rng = Rng(2026);
    // f32 storage: only the kernels' f32 accumulation differs from the f64 reference. f16
    // and bf16: the reference reads the same rounded K/V and queries, so the tolerance only
    // covers the kernels' f32 arithmetic over longer contexts.
    let f32_err = check::<f32>(&mut rng, 24, 2e-5);
    let f16_err = check::<f16>(&mut rng, 24, 2e-3);
    let bf16_err = check::<bf16>(&mut rng, 24, 2e-3);
    println!("largest output error: f32 {f32_err:.2e}, f16 {f16_err:.2e}, bf16 {bf16_err:.2e}");

    // The documented argument errors: nothing is read or written when one is returned.
    let layout = PagedLayout::hnd(4, 2, 4, 8).expect("valid");
    let cache = vec![0f32; layout.len() as usize];
    let table = PageTable::for_decode(vec![0, 1], vec![BlockId(0)], vec![3], &layout).expect("ok");
    let (q, mut out, mut lse) = (vec![0f32; 3 * 8], vec![0f32; 3 * 8], vec![0f32; 3]);
    let args = DecodeArgs {
        layout: &layout,
        cache: cache.as_slice(),
        table: &table,
        q: q.as_slice(),
        params: AttnParams::new(3, 8), // 3 query heads over 2 KV heads
        options: DecodeOptions::default(),
    };
    let err = paged_decode(&args, &mut out, &mut lse).expect_err("bad head ratio");
    assert_eq!(
        err,
        ShapeError::HeadRatio {
            q_heads: 3,
            kv_heads: 2
        }
    );
    println!("refused: {err}");
    let short = vec![0f32; 10];
    let args = DecodeArgs {
        cache: short.as_slice(),
        params: AttnParams::new(2, 8),
        q: &q[..2 * 8],
        ..args
    };
    let err = paged_decode(&args, &mut out[..16], &mut lse[..2]).expect_err("short cache");
    assert!(matches!(err, ShapeError::CacheTooSmall { .. }), "{err}");
    println!("refused: {err}");
    // A page table is checked against its layout when it is built.
    let err = PageTable::for_decode(vec![0, 1], vec![BlockId(0)], vec![5], &layout)
        .expect_err("5 tokens in one 4-token page");
    assert!(matches!(err, PageTableError::TooFewPages { .. }), "{err}");
    println!("refused: {err}");
    let other = PagedLayout::hnd(100, 2, 4, 8).expect("valid");
    let foreign =
        PageTable::for_decode(vec![0, 1], vec![BlockId(50)], vec![3], &other).expect("ok");
    let args = DecodeArgs {
        layout: &layout,
        cache: cache.as_slice(),
        table: &foreign,
        q: &q[..16],
        params: AttnParams::new(2, 8),
        options: DecodeOptions::default(),
    };
    let err = paged_decode(&args, &mut out[..16], &mut lse[..2]).expect_err("other pool");
    assert!(matches!(err, ShapeError::TableMismatch { .. }), "{err}");
    println!("refused: {err}");
}
