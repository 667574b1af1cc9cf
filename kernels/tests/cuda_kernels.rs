//! Every CUDA kernel against the scalar reference (`mipha_kernels::reference`).
//!
//! Each test draws fresh random inputs, fills its device output with NaN before the
//! run (so an element the kernel forgets to write fails), and compares with a bound
//! stated next to it. Without a driver or device (CI, this crate's default build
//! machines) each test prints `skipping: no CUDA device: ...` and passes; with a
//! device, a missing NVRTC is a skip too, but a missing cuBLAS fails the GEMM tests.
//!
//! Bounds (u = 2^-24, f32 unit roundoff; S = sum_i |x_i w_i| of the dot in question):
//! - layer_norm: |err| <= 2e-5 (1 + |want|)            (two f32 passes over <= 4k)
//! - gelu (tanh, erf) after the bias add: |err| <= 1e-6 (1 + v^2) |want| + 1e-35
//!   (the CPU's bound, 5x: the GPU's expf/erfcf are a few ulp)
//! - add_assign, add_rows, embedding, dequantize_f16: exact (the same f32 roundings)
//! - softmax: |err| <= 5e-6 |want| + 1e-12
//! - rope (angles in f64 on both sides): |err| <= 4u (|x1| + |x2|) of the pair
//! - gemv (weights exact, f32 sums): |err| <= (k / 32 + 64) 2u S + 1e-6
//! - gemm (x and W rounded to f16, f32 sums): |err| <= (2^-10 + k 2^-23) S
//!   + 1e-7 sum_i |x_i| + 1e-6
//! - attention: |err| <= (2 e_s + 1e-5) max|v|, e_s = (D + 2) 2^-23 scale max_t
//!   sum_d |q_d k_td| (score error, which exp turns into relative weight error);
//!   with f16 K/V pools the same bound, on the values as stored: the kernels widen
//!   the very halves the reference reads, so storage adds no error between them
//! - kv_scatter (f32 and f16 pools): bit for bit `reference::kv_store`

#![cfg(feature = "cuda")]

use std::sync::OnceLock;

use half::f16;
use mipha_kernels::cuda::{
    decode_workspace_len, CudaError, Device, DeviceBuffer, DeviceKv, DeviceKvElem, DeviceKvLayer,
    DeviceRows, GeluKind,
};
use mipha_kernels::quant::{dequantize_row, quantize_row};
use mipha_kernels::{reference, AttnSeq, KvElem, KvLayer, KvView, QuantType, WeightView};

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit() as f32
    }
    fn normal(&mut self) -> f32 {
        let u1 = self.unit().max(1e-300);
        let u2 = self.unit();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn vec_uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
    fn vec_normal(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * std).collect()
    }
}

/// Fresh seed per run (inputs differ each time), printed so a failure can be replayed
/// with `MIPHA_TEST_SEED`.
fn seed(test: &str) -> u64 {
    let s = std::env::var("MIPHA_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{test}: seed {s} (MIPHA_TEST_SEED={s} to replay)");
    s
}

/// The shared device, or `None` (after printing why) when there is no CUDA here.
fn device() -> Option<&'static Device> {
    static DEV: OnceLock<Result<Device, String>> = OnceLock::new();
    let ordinal = std::env::var("MIPHA_CUDA_DEVICE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    match DEV.get_or_init(|| match Device::new(ordinal) {
        Ok(d) => {
            eprintln!("using {}", d.describe());
            Ok(d)
        }
        Err(e) if e.is_unavailable() => Err(e.to_string()),
        Err(e) => panic!("CUDA device present but unusable: {e}"),
    }) {
        Ok(d) => Some(d),
        Err(why) => {
            eprintln!("skipping: no CUDA device: {why}");
            None
        }
    }
}

fn poisoned(dev: &Device, n: usize) -> DeviceBuffer<f32> {
    dev.upload(&vec![f32::NAN; n]).unwrap()
}

#[track_caller]
fn check(what: &str, got: &[f32], want: &[f32], tol: impl Fn(usize) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w as f64).abs();
        let t = tol(i);
        assert!(
            err <= t,
            "{what}: element {i}: got {g}, want {w} (err {err:e}, bound {t:e})"
        );
    }
}

fn quantize_matrix(ty: QuantType, w: &[f32], rows: usize, cols: usize) -> Vec<u8> {
    let rb = ty.row_bytes(cols);
    let mut out = vec![0u8; rows * rb];
    for (src, dst) in w.chunks_exact(cols).zip(out.chunks_exact_mut(rb)) {
        quantize_row(ty, src, dst);
    }
    out
}

