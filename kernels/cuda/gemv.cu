// Matrix-vector products for decode, straight from the stored weight layouts:
// out[i, j] = x[i, :k] . W[j, :k] (+ bias[j]) for i < m, m <= GEMV_M (a few rows: one
// per token of a decode step or a short chunk).
//
// Decode is bound by reading the weights once, so the kernel is built around the
// weight stream:
// - every weight byte is read once per launch, whatever m is (each decoded group of
//   8 weights is multiplied into all m rows of x, which stay in L1/L2);
// - F32/F16/BF16 rows are read with 16-byte loads (8 halfs per lane per step, a warp
//   covers 512 contiguous bytes of a row), when the row stride, the pointers and k
//   allow it; otherwise one element per lane;
// - Q8_0/Q4_0: four lanes share a 32-block (8 quants each, or 4 packed bytes = 8
//   nibbles), so a warp reads 8 consecutive blocks (272 / 144 contiguous bytes) per
//   step with 2-byte loads (blocks are only 2-byte aligned) and the block scale is one
//   broadcast load; x is read as float4;
// - a block of 128 threads (4 warps) handles `rpb` rows: with rpb = 1 its four warps
//   split one row's k and add their sums in shared memory, which gives small-n
//   matrices (Phi-2's 2560-row projections) 4 warps per row, enough to keep every SM
//   streaming; large-n matrices (fc1, lm_head) take rpb = 4, one warp per row.
// Accumulation in f32; the order is fixed per launch configuration (deterministic).

#define GEMV_M 8
#define GEMV_THREADS 128
#define GEMV_WARPS (GEMV_THREADS / WARP)

struct XRows {
    const float *x;
    int k, m;
    bool vec;  // rows 16-byte aligned and k % 4 == 0: float4 loads
};

// x[i, e..e+4), zeros past k.
__device__ __forceinline__ float4 ldx4(const XRows &X, int i, int e) {
    const float *p = X.x + (long)i * X.k + e;
    if (X.vec && e + 4 <= X.k) return __ldg((const float4 *)p);
    float4 r;
    r.x = e < X.k ? __ldg(p) : 0.0f;
    r.y = e + 1 < X.k ? __ldg(p + 1) : 0.0f;
    r.z = e + 2 < X.k ? __ldg(p + 2) : 0.0f;
    r.w = e + 3 < X.k ? __ldg(p + 3) : 0.0f;
    return r;
}

__device__ __forceinline__ float dot4(float4 a, float w0, float w1, float w2, float w3) {
    return a.x * w0 + a.y * w1 + a.z * w2 + a.w * w3;
}

// acc[i] += w[0..8) . x[i, e..e+4) ++ x[i, e2..e2+4)
__device__ __forceinline__ void fma8(float (&acc)[GEMV_M], const XRows &X, const float (&w)[8],
                                     int e, int e2) {
#pragma unroll
    for (int i = 0; i < GEMV_M; i++) {
        if (i < X.m) {
            float4 a = ldx4(X, i, e), b = ldx4(X, i, e2);
            acc[i] += dot4(a, w[0], w[1], w[2], w[3]) + dot4(b, w[4], w[5], w[6], w[7]);
        }
    }
}

__device__ __forceinline__ void unpack_h8(uint4 v, float (&w)[8], bool bf) {
    u32 u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        u16 lo = (u16)(u[j] & 0xffff), hi = (u16)(u[j] >> 16);
        w[2 * j] = bf ? bf2f(lo) : h2f(lo);
        w[2 * j + 1] = bf ? bf2f(hi) : h2f(hi);
    }
}

