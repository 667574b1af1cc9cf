//! Paged KV cache bookkeeping: a pool of fixed-size blocks, one block table per
//! sequence, and the shared prefix cache. Backends own the storage (host or
//! device memory); this owns which block belongs to whom, so every backend pages
//! the same way.
//!
//! **Prefix caching** (as vLLM's automatic prefix caching): a block that is full
//! can be *committed* under a hash chained over its content and every block
//! before it ([`BlockHash::chain`]). A new sequence whose first blocks have the
//! same hashes takes those blocks instead of computing them again
//! ([`BlockPool::attach_cached`]); blocks are reference-counted, so one block
//! serves every sequence that starts the same way (a system prompt, a picture
//! followed by the same words).
//!
//! A committed block is never written again: sequences only write positions at
//! or past their length, a shared block is always committed, and
//! [`BlockPool::truncate`] into a committed block gives it up instead of reusing
//! it. Blocks nobody holds wait in a free list in least-recently-used order:
//! blocks without a hash at the front (taken first), cached blocks behind them,
//! the most recently released last. Taking a cached block evicts it: its hash is
//! forgotten before anyone can write it, so an evicted block is never read as
//! cache again.
//!
//! Nothing here allocates once a sequence's table has its capacity
//! ([`BlockPool::with_sequence_capacity`]): the free list is intrusive and the
//! hash index is sized for every block up front, so a decode step stays
//! allocation-free.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub type SeqId = u64;

/// What one position of a sequence holds, as far as its KV is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PosKey {
    Token(u32),
    /// patch `index` of the picture whose content key is `image`
    Image {
        image: u128,
        index: u32,
    },
}

/// Content hash of a full block and of every block before it (SHA-256: one
/// caller must not be able to make another read KV of different content).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash(pub [u8; 32]);

impl std::fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…")
    }
}

impl BlockHash {
    /// The hash of a block holding `keys`, after the block hashed `parent`
    /// (`None` for a sequence's first block).
    pub fn chain(parent: Option<&BlockHash>, keys: impl IntoIterator<Item = PosKey>) -> Self {
        let mut h = Sha256::new();
        match parent {
            Some(p) => {
                h.update([1u8]);
                h.update(p.0);
            }
            None => h.update([0u8]),
        }
        for k in keys {
            match k {
                PosKey::Token(t) => {
                    h.update([b't']);
                    h.update(t.to_le_bytes());
                }
                PosKey::Image { image, index } => {
                    h.update([b'i']);
                    h.update(image.to_le_bytes());
                    h.update(index.to_le_bytes());
                }
            }
        }
        BlockHash(h.finalize().into())
    }
}

#[derive(Clone, Debug, Default)]
struct SeqState {
    table: Vec<u32>,
    /// positions holding valid K/V
    len: usize,
}

/// Marks the end of the intrusive free list.
const NIL: u32 = u32::MAX;

/// Allocates KV blocks to sequences. A block holds `block_size` positions of every
/// layer's K and V, so one table serves all layers.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    n_blocks: usize,
    /// sequences holding each block
    refs: Vec<u32>,
    /// the content hash of committed blocks
    hash: Vec<Option<BlockHash>>,
    by_hash: HashMap<BlockHash, u32>,
    /// The free list (blocks with no holder), doubly linked through these:
    /// `head` is taken first.
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    n_free: usize,
    seqs: HashMap<SeqId, SeqState>,
    next_seq: SeqId,
    /// blocks a new sequence's table has room for before it must grow
    table_capacity: usize,
    evictions: u64,
}

