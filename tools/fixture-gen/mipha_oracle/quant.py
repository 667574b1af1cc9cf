"""Weight round-trips: bf16, ggml Q8_0, ggml Q4_0 (numpy, bit-exact with ggml's reference quantizers).

Which tensors: every 2-D matrix except the SigLIP position embedding (embed_tokens, lm_head, all
q/k/v/dense/out_proj, fc1/fc2 of LM, vision and pooling head, head.attention.in_proj_weight,
mm_projector.0/2). 1-D tensors, the 4-D patch_embedding and the 3-D head.probe are untouched.

Blocks of 32 along the LAST dim (input features); a row whose length is not a multiple of 32 is
zero-padded to the next multiple before quantizing, and truncated afterwards.

Q8_0 (ggml quantize_row_q8_0_ref):  amax = max|x|; d = amax / 127 (f32); id = d ? 1/d : 0;
  q = roundf(x * id) (half away from zero); d stored as f16; x' = f32(f16(d)) * q.
Q4_0 (ggml quantize_row_q4_0_ref):  m = the signed element of largest |x| (first one on ties);
  d = m / -8; id = d ? 1/d : 0; q = min(15, (int8)(x * id + 8.5f)) (truncation, all f32);
  d stored as f16; x' = f32(f16(d)) * (q - 8).
BF16: round to nearest even of the f32 bit pattern.
"""

import numpy as np
import torch

BLOCK = 32
MODES = ("bf16", "q8_0", "q4_0")
RULES = {
    "bf16": "x' = bf16(x), round to nearest even",
    "q8_0": "d=max|x|/127, q=roundf(x*(1/d)) (half away from zero), d->f16, x'=f16(d)*q",
    "q4_0": "m=signed elem of max |x| (first), d=m/-8, q=min(15,trunc(x*(1/d)+8.5)) in f32, d->f16, x'=f16(d)*(q-8)",
}


def is_quantized(name, tensor):
    return tensor.dim() == 2 and not name.endswith("position_embedding.weight")


def _to_blocks(w):
    rows, k = w.shape
    kp = -(-k // BLOCK) * BLOCK
    if kp != k:
        w = np.concatenate([w, np.zeros((rows, kp - k), dtype=np.float32)], axis=1)
    return w.reshape(rows, kp // BLOCK, BLOCK), k


def _from_blocks(b, k):
    rows = b.shape[0]
    return np.ascontiguousarray(b.reshape(rows, -1)[:, :k])


def _roundf(v):
    """C roundf: half away from zero (numpy's round is half-to-even). Exact: v is f32, |v| small."""
    v64 = v.astype(np.float64)
    return (np.sign(v64) * np.floor(np.abs(v64) + 0.5)).astype(np.float32)


def _inv(d):
    out = np.zeros_like(d)
    nz = d != 0
    out[nz] = np.float32(1.0) / d[nz]
    return out


def q8_0_roundtrip(w):
    x, k = _to_blocks(np.asarray(w, dtype=np.float32))
    amax = np.max(np.abs(x), axis=-1)
    d = (amax / np.float32(127.0)).astype(np.float32)
    idv = _inv(d)
    q = _roundf((x * idv[..., None]).astype(np.float32))
    assert np.all(np.abs(q) <= 127)
    dh = d.astype(np.float16).astype(np.float32)
    return _from_blocks((dh[..., None] * q).astype(np.float32), k)


def q4_0_roundtrip(w):
    x, k = _to_blocks(np.asarray(w, dtype=np.float32))
    idx = np.argmax(np.abs(x), axis=-1)  # first maximal |x|, like ggml's strict '<' scan
    m = np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]
    d = (m / np.float32(-8.0)).astype(np.float32)
    idv = _inv(d)
    v = ((x * idv[..., None]).astype(np.float32) + np.float32(8.5)).astype(np.float32)
    q = np.minimum(np.float32(15.0), np.trunc(v)).astype(np.float32)
    assert np.all(q >= 0)
    dh = d.astype(np.float16).astype(np.float32)
    return _from_blocks((dh[..., None] * (q - np.float32(8.0))).astype(np.float32), k)


def bf16_roundtrip(w):
    x = np.ascontiguousarray(np.asarray(w, dtype=np.float32))
    u = x.view(np.uint32).astype(np.uint64)
    u = (u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))) & np.uint64(0xFFFF0000)
    return u.astype(np.uint32).view(np.float32)


ROUNDTRIP = {"bf16": bf16_roundtrip, "q8_0": q8_0_roundtrip, "q4_0": q4_0_roundtrip}