#[test]
fn layer_norm_matches_reference() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(seed("layer_norm"));
    for (rows, cols) in [(1usize, 1usize), (3, 7), (5, 1024), (4, 2560), (3, 1152)] {
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| rng.normal() * 3.0 + (i % 5) as f32)
            .collect();
        let w = rng.vec_uniform(cols, -2.0, 2.0);
        let b = rng.vec_uniform(cols, -1.0, 1.0);
        let mut want = vec![0.0; rows * cols];
        reference::layer_norm(&x, cols, &w, &b, 1e-5, &mut want);
        let (dx, dw, db) = (
            dev.upload(&x).unwrap(),
            dev.upload(&w).unwrap(),
            dev.upload(&b).unwrap(),
        );
        let mut out = poisoned(dev, rows * cols);
        dev.layer_norm(&dx, cols, &dw, &db, 1e-5, &mut out).unwrap();
        let got = dev.download(&out).unwrap();
        check(&format!("layer_norm {rows}x{cols}"), &got, &want, |i| {
            2e-5 * (1.0 + want[i].abs() as f64)
        });
    }
}

fn gelu_case(kind: GeluKind) {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(seed("gelu"));
    for (rows, cols, with_bias) in [(1usize, 7usize, true), (3, 200, false), (7, 10240, true)] {
        let x = rng.vec_uniform(rows * cols, -12.0, 12.0);
        let bias = rng.vec_uniform(cols, -1.0, 1.0);
        // The kernel adds the bias in f32, then applies GELU: so does the oracle.
        let input: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| if with_bias { v + bias[i % cols] } else { v })
            .collect();
        let mut want = input.clone();
        match kind {
            GeluKind::Tanh => reference::gelu_tanh(&mut want),
            GeluKind::Erf => reference::gelu_erf(&mut want),
        }
        let mut dx = dev.upload(&x).unwrap();
        let db = dev.upload(&bias).unwrap();
        dev.gelu(&mut dx, with_bias.then_some(&db), cols, kind)
            .unwrap();
        let got = dev.download(&dx).unwrap();
        check(&format!("gelu {kind:?} {rows}x{cols}"), &got, &want, |i| {
            let v = input[i] as f64;
            1e-6 * (1.0 + v * v) * want[i].abs() as f64 + 1e-35
        });
    }
}

#[test]
fn gelu_tanh_with_bias_matches_reference() {
    gelu_case(GeluKind::Tanh);
}

#[test]
fn gelu_erf_with_bias_matches_reference() {
    gelu_case(GeluKind::Erf);
}

#[test]
fn residual_adds_are_exact() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(seed("add"));
    for n in [1usize, 33, 2560 * 7] {
        let a = rng.vec_normal(n, 10.0);
        let b = rng.vec_normal(n, 10.0);
        let mut want = a.clone();
        reference::add_assign(&mut want, &b);
        let mut da = dev.upload(&a).unwrap();
        dev.add_assign(&mut da, &dev.upload(&b).unwrap()).unwrap();
        assert_eq!(dev.download(&da).unwrap(), want, "add_assign n={n}");
        // add_rows reads only the first x.len() elements of a longer table
        let mut table = b.clone();
        table.extend(rng.vec_normal(64, 1.0));
        let mut da = dev.upload(&a).unwrap();
        dev.add_rows(&mut da, &dev.upload(&table).unwrap()).unwrap();
        assert_eq!(dev.download(&da).unwrap(), want, "add_rows n={n}");
    }
}

#[test]
fn softmax_matches_reference() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(seed("softmax"));
    for (rows, cols) in [(1usize, 1usize), (4, 5), (3, 300), (5, 2049)] {
        let mut x = rng.vec_uniform(rows * cols, -30.0, 30.0);
        if rows > 1 {
            x[..cols].fill(f32::NEG_INFINITY); // nothing to attend to: zeros
            x[cols] = f32::NEG_INFINITY; // masked element in a live row
        }
        let mut want = x.clone();
        want.chunks_exact_mut(cols).for_each(reference::softmax);
        let mut dx = dev.upload(&x).unwrap();
        dev.softmax_rows(&mut dx, cols).unwrap();
        let got = dev.download(&dx).unwrap();
        check(&format!("softmax {rows}x{cols}"), &got, &want, |i| {
            5e-6 * want[i] as f64 + 1e-12
        });
    }
}

#[test]
fn rope_partial_matches_reference() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(seed("rope"));
    // Phi-2: 32 heads x 80, 32 rotated dims; plus a fully rotated case.
    for (t, n_heads, head_dim, rot) in [(5usize, 32usize, 80usize, 32usize), (3, 4, 64, 64)] {
        let positions: Vec<usize> = (0..t).map(|_| rng.below(4096)).collect();
        let x = rng.vec_normal(t * n_heads * head_dim, 2.0);
        let mut want = x.clone();
        reference::rope_partial(&mut want, n_heads, head_dim, rot, &positions, 10000.0);
        let mut dx = dev.upload(&x).unwrap();
        let pos32: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        dev.rope_partial(
            &mut dx,
            n_heads,
            head_dim,
            rot,
            &dev.upload(&pos32).unwrap(),
            10000.0,
        )
        .unwrap();
        let got = dev.download(&dx).unwrap();
        let h = rot / 2;
        check(&format!("rope t={t} heads={n_heads}"), &got, &want, |i| {
            let d = i % head_dim;
            let base = i - d;
            if d >= rot {
                return 0.0; // untouched dims are exact
            }
            let j = d % h;
            let pair = x[base + j].abs() as f64 + x[base + h + j].abs() as f64;
            4.0 * f32::EPSILON as f64 / 2.0 * pair
        });
    }
}

