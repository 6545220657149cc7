// GEGLU: y[r, j] = p[r, j] * gelu(p[r, h + j]) for p [rows, 2h], y [rows, h].
// `erf_gelu` picks the exact form; otherwise the tanh approximation, which is
// candle's `Tensor::gelu` (and so what candle's SD UNet computes).

__device__ __forceinline__ float gelu(float v, int erf_gelu) {
    if (erf_gelu) return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * v * (1.0f + 0.044715f * v * v)));
}

template <typename T>
__device__ void geglu(const T* p, T* y, unsigned long long n, unsigned long long h, int erf_gelu) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const unsigned long long r = i / h, j = i - r * h;
        const T* row = p + 2 * h * r;
        y[i] = store_f32<T>(load_f32(row[j]) * gelu(load_f32(row[h + j]), erf_gelu));
    }
}

extern "C" __global__ void geglu_f32(const float* p, float* y, unsigned long long n, unsigned long long h,
                                     int erf_gelu) {
    geglu<float>(p, y, n, h, erf_gelu);
}
extern "C" __global__ void geglu_f16(const f16_t* p, f16_t* y, unsigned long long n, unsigned long long h,
                                     int erf_gelu) {
    geglu<f16_t>(p, y, n, h, erf_gelu);
}
extern "C" __global__ void geglu_bf16(const bf16_t* p, bf16_t* y, unsigned long long n, unsigned long long h,
                                      int erf_gelu) {
    geglu<bf16_t>(p, y, n, h, erf_gelu);
}
