// Matrix-vector products for decode, straight from the stored weight layouts:
// out[i, j] = x[i, :k] . W[j, :k] (+ bias[j]) for i < m (m small: one row per token).
// Grid (ceil(n / 4), m), 128 threads: each warp computes one output element, its
// lanes splitting the row (one 32-block per lane for Q8_0/Q4_0, one element per lane
// for F16/BF16/F32), then a warp reduction. Accumulation in f32.

template <int TY>
__device__ __forceinline__ float row_dot(const u8 *row, const float *x, int k, int lane) {
    float acc = 0.0f;
    if (TY == 8) {
        int nb = (k + QK - 1) / QK;
        for (int b = lane; b < nb; b += WARP) {
            const u8 *blk = row + (long)b * Q8_BYTES;
            const float *xb = x + b * QK;
            float s = 0.0f;
            int lim = min(QK, k - b * QK);
            for (int t = 0; t < lim; t++) s += (float)(i8)blk[2 + t] * __ldg(xb + t);
            acc += h2f(ld16(blk)) * s;
        }
    } else if (TY == 9) {
        int nb = (k + QK - 1) / QK;
        for (int b = lane; b < nb; b += WARP) {
            const u8 *blk = row + (long)b * Q4_BYTES;
            const float *xb = x + b * QK;
            float s = 0.0f;
            int lim = min(QK, k - b * QK);
            for (int t = 0; t < 16; t++) {
                u8 byte = blk[2 + t];
                if (t < lim) s += (float)((int)(byte & 15) - 8) * __ldg(xb + t);
                if (t + 16 < lim) s += (float)((int)(byte >> 4) - 8) * __ldg(xb + t + 16);
            }
            acc += h2f(ld16(blk)) * s;
        }
    } else if (TY == 1) {
        const u16 *r = (const u16 *)row;
        for (int c = lane; c < k; c += WARP) acc += h2f(r[c]) * __ldg(x + c);
    } else if (TY == 2) {
        const u16 *r = (const u16 *)row;
        for (int c = lane; c < k; c += WARP) acc += bf2f(r[c]) * __ldg(x + c);
    } else {
        const float *r = (const float *)row;
        for (int c = lane; c < k; c += WARP) acc += r[c] * __ldg(x + c);
    }
    return warp_sum(acc);
}

template <int TY>
__device__ __forceinline__ void gemv(const u8 *w, long row_stride, const float *x,
                                     const float *bias, int has_bias, float *out, int n,
                                     int k) {
    int lane = threadIdx.x % WARP;
    int j = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int i = blockIdx.y;
    if (j >= n) return;
    float acc = row_dot<TY>(w + (long)j * row_stride, x + (long)i * k, k, lane);
    if (lane == 0) out[(long)i * n + j] = acc + (has_bias ? bias[j] : 0.0f);
}

#define GEMV(NAME, TY)                                                                    \
    extern "C" __global__ void NAME(const u8 *w, long row_stride, const float *x,        \
                                    const float *bias, int has_bias, float *out, int n,   \
                                    int k) {                                              \
        gemv<TY>(w, row_stride, x, bias, has_bias, out, n, k);                            \
    }

GEMV(gemv_f32, 0)
GEMV(gemv_f16, 1)
GEMV(gemv_bf16, 2)
GEMV(gemv_q8_0, 8)
GEMV(gemv_q4_0, 9)
