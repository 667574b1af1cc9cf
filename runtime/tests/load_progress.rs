//! Binding reports its slow part: with `cpu_repack` on, every repacked matmul
//! weight advances a "repacking weights" progress that ends at its total (the
//! packed weights' bytes); with it off (a GPU engine) nothing is repacked and
//! nothing is reported.

use std::sync::{Arc, Mutex};

use mipha_kernels::quant::quantize_row;
use mipha_runtime::{
    BindOptions, Epilogue, LoadProgress, MqfFile, MqfWriter, Op, PlanBuilder, QuantType, Rows,
    TensorSpec, Weights,
};

fn model(dir: &std::path::Path) -> (mipha_runtime::Plan, Arc<MqfFile>, u64) {
    let mut b = PlanBuilder::new(4, 1, 64);
    let x = b.buffer("x", 64);
    let y = b.buffer("y", 32);
    let z = b.buffer("z", 64);
    b.push(Op::Input { out: x });
    let mut bytes_packed = 0;
    let mut specs = Vec::new();
    for (name, ty, n, k, input, out) in [
        ("a", QuantType::Q8_0, 32, 64, x, y),
        ("b", QuantType::Q4_0, 64, 32, y, z),
    ] {
        let w = b.weight(name, &[n, k]);
        b.push(Op::MatMul {
            x: input,
            w,
            bias: None,
            out,
            rows: Rows::All,
            epilogue: Epilogue::Store,
        });
        specs.push(TensorSpec::new(
            name.to_string(),
            ty,
            vec![n as u64, k as u64],
        ));
        bytes_packed += (n * ty.row_bytes(k)) as u64;
    }
    let plan = b.finish(z);
    let path = dir.join("m.mqf");
    let mut wr = MqfWriter::create(&path, Vec::new(), specs.clone()).unwrap();
    for (i, s) in specs.iter().enumerate() {
        let (n, k) = (s.shape[0] as usize, s.shape[1] as usize);
        let rb = s.ty.row_bytes(k);
        let mut data = vec![0u8; n * rb];
        let row: Vec<f32> = (0..k).map(|j| (j as f32 * 0.37).sin()).collect();
        for dst in data.chunks_exact_mut(rb) {
            quantize_row(s.ty, &row, dst);
        }
        wr.write_tensor(i, &data).unwrap();
    }
    wr.finish().unwrap();
    (plan, Arc::new(MqfFile::open(&path).unwrap()), bytes_packed)
}

fn bind(cpu_repack: bool) -> (Weights, Vec<(String, u64, u64)>, u64) {
    let dir = tempfile::tempdir().unwrap();
    let (plan, file, total) = model(dir.path());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let progress = LoadProgress::new(move |stage, done, total| {
        log.lock().unwrap().push((stage.to_string(), done, total))
    });
    let options = BindOptions {
        int8_activations: true,
        bf16_dot: None,
        cpu_repack,
    };
    let w = Weights::bind_reporting(&plan, file, options, Some(&progress)).unwrap();
    let seen = seen.lock().unwrap().clone();
    (w, seen, total)
}

#[test]
fn repacking_reports_every_weight_up_to_the_total() {
    let (w, seen, total) = bind(true);
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen
        .iter()
        .all(|(s, _, t)| s == "repacking weights" && *t == total));
    assert!(seen.windows(2).all(|p| p[0].1 < p[1].1), "{seen:?}");
    assert_eq!(seen.last().unwrap().1, total);
    assert!(w.packed(mipha_runtime::WeightId(0)).is_some());
}

#[test]
fn no_repack_for_a_gpu_means_no_panels_and_no_reports() {
    let (w, seen, _) = bind(false);
    assert!(seen.is_empty(), "{seen:?}");
    assert!(w.packed(mipha_runtime::WeightId(0)).is_none());
    assert!(w.packed(mipha_runtime::WeightId(1)).is_none());
}
