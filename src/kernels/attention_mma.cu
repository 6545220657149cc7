// softmax(Q Kᵀ · scale) V on the tensor cores, for f16 and bf16 on sm_80 and
// newer (Ampere, Ada, Hopper): the FlashAttention-2 schedule (Dao 2023) with
// mma.sync.m16n8k16 (16-bit operands, f32 accumulators).
//
// q [BH, lq, d], k and v [BH, lk, d], o [BH, lq, d]; d even, d <= DP, where
// DP (a multiple of 16) is the template's padded head dimension.
//
// Block: MMA_WARPS warps, 16 query rows each (MMA_ROWS rows per block). Each
// warp keeps its Q rows as mma A-fragments in registers for the whole kernel.
// The block walks the keys in tiles of MMA_KT: it stages the K tile
// row-major and the V tile transposed in shared memory (16-bit, zero-filled
// beyond lk and d), then every warp computes S = Q Kᵀ (16 x MMA_KT, f32), the
// online-softmax update in registers, and O += P V with P rounded to the
// input type. The m16n8 accumulator layout of S is the A-fragment layout of
// P, so P never leaves registers.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4:
//   A (16x16, row-major): reg0 (g, 2t..2t+1), reg1 (g+8, 2t..), reg2 (g, 2t+8..), reg3 (g+8, 2t+8..)
//   B (16x8, "col"):      reg0 (k 2t..2t+1, n g), reg1 (k 2t+8.., n g)
//   C (16x8, f32):        c0 c1 (g, 2t..2t+1), c2 c3 (g+8, 2t..2t+1)
// A 32-bit register holds two 16-bit values, the lower index in the low half.

#define MMA_WARPS 4
#define MMA_ROWS (MMA_WARPS * 16)
#define MMA_KT 64

__device__ __forceinline__ void mma_16816(float* c, const unsigned* a, const unsigned* b, f16_t) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_16816(float* c, const unsigned* a, const unsigned* b, bf16_t) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two floats rounded to the 16-bit type, `lo` in the low half.
__device__ __forceinline__ unsigned pack2(float lo, float hi, f16_t) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ unsigned pack2(float lo, float hi, bf16_t) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Elements (row, col) and (row, col + 1) of a [rows, d] matrix of 16-bit
// values as one register; zero outside it (col is even and d is even, so
// both or neither are inside).
__device__ __forceinline__ unsigned load_pair(const unsigned short* m, int row, int col, int rows, int d) {
    if (row >= rows || col >= d) return 0u;
    const unsigned long long i = (unsigned long long)row * d + col;
    return (unsigned)m[i] | ((unsigned)m[i + 1] << 16);
}

