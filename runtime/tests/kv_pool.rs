//! The paged KV block pool: allocation, release, rollback, and a full pool that
//! fails one sequence without touching its neighbours.

use mipha_runtime::{BlockPool, Error};

#[test]
fn blocks_are_allocated_per_block_size_and_returned_on_release() {
    let mut pool = BlockPool::new(8, 16);
    let a = pool.new_sequence();
    pool.reserve(a, 1).unwrap();
    assert_eq!(pool.block_table(a).unwrap().len(), 1);
    pool.reserve(a, 16).unwrap();
    assert_eq!(pool.block_table(a).unwrap().len(), 1);
    pool.reserve(a, 17).unwrap();
    assert_eq!(pool.block_table(a).unwrap().len(), 2);
    pool.set_len(a, 17).unwrap();
    assert_eq!(pool.len(a).unwrap(), 17);
    assert_eq!(pool.free_blocks(), 6);
    pool.release(a).unwrap();
    assert_eq!(pool.free_blocks(), 8);
    assert!(matches!(pool.len(a), Err(Error::UnknownSequence(_))));
}

#[test]
fn a_full_pool_is_a_typed_error_and_leaves_every_sequence_intact() {
    let mut pool = BlockPool::new(4, 16);
    let a = pool.new_sequence();
    let b = pool.new_sequence();
    pool.reserve(a, 40).unwrap(); // 3 blocks
    pool.set_len(a, 40).unwrap();
    let table_a = pool.block_table(a).unwrap().to_vec();
    let err = pool.reserve(b, 33).unwrap_err(); // needs 3, 1 free
    assert!(err.to_string().contains("KV cache full"), "{err}");
    match err {
        Error::KvCacheFull {
            seq,
            needed,
            free,
            total,
        } => {
            assert_eq!((seq, needed, free, total), (b, 3, 1, 4));
        }
        other => panic!("expected KvCacheFull, got {other:?}"),
    }
    // nothing was half-allocated
    assert_eq!(pool.block_table(b).unwrap().len(), 0);
    assert_eq!(pool.free_blocks(), 1);
    assert_eq!(pool.block_table(a).unwrap(), table_a.as_slice());
    assert_eq!(pool.len(a).unwrap(), 40);
    // what fits still works
    pool.reserve(b, 16).unwrap();
    assert_eq!(pool.free_blocks(), 0);
}

#[test]
fn sequences_never_share_blocks() {
    let mut pool = BlockPool::new(64, 4);
    let seqs: Vec<_> = (0..5).map(|_| pool.new_sequence()).collect();
    for (i, &s) in seqs.iter().enumerate() {
        pool.reserve(s, 5 + 7 * i).unwrap();
    }
    pool.release(seqs[2]).unwrap();
    let s = pool.new_sequence();
    pool.reserve(s, 30).unwrap();
    let mut seen = std::collections::HashSet::new();
    for &q in seqs.iter().filter(|&&q| q != seqs[2]).chain([&s]) {
        for &b in pool.block_table(q).unwrap() {
            assert!(seen.insert(b), "block {b} handed out twice");
            assert!((b as usize) < 64);
        }
    }
}

#[test]
fn truncate_rolls_back_and_frees_whole_blocks() {
    let mut pool = BlockPool::new(8, 4);
    let a = pool.new_sequence();
    pool.reserve(a, 10).unwrap();
    pool.set_len(a, 10).unwrap();
    assert_eq!(pool.free_blocks(), 5);
    pool.truncate(a, 5).unwrap();
    assert_eq!(pool.len(a).unwrap(), 5);
    assert_eq!(pool.block_table(a).unwrap().len(), 2);
    assert_eq!(pool.free_blocks(), 6);
    assert!(
        pool.set_len(a, 9).is_err(),
        "cannot claim unreserved positions"
    );
    assert!(matches!(
        pool.reserve(99, 1),
        Err(Error::UnknownSequence(99))
    ));
}
