// kvc-kernels: paged attention on CUDA (decode, prefill, split merge, state merge).
// Compiled by NVRTC after common.cuh; the crate appends one KVC_ATTEND line per kernel it needs.
//
// attend<DT, D, G>: one CTA of 4 warps per (query row, KV head, split). It serves all of the
// KV head's query heads (up to G), so every K/V row is read once per CTA. A group of L lanes
// handles one token: each lane loads 16-byte vectors of the K and V rows, partial dot products
// are reduced with shuffles, and each lane group keeps its own online-softmax state, merged
// across the warp with shuffles and across warps through shared memory. The split's slice of
// the block table is staged in shared memory first. With more than one split, partial outputs
// and LSEs go to a workspace that merge_splits combines.

#define KVC_WARPS 4

__device__ __forceinline__ float kvc_scale_of(float m, float m_new) {
    return m == KVC_NEG_INF ? 0.0f : __expf(m - m_new);
}

template <int DT, int D, int G>
__device__ __forceinline__ void attend(
    const char* __restrict__ cache, const char* __restrict__ q, float* __restrict__ out,
    float* __restrict__ lse, float* __restrict__ part_o, float* __restrict__ part_lse,
    const u32* __restrict__ qo_indptr, const u32* __restrict__ kv_indptr,
    const u32* __restrict__ kv_indices, const u32* __restrict__ seq_lens, u32 batch,
    u32 q_heads, u32 group, u32 block_size, u64 s_block, u64 s_kv, u64 s_head, u64 s_token,
    float scale, u32 split_tokens, u32 num_splits) {
    typedef Elem<DT> E;
    constexpr int VEC = E::VEC;
    constexpr int NV = D / VEC;  // 16-byte vectors per row
    constexpr int L = NV >= 32 ? 32 : (NV > 16 ? 32 : (NV > 8 ? 16 : (NV > 4 ? 8 : (NV > 2 ? 4 : (NV > 1 ? 2 : 1)))));
    constexpr int VPL = (NV + L - 1) / L;  // vectors per lane
    constexpr int TPW = 32 / L;            // tokens per warp pass
    constexpr int EL = VPL * VEC;          // elements per lane

    extern __shared__ __align__(16) unsigned char smem[];
    float* red = reinterpret_cast<float*>(smem);           // [WARPS][G][D]
    float* red_ml = red + KVC_WARPS * G * D;                  // [WARPS][G][2]
    u32* pages = reinterpret_cast<u32*>(red_ml + KVC_WARPS * G * 2);

    const u32 row = blockIdx.x;
    const u32 h = blockIdx.y;
    const u32 split = blockIdx.z;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int grp = lane / L;
    const int lig = lane % L;

    // The sequence of this query row: the last s with qo_indptr[s] <= row.
    u32 lo = 0, hi = batch;
    while (hi - lo > 1) {
        u32 mid = (lo + hi) / 2;
        if (qo_indptr[mid] <= row) lo = mid; else hi = mid;
    }
    const u32 seq = lo;
    const u32 n_q = qo_indptr[seq + 1] - qo_indptr[seq];
    const u32 visible = seq_lens[seq] - n_q + (row - qo_indptr[seq]) + 1;
    const u32 t0 = split * split_tokens;
    const u32 t1 = min(visible, t0 + split_tokens);

    // Stage this split's pages.
    const u32 p0 = t0 / block_size;
    const u32 p1 = t1 > t0 ? (t1 + block_size - 1) / block_size : p0;
    const u32* table = kv_indices + kv_indptr[seq];
    for (u32 p = p0 + threadIdx.x; p < p1; p += blockDim.x) pages[p - p0] = table[p];

    // This lane's slice of the queries, widened and scaled.
    float qr[G][EL];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const u32 qh = h * group + g;
#pragma unroll
        for (int i = 0; i < VPL; ++i) {
            const int v = lig + i * L;
            float tmp[VEC];
            if (g < (int)group && v < NV) {
                const uint4 raw = reinterpret_cast<const uint4*>(
                    q + ((u64)row * q_heads + qh) * D * E::BYTES)[v];
                E::unpack(raw, tmp);
            } else {
#pragma unroll
                for (int e = 0; e < VEC; ++e) tmp[e] = 0.0f;
            }
#pragma unroll
            for (int e = 0; e < VEC; ++e) qr[g][i * VEC + e] = tmp[e] * scale;
        }
    }
    __syncthreads();

    float m[G], l[G], acc[G][EL];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        m[g] = KVC_NEG_INF;
        l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < EL; ++e) acc[g][e] = 0.0f;
    }

    // Every lane of a warp runs the same passes (the shuffles need the whole warp); a lane
    // group past the end loads nothing and scores -inf.
    for (u32 tb = t0 + warp * TPW; tb < t1; tb += KVC_WARPS * TPW) {
        const u32 t = tb + grp;
        const bool valid = t < t1;
        uint4 kraw[VPL], vraw[VPL];
        if (valid) {
            const u32 block = pages[t / block_size - p0];
            const u64 base =
                (u64)block * s_block + (u64)h * s_head + (u64)(t % block_size) * s_token;
            const uint4* krow = reinterpret_cast<const uint4*>(cache + base * E::BYTES);
            const uint4* vrow = reinterpret_cast<const uint4*>(cache + (base + s_kv) * E::BYTES);
#pragma unroll
            for (int i = 0; i < VPL; ++i) {
                const int v = lig + i * L;
                if (v < NV) {
                    kraw[i] = __ldg(krow + v);
                    vraw[i] = __ldg(vrow + v);
                } else {
                    kraw[i] = make_uint4(0, 0, 0, 0);
                    vraw[i] = make_uint4(0, 0, 0, 0);
                }
            }
        } else {
#pragma unroll
            for (int i = 0; i < VPL; ++i) {
                kraw[i] = make_uint4(0, 0, 0, 0);
                vraw[i] = make_uint4(0, 0, 0, 0);
            }
        }
        float kf[EL];
#pragma unroll
        for (int i = 0; i < VPL; ++i) E::unpack(kraw[i], kf + i * VEC);
        float s[G];
#pragma unroll
        for (int g = 0; g < G; ++g) {
            float d = 0.0f;
#pragma unroll
            for (int e = 0; e < EL; ++e) d = fmaf(qr[g][e], kf[e], d);
#pragma unroll
            for (int o = L / 2; o > 0; o /= 2) d += __shfl_xor_sync(0xffffffffu, d, o);
            s[g] = valid ? d : KVC_NEG_INF;
        }
        float vf[EL];
#pragma unroll
        for (int i = 0; i < VPL; ++i) E::unpack(vraw[i], vf + i * VEC);
#pragma unroll
        for (int g = 0; g < G; ++g) {
            if (s[g] > m[g]) {
                const float a = kvc_scale_of(m[g], s[g]);
                l[g] *= a;
#pragma unroll
                for (int e = 0; e < EL; ++e) acc[g][e] *= a;
                m[g] = s[g];
            }
            const float p = valid ? __expf(s[g] - m[g]) : 0.0f;
            l[g] += p;
#pragma unroll
            for (int e = 0; e < EL; ++e) acc[g][e] = fmaf(p, vf[e], acc[g][e]);
        }
    }

    // Merge the lane groups of this warp.
