// RMSNorm over the head dimension, then rotary position embedding on
// interleaved pairs: one warp per (b, l, h) row of d values.
//   y = x / sqrt(mean(x^2) + eps) * w;  (y[2i], y[2i+1]) rotated by angle i of
//   position l: (a cos - b sin, a sin + b cos).
// x and out [rows = B*L*H, d] contiguous (out may not alias x), w [d],
// cos and sin [L, d/2]; d even, at most 32 * RR_MAX_PAIRS_PER_LANE * 2.

#define RR_WARPS 8
#define RR_MAX_PAIRS_PER_LANE 4

template <typename T>
__device__ void rms_norm_rope(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ cosv,
                              const T* __restrict__ sinv, T* __restrict__ out, unsigned long long rows, int H, int L,
                              int d, float eps) {
    const int lane = threadIdx.x & 31;
    const unsigned long long row = blockIdx.x * (unsigned long long)RR_WARPS + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int l = (int)((row / H) % L);
    const int half = d / 2;
    const T* xr = x + row * d;
    float a[RR_MAX_PAIRS_PER_LANE], b[RR_MAX_PAIRS_PER_LANE];
    float ss = 0.0f;
#pragma unroll
    for (int t = 0; t < RR_MAX_PAIRS_PER_LANE; t++) {
        const int i = lane + 32 * t;  // pair index
        a[t] = b[t] = 0.0f;
        if (i < half) {
            a[t] = load_f32(xr[2 * i]);
            b[t] = load_f32(xr[2 * i + 1]);
            ss += a[t] * a[t] + b[t] * b[t];
        }
    }
    const float inv = rsqrtf(warp_sum(ss) / d + eps);
    T* orow = out + row * d;
#pragma unroll
    for (int t = 0; t < RR_MAX_PAIRS_PER_LANE; t++) {
        const int i = lane + 32 * t;
        if (i < half) {
            const float ya = a[t] * inv * load_f32(w[2 * i]);
            const float yb = b[t] * inv * load_f32(w[2 * i + 1]);
            const float c = load_f32(cosv[(unsigned long long)l * half + i]);
            const float s = load_f32(sinv[(unsigned long long)l * half + i]);
            orow[2 * i] = store_f32<T>(ya * c - yb * s);
            orow[2 * i + 1] = store_f32<T>(ya * s + yb * c);
        }
    }
}

#define RMS_NORM_ROPE(TY, NAME)                                                                                    \
    extern "C" __global__ void __launch_bounds__(RR_WARPS * 32)                                                   \
        rms_norm_rope_##NAME(const TY* x, const TY* w, const TY* c, const TY* s, TY* out, unsigned long long rows, \
                             int H, int L, int d, float eps) {                                                    \
        rms_norm_rope<TY>(x, w, c, s, out, rows, H, L, d, eps);                                                   \
    }
RMS_NORM_ROPE(float, f32)
RMS_NORM_ROPE(f16_t, f16)
RMS_NORM_ROPE(bf16_t, bf16)