#[test]
fn embedding_gather_is_exact_for_every_type() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(seed("embedding"));
    let (rows, cols) = (50usize, 80usize);
    for ty in QuantType::ALL {
        let table = rng.vec_normal(rows * cols, 1.0);
        let bytes = quantize_matrix(ty, &table, rows, cols);
        let view = WeightView::new(ty, &bytes, rows, cols);
        let ids: Vec<u32> = (0..9).map(|_| rng.below(rows) as u32).collect();
        let mut want = vec![0.0; ids.len() * cols];
        reference::embedding(view, &ids, &mut want).unwrap();
        let dw = dev.upload_weight(view).unwrap();
        let mut out = poisoned(dev, ids.len() * cols);
        dev.embedding(&dw, &ids, &mut out).unwrap();
        assert_eq!(dev.download(&out).unwrap(), want, "embedding {ty}");
        // an id outside the table is an error, and nothing is written
        let mut out = poisoned(dev, 2 * cols);
        match dev.embedding(&dw, &[0, rows as u32], &mut out) {
            Err(CudaError::TokenOutOfRange(id)) => assert_eq!(id, rows as u32),
            other => panic!("embedding {ty}: out-of-range id gave {other:?}"),
        }
        assert!(dev.download(&out).unwrap().iter().all(|v| v.is_nan()));
    }
}

#[test]
fn dequantize_f16_is_exact() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(seed("dequantize"));
    let (rows, cols) = (7usize, 100usize);
    for ty in QuantType::ALL {
        let w = rng.vec_normal(rows * cols, 0.5);
        let bytes = quantize_matrix(ty, &w, rows, cols);
        let view = WeightView::new(ty, &bytes, rows, cols);
        let mut want = Vec::with_capacity(rows * cols);
        let mut row = vec![0.0f32; cols];
        for r in 0..rows {
            dequantize_row(ty, view.row(r), &mut row);
            want.extend(row.iter().map(|&v| half::f16::from_f32(v).to_bits()));
        }
        let dw = dev.upload_weight(view).unwrap();
        let mut out = dev.upload(&vec![0x7e00u16; rows * cols]).unwrap(); // f16 NaN
        dev.dequantize_f16(&dw, &mut out).unwrap();
        assert_eq!(dev.download(&out).unwrap(), want, "dequantize_f16 {ty}");
    }
}

/// Σ_i |x_i w_ji| per output, from the dequantized weights.
fn abs_dots(x: &[f32], m: usize, view: WeightView) -> Vec<f64> {
    let (n, k) = (view.rows, view.cols);
    let mut row = vec![0.0f32; k];
    let mut s = vec![0.0f64; m * n];
    for j in 0..n {
        dequantize_row(view.ty, view.row(j), &mut row);
        for i in 0..m {
            s[i * n + j] = x[i * k..(i + 1) * k]
                .iter()
                .zip(&row)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
        }
    }
    s
}

fn matmul_case(gemm: bool) {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(seed(if gemm { "gemm" } else { "gemv" }));
    let shapes: &[(usize, usize, usize)] = if gemm {
        &[(17, 67, 2560), (64, 33, 80), (9, 40, 1000)]
    } else {
        // m up to 8 in one launch and 12 in two; k = 77 and 1001 take the
        // element-wise paths (no 16-byte loads), n = 8200 the one-warp-per-row blocks
        &[
            (1, 67, 2560),
            (3, 33, 80),
            (1, 5, 10240),
            (2, 9, 1000),
            (8, 70, 77),
            (12, 19, 1001),
            (1, 8200, 96),
        ]
    };
    for ty in QuantType::ALL {
        for &(m, n, k) in shapes {
            let x = rng.vec_normal(m * k, 1.0);
            let w = rng.vec_normal(n * k, 0.05);
            let bias = rng.vec_normal(n, 0.5);
            let bytes = quantize_matrix(ty, &w, n, k);
            let view = WeightView::new(ty, &bytes, n, k);
            let with_bias = n % 2 == 1;
            let mut want = vec![0.0; m * n];
            reference::matmul(&x, m, view, with_bias.then_some(&bias[..]), &mut want);
            let sums = abs_dots(&x, m, view);
            let xsum: Vec<f64> = x
                .chunks_exact(k)
                .map(|r| r.iter().map(|v| v.abs() as f64).sum())
                .collect();
            let dw = dev.upload_weight(view).unwrap();
            let (dx, db) = (dev.upload(&x).unwrap(), dev.upload(&bias).unwrap());
            let mut out = poisoned(dev, m * n);
            let b = with_bias.then_some(&db);
            if gemm {
                dev.gemm(&dx, m, &dw, b, &mut out).unwrap();
            } else {
                dev.gemv(&dx, m, &dw, b, &mut out).unwrap();
            }
            let got = dev.download(&out).unwrap();
            let what = format!(
                "{} {ty} m={m} n={n} k={k}",
                if gemm { "gemm" } else { "gemv" }
            );
            check(&what, &got, &want, |i| {
                if gemm {
                    (2f64.powi(-10) + k as f64 * 2f64.powi(-23)) * sums[i]
                        + 1e-7 * xsum[i / n]
                        + 1e-6
                } else {
                    (k as f64 / 32.0 + 64.0) * f32::EPSILON as f64 * sums[i] + 1e-6
                }
            });
        }
    }
}