template <typename T, int DP>
__device__ void attention_mma(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                              const unsigned short* __restrict__ v, unsigned short* __restrict__ o, int lq, int lk,
                              int d, float scale_log2) {
    // K tile [MMA_KT][KS] and V tile transposed [DP][VS]; the +8 pads (16
    // bytes) put the 8 rows a B-fragment load touches in different banks.
    constexpr int KS = DP + 8;
    constexpr int VS = MMA_KT + 8;
    __shared__ __align__(16) unsigned short ks[MMA_KT * KS];
    __shared__ __align__(16) unsigned short vts[DP * VS];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const unsigned long long bh = blockIdx.y;
    const unsigned short* qb = q + bh * (unsigned long long)lq * d;
    const unsigned short* kb = k + bh * (unsigned long long)lk * d;
    const unsigned short* vb = v + bh * (unsigned long long)lk * d;
    const int row0 = blockIdx.x * MMA_ROWS + warp * 16;

    unsigned qa[DP / 16][4];
#pragma unroll
    for (int kk = 0; kk < DP / 16; kk++) {
        qa[kk][0] = load_pair(qb, row0 + g, 16 * kk + 2 * t, lq, d);
        qa[kk][1] = load_pair(qb, row0 + g + 8, 16 * kk + 2 * t, lq, d);
        qa[kk][2] = load_pair(qb, row0 + g, 16 * kk + 8 + 2 * t, lq, d);
        qa[kk][3] = load_pair(qb, row0 + g + 8, 16 * kk + 8 + 2 * t, lq, d);
    }

    float oacc[DP / 8][4];
#pragma unroll
    for (int n = 0; n < DP / 8; n++) oacc[n][0] = oacc[n][1] = oacc[n][2] = oacc[n][3] = 0.0f;
    // Rows g and g + 8 of this warp: running maximum (of score * log2 e) and
    // this thread's part of the sum of exp2(score - maximum).
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;

    for (int k0 = 0; k0 < lk; k0 += MMA_KT) {
        __syncthreads();  // every warp is done with the previous tile
        for (int i = threadIdx.x; i < MMA_KT * (DP / 2); i += blockDim.x) {
            const int j = i / (DP / 2), c = 2 * (i - j * (DP / 2));
            const unsigned kv = load_pair(kb, k0 + j, c, lk, d);
            const unsigned vv = load_pair(vb, k0 + j, c, lk, d);
            *reinterpret_cast<unsigned*>(&ks[j * KS + c]) = kv;
            vts[c * VS + j] = (unsigned short)(vv & 0xffffu);
            vts[(c + 1) * VS + j] = (unsigned short)(vv >> 16);
        }
        __syncthreads();

        // S = Q Kᵀ for this warp's 16 rows and the tile's MMA_KT keys.
        float s[MMA_KT / 8][4];
#pragma unroll
        for (int n = 0; n < MMA_KT / 8; n++) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < DP / 16; kk++) {
                const unsigned short* kr = ks + (8 * n + g) * KS + 16 * kk + 2 * t;
                unsigned b[2];
                b[0] = *reinterpret_cast<const unsigned*>(kr);
                b[1] = *reinterpret_cast<const unsigned*>(kr + 8);
                mma_16816(s[n], qa[kk], b, T());
            }
        }

        // Online softmax: scale into the exp2 domain, mask keys past lk,
        // row maxima over the quad of threads sharing a row.
        float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
        for (int n = 0; n < MMA_KT / 8; n++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const bool valid = k0 + 8 * n + 2 * t + e < lk;
                s[n][e] = valid ? s[n][e] * scale_log2 : NEG_INF;
                s[n][2 + e] = valid ? s[n][2 + e] * scale_log2 : NEG_INF;
                mx0 = fmaxf(mx0, s[n][e]);
                mx1 = fmaxf(mx1, s[n][2 + e]);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        // Key k0 is valid, so the new maxima are finite; exp2(-inf) = 0
        // makes the first tile's correction vanish.
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        const float c0 = exp2f(m0 - n0), c1 = exp2f(m1 - n1);
        m0 = n0;
        m1 = n1;
        float r0 = 0.0f, r1 = 0.0f;
#pragma unroll
        for (int n = 0; n < MMA_KT / 8; n++) {
            s[n][0] = exp2f(s[n][0] - n0);
            s[n][1] = exp2f(s[n][1] - n0);
            s[n][2] = exp2f(s[n][2] - n1);
            s[n][3] = exp2f(s[n][3] - n1);
            r0 += s[n][0] + s[n][1];
            r1 += s[n][2] + s[n][3];
        }
        l0 = l0 * c0 + r0;
        l1 = l1 * c1 + r1;
#pragma unroll
        for (int n = 0; n < DP / 8; n++) {
            oacc[n][0] *= c0;
            oacc[n][1] *= c0;
            oacc[n][2] *= c1;
            oacc[n][3] *= c1;
        }

        // O += P V: P's accumulator layout is the A-fragment layout.
#pragma unroll
        for (int kk = 0; kk < MMA_KT / 16; kk++) {
            unsigned pa[4];
            pa[0] = pack2(s[2 * kk][0], s[2 * kk][1], T());
            pa[1] = pack2(s[2 * kk][2], s[2 * kk][3], T());
            pa[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1], T());
            pa[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3], T());
