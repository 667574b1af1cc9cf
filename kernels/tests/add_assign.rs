//! cpu::add_assign is exact (one f32 add per element), so it must equal the reference.

mod common;

use common::Rng;
use mipha_kernels::{cpu, reference};

#[test]
fn matches_reference_exactly() {
    let mut rng = Rng::new(41);
    // Includes lengths that take the threaded path.
    for n in [0usize, 1, 7, 8, 9, 2560, 4304, 70_001, 200_000] {
        let a = rng.vec_normal(n, 2.0);
        let b = rng.vec_normal(n, 2.0);
        let mut want = a.clone();
        reference::add_assign(&mut want, &b);
        let mut got = a.clone();
        cpu::add_assign(&mut got, &b);
        assert_eq!(got, want, "n={n}");
    }
}
