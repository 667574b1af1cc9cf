"""Random weights in the Mipha-3B checkpoint layout (names and shapes written out explicitly).

Scales are chosen so activations stay O(1) and greedy decoding is non-degenerate:
  LayerNorm weight 1 + 0.1 n, every bias 0.1 n, linear weight [out,in] n / sqrt(in),
  embed_tokens n, lm_head.weight 1.5 n / sqrt(H) (logit std ~1.5), position embedding 0.5 n,
  patch conv n / sqrt(3 p p), pooling-head probe n;  n ~ N(0,1).
Tensors are drawn in sorted-name order from one torch.Generator seeded with `seed`.
"""

import math

import torch

VT = "model.vision_tower.vision_model."


def tensor_shapes(sizes, vocab_size=51200):
    lm, vt = sizes["lm"], sizes["vision"]
    H, I = lm["hidden"], lm["intermediate"]
    D, Iv, p = vt["hidden"], vt["intermediate"], vt["patch_size"]
    P = (vt["image_size"] // p) ** 2
    assert H % lm["heads"] == 0 and D % vt["heads"] == 0
    sh = {
        "model.embed_tokens.weight": (vocab_size, H),
        "model.final_layernorm.weight": (H,),
        "model.final_layernorm.bias": (H,),
        "lm_head.weight": (vocab_size, H),
        "lm_head.bias": (vocab_size,),
        "model.mm_projector.0.weight": (H, D),
        "model.mm_projector.0.bias": (H,),
        "model.mm_projector.2.weight": (H, H),
        "model.mm_projector.2.bias": (H,),
    }
    for i in range(lm["layers"]):
        pre = f"model.layers.{i}."
        sh[pre + "input_layernorm.weight"] = (H,)
        sh[pre + "input_layernorm.bias"] = (H,)
        for n in ("q_proj", "k_proj", "v_proj", "dense"):
            sh[pre + f"self_attn.{n}.weight"] = (H, H)
            sh[pre + f"self_attn.{n}.bias"] = (H,)
        sh[pre + "mlp.fc1.weight"] = (I, H)
        sh[pre + "mlp.fc1.bias"] = (I,)
        sh[pre + "mlp.fc2.weight"] = (H, I)
        sh[pre + "mlp.fc2.bias"] = (H,)
    sh[VT + "embeddings.patch_embedding.weight"] = (D, 3, p, p)
    sh[VT + "embeddings.patch_embedding.bias"] = (D,)
    sh[VT + "embeddings.position_embedding.weight"] = (P, D)
    for i in range(vt["layers"]):
        pre = VT + f"encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sh[pre + f"self_attn.{n}.weight"] = (D, D)
            sh[pre + f"self_attn.{n}.bias"] = (D,)
        for n in ("layer_norm1", "layer_norm2"):
            sh[pre + f"{n}.weight"] = (D,)
            sh[pre + f"{n}.bias"] = (D,)
        sh[pre + "mlp.fc1.weight"] = (Iv, D)
        sh[pre + "mlp.fc1.bias"] = (Iv,)
        sh[pre + "mlp.fc2.weight"] = (D, Iv)
        sh[pre + "mlp.fc2.bias"] = (D,)
    sh[VT + "post_layernorm.weight"] = (D,)
    sh[VT + "post_layernorm.bias"] = (D,)
    sh[VT + "head.probe"] = (1, 1, D)
    sh[VT + "head.attention.in_proj_weight"] = (3 * D, D)
    sh[VT + "head.attention.in_proj_bias"] = (3 * D,)
    sh[VT + "head.attention.out_proj.weight"] = (D, D)
    sh[VT + "head.attention.out_proj.bias"] = (D,)
    sh[VT + "head.layernorm.weight"] = (D,)
    sh[VT + "head.layernorm.bias"] = (D,)
    sh[VT + "head.mlp.fc1.weight"] = (Iv, D)
    sh[VT + "head.mlp.fc1.bias"] = (Iv,)
    sh[VT + "head.mlp.fc2.weight"] = (D, Iv)
    sh[VT + "head.mlp.fc2.bias"] = (D,)
    return sh


def _scale(name, shape):
    is_norm = "layernorm" in name or "layer_norm" in name
    if is_norm and name.endswith(".weight"):
        return 0.1, 1.0
    if name.endswith("bias"):  # includes head.attention.in_proj_bias
        return 0.1, 0.0
    if name == "model.embed_tokens.weight":
        return 1.0, 0.0
    if name == "lm_head.weight":
        return 1.5 / math.sqrt(shape[1]), 0.0
    if name.endswith("position_embedding.weight"):
        return 0.5, 0.0
    if name.endswith("patch_embedding.weight"):
        return 1.0 / math.sqrt(shape[1] * shape[2] * shape[3]), 0.0
    if name.endswith("head.probe"):
        return 1.0, 0.0
    assert len(shape) == 2, name
    return 1.0 / math.sqrt(shape[1]), 0.0


def random_state_dict(sizes, seed, vocab_size=51200):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(tensor_shapes(sizes, vocab_size).items()):
        std, mean = _scale(name, shape)
        out[name] = torch.randn(shape, generator=g, dtype=torch.float32) * std + mean
    return out