#pragma unroll
    for (int o = L; o < 32; o *= 2) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
            const float mo = __shfl_xor_sync(0xffffffffu, m[g], o);
            const float lo_ = __shfl_xor_sync(0xffffffffu, l[g], o);
            const float mn = fmaxf(m[g], mo);
            const float a = kvc_scale_of(m[g], mn), b = kvc_scale_of(mo, mn);
            l[g] = l[g] * a + lo_ * b;
#pragma unroll
            for (int e = 0; e < EL; ++e) {
                const float ao = __shfl_xor_sync(0xffffffffu, acc[g][e], o);
                acc[g][e] = acc[g][e] * a + ao * b;
            }
            m[g] = mn;
        }
    }
    // Then the warps, through shared memory.
    if (grp == 0) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
#pragma unroll
            for (int i = 0; i < VPL; ++i) {
                const int v = lig + i * L;
                if (v < NV) {
#pragma unroll
                    for (int e = 0; e < VEC; ++e)
                        red[(warp * G + g) * D + v * VEC + e] = acc[g][i * VEC + e];
                }
            }
            if (lig == 0) {
                red_ml[(warp * G + g) * 2] = m[g];
                red_ml[(warp * G + g) * 2 + 1] = l[g];
            }
        }
    }
    __syncthreads();
    for (u32 idx = threadIdx.x; idx < group * D; idx += blockDim.x) {
        const u32 g = idx / D, x = idx % D;
        float mm = KVC_NEG_INF;
        for (int w = 0; w < KVC_WARPS; ++w) mm = fmaxf(mm, red_ml[(w * G + g) * 2]);
        float ll = 0.0f, o = 0.0f;
        for (int w = 0; w < KVC_WARPS; ++w) {
            const float a = kvc_scale_of(red_ml[(w * G + g) * 2], mm);
            ll += red_ml[(w * G + g) * 2 + 1] * a;
            o += red[(w * G + g) * D + x] * a;
        }
        const float res = ll > 0.0f ? o / ll : 0.0f;
        const float ls = ll > 0.0f ? mm + __logf(ll) : KVC_NEG_INF;
        const u64 head = (u64)row * q_heads + h * group + g;
        if (num_splits == 1) {
            out[head * D + x] = res;
            if (x == 0) lse[head] = ls;
        } else {
            part_o[(head * num_splits + split) * D + x] = res;
            if (x == 0) part_lse[head * num_splits + split] = ls;
        }
    }
}

