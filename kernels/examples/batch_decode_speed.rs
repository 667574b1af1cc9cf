//! The matmuls of one batched decode step over a model-sized set of weights
//! (`cargo run --release -p mipha-kernels --example batch_decode_speed -- [q4_0|q8_0|f16|bf16] [GB] [m...]`):
//! Phi-2-shaped matrices (q, k, v, dense, fc1, fc2 per layer) until
//! the set holds about GB gigabytes, far more than any cache, then one pass
//! of `m` activation rows through every matrix, as a decode step of `m`
//! sequences does. Prints ms per pass and the bytes streamed per second.

use std::time::Instant;

use mipha_kernels::cpu::{self, PackedMatrix};
use mipha_kernels::quant::quantize_row;
use mipha_kernels::{Epilogue, QuantType, WeightView};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ty = match args.first().map(String::as_str) {
        Some("q8_0") => QuantType::Q8_0,
        Some("f16") => QuantType::F16,
        Some("bf16") => QuantType::BF16,
        _ => QuantType::Q4_0,
    };
    let gb: f64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1.5);
    let ms: Vec<usize> = args.iter().skip(2).filter_map(|a| a.parse().ok()).collect();
    let ms = if ms.is_empty() {
        vec![1, 2, 4, 8, 12]
    } else {
        ms
    };
    let h = 2560;
    let shapes = [(h, h), (h, h), (h, h), (h, h), (4 * h, h), (h, 4 * h)];
    let mut mats = Vec::new();
    let mut bytes = 0usize;
    let mut seed = 1u32;
    'fill: loop {
        for &(n, k) in &shapes {
            let rb = ty.row_bytes(k);
            let mut data = vec![0u8; n * rb];
            let mut row = vec![0f32; k];
            for dst in data.chunks_exact_mut(rb) {
                for v in row.iter_mut() {
                    seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                    *v = (seed >> 9) as f32 / (1u32 << 23) as f32 - 1.0;
                }
                quantize_row(ty, &row, dst);
            }
            let p = PackedMatrix::pack(WeightView::new(ty, &data, n, k)).expect("packs");
            bytes += p.size_bytes();
            mats.push(p);
            if bytes as f64 >= gb * 1e9 {
                break 'fill;
            }
        }
    }
    println!(
        "{ty}: {} matrices, {:.2} GB; {}, level {}, tuning {}",
        mats.len(),
        bytes as f64 / 1e9,
        cpu::dispatch::cpu().describe(),
        cpu::dispatch::level().name(),
        cpu::dispatch::tuning().describe()
    );
    let pool = rayon::ThreadPoolBuilder::new().build().unwrap();
    for &m in &ms {
        let xs: Vec<Vec<f32>> = [h, 4 * h]
            .iter()
            .map(|&k| {
                (0..m * k)
                    .map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0)
                    .collect()
            })
            .collect();
        let mut out = vec![0f32; m * 4 * h];
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            pool.install(|| {
                for p in &mats {
                    let x = if p.cols() == h { &xs[0] } else { &xs[1] };
                    cpu::matmul_packed_with(
                        x,
                        m,
                        p,
                        None,
                        Epilogue::Store,
                        &mut out[..m * p.rows()],
                    );
                }
            });
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let t = times[2];
        println!(
            "m={m:2}: {:7.1} ms per pass, {:5.1} GB/s",
            t * 1e3,
            bytes as f64 / t / 1e9
        );
    }
}