#[test]
fn gemv_matches_reference_for_every_type() {
    matmul_case(false);
}

#[test]
fn gemm_matches_reference_for_every_type() {
    matmul_case(true);
}

struct AttnCase {
    n_tokens: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    first_pos: usize,
    block_size: usize,
    causal: bool,
}

/// K/V values as a pool of `E` holds them: f32 as they are, f16 rounded to
/// nearest even (as `reference::kv_store` writes them).
fn stored<E: KvElem>(x: &[f32]) -> Vec<E> {
    let mut out = vec![E::default(); x.len()];
    reference::kv_store(x, &mut out);
    out
}

/// A pool of `E` on the device: f32 as is, f16 as its bits (`u16`).
trait Upload: KvElem {
    type Dev: DeviceKvElem;
    fn upload(dev: &Device, x: &[Self]) -> DeviceBuffer<Self::Dev>;
    fn download(dev: &Device, b: &DeviceBuffer<Self::Dev>) -> Vec<Self>;
}

impl Upload for f32 {
    type Dev = f32;
    fn upload(dev: &Device, x: &[f32]) -> DeviceBuffer<f32> {
        dev.upload(x).unwrap()
    }
    fn download(dev: &Device, b: &DeviceBuffer<f32>) -> Vec<f32> {
        dev.download(b).unwrap()
    }
}

impl Upload for f16 {
    type Dev = u16;
    fn upload(dev: &Device, x: &[f16]) -> DeviceBuffer<u16> {
        dev.upload(&x.iter().map(|h| h.to_bits()).collect::<Vec<_>>())
            .unwrap()
    }
    fn download(dev: &Device, b: &DeviceBuffer<u16>) -> Vec<f16> {
        let bits = dev.download(b).unwrap();
        bits.into_iter().map(f16::from_bits).collect()
    }
}

/// A random permutation of `0..n`.
fn shuffled(rng: &mut Rng, n: usize) -> Vec<u32> {
    let mut t: Vec<u32> = (0..n as u32).collect();
    for i in (1..t.len()).rev() {
        let j = rng.below(i + 1);
        t.swap(i, j);
    }
    t
}

/// e_s of the attention bound for each (row, head): the score's rounding error.
fn score_errors<E: KvElem>(
    q: &[f32],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    kv: &KvLayer<E>,
    seqs: &[AttnSeq],
    scale: f32,
) -> Vec<f64> {
    let group = n_heads / n_kv_heads;
    let qd = n_heads * head_dim;
    let mut e_s = Vec::new();
    let mut row = 0;
    for s in seqs {
        let view = kv.view(s.block_table);
        // the largest dot over every key of the sequence, causal or not (as the
        // bound has always been taken)
        let keys = s.first_pos + s.rows;
        for r in row..row + s.rows {
            for h in 0..n_heads {
                let qh = &q[r * qd + h * head_dim..r * qd + (h + 1) * head_dim];
                let kvh = h / group;
                let max_dot = (0..keys)
                    .map(|t| {
                        let k = &view.key(t)[kvh * head_dim..(kvh + 1) * head_dim];
                        qh.iter()
                            .zip(k)
                            .map(|(&a, &b)| (a as f64 * b.to_f32() as f64).abs())
                            .sum::<f64>()
                    })
                    .fold(0.0, f64::max);
                e_s.push((head_dim as f64 + 2.0) * 2f64.powi(-23) * scale as f64 * max_dot);
            }
        }
        row += s.rows;
    }
    e_s
}

