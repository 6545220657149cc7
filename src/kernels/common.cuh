// Shared by every kernel in this folder; prepended to each .cu source before
// NVRTC compiles it (no #include, so no CUDA headers are needed at run time).
//
// Tensors arrive as f32, f16 or bf16 and are computed in f32. The 16-bit types
// are carried as raw bits and converted here, so cuda_fp16.h / cuda_bf16.h are
// not needed either.

struct f16_t {
    unsigned short bits;
};
struct bf16_t {
    unsigned short bits;
};

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float load_f32(float v) { return v; }
__device__ __forceinline__ float load_f32(f16_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
__device__ __forceinline__ float load_f32(bf16_t v) { return __uint_as_float(((unsigned int)v.bits) << 16); }

template <typename T> __device__ __forceinline__ T store_f32(float v);
template <> __device__ __forceinline__ float store_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ f16_t store_f32<f16_t>(float v) {
    f16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
    return h;
}
// Round to nearest even, as candle (the `half` crate) does; NaN stays NaN.
template <> __device__ __forceinline__ bf16_t store_f32<bf16_t>(float v) {
    unsigned int u = __float_as_uint(v);
    bf16_t b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        b.bits = (unsigned short)((u >> 16) | 0x0040u);
    } else {
        b.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return b;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
