//! The bf16 decode path for CPUs with AVX-512 BF16 (chosen at run time): K rows are scored
//! straight from the cache with `vdpbf16ps` (bf16 pairs multiplied exactly, summed in f32)
//! against the query kept in bf16, and V rows are widened in registers and accumulated with
//! 16-lane FMAs, up to 4 query heads of the group per V load. Nothing is widened into a
//! buffer: each cache line of K and V is loaded once per block of 4 query heads.
//!
//! `vdpbf16ps` treats bf16 subnormals as zero (DAZ) and flushes subnormal results; the
//! scalar path does not. The logit is `scale · (q·k)` here and `(scale·q)·k` there; both
//! are f32 sums of exact products.

use std::arch::x86_64::{
    __m512bh, _mm_add_ps, _mm_storeu_ps, _mm256_add_ps, _mm256_castpd_ps, _mm256_castps256_ps128,
    _mm256_extractf128_ps, _mm512_add_ps, _mm512_castpd_ps, _mm512_castpd512_pd256,
    _mm512_castps_pd, _mm512_castsi512_ps, _mm512_dpbf16_ps, _mm512_extractf64x4_pd,
    _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_loadu_si512, _mm512_reduce_add_ps, _mm512_set1_ps,
    _mm512_setzero_ps, _mm512_setzero_si512, _mm512_storeu_ps, _mm512_unpackhi_epi16,
    _mm512_unpackhi_pd, _mm512_unpackhi_ps, _mm512_unpacklo_epi16, _mm512_unpacklo_pd,
    _mm512_unpacklo_ps,
};

use half::bf16;
use kvc_core::PagedLayout;

use crate::attention::{Job, State, TILE, prefetch, softmax_tile};

/// Whether this CPU can run [`attend_bf16`].
pub(crate) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512bf16")
}

/// 32 bf16 values at `p` as the operand of `vdpbf16ps`.
///
/// # Safety
///
/// `p..p + 32` must be readable.
#[inline(always)]
unsafe fn load_bh(p: *const bf16) -> __m512bh {
    // SAFETY: the caller's rule; `__m512i` and `__m512bh` are both 64 plain bytes.
    unsafe { std::mem::transmute(_mm512_loadu_si512(p.cast())) }
}

/// Where the columns of a 32-column chunk of V sit in the accumulators: widening 32 bf16 with
/// `vpunpck{l,h}wd` against zero gives, per 128-bit lane `L`, columns `8L..8L + 4` in the
/// first register and `8L + 4..8L + 8` in the second. Position `p` of a chunk's accumulators
/// holds column `CHUNK_COLUMN[p]`.
const CHUNK_COLUMN: [usize; 32] = {
    let mut t = [0usize; 32];
    let mut p = 0;
    while p < 32 {
        let (half, j) = (p / 16, p % 16);
        t[p] = 8 * (j / 4) + 4 * half + j % 4;
        p += 1;
    }
    t
};

/// Reorders every head's accumulator from column order to the order `v_block` keeps
/// (`to_chunks`), or back.
fn permute_acc(acc: &mut [f32], to_chunks: bool) {
    let mut tmp = [0f32; 32];
    // Each head's `d` columns are a whole number of 32-column chunks.
    for chunk in acc.chunks_exact_mut(32) {
        tmp.copy_from_slice(chunk);
        for (p, &c) in CHUNK_COLUMN.iter().enumerate() {
            if to_chunks {
                chunk[p] = tmp[c];
            } else {
                chunk[c] = tmp[p];
            }
        }
    }
}

