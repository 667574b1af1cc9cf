// Shared helpers, prepended to every .cu file of this folder before NVRTC compiles it
// (so no include path and no CUDA headers are needed). Every kernel is
// `extern "C"` so the Rust side loads it by its plain name.
//
// Storage formats, byte for byte as kernels/src/quant.rs defines them:
//   F16/BF16: little-endian 16-bit words (f16 K/V pools too).
//   Q8_0: 34-byte blocks of 32 elements: f16 d, then 32 x i8 q; value d * q.
//   Q4_0: 18-byte blocks of 32 elements: f16 d, then 16 bytes; the low nibble of
//         byte j is element j, the high nibble element j + 16; value d * (q - 8).
// Row strides are whole blocks (rows padded with zero elements), and a block starts
// at a 2-byte boundary only, so blocks are read with 16-bit and 8-bit loads.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;

#define QK 32
#define Q8_BYTES 34
#define Q4_BYTES 18
#define WARP 32
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// K/V pool elements (KvDtype): f32, or IEEE f16 kept as raw 16-bit words. Stored
// rounded to nearest even (cvt.rn, as half::f16::from_f32 on the CPU), read widened
// exactly, so attention computes in f32 on the same values as the CPU's.
__device__ __forceinline__ float kv_load(const float *p, long i) { return p[i]; }
__device__ __forceinline__ float kv_load(const u16 *p, long i) { return h2f(p[i]); }
__device__ __forceinline__ void kv_put(float *p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void kv_put(u16 *p, long i, float v) { p[i] = f2h(v); }

__device__ __forceinline__ float bf2f(u16 b) {
    return __uint_as_float(((u32)b) << 16);
}

__device__ __forceinline__ u16 ld16(const u8 *p) {
    return *(const u16 *)p;  // callers only pass 2-byte aligned addresses
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    __shared__ float total;
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) part[w] = v;
    __syncthreads();
    if (w == 0) {
        float s = lane < (int)(blockDim.x / WARP) ? part[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

__device__ float block_max(float v) {
    __shared__ float part[32];
    __shared__ float total;
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) part[w] = v;
    __syncthreads();
    if (w == 0) {
        float s = lane < (int)(blockDim.x / WARP) ? part[lane] : NEG_INF;
        s = warp_max(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

// Element `i` of a stored row, as f32. `ty`: 0 f32, 1 f16, 2 bf16, 8 q8_0, 9 q4_0
// (the .mqf ids).
__device__ __forceinline__ float load_elem(const u8 *row, int ty, long i) {
    switch (ty) {
    case 0: return ((const float *)row)[i];
    case 1: return h2f(((const u16 *)row)[i]);
    case 2: return bf2f(((const u16 *)row)[i]);
    case 8: {
        const u8 *b = row + (i / QK) * Q8_BYTES;
        return h2f(ld16(b)) * (float)(i8)b[2 + i % QK];
    }
    default: {
        const u8 *b = row + (i / QK) * Q4_BYTES;
        int j = i % QK;
        u8 byte = b[2 + (j & 15)];
        int q = j < 16 ? (byte & 15) : (byte >> 4);
        return h2f(ld16(b)) * (float)(q - 8);
    }
    }
}
