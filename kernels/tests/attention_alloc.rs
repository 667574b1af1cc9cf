//! Attention allocates nothing once warm: a counting global allocator sees every
//! allocation on every thread while `cpu::attention` and `cpu::attention_batch`
//! run, f32 and f16 KV, in a two-thread pool, decode batches of a few sequences,
//! a batch with a prefill chunk, and contexts growing past the length where the
//! rows pass splits over the keys.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use half::f16;
use mipha_kernels::{cpu, AttnSeq, KvElem, KvLayer};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

#[global_allocator]
static GLOBAL: Counting = Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::SeqCst) {
            ALLOCS.fetch_add(1, Ordering::SeqCst);
        }
        System.alloc(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::SeqCst) {
            ALLOCS.fetch_add(1, Ordering::SeqCst);
        }
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

const HEADS: usize = 8;
const HEAD_DIM: usize = 80;
const BLOCK: usize = 16;
/// Positions each sequence's table covers.
const CONTEXT: usize = 1400;

/// Runs one step: decode rows of `decode.len()` sequences at the given
/// positions (sequence `i` on blocks `tables[i]`), plus a prefill chunk of
/// `prefill` rows at position 0 on the last table if `prefill > 0`.
fn step<E: KvElem>(layer: &KvLayer<E>, tables: &[Vec<u32>], decode: &[usize], prefill: usize) {
    let mut seqs: Vec<AttnSeq> = decode
        .iter()
        .zip(tables)
        .map(|(&pos, t)| AttnSeq {
            rows: 1,
            first_pos: pos,
            block_table: t,
        })
        .collect();
    if prefill > 0 {
        seqs.push(AttnSeq {
            rows: prefill,
            first_pos: 0,
            block_table: tables.last().unwrap(),
        });
    }
    let rows = decode.len() + prefill;
    let q = vec![0.5f32; rows * HEADS * HEAD_DIM];
    let mut out = vec![0.0f32; q.len()];
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    // Only the kernels are counted, not the buffers above.
    COUNTING.store(true, Ordering::SeqCst);
    cpu::attention_batch(
        &q,
        HEADS,
        HEADS / 4,
        HEAD_DIM,
        layer,
        &seqs,
        true,
        scale,
        &mut out,
    );
    if let Some(first) = seqs.first() {
        let kv = layer.view(first.block_table);
        let n = HEADS * HEAD_DIM;
        cpu::attention(
            &q[..n],
            1,
            HEADS,
            HEADS / 4,
            HEAD_DIM,
            &kv,
            first.first_pos,
            true,
            scale,
            &mut out[..n],
        );
    }
    COUNTING.store(false, Ordering::SeqCst);
}

fn steps<E: KvElem>(warm: bool) -> usize {
    let n_seqs = 9;
    let per_seq = CONTEXT.div_ceil(BLOCK);
    let kv_dim = HEADS / 4 * HEAD_DIM;
    let pool = vec![E::from_f32(0.25); n_seqs * per_seq * BLOCK * kv_dim];
    let layer = KvLayer {
        k: &pool,
        v: &pool,
        block_size: BLOCK,
        kv_dim,
    };
    let tables: Vec<Vec<u32>> = (0..n_seqs)
        .map(|s| {
            (0..per_seq as u32)
                .map(|b| s as u32 * per_seq as u32 + b)
                .collect()
        })
        .collect();
    let before = ALLOCS.load(Ordering::SeqCst);
    // Warm-up: the largest batches first (scratch sized for them), three times so
    // that each thread has run tasks of each kind.
    let rounds = if warm { 3 } else { 1 };
    for _ in 0..rounds {
        for (decode, prefill) in [
            (&[100, 1030, 7, 500, 900, 64, 65, 300][..], 300),
            (&[100, 1030, 7, 500, 900, 64, 65, 300][..], 0),
            (&[5][..], 0),
        ] {
            step(&layer, &tables, decode, prefill);
        }
    }
    if warm {
        return ALLOCS.load(Ordering::SeqCst) - before;
    }
    // Steady state: fewer sequences, contexts growing across block edges and past
    // the split-K length, a prefill chunk of another length.
    for pos in (1000..1100).step_by(7) {
        step(&layer, &tables, &[pos, pos + 200, 3], 0);
        step(&layer, &tables, &[pos], 0);
        step(&layer, &tables, &[pos, 10, 20, 30, 40, 50, 60, 70], 100);
    }
    ALLOCS.load(Ordering::SeqCst) - before
}

#[test]
fn attention_allocates_nothing_once_warm() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    // Everything from inside the pool: a call from outside would go through
    // rayon's injector, which allocates a block per 63 jobs.
    pool.install(|| {
        // The counter sees the kernels' scratch being made.
        assert!(steps::<f32>(true) > 0, "no allocations seen while cold");
        steps::<f16>(true);
        let f32_allocs = steps::<f32>(false);
        let f16_allocs = steps::<f16>(false);
        assert_eq!(f32_allocs, 0, "f32 KV: allocations once warm");
        assert_eq!(f16_allocs, 0, "f16 KV: allocations once warm");
    });
}
