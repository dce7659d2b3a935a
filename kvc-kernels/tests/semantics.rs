//! Edge semantics of the CPU attention: split-K precision for every chunk size (down to one
//! token a chunk, at 4,097 and 32,768 tokens), non-finite inputs as PyTorch's
//! `scaled_dot_product_attention` treats them (NaN in, NaN out; +∞ logits NaN; large finite
//! logits exact), and the bad inputs of `merge_states`.

mod common;

use common::{Rng, max_err, queries, reference, scenario};
use half::bf16;
use kvc_core::{BlockId, PageTable, PagedLayout};
use kvc_kernels::{
    AttnParams, DecodeArgs, DecodeOptions, KvElem, ShapeError, merge_states, paged_decode,
    paged_prefill,
};

/// Runs decode with a forced split (`None`: automatic).
fn decode<T: KvElem>(
    layout: &PagedLayout,
    cache: &[T],
    table: &PageTable,
    q: &[T],
    params: AttnParams,
    split: Option<u32>,
) -> (Vec<f32>, Vec<f32>) {
    let rows = table.batch() * params.q_heads as usize;
    let d = layout.head_dim() as usize;
    let (mut out, mut lse) = (vec![-7.0; rows * d], vec![-7.0; rows]);
    let args = DecodeArgs {
        layout,
        cache,
        table,
        q,
        params,
        options: DecodeOptions {
            split_tokens: split,
        },
    };
    paged_decode(&args, &mut out, &mut lse).unwrap();
    (out, lse)
}

/// The largest `|a − b| / (1 + |b|)` between two f32 results.
fn diff(a: &[f32], b: &[f32]) -> f64 {
    let b64: Vec<f64> = b.iter().map(|&x| f64::from(x)).collect();
    max_err(a, &b64)
}

fn check_split_precision<T: KvElem>(len: u32, chunks: &[u32], seed: u64) {
    let mut rng = Rng(seed);
    // Head size 32: bf16 takes the AVX-512 BF16 path where the CPU has it.
    let (kvh, qh, bs, d) = (1, 2, 16, 32);
    let s = scenario::<T>(&mut rng, false, kvh, bs, d, &[len], &[1], None);
    let q = queries::<T>(&mut rng, 1, qh, d);
    let p = AttnParams::new(qh, d);
    let (ref_o, ref_l) = reference(&s, &q, qh, p.scale);
    let (uo, ul) = decode(&s.layout, &s.cache, &s.table, &q, p, Some(u32::MAX));
    assert!(max_err(&uo, &ref_o) < 2e-6, "unsplit out at {len}");
    assert!(max_err(&ul, &ref_l) < 2e-6, "unsplit lse at {len}");
    for &chunk in chunks {
        let (so, sl) = decode(&s.layout, &s.cache, &s.table, &q, p, Some(chunk));
        let what = format!("{:?} {len} tokens in chunks of {chunk}", T::DTYPE);
        assert!(diff(&so, &uo) < 2e-6, "{what}: out {}", diff(&so, &uo));
        assert!(diff(&sl, &ul) < 2e-6, "{what}: lse {}", diff(&sl, &ul));
        assert!(max_err(&so, &ref_o) < 2e-6, "{what}: out vs reference");
    }
}

#[test]
fn split_and_unsplit_agree_for_every_chunk_size() {
    check_split_precision::<f32>(4097, &[1, 2, 3, 7, 16, 31, 33, 256, 1000, 4096], 11);
    check_split_precision::<bf16>(4097, &[1, 5, 64, 4096], 12);
    check_split_precision::<f32>(32_768, &[1, 13, 4096], 13);
}

/// One sequence of `len` tokens over pages 0.. of a pool of `kv_heads` heads of `D`, with
/// random K and V rows.
struct Small<T> {
    layout: PagedLayout,
    cache: Vec<T>,
    table: PageTable,
}

/// Head size: a multiple of 32, so that bf16 runs the AVX-512 BF16 path where the CPU has it.
const D: usize = 32;

