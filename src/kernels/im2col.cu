// im2col in NCHW order: col[b][(c*KH + i)*KW + j][ho*Wo + wo] =
// x[b][c][ho*stride - pad + i][wo*stride - pad + j], zero outside the input.
// One element per thread in a grid-stride loop; consecutive threads take
// consecutive output pixels, so writes are coalesced and, with stride 1,
// reads too. The values are copied as raw words (T is the element's width).

template <typename T>
__device__ void im2col(const T* __restrict__ x, T* __restrict__ col, unsigned long long n, int B, int C, int H, int W,
                       int KH, int KW, int stride, int pad, int Ho, int Wo) {
    const unsigned long long P = (unsigned long long)Ho * Wo;
    const unsigned long long K = (unsigned long long)C * KH * KW;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned long long p = i % P;
        const unsigned long long t = i / P;
        const int k = (int)(t % K);
        const int b = (int)(t / K);
        const int j = k % KW;
        const int r = k / KW;
        const int ki = r % KH;
        const int c = r / KH;
        const int wo = (int)(p % Wo);
        const int ho = (int)(p / Wo);
        const int y = ho * stride - pad + ki;
        const int xx = wo * stride - pad + j;
        T v = 0;
        if (y >= 0 && y < H && xx >= 0 && xx < W) v = x[(((unsigned long long)b * C + c) * H + y) * W + xx];
        col[i] = v;
    }
}

extern "C" __global__ void im2col_u16(const unsigned short* x, unsigned short* col, unsigned long long n, int B, int C,
                                      int H, int W, int KH, int KW, int stride, int pad, int Ho, int Wo) {
    im2col<unsigned short>(x, col, n, B, C, H, W, KH, KW, stride, pad, Ho, Wo);
}
extern "C" __global__ void im2col_u32(const unsigned int* x, unsigned int* col, unsigned long long n, int B, int C,
                                      int H, int W, int KH, int KW, int stride, int pad, int Ho, int Wo) {
    im2col<unsigned int>(x, col, n, B, C, H, W, KH, KW, stride, pad, Ho, Wo);
}