fn attention_case<E: Upload>(c: &AttnCase, decode: bool, rng: &mut Rng, dev: &Device) {
    let total = c.first_pos + c.n_tokens;
    let n_blocks = total.div_ceil(c.block_size) + 2;
    let kv_dim = c.n_kv_heads * c.head_dim;
    // a shuffled block table: positions are scattered over the pool
    let table = shuffled(rng, n_blocks);
    let slots = n_blocks * c.block_size;
    let kp: Vec<E> = stored(&rng.vec_normal(slots * kv_dim, 1.0));
    let vp: Vec<E> = stored(&rng.vec_normal(slots * kv_dim, 1.0));
    let q = rng.vec_normal(c.n_tokens * c.n_heads * c.head_dim, 1.0);
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    let kv = KvView {
        k: &kp,
        v: &vp,
        block_size: c.block_size,
        block_table: &table,
        kv_dim,
    };
    let mut want = vec![0.0; q.len()];
    reference::attention(
        &q,
        c.n_tokens,
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        &kv,
        c.first_pos,
        c.causal,
        scale,
        &mut want,
    );
    let layer = KvLayer {
        k: &kp[..],
        v: &vp[..],
        block_size: c.block_size,
        kv_dim,
    };
    let seq = AttnSeq {
        rows: c.n_tokens,
        first_pos: c.first_pos,
        block_table: &table,
    };
    let e_s = score_errors(
        &q,
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        &layer,
        &[seq],
        scale,
    );
    let vmax = vp
        .iter()
        .fold(0.0f64, |m, &v| m.max(v.to_f32().abs() as f64));
    let (dq, dk, dv, dt) = (
        dev.upload(&q).unwrap(),
        E::upload(dev, &kp),
        E::upload(dev, &vp),
        dev.upload(&table).unwrap(),
    );
    let dkv = DeviceKv {
        k: &dk,
        v: &dv,
        block_size: c.block_size,
        block_table: dt.as_view(),
        n_blocks,
        kv_dim,
    };
    let mut out = poisoned(dev, q.len());
    let args = (c.n_tokens, c.n_heads, c.n_kv_heads, c.head_dim);
    if decode {
        dev.attention_decode(
            &dq,
            args.0,
            args.1,
            args.2,
            args.3,
            &dkv,
            c.first_pos,
            c.causal,
            scale,
            &mut out,
        )
        .unwrap();
    } else {
        dev.attention_prefill(
            &dq,
            args.0,
            args.1,
            args.2,
            args.3,
            &dkv,
            c.first_pos,
            c.causal,
            scale,
            &mut out,
        )
        .unwrap();
    }
    let got = dev.download(&out).unwrap();
    let what = format!(
        "attention {} {:?} T={} heads={}/{} D={} first_pos={} causal={}",
        if decode { "decode" } else { "prefill" },
        E::DTYPE,
        c.n_tokens,
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        c.first_pos,
        c.causal
    );
    check(&what, &got, &want, |i| {
        let row_head = i / c.head_dim;
        (2.0 * e_s[row_head] + 1e-5) * vmax
    });
    if decode {
        // The graph-replay form: positions read from the device, the split count
        // sized for a table far longer than the sequence (empty splits must not
        // change the result), a caller-owned workspace.
        let mut long_table = table.clone();
        long_table.resize(n_blocks + 40, 0);
        let dlt = dev.upload(&long_table).unwrap();
        let long = DeviceKv {
            block_table: dlt.as_view(),
            n_blocks: long_table.len(),
            ..dkv
        };
        let positions: Vec<u32> = (0..c.n_tokens).map(|i| (c.first_pos + i) as u32).collect();
        let dpos = dev.upload(&positions).unwrap();
        let ws_len = decode_workspace_len(
            c.n_tokens,
            c.n_heads,
            c.head_dim,
            long_table.len() * c.block_size,
        );
        let mut ws = dev.zeros::<f32>(ws_len).unwrap();
        let mut out2 = poisoned(dev, q.len());
        dev.attention_decode_at(
            &dq, args.0, args.1, args.2, args.3, &long, &dpos, c.causal, scale, &mut ws, &mut out2,
        )
        .unwrap();
        let got2 = dev.download(&out2).unwrap();
        check(&format!("{what} (device positions)"), &got2, &want, |i| {
            let row_head = i / c.head_dim;
            (2.0 * e_s[row_head] + 1e-5) * vmax
        });
    }
}

#[test]
fn flash_prefill_matches_reference() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(seed("attention_prefill"));
    let cases = [
        // Phi-2 prompt (head_dim 80, causal), from 0 and as a continued chunk
        AttnCase {
            n_tokens: 37,
            n_heads: 4,
            n_kv_heads: 4,
            head_dim: 80,
            first_pos: 0,
            block_size: 16,
            causal: true,
        },
        AttnCase {
            n_tokens: 70,
            n_heads: 3,
            n_kv_heads: 3,
            head_dim: 80,
            first_pos: 50,
            block_size: 16,
            causal: true,
        },
        // SigLIP (head_dim 72, not causal, 729 patches, one block covering them)
        AttnCase {
            n_tokens: 729,
            n_heads: 4,
            n_kv_heads: 4,
            head_dim: 72,
            first_pos: 0,
            block_size: 729,
            causal: false,
        },
        // grouped-query heads, odd sizes
        AttnCase {
            n_tokens: 19,
            n_heads: 8,
            n_kv_heads: 2,
            head_dim: 64,
            first_pos: 5,
            block_size: 7,
            causal: true,
        },
        AttnCase {
            n_tokens: 1,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 128,
            first_pos: 0,
            block_size: 4,
            causal: true,
        },
    ];
    for c in &cases {
        attention_case::<f32>(c, false, &mut rng, dev);
        attention_case::<f16>(c, false, &mut rng, dev);
    }
}

