// Row-wise and elementwise ops. Activations are f32, row-major.

// LayerNorm with bias (biased variance, as torch), one block per row; two passes
// over the row in f32 (mean, then the centred sum of squares).
extern "C" __global__ void layer_norm(const float *x, const float *w, const float *b,
                                      float *out, int cols, float eps) {
    const float *xr = x + (long)blockIdx.x * cols;
    float *orow = out + (long)blockIdx.x * cols;
    float s = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) s += xr[i];
    float mean = block_sum(s) / cols;
    float v = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float d = xr[i] - mean;
        v += d * d;
    }
    float inv = rsqrtf(block_sum(v) / cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x)
        orow[i] = (xr[i] - mean) * inv * w[i] + b[i];
}

// tanh GELU as x / (1 + e^{-2u}) (no cancellation in the left tail), like the
// reference.
__device__ __forceinline__ float gelu_tanh_f(float a) {
    const float c = 0.7978845608028654f;  // sqrt(2/pi)
    float u = c * (a + 0.044715f * a * a * a);
    return a / (1.0f + expf(-2.0f * u));
}

// erf GELU through erfc for negative inputs (relative accuracy in the left tail).
__device__ __forceinline__ float gelu_erf_f(float a) {
    float z = a * 0.7071067811865476f;
    float phi = z >= 0.0f ? 0.5f * (1.0f + erff(z)) : 0.5f * erfcf(-z);
    return a * phi;
}

// x[r, c] = gelu(x[r, c] + bias[c]); `has_bias` 0 skips the add (bias then unread).
extern "C" __global__ void bias_gelu_tanh(float *x, const float *bias, int has_bias,
                                          long n, int cols) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n;
         i += (long)gridDim.x * blockDim.x) {
        float v = x[i] + (has_bias ? bias[i % cols] : 0.0f);
        x[i] = gelu_tanh_f(v);
    }
}

extern "C" __global__ void bias_gelu_erf(float *x, const float *bias, int has_bias, long n,
                                         int cols) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n;
         i += (long)gridDim.x * blockDim.x) {
        float v = x[i] + (has_bias ? bias[i % cols] : 0.0f);
        x[i] = gelu_erf_f(v);
    }
}

// dst += src
extern "C" __global__ void add_assign(float *dst, const float *src, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n;
         i += (long)gridDim.x * blockDim.x)
        dst[i] += src[i];
}

// Row t of x += row t of table (f32), rows of `cols`.
extern "C" __global__ void add_rows(float *x, const float *table, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n;
         i += (long)gridDim.x * blockDim.x)
        x[i] += table[i];
}

// Softmax of each row of `cols`, in place, one block per row. A row that is all
// -inf becomes zeros.
extern "C" __global__ void softmax_rows(float *x, int cols) {
    float *r = x + (long)blockIdx.x * cols;
    float m = NEG_INF;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, r[i]);
    m = block_max(m);
    if (m == NEG_INF) {
        for (int i = threadIdx.x; i < cols; i += blockDim.x) r[i] = 0.0f;
        return;
    }
    float s = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float e = expf(r[i] - m);
        r[i] = e;
        s += e;
    }
    float inv = 1.0f / block_sum(s);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) r[i] *= inv;
}

// Partial rotate-half (NeoX) rotary embedding in place. x is [T, n_heads * head_dim];
// grid (T, n_heads), one thread per rotated pair. Angles in f64, like the reference
// (positions reach thousands; an f32 angle would be off by ~1e-4 rad).
extern "C" __global__ void rope_partial(float *x, const u32 *positions, int n_heads,
                                        int head_dim, int rot_dims, float theta) {
    int t = blockIdx.x, h = blockIdx.y;
    int half_dims = rot_dims / 2;
    float *head = x + ((long)t * n_heads + h) * head_dim;
    double pos = (double)positions[t];
    for (int j = threadIdx.x; j < half_dims; j += blockDim.x) {
        double inv_freq = pow((double)theta, -2.0 * j / (double)rot_dims);
        double s, c;
        sincos(pos * inv_freq, &s, &c);
        double x1 = head[j], x2 = head[half_dims + j];
        head[j] = (float)(x1 * c - x2 * s);
        head[half_dims + j] = (float)(x2 * c + x1 * s);
    }
}

