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
    /// Writes row `y` as RGBX (4 bytes per pixel, X unused) into `out` (`width * 4`).
    fn fill_row(&self, y: usize, out: &mut [u8]);
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
    fn fill_row(&self, y: usize, out: &mut [u8]) {
        let w = RowSource::width(self);
        let src = &self.as_raw()[y * w * 3..][..w * 3];
        for (o, s) in out.chunks_exact_mut(4).zip(src.chunks_exact(3)) {
            o[..3].copy_from_slice(s);
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
    fn fill_row(&self, y: usize, out: &mut [u8]) {
        let w = self.image.width() as usize;
        let h = self.image.height() as usize;
        let pad = [self.pad[0], self.pad[1], self.pad[2], 0];
        if y < self.oy || y >= self.oy + h {
            out.chunks_exact_mut(4)
                .for_each(|o| o.copy_from_slice(&pad));
            return;
        }
        let src = &self.image.as_raw()[(y - self.oy) * w * 3..][..w * 3];
        let (left, rest) = out.split_at_mut(self.ox * 4);
        let (mid, right) = rest.split_at_mut(w * 4);
        left.chunks_exact_mut(4)
            .for_each(|o| o.copy_from_slice(&pad));
        right
            .chunks_exact_mut(4)
            .for_each(|o| o.copy_from_slice(&pad));
        for (o, s) in mid.chunks_exact_mut(4).zip(src.chunks_exact(3)) {
            o[..3].copy_from_slice(s);
        }
    }
    fn is_uniform_row(&self, y: usize) -> bool {
        y < self.oy || y >= self.oy + self.image.height() as usize
    }
}

/// One output row of the horizontal pass: `src` is RGBX, `out` RGB.
fn horizontal_row(src: &[u8], coeffs: &Coeffs, out: &mut [u8]) {
    for (xx, o) in out.chunks_exact_mut(3).enumerate() {
        let (xmin, k) = coeffs.taps(xx);
        let px = &src[xmin * 4..][..k.len() * 4];
        // Four lanes (RGBX) so the accumulation maps onto one SIMD register.
        let mut acc = [HALF; 4];
        for (p, &w) in px.chunks_exact(4).zip(k) {
            for c in 0..4 {
                acc[c] = acc[c].wrapping_add(i32::from(p[c]).wrapping_mul(w));
            }
        }
        o[0] = clip8(acc[0]);
        o[1] = clip8(acc[1]);
        o[2] = clip8(acc[2]);
    }
}

/// Resizes `src` to `out_w` x `out_h` exactly as Pillow's `Image.resize` does for
/// an RGB image (no `box`, no `reducing_gap`).
pub(crate) fn resample<S: RowSource + ?Sized>(
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

    let vert = Coeffs::new(in_h, out_h, filter);
    // Only the source rows some output row reads go through the horizontal pass.
    let (first, last) = if need_v {
        let last = vert.start[out_h - 1] + vert.len[out_h - 1];
        (vert.start[0], last.max(vert.start[0]))
    } else {
        (0, in_h)
    };

    // Horizontal pass (or a plain copy when the width is unchanged) into RGB rows.
    let tmp_w = out_w;
    let mut tmp = vec![0u8; (last - first) * tmp_w * 3];
    let mut row = vec![0u8; in_w * 4];
    let horiz = need_h.then(|| Coeffs::new(in_w, out_w, filter));
    let mut uniform: Option<Vec<u8>> = None;
    for (y, out) in (first..last).zip(tmp.chunks_exact_mut(tmp_w * 3)) {
        let is_uniform = src.is_uniform_row(y);
        if is_uniform {
            if let Some(done) = &uniform {
                out.copy_from_slice(done);
                continue;
            }
        }
        src.fill_row(y, &mut row);
        match &horiz {
            Some(c) => horizontal_row(&row, c, out),
            None => {
                for (o, p) in out.chunks_exact_mut(3).zip(row.chunks_exact(4)) {
                    o.copy_from_slice(&p[..3]);
                }
            }
        }
        if is_uniform {
            uniform = Some(out.to_vec());
        }
    }
    if !need_v {
        return tmp;
    }

    // Vertical pass: whole rows at once so the inner loop runs over contiguous bytes.
    let stride = tmp_w * 3;
    let mut dst = vec![0u8; out_w * out_h * 3];
    let mut acc = vec![0i32; stride];
    for (yy, out) in dst.chunks_exact_mut(stride).enumerate() {
        let (ymin, k) = vert.taps(yy);
        acc.fill(HALF);
        for (t, &w) in k.iter().enumerate() {
            let r = &tmp[(ymin + t - first) * stride..][..stride];
            for (a, &p) in acc.iter_mut().zip(r) {
                *a = a.wrapping_add(i32::from(p).wrapping_mul(w));
            }
        }
        for (o, &a) in out.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
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

    #[test]
    fn same_size_is_identity() {
        let img = RgbImage::new(3, 2, (0..18).collect()).unwrap();
        assert_eq!(resample(&img, 3, 2, Resample::Bicubic), img.as_raw());
    }
}
