// softmax(Q Kᵀ · scale) V without the score matrix, flash-attention style:
// the keys are visited in tiles with a running (online) softmax.
//
// q [BH, lq, d], k and v [BH, lk, d], o [BH, lq, d]; d <= 256.
// Block: ATT_WARPS warps, one query row each, sharing K/V tiles of `kt` keys
// (32 for d <= 128, 16 above) staged in shared memory as f32. Within a warp,
// lane j scores key j of the tile; then each lane accumulates the output
// dimensions lane, lane + 32, ... (at most 8 per lane).
//
// Dynamic shared memory: K and V tiles, kt * (d + 1) floats each (the +1 pad
// keeps lane j's reads of row j in different banks), then ATT_WARPS * d floats
// of query rows.

#define ATT_WARPS 8
#define ATT_MAX_DIMS_PER_LANE 8

template <typename T>
__device__ void attention(const T* q, const T* k, const T* v, T* o, int lq, int lk, int d, int kt, float scale) {
    extern __shared__ float smem[];
    const int stride = d + 1;
    float* ks = smem;
    float* vs = ks + kt * stride;
    float* qs = vs + kt * stride;

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const unsigned long long bh = blockIdx.y;
    const int row = blockIdx.x * ATT_WARPS + warp;
    const bool active = row < lq;
    const T* kb = k + bh * lk * d;
    const T* vb = v + bh * lk * d;

    float* qrow = qs + warp * d;
    if (active) {
        const T* qg = q + (bh * lq + row) * d;
        for (int i = lane; i < d; i += 32) qrow[i] = load_f32(qg[i]) * scale;
    }

    float acc[ATT_MAX_DIMS_PER_LANE];
#pragma unroll
    for (int t = 0; t < ATT_MAX_DIMS_PER_LANE; t++) acc[t] = 0.0f;
    float m = NEG_INF, l = 0.0f;

    for (int k0 = 0; k0 < lk; k0 += kt) {
        const int n = lk - k0 < kt ? lk - k0 : kt;
        __syncthreads();  // the previous tile is no longer read (and qrow is written)
        for (int i = threadIdx.x; i < n * d; i += blockDim.x) {
            const int j = i / d, c = i - j * d;
            ks[j * stride + c] = load_f32(kb[(unsigned long long)(k0 + j) * d + c]);
            vs[j * stride + c] = load_f32(vb[(unsigned long long)(k0 + j) * d + c]);
        }
        __syncthreads();
        if (!active) continue;

        float s = NEG_INF;
        if (lane < n) {
            const float* kr = ks + lane * stride;
            float dot = 0.0f;
            for (int c = 0; c < d; c++) dot += qrow[c] * kr[c];
            s = dot;
        }
        const float m_new = fmaxf(m, warp_max(s));
        const float p = lane < n ? expf(s - m_new) : 0.0f;
        const float corr = expf(m - m_new);
        l = l * corr + warp_sum(p);
        m = m_new;
#pragma unroll
        for (int t = 0; t < ATT_MAX_DIMS_PER_LANE; t++) acc[t] *= corr;
        for (int j = 0; j < n; j++) {
            const float pj = __shfl_sync(0xffffffffu, p, j);
            const float* vr = vs + j * stride;
#pragma unroll
            for (int t = 0; t < ATT_MAX_DIMS_PER_LANE; t++) {
                const int c = lane + 32 * t;
                if (c < d) acc[t] += pj * vr[c];
            }
        }
    }

    if (active) {
        T* og = o + (bh * lq + row) * d;
        const float inv = 1.0f / l;
#pragma unroll
        for (int t = 0; t < ATT_MAX_DIMS_PER_LANE; t++) {
            const int c = lane + 32 * t;
            if (c < d) og[c] = store_f32<T>(acc[t] * inv);
        }
    }
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
    attention_f32(const float* q, const float* k, const float* v, float* o, int lq, int lk, int d, int kt,
                  float scale) {
    attention<float>(q, k, v, o, lq, lk, d, kt, scale);
}
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
    attention_f16(const f16_t* q, const f16_t* k, const f16_t* v, f16_t* o, int lq, int lk, int d, int kt,
                  float scale) {
    attention<f16_t>(q, k, v, o, lq, lk, d, kt, scale);
}
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
    attention_bf16(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* o, int lq, int lk, int d, int kt,
                   float scale) {
    attention<bf16_t>(q, k, v, o, lq, lk, d, kt, scale);
}