/// Decode attention of one job over bf16 K/V: the same running softmax as
/// `attend_impl`, for a job whose query rows all see every token of `t0..t1` (decode).
/// `q` is the job's `group` query heads, unscaled, in bf16.
///
/// # Safety
///
/// The CPU must have AVX-512 F, BW and BF16 ([`available`]); `layout.head_dim()` must be a
/// multiple of 32; `cache` must span `layout` and `job.pages` hold `job.t1` tokens of it
/// (both validated by `paged_decode`); `q.len() >= job.group * head_dim`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn attend_bf16(
    layout: &PagedLayout,
    cache: &[bf16],
    job: &Job<'_>,
    q: &[bf16],
    scale: f32,
    st: &mut State,
) {
    let d = layout.head_dim() as usize;
    let bs = layout.block_size();
    let heads = job.group;
    debug_assert!(d.is_multiple_of(32) && q.len() >= heads * d);
    debug_assert!(job.limits.iter().all(|&l| l >= job.t1));
    let mut scores = vec![0f32; heads * TILE];
    let mut counts = vec![0usize; heads];
    let mut active: Vec<usize> = Vec::with_capacity(heads);
    let offsets = |from: u32, koff: &mut [usize; TILE], voff: &mut [usize; TILE]| -> usize {
        let n = job.t1.saturating_sub(from).min(TILE as u32) as usize;
        for (i, (ko, vo)) in koff.iter_mut().zip(voff.iter_mut()).take(n).enumerate() {
            let pos = from + i as u32;
            let block = job.pages[(pos / bs) as usize].get();
            *ko = layout.offset(block, 0, job.head, pos % bs) as usize;
            *vo = layout.offset(block, 1, job.head, pos % bs) as usize;
        }
        n
    };
    let (mut koff, mut voff) = ([0usize; TILE], [0usize; TILE]);
    let (mut nkoff, mut nvoff) = ([0usize; TILE], [0usize; TILE]);
    let mut n = offsets(job.t0, &mut koff, &mut voff);
    let base = cache.as_ptr();
    permute_acc(&mut st.acc, true);
    let mut t = job.t0;
    while t < job.t1 {
        let next = t + n as u32;
        let nn = offsets(next, &mut nkoff, &mut nvoff);
        // Scores: each K chunk of 32 is loaded once for up to 4 heads.
        for (i, &ko) in koff.iter().take(n).enumerate() {
            if i < nn {
                prefetch(&cache[nkoff[i]..nkoff[i] + d]);
            }
            let k = &cache[ko..ko + d];
            let mut h0 = 0;
            while h0 < heads {
                let hb = (heads - h0).min(4);
                let q = &q[h0 * d..(h0 + hb) * d];
                // SAFETY: the CPU features of this function; lengths as `score_row` needs.
                let s = unsafe {
                    match hb {
                        1 => score_row::<1>(q, k),
                        2 => score_row::<2>(q, k),
                        3 => score_row::<3>(q, k),
                        _ => score_row::<4>(q, k),
                    }
                };
                for (j, &x) in s.iter().enumerate().take(hb) {
                    scores[(h0 + j) * TILE + i] = x * scale;
                }
                h0 += hb;
            }
        }
        active.clear();
        for h in 0..heads {
            counts[h] = softmax_tile(st, h, d, &mut scores[h * TILE..h * TILE + n]);
            if counts[h] > 0 {
                active.push(h);
            }
        }
        for (i, &vo) in voff.iter().take(n).enumerate() {
            if i < nn {
                prefetch(&cache[nvoff[i]..nvoff[i] + d]);
            }
            assert!(vo + d <= cache.len());
        }
        // Values: 64 columns of up to 4 heads (16 registers) across the tile; each V chunk is
        // loaded and widened once for those heads.
        let rows = &voff[..n];
        for hs in active.chunks(4) {
            let mut c0 = 0;
            while c0 < d {
                // d - c0 is a multiple of 32: 64 columns while they last, then 32.
                let w = if d - c0 >= 64 { 4 } else { 2 };
                // SAFETY: the CPU features of this function; every row `vo..vo + d` is inside
                // `cache` (asserted above), `c0 + 16w <= d`, and each head's accumulator is
                // `h * d..(h + 1) * d` of `st.acc`.
                unsafe {
                    match (hs.len(), w) {
                        (1, 4) => v_block::<1, 4>(st, hs, &scores, base, rows, c0, d),
                        (2, 4) => v_block::<2, 4>(st, hs, &scores, base, rows, c0, d),
                        (3, 4) => v_block::<3, 4>(st, hs, &scores, base, rows, c0, d),
                        (4, 4) => v_block::<4, 4>(st, hs, &scores, base, rows, c0, d),
                        (1, _) => v_block::<1, 2>(st, hs, &scores, base, rows, c0, d),
                        (2, _) => v_block::<2, 2>(st, hs, &scores, base, rows, c0, d),
                        (3, _) => v_block::<3, 2>(st, hs, &scores, base, rows, c0, d),
                        _ => v_block::<4, 2>(st, hs, &scores, base, rows, c0, d),
                    }
                }
                c0 += 16 * w;
            }
        }
        t = next;
        koff = nkoff;
        voff = nvoff;
        n = nn;
    }
    permute_acc(&mut st.acc, false);
}

