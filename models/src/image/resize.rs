//! Pillow's convolution resampler (`ImagingResample` in `libImaging/Resample.c`) for
//! 8-bit RGB, reimplemented so that our pixels equal `Image.resize(size, resample)`
//! bit for bit: the coefficients are computed with the same f64 arithmetic and
//! truncations, converted to the same 22-bit fixed point, and applied in the same
//! order (a horizontal pass rounded to u8, then a vertical pass). Summation order
//! inside a pass does not matter because the sums are exact integers.

use super::RgbImage;

/// A Pillow convolution filter (`Image.Resampling`), named as in `image.resample`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    /// PIL `BOX` (4).
    Box,
    /// PIL `BILINEAR` (2).
    Bilinear,
    /// PIL `HAMMING` (5).
    Hamming,
    /// PIL `BICUBIC` (3): Keys cubic with a = -0.5.
    Bicubic,
    /// PIL `LANCZOS` (1): Lanczos-3.
    Lanczos,
}

impl Resample {
    /// Names accepted by [`Resample::from_name`] (PIL's names, lower case).
    pub const NAMES: [&'static str; 5] = ["box", "bilinear", "hamming", "bicubic", "lanczos"];

    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "box" => Resample::Box,
            "bilinear" => Resample::Bilinear,
            "hamming" => Resample::Hamming,
            "bicubic" => Resample::Bicubic,
            "lanczos" => Resample::Lanczos,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Resample::Box => "box",
            Resample::Bilinear => "bilinear",
            Resample::Hamming => "hamming",
            Resample::Bicubic => "bicubic",
            Resample::Lanczos => "lanczos",
        }
    }

    fn support(self) -> f64 {
        match self {
            Resample::Box => 0.5,
            Resample::Bilinear | Resample::Hamming => 1.0,
            Resample::Bicubic => 2.0,
            Resample::Lanczos => 3.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        match self {
            Resample::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Resample::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Resample::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    // Pillow writes these constants as C floats, so they are the f32 values.
                    x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
                }
            }
            Resample::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Resample::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// 8 result bits plus 2 bits of headroom for negative lobes and overshoot in an i32.
const PRECISION_BITS: u32 = 32 - 8 - 2;
const HALF: i32 = 1 << (PRECISION_BITS - 1);

#[inline(always)]
fn clip8(acc: i32) -> u8 {
    // Arithmetic shift = floor, as Pillow's `in >> PRECISION_BITS` on a signed int.
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Fixed-point weights of one axis: output `i` reads `len[i]` inputs from `start[i]`
/// with weights `k[i * ksize ..][.. len[i]]`.
struct Coeffs {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    k: Vec<i32>,
}

impl Coeffs {
    /// `precompute_coeffs` + `normalize_coeffs_8bpc` for the box (0, in_size).
    fn new(in_size: usize, out_size: usize, filter: Resample) -> Coeffs {
        // Pillow passes the box edges as C floats and subtracts them in float.
        let scale = f64::from(in_size as f32) / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut start = Vec::with_capacity(out_size);
        let mut len = Vec::with_capacity(out_size);
        let mut k = vec![0i32; out_size * ksize];
        let mut w = vec![0f64; ksize];
        let in_max = i64::try_from(in_size).unwrap_or(i64::MAX);
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // `(int)` truncates toward zero; Rust's `as` does too (and saturates).
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_max);
            let n = (xmax - xmin).clamp(0, ksize as i64) as usize;
            let xmin = xmin as usize;
            let mut ww = 0.0;
            for (x, wx) in w.iter_mut().enumerate().take(n) {
                let v = filter.eval(((x + xmin) as f64 - center + 0.5) * ss);
                *wx = v;
                ww += v;
            }
            let row = &mut k[xx * ksize..][..n];
            for (kx, &wx) in row.iter_mut().zip(&w[..n]) {
                let wx = if ww != 0.0 { wx / ww } else { wx };
                let scaled = wx * f64::from(1u32 << PRECISION_BITS);
                *kx = if wx < 0.0 {
                    (-0.5 + scaled) as i32
                } else {
                    (0.5 + scaled) as i32
                };
            }
            start.push(xmin);
            len.push(n);
        }
        Coeffs {
            ksize,
            start,
            len,
            k,
        }
    }

    fn taps(&self, i: usize) -> (usize, &[i32]) {
        (self.start[i], &self.k[i * self.ksize..][..self.len[i]])
    }
}