#[test]
fn paged_decode_matches_reference() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(seed("attention_decode"));
    let mut cases = Vec::new();
    // one token at short and long positions (several splits at 1000 and 3000)
    for first_pos in [0usize, 100, 255, 256, 1000, 3000] {
        cases.push(AttnCase {
            n_tokens: 1,
            n_heads: 4,
            n_kv_heads: 4,
            head_dim: 80,
            first_pos,
            block_size: 16,
            causal: true,
        });
    }
    cases.push(AttnCase {
        n_tokens: 3,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 80,
        first_pos: 600,
        block_size: 32,
        causal: true,
    });
    cases.push(AttnCase {
        n_tokens: 2,
        n_heads: 2,
        n_kv_heads: 2,
        head_dim: 72,
        first_pos: 10,
        block_size: 8,
        causal: false,
    });
    for c in &cases {
        attention_case::<f32>(c, true, &mut rng, dev);
        attention_case::<f16>(c, true, &mut rng, dev);
    }
}

#[test]
fn cache_dir_follows_the_environment() {
    // No device needed: the cache location and key are plain Rust.
    let dir = mipha_kernels::cuda::cache::cache_dir();
    if let Some(d) = std::env::var_os("MIPHA_CUDA_CACHE").filter(|d| !d.is_empty()) {
        assert_eq!(dir.as_deref(), Some(std::path::Path::new(&d)));
    } else if let Some(d) = dir {
        assert!(d.ends_with("mipha/cuda"), "{}", d.display());
    }
    let k = mipha_kernels::cuda::cache::cache_key("gemv", "src", "sm_90", 12040, (12, 4));
    assert!(k.starts_with("gemv-sm_90-drv12040-"));
}

#[test]
fn missing_cuda_is_a_clear_error() {
    // Here (no driver) Device::new must fail with NoDriver/NoDevice, not panic; on a
    // GPU machine it must succeed.
    match Device::new(0) {
        Ok(d) => eprintln!("device present: {}", d.describe()),
        Err(e) => {
            assert!(e.is_unavailable(), "unexpected error kind: {e}");
            let msg = e.to_string();
            assert!(
                msg.starts_with("no CUDA driver")
                    || msg.starts_with("no CUDA device")
                    || msg.starts_with("NVRTC not found"),
                "{msg}"
            );
            eprintln!("skipping: no CUDA device: {msg}");
        }
    }
}

/// Bit patterns equal, or both NaN (a NaN's payload is not part of the contract).
#[track_caller]
fn same_bits<E: KvElem>(what: &str, got: &[E], want: &[E]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (gf, wf) = (g.to_f32(), w.to_f32());
        assert!(
            bytemuck::bytes_of(&g) == bytemuck::bytes_of(&w) || (gf.is_nan() && wf.is_nan()),
            "{what}: element {i}: got {gf} ({g:?}), want {wf} ({w:?})"
        );
    }
}

fn kv_scatter_case<E: Upload>(rng: &mut Rng, dev: &Device) {
    let (block_size, n_blocks, kv_dim) = (4usize, 6usize, 24usize);
    let table = shuffled(rng, n_blocks);
    let (first_pos, n) = (3usize, 13usize);
    let mut src = rng.vec_normal(n * kv_dim, 1.0);
    // values whose f16 rounding is a corner: ties to even (1 + 2^-11 rounds down,
    // 1 + 3 * 2^-11 up), overflow to inf, the largest half, subnormal halves, a
    // value that rounds to zero, signed zero, infinities and NaN
    let corners = [
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        65520.0,
        -65519.0,
        65504.0,
        3.0e-6,
        -6.0e-8,
        2.0e-8,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ];
    src[..corners.len()].copy_from_slice(&corners);
    let poison = stored::<E>(&[f32::NAN])[0];
    let mut want = vec![poison; n_blocks * block_size * kv_dim];
    for i in 0..n {
        let p = first_pos + i;
        let slot = table[p / block_size] as usize * block_size + p % block_size;
        reference::kv_store(
            &src[i * kv_dim..(i + 1) * kv_dim],
            &mut want[slot * kv_dim..(slot + 1) * kv_dim],
        );
    }
    let dsrc = dev.upload(&src).unwrap();
    let dtable = dev.upload(&table).unwrap();
    let mut pool = E::upload(dev, &vec![poison; want.len()]);
    dev.kv_scatter(&dsrc, n, kv_dim, &mut pool, &dtable, block_size, first_pos)
        .unwrap();
    // the same through positions held on the device (graph replays)
    let positions: Vec<u32> = (0..n).map(|i| (first_pos + i) as u32).collect();
    let mut pool2 = E::upload(dev, &vec![poison; want.len()]);
    dev.kv_scatter_at(
        &dsrc,
        n,
        kv_dim,
        &mut pool2,
        &dtable,
        block_size,
        &dev.upload(&positions).unwrap(),
    )
    .unwrap();
    // untouched slots keep their NaN, written ones are kv_store's, bit for bit
    for (what, pool) in [("kv_scatter", &pool), ("kv_scatter_at", &pool2)] {
        let got = E::download(dev, pool);
        same_bits(&format!("{what} {:?}", E::DTYPE), &got, &want);
    }
}