/// `q[j] · k` for the `HB` heads of `q` (each `k.len()` long).
///
/// # Safety
///
/// AVX-512 F and BF16; `k.len()` a multiple of 32; `q.len() >= HB * k.len()`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn score_row<const HB: usize>(q: &[bf16], k: &[bf16]) -> [f32; 4] {
    let d = k.len();
    let mut acc = [_mm512_setzero_ps(); HB];
    let mut c = 0;
    while c < d {
        // SAFETY: c + 32 <= d = k.len(); j * d + c + 32 <= HB * d <= q.len().
        unsafe {
            let kc = load_bh(k.as_ptr().add(c));
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm512_dpbf16_ps(*a, load_bh(q.as_ptr().add(j * d + c)), kc);
            }
        }
        c += 32;
    }
    let mut out = [0f32; 4];
    if HB == 4 {
        // Four horizontal sums at once: interleave pairs, then halves, then fold the lanes.
        let x01 = _mm512_add_ps(
            _mm512_unpacklo_ps(acc[0], acc[1]),
            _mm512_unpackhi_ps(acc[0], acc[1]),
        );
        let x23 = _mm512_add_ps(
            _mm512_unpacklo_ps(acc[2], acc[3]),
            _mm512_unpackhi_ps(acc[2], acc[3]),
        );
        let (p01, p23) = (_mm512_castps_pd(x01), _mm512_castps_pd(x23));
        let y = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(p01, p23)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(p01, p23)),
        );
        let yd = _mm512_castps_pd(y);
        let z = _mm256_add_ps(
            _mm256_castpd_ps(_mm512_castpd512_pd256(yd)),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(yd)),
        );
        let w = _mm_add_ps(_mm256_castps256_ps128(z), _mm256_extractf128_ps::<1>(z));
        // SAFETY: `out` holds 4 floats.
        unsafe { _mm_storeu_ps(out.as_mut_ptr(), w) };
    } else {
        for (o, a) in out.iter_mut().zip(acc) {
            *o = _mm512_reduce_add_ps(a);
        }
    }
    out
}

/// `acc[h][c0..c0 + 16W] += Σ_i weight[h][i] · V[i][c0..c0 + 16W]` for the `HB` heads `hs`
/// over the tile's V rows at `rows` (element offsets from `base`).
///
/// # Safety
///
/// AVX-512 F and BW; every `base + r + c0 .. base + r + c0 + 16W` readable for `r` in
/// `rows`; `(h + 1) * d <= st.acc.len()` and `c0 + 16W <= d` for `h` in `hs`;
/// `hs.len() == HB`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn v_block<const HB: usize, const W: usize>(
    st: &mut State,
    hs: &[usize],
    scores: &[f32],
    base: *const bf16,
    rows: &[usize],
    c0: usize,
    d: usize,
) {
    let mut a = [[_mm512_setzero_ps(); W]; HB];
    for (j, aj) in a.iter_mut().enumerate() {
        for (k, r) in aj.iter_mut().enumerate() {
            // SAFETY: the caller's rule on the accumulators.
            *r = unsafe { _mm512_loadu_ps(st.acc.as_ptr().add(hs[j] * d + c0 + 16 * k)) };
        }
    }
    let zero = _mm512_setzero_si512();
    for (i, &vo) in rows.iter().enumerate() {
        // Each 64-byte load of 32 bf16 gives two registers of f32, in `CHUNK_COLUMN` order.
        let mut v = [_mm512_setzero_ps(); W];
        for (k2, pair) in v.chunks_exact_mut(2).enumerate() {
            // SAFETY: the caller's rule on the rows.
            let x = unsafe { _mm512_loadu_si512(base.add(vo + c0 + 32 * k2).cast()) };
            pair[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, x));
            pair[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, x));
        }
        for (j, aj) in a.iter_mut().enumerate() {
            let p = _mm512_set1_ps(scores[hs[j] * TILE + i]);
            for (r, &x) in aj.iter_mut().zip(&v) {
                *r = _mm512_fmadd_ps(p, x, *r);
            }
        }
    }
    for (j, aj) in a.iter().enumerate() {
        for (k, r) in aj.iter().enumerate() {
            // SAFETY: as for the loads.
            unsafe { _mm512_storeu_ps(st.acc.as_mut_ptr().add(hs[j] * d + c0 + 16 * k), *r) };
        }
    }
}
