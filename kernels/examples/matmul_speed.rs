//! Micro-benchmark of the matmul paths on one Phi-2-shaped weight
//! (`cargo run --release -p mipha-kernels --example matmul_speed -- [n k m...]`):
//! the f32-activation kernel vs the int8 kernel on every dispatch path, in
//! GFLOP/s (2 n k m per call), median of a few runs. `MATMUL_ONLY=q8_0,avx512vnni`
//! (any mix of type and level names) narrows the run, e.g. for `perf record`.

use std::time::Instant;

use mipha_kernels::cpu::dispatch::available;
use mipha_kernels::cpu::{self, PackedMatrix};
use mipha_kernels::quant::quantize_row;
use mipha_kernels::{Epilogue, QuantType, WeightView};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (n, k) = (
        *args.first().unwrap_or(&2560),
        *args.get(1).unwrap_or(&2560),
    );
    let ms: Vec<usize> = if args.len() > 2 {
        args[2..].to_vec()
    } else {
        vec![1, 64, 512]
    };
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 700.0)
        .collect();
    let only = std::env::var("MATMUL_ONLY").unwrap_or_default();
    let wanted = |name: &str, all: &[&str]| {
        let picked: Vec<&str> = only.split(',').filter(|o| all.contains(o)).collect();
        picked.is_empty() || picked.contains(&name)
    };
    let types = ["q4_0", "q8_0", "f16"];
    let levels: Vec<&str> = available().iter().map(|l| l.name()).collect();
    for ty in [QuantType::Q4_0, QuantType::Q8_0, QuantType::F16] {
        if !wanted(&ty.to_string(), &types) {
            continue;
        }
        let rb = ty.row_bytes(k);
        let mut data = vec![0u8; n * rb];
        for (src, dst) in w.chunks_exact(k).zip(data.chunks_exact_mut(rb)) {
            quantize_row(ty, src, dst);
        }
        let view = WeightView::new(ty, &data, n, k);
        let packed = PackedMatrix::pack(view);
        for &m in &ms {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0)
                .collect();
            let mut out = vec![0.0f32; m * n];
            let reps = if m == 1 { 50 } else { 5 };
            let flop = 2.0 * (n * k * m) as f64;
            print!("{ty} {n}x{k} m={m}:");
            if only.is_empty() {
                let t = time(reps, || cpu::matmul(&x, m, view, None, &mut out));
                print!(" f32-acts {:.1} GFLOP/s", flop / t / 1e9);
            }
            if let Some(p) = &packed {
                for level in available() {
                    if !wanted(level.name(), &levels) {
                        continue;
                    }
                    let t = time(reps, || {
                        cpu::matmul_packed_at(level, &x, m, p, None, Epilogue::Store, &mut out)
                    });
                    print!(" | {} {:.1}", level.name(), flop / t / 1e9);
                }
            }
            println!();
        }
    }
}
