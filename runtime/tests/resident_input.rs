//! Rows kept on a device ([`Input::Resident`]) are refused by the CPU backend
//! with an error naming where they live, instead of being misread.

use std::any::Any;

use mipha_runtime::{
    Backend, CpuBackend, Input, MqfFile, MqfWriter, Op, PlanBuilder, ResidentRows, SeqRows, Step,
    Weights,
};

#[derive(Debug)]
struct Elsewhere;

impl ResidentRows for Elsewhere {
    fn rows(&self) -> usize {
        1
    }
    fn width(&self) -> usize {
        4
    }
    fn to_host(&self) -> mipha_runtime::Result<Vec<f32>> {
        Ok(vec![0.0; 4])
    }
    fn location(&self) -> String {
        "cuda:7".into()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[test]
fn cpu_backend_refuses_device_rows() {
    let mut b = PlanBuilder::new(2, 1, 4);
    let out = b.buffer("rows", 4);
    b.push(Op::Input { out });
    let plan = b.finish(out);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.mqf");
    MqfWriter::create(&path, Vec::new(), Vec::new())
        .unwrap()
        .finish()
        .unwrap();
    let weights = Weights::bind(&plan, std::sync::Arc::new(MqfFile::open(&path).unwrap())).unwrap();
    let mut cpu = CpuBackend::new(&plan, None, 1).unwrap();
    let rows = Elsewhere;
    let inputs = [Input::Resident {
        rows: &rows,
        row: 0,
    }];
    let step = Step {
        inputs: &inputs,
        seqs: &[SeqRows {
            rows: 1,
            first_pos: 0,
            block_table: &[],
        }],
        outputs: &[],
    };
    let err = cpu.execute(&plan, &weights, &step, None).unwrap_err();
    assert!(err.to_string().contains("cuda:7"), "{err}");
}