#pragma unroll
            for (int n = 0; n < DP / 8; n++) {
                const unsigned short* vr = vts + (8 * n + g) * VS + 16 * kk + 2 * t;
                unsigned b[2];
                b[0] = *reinterpret_cast<const unsigned*>(vr);
                b[1] = *reinterpret_cast<const unsigned*>(vr + 8);
                mma_16816(oacc[n], pa, b, T());
            }
        }
    }

    // Each thread summed only its own columns: add up the quad.
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float i0 = 1.0f / l0, i1 = 1.0f / l1;
    const int r0 = row0 + g, r1 = row0 + g + 8;
    unsigned short* ob = o + bh * (unsigned long long)lq * d;
#pragma unroll
    for (int n = 0; n < DP / 8; n++) {
        const int c = 8 * n + 2 * t;
        if (c >= d) continue;
        if (r0 < lq) {
            const unsigned p = pack2(oacc[n][0] * i0, oacc[n][1] * i0, T());
            ob[(unsigned long long)r0 * d + c] = (unsigned short)(p & 0xffffu);
            ob[(unsigned long long)r0 * d + c + 1] = (unsigned short)(p >> 16);
        }
        if (r1 < lq) {
            const unsigned p = pack2(oacc[n][2] * i1, oacc[n][3] * i1, T());
            ob[(unsigned long long)r1 * d + c] = (unsigned short)(p & 0xffffu);
            ob[(unsigned long long)r1 * d + c + 1] = (unsigned short)(p >> 16);
        }
    }
}

#define ATTENTION_MMA(TY, NAME, DP)                                                                             \
    extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32)                                               \
        attention_mma_##NAME##_##DP(const unsigned short* q, const unsigned short* k, const unsigned short* v, \
                                    unsigned short* o, int lq, int lk, int d, float scale_log2) {             \
        attention_mma<TY, DP>(q, k, v, o, lq, lk, d, scale_log2);                                             \
    }
#define ATTENTION_MMA_ALL(DP)           \
    ATTENTION_MMA(f16_t, f16, DP)       \
    ATTENTION_MMA(bf16_t, bf16, DP)

// The padded head dimensions the host picks from (attention.rs, MMA_DIMS).
ATTENTION_MMA_ALL(16)
ATTENTION_MMA_ALL(32)
ATTENTION_MMA_ALL(48)
ATTENTION_MMA_ALL(64)
ATTENTION_MMA_ALL(80)
ATTENTION_MMA_ALL(96)
ATTENTION_MMA_ALL(128)
ATTENTION_MMA_ALL(160)

// ---------------------------------------------------------------------------
// v2: tokens-major layouts, wider blocks, vector loads.
//
// q [B, lq, H, d], k and v [B, lk, H, d] with d contiguous and any other
// strides (in elements), o [B, lq, H, d] likewise: the layout the linear
// projections produce and the output projection reads, so neither side
// needs a transpose copy. V2_WARPS warps of 16 query rows each share every
// K/V tile, staged with 16-byte loads (`vec`: the host checked alignment;
// else element loads), both row-major; the P V product reads its B
// fragments with ldmatrix.trans (four 8x8 matrices per instruction).

#define V2_WARPS 8
#define V2_ROWS (V2_WARPS * 16)

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const unsigned short* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// Eight consecutive 16-bit elements (row, col..col+7) of a row-strided
// matrix, zero where col + e >= d or row >= rows.
__device__ __forceinline__ uint4 load8(const unsigned short* m, long long row_stride, int row, int col, int rows, int d,
                                       int vec) {
    uint4 r = make_uint4(0u, 0u, 0u, 0u);
    if (row >= rows || col >= d) return r;
    const unsigned short* p = m + (long long)row * row_stride + col;
    if (vec) return *reinterpret_cast<const uint4*>(p);
    unsigned short e[8];
#pragma unroll
    for (int i = 0; i < 8; i++) e[i] = col + i < d ? p[i] : (unsigned short)0;
    r.x = (unsigned)e[0] | ((unsigned)e[1] << 16);
    r.y = (unsigned)e[2] | ((unsigned)e[3] << 16);
    r.z = (unsigned)e[4] | ((unsigned)e[5] << 16);
    r.w = (unsigned)e[6] | ((unsigned)e[7] << 16);
    return r;
}

