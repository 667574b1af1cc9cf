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
        }
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
        self.seqs.insert(id, SeqState::default());
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
    /// pool nothing is allocated and the sequence is unchanged.
    pub fn reserve(&mut self, seq: SeqId, new_len: usize) -> Result<()> {
        let have = self.seq(seq)?.table.len();
        let need = self.blocks_for(new_len).saturating_sub(have);
        if need > self.free.len() {
            return Err(Error::KvCacheFull {
                seq,
                needed: need,
                free: self.free.len(),
                total: self.n_blocks,
            });
        }
        let at = self.free.len() - need;
        let blocks: Vec<u32> = self.free.drain(at..).rev().collect();
        self.seqs
            .get_mut(&seq)
            .expect("checked above")
            .table
            .extend(blocks);
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
