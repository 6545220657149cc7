// Classifier-free guidance fused with a linear scheduler step, one pass:
//
//   guided = first + scale * (second - first)   (or first alone, unguided)
//   next   = a * x + b * guided (+ c * noise)
//
// `out` holds the model's rows [first..., second...] of n elements each when
// guided, [first...] otherwise; x, noise and next hold n elements.

template <typename T>
__device__ void guided_step(const T* out, const T* x, const T* noise, T* next, unsigned long long n, int guided,
                            float scale, float a, float b, float c) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float g = load_f32(out[i]);
        if (guided) g = g + (load_f32(out[i + n]) - g) * scale;
        float v = a * load_f32(x[i]) + b * g;
        if (noise != 0) v += c * load_f32(noise[i]);
        next[i] = store_f32<T>(v);
    }
}

#define GUIDED_STEP_ENTRY(SUFFIX, T)                                                                              \
    extern "C" __global__ void guided_step_##SUFFIX(const T* out, const T* x, T* next, unsigned long long n,       \
                                                    int guided, float scale, float a, float b) {                  \
        guided_step<T>(out, x, (const T*)0, next, n, guided, scale, a, b, 0.0f);                                   \
    }                                                                                                             \
    extern "C" __global__ void guided_step_noise_##SUFFIX(const T* out, const T* x, const T* noise, T* next,       \
                                                          unsigned long long n, int guided, float scale, float a, \
                                                          float b, float c) {                                     \
        guided_step<T>(out, x, noise, next, n, guided, scale, a, b, c);                                            \
    }

GUIDED_STEP_ENTRY(f32, float)
GUIDED_STEP_ENTRY(f16, f16_t)
GUIDED_STEP_ENTRY(bf16, bf16_t)