template <typename T, int DP>
__device__ void attention_bshd(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                               const unsigned short* __restrict__ v, unsigned short* __restrict__ o, int H, int lq,
                               int lk, int d, float scale_log2, long long qsb, long long qsl, long long qsh,
                               long long ksb, long long ksl, long long ksh, long long vsb, long long vsl,
                               long long vsh, long long osb, long long osl, long long osh, int vec) {
    constexpr int KS = DP + 8;  // row stride of both tiles, in elements (16-byte multiple)
    __shared__ __align__(16) unsigned short ks[MMA_KT * KS];
    __shared__ __align__(16) unsigned short vs[MMA_KT * KS];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int b = blockIdx.y / H, h = blockIdx.y % H;
    const unsigned short* qb = q + b * qsb + h * qsh;
    const unsigned short* kb = k + b * ksb + h * ksh;
    const unsigned short* vb = v + b * vsb + h * vsh;
    const int row0 = blockIdx.x * V2_ROWS + warp * 16;

    // Q rows as A fragments (once; element loads, as they are few).
    unsigned qa[DP / 16][4];
#pragma unroll
    for (int kk = 0; kk < DP / 16; kk++) {
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int c = 16 * kk + 8 * half + 2 * t;
#pragma unroll
            for (int rr = 0; rr < 2; rr++) {
                const int row = row0 + g + 8 * rr;
                unsigned val = 0u;
                if (row < lq && c < d) {
                    const unsigned short* p = qb + (long long)row * qsl + c;
                    val = (unsigned)p[0] | ((unsigned)p[1] << 16);
                }
                qa[kk][2 * half + rr] = val;
            }
        }
    }

    float oacc[DP / 8][4];
#pragma unroll
    for (int n = 0; n < DP / 8; n++) oacc[n][0] = oacc[n][1] = oacc[n][2] = oacc[n][3] = 0.0f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;

    for (int k0 = 0; k0 < lk; k0 += MMA_KT) {
        __syncthreads();
        for (int i = threadIdx.x; i < MMA_KT * (DP / 8); i += blockDim.x) {
            const int j = i / (DP / 8), c = 8 * (i - j * (DP / 8));
            *reinterpret_cast<uint4*>(&ks[j * KS + c]) = load8(kb, ksl, k0 + j, c, lk, d, vec);
            *reinterpret_cast<uint4*>(&vs[j * KS + c]) = load8(vb, vsl, k0 + j, c, lk, d, vec);
        }
        __syncthreads();

        float s[MMA_KT / 8][4];
#pragma unroll
        for (int n = 0; n < MMA_KT / 8; n++) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < DP / 16; kk++) {
                const unsigned short* kr = ks + (8 * n + g) * KS + 16 * kk + 2 * t;
                unsigned bf[2];
                bf[0] = *reinterpret_cast<const unsigned*>(kr);
                bf[1] = *reinterpret_cast<const unsigned*>(kr + 8);
                mma_16816(s[n], qa[kk], bf, T());
            }
        }

        float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
        for (int n = 0; n < MMA_KT / 8; n++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const bool valid = k0 + 8 * n + 2 * t + e < lk;
                s[n][e] = valid ? s[n][e] * scale_log2 : NEG_INF;
                s[n][2 + e] = valid ? s[n][2 + e] * scale_log2 : NEG_INF;
                mx0 = fmaxf(mx0, s[n][e]);
                mx1 = fmaxf(mx1, s[n][2 + e]);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        const float c0 = exp2f(m0 - n0), c1 = exp2f(m1 - n1);
        m0 = n0;
        m1 = n1;
        float r0 = 0.0f, r1 = 0.0f;
#pragma unroll
        for (int n = 0; n < MMA_KT / 8; n++) {
            s[n][0] = exp2f(s[n][0] - n0);
            s[n][1] = exp2f(s[n][1] - n0);
            s[n][2] = exp2f(s[n][2] - n1);
            s[n][3] = exp2f(s[n][3] - n1);
            r0 += s[n][0] + s[n][1];
            r1 += s[n][2] + s[n][3];
        }
        l0 = l0 * c0 + r0;
        l1 = l1 * c1 + r1;
#pragma unroll
        for (int n = 0; n < DP / 8; n++) {
            oacc[n][0] *= c0;
            oacc[n][1] *= c0;
            oacc[n][2] *= c1;
            oacc[n][3] *= c1;
        }

#pragma unroll
        for (int kk = 0; kk < MMA_KT / 16; kk++) {
            unsigned pa[4];
            pa[0] = pack2(s[2 * kk][0], s[2 * kk][1], T());
            pa[1] = pack2(s[2 * kk][2], s[2 * kk][3], T());
            pa[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1], T());
            pa[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3], T());
            // Lane L addresses key 16kk + (L & 7) + 8 ((L >> 3) & 1), dims
            // 16np + 8 (L >> 4): matrices (keys 0-7 | 8-15) x (dims 0-7 | 8-15).
            const unsigned short* vrow = vs + (16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1)) * KS + 8 * (lane >> 4);
