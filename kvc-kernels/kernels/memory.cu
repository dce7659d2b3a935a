// kvc-kernels: block memory on CUDA (write_kv, copy_blocks). Compiled by NVRTC after
// common.cuh. Rows of head_dim elements are copied as raw bytes, 16 at a time when every row
// start is 16-byte aligned (`vec16`), else byte by byte; no conversion, so copies are exact.

__device__ __forceinline__ void kvc_copy_row(char* dst, const char* src, u32 bytes, int vec16,
                                             u32 lane, u32 lanes) {
    if (vec16) {
        const uint4* s = reinterpret_cast<const uint4*>(src);
        uint4* d = reinterpret_cast<uint4*>(dst);
        for (u32 i = lane; i < bytes / 16; i += lanes) d[i] = s[i];
    } else {
        for (u32 i = lane; i < bytes; i += lanes) dst[i] = src[i];
    }
}

// One CTA per token: K and V of every head into the token's slot; slot -1 skips.
// key/value: [tokens, kv_heads, head_dim]; strides in elements, `esize` bytes per element.
extern "C" __global__ void write_kv(char* __restrict__ cache, const char* __restrict__ key,
                                    const char* __restrict__ value,
                                    const i64* __restrict__ slots, u32 kv_heads,
                                    u32 head_dim, u32 block_size, u64 s_block, u64 s_kv,
                                    u64 s_head, u64 s_token, u32 esize, int vec16) {
    const u64 token = blockIdx.x;
    const i64 slot = slots[token];
    if (slot < 0) return;
    const u64 block = (u64)slot / block_size, pos = (u64)slot % block_size;
    const u32 row_bytes = head_dim * esize;
    // Each warp copies whole rows: 2 * kv_heads rows.
    const u32 warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (u32 r = warp; r < 2 * kv_heads; r += warps) {
        const u32 kv = r / kv_heads, h = r % kv_heads;
        const u64 dst = block * s_block + kv * s_kv + h * s_head + pos * s_token;
        const u64 src = (token * kv_heads + h) * head_dim;
        kvc_copy_row(cache + dst * esize, (kv == 0 ? key : value) + src * esize, row_bytes,
                     vec16, lane, 32);
    }
}

// One CTA per (copy pair, layer): the whole block, every head row of K and V.
// layers: device pointers of each layer's cache; pairs: [src0, dst0, src1, dst1, ...].
extern "C" __global__ void copy_blocks(const u64* __restrict__ layers,
                                       const u32* __restrict__ pairs, u32 kv_heads,
                                       u32 head_dim, u32 block_size, u64 s_block, u64 s_kv,
                                       u64 s_head, u64 s_token, u32 esize, int vec16) {
    char* base = reinterpret_cast<char*>(layers[blockIdx.y]);
    const u64 src_block = pairs[2 * blockIdx.x], dst_block = pairs[2 * blockIdx.x + 1];
    const u32 row_bytes = head_dim * esize;
    const u32 rows = 2 * kv_heads * block_size;
    const u32 warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (u32 r = warp; r < rows; r += warps) {
        const u32 kv = r / (kv_heads * block_size);
        const u32 h = (r / block_size) % kv_heads, t = r % block_size;
        const u64 off = kv * s_kv + h * s_head + t * s_token;
        kvc_copy_row(base + (dst_block * s_block + off) * esize,
                     base + (src_block * s_block + off) * esize, row_bytes, vec16, lane, 32);
    }
}