impl BlockPool {
    pub fn new(n_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        assert!(n_blocks < NIL as usize, "too many KV blocks");
        let mut pool = BlockPool {
            block_size,
            n_blocks,
            refs: vec![0; n_blocks],
            hash: vec![None; n_blocks],
            by_hash: HashMap::with_capacity(n_blocks),
            prev: vec![NIL; n_blocks],
            next: vec![NIL; n_blocks],
            head: NIL,
            tail: NIL,
            n_free: 0,
            seqs: HashMap::new(),
            next_seq: 0,
            table_capacity: 0,
            evictions: 0,
        };
        // Low block numbers first.
        for b in 0..n_blocks as u32 {
            pool.push_back(b);
        }
        pool
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

    /// Blocks no sequence holds (cached ones included: they are taken when needed).
    pub fn free_blocks(&self) -> usize {
        self.n_free
    }

    /// Blocks held by at least one sequence.
    pub fn used_blocks(&self) -> usize {
        self.n_blocks - self.n_free
    }

    /// Committed blocks (held or free) that a new sequence can find by hash.
    pub fn cached_blocks(&self) -> usize {
        self.by_hash.len()
    }

    /// Cached blocks evicted to make room since the pool was made.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Live sequences.
    pub fn sequences(&self) -> usize {
        self.seqs.len()
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

    /// New blocks `seq` needs to hold positions `0..new_len`.
    pub fn blocks_needed(&self, seq: SeqId, new_len: usize) -> Result<usize> {
        let have = self.seq(seq)?.table.len();
        Ok(self.blocks_for(new_len).saturating_sub(have))
    }

    /// Makes room for positions `0..new_len` of `seq`, taking free blocks
    /// (evicting the least recently used cached ones). All or nothing: on a full
    /// pool nothing is taken and the sequence is unchanged. Allocates nothing
    /// while the table stays within [`BlockPool::with_sequence_capacity`].
    pub fn reserve(&mut self, seq: SeqId, new_len: usize) -> Result<()> {
        let need = self.blocks_needed(seq, new_len)?;
        if need > self.n_free {
            return Err(Error::KvCacheFull {
                seq,
                needed: need,
                free: self.n_free,
                total: self.n_blocks,
            });
        }
        for _ in 0..need {
            let b = self.take_free();
            self.seqs
                .get_mut(&seq)
                .expect("checked above")
                .table
                .push(b);
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

    /// Forgets positions `len..` and gives up the blocks past them (rolling back
    /// a cancelled or failed step, or a conversation that changed). A committed
    /// block cut into is given up too, since it must not be written again: the
    /// sequence then keeps fewer positions. Returns the positions kept.
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<usize> {
        let bs = self.block_size;
        let state = self.seqs.get(&seq).ok_or(Error::UnknownSequence(seq))?;
        let mut len = len.min(state.len);
        if len % bs != 0 {
            let b = state.table[len / bs] as usize;
            if self.hash[b].is_some() {
                len = len / bs * bs;
            }
        }
        let keep = self.blocks_for(len);
        let state = self.seqs.get_mut(&seq).expect("checked above");
        state.len = len;
        let cut = state.table.len() - keep.min(state.table.len());
        for _ in 0..cut {
            let b = self
                .seqs
                .get_mut(&seq)
                .expect("checked above")
                .table
                .pop()
                .expect("non-empty");
            self.unref(b);
        }
        Ok(len)
    }

    /// Ends a sequence and gives up all its blocks. The last block is given up
    /// first, so a cached prefix outlives its own continuations in the LRU.
    pub fn release(&mut self, seq: SeqId) -> Result<()> {
        let state = self.seqs.remove(&seq).ok_or(Error::UnknownSequence(seq))?;
        for &b in state.table.iter().rev() {
            self.unref(b);
        }
        Ok(())
    }

    /// How many of `hashes` (a prompt's full blocks, in order) the cache holds
    /// as a prefix, and how many of those are free (would leave the free list
    /// if attached).
    pub fn lookup(&self, hashes: &[BlockHash]) -> (usize, usize) {
        let mut free = 0;
        let mut n = 0;
        for h in hashes {
            match self.by_hash.get(h) {
                Some(&b) => {
                    if self.refs[b as usize] == 0 {
                        free += 1;
                    }
                    n += 1;
                }
                None => break,
            }
        }
        (n, free)
    }

    /// Gives an empty sequence the cached blocks of the longest prefix of
    /// `hashes` the cache holds, as positions `0..n * block_size`. Returns `n`.
    pub fn attach_cached(&mut self, seq: SeqId, hashes: &[BlockHash]) -> Result<usize> {
        let state = self.seq(seq)?;
        if !state.table.is_empty() {
            return Err(Error::Other(format!(
                "sequence {seq}: cached blocks attach only to an empty sequence"
            )));
        }
        let mut n = 0;
        for h in hashes {
            let Some(&b) = self.by_hash.get(h) else { break };
            if self.refs[b as usize] == 0 {
                self.unlink(b);
            }
            self.refs[b as usize] += 1;
            let state = self.seqs.get_mut(&seq).expect("checked above");
            state.table.push(b);
            n += 1;
        }
        self.seqs.get_mut(&seq).expect("checked above").len = n * self.block_size;
        Ok(n)
    }

    /// Whether block `index` of `seq` is committed.
    pub fn is_committed(&self, seq: SeqId, index: usize) -> Result<bool> {
        let state = self.seq(seq)?;
        Ok(state
            .table
            .get(index)
            .is_some_and(|&b| self.hash[b as usize].is_some()))
    }

    /// Publishes block `index` of `seq`, which must be full, under `hash`, so
    /// later sequences with the same content take it. A block already committed,
    /// or content another block already holds, is left as it is. Returns whether
    /// the block was published.
    pub fn commit(&mut self, seq: SeqId, index: usize, hash: BlockHash) -> Result<bool> {
        let state = self.seq(seq)?;
        if state.len < (index + 1) * self.block_size {
            return Err(Error::Other(format!(
                "sequence {seq}: block {index} is not full ({} positions held)",
                state.len
            )));
        }
        let b = state.table[index];
        if self.hash[b as usize].is_some() || self.by_hash.contains_key(&hash) {
            return Ok(false);
        }
        self.hash[b as usize] = Some(hash);
        self.by_hash.insert(hash, b);
        Ok(true)
    }

    fn unref(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0, "block {b} released twice");
        *r -= 1;
        if *r == 0 {
            if self.hash[b as usize].is_some() {
                self.push_back(b);
            } else {
                self.push_front(b);
            }
        }
    }

    /// Takes the head of the free list (there is one), evicting its hash.
    fn take_free(&mut self) -> u32 {
        let b = self.head;
        debug_assert!(b != NIL, "take_free on an empty free list");
        self.unlink(b);
        if let Some(h) = self.hash[b as usize].take() {
            self.by_hash.remove(&h);
            self.evictions += 1;
        }
        self.refs[b as usize] = 1;
        b
    }

    fn push_back(&mut self, b: u32) {
        self.prev[b as usize] = self.tail;
        self.next[b as usize] = NIL;
        match self.tail {
            NIL => self.head = b,
            t => self.next[t as usize] = b,
        }
        self.tail = b;
        self.n_free += 1;
    }

    fn push_front(&mut self, b: u32) {
        self.next[b as usize] = self.head;
        self.prev[b as usize] = NIL;
        match self.head {
            NIL => self.tail = b,
            h => self.prev[h as usize] = b,
        }
        self.head = b;
        self.n_free += 1;
    }

    fn unlink(&mut self, b: u32) {
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        match p {
            NIL => self.head = n,
            p => self.next[p as usize] = n,
        }
        match n {
            NIL => self.tail = p,
            n => self.prev[n as usize] = p,
        }
        self.prev[b as usize] = NIL;
        self.next[b as usize] = NIL;
        self.n_free -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(tokens: &[u32], bs: usize) -> Vec<BlockHash> {
        let mut out: Vec<BlockHash> = Vec::new();
        for block in tokens.chunks_exact(bs) {
            let h = BlockHash::chain(out.last(), block.iter().map(|&t| PosKey::Token(t)));
            out.push(h);
        }
        out
    }

    #[test]
    fn hashes_chain_over_the_whole_prefix() {
        let a = hashes(&[1, 2, 3, 4], 2);
        let b = hashes(&[9, 9, 3, 4], 2);
        assert_ne!(a[1], b[1], "same block after different prefixes");
        assert_eq!(a, hashes(&[1, 2, 3, 4], 2));
        let img = |i| PosKey::Image { image: 5, index: i };
        let other = |i| PosKey::Image { image: 6, index: i };
        assert_ne!(
            BlockHash::chain(None, [img(0), img(1)]),
            BlockHash::chain(None, [other(0), other(1)])
        );
        assert_ne!(
            BlockHash::chain(None, [PosKey::Token(0)]),
            BlockHash::chain(None, [img(0)])
        );
    }

    #[test]
    fn shared_prefix_blocks_are_reference_counted() {
        let mut p = BlockPool::new(8, 2);
        let h = hashes(&[1, 2, 3, 4, 5, 6], 2);
        let a = p.new_sequence();
        p.reserve(a, 5).unwrap();
        p.set_len(a, 5).unwrap();
        assert!(p.commit(a, 0, h[0]).unwrap());
        assert!(p.commit(a, 1, h[1]).unwrap());
        assert!(p.commit(a, 2, h[2]).is_err(), "block 2 is not full");
        assert_eq!(p.free_blocks(), 5);

        let b = p.new_sequence();
        assert_eq!(p.lookup(&h), (2, 0));
        assert_eq!(p.attach_cached(b, &h).unwrap(), 2);
        assert_eq!(p.len(b).unwrap(), 4);
        assert_eq!(p.block_table(b).unwrap(), &p.block_table(a).unwrap()[..2]);
        assert_eq!(p.free_blocks(), 5, "shared blocks are not taken twice");

        p.release(a).unwrap();
        assert_eq!(p.free_blocks(), 6, "b still holds the prefix");
        p.release(b).unwrap();
        assert_eq!(p.free_blocks(), 8);
        assert_eq!(p.cached_blocks(), 2);

        // A new sequence finds the prefix among the free blocks.
        let c = p.new_sequence();
        assert_eq!(p.lookup(&h), (2, 2));
        assert_eq!(p.attach_cached(c, &h[..1]).unwrap(), 1);
        assert_eq!(p.free_blocks(), 7);
    }

    #[test]
    fn uncached_free_blocks_go_first_then_least_recently_used() {
        let mut p = BlockPool::new(4, 1);
        let h = hashes(&[1, 2, 3], 1);
        let a = p.new_sequence();
        p.reserve(a, 3).unwrap();
        p.set_len(a, 3).unwrap();
        for (i, &hh) in h.iter().enumerate() {
            p.commit(a, i, hh).unwrap();
        }
        p.release(a).unwrap();
        // Block 3 was never used, so it goes first; then the cached ones, the
        // end of the released sequence before its start.
        let b = p.new_sequence();
        p.reserve(b, 1).unwrap();
        assert_eq!(p.evictions(), 0);
        assert_eq!(p.lookup(&h), (3, 3));
        p.reserve(b, 2).unwrap();
        assert_eq!(p.evictions(), 1);
        assert_eq!(p.lookup(&h), (2, 2), "the last block went first");
        p.reserve(b, 4).unwrap();
        assert_eq!(p.lookup(&h), (0, 0));
        assert_eq!(p.cached_blocks(), 0, "evicted hashes are forgotten");
        let c = p.new_sequence();
        assert_eq!(p.attach_cached(c, &h).unwrap(), 0);
        assert!(matches!(p.reserve(c, 1), Err(Error::KvCacheFull { .. })));
    }

    #[test]
    fn truncating_into_a_committed_block_gives_it_up() {
        let mut p = BlockPool::new(4, 4);
        let h = hashes(&[1, 2, 3, 4], 4);
        let a = p.new_sequence();
        p.reserve(a, 6).unwrap();
        p.set_len(a, 6).unwrap();
        p.commit(a, 0, h[0]).unwrap();
        // Position 5 lies in the uncommitted second block: kept as asked.
        assert_eq!(p.truncate(a, 5).unwrap(), 5);
        // Position 2 lies in the committed first block: it must not be written.
        assert_eq!(p.truncate(a, 2).unwrap(), 0);
        assert!(p.block_table(a).unwrap().is_empty());
        assert_eq!(p.free_blocks(), 4);
        assert_eq!(p.cached_blocks(), 1, "the block stays cached");
    }

    #[test]
    fn duplicate_content_is_not_published_twice() {
        let mut p = BlockPool::new(4, 2);
        let h = hashes(&[1, 2], 2);
        let (a, b) = (p.new_sequence(), p.new_sequence());
        for s in [a, b] {
            p.reserve(s, 2).unwrap();
            p.set_len(s, 2).unwrap();
        }
        assert!(p.commit(a, 0, h[0]).unwrap());
        assert!(!p.commit(b, 0, h[0]).unwrap());
        assert!(!p.is_committed(b, 0).unwrap());
        assert_eq!(p.cached_blocks(), 1);
    }

    #[test]
    fn reserve_is_all_or_nothing() {
        let mut p = BlockPool::new(3, 2);
        let a = p.new_sequence();
        p.reserve(a, 4).unwrap();
        let err = p.reserve(a, 10).unwrap_err();
        assert!(
            matches!(
                err,
                Error::KvCacheFull {
                    needed: 3,
                    free: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(p.block_table(a).unwrap().len(), 2);
        assert_eq!(p.free_blocks(), 1);
    }
}