#[test]
fn kv_scatter_places_rows_through_the_block_table() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(seed("kv_scatter"));
    kv_scatter_case::<f32>(&mut rng, dev);
    kv_scatter_case::<f16>(&mut rng, dev);
}

/// A batch as a backend step lays it out: sequences `(rows, first_pos)` whose
/// tables share one pool, blocks dealt out interleaved; the tables concatenated,
/// each row's start into them, position and sequence end.
struct Batch {
    block_size: usize,
    n_blocks: usize,
    tables: Vec<Vec<u32>>,
    seqs: Vec<(usize, usize)>,
}

impl Batch {
    fn new(rng: &mut Rng, block_size: usize, seqs: &[(usize, usize)]) -> Batch {
        let used: Vec<usize> = seqs
            .iter()
            .map(|&(rows, first)| (first + rows).div_ceil(block_size))
            .collect();
        let n_blocks = used.iter().sum::<usize>() + 3;
        // deal a shuffled pool round-robin, so neighbouring blocks of the pool
        // belong to different sequences
        let pool = shuffled(rng, n_blocks);
        let mut tables = vec![Vec::new(); seqs.len()];
        let mut next = pool.into_iter();
        while tables.iter().zip(&used).any(|(t, &u)| t.len() < u) {
            for (t, &u) in tables.iter_mut().zip(&used) {
                if t.len() < u {
                    t.push(next.next().unwrap());
                }
            }
        }
        Batch {
            block_size,
            n_blocks,
            tables,
            seqs: seqs.to_vec(),
        }
    }

    fn attn_seqs(&self) -> Vec<AttnSeq<'_>> {
        self.seqs
            .iter()
            .zip(&self.tables)
            .map(|(&(rows, first_pos), t)| AttnSeq {
                rows,
                first_pos,
                block_table: t,
            })
            .collect()
    }

    fn rows(&self) -> usize {
        self.seqs.iter().map(|s| s.0).sum()
    }

    /// (concatenated tables, positions, table starts, sequence ends) on the device
    fn upload(&self, dev: &Device) -> [DeviceBuffer<u32>; 4] {
        let (mut tables, mut pos, mut start, mut end) = (vec![], vec![], vec![], vec![]);
        for (&(rows, first), t) in self.seqs.iter().zip(&self.tables) {
            let s = tables.len() as u32;
            tables.extend_from_slice(t);
            for p in first..first + rows {
                pos.push(p as u32);
                start.push(s);
                end.push((first + rows) as u32);
            }
        }
        [tables, pos, start, end].map(|v| dev.upload(&v).unwrap())
    }
}

fn device_rows(b: &[DeviceBuffer<u32>; 4]) -> DeviceRows<'_> {
    DeviceRows {
        tables: b[0].as_view(),
        positions: b[1].as_view(),
        table_start: b[2].as_view(),
        seq_end: b[3].as_view(),
    }
}

fn kv_scatter_rows_case<E: Upload>(rng: &mut Rng, dev: &Device) {
    let kv_dim = 40;
    // a prefill chunk between single decode rows, at different lengths
    let batch = Batch::new(rng, 4, &[(1, 9), (5, 6), (1, 0), (2, 13)]);
    let n = batch.rows();
    let src = rng.vec_normal(n * kv_dim, 1.0);
    let poison = stored::<E>(&[f32::NAN])[0];
    let mut want = vec![poison; batch.n_blocks * batch.block_size * kv_dim];
    let mut row = 0;
    for s in batch.attn_seqs() {
        for p in s.first_pos..s.first_pos + s.rows {
            let slot = s.block_table[p / batch.block_size] as usize * batch.block_size
                + p % batch.block_size;
            reference::kv_store(
                &src[row * kv_dim..(row + 1) * kv_dim],
                &mut want[slot * kv_dim..(slot + 1) * kv_dim],
            );
            row += 1;
        }
    }
    let bufs = batch.upload(dev);
    let mut pool = E::upload(dev, &vec![poison; want.len()]);
    dev.kv_scatter_rows(
        &dev.upload(&src).unwrap(),
        n,
        kv_dim,
        &mut pool,
        batch.block_size,
        &device_rows(&bufs),
    )
    .unwrap();
    let got = E::download(dev, &pool);
    same_bits(&format!("kv_scatter_rows {:?}", E::DTYPE), &got, &want);
}