impl<T: KvElem> Small<T> {
    fn new(len: u32, kv_heads: u32) -> Self {
        let bs = 4;
        let pages = len.div_ceil(bs);
        let layout = PagedLayout::hnd(pages + 1, kv_heads, bs, D as u32).unwrap();
        let table = PageTable::for_decode(
            vec![0, pages],
            (0..pages).map(BlockId).collect(),
            vec![len],
            &layout,
        )
        .unwrap();
        let mut cache = vec![T::from_f32(f32::NAN); layout.len() as usize];
        let mut rng = Rng(u64::from(len));
        for t in 0..len {
            for h in 0..kv_heads {
                for kv in 0..2 {
                    let at = layout.offset(t / bs, kv, h, t % bs) as usize;
                    for x in &mut cache[at..at + D] {
                        *x = T::from_f32(rng.unit());
                    }
                }
            }
        }
        Self {
            layout,
            cache,
            table,
        }
    }

    /// Element `i` of token `t`'s K (`kv = 0`) or V (`kv = 1`) row of head `h`.
    fn set(&mut self, kv: u32, h: u32, t: u32, i: usize, value: f32) {
        let bs = self.layout.block_size();
        let at = self.layout.offset(t / bs, kv, h, t % bs) as usize + i;
        self.cache[at] = T::from_f32(value);
    }

    /// Decode under every split: unsplit, one token a chunk, 7, automatic; all must agree
    /// bit for bit on which values are NaN and otherwise to 1e-5. Returns the unsplit result.
    fn decode(&self, q: &[f32], params: AttnParams) -> (Vec<f32>, Vec<f32>) {
        let (lay, c, t) = (&self.layout, &self.cache, &self.table);
        let q: Vec<T> = q.iter().map(|&x| T::from_f32(x)).collect();
        let q = q.as_slice();
        let whole = decode(lay, c, t, q, params, Some(u32::MAX));
        for split in [Some(1), Some(7), None] {
            let (o, l) = decode(lay, c, t, q, params, split);
            for (a, b) in o.iter().chain(&l).zip(whole.0.iter().chain(&whole.1)) {
                assert_eq!(a.is_nan(), b.is_nan(), "{split:?}: {a} vs {b}");
                if !a.is_nan() {
                    assert!(
                        a == b || (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{split:?}: {a} vs {b}"
                    );
                }
            }
        }
        whole
    }
}

fn query(heads: usize) -> Vec<f32> {
    let mut rng = Rng(99);
    (0..heads * D).map(|_| rng.unit()).collect()
}

fn all_nan(v: &[f32]) -> bool {
    v.iter().all(|x| x.is_nan())
}

fn all_finite(v: &[f32]) -> bool {
    v.iter().all(|x| x.is_finite())
}

#[test]
fn nan_in_a_live_key_makes_its_heads_nan() {
    nan_in_a_live_key_makes_its_heads_nan_in::<f32>();
    nan_in_a_live_key_makes_its_heads_nan_in::<bf16>();
}

fn nan_in_a_live_key_makes_its_heads_nan_in<T: KvElem>() {
    // 2 KV heads, 2 query heads each; token 40 of KV head 0 (a later tile) has a NaN in K.
    let mut s = Small::<T>::new(70, 2);
    s.set(0, 0, 40, 3, f32::NAN);
    let (o, l) = s.decode(&query(4), AttnParams::new(4, D as u32));
    assert!(all_nan(&o[..2 * D]) && all_nan(&l[..2]), "{o:?} {l:?}");
    assert!(all_finite(&o[2 * D..]) && all_finite(&l[2..]));
}

#[test]
fn nan_in_the_query_makes_that_head_nan() {
    nan_in_the_query_makes_that_head_nan_in::<f32>();
    nan_in_the_query_makes_that_head_nan_in::<bf16>();
}

fn nan_in_the_query_makes_that_head_nan_in<T: KvElem>() {
    let s = Small::<T>::new(50, 1);
    let mut q = query(2);
    q[D + 5] = f32::NAN;
    let (o, l) = s.decode(&q, AttnParams::new(2, D as u32));
    assert!(all_finite(&o[..D]) && l[0].is_finite());
    assert!(all_nan(&o[D..]) && l[1].is_nan());
}

#[test]
fn a_non_finite_scale_makes_every_head_nan() {
    a_non_finite_scale_makes_every_head_nan_in::<f32>();
    a_non_finite_scale_makes_every_head_nan_in::<bf16>();
}

fn a_non_finite_scale_makes_every_head_nan_in<T: KvElem>() {
    let s = Small::<T>::new(20, 1);
    for scale in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let (o, l) = s.decode(&query(2), AttnParams { q_heads: 2, scale });
        assert!(all_nan(&o) && all_nan(&l), "scale {scale}");
    }
}

