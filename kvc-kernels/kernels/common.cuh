// kvc-kernels: types and element conversions shared by the CUDA sources. No CUDA headers are
// needed: f16 is widened with a PTX `cvt`, bf16 by a shift, so NVRTC compiles these sources
// without an include path.


typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define KVC_NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float kvc_f16_to_f32(u32 h) {
    float f;
    unsigned short s = (unsigned short)h;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(s));
    return f;
}

// Storage types: 0 = f32, 1 = f16, 2 = bf16. `unpack` widens one 16-byte vector.
template <int DT> struct Elem;

template <> struct Elem<0> {
    static constexpr int BYTES = 4;
    static constexpr int VEC = 4;
    __device__ __forceinline__ static void unpack(uint4 v, float* o) {
        o[0] = __uint_as_float(v.x);
        o[1] = __uint_as_float(v.y);
        o[2] = __uint_as_float(v.z);
        o[3] = __uint_as_float(v.w);
    }
};

template <> struct Elem<1> {
    static constexpr int BYTES = 2;
    static constexpr int VEC = 8;
    __device__ __forceinline__ static void unpack(uint4 v, float* o) {
        o[0] = kvc_f16_to_f32(v.x & 0xffffu);
        o[1] = kvc_f16_to_f32(v.x >> 16);
        o[2] = kvc_f16_to_f32(v.y & 0xffffu);
        o[3] = kvc_f16_to_f32(v.y >> 16);
        o[4] = kvc_f16_to_f32(v.z & 0xffffu);
        o[5] = kvc_f16_to_f32(v.z >> 16);
        o[6] = kvc_f16_to_f32(v.w & 0xffffu);
        o[7] = kvc_f16_to_f32(v.w >> 16);
    }
};

template <> struct Elem<2> {
    static constexpr int BYTES = 2;
    static constexpr int VEC = 8;
    __device__ __forceinline__ static void unpack(uint4 v, float* o) {
        o[0] = __uint_as_float(v.x << 16);
        o[1] = __uint_as_float(v.x & 0xffff0000u);
        o[2] = __uint_as_float(v.y << 16);
        o[3] = __uint_as_float(v.y & 0xffff0000u);
        o[4] = __uint_as_float(v.z << 16);
        o[5] = __uint_as_float(v.z & 0xffff0000u);
        o[6] = __uint_as_float(v.w << 16);
        o[7] = __uint_as_float(v.w & 0xffff0000u);
    }
};
