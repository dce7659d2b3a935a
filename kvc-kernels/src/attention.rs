//! Attention over paged KV on the CPU: [`paged_decode`] (split-K with a log-sum-exp merge),
//! [`paged_prefill`] (ragged, causal, bottom-right aligned) and [`merge_states`].
//!
//! One work item serves every query head of a KV head (GQA), so each K/V row is read once per
//! item and widened to f32 once; scores are kept for a tile of tokens so the running softmax
//! is rescaled once per tile, not once per token.

use std::sync::atomic::{AtomicBool, Ordering};

use kvc_core::{BlockId, PageTable, PagedLayout};
use rayon::prelude::*;

use crate::elem::KvElem;
use crate::error::{ShapeError, check_cache, check_len};

/// Tokens scored together before the running softmax is rescaled.
pub(crate) const TILE: usize = 32;
/// Query rows of one prefill work item.
const PREFILL_ROWS: usize = 16;
/// The shortest split-K chunk the automatic planner makes, in tokens.
const MIN_SPLIT_TOKENS: u32 = 256;

/// Heads and scale of an attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnParams {
    /// Query heads (a positive multiple of the layout's KV heads).
    pub q_heads: u32,
    /// Multiplier of `q·k` before the softmax (usually `1/sqrt(head_dim)`).
    pub scale: f32,
}

impl AttnParams {
    /// `q_heads` query heads with the usual scale `1/sqrt(head_dim)`.
    #[must_use]
    pub fn new(q_heads: u32, head_dim: u32) -> Self {
        Self {
            q_heads,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }
}

/// How [`paged_decode`] divides long contexts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Tokens per split-K chunk. `None` picks chunks so that every core has work
    /// (no split when the batch has enough (sequence, KV head) pairs); `Some(u32::MAX)` never
    /// splits; `Some(0)` is taken as `Some(1)`. The result does not depend on the split
    /// beyond rounding.
    pub split_tokens: Option<u32>,
}

/// A running softmax state for `rows × group` query heads.
pub(crate) struct State {
    m: Vec<f32>,
    l: Vec<f32>,
    pub(crate) acc: Vec<f32>,
    /// The head met a NaN or +∞ logit: its result is NaN whatever follows.
    nan: Vec<bool>,
}

impl State {
    fn new(heads: usize, d: usize) -> Self {
        Self {
            m: vec![f32::NEG_INFINITY; heads],
            l: vec![0.0; heads],
            acc: vec![0.0; heads * d],
            nan: vec![false; heads],
        }
    }

    /// Normalised output and natural-log LSE of head `i`: NaN when it met a NaN or +∞ logit,
    /// zeros and −∞ when every logit it saw was −∞.
    fn finish(&self, i: usize, d: usize, out: &mut [f32]) -> f32 {
        let acc = &self.acc[i * d..(i + 1) * d];
        if self.nan[i] {
            out.fill(f32::NAN);
            f32::NAN
        } else if self.l[i] > 0.0 {
            let inv = 1.0 / self.l[i];
            for (o, a) in out.iter_mut().zip(acc) {
                *o = a * inv;
            }
            self.m[i] + self.l[i].ln()
        } else {
            out.fill(0.0);
            f32::NEG_INFINITY
        }
    }
}