def quantize_state_dict(sd, mode):
    """Returns (new f32 state dict, list of quantized names, per-tensor error stats)."""
    fn = ROUNDTRIP[mode]
    out, names, stats = {}, [], {}
    for name, t in sd.items():
        t32 = t.detach().to(torch.float32)
        if is_quantized(name, t32):
            w = t32.numpy()
            wq = fn(w)
            out[name] = torch.from_numpy(wq)
            names.append(name)
            err = (wq.astype(np.float64) - w.astype(np.float64))
            stats[name] = {
                "shape": list(w.shape),
                "max_abs_err": float(np.max(np.abs(err))),
                "rmse": float(np.sqrt(np.mean(err * err))),
            }
        else:
            out[name] = t32
    return out, sorted(names), stats


def self_test():
    """Spot checks against hand-computed ggml behaviour and torch's bf16 cast."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((7, 77)).astype(np.float32)
    bt = torch.from_numpy(w).to(torch.bfloat16).to(torch.float32).numpy()
    assert np.array_equal(bf16_roundtrip(w), bt), "bf16 RNE differs from torch"
    # roundf: 0.5 -> 1, 2.5 -> 3, -2.5 -> -3 (numpy would give 0, 2, -2)
    assert list(_roundf(np.array([0.5, 2.5, -2.5, 1.49999988], dtype=np.float32))) == [1, 3, -3, 1]
    # vectorised == a scalar transcription of ggml's reference loops (odd row length -> padding)
    w = (rng.standard_normal((5, 70)) * rng.uniform(0.01, 3, (5, 1))).astype(np.float32)
    w[0, :32] = 0.0  # all-zero block
    w[1, 3] = -w[1, :32].__abs__().max() - 1  # negative max element
    w[2, 40:45] = [0.5, -0.5, 2.5, 1.5, -3.5]
    assert np.array_equal(q8_0_roundtrip(w), _scalar_ref(w, "q8_0"))
    assert np.array_equal(q4_0_roundtrip(w), _scalar_ref(w, "q4_0"))
    # Q4_0 example: block [1, -0.5, 0.25, 0, -1, 0...]: first max |x| is +1 -> d = -0.125;
    # -1 -> trunc(8 + 8.5) = 16 -> clamped to 15 -> -0.875 (the asymmetric end of Q4_0)
    blk = np.zeros((1, 32), dtype=np.float32)
    blk[0, :5] = [1.0, -0.5, 0.25, 0.0, -1.0]
    assert list(q4_0_roundtrip(blk)[0, :5]) == [1.0, -0.5, 0.25, 0.0, -0.875]
    # padding: a 33-long row equals quantizing [row[:32]] and [row[32], 0...] separately
    r = rng.standard_normal((1, 33)).astype(np.float32)
    a = q4_0_roundtrip(r)
    b = np.concatenate([q4_0_roundtrip(r[:, :32]), q4_0_roundtrip(r[:, 32:])], axis=1)
    assert np.array_equal(a, b)
    return True


def _scalar_ref(w, mode):
    """Element-by-element transcription of ggml's quantize_row_*_ref + dequantize_row_* (f32 scalars)."""
    import math

    f32 = np.float32
    rows, k = w.shape
    out = np.zeros_like(w)
    for r in range(rows):
        row = list(w[r]) + [f32(0.0)] * ((-k) % BLOCK)
        deq = []
        for b in range(0, len(row), BLOCK):
            x = [f32(v) for v in row[b : b + BLOCK]]
            if mode == "q8_0":
                amax = f32(0.0)
                for v in x:
                    amax = max(amax, f32(abs(v)))
                d = f32(amax / f32(127.0))
                idv = f32(f32(1.0) / d) if d != 0 else f32(0.0)
                dh = f32(np.float16(d))
                for v in x:
                    t = float(f32(v * idv))
                    q = math.copysign(math.floor(abs(t) + 0.5), t)
                    deq.append(f32(dh * f32(q)))
            else:
                amax, mx = f32(0.0), f32(0.0)
                for v in x:
                    if amax < abs(v):
                        amax, mx = f32(abs(v)), v
                d = f32(mx / f32(-8.0))
                idv = f32(f32(1.0) / d) if d != 0 else f32(0.0)
                dh = f32(np.float16(d))
                for v in x:
                    q = min(15, int(f32(f32(v * idv) + f32(8.5))))  # C cast truncates
                    deq.append(f32(dh * f32(q - 8)))
        out[r] = deq[:k]
    return out
