//! The paged KV cache's scatter and the attention kernels: prefill (causal or
//! not) and split-K decode, for one sequence or a batch of rows.

use super::*;

impl Device {
    /// [`crate::reference::kv_store`] of rows `src` (`[n, kv_dim]`) into a paged
    /// pool (f32, or f16 rounded to nearest even) at sequence positions
    /// `first_pos..first_pos + n`, through `block_table` (the layout of
    /// [`crate::KvView`]). Every table entry used must be below the pool's blocks.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_scatter<E: DeviceKvElem>(
        &self,
        src: &impl DeviceIn<f32>,
        n: usize,
        kv_dim: usize,
        pool: &mut impl DeviceOut<E>,
        block_table: &impl DeviceIn<u32>,
        block_size: usize,
        first_pos: usize,
    ) -> Result<()> {
        assert_eq!(src.len(), n * kv_dim, "kv_scatter: src is not [n, kv_dim]");
        assert!(block_size > 0, "kv_scatter: block_size must be > 0");
        assert!(
            block_table.len() * block_size >= first_pos + n,
            "kv_scatter: block table too short"
        );
        if n == 0 {
            return Ok(());
        }
        let table = block_table.view();
        self.kv_scatter_launch(src, n, kv_dim, pool, &table, block_size, first_pos, None)
    }

    /// [`Device::kv_scatter`] at the positions held on the device (`positions[i]`
    /// for row i; written before a CUDA graph replay). The caller guarantees the
    /// table covers them and addresses blocks of the pool.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_scatter_at<E: DeviceKvElem>(
        &self,
        src: &impl DeviceIn<f32>,
        n: usize,
        kv_dim: usize,
        pool: &mut impl DeviceOut<E>,
        block_table: &impl DeviceIn<u32>,
        block_size: usize,
        positions: &impl DeviceIn<u32>,
    ) -> Result<()> {
        assert_eq!(src.len(), n * kv_dim, "kv_scatter: src is not [n, kv_dim]");
        assert!(block_size > 0, "kv_scatter: block_size must be > 0");
        assert!(
            positions.len() >= n,
            "kv_scatter: fewer positions than rows"
        );
        if n == 0 {
            return Ok(());
        }
        let (table, pos) = (block_table.view(), positions.view());
        let rows = (&pos, None);
        self.kv_scatter_launch(src, n, kv_dim, pool, &table, block_size, 0, Some(rows))
    }

    /// [`Device::kv_scatter`] for a batch: row i goes to position
    /// `rows.positions[i]` of its own sequence, through the table at
    /// `rows.table_start[i]` in `rows.tables` (as the CPU backend stores a
    /// step's sequences). The caller guarantees what [`DeviceRows`] says.
    pub fn kv_scatter_rows<E: DeviceKvElem>(
        &self,
        src: &impl DeviceIn<f32>,
        n: usize,
        kv_dim: usize,
        pool: &mut impl DeviceOut<E>,
        block_size: usize,
        rows: &DeviceRows,
    ) -> Result<()> {
        assert_eq!(src.len(), n * kv_dim, "kv_scatter: src is not [n, kv_dim]");
        assert!(block_size > 0, "kv_scatter: block_size must be > 0");
        rows.check(n, "kv_scatter");
        if n == 0 {
            return Ok(());
        }
        let r = (&rows.positions, Some(&rows.table_start));
        self.kv_scatter_launch(src, n, kv_dim, pool, &rows.tables, block_size, 0, Some(r))
    }

    #[allow(clippy::too_many_arguments)]
    fn kv_scatter_launch<E: DeviceKvElem>(
        &self,
        src: &impl DeviceIn<f32>,
        n: usize,
        kv_dim: usize,
        pool: &mut impl DeviceOut<E>,
        table: &CudaView<'_, u32>,
        block_size: usize,
        first_pos: usize,
        // (positions, table starts)
        rows: Option<(&CudaView<'_, u32>, Option<&CudaView<'_, u32>>)>,
    ) -> Result<()> {
        assert!(
            kv_dim > 0 && pool.len().is_multiple_of(kv_dim),
            "kv_scatter: pool is not [slots, kv_dim]"
        );
        let (bs, fp) = (
            i32_of(block_size, "block_size"),
            i32_of(first_pos, "first_pos"),
        );
        let (nn, d) = (i32_of(n, "n"), i32_of(kv_dim, "kv_dim"));
        let (src, mut pool) = (src.view(), pool.view_mut());
        let mut b = self.stream.launch_builder(self.func(E::SCATTER));
        b.arg(&src).arg(&mut pool).arg(table).arg(&bs).arg(&fp);
        match rows {
            Some((p, _)) => b.arg(p),
            None => b.arg(&NULL),
        };
        match rows.and_then(|(_, s)| s) {
            Some(s) => b.arg(s),
            None => b.arg(&NULL),
        };
        b.arg(&nn).arg(&d);
        // SAFETY: argument types and count match the kernel; the callers checked
        // (host positions) or guarantee (device positions) that each row's table
        // covers its position and names blocks of the pool.
        unsafe { b.launch(grid_stride(n * kv_dim)) }?;
        Ok(())
    }

    fn check_heads(n_heads: usize, n_kv_heads: usize, head_dim: usize, kv_dim: usize) {
        assert!(
            n_kv_heads > 0 && n_heads.is_multiple_of(n_kv_heads),
            "attention: n_heads {n_heads} not a multiple of n_kv_heads {n_kv_heads}"
        );
        assert!(
            head_dim > 0 && head_dim <= MAX_HEAD_DIM,
            "attention: head_dim {head_dim} outside 1..={MAX_HEAD_DIM}"
        );
        assert_eq!(kv_dim, n_kv_heads * head_dim, "attention: kv_dim");
    }

    #[allow(clippy::too_many_arguments)]
    fn check_attention<E: DeviceKvElem>(
        q: &impl DeviceIn<f32>,
        n_tokens: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        kv: &DeviceKv<E>,
        first_pos: usize,
        out: &impl DeviceIn<f32>,
    ) {
        Self::check_heads(n_heads, n_kv_heads, head_dim, kv.kv_dim);
        assert_eq!(q.len(), n_tokens * n_heads * head_dim, "attention: q shape");
        assert_eq!(out.len(), q.len(), "attention: out shape");
        assert!(kv.block_size > 0, "attention: block_size must be > 0");
        assert!(
            kv.n_blocks <= kv.block_table.len(),
            "attention: n_blocks > table"
        );
        assert!(
            kv.n_blocks * kv.block_size >= first_pos + n_tokens,
            "attention: block table too short"
        );
        assert_eq!(kv.k.len(), kv.v.len(), "attention: K and V pools differ");
    }

    /// [`crate::reference::attention`] with the flash-style prefill kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prefill<E: DeviceKvElem>(
        &self,
        q: &impl DeviceIn<f32>,
        n_tokens: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        kv: &DeviceKv<E>,
        first_pos: usize,
        causal: bool,
        scale: f32,
        out: &mut impl DeviceOut<f32>,
    ) -> Result<()> {
        Self::check_attention(
            q, n_tokens, n_heads, n_kv_heads, head_dim, kv, first_pos, &*out,
        );
        if n_tokens == 0 {
            return Ok(());
        }
        let ints = [
            i32_of(kv.block_size, "block_size"),
            i32_of(kv.kv_dim, "kv_dim"),
            i32_of(n_tokens, "n_tokens"),
            i32_of(n_heads, "n_heads"),
            i32_of(n_kv_heads, "n_kv_heads"),
            i32_of(head_dim, "head_dim"),
            i32_of(first_pos, "first_pos"),
            causal as i32,
        ];
        let cfg = LaunchConfig {
            grid_dim: (n_tokens.div_ceil(16) as u32, n_heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(self.func(E::PREFILL));
        let (q, mut out) = (q.view(), out.view_mut());
        b.arg(&q).arg(kv.k).arg(kv.v).arg(&kv.block_table);
        for v in &ints {
            b.arg(v);
        }
        b.arg(&scale).arg(&mut out);
        // SAFETY: shapes and the block table's coverage checked above.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::reference::attention`] with the paged decode kernel, split over the
    /// sequence in chunks of [`DECODE_CHUNK`] keys and merged by a second kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode<E: DeviceKvElem>(
        &self,
        q: &impl DeviceIn<f32>,
        n_tokens: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        kv: &DeviceKv<E>,
        first_pos: usize,
        causal: bool,
        scale: f32,
        out: &mut impl DeviceOut<f32>,
    ) -> Result<()> {
        Self::check_attention(
            q, n_tokens, n_heads, n_kv_heads, head_dim, kv, first_pos, &*out,
        );
        if n_tokens == 0 {
            return Ok(());
        }
        let n_splits = (first_pos + n_tokens).div_ceil(DECODE_CHUNK).max(1);
        let mut scratch = self.op_scratch.lock().unwrap_or_else(|e| e.into_inner());
        let ws = crate::cuda::grown(
            &self.stream,
            &mut scratch.attn,
            decode_workspace_len(n_tokens, n_heads, head_dim, n_splits * DECODE_CHUNK),
        )?;
        let shape = DecodeShape {
            n_tokens,
            n_heads,
            n_kv_heads,
            head_dim,
            n_splits,
        };
        let pools = DeviceKvLayer {
            k: kv.k,
            v: kv.v,
            block_size: kv.block_size,
            kv_dim: kv.kv_dim,
        };
        // ws stays in the device's scratch for the next call: the stream orders
        // that call's kernels after these.
        let at = DecodeAt::Host(first_pos);
        self.decode_launch(
            q,
            &shape,
            &pools,
            &kv.block_table,
            at,
            causal,
            scale,
            ws,
            out,
        )
    }

    /// [`Device::attention_decode`] with the rows' positions on the device
    /// (`positions[i]` for row i, written before a CUDA graph replay) and a
    /// caller-owned workspace of [`decode_workspace_len`] for `max_keys`. The split
    /// count is sized for `kv.n_blocks * kv.block_size` keys whatever the
    /// positions are (splits past a row's keys exit at once), so the launch is
    /// the same at every position and can be captured once. The caller
    /// guarantees `positions[i] < kv.n_blocks * kv.block_size`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode_at<E: DeviceKvElem>(
        &self,
        q: &impl DeviceIn<f32>,
        n_tokens: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        kv: &DeviceKv<E>,
        positions: &impl DeviceIn<u32>,
        causal: bool,
        scale: f32,
        ws: &mut CudaSlice<f32>,
        out: &mut impl DeviceOut<f32>,
    ) -> Result<()> {
        Self::check_attention(q, n_tokens, n_heads, n_kv_heads, head_dim, kv, 0, &*out);
        assert!(
            positions.len() >= n_tokens,
            "attention: fewer positions than rows"
        );
        if n_tokens == 0 {
            return Ok(());
        }
        let max_keys = kv.n_blocks * kv.block_size;
        let n_splits = max_keys.div_ceil(DECODE_CHUNK).max(1);
        assert!(
            ws.len() >= decode_workspace_len(n_tokens, n_heads, head_dim, max_keys),
            "attention: decode workspace too small"
        );
        let shape = DecodeShape {
            n_tokens,
            n_heads,
            n_kv_heads,
            head_dim,
            n_splits,
        };
        let pools = DeviceKvLayer {
            k: kv.k,
            v: kv.v,
            block_size: kv.block_size,
            kv_dim: kv.kv_dim,
        };
        let pos = positions.view();
        let at = DecodeAt::Device(&pos);
        self.decode_launch(
            q,
            &shape,
            &pools,
            &kv.block_table,
            at,
            causal,
            scale,
            ws,
            out,
        )
    }

    /// [`crate::reference::attention_batch`] with the paged decode kernel: row i
    /// (of any of the batch's sequences) at `rows.positions[i]`, through its own
    /// sequence's table, attending its keys `0..position + 1` (causal) or
    /// `0..rows.seq_end[i]`. The split count is sized for `max_keys` keys, which
    /// the caller guarantees no row exceeds (a CUDA graph sizes it for the whole
    /// pool; plain launches for the batch's longest sequence), and `ws` holds
    /// [`decode_workspace_len`] for `n_tokens` rows and `max_keys`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode_rows<E: DeviceKvElem>(
        &self,
        q: &impl DeviceIn<f32>,
        n_tokens: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        kv: &DeviceKvLayer<E>,
        rows: &DeviceRows,
        max_keys: usize,
        causal: bool,
        scale: f32,
        ws: &mut CudaSlice<f32>,
        out: &mut impl DeviceOut<f32>,
    ) -> Result<()> {
        Self::check_heads(n_heads, n_kv_heads, head_dim, kv.kv_dim);
        assert_eq!(q.len(), n_tokens * n_heads * head_dim, "attention: q shape");
        assert_eq!(out.len(), q.len(), "attention: out shape");
        assert!(kv.block_size > 0, "attention: block_size must be > 0");
        assert_eq!(kv.k.len(), kv.v.len(), "attention: K and V pools differ");
        rows.check(n_tokens, "attention");
        if n_tokens == 0 {
            return Ok(());
        }
        let n_splits = max_keys.div_ceil(DECODE_CHUNK).max(1);
        assert!(
            ws.len() >= decode_workspace_len(n_tokens, n_heads, head_dim, max_keys),
            "attention: decode workspace too small"
        );
        let shape = DecodeShape {
            n_tokens,
            n_heads,
            n_kv_heads,
            head_dim,
            n_splits,
        };
        let at = DecodeAt::Rows(rows);
        self.decode_launch(q, &shape, kv, &rows.tables, at, causal, scale, ws, out)
    }

    #[allow(clippy::too_many_arguments)]
    fn decode_launch<E: DeviceKvElem>(
        &self,
        q: &impl DeviceIn<f32>,
        sh: &DecodeShape,
        kv: &DeviceKvLayer<E>,
        table: &CudaView<'_, u32>,
        at: DecodeAt,
        causal: bool,
        scale: f32,
        ws: &mut CudaSlice<f32>,
        out: &mut impl DeviceOut<f32>,
    ) -> Result<()> {
        let first_pos = match at {
            DecodeAt::Host(p) => p,
            _ => 0,
        };
        let ints = [
            i32_of(kv.block_size, "block_size"),
            i32_of(kv.kv_dim, "kv_dim"),
            i32_of(sh.n_tokens, "n_tokens"),
            i32_of(sh.n_heads, "n_heads"),
            i32_of(sh.n_kv_heads, "n_kv_heads"),
            i32_of(sh.head_dim, "head_dim"),
            i32_of(first_pos, "first_pos"),
        ];
        // grid y and z are at most 65535 (the callers size them within)
        assert!(
            sh.n_splits <= MAX_GRID_YZ && sh.n_tokens <= MAX_GRID_YZ,
            "attention: {} splits x {} rows exceed the decode grid",
            sh.n_splits,
            sh.n_tokens
        );
        let causal = causal as i32;
        let chunk = DECODE_CHUNK as i32;
        {
            let cfg = LaunchConfig {
                grid_dim: (sh.n_heads as u32, sh.n_splits as u32, sh.n_tokens as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream.launch_builder(self.func(E::DECODE));
            let q = q.view();
            b.arg(&q).arg(kv.k).arg(kv.v).arg(table);
            for v in &ints {
                b.arg(v);
            }
            match at {
                DecodeAt::Host(_) => b.arg(&NULL).arg(&NULL).arg(&NULL),
                DecodeAt::Device(p) => b.arg(p).arg(&NULL).arg(&NULL),
                DecodeAt::Rows(r) => b.arg(&r.positions).arg(&r.table_start).arg(&r.seq_end),
            };
            b.arg(&causal).arg(&scale).arg(&chunk).arg(&mut *ws);
            // SAFETY: argument types and count match the kernel; shapes checked by
            // the callers; ws holds every split's partial; the tables cover every
            // row's keys (checked on the host, or guaranteed by the caller).
            unsafe { b.launch(cfg) }?;
        }
        let (ns, nh, hd) = (sh.n_splits as i32, sh.n_heads as i32, sh.head_dim as i32);
        let cfg = LaunchConfig {
            grid_dim: (sh.n_heads as u32, sh.n_tokens as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(self.func("attn_decode_combine"));
        let mut out = out.view_mut();
        b.arg(&*ws).arg(&ns).arg(&nh).arg(&hd).arg(&mut out);
        // SAFETY: as above.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Decode kernel for up to [`DECODE_MAX_ROWS`] rows, prefill kernel above.
    #[allow(clippy::too_many_arguments)]
    pub fn attention<E: DeviceKvElem>(
        &self,
        q: &impl DeviceIn<f32>,
        n_tokens: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        kv: &DeviceKv<E>,
        first_pos: usize,
        causal: bool,
        scale: f32,
        out: &mut impl DeviceOut<f32>,
    ) -> Result<()> {
        if n_tokens <= DECODE_MAX_ROWS {
            self.attention_decode(
                q, n_tokens, n_heads, n_kv_heads, head_dim, kv, first_pos, causal, scale, out,
            )
        } else {
            self.attention_prefill(
                q, n_tokens, n_heads, n_kv_heads, head_dim, kv, first_pos, causal, scale, out,
            )
        }
    }
}

/// Where the decode kernel's rows stand.
#[derive(Clone, Copy)]
enum DecodeAt<'r, 'a> {
    /// rows `first_pos..`, one sequence
    Host(usize),
    /// `positions[i]`, one sequence
    Device(&'r CudaView<'a, u32>),
    /// a batch: each row with its own position, table and end
    Rows(&'r DeviceRows<'a>),
}
