// silu(group_norm(x) * gamma + beta) for x [N, C, S] (S = H * W, or L).
//
// One block per (n, group): the group's C / G channels of S elements are
// contiguous. The block reads them once for the statistics (per-thread Welford,
// combined across the block, Chan et al.), then once more to write the output.

#define GN_THREADS 512

struct Welford {
    float n, mean, m2;
};

__device__ __forceinline__ Welford welford_combine(Welford a, Welford b) {
    float n = a.n + b.n;
    if (n == 0.0f) return a;
    float d = b.mean - a.mean;
    float fb = b.n / n;
    Welford r;
    r.n = n;
    r.mean = a.mean + d * fb;
    r.m2 = a.m2 + b.m2 + d * d * a.n * fb;
    return r;
}

__device__ __forceinline__ Welford welford_warp(Welford w) {
    for (int o = 16; o > 0; o >>= 1) {
        Welford other;
        other.n = __shfl_xor_sync(0xffffffffu, w.n, o);
        other.mean = __shfl_xor_sync(0xffffffffu, w.mean, o);
        other.m2 = __shfl_xor_sync(0xffffffffu, w.m2, o);
        w = welford_combine(w, other);
    }
    return w;
}

template <typename T>
__device__ void gn_silu(const T* x, const T* gamma, const T* beta, T* y, int channels_per_group, int spatial,
                        int groups, float eps) {
    const unsigned long long group_len = (unsigned long long)channels_per_group * spatial;
    const unsigned long long base = (unsigned long long)blockIdx.x * group_len;
    const int group = blockIdx.x % groups;
    const T* xg = x + base;
    T* yg = y + base;

    Welford w = {0.0f, 0.0f, 0.0f};
    for (unsigned long long i = threadIdx.x; i < group_len; i += blockDim.x) {
        float v = load_f32(xg[i]);
        w.n += 1.0f;
        float d = v - w.mean;
        w.mean += d / w.n;
        w.m2 += d * (v - w.mean);
    }
    w = welford_warp(w);

    __shared__ Welford partial[GN_THREADS / 32];
    __shared__ float stats[2];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) partial[warp] = w;
    __syncthreads();
    if (warp == 0) {
        Welford v = {0.0f, 0.0f, 0.0f};
        if (lane < (int)(blockDim.x / 32)) v = partial[lane];
        v = welford_warp(v);
        if (lane == 0) {
            stats[0] = v.mean;
            stats[1] = rsqrtf(v.m2 / (float)group_len + eps);
        }
    }
    __syncthreads();
    const float mean = stats[0], rstd = stats[1];

    for (unsigned long long i = threadIdx.x; i < group_len; i += blockDim.x) {
        const int c = group * channels_per_group + (int)(i / (unsigned long long)spatial);
        const float scale = rstd * load_f32(gamma[c]);
        const float v = (load_f32(xg[i]) - mean) * scale + load_f32(beta[c]);
        yg[i] = store_f32<T>(v / (1.0f + expf(-v)));
    }
}

extern "C" __global__ void __launch_bounds__(GN_THREADS)
    gn_silu_f32(const float* x, const float* gamma, const float* beta, float* y, int cpg, int spatial, int groups,
                float eps) {
    gn_silu<float>(x, gamma, beta, y, cpg, spatial, groups, eps);
}
extern "C" __global__ void __launch_bounds__(GN_THREADS)
    gn_silu_f16(const f16_t* x, const f16_t* gamma, const f16_t* beta, f16_t* y, int cpg, int spatial, int groups,
                float eps) {
    gn_silu<f16_t>(x, gamma, beta, y, cpg, spatial, groups, eps);
}
extern "C" __global__ void __launch_bounds__(GN_THREADS)
    gn_silu_bf16(const bf16_t* x, const bf16_t* gamma, const bf16_t* beta, bf16_t* y, int cpg, int spatial,
                 int groups, float eps) {
    gn_silu<bf16_t>(x, gamma, beta, y, cpg, spatial, groups, eps);
}