// out[t, :] = row ids[t] of the table (stored type `ty`, `row_stride` bytes a row),
// dequantized. One block per id; ids are checked on the host.
// An id past `rows` (never passed by the wrappers, which check on the host) gives a
// NaN row instead of a read outside the table.
extern "C" __global__ void embedding(const u8 *table, int ty, long row_stride, const u32 *ids,
                                     float *out, int cols, int rows) {
    u32 id = ids[blockIdx.x];
    float *o = out + (long)blockIdx.x * cols;
    if (id >= (u32)rows) {
        for (int i = threadIdx.x; i < cols; i += blockDim.x) o[i] = __int_as_float(0x7fc00000);
        return;
    }
    const u8 *row = table + (long)id * row_stride;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) o[i] = load_elem(row, ty, i);
}

// Weight rows (stored type `ty`) to a dense f16 matrix [rows, cols] for cuBLAS.
// Grid-stride over every element.
extern "C" __global__ void dequant_to_f16(const u8 *w, int ty, long row_stride, u16 *out,
                                          long rows, int cols) {
    long n = rows * cols;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n;
         i += (long)gridDim.x * blockDim.x) {
        long r = i / cols;
        int c = i % cols;
        out[i] = f2h(load_elem(w + r * row_stride, ty, c));
    }
}

// f32 activations to f16 (the GEMM's A operand).
extern "C" __global__ void f32_to_f16(const float *x, u16 *out, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n;
         i += (long)gridDim.x * blockDim.x)
        out[i] = f2h(x[i]);
}

// out[r, c] += bias[c] (after a cuBLAS GEMM).
extern "C" __global__ void add_bias(float *out, const float *bias, long n, int cols) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n;
         i += (long)gridDim.x * blockDim.x)
        out[i] += bias[i % cols];
}

// Appends rows to a paged KV pool: row i of src ([n, d]) goes to the slot of its
// sequence position p -- positions[i] (device positions: replayed graphs, batched
// steps) or first_pos + i when positions is null -- through its sequence's block
// table: table + table_start[i] when table_start is given (a batched step's tables,
// concatenated), else table. Slot: tab[p / block_size] * block_size + p % block_size.
// f16 pools store each value rounded to nearest even. Grid-stride over n * d.
template <typename T>
__device__ __forceinline__ void kv_scatter_body(const float *src, T *pool, const u32 *table,
                                                int block_size, int first_pos,
                                                const u32 *positions, const u32 *table_start,
                                                int n, int d) {
    long total = (long)n * d;
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < total;
         e += (long)gridDim.x * blockDim.x) {
        int i = e / d, c = e % d;
        int p = positions ? (int)positions[i] : first_pos + i;
        const u32 *tab = table_start ? table + table_start[i] : table;
        long slot = (long)tab[p / block_size] * block_size + p % block_size;
        kv_put(pool, slot * d + c, src[e]);
    }
}

extern "C" __global__ void kv_scatter(const float *src, float *pool, const u32 *table,
                                      int block_size, int first_pos, const u32 *positions,
                                      const u32 *table_start, int n, int d) {
    kv_scatter_body(src, pool, table, block_size, first_pos, positions, table_start, n, d);
}

extern "C" __global__ void kv_scatter_f16(const float *src, u16 *pool, const u32 *table,
                                          int block_size, int first_pos, const u32 *positions,
                                          const u32 *table_start, int n, int d) {
    kv_scatter_body(src, pool, table, block_size, first_pos, positions, table_start, n, d);
}