/// Rows of an RGB image that may be virtual (e.g. padded), produced on demand.
pub(crate) trait RowSource {
    fn width(&self) -> usize;
    fn height(&self) -> usize;
    /// Row `y` as RGB bytes followed by at least one more byte of any value, so
    /// the filters can load each pixel as 4 bytes. Borrowed from the image where
    /// possible, otherwise built in `scratch`.
    fn row<'s>(&'s self, y: usize, scratch: &'s mut Vec<u8>) -> &'s [u8];
    /// Rows for which this returns true are all identical (a constant pad colour),
    /// so their horizontal pass is computed once.
    fn is_uniform_row(&self, _y: usize) -> bool {
        false
    }
}

impl RowSource for RgbImage {
    fn width(&self) -> usize {
        self.width() as usize
    }
    fn height(&self) -> usize {
        self.height() as usize
    }
    fn row<'s>(&'s self, y: usize, scratch: &'s mut Vec<u8>) -> &'s [u8] {
        let n = self.width() as usize * 3;
        let data = self.as_raw();
        // The next row's first byte serves as the slack byte, except after the last row.
        match data.get(y * n..y * n + n + 1) {
            Some(r) => r,
            None => {
                scratch.clear();
                scratch.extend_from_slice(&data[y * n..y * n + n]);
                scratch.push(0);
                scratch
            }
        }
    }
}

/// `image` pasted on a square canvas of `pad` colour, as LLaVA's `expand2square`.
pub(crate) struct PaddedSquare<'a> {
    image: &'a RgbImage,
    side: usize,
    ox: usize,
    oy: usize,
    pad: [u8; 3],
}

impl<'a> PaddedSquare<'a> {
    pub(crate) fn new(image: &'a RgbImage, pad: [u8; 3]) -> Self {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let side = w.max(h);
        // PIL paste offsets: the shorter axis is centred, rounding the offset down.
        let (ox, oy) = if w > h {
            (0, (w - h) / 2)
        } else {
            ((h - w) / 2, 0)
        };
        PaddedSquare {
            image,
            side,
            ox,
            oy,
            pad,
        }
    }
}

impl RowSource for PaddedSquare<'_> {
    fn width(&self) -> usize {
        self.side
    }
    fn height(&self) -> usize {
        self.side
    }
    fn row<'s>(&'s self, y: usize, scratch: &'s mut Vec<u8>) -> &'s [u8] {
        let w = self.image.width() as usize;
        let in_image = y >= self.oy && y < self.oy + self.image.height() as usize;
        if in_image && self.ox == 0 && w == self.side {
            return self.image.row(y - self.oy, scratch);
        }
        scratch.clear();
        let pad = |scratch: &mut Vec<u8>, n: usize| {
            for _ in 0..n {
                scratch.extend_from_slice(&self.pad);
            }
        };
        if in_image {
            let n = w * 3;
            pad(scratch, self.ox);
            let r = y - self.oy;
            scratch.extend_from_slice(&self.image.as_raw()[r * n..r * n + n]);
            pad(scratch, self.side - self.ox - w);
        } else {
            pad(scratch, self.side);
        }
        scratch.push(0);
        scratch
    }
    fn is_uniform_row(&self, y: usize) -> bool {
        y < self.oy || y >= self.oy + self.image.height() as usize
    }
}

/// `R` rows of the horizontal pass at once (they share the coefficients, so one
/// vector multiply serves several rows). `srcs` are RGB + slack, `outs` RGB.
#[inline(always)]
fn horizontal_rows<const R: usize>(srcs: [&[u8]; R], coeffs: &Coeffs, outs: [&mut [u8]; R]) {
    let out_w = coeffs.start.len();
    for xx in 0..out_w {
        let (xmin, k) = coeffs.taps(xx);
        let mut acc = [[HALF; 4]; R];
        for r in 0..R {
            // 4-byte windows at a 3-byte stride: RGB plus one ignored byte.
            let px = &srcs[r][xmin * 3..xmin * 3 + k.len() * 3 + 1];
            for (q, &w) in px.windows(4).step_by(3).zip(k) {
                let q: [u8; 4] = q.try_into().unwrap_or_default();
                for c in 0..4 {
                    acc[r][c] = acc[r][c].wrapping_add(i32::from(q[c]).wrapping_mul(w));
                }
            }
        }
        for r in 0..R {
            let o = &mut outs[r][xx * 3..xx * 3 + 3];
            o[0] = clip8(acc[r][0]);
            o[1] = clip8(acc[r][1]);
            o[2] = clip8(acc[r][2]);
        }
    }
}