#define KVC_ATTEND(NAME, DT, D, G)                                                            \
    extern "C" __global__ void __launch_bounds__(KVC_WARPS * 32) NAME(                        \
        const char* cache, const char* q, float* out, float* lse, float* part_o,             \
        float* part_lse, const u32* qo_indptr, const u32* kv_indptr, const u32* kv_indices,  \
        const u32* seq_lens, u32 batch, u32 q_heads, u32 group, u32 block_size, u64 s_block, \
        u64 s_kv, u64 s_head, u64 s_token, float scale, u32 split_tokens, u32 num_splits) {  \
        attend<DT, D, G>(cache, q, out, lse, part_o, part_lse, qo_indptr, kv_indptr,         \
                         kv_indices, seq_lens, batch, q_heads, group, block_size, s_block,   \
                         s_kv, s_head, s_token, scale, split_tokens, num_splits);            \
    }

// Combines `num_splits` partial results per head by their LSE. One CTA per (row, head).
extern "C" __global__ void merge_splits(const float* __restrict__ part_o,
                                        const float* __restrict__ part_lse,
                                        float* __restrict__ out, float* __restrict__ lse,
                                        u32 head_dim, u32 num_splits) {
    const u64 head = blockIdx.x;
    const float* pl = part_lse + head * num_splits;
    float mm = KVC_NEG_INF;
    for (u32 s = 0; s < num_splits; ++s) mm = fmaxf(mm, pl[s]);
    float ll = 0.0f;
    for (u32 s = 0; s < num_splits; ++s) ll += kvc_scale_of(pl[s], mm);
    for (u32 x = threadIdx.x; x < head_dim; x += blockDim.x) {
        float o = 0.0f;
        for (u32 s = 0; s < num_splits; ++s)
            o += part_o[(head * num_splits + s) * head_dim + x] * kvc_scale_of(pl[s], mm);
        out[head * head_dim + x] = ll > 0.0f ? o / ll : 0.0f;
    }
    if (threadIdx.x == 0) lse[head] = ll > 0.0f ? mm + __logf(ll) : KVC_NEG_INF;
}

// merge_states: (oa, la) and (ob, lb) -> (out, lse), one CTA per head.
extern "C" __global__ void merge_states(const float* __restrict__ oa, const float* __restrict__ la,
                                        const float* __restrict__ ob, const float* __restrict__ lb,
                                        float* __restrict__ out, float* __restrict__ lse,
                                        u32 head_dim) {
    const u64 head = blockIdx.x;
    const float a_l = la[head], b_l = lb[head];
    const float mm = fmaxf(a_l, b_l);
    const float wa = kvc_scale_of(a_l, mm), wb = kvc_scale_of(b_l, mm);
    const float sum = wa + wb;
    for (u32 x = threadIdx.x; x < head_dim; x += blockDim.x) {
        const u64 i = head * head_dim + x;
        out[i] = sum > 0.0f ? (oa[i] * wa + ob[i] * wb) / sum : 0.0f;
    }
    if (threadIdx.x == 0) lse[head] = sum > 0.0f ? mm + __logf(sum) : KVC_NEG_INF;
}
