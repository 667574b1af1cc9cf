//! The CPU path the engine runs. Same functions and signatures as
//! [`crate::reference`], which is what every function here is tested against.

use crate::reference;
pub use crate::{KvView, WeightView};

/// `out[m, n] = x[m, k] . W[n, k]^T (+ bias[n])`. `x` is row-major `[m, k]` with
/// `k = w.cols`; `out` is `[m, w.rows]`.
pub fn matmul(x: &[f32], m: usize, w: WeightView, bias: Option<&[f32]>, out: &mut [f32]) {
    reference::matmul(x, m, w, bias, out)
}

/// Row-wise LayerNorm over rows of `cols` elements (`rows = x.len() / cols`).
pub fn layer_norm(x: &[f32], cols: usize, weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    reference::layer_norm(x, cols, weight, bias, eps, out)
}

/// Tanh-approximation GELU (HF `gelu_new` / `gelu_pytorch_tanh`), in place.
pub fn gelu_tanh(x: &mut [f32]) {
    reference::gelu_tanh(x)
}

/// Exact erf GELU (torch `nn.GELU()`), in place.
pub fn gelu_erf(x: &mut [f32]) {
    reference::gelu_erf(x)
}

/// `dst += src`.
pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    reference::add_assign(dst, src)
}

/// Numerically stable softmax of one row, in place (an all `-inf` row becomes zeros).
pub fn softmax(row: &mut [f32]) {
    reference::softmax(row)
}

/// Partial rotate-half (NeoX) rotary embedding, in place. `x` is
/// `[T, n_heads * head_dim]`, `T = positions.len()`; in each head the first
/// `rot_dims` dims rotate with `inv_freq[j] = theta^(-2j/rot_dims)`, the rest pass through.
pub fn rope_partial(
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    rot_dims: usize,
    positions: &[usize],
    theta: f32,
) {
    reference::rope_partial(x, n_heads, head_dim, rot_dims, positions, theta)
}

/// Gathers rows `ids` of `table` into `out` (`[ids.len(), table.cols]`), dequantizing.
/// Returns `Err(id)` for an id outside the table, leaving `out` untouched.
pub fn embedding(table: WeightView, ids: &[u32], out: &mut [f32]) -> Result<(), u32> {
    reference::embedding(table, ids, out)
}

/// Multi-head attention for `n_tokens` query rows over a paged KV cache.
///
/// `q` and `out` are `[n_tokens, n_heads * head_dim]`. Query row `i` sits at
/// position `first_pos + i`; keys/values for positions `0..first_pos + n_tokens`
/// must already be in `kv`. Causal: row `i` attends keys `0..=first_pos + i`;
/// otherwise all keys. Query head `h` uses kv head `h / (n_heads / n_kv_heads)`.
/// Scores and softmax are f32; `scale` is usually `1/sqrt(head_dim)`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    n_tokens: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    kv: &KvView,
    first_pos: usize,
    causal: bool,
    scale: f32,
    out: &mut [f32],
) {
    reference::attention(
        q, n_tokens, n_heads, n_kv_heads, head_dim, kv, first_pos, causal, scale, out,
    )
}
