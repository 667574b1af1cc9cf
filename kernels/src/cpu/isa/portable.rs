//! The baseline level: `wide::f32x8` for [`Simd`] (whatever the build targets:
//! SSE2 on x86-64, NEON on aarch64) and plain 16-lane arrays for [`Panel`],
//! which the compiler auto-vectorizes. No run-time check needed.

use half::f16;
use wide::{f32x8, u32x8};

use super::{Cpu, Kernel, Panel, Simd};

/// The token of `Level::Portable`.
#[derive(Clone, Copy)]
pub(crate) struct Portable;

impl Cpu for Portable {
    #[inline(always)]
    unsafe fn new() -> Self {
        Portable
    }
    #[inline(always)]
    unsafe fn enter<K: Kernel>(self, k: K) -> K::Out {
        k.run(self)
    }
}

impl Simd for Portable {
    type V = f32x8;
    const LANES: usize = 8;
    #[inline(always)]
    fn zero(self) -> f32x8 {
        f32x8::ZERO
    }
    #[inline(always)]
    fn splat(self, x: f32) -> f32x8 {
        f32x8::splat(x)
    }
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> f32x8 {
        f32x8::new(p.cast::<[f32; 8]>().read_unaligned())
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: f32x8) {
        p.cast::<[f32; 8]>().write_unaligned(v.to_array())
    }
    #[inline(always)]
    unsafe fn load_h(self, p: *const f16) -> f32x8 {
        widen8(p.cast::<[u16; 8]>().read_unaligned())
    }
    #[inline(always)]
    unsafe fn store_h(self, p: *mut f16, v: f32x8) {
        p.cast::<[f16; 8]>()
            .write_unaligned(v.to_array().map(f16::from_f32))
    }
    #[inline(always)]
    fn add(self, a: f32x8, b: f32x8) -> f32x8 {
        a + b
    }
    #[inline(always)]
    fn sub(self, a: f32x8, b: f32x8) -> f32x8 {
        a - b
    }
    #[inline(always)]
    fn mul(self, a: f32x8, b: f32x8) -> f32x8 {
        a * b
    }
    #[inline(always)]
    fn max(self, a: f32x8, b: f32x8) -> f32x8 {
        b.is_nan().select(b, a.max(b))
    }
    #[inline(always)]
    fn fma(self, a: f32x8, b: f32x8, c: f32x8) -> f32x8 {
        a.mul_add(b, c)
    }
    #[inline(always)]
    fn exp(self, x: f32x8) -> f32x8 {
        x.exp()
    }
    #[inline(always)]
    fn mask_after(self, x: f32x8, pos: f32x8, key: f32) -> f32x8 {
        pos.simd_lt(f32x8::splat(key))
            .select(f32x8::splat(f32::NEG_INFINITY), x)
    }
    #[inline(always)]
    fn reduce_add(self, v: f32x8) -> f32 {
        v.reduce_add()
    }
    #[inline(always)]
    fn reduce_max(self, v: f32x8) -> f32 {
        v.to_array().into_iter().fold(f32::NEG_INFINITY, f32::max)
    }
}

/// Eight f16 (bits) widened exactly as `f16::to_f32` does (NaNs quieted,
/// payload kept), in vector integer ops. `half`'s conversion is a call per
/// element: with it, portable f16 decode ran 3.5 times as long as f32; with
/// this, 1.5 to 2 times (SSE2 has no conversion instruction).
#[inline(always)]
fn widen8(h: [u16; 8]) -> f32x8 {
    let c = u32x8::splat;
    let h = u32x8::new([
        h[0] as u32,
        h[1] as u32,
        h[2] as u32,
        h[3] as u32,
        h[4] as u32,
        h[5] as u32,
        h[6] as u32,
        h[7] as u32,
    ]);
    let em = (h & c(0x7fff)) << 13u32;
    let exp = em & c(0x7c00 << 13);
    // Rebiased exponent: right for normal numbers.
    let normal = em + c((127 - 15) << 23);
    // All-ones exponent; a NaN gets the quiet bit.
    let quiet = (em & c(0x007f_ffff))
        .simd_eq(c(0))
        .select(c(0), c(0x0040_0000));
    let inf_nan = (normal + c((128 - 16) << 23)) | quiet;
    // Zero and subnormals: 2^-14 * (1 + m) - 2^-14 in f32 is exact.
    let small: u32x8 = bytemuck::cast(
        bytemuck::cast::<u32x8, f32x8>(normal + c(1 << 23)) - f32x8::splat(6.103_515_6e-5),
    );
    let r = exp
        .simd_eq(c(0x7c00 << 13))
        .select(inf_nan, exp.simd_eq(c(0)).select(small, normal));
    bytemuck::cast(r | ((h & c(0x8000)) << 16u32))
}

