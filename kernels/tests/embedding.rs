//! cpu::embedding against reference::embedding (both exact: a gather plus the
//! row decoder), for every storage type, and the out-of-range error.

mod common;

use common::{quantize_matrix, Rng};
use mipha_kernels::quant::dequantize_row;
use mipha_kernels::{cpu, reference, QuantType, WeightView};

#[test]
fn gathers_dequantized_rows() {
    let mut rng = Rng::new(51);
    for ty in QuantType::ALL {
        for (rows, cols) in [(5, 1), (17, 33), (50, 80), (9, 200), (3, 2560)] {
            let table = rng.vec_normal(rows * cols, 1.0);
            let bytes = quantize_matrix(ty, &table, rows, cols);
            let view = WeightView::new(ty, &bytes, rows, cols);
            let ids: Vec<u32> = (0..11).map(|_| rng.below(rows) as u32).collect();
            let mut got = vec![f32::NAN; ids.len() * cols];
            cpu::embedding(view, &ids, &mut got).unwrap();
            let mut want = vec![0.0f32; ids.len() * cols];
            reference::embedding(view, &ids, &mut want).unwrap();
            assert_eq!(got, want, "{ty} {rows}x{cols}");
            let mut row = vec![0.0f32; cols];
            for (t, &id) in ids.iter().enumerate() {
                dequantize_row(ty, view.row(id as usize), &mut row);
                assert_eq!(&got[t * cols..(t + 1) * cols], &row[..], "{ty} id {id}");
            }
        }
    }
}

#[test]
fn out_of_range_id_is_an_error() {
    let bytes = quantize_matrix(QuantType::F16, &[1.0; 4 * 8], 4, 8);
    let view = WeightView::new(QuantType::F16, &bytes, 4, 8);
    let mut out = vec![7.0f32; 3 * 8];
    assert_eq!(cpu::embedding(view, &[0, 4, 1], &mut out), Err(4));
    assert!(
        out.iter().all(|&v| v == 7.0),
        "out must be untouched on error"
    );
    assert_eq!(
        reference::embedding(view, &[3, u32::MAX, 9], &mut out),
        Err(u32::MAX)
    );
    assert!(cpu::embedding(view, &[], &mut []).is_ok());
}
