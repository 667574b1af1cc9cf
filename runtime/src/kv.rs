//! Paged KV cache bookkeeping: a pool of fixed-size blocks and one block table per
//! sequence. Backends own the storage (host or device memory); this owns which
//! block belongs to whom, so every backend pages the same way.

use std::collections::HashMap;

use crate::error::{Error, Result};

pub type SeqId = u64;

#[derive(Clone, Debug, Default)]
struct SeqState {
    table: Vec<u32>,
    /// positions holding valid K/V
    len: usize,
}

/// Allocates KV blocks to sequences. A block holds `block_size` positions of every
/// layer's K and V, so one table serves all layers.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    n_blocks: usize,
    free: Vec<u32>,
    seqs: HashMap<SeqId, SeqState>,
    next_seq: SeqId,
    /// blocks a new sequence's table has room for before it must grow
    table_capacity: usize,
}

impl BlockPool {
    pub fn new(n_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        assert!(n_blocks <= u32::MAX as usize, "too many KV blocks");
        BlockPool {
            block_size,
            n_blocks,
            // Popping from the end hands out low block numbers first.
            free: (0..n_blocks as u32).rev().collect(),
            seqs: HashMap::new(),
            next_seq: 0,
            table_capacity: 0,
        }
    }

    /// Gives every new sequence's block table room for `positions` positions
    /// (e.g. the model's context) up front, so [`BlockPool::reserve`] never
    /// reallocates a table while a sequence grows (decode steps allocate nothing).
    pub fn with_sequence_capacity(mut self, positions: usize) -> Self {
        self.table_capacity = self.blocks_for(positions).min(self.n_blocks);
        self
    }

    /// Blocks needed for `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.n_blocks
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn new_sequence(&mut self) -> SeqId {
        let id = self.next_seq;
        self.next_seq += 1;
        let state = SeqState {
            table: Vec::with_capacity(self.table_capacity),
            len: 0,
        };
        self.seqs.insert(id, state);
        id
    }

    fn seq(&self, seq: SeqId) -> Result<&SeqState> {
        self.seqs.get(&seq).ok_or(Error::UnknownSequence(seq))
    }

    /// Positions of `seq` holding valid K/V.
    pub fn len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.seq(seq)?.len)
    }

    pub fn block_table(&self, seq: SeqId) -> Result<&[u32]> {
        Ok(&self.seq(seq)?.table)
    }

    /// Makes room for positions `0..new_len` of `seq`. All or nothing: on a full
    /// pool nothing is allocated and the sequence is unchanged. Allocates nothing
    /// while the table stays within [`BlockPool::with_sequence_capacity`].
    pub fn reserve(&mut self, seq: SeqId, new_len: usize) -> Result<()> {
        let blocks = self.blocks_for(new_len);
        let state = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq))?;
        let need = blocks.saturating_sub(state.table.len());
        if need > self.free.len() {
            return Err(Error::KvCacheFull {
                seq,
                needed: need,
                free: self.free.len(),
                total: self.n_blocks,
            });
        }
        for _ in 0..need {
            state.table.push(self.free.pop().expect("checked above"));
        }
        Ok(())
    }

    /// Records that positions `0..len` now hold valid K/V.
    pub fn set_len(&mut self, seq: SeqId, len: usize) -> Result<()> {
        let cap = self.seq(seq)?.table.len() * self.block_size;
        if len > cap {
            return Err(Error::Other(format!(
                "sequence {seq}: length {len} exceeds its {cap} reserved positions"
            )));
        }
        self.seqs.get_mut(&seq).expect("checked above").len = len;
        Ok(())
    }

    /// Forgets positions `len..` and returns whole blocks past them to the pool
    /// (used to roll back a cancelled or failed step).
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<()> {
        let keep = self.blocks_for(len);
        let state = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq))?;
        state.len = state.len.min(len);
        while state.table.len() > keep {
            self.free.push(state.table.pop().expect("non-empty"));
        }
        Ok(())
    }

    /// Ends a sequence and returns all its blocks.
    pub fn release(&mut self, seq: SeqId) -> Result<()> {
        let state = self.seqs.remove(&seq).ok_or(Error::UnknownSequence(seq))?;
        self.free.extend(state.table.into_iter().rev());
        Ok(())
    }
}
