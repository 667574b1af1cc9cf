// Attention over a paged KV cache, the contract of reference::attention:
//   q   [n_tokens, n_heads * D] f32, row i at sequence position first_pos + i
//   K,V pools [slots, kv_dim] of T (f32, or f16 as 16-bit words: read widened to
//       f32), kv_dim = n_kv_heads * D; position p lives at slot
//       block_table[p / block_size] * block_size + p % block_size
//   row i attends keys 0..first_pos+i+1 (causal) or 0..first_pos+n_tokens (not)
//   out [n_tokens, n_heads * D]
// Scores and the online softmax are f32 throughout. D <= MAX_D.
// (SigLIP's self-attention without a cache uses the same kernels with one block
// covering the whole sequence.) Each kernel is a template over the pool's element
// type with one extern "C" entry per type: `name` for f32, `name_f16` for f16.
//
// The decode kernel also serves a batch (reference::attention_batch): rows of
// several sequences, each row with its own position, its own block table (a start
// into the step's concatenated tables) and its own sequence end.

#define MAX_D 128
#define DCH (MAX_D / WARP)  // head dims per lane
#define BQ 16               // query rows per prefill block (4 per warp)
#define BK 32               // keys per tile (one per lane)

__device__ __forceinline__ long kv_slot(const u32 *table, int block_size, int t) {
    return (long)table[t / block_size] * block_size + t % block_size;
}

// Flash-style prefill: grid (ceil(n_tokens / BQ), n_heads), 128 threads. Each block
// stages its BQ query rows and, tile by tile, BK keys and values in shared memory;
// each warp keeps the running max, sum and output of its 4 rows in registers.
template <typename T>
__device__ __forceinline__ void attn_prefill_body(const float *q, const T *kpool,
                                                  const T *vpool, const u32 *table,
                                                  int block_size, int kv_dim, int n_tokens,
                                                  int n_heads, int n_kv_heads, int D,
                                                  int first_pos, int causal, float scale,
                                                  float *out) {
    __shared__ float q_s[BQ][MAX_D];
    __shared__ float k_s[BK][MAX_D + 1];
    __shared__ float v_s[BK][MAX_D];
    int h = blockIdx.y, kvh = h / (n_heads / n_kv_heads);
    int q0 = blockIdx.x * BQ;
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    long qd = (long)n_heads * D;
    int total = first_pos + n_tokens;
    int q_last = min(q0 + BQ, n_tokens) - 1;
    int kmax = causal ? min(total, first_pos + q_last + 1) : total;

    for (int idx = threadIdx.x; idx < BQ * D; idx += blockDim.x) {
        int r = idx / D, d = idx % D;
        q_s[r][d] = q0 + r < n_tokens ? q[(q0 + r) * qd + h * D + d] : 0.0f;
    }

    float m[4], l[4], acc[4][DCH];
#pragma unroll
    for (int rr = 0; rr < 4; rr++) {
        m[rr] = NEG_INF;
        l[rr] = 0.0f;
#pragma unroll
        for (int c = 0; c < DCH; c++) acc[rr][c] = 0.0f;
    }

    for (int t0 = 0; t0 < kmax; t0 += BK) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < BK * D; idx += blockDim.x) {
            int r = idx / D, d = idx % D, t = t0 + r;
            float kv = 0.0f, vv = 0.0f;
            if (t < kmax) {
                long s = kv_slot(table, block_size, t) * kv_dim + kvh * D + d;
                kv = kv_load(kpool, s);
                vv = kv_load(vpool, s);
            }
            k_s[r][d] = kv;
            v_s[r][d] = vv;
        }
        __syncthreads();
#pragma unroll
        for (int rr = 0; rr < 4; rr++) {
            int r = warp * 4 + rr, qi = q0 + r;
            if (qi >= n_tokens) continue;  // warp-uniform
            int limit = causal ? first_pos + qi + 1 : total;
            if (t0 >= limit) continue;     // warp-uniform: the whole tile is masked
            int t = t0 + lane;
            float s = NEG_INF;
            if (t < limit) {
                float dot = 0.0f;
                for (int d = 0; d < D; d++) dot += q_s[r][d] * k_s[lane][d];
                s = dot * scale;
            }
            float m_new = fmaxf(m[rr], warp_max(s));
            float p = t < limit ? expf(s - m_new) : 0.0f;
            float alpha = expf(m[rr] - m_new);
            l[rr] = l[rr] * alpha + warp_sum(p);
#pragma unroll
            for (int c = 0; c < DCH; c++) acc[rr][c] *= alpha;
            for (int j = 0; j < BK; j++) {
                float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
                for (int c = 0; c < DCH; c++) {
                    int d = lane + c * WARP;
                    if (d < D) acc[rr][c] += pj * v_s[j][d];
                }
            }
            m[rr] = m_new;
        }
    }