#[test]
fn a_plus_infinite_logit_is_nan_even_when_later_tiles_follow() {
    a_plus_infinite_logit_is_nan_even_when_later_tiles_follow_in::<f32>();
    a_plus_infinite_logit_is_nan_even_when_later_tiles_follow_in::<bf16>();
}

fn a_plus_infinite_logit_is_nan_even_when_later_tiles_follow_in<T: KvElem>() {
    // Token 3's K is +∞ in element 0 and the query's element 0 is positive: logit +∞, in the
    // first tile of a 100-token sequence.
    let mut s = Small::<T>::new(100, 1);
    s.set(0, 0, 3, 0, f32::INFINITY);
    let mut q = query(1);
    q[0] = 0.5;
    let (o, l) = s.decode(&q, AttnParams::new(1, D as u32));
    assert!(all_nan(&o) && l[0].is_nan(), "{o:?} {l:?}");
}

#[test]
fn large_finite_logits_are_exact_and_overflow_is_nan() {
    large_finite_logits_are_exact_and_overflow_is_nan_in::<f32>();
    large_finite_logits_are_exact_and_overflow_is_nan_in::<bf16>();
}

fn large_finite_logits_are_exact_and_overflow_is_nan_in<T: KvElem>() {
    // Two tokens with logits 1e38 and 3e38 (scale 1, q = e0): the second takes all the weight.
    let mut s = Small::<T>::new(2, 1);
    for t in 0..2 {
        for i in 0..D {
            s.set(0, 0, t, i, 0.0);
            s.set(1, 0, t, i, (t + 1) as f32);
        }
    }
    s.set(0, 0, 0, 0, 1e38);
    s.set(0, 0, 1, 0, 3e38);
    let mut q = vec![0.0; D];
    q[0] = 1.0;
    let p = AttnParams {
        q_heads: 1,
        scale: 1.0,
    };
    let (o, l) = s.decode(&q, p);
    assert!(o.iter().all(|&x| x == 2.0), "{o:?}");
    assert_eq!(l[0], T::from_f32(3e38).to_f32());
    // Logits −3e38 and 3e38: their difference overflows to −∞, a weight of exactly 0.
    s.set(0, 0, 0, 0, -3e38);
    let (o, l) = s.decode(&q, p);
    assert!(o.iter().all(|&x| x == 2.0), "{o:?}");
    assert_eq!(l[0], T::from_f32(3e38).to_f32());
    // A logit past the f32 range is +∞ in f32 arithmetic (as in PyTorch): NaN.
    q[0] = 10.0;
    let (o, l) = s.decode(&q, p);
    assert!(all_nan(&o) && l[0].is_nan(), "{o:?} {l:?}");
}

#[test]
fn nan_or_infinity_in_a_visible_value_reaches_the_output() {
    nan_or_infinity_in_a_visible_value_reaches_the_output_in::<f32>();
    nan_or_infinity_in_a_visible_value_reaches_the_output_in::<bf16>();
}

