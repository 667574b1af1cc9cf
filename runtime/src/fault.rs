//! Faults on demand, for tests of fault isolation (feature `fault-injection`,
//! never in a release build): a step whose inputs hold the poisoned token id
//! fails inside the CPU backend's first matmul, after it has taken its output
//! buffer, as a kernel's assertion or an allocation failure would.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::backend::{Input, Step};
use crate::{Error, Result};

/// How a poisoned step fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// the op returns an error
    Error,
    /// the op panics
    Panic,
}

const OFF: u64 = u64::MAX;
/// the poisoned token id in the low 32 bits; bit 32 set for a panic
static ARMED: AtomicU64 = AtomicU64::new(OFF);

/// Makes every step whose inputs hold `token` fail as `fault` (process-wide;
/// `None` disarms).
pub fn poison_token(token: Option<(u32, Fault)>) {
    let v = match token {
        None => OFF,
        Some((t, Fault::Error)) => u64::from(t),
        Some((t, Fault::Panic)) => u64::from(t) | 1 << 32,
    };
    ARMED.store(v, Relaxed);
}

/// Fails (or panics) when `step` is poisoned.
pub(crate) fn check(step: &Step) -> Result<()> {
    let v = ARMED.load(Relaxed);
    if v == OFF {
        return Ok(());
    }
    let token = v as u32;
    if !step
        .inputs
        .iter()
        .any(|i| matches!(i, Input::Token(t) if *t == token))
    {
        return Ok(());
    }
    if v >> 32 == 1 {
        panic!("injected fault: token {token} in the step");
    }
    Err(Error::Other(format!(
        "injected fault: token {token} in the step"
    )))
}