#pragma unroll
    for (int rr = 0; rr < 4; rr++) {
        int qi = q0 + warp * 4 + rr;
        if (qi >= n_tokens) continue;
        float inv = 1.0f / l[rr];
#pragma unroll
        for (int c = 0; c < DCH; c++) {
            int d = lane + c * WARP;
            if (d < D) out[qi * qd + h * D + d] = acc[rr][c] * inv;
        }
    }
}

extern "C" __global__ void attn_prefill(const float *q, const float *kpool, const float *vpool,
                                        const u32 *table, int block_size, int kv_dim,
                                        int n_tokens, int n_heads, int n_kv_heads, int D,
                                        int first_pos, int causal, float scale, float *out) {
    attn_prefill_body(q, kpool, vpool, table, block_size, kv_dim, n_tokens, n_heads,
                      n_kv_heads, D, first_pos, causal, scale, out);
}

extern "C" __global__ void attn_prefill_f16(const float *q, const u16 *kpool, const u16 *vpool,
                                            const u32 *table, int block_size, int kv_dim,
                                            int n_tokens, int n_heads, int n_kv_heads, int D,
                                            int first_pos, int causal, float scale, float *out) {
    attn_prefill_body(q, kpool, vpool, table, block_size, kv_dim, n_tokens, n_heads,
                      n_kv_heads, D, first_pos, causal, scale, out);
}

// Paged decode, split over the sequence: grid (n_heads, n_splits, n_tokens), 128
// threads. Block (h, s, i) covers keys [s * chunk, (s + 1) * chunk) of row i's range;
// each warp takes 32 keys at a time (one per lane, read through the block table),
// and the block writes its unnormalised partial (max, sum, out[D]) to
// ws[((i * n_heads + h) * n_splits + s) * (D + 2)]. attn_decode_combine merges them.
//
// Row i's position: positions[i] when given (device values: a replayed CUDA graph or
// a batched step), else first_pos + i. Its block table: table + table_start[i] when
// table_start is given (a batched step's tables, concatenated), else table. The
// keys a non-causal row attends: seq_end[i] when given (its own sequence's end),
// else the single sequence's end, positions[0] (or first_pos) + n_tokens.
template <typename T>
__device__ __forceinline__ void attn_decode_split_body(
    const float *q, const T *kpool, const T *vpool, const u32 *table, int block_size,
    int kv_dim, int n_tokens, int n_heads, int n_kv_heads, int D, int first_pos,
    const u32 *positions, const u32 *table_start, const u32 *seq_end, int causal, float scale,
    int chunk, float *ws) {
    __shared__ float q_s[MAX_D];
    __shared__ float wm[4], wl[4];
    __shared__ float wacc[4][MAX_D];
    int h = blockIdx.x, split = blockIdx.y, i = blockIdx.z, n_splits = gridDim.y;
    int kvh = h / (n_heads / n_kv_heads);
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    long qd = (long)n_heads * D;
    // Splits past the row's keys write an empty partial (max -inf), which the combine
    // skips, so the grid can be sized for the longest context once.
    int p0 = positions ? (int)positions[0] : first_pos;
    int pos = positions ? (int)positions[i] : first_pos + i;
    int limit = causal ? pos + 1 : (seq_end ? (int)seq_end[i] : p0 + n_tokens);
    if (table_start) table += table_start[i];
    int start = split * chunk, end = min(start + chunk, limit);

    for (int d = threadIdx.x; d < D; d += blockDim.x) q_s[d] = q[i * qd + h * D + d];
    __syncthreads();

    float m = NEG_INF, l = 0.0f, acc[DCH];
#pragma unroll
    for (int c = 0; c < DCH; c++) acc[c] = 0.0f;
    for (int t0 = start + warp * WARP; t0 < end; t0 += 4 * WARP) {
        int t = t0 + lane;
        bool valid = t < end;
        long base = valid ? kv_slot(table, block_size, t) * kv_dim + kvh * D : 0;
        float s = NEG_INF;
        if (valid) {
            float dot = 0.0f;
            for (int d = 0; d < D; d++) dot += q_s[d] * kv_load(kpool, base + d);
            s = dot * scale;
        }
        float m_new = fmaxf(m, warp_max(s));
        float p = valid ? expf(s - m_new) : 0.0f;
        float alpha = expf(m - m_new);
        l = l * alpha + warp_sum(p);
#pragma unroll
        for (int c = 0; c < DCH; c++) acc[c] *= alpha;
        int n_valid = min(WARP, end - t0);
        for (int j = 0; j < n_valid; j++) {
            float pj = __shfl_sync(0xffffffffu, p, j);
            long bj = __shfl_sync(0xffffffffu, base, j);
#pragma unroll
            for (int c = 0; c < DCH; c++) {
                int d = lane + c * WARP;
                if (d < D) acc[c] += pj * kv_load(vpool, bj + d);
            }
        }
        m = m_new;
    }
    if (lane == 0) {
        wm[warp] = m;
        wl[warp] = l;
    }
#pragma unroll
    for (int c = 0; c < DCH; c++) {
        int d = lane + c * WARP;
        if (d < D) wacc[warp][d] = acc[c];
    }
    __syncthreads();
    float M = fmaxf(fmaxf(wm[0], wm[1]), fmaxf(wm[2], wm[3]));
    float f[4];
#pragma unroll
    for (int w = 0; w < 4; w++) f[w] = wm[w] == NEG_INF ? 0.0f : expf(wm[w] - M);
    float *dst = ws + (((long)i * n_heads + h) * n_splits + split) * (D + 2);
    if (threadIdx.x == 0) {
        dst[0] = M;
        dst[1] = wl[0] * f[0] + wl[1] * f[1] + wl[2] * f[2] + wl[3] * f[3];
    }
    for (int d = threadIdx.x; d < D; d += blockDim.x)
        dst[2 + d] = wacc[0][d] * f[0] + wacc[1][d] * f[1] + wacc[2][d] * f[2] +
                     wacc[3][d] * f[3];
}