fn nan_or_infinity_in_a_visible_value_reaches_the_output_in<T: KvElem>() {
    let mut s = Small::<T>::new(60, 1);
    s.set(1, 0, 45, 2, f32::NAN);
    s.set(1, 0, 10, 6, f32::INFINITY);
    let (o, l) = s.decode(&query(2), AttnParams::new(2, D as u32));
    for h in 0..2 {
        let row = &o[h * D..(h + 1) * D];
        assert!(row[2].is_nan() && row[6] == f32::INFINITY, "{row:?}");
        for i in [0, 1, 3, 4, 5, 7] {
            assert!(row[i].is_finite());
        }
        assert!(l[h].is_finite());
    }
    // A weight that underflows to 0 still multiplies: 0 · NaN is NaN. Token 0's logit is far
    // below token 1's, so its weight is e^-200 = 0 in f32.
    let mut s = Small::<T>::new(2, 1);
    for t in 0..2 {
        for i in 0..D {
            s.set(0, 0, t, i, 0.0);
            s.set(1, 0, t, i, 1.0);
        }
    }
    s.set(0, 0, 1, 0, 200.0);
    s.set(1, 0, 0, 4, f32::NAN);
    let mut q = vec![0.0; D];
    q[0] = 1.0;
    let p = AttnParams {
        q_heads: 1,
        scale: 1.0,
    };
    let (o, _) = s.decode(&q, p);
    assert!(o[4].is_nan() && o[0] == 1.0, "{o:?}");
}

#[test]
fn every_logit_minus_infinity_gives_zeros_and_minus_infinity() {
    every_logit_minus_infinity_gives_zeros_and_minus_infinity_in::<f32>();
    every_logit_minus_infinity_gives_zeros_and_minus_infinity_in::<bf16>();
}

fn every_logit_minus_infinity_gives_zeros_and_minus_infinity_in<T: KvElem>() {
    // Every K row is −∞ in element 0 and the query's element 0 is positive.
    let mut s = Small::<T>::new(40, 1);
    for t in 0..40 {
        s.set(0, 0, t, 0, f32::NEG_INFINITY);
    }
    let mut q = query(1);
    q[0] = 0.25;
    let (o, l) = s.decode(&q, AttnParams::new(1, D as u32));
    assert!(o.iter().all(|&x| x == 0.0), "{o:?}");
    assert_eq!(l[0], f32::NEG_INFINITY);
}

#[test]
fn prefill_never_reads_tokens_a_query_may_not_see() {
    prefill_never_reads_tokens_a_query_may_not_see_in::<f32>();
    prefill_never_reads_tokens_a_query_may_not_see_in::<bf16>();
}

fn prefill_never_reads_tokens_a_query_may_not_see_in<T: KvElem>() {
    // 3 queries over 10 tokens: query 0 sees tokens 0..=7. Token 9 is NaN in K and V, so only
    // the last query (which sees it) is NaN.
    let mut s = Small::<T>::new(10, 1);
    for i in 0..D {
        s.set(0, 0, 9, i, f32::NAN);
        s.set(1, 0, 9, i, f32::NAN);
    }
    let table = PageTable::new(
        vec![0, 3],
        vec![0, 3],
        (0..3).map(BlockId).collect(),
        vec![10],
        &s.layout,
    )
    .unwrap();
    let q: Vec<T> = query(3).into_iter().map(T::from_f32).collect();
    let (mut o, mut l) = (vec![0.0; 3 * D], vec![0.0; 3]);
    let p = AttnParams::new(1, D as u32);
    paged_prefill(&s.layout, &s.cache, &table, &q, p, &mut o, &mut l).unwrap();
    assert!(all_finite(&o[..2 * D]) && all_finite(&l[..2]));
    assert!(all_nan(&o[2 * D..]) && l[2].is_nan());
    let bad = AttnParams {
        q_heads: 1,
        scale: f32::NAN,
    };
    paged_prefill(&s.layout, &s.cache, &table, &q, bad, &mut o, &mut l).unwrap();
    assert!(all_nan(&o) && all_nan(&l));
}