impl Panel for Portable {
    type I = [i32; 16];
    type F = [f32; 16];
    type W = [i32; 16];
    const FLOAT_MR: usize = 4;
    const INT8_MR: usize = 2;
    const Q8_UNSIGNED: bool = true;
    #[inline(always)]
    unsafe fn fzero() -> [f32; 16] {
        [0.0; 16]
    }
    #[inline(always)]
    unsafe fn izero() -> [i32; 16] {
        [0; 16]
    }
    #[inline(always)]
    unsafe fn bcast_i32(p: *const i32) -> [i32; 16] {
        [*p; 16]
    }
    #[inline(always)]
    unsafe fn load_q(p: *const u8) -> [i32; 16] {
        std::ptr::read_unaligned(p as *const [i32; 16])
    }
    #[inline(always)]
    unsafe fn nibbles(v: [i32; 16]) -> ([i32; 16], [i32; 16]) {
        (
            v.map(|x| x & 0x0f0f_0f0f),
            v.map(|x| (x >> 4) & 0x0f0f_0f0f),
        )
    }
    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> [i32; 16] {
        [std::ptr::read_unaligned(p as *const i32); 16]
    }
    #[inline(always)]
    unsafe fn dot_us(acc: [i32; 16], u: [i32; 16], s: [i32; 16]) -> [i32; 16] {
        std::array::from_fn(|l| {
            let (u, s) = (u[l].to_le_bytes(), s[l].to_le_bytes());
            acc[l] + (0..4).map(|t| u[t] as i32 * s[t] as i8 as i32).sum::<i32>()
        })
    }
    #[inline(always)]
    unsafe fn q8_prep(wu: [i32; 16]) -> [i32; 16] {
        wu
    }
    #[inline(always)]
    unsafe fn q8_dot(acc: [i32; 16], w: [i32; 16], x: [i32; 16]) -> [i32; 16] {
        Self::dot_us(acc, w, x)
    }
    #[inline(always)]
    unsafe fn iadd(a: [i32; 16], b: [i32; 16]) -> [i32; 16] {
        std::array::from_fn(|l| a[l] + b[l])
    }
    #[inline(always)]
    unsafe fn scales(p: *const u8) -> [f32; 16] {
        let h: [u16; 16] = std::ptr::read_unaligned(p as *const [u16; 16]);
        h.map(|v| f16::from_bits(v).to_f32())
    }
    #[inline(always)]
    unsafe fn fma_block(
        facc: [f32; 16],
        acc: [i32; 16],
        dw: [f32; 16],
        dx: *const f32,
    ) -> [f32; 16] {
        let dx = *dx;
        std::array::from_fn(|l| (acc[l] as f32).mul_add(dw[l] * dx, facc[l]))
    }
    #[inline(always)]
    unsafe fn weights_f16(p: *const u8) -> [f32; 16] {
        let h: [u16; 16] = std::ptr::read_unaligned(p as *const [u16; 16]);
        h.map(|v| f16::from_bits(v).to_f32())
    }
    #[inline(always)]
    unsafe fn bf16_pair(p: *const u8) -> ([f32; 16], [f32; 16]) {
        let v: [u32; 16] = std::ptr::read_unaligned(p as *const [u32; 16]);
        (
            v.map(|v| f32::from_bits(v << 16)),
            v.map(|v| f32::from_bits(v & 0xffff_0000)),
        )
    }
    #[inline(always)]
    unsafe fn bcast_f32(x: *const f32) -> [f32; 16] {
        [*x; 16]
    }
    #[inline(always)]
    unsafe fn fmadd(a: [f32; 16], b: [f32; 16], c: [f32; 16]) -> [f32; 16] {
        std::array::from_fn(|l| a[l].mul_add(b[l], c[l]))
    }
    #[inline(always)]
    unsafe fn fadd(a: [f32; 16], b: [f32; 16]) -> [f32; 16] {
        std::array::from_fn(|l| a[l] + b[l])
    }
    #[inline(always)]
    unsafe fn load_f(p: *const f32) -> [f32; 16] {
        std::ptr::read_unaligned(p as *const [f32; 16])
    }
    #[inline(always)]
    unsafe fn store_f(p: *mut f32, v: [f32; 16]) {
        std::ptr::write_unaligned(p as *mut [f32; 16], v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable widening against `half` for every f16 bit pattern.
    #[test]
    fn portable_f16_widening_is_exact() {
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        for (i, c) in all.chunks_exact(8).enumerate() {
            // SAFETY: `c` holds 8 halves.
            let got = unsafe { Portable.load_h(c.as_ptr()) }.to_array();
            for (j, (g, h)) in got.iter().zip(c).enumerate() {
                assert_eq!(g.to_bits(), h.to_f32().to_bits(), "f16 {:#06x}", i * 8 + j);
            }
        }
    }
}