// One warp-part's share of row `row`: part `p` of `parts`, lane `lane`.
template <int TY>
__device__ __forceinline__ void row_part(float (&acc)[GEMV_M], const u8 *row, const XRows &X,
                                         bool wvec, int p, int parts, int lane) {
    const int k = X.k;
    if (TY == 8 || TY == 9) {
        const int BYTES = TY == 8 ? Q8_BYTES : Q4_BYTES;
        int nb = (k + QK - 1) / QK;
        int q = lane & 3;  // quarter of the block
        // warp-part p takes blocks [8 (p + s parts), +8) for s = 0, 1, ...
        for (int b = (p * WARP + lane) / 4; b < nb; b += parts * (WARP / 4)) {
            const u8 *blk = row + (long)b * BYTES;
            float d = h2f(ld16(blk));
            float w[8];
            int e, e2;
            if (TY == 8) {
                const u16 *qs = (const u16 *)(blk + 2) + q * 4;  // 8 quants
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    u16 v = qs[j];
                    w[2 * j] = d * (float)(i8)(v & 0xff);
                    w[2 * j + 1] = d * (float)(i8)(v >> 8);
                }
                e = b * QK + q * 8;
                e2 = e + 4;
            } else {
                const u16 *qs = (const u16 *)(blk + 2) + q * 2;  // bytes 4q..4q+4
                u32 v = (u32)qs[0] | ((u32)qs[1] << 16);
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    u32 byte = (v >> (8 * j)) & 0xff;
                    w[j] = d * (float)((int)(byte & 15) - 8);
                    w[4 + j] = d * (float)((int)(byte >> 4) - 8);
                }
                e = b * QK + q * 4;  // low nibbles: elements 4q..4q+4
                e2 = e + 16;         // high nibbles: 16 + 4q..
            }
            fma8(acc, X, w, e, e2);
        }
    } else if (wvec) {
        // 8 elements per lane per step: one 16-byte load (two for f32)
        int nc = k / 8;
        for (int c = p * WARP + lane; c < nc; c += parts * WARP) {
            float w[8];
            if (TY == 0) {
                const float4 *r = (const float4 *)row + 2 * c;
                float4 a = __ldg(r), b = __ldg(r + 1);
                w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
                w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
            } else {
                uint4 v = __ldg((const uint4 *)row + c);
                unpack_h8(v, w, TY == 2);
            }
            fma8(acc, X, w, 8 * c, 8 * c + 4);
        }
    } else {
        for (int c = p * WARP + lane; c < k; c += parts * WARP) {
            float wv = TY == 0 ? ((const float *)row)[c]
                     : TY == 1 ? h2f(((const u16 *)row)[c])
                               : bf2f(((const u16 *)row)[c]);
#pragma unroll
            for (int i = 0; i < GEMV_M; i++)
                if (i < X.m) acc[i] += wv * __ldg(X.x + (long)i * k + c);
        }
    }
}

// Grid (ceil(n / rpb)), GEMV_THREADS threads; rpb in {1, 2, 4}.
template <int TY>
__device__ __forceinline__ void gemv(const u8 *w, long row_stride, const float *x,
                                     const float *bias, int has_bias, float *out, int n, int k,
                                     int m, int rpb) {
    __shared__ float red[GEMV_WARPS][GEMV_M];
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int parts = GEMV_WARPS / rpb;
    int r = warp % rpb, p = warp / rpb;
    int j = blockIdx.x * rpb + r;
    XRows X;
    X.x = x;
    X.k = k;
    X.m = m;
    X.vec = ((unsigned long)x & 15) == 0 && k % 4 == 0;
    bool wvec = ((unsigned long)w & 15) == 0 && row_stride % 16 == 0 && k % 8 == 0;
    float acc[GEMV_M];
#pragma unroll
    for (int i = 0; i < GEMV_M; i++) acc[i] = 0.0f;
    if (j < n) row_part<TY>(acc, w + (long)j * row_stride, X, wvec, p, parts, lane);
#pragma unroll
    for (int i = 0; i < GEMV_M; i++) {
        if (i < m) {
            float s = warp_sum(acc[i]);
            if (lane == 0) red[warp][i] = s;
        }
    }
    __syncthreads();
    // thread t < rpb * m writes row r = t % rpb of x-row i = t / rpb
    int t = threadIdx.x;
    if (t < rpb * m) {
        int rr = t % rpb, i = t / rpb, jj = blockIdx.x * rpb + rr;
        if (jj < n) {
            float s = 0.0f;
            for (int pp = 0; pp < parts; pp++) s += red[pp * rpb + rr][i];
            out[(long)i * n + jj] = s + (has_bias ? bias[jj] : 0.0f);
        }
    }
}

#define GEMV(NAME, TY)                                                                    \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS)                           \
        NAME(const u8 *w, long row_stride, const float *x, const float *bias, int has_bias, \
             float *out, int n, int k, int m, int rpb) {                                  \
        gemv<TY>(w, row_stride, x, bias, has_bias, out, n, k, m, rpb);                    \
    }

GEMV(gemv_f32, 0)
GEMV(gemv_f16, 1)
GEMV(gemv_bf16, 2)
GEMV(gemv_q8_0, 8)
GEMV(gemv_q4_0, 9)