#[test]
fn merge_states_semantics_and_bad_input() {
    let oa = [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0];
    let ob = [3.0, 4.0, 3.0, 4.0, 3.0, 4.0, 3.0, 4.0];
    // Heads: equal LSEs; NaN on one side; +∞ on one side; a large LSE gap.
    let la = [0.5, f32::NAN, 1.0, 3e38];
    let lb = [0.5, 1.0, f32::INFINITY, 1e38];
    let (mut o, mut l) = ([0.0; 8], [0.0; 4]);
    merge_states(&oa, &la, &ob, &lb, 2, &mut o, &mut l).unwrap();
    assert_eq!(&o[..2], &[2.0, 3.0]);
    assert!((l[0] - (0.5 + 2f32.ln())).abs() < 1e-6);
    assert!(o[2..6].iter().all(|x| x.is_nan()) && l[1].is_nan() && l[2].is_nan());
    assert_eq!((&o[6..], l[3]), (&[1.0, 2.0][..], 3e38));
    // head_dim 0 is refused, and nothing is written.
    let mut l = [9.0; 4];
    assert_eq!(
        merge_states(&[], &la, &[], &lb, 0, &mut [], &mut l),
        Err(ShapeError::ZeroHeadDim)
    );
    assert_eq!(l, [9.0; 4]);
}

#[test]
fn the_api_is_usable_from_this_crate_alone_and_split_zero_is_split_one() {
    // The kvc-core and half types the ops take are re-exported, so an adopter names them
    // from `kvc_kernels` alone.
    use kvc_kernels::{BlockId as Id, PageTable as Table, PagedLayout as Layout, f16};
    let layout = Layout::hnd(3, 1, 2, 4).unwrap();
    let mut rng = Rng(5);
    let cache: Vec<f16> = (0..layout.len())
        .map(|_| f16::from_f32(rng.unit()))
        .collect();
    let table = Table::for_decode(vec![0, 3], vec![Id(2), Id(0), Id(1)], vec![5], &layout).unwrap();
    let q: Vec<f16> = (0..2 * 4).map(|_| f16::from_f32(rng.unit())).collect();
    let params = AttnParams::new(2, 4);
    // `Some(0)` is documented as `Some(1)`: one token a chunk.
    let zero = decode(&layout, &cache, &table, &q, params, Some(0));
    let one = decode(&layout, &cache, &table, &q, params, Some(1));
    assert_eq!(zero, one);
    let whole = decode(&layout, &cache, &table, &q, params, Some(u32::MAX));
    let whole64: Vec<f64> = whole.0.iter().map(|&x| f64::from(x)).collect();
    assert!(max_err(&zero.0, &whole64) < 1e-5);
}

#[test]
fn absurd_head_counts_are_a_buffer_error_not_an_overflow() {
    // u32::MAX query heads over one KV head of 65,536 elements, for 65,552 one-token
    // sequences on one block: the query's element count overflowed u64 while being checked.
    let d = 1u32 << 16;
    let layout = PagedLayout::hnd(1, 1, 1, d).unwrap();
    let cache = vec![0f32; layout.len() as usize];
    let batch = (1u32 << 16) + 16;
    let params = AttnParams::new(u32::MAX, d);
    let (mut out, mut lse) = (Vec::new(), Vec::new());
    let decode_table = PageTable::for_decode(
        (0..=batch).collect(),
        vec![BlockId(0); batch as usize],
        vec![1; batch as usize],
        &layout,
    )
    .unwrap();
    let args = DecodeArgs {
        layout: &layout,
        cache: cache.as_slice(),
        table: &decode_table,
        q: &[][..],
        params,
        options: DecodeOptions::default(),
    };
    assert!(matches!(
        paged_decode(&args, &mut out, &mut lse),
        Err(ShapeError::BufferLength { buffer: "q", .. })
    ));
    let prefill_table = PageTable::new(
        (0..=batch).collect(),
        (0..=batch).collect(),
        vec![BlockId(0); batch as usize],
        vec![1; batch as usize],
        &layout,
    )
    .unwrap();
    assert!(matches!(
        paged_prefill(
            &layout,
            &cache,
            &prefill_table,
            &[],
            params,
            &mut out,
            &mut lse
        ),
        Err(ShapeError::BufferLength { buffer: "q", .. })
    ));
}