extern "C" __global__ void attn_decode_split(const float *q, const float *kpool,
                                             const float *vpool, const u32 *table,
                                             int block_size, int kv_dim, int n_tokens,
                                             int n_heads, int n_kv_heads, int D, int first_pos,
                                             const u32 *positions, const u32 *table_start,
                                             const u32 *seq_end, int causal, float scale,
                                             int chunk, float *ws) {
    attn_decode_split_body(q, kpool, vpool, table, block_size, kv_dim, n_tokens, n_heads,
                           n_kv_heads, D, first_pos, positions, table_start, seq_end, causal,
                           scale, chunk, ws);
}

extern "C" __global__ void attn_decode_split_f16(const float *q, const u16 *kpool,
                                                 const u16 *vpool, const u32 *table,
                                                 int block_size, int kv_dim, int n_tokens,
                                                 int n_heads, int n_kv_heads, int D,
                                                 int first_pos, const u32 *positions,
                                                 const u32 *table_start, const u32 *seq_end,
                                                 int causal, float scale, int chunk,
                                                 float *ws) {
    attn_decode_split_body(q, kpool, vpool, table, block_size, kv_dim, n_tokens, n_heads,
                           n_kv_heads, D, first_pos, positions, table_start, seq_end, causal,
                           scale, chunk, ws);
}

// Merges the splits: grid (n_heads, n_tokens), 128 threads.
extern "C" __global__ void attn_decode_combine(const float *ws, int n_splits, int n_heads,
                                               int D, float *out) {
    int h = blockIdx.x, i = blockIdx.y;
    const float *src = ws + ((long)i * n_heads + h) * n_splits * (D + 2);
    float M = NEG_INF;
    for (int s = 0; s < n_splits; s++) M = fmaxf(M, src[s * (D + 2)]);
    float L = 0.0f;
    for (int s = 0; s < n_splits; s++) {
        float ms = src[s * (D + 2)];
        if (ms != NEG_INF) L += src[s * (D + 2) + 1] * expf(ms - M);
    }
    float inv = 1.0f / L;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float a = 0.0f;
        for (int s = 0; s < n_splits; s++) {
            float ms = src[s * (D + 2)];
            if (ms != NEG_INF) a += src[s * (D + 2) + 2 + d] * expf(ms - M);
        }
        out[((long)i * n_heads + h) * D + d] = a * inv;
    }
}