/// One output row of the vertical pass: `rows[t]` is input row `start + t` of the
/// taps; bytes are filtered independently, whatever the pixel layout.
#[inline(always)]
fn vertical_row(k: &[i32], rows: &[&[u8]], acc: &mut [i32], out: &mut [u8]) {
    acc.fill(HALF);
    for (&w, row) in k.iter().zip(rows) {
        for (a, &p) in acc.iter_mut().zip(row.iter()) {
            *a = a.wrapping_add(i32::from(p).wrapping_mul(w));
        }
    }
    for (o, &a) in out.iter_mut().zip(acc.iter()) {
        *o = clip8(a);
    }
}

/// Resizes `src` to `out_w` x `out_h` exactly as Pillow's `Image.resize` does for
/// an RGB image (no `box`, no `reducing_gap`).
///
/// Pass order follows Pillow 13 (python-pillow/Pillow#9549): vertical first when
/// the height shrinks by more than twice as many pixels as the width does,
/// otherwise horizontal first (the only order of Pillow <= 12). The two orders
/// round differently in between, so this matters for exactness; square to square,
/// the preprocessing case, is horizontal first in every version.
pub(crate) fn resample<S: RowSource + ?Sized>(
    src: &S,
    out_w: usize,
    out_h: usize,
    filter: Resample,
) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { resample_avx2(src, out_w, out_h, filter) };
    }
    resample_body(src, out_w, out_h, filter)
}

/// The same code compiled with AVX2, whose 32-bit vector multiply the baseline
/// x86-64 target (SSE2) lacks; integer results are identical by construction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn resample_avx2<S: RowSource + ?Sized>(
    src: &S,
    out_w: usize,
    out_h: usize,
    filter: Resample,
) -> Vec<u8> {
    resample_body(src, out_w, out_h, filter)
}

#[inline(always)]
fn resample_body<S: RowSource + ?Sized>(
    src: &S,
    out_w: usize,
    out_h: usize,
    filter: Resample,
) -> Vec<u8> {
    let (in_w, in_h) = (src.width(), src.height());
    if out_w == 0 || out_h == 0 || in_w == 0 || in_h == 0 {
        return vec![0; out_w * out_h * 3];
    }
    let need_h = out_w != in_w;
    let need_v = out_h != in_h;
    let shrink_w = in_w as i64 - out_w as i64;
    let shrink_h = in_h as i64 - out_h as i64;
    if need_h && need_v && shrink_h > 0 && shrink_h > 2 * shrink_w {
        vertical_first(src, out_w, out_h, filter)
    } else {
        horizontal_first(src, out_w, out_h, need_h, need_v, filter)
    }
}

#[inline(always)]
fn horizontal_first<S: RowSource + ?Sized>(
    src: &S,
    out_w: usize,
    out_h: usize,
    need_h: bool,
    need_v: bool,
    filter: Resample,
) -> Vec<u8> {
    let (in_w, in_h) = (src.width(), src.height());
    let vert = need_v.then(|| Coeffs::new(in_h, out_h, filter));
    // Only the source rows some output row reads go through the horizontal pass.
    let (first, last) = match &vert {
        Some(v) => {
            let last = v.start[out_h - 1] + v.len[out_h - 1];
            (v.start[0], last.max(v.start[0]))
        }
        None => (0, in_h),
    };

    // Horizontal pass (a plain copy when the width is unchanged) into RGB rows.
    let stride = out_w * 3;
    let mut tmp = vec![0u8; (last - first) * stride];
    let (mut s0, mut s1) = (Vec::new(), Vec::new());
    match need_h.then(|| Coeffs::new(in_w, out_w, filter)) {
        None => {
            for (y, out) in (first..last).zip(tmp.chunks_exact_mut(stride)) {
                out.copy_from_slice(&src.row(y, &mut s0)[..stride]);
            }
        }
        Some(horiz) => {
            let mut uniform: Option<usize> = None;
            let mut pending: Option<(usize, &mut [u8])> = None;
            let mut copies = Vec::new();
            for (y, out) in (first..last).zip(tmp.chunks_exact_mut(stride)) {
                if src.is_uniform_row(y) {
                    if uniform.is_some() {
                        copies.push(y);
                        continue;
                    }
                    uniform = Some(y);
                }
                match pending.take() {
                    None => pending = Some((y, out)),
                    Some((y0, out0)) => {
                        let a = src.row(y0, &mut s0);
                        let b = src.row(y, &mut s1);
                        horizontal_rows([a, b], &horiz, [out0, out]);
                    }
                }
            }
            if let Some((y0, out0)) = pending {
                horizontal_rows([src.row(y0, &mut s0)], &horiz, [out0]);
            }
            // Later uniform rows copy the first one's result.
            if let Some(u) = uniform {
                let from = (u - first) * stride;
                let value = tmp[from..from + stride].to_vec();
                for y in copies {
                    let to = (y - first) * stride;
                    tmp[to..to + stride].copy_from_slice(&value);
                }
            }
        }
    }
    let Some(vert) = vert else {
        return tmp;
    };

    let mut dst = vec![0u8; stride * out_h];
    let mut acc = vec![0i32; stride];
    let mut rows: Vec<&[u8]> = Vec::with_capacity(vert.ksize);
    for (yy, out) in dst.chunks_exact_mut(stride).enumerate() {
        let (ymin, k) = vert.taps(yy);
        rows.clear();
        rows.extend((0..k.len()).map(|t| &tmp[(ymin - first + t) * stride..][..stride]));
        vertical_row(k, &rows, &mut acc, out);
    }
    dst
}