#[test]
fn kv_scatter_rows_writes_each_sequence_through_its_own_table() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(seed("kv_scatter_rows"));
    kv_scatter_rows_case::<f32>(&mut rng, dev);
    kv_scatter_rows_case::<f16>(&mut rng, dev);
}

fn decode_rows_case<E: Upload>(causal: bool, rng: &mut Rng, dev: &Device) {
    let (n_heads, n_kv_heads, head_dim) = (4usize, 2usize, 80usize);
    let kv_dim = n_kv_heads * head_dim;
    // one-row decodes at short and long lengths (several splits), and short
    // multi-row sequences, as a batched step's decode launch takes them
    let batch = Batch::new(
        rng,
        16,
        &[(1, 0), (1, 700), (3, 255), (1, 31), (2, 510), (1, 1200)],
    );
    let n = batch.rows();
    let seqs = batch.attn_seqs();
    let slots = batch.n_blocks * batch.block_size;
    let kp: Vec<E> = stored(&rng.vec_normal(slots * kv_dim, 1.0));
    let vp: Vec<E> = stored(&rng.vec_normal(slots * kv_dim, 1.0));
    let q = rng.vec_normal(n * n_heads * head_dim, 1.0);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let layer = KvLayer {
        k: &kp[..],
        v: &vp[..],
        block_size: batch.block_size,
        kv_dim,
    };
    let mut want = vec![0.0; q.len()];
    reference::attention_batch(
        &q, n_heads, n_kv_heads, head_dim, &layer, &seqs, causal, scale, &mut want,
    );
    let e_s = score_errors(&q, n_heads, n_kv_heads, head_dim, &layer, &seqs, scale);
    let vmax = vp
        .iter()
        .fold(0.0f64, |m, &v| m.max(v.to_f32().abs() as f64));
    let (dk, dv) = (E::upload(dev, &kp), E::upload(dev, &vp));
    let pools = DeviceKvLayer {
        k: &dk,
        v: &dv,
        block_size: batch.block_size,
        kv_dim,
    };
    let bufs = batch.upload(dev);
    let rows = device_rows(&bufs);
    let dq = dev.upload(&q).unwrap();
    let w = n_heads * head_dim;
    let what = format!("attention_decode_rows {:?} causal={causal}", E::DTYPE);
    // max_keys: the longest sequence exactly, and the whole pool (a graph's
    // sizing: the extra splits are empty)
    let longest = seqs.iter().map(|s| s.first_pos + s.rows).max().unwrap();
    for max_keys in [longest, slots] {
        let mut ws = dev
            .zeros::<f32>(decode_workspace_len(n, n_heads, head_dim, max_keys))
            .unwrap();
        let mut out = poisoned(dev, q.len());
        dev.attention_decode_rows(
            &dq, n, n_heads, n_kv_heads, head_dim, &pools, &rows, max_keys, causal, scale, &mut ws,
            &mut out,
        )
        .unwrap();
        let got = dev.download(&out).unwrap();
        check(&format!("{what} max_keys={max_keys}"), &got, &want, |i| {
            (2.0 * e_s[i / head_dim] + 1e-5) * vmax
        });
    }
    // rows 2..7 alone (a launch of part of a group, as a backend splits one that
    // outgrows its workspace): the rows' starts still index the whole tables
    let (r0, r1) = (2, 7);
    let mut ws = dev
        .zeros::<f32>(decode_workspace_len(r1 - r0, n_heads, head_dim, longest))
        .unwrap();
    let mut out = poisoned(dev, (r1 - r0) * w);
    dev.attention_decode_rows(
        &dq.slice(r0 * w..r1 * w),
        r1 - r0,
        n_heads,
        n_kv_heads,
        head_dim,
        &pools,
        &rows.rows(r0..r1),
        longest,
        causal,
        scale,
        &mut ws,
        &mut out,
    )
    .unwrap();
    let got = dev.download(&out).unwrap();
    check(
        &format!("{what} rows {r0}..{r1}"),
        &got,
        &want[r0 * w..r1 * w],
        |i| (2.0 * e_s[r0 * n_heads + i / head_dim] + 1e-5) * vmax,
    );
}

#[test]
fn batched_decode_matches_reference_batch() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(seed("attention_decode_rows"));
    for causal in [true, false] {
        decode_rows_case::<f32>(causal, &mut rng, dev);
        decode_rows_case::<f16>(causal, &mut rng, dev);
    }
}
