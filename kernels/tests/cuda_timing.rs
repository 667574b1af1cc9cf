//! Timings of the CUDA kernels at Mipha-3B's shapes, for `scripts/gpu-check.sh`:
//! `#[ignore]`d (run with `--ignored --nocapture`), each printing
//! `BENCH <name> <value> <unit>` lines that the script gathers into its table.
//! Without a device they skip like the correctness tests.
//!
//! Shapes: Phi-2 d=2560, MLP 10240, vocab 51200, 32 heads x 80; SigLIP d=1152,
//! MLP 4304, 729 patches, 16 heads x 72.

#![cfg(feature = "cuda")]

use std::time::Instant;

use mipha_kernels::cuda::{Device, DeviceKv};
use mipha_kernels::quant::quantize_row;
use mipha_kernels::{QuantType, WeightView};

fn device() -> Option<Device> {
    match Device::new(0) {
        Ok(d) => {
            eprintln!("using {}", d.describe());
            Some(d)
        }
        Err(e) if e.is_unavailable() => {
            eprintln!("skipping: no CUDA device: {e}");
            None
        }
        Err(e) => panic!("CUDA device present but unusable: {e}"),
    }
}

/// Mean seconds per call of `f` over `iters` calls, after 3 warm-up calls.
fn time(dev: &Device, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    dev.synchronize().unwrap();
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    dev.synchronize().unwrap();
    t.elapsed().as_secs_f64() / iters as f64
}

fn weight(ty: QuantType, n: usize, k: usize) -> Vec<u8> {
    let rb = ty.row_bytes(k);
    let mut out = vec![0u8; n * rb];
    let row: Vec<f32> = (0..k)
        .map(|i| ((i * 7919) % 101) as f32 / 1000.0 - 0.05)
        .collect();
    for dst in out.chunks_exact_mut(rb) {
        quantize_row(ty, &row, dst);
    }
    out
}

#[test]
#[ignore]
fn timing_matmul() {
    let Some(dev) = device() else { return };
    for ty in [
        QuantType::Q4_0,
        QuantType::Q8_0,
        QuantType::F16,
        QuantType::BF16,
    ] {
        for (label, n, k) in [("fc1", 10240usize, 2560usize), ("lm_head", 51200, 2560)] {
            let bytes = weight(ty, n, k);
            let w = dev
                .upload_weight(WeightView::new(ty, &bytes, n, k))
                .unwrap();
            let x = dev.upload(&vec![0.01f32; 512 * k]).unwrap();
            let x1 = dev.upload(&vec![0.01f32; k]).unwrap();
            let mut out = dev.zeros::<f32>(512 * n).unwrap();
            let mut out1 = dev.zeros::<f32>(n).unwrap();
            let s = time(&dev, 50, || dev.gemv(&x1, 1, &w, None, &mut out1).unwrap());
            println!(
                "BENCH gemv_{ty}_{label}_{n}x{k} {:.1} GB/s ({:.1} us)",
                bytes.len() as f64 / s / 1e9,
                s * 1e6
            );
            let s = time(&dev, 10, || dev.gemm(&x, 512, &w, None, &mut out).unwrap());
            println!(
                "BENCH gemm_{ty}_{label}_m512 {:.1} TFLOP/s ({:.2} ms, dequant included)",
                2.0 * 512.0 * n as f64 * k as f64 / s / 1e12,
                s * 1e3
            );
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn attn(
    dev: &Device,
    label: &str,
    n_tokens: usize,
    n_heads: usize,
    head_dim: usize,
    first_pos: usize,
    causal: bool,
    decode: bool,
) {
    let total = first_pos + n_tokens;
    let block_size = if causal { 16 } else { total };
    let n_blocks = total.div_ceil(block_size);
    let kv_dim = n_heads * head_dim;
    let table: Vec<u32> = (0..n_blocks as u32).rev().collect();
    let slots = n_blocks * block_size * kv_dim;
    let k = dev.upload(&vec![0.01f32; slots]).unwrap();
    let v = dev.upload(&vec![0.02f32; slots]).unwrap();
    let t = dev.upload(&table).unwrap();
    let q = dev.upload(&vec![0.03f32; n_tokens * kv_dim]).unwrap();
    let mut out = dev.zeros::<f32>(n_tokens * kv_dim).unwrap();
    let kv = DeviceKv {
        k: &k,
        v: &v,
        block_size,
        block_table: t.as_view(),
        n_blocks,
        kv_dim,
    };
    let scale = 1.0 / (head_dim as f32).sqrt();
    let s = time(dev, 20, || {
        if decode {
            dev.attention_decode(
                &q, n_tokens, n_heads, n_heads, head_dim, &kv, first_pos, causal, scale, &mut out,
            )
            .unwrap()
        } else {
            dev.attention_prefill(
                &q, n_tokens, n_heads, n_heads, head_dim, &kv, first_pos, causal, scale, &mut out,
            )
            .unwrap()
        }
    });
    println!("BENCH {label} {:.1} us", s * 1e6);
}

#[test]
#[ignore]
fn timing_attention() {
    let Some(dev) = device() else { return };
    attn(&dev, "prefill_phi2_t512", 512, 32, 80, 0, true, false);
    attn(&dev, "prefill_phi2_t2048", 2048, 32, 80, 0, true, false);
    attn(&dev, "prefill_siglip_t729", 729, 16, 72, 0, false, false);
    attn(&dev, "decode_phi2_pos512", 1, 32, 80, 511, true, true);
    attn(&dev, "decode_phi2_pos2048", 1, 32, 80, 2047, true, true);
}

#[test]
#[ignore]
fn timing_elementwise() {
    let Some(dev) = device() else { return };
    let (rows, cols) = (512usize, 2560usize);
    let x = dev.upload(&vec![0.5f32; rows * cols]).unwrap();
    let w = dev.upload(&vec![1.0f32; cols]).unwrap();
    let b = dev.upload(&vec![0.0f32; cols]).unwrap();
    let mut out = dev.zeros::<f32>(rows * cols).unwrap();
    let s = time(&dev, 50, || {
        dev.layer_norm(&x, cols, &w, &b, 1e-5, &mut out).unwrap()
    });
    println!("BENCH layer_norm_512x2560 {:.1} us", s * 1e6);
    let mut h = dev.upload(&vec![0.5f32; rows * 10240]).unwrap();
    let hb = dev.upload(&vec![0.1f32; 10240]).unwrap();
    let s = time(&dev, 50, || {
        dev.gelu(
            &mut h,
            Some(&hb),
            10240,
            mipha_kernels::cuda::GeluKind::Tanh,
        )
        .unwrap()
    });
    println!("BENCH bias_gelu_tanh_512x10240 {:.1} us", s * 1e6);
}