/// Only reached when both passes are needed and the height shrinks.
#[inline(always)]
fn vertical_first<S: RowSource + ?Sized>(
    src: &S,
    out_w: usize,
    out_h: usize,
    filter: Resample,
) -> Vec<u8> {
    let (in_w, in_h) = (src.width(), src.height());
    let vert = Coeffs::new(in_h, out_h, filter);
    let horiz = Coeffs::new(in_w, out_w, filter);
    let n = in_w * 3;
    let mut scratch: Vec<Vec<u8>> = vec![Vec::new(); vert.ksize];
    // RGB plus the slack byte the horizontal pass reads past the last pixel.
    let mut mid = vec![0u8; n + 1];
    let mut acc = vec![0i32; n];
    let mut dst = vec![0u8; out_w * 3 * out_h];
    for (yy, out) in dst.chunks_exact_mut(out_w * 3).enumerate() {
        let (ymin, k) = vert.taps(yy);
        let rows: Vec<&[u8]> = scratch
            .iter_mut()
            .take(k.len())
            .enumerate()
            .map(|(t, s)| &src.row(ymin + t, s)[..n])
            .collect();
        vertical_row(k, &rows, &mut acc, &mut mid[..n]);
        horizontal_rows([&mid[..]], &horiz, [out]);
    }
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(451, 42), (40, 56), (7, 3), (3, 7), (4000, 384)] {
            let c = Coeffs::new(i, o, Resample::Bicubic);
            for x in 0..o {
                let (_, k) = c.taps(x);
                let s: i64 = k.iter().map(|&v| i64::from(v)).sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{i}->{o} @{x}: {s}"
                );
            }
        }
    }

    /// `resample` may dispatch to the AVX2 build; the plain build must agree.
    #[test]
    fn portable_path_matches_dispatched_path() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for (w, h, ow, oh) in [
            (37, 23, 11, 9),
            (9, 40, 30, 5),
            (5, 7, 16, 13),
            (64, 3, 64, 9),
        ] {
            let data = (0..w * h * 3).map(|_| (next() >> 40) as u8).collect();
            let img = RgbImage::new(w, h, data).unwrap();
            for filter in [Resample::Bicubic, Resample::Lanczos, Resample::Box] {
                let (ow, oh) = (ow as usize, oh as usize);
                assert_eq!(
                    resample(&img, ow, oh, filter),
                    resample_body(&img, ow, oh, filter),
                    "{w}x{h} -> {ow}x{oh} {filter:?}"
                );
                let sq = PaddedSquare::new(&img, [127, 0, 255]);
                assert_eq!(
                    resample(&sq, ow, oh, filter),
                    resample_body(&sq, ow, oh, filter)
                );
            }
        }
    }

    #[test]
    fn same_size_is_identity() {
        let img = RgbImage::new(3, 2, (0..18).collect()).unwrap();
        assert_eq!(resample(&img, 3, 2, Resample::Bicubic), img.as_raw());
    }
}