/// `e^x` for `x <= 0` (softmax weights), as arithmetic the compiler can vectorise: a
/// degree-6 polynomial for `2^f` on `[-0.5, 0.5]` scaled by `2^n` through the exponent bits.
/// Relative error about 2e-7·(1 + |x|); inputs below −87 (and −∞) give 0.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    let t = x.max(-87.0) * std::f32::consts::LOG2_E;
    let n = t.round_ties_even();
    let f = t - n;
    // 2^f = e^(f ln 2), Taylor terms of ln 2 powers.
    let p = 1.0
        + f * (std::f32::consts::LN_2
            + f * (0.240_226_5
                + f * (0.055_504_11
                    + f * (0.009_618_129 + f * (0.001_333_355_8 + f * 0.000_154_035_3)))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 { 0.0 } else { p * scale }
}

#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        // Fixed-size views: no bounds checks, one 8-lane multiply-add per chunk.
        let (x, y): (&[f32; 8], &[f32; 8]) = (x.try_into().unwrap(), y.try_into().unwrap());
        for i in 0..8 {
            acc[i] = madd::<FMA>(x[i], y[i], acc[i]);
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `scores[h * TILE + i] = q[h] · rows[i]` for every head `h` and row `i` of the tile.
///
/// # Safety
///
/// `FMA` may be true only where the CPU has AVX2 and FMA (the caller checked them at run
/// time: it is reached through [`attend_avx2`]).
#[inline(always)]
unsafe fn score_tile<const FMA: bool>(
    q: &[f32],
    rows: &[f32],
    d: usize,
    heads: usize,
    scores: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if FMA && d.is_multiple_of(8) {
        // SAFETY: the caller's rule: `FMA` means AVX2 and FMA are present; slice lengths are
        // checked inside.
        unsafe { score_tile_avx2(q, rows, d, heads, scores) };
        return;
    }
    for (i, k) in rows.chunks_exact(d).enumerate() {
        for h in 0..heads {
            scores[h * TILE + i] = dot::<FMA>(&q[h * d..(h + 1) * d], k);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn score_tile_avx2(q: &[f32], rows: &[f32], d: usize, heads: usize, scores: &mut [f32]) {
    use std::arch::x86_64::{
        __m256, _mm_add_ps, _mm_cvtss_f32, _mm_hadd_ps, _mm256_castps256_ps128,
        _mm256_extractf128_ps, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps,
    };
    let hsum = |s: __m256| {
        let q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let q = _mm_hadd_ps(q, q);
        _mm_cvtss_f32(_mm_hadd_ps(q, q))
    };
    assert!(q.len() >= heads * d && scores.len() >= heads * TILE && d.is_multiple_of(8));
    for (i, k) in rows.chunks_exact(d).enumerate().take(TILE) {
        // Up to 4 heads at once: each 8-lane chunk of K is loaded once for all of them.
        let mut h0 = 0;
        while h0 < heads {
            let hb = (heads - h0).min(4);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c < d {
                // SAFETY: c + 8 <= d = k.len(), and (h0 + j) * d + c + 8 <= heads * d <= q.len().
                unsafe {
                    let kc = _mm256_loadu_ps(k.as_ptr().add(c));
                    for (j, a) in acc.iter_mut().enumerate().take(hb) {
                        let qc = _mm256_loadu_ps(q.as_ptr().add((h0 + j) * d + c));
                        *a = _mm256_fmadd_ps(qc, kc, *a);
                    }
                }
                c += 8;
            }
            for (j, &a) in acc.iter().enumerate().take(hb) {
                scores[(h0 + j) * TILE + i] = hsum(a);
            }
            h0 += hb;
        }
    }
}

/// `acc[h] += Σ_{i < counts[h]} weights[h * TILE + i] · rows[i]` for every head `h`.
///
/// Every counted row is added, zero weights included, so a NaN or infinite V element of a
/// token the head sees reaches its output (`0 · NaN` is NaN) as it does in the textbook
/// formula; rows past `counts[h]` (masked, or a head with nothing to add) are not read.
///
/// # Safety
///
/// As for [`score_tile`]: `FMA` only where the CPU has AVX2 and FMA.
#[inline(always)]
unsafe fn accumulate_tile<const FMA: bool>(
    acc: &mut [f32],
    weights: &[f32],
    rows: &[f32],
    d: usize,
    counts: &[usize],
) {
    #[cfg(target_arch = "x86_64")]
    if FMA && d.is_multiple_of(8) {
        // SAFETY: the caller's rule, as for `score_tile`.
        unsafe { accumulate_tile_avx2(acc, weights, rows, d, counts) };
        return;
    }
    for (h, &count) in counts.iter().enumerate() {
        let a = &mut acc[h * d..(h + 1) * d];
        for (i, v) in rows.chunks_exact(d).enumerate().take(count) {
            let p = weights[h * TILE + i];
            for (a, x) in a.iter_mut().zip(v) {
                *a = madd::<FMA>(p, *x, *a);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn accumulate_tile_avx2(
    acc: &mut [f32],
    weights: &[f32],
    rows: &[f32],
    d: usize,
    counts: &[usize],
) {
    use std::arch::x86_64::{_mm256_fmadd_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_storeu_ps};
    let heads = counts.len();
    assert!(acc.len() >= heads * d && weights.len() >= heads * TILE && d.is_multiple_of(8));
    let rows_in = (rows.len() / d).min(TILE);
    for (h, &count) in counts.iter().enumerate() {
        let n = count.min(rows_in);
        if n == 0 {
            continue;
        }
        // 64 columns at a time, held in 8 registers across the whole tile.
        let mut c0 = 0;
        while c0 < d {
            let w = ((d - c0) / 8).min(8);
            let base = h * d + c0;
            // SAFETY: base + 8w <= h * d + d <= acc.len(); rows hold at least n rows of d.
            unsafe {
                let mut a = [_mm256_set1_ps(0.0); 8];
                for (k, r) in a.iter_mut().enumerate().take(w) {
                    *r = _mm256_loadu_ps(acc.as_ptr().add(base + 8 * k));
                }
                for i in 0..n {
                    let pb = _mm256_set1_ps(weights[h * TILE + i]);
                    let v = rows.as_ptr().add(i * d + c0);
                    for (k, r) in a.iter_mut().enumerate().take(w) {
                        *r = _mm256_fmadd_ps(pb, _mm256_loadu_ps(v.add(8 * k)), *r);
                    }
                }
                for (k, r) in a.iter().enumerate().take(w) {
                    _mm256_storeu_ps(acc.as_mut_ptr().add(base + 8 * k), *r);
                }
            }
            c0 += 8 * w;
        }
    }
}

/// Hints the CPU to bring `row` into cache (a no-op off x86_64).
#[inline(always)]
pub(crate) fn prefetch<T>(row: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        let bytes = std::mem::size_of_val(row);
        let base = row.as_ptr().cast::<i8>();
        let mut off = 0;
        while off < bytes {
            // SAFETY: a prefetch never faults, and `base + off` stays inside `row`.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(base.add(off)) };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// The work of one item: query rows (each `group` heads of `d`, pre-scaled), each seeing the
/// first `limits[r]` tokens of the sequence, over tokens `t0..t1` of KV head `head`.
pub(crate) struct Job<'a> {
    pub(crate) pages: &'a [BlockId],
    pub(crate) head: u32,
    pub(crate) t0: u32,
    pub(crate) t1: u32,
    pub(crate) q: &'a [f32],
    pub(crate) limits: &'a [u32],
    pub(crate) group: usize,
    /// The same queries unscaled in bf16, when the cache is bf16 (for the AVX-512 BF16 path).
    pub(crate) raw_q: Option<&'a [half::bf16]>,
    /// The scale `q` was multiplied by.
    pub(crate) scale: f32,
}

static PORTABLE_ONLY: AtomicBool = AtomicBool::new(false);
static NO_AVX512: AtomicBool = AtomicBool::new(false);

/// Makes the CPU attention skip its AVX-512 BF16 decode path (using the AVX2 or portable
/// build) even where the CPU has it, so tests can compare the paths on one machine.
#[doc(hidden)]
pub fn set_avx512_disabled(on: bool) {
    NO_AVX512.store(on, Ordering::Relaxed);
}

/// Makes the CPU attention use its portable build even where AVX2 and FMA are present, so
/// tests can check that path on any machine. Both builds compute the same thing.
#[doc(hidden)]
pub fn set_portable_only(on: bool) {
    PORTABLE_ONLY.store(on, Ordering::Relaxed);
}

/// Whether the AVX2 and FMA build may run (the CPU has both, and tests did not ask for the
/// portable build).
fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !PORTABLE_ONLY.load(Ordering::Relaxed)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Runs [`attend_impl`] compiled for AVX2 and FMA where the CPU has them (chosen at run
/// time), else for the baseline target.
fn attend<T: KvElem>(layout: &PagedLayout, cache: &[T], job: &Job<'_>, st: &mut State) {
    #[cfg(target_arch = "x86_64")]
    if let (Some(cache16), Some(q16)) = (T::as_bf16(cache), job.raw_q)
        && layout.head_dim().is_multiple_of(32)
        && job.limits.iter().all(|&l| l >= job.t1)
        && !PORTABLE_ONLY.load(Ordering::Relaxed)
        && !NO_AVX512.load(Ordering::Relaxed)
        && crate::decode_avx512::available()
    {
        // SAFETY: the CPU has AVX-512 F, BW and BF16 (checked just above), the head size is
        // a multiple of 32, every query row sees the whole job, `paged_decode` validated
        // the cache and the table, and `raw_q` holds the job's `group` heads.
        unsafe { crate::decode_avx512::attend_bf16(layout, cache16, job, q16, job.scale, st) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { attend_avx2(layout, cache, job, st) };
        return;
    }
    // SAFETY: `FMA = false` needs nothing of the CPU.
    unsafe { attend_impl::<T, false>(layout, cache, job, st) };
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_avx2<T: KvElem>(layout: &PagedLayout, cache: &[T], job: &Job<'_>, st: &mut State) {
    // SAFETY: this function is compiled for, and only called on, CPUs with AVX2 and FMA.
    unsafe { attend_impl::<T, true>(layout, cache, job, st) };
}

/// `a * b + c`, fused where the CPU has FMA (`FMA` is only true in code compiled for it).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Folds a tile's `scores` (the `n` visible logits of one head) into the head's running
/// softmax and turns them into weights; returns how many rows the head adds to its output
/// (0 when it has nothing to add: no finite logit yet, or already NaN).
#[inline(always)]
pub(crate) fn softmax_tile(st: &mut State, h: usize, d: usize, s: &mut [f32]) -> usize {
    if st.nan[h] || s.is_empty() {
        return 0;
    }
    // 16 independent lanes, so the compiler keeps them in one vector register; `x > m` is
    // false for NaN, which is caught separately.
    let (mut lanes, mut nans) = ([f32::NEG_INFINITY; 16], [false; 16]);
    let chunks = s.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
            nans[i] |= c[i].is_nan();
        }
    }
    for (i, &x) in rest.iter().enumerate() {
        lanes[i] = if x > lanes[i] { x } else { lanes[i] };
        nans[i] |= x.is_nan();
    }
    let tile_max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let nan = nans.iter().any(|&b| b);
    // A NaN logit, or a +∞ one (whose weight is e^(∞ − ∞)), makes the head NaN.
    if nan || tile_max == f32::INFINITY {
        st.nan[h] = true;
        return 0;
    }
    let m_new = st.m[h].max(tile_max);
    if m_new == f32::NEG_INFINITY {
        return 0; // every logit so far is −∞: nothing to add yet
    }
    let alpha = exp_neg(st.m[h] - m_new);
    if alpha != 1.0 {
        st.l[h] *= alpha;
        for a in &mut st.acc[h * d..(h + 1) * d] {
            *a *= alpha;
        }
    }
    st.m[h] = m_new;
    // The exponentials, then their sum in 16 lanes: both vectorise.
    for x in s.iter_mut() {
        *x = exp_neg(*x - m_new);
    }
    let mut sums = [0f32; 16];
    for c in s.chunks(16) {
        for (a, &x) in sums.iter_mut().zip(c) {
            *a += x;
        }
    }
    st.l[h] += sums.iter().sum::<f32>();
    s.len()
}

/// # Safety
///
/// `FMA` may be true only where the CPU has AVX2 and FMA.
#[inline(always)]
unsafe fn attend_impl<T: KvElem, const FMA: bool>(
    layout: &PagedLayout,
    cache: &[T],
    job: &Job<'_>,
    st: &mut State,
) {
    let d = layout.head_dim() as usize;
    let bs = layout.block_size();
    let heads = job.limits.len() * job.group;
    let mut scores = vec![0f32; heads * TILE];
    let mut counts = vec![0usize; heads];
    // Row offsets of this tile and the next: the rows of a head are short runs scattered over
    // the pool (a page's K rows, then its V rows far away), which hardware prefetchers do not
    // follow, so each row of the next tile is prefetched while the same row of this tile is
    // widened, spreading the misses over the tile's work.
    let offsets = |from: u32, koff: &mut [u64; TILE], voff: &mut [u64; TILE]| -> usize {
        let n = job.t1.saturating_sub(from).min(TILE as u32) as usize;
        for (i, (ko, vo)) in koff.iter_mut().zip(voff.iter_mut()).take(n).enumerate() {
            let pos = from + i as u32;
            let block = job.pages[(pos / bs) as usize].get();
            *ko = layout.offset(block, 0, job.head, pos % bs);
            *vo = layout.offset(block, 1, job.head, pos % bs);
        }
        n
    };
    let (mut koff, mut voff) = ([0u64; TILE], [0u64; TILE]);
    let (mut nkoff, mut nvoff) = ([0u64; TILE], [0u64; TILE]);
    let mut n = offsets(job.t0, &mut koff, &mut voff);
    let mut rows = vec![0f32; TILE * d];
    let mut t = job.t0;
    while t < job.t1 {
        let next = t + n as u32;
        let nn = offsets(next, &mut nkoff, &mut nvoff);
        // Widen the tile's K rows once, score them against every query head.
        for (i, &ko) in koff.iter().take(n).enumerate() {
            if i < nn {
                prefetch(&cache[nkoff[i] as usize..nkoff[i] as usize + d]);
            }
            T::widen(
                &cache[ko as usize..ko as usize + d],
                &mut rows[i * d..(i + 1) * d],
            );
        }
        // SAFETY: the caller's rule on `FMA`.
        unsafe { score_tile::<FMA>(job.q, &rows[..n * d], d, heads, &mut scores) };
        // Rescale once per tile over the rows each query row may see, turn scores into
        // weights.
        for (r, &limit) in job.limits.iter().enumerate() {
            let visible = limit.saturating_sub(t).min(n as u32) as usize;
            for g in 0..job.group {
                let h = r * job.group + g;
                let s = &mut scores[h * TILE..h * TILE + visible];
                counts[h] = softmax_tile(st, h, d, s);
            }
        }
        for (i, &vo) in voff.iter().take(n).enumerate() {
            if i < nn {
                prefetch(&cache[nvoff[i] as usize..nvoff[i] as usize + d]);
            }
            T::widen(
                &cache[vo as usize..vo as usize + d],
                &mut rows[i * d..(i + 1) * d],
            );
        }
        // SAFETY: the caller's rule on `FMA`.
        unsafe { accumulate_tile::<FMA>(&mut st.acc, &scores, &rows[..n * d], d, &counts) };
        t = next;
        koff = nkoff;
        voff = nvoff;
        n = nn;
    }
}

fn check_common<T>(
    layout: &PagedLayout,
    cache: &[T],
    table: &PageTable,
    params: AttnParams,
) -> Result<usize, ShapeError> {
    check_cache("cache", cache.len(), layout.len())?;
    if !table.fits(layout) {
        return Err(ShapeError::TableMismatch {
            block_size: layout.block_size(),
            num_blocks: layout.num_blocks(),
        });
    }
    let kvh = layout.kv_heads();
    if params.q_heads == 0 || !params.q_heads.is_multiple_of(kvh) {
        return Err(ShapeError::HeadRatio {
            q_heads: params.q_heads,
            kv_heads: kvh,
        });
    }
    Ok((params.q_heads / kvh) as usize)
}

fn scaled_query<T: KvElem>(q: &[T], scale: f32) -> Vec<f32> {
    q.iter().map(|x| x.to_f32() * scale).collect()
}

/// The inputs of [`paged_decode`] (and, with `CudaSlice` buffers and a `DevicePageTable`, of
/// `CudaKernels::paged_decode` under feature `cuda`): `B` is the buffer type of the cache and
/// the queries, `P` the page table's.
///
/// ```
/// # use kvc_kernels::{AttnParams, BlockId, DecodeArgs, DecodeOptions, PageTable, PagedLayout};
/// # let layout = PagedLayout::hnd(1, 1, 4, 8)?;
/// # let table = PageTable::for_decode(vec![0, 1], vec![BlockId(0)], vec![2], &layout)?;
/// let (cache, q) = (vec![0f32; layout.len() as usize], vec![0f32; 8]);
/// let args = DecodeArgs {
///     layout: &layout,
///     cache: cache.as_slice(),
///     table: &table,
///     q: q.as_slice(),
///     params: AttnParams::new(1, 8),
///     options: DecodeOptions::default(),
/// };
/// # let _ = args;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct DecodeArgs<'a, B: ?Sized, P = PageTable> {
    /// The cache's layout (one layer).
    pub layout: &'a PagedLayout,
    /// The layer's KV cache, at least `layout.len()` elements.
    pub cache: &'a B,
    /// One query token per sequence, validated against `layout`.
    pub table: &'a P,
    /// Queries, `[batch, q_heads, head_dim]`, in the storage type.
    pub q: &'a B,
    /// Query heads and scale.
    pub params: AttnParams,
    /// How long contexts are split.
    pub options: DecodeOptions,
}

impl<B: ?Sized, P> Clone for DecodeArgs<'_, B, P> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: ?Sized, P> Copy for DecodeArgs<'_, B, P> {}

/// Decode attention: one query token per sequence of `args.table` against its paged KV.
///
/// `out` (`[batch, q_heads, head_dim]`) and `lse` (`[batch, q_heads]`, natural log of the
/// softmax denominator of the scaled logits) are f32. Every sequence holds at least one token
/// (its query's own, which the [`PageTable`] guarantees).
///
/// Non-finite values follow the textbook formula in IEEE arithmetic, as PyTorch's
/// `scaled_dot_product_attention` does: a NaN in the query or in a K row the head sees, a
/// logit of +∞, or a scale that is not finite makes that head's output and LSE NaN; a NaN or
/// ±∞ in a V row the head sees reaches its output (a weight that underflowed to 0 times NaN
/// or ∞ is NaN); a head whose every logit is −∞ returns zeros and an LSE of −∞. Large finite
/// logits are exact: the softmax subtracts the running maximum before exponentiating.
///
/// Work items are (sequence, KV head, chunk of the context): each reads its K/V rows once for
/// all `q_heads / kv_heads` query heads; the chunks of one pair are merged in f64 by their
/// LSE, so the result does not drift with the number of chunks.
pub fn paged_decode<T: KvElem>(
    args: &DecodeArgs<'_, [T]>,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<(), ShapeError> {
    let &DecodeArgs {
        layout,
        cache,
        table,
        q,
        params,
        options,
    } = args;
    let group = check_common(layout, cache, table, params)?;
    let batch = table.batch();
    for seq in 0..batch {
        let queries = table.queries(seq).len();
        if queries != 1 {
            return Err(ShapeError::NotDecode { seq, queries });
        }
    }
    let d = layout.head_dim() as usize;
    let qh = params.q_heads as usize;
    let kvh = layout.kv_heads() as usize;
    // Saturating: absurd head counts ask for more elements than any buffer has, not a panic.
    let rows = (batch as u64).saturating_mul(qh as u64);
    check_len("q", q.len(), rows.saturating_mul(d as u64))?;
    check_len("out", out.len(), rows.saturating_mul(d as u64))?;
    check_len("lse", lse.len(), rows)?;
    if batch == 0 {
        return Ok(());
    }
    if !params.scale.is_finite() {
        out.fill(f32::NAN);
        lse.fill(f32::NAN);
        return Ok(());
    }

    let max_len = (0..batch).map(|s| table.seq_len(s)).max().unwrap_or(0);
    let chunk = match options.split_tokens {
        Some(c) => c.max(1),
        None => {
            let pairs = batch * kvh;
            let target = 4 * rayon::current_num_threads();
            if pairs >= target {
                u32::MAX
            } else {
                let per_seq = target.div_ceil(pairs) as u32;
                max_len.div_ceil(per_seq).max(MIN_SPLIT_TOKENS)
            }
        }
    };
    let q32 = scaled_query(q, params.scale);
    let raw_q = T::as_bf16(q);

    // Items in (seq, head, chunk) order; `first[p]` is pair p's first item.
    let mut items: Vec<(usize, u32, u32, u32)> = Vec::new();
    let mut first = Vec::with_capacity(batch * kvh + 1);
    for seq in 0..batch {
        let len = table.seq_len(seq);
        for h in 0..kvh as u32 {
            first.push(items.len());
            let mut t0: u32 = 0;
            loop {
                let t1 = len.min(t0.saturating_add(chunk));
                items.push((seq, h, t0, t1));
                if t1 >= len {
                    break;
                }
                t0 = t1;
            }
        }
    }
    first.push(items.len());

    let mut part_o = vec![0f32; items.len() * group * d];
    let mut part_lse = vec![0f32; items.len() * group];
    part_o
        .par_chunks_mut(group * d)
        .zip(part_lse.par_chunks_mut(group))
        .zip(items.par_iter())
        .for_each(|((po, pl), &(seq, h, t0, t1))| {
            let qrow = (seq * qh + h as usize * group) * d;
            let len = table.seq_len(seq);
            let job = Job {
                pages: table.pages(seq),
                head: h,
                t0,
                t1,
                q: &q32[qrow..qrow + group * d],
                limits: &[len],
                group,
                raw_q: raw_q.map(|q| &q[qrow..qrow + group * d]),
                scale: params.scale,
            };
            let mut st = State::new(group, d);
            attend(layout, cache, &job, &mut st);
            for g in 0..group {
                pl[g] = st.finish(g, d, &mut po[g * d..(g + 1) * d]);
            }
        });

    // Every (seq, KV head) pair owns `group` consecutive query heads of `out`.
    out.par_chunks_mut(group * d)
        .zip(lse.par_chunks_mut(group))
        .enumerate()
        .for_each(|(pair, (o, l))| {
            let (a, b) = (first[pair], first[pair + 1]);
            if b - a == 1 {
                o.copy_from_slice(&part_o[a * group * d..(a + 1) * group * d]);
                l.copy_from_slice(&part_lse[a * group..(a + 1) * group]);
                return;
            }
            let mut acc = vec![0f64; d];
            for g in 0..group {
                let part = |item: usize| {
                    let at = item * group + g;
                    (part_lse[at], &part_o[at * d..(at + 1) * d])
                };
                l[g] = merge_parts((a..b).map(part), &mut o[g * d..(g + 1) * d], &mut acc);
            }
        });
    Ok(())
}

/// Prefill (or any ragged multi-token) attention over paged KV with a causal mask aligned
/// bottom-right: query `j` of a sequence with `n` queries and `L` KV tokens sees KV tokens
/// `0..=L - n + j`, so its last query sees the whole context.
///
/// `q` and `out` are `[total_queries, q_heads, head_dim]` (rows ordered by `qo_indptr`);
/// `lse` is `[total_queries, q_heads]`. Tokens a query may not see are never read for it;
/// non-finite values among those it sees behave as in [`paged_decode`].
#[allow(clippy::too_many_arguments)]
pub fn paged_prefill<T: KvElem>(
    layout: &PagedLayout,
    cache: &[T],
    table: &PageTable,
    q: &[T],
    params: AttnParams,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<(), ShapeError> {
    let group = check_common(layout, cache, table, params)?;
    let d = layout.head_dim() as usize;
    let qh = params.q_heads as usize;
    let kvh = layout.kv_heads();
    let rows = (table.total_queries() as u64).saturating_mul(qh as u64);
    check_len("q", q.len(), rows.saturating_mul(d as u64))?;
    check_len("out", out.len(), rows.saturating_mul(d as u64))?;
    check_len("lse", lse.len(), rows)?;
    if !params.scale.is_finite() {
        out.fill(f32::NAN);
        lse.fill(f32::NAN);
        return Ok(());
    }
    let q32 = scaled_query(q, params.scale);

    // Items: (seq, head, first query row, rows).
    let mut items = Vec::new();
    for seq in 0..table.batch() {
        let qs = table.queries(seq);
        for h in 0..kvh {
            let mut r = qs.start;
            while r < qs.end {
                let n = (qs.end - r).min(PREFILL_ROWS);
                items.push((seq, h, r, n));
                r += n;
            }
        }
    }
    let results: Vec<(Vec<f32>, Vec<f32>)> = items
        .par_iter()
        .map(|&(seq, h, r0, n)| {
            let qs = table.queries(seq);
            let len = table.seq_len(seq);
            let first_visible = len - qs.len() as u32; // validated: queries <= seq_len
            let limits: Vec<u32> = (r0..r0 + n)
                .map(|r| first_visible + (r - qs.start) as u32 + 1)
                .collect();
            let mut qbuf = Vec::with_capacity(n * group * d);
            for r in r0..r0 + n {
                let at = (r * qh + h as usize * group) * d;
                qbuf.extend_from_slice(&q32[at..at + group * d]);
            }
            let job = Job {
                pages: table.pages(seq),
                head: h,
                t0: 0,
                t1: limits[n - 1],
                q: &qbuf,
                limits: &limits,
                group,
                raw_q: None,
                scale: params.scale,
            };
            let mut st = State::new(n * group, d);
            attend(layout, cache, &job, &mut st);
            let mut o = vec![0f32; n * group * d];
            let l = (0..n * group)
                .map(|i| st.finish(i, d, &mut o[i * d..(i + 1) * d]))
                .collect();
            (o, l)
        })
        .collect();
    for (&(_, h, r0, n), (o, l)) in items.iter().zip(&results) {
        for i in 0..n {
            let row = (r0 + i) * qh + h as usize * group;
            out[row * d..(row + group) * d].copy_from_slice(&o[i * group * d..(i + 1) * group * d]);
            lse[row..row + group].copy_from_slice(&l[i * group..(i + 1) * group]);
        }
    }
    Ok(())
}

/// Merges partial results `(lse_i, o_i)` over disjoint sets of tokens into `out` and returns
/// the merged LSE: `out = Σ e^(lse_i − M)·o_i / Σ e^(lse_i − M)` with `M` the largest LSE,
/// summed in f64 so that the error does not grow with the number of parts. A part with an
/// LSE of −∞ (no tokens) contributes nothing (its output is not read); a NaN or +∞ LSE makes
/// the result NaN; when every part is empty the result is zeros and −∞.
fn merge_parts<'a>(
    parts: impl Iterator<Item = (f32, &'a [f32])> + Clone,
    out: &mut [f32],
    acc: &mut [f64],
) -> f32 {
    let mut m = f32::NEG_INFINITY;
    for (l, _) in parts.clone() {
        if l.is_nan() || l == f32::INFINITY {
            out.fill(f32::NAN);
            return f32::NAN;
        }
        m = m.max(l);
    }
    if m == f32::NEG_INFINITY {
        out.fill(0.0);
        return m;
    }
    acc.fill(0.0);
    let mut sum = 0f64;
    for (l, o) in parts {
        if l == f32::NEG_INFINITY {
            continue;
        }
        let w = (f64::from(l) - f64::from(m)).exp();
        sum += w;
        for (a, &x) in acc.iter_mut().zip(o) {
            *a += w * f64::from(x);
        }
    }
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = (a / sum) as f32;
    }
    (f64::from(m) + sum.ln()) as f32
}

/// Merges two partial attention results over disjoint sets of KV tokens by their LSE:
/// `out = (e^la·oa + e^lb·ob) / (e^la + e^lb)`, `lse = ln(e^la + e^lb)`, per head, in f64.
///
/// `oa`, `ob` and `out` are `[n, head_dim]`; `la`, `lb` and `lse` are `[n]`. A side with an
/// LSE of −∞ (no tokens) contributes nothing (its output is not read); a NaN or +∞ LSE on
/// either side makes that head's output and LSE NaN; two empty sides give zeros and −∞.
/// `head_dim` must be at least 1 ([`ShapeError::ZeroHeadDim`]).
pub fn merge_states(
    oa: &[f32],
    la: &[f32],
    ob: &[f32],
    lb: &[f32],
    head_dim: u32,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<(), ShapeError> {
    if head_dim == 0 {
        return Err(ShapeError::ZeroHeadDim);
    }
    let n = la.len() as u64;
    let d = u64::from(head_dim);
    check_len("lb", lb.len(), n)?;
    check_len("lse", lse.len(), n)?;
    check_len("oa", oa.len(), n * d)?;
    check_len("ob", ob.len(), n * d)?;
    check_len("out", out.len(), n * d)?;
    let d = head_dim as usize;
    out.par_chunks_mut(d)
        .zip(lse.par_iter_mut())
        .enumerate()
        .for_each(|(i, (o, l))| {
            let mut acc = vec![0f64; d];
            let parts = [
                (la[i], &oa[i * d..(i + 1) * d]),
                (lb[i], &ob[i * d..(i + 1) * d]),
            ];
            *l = merge_parts(parts.into_iter(), o, &mut acc);
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_neg_matches_exp() {
        let mut x = -90.0f32;
        while x <= 0.0 {
            let (got, want) = (exp_neg(x), x.exp());
            // f32 rounding of x·log2(e) alone costs about |x|·6e-8 relative.
            let tol = 2e-7 * (1.0 + x.abs()) * want + 1e-37;
            assert!((got - want).abs() <= tol, "{x}: {got} vs {want}");
            x += 0.013;
        }
        assert_eq!(exp_neg(0.0), 1.0);
        assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
    }
}