#pragma unroll
            for (int np = 0; np < DP / 16; np++) {
                unsigned bf[4];
                ldmatrix_x4_trans(bf, vrow + 16 * np);
                mma_16816(oacc[2 * np], pa, bf, T());
                mma_16816(oacc[2 * np + 1], pa, bf + 2, T());
            }
        }
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float i0 = 1.0f / l0, i1 = 1.0f / l1;
    unsigned short* ob = o + b * osb + h * osh;
#pragma unroll
    for (int n = 0; n < DP / 8; n++) {
        const int c = 8 * n + 2 * t;
        if (c >= d) continue;
#pragma unroll
        for (int rr = 0; rr < 2; rr++) {
            const int row = row0 + g + 8 * rr;
            if (row >= lq) continue;
            const float inv = rr ? i1 : i0;
            const unsigned p = pack2(oacc[n][2 * rr] * inv, oacc[n][2 * rr + 1] * inv, T());
            unsigned short* dst = ob + (long long)row * osl + c;
            dst[0] = (unsigned short)(p & 0xffffu);
            dst[1] = (unsigned short)(p >> 16);
        }
    }
}

#define ATTENTION_BSHD(TY, NAME, DP)                                                                              \
    extern "C" __global__ void __launch_bounds__(V2_WARPS * 32) attention_bshd_##NAME##_##DP(                   \
        const unsigned short* q, const unsigned short* k, const unsigned short* v, unsigned short* o, int H,     \
        int lq, int lk, int d, float scale_log2, long long qsb, long long qsl, long long qsh, long long ksb,     \
        long long ksl, long long ksh, long long vsb, long long vsl, long long vsh, long long osb, long long osl, \
        long long osh, int vec) {                                                                               \
        attention_bshd<TY, DP>(q, k, v, o, H, lq, lk, d, scale_log2, qsb, qsl, qsh, ksb, ksl, ksh, vsb, vsl,   \
                               vsh, osb, osl, osh, vec);                                                        \
    }
#define ATTENTION_BSHD_ALL(DP)          \
    ATTENTION_BSHD(f16_t, f16, DP)      \
    ATTENTION_BSHD(bf16_t, bf16, DP)

ATTENTION_BSHD_ALL(16)
ATTENTION_BSHD_ALL(32)
ATTENTION_BSHD_ALL(48)
ATTENTION_BSHD_ALL(64)
ATTENTION_BSHD_ALL(80)
ATTENTION_BSHD_ALL(96)
ATTENTION_BSHD_ALL(128)
ATTENTION_BSHD_ALL(160)
