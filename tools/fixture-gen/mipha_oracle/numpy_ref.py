"""A second, transformers-free forward pass in float64 numpy, straight from the checkpoint tensors.

Used only as a self-check of the transformers-based oracle (guards against library-version quirks:
partial rotary, attention scaling, GELU variants, the -2 layer choice, splicing). Written from
shared/reference/mipha-architecture.md sections 4, 6, 7 and 11.
"""

import math

import numpy as np

from . import IMAGE_TOKEN_INDEX

_erf = np.frompyfunc(math.erf, 1, 1)


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _gelu_erf(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def _lin(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _softmax(s):
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


class NumpyMipha:
    def __init__(self, config, state_dict):
        self.sd = {k: v.detach().double().numpy() for k, v in state_dict.items()}
        self.cfg = config
        self.tower = config["vision_config"]["vision_tower"]

    def vision(self, pixels):
        """pixels [3,S,S] -> (hidden_states list, selected [P,D])."""
        sd, t = self.sd, self.tower
        vp = "model.vision_tower.vision_model."
        p = t["patch_size"]
        g = t["image_size"] // p
        D, nh = t["hidden_size"], t["num_attention_heads"]
        hd = D // nh
        x = pixels.astype(np.float64)[:, : g * p, : g * p]
        patches = x.reshape(3, g, p, g, p).transpose(1, 3, 0, 2, 4).reshape(g * g, 3 * p * p)  # row-major
        w = sd[vp + "embeddings.patch_embedding.weight"].reshape(D, -1)
        h = patches @ w.T + sd[vp + "embeddings.patch_embedding.bias"]
        h = h + sd[vp + "embeddings.position_embedding.weight"]
        hs = [h]
        eps = t["layer_norm_eps"]
        for i in range(t["num_hidden_layers"]):
            lp = vp + f"encoder.layers.{i}."
            a = _ln(h, sd[lp + "layer_norm1.weight"], sd[lp + "layer_norm1.bias"], eps)
            q = _lin(sd, lp + "self_attn.q_proj", a).reshape(-1, nh, hd).transpose(1, 0, 2)
            k = _lin(sd, lp + "self_attn.k_proj", a).reshape(-1, nh, hd).transpose(1, 0, 2)
            v = _lin(sd, lp + "self_attn.v_proj", a).reshape(-1, nh, hd).transpose(1, 0, 2)
            o = _softmax(q @ k.transpose(0, 2, 1) / math.sqrt(hd)) @ v
            h = h + _lin(sd, lp + "self_attn.out_proj", o.transpose(1, 0, 2).reshape(-1, D))
            m = _ln(h, sd[lp + "layer_norm2.weight"], sd[lp + "layer_norm2.bias"], eps)
            h = h + _lin(sd, lp + "mlp.fc2", _gelu_tanh(_lin(sd, lp + "mlp.fc1", m)))
            hs.append(h)
        return hs, hs[t["mm_vision_select_layer"]]

    def project(self, selected):
        return _lin(self.sd, "model.mm_projector.2", _gelu_erf(_lin(self.sd, "model.mm_projector.0", selected)))

    def lm_logits(self, ids, image_embeds):
        """ids with -200 placeholders (image_embeds: list of [P,H]) -> logits [T,V] (full causal pass)."""
        sd, c = self.sd, self.cfg
        rows, img = [], 0
        for t in ids:
            if t == IMAGE_TOKEN_INDEX:
                rows.extend(image_embeds[img])
                img += 1
            else:
                rows.append(sd["model.embed_tokens.weight"][t])
        x = np.stack(rows)
        T, H = x.shape
        nh = c["num_attention_heads"]
        hd = H // nh
        rot = int(hd * c["partial_rotary_factor"])
        inv = 1.0 / (c["rope_theta"] ** (np.arange(0, rot, 2, dtype=np.float64) / rot))
        ang = np.arange(T, dtype=np.float64)[:, None] * inv[None]
        cos = np.concatenate([np.cos(ang), np.cos(ang)], -1)
        sin = np.concatenate([np.sin(ang), np.sin(ang)], -1)

        def rope(z):  # z [nh,T,hd]; NeoX rotate-half on the first `rot` dims only
            zr, zp = z[..., :rot], z[..., rot:]
            half = rot // 2
            rh = np.concatenate([-zr[..., half:], zr[..., :half]], -1)
            return np.concatenate([zr * cos + rh * sin, zp], -1)

        mask = np.triu(np.full((T, T), -np.inf), 1)
        eps = c["layer_norm_eps"]
        for i in range(c["num_hidden_layers"]):
            lp = f"model.layers.{i}."
            a = _ln(x, sd[lp + "input_layernorm.weight"], sd[lp + "input_layernorm.bias"], eps)
            q = rope(_lin(sd, lp + "self_attn.q_proj", a).reshape(T, nh, hd).transpose(1, 0, 2))
            k = rope(_lin(sd, lp + "self_attn.k_proj", a).reshape(T, nh, hd).transpose(1, 0, 2))
            v = _lin(sd, lp + "self_attn.v_proj", a).reshape(T, nh, hd).transpose(1, 0, 2)
            o = _softmax(q @ k.transpose(0, 2, 1) / math.sqrt(hd) + mask) @ v
            attn = _lin(sd, lp + "self_attn.dense", o.transpose(1, 0, 2).reshape(T, H))
            mlp = _lin(sd, lp + "mlp.fc2", _gelu_tanh(_lin(sd, lp + "mlp.fc1", a)))
            x = x + attn + mlp
        x = _ln(x, sd["model.final_layernorm.weight"], sd["model.final_layernorm.bias"], eps)
        return x @ sd["lm_head.weight"].T + sd["lm_head.bias"]


def compare(ref_model, t, input_ids):
    """Max abs diffs of the numpy f64 pass vs the oracle's tensors (t has a leading image dim)."""
    out = {}
    embeds = []
    if "pixel_values" in t:
        sel_d, emb_d = 0.0, 0.0
        for i in range(t["pixel_values"].shape[0]):
            _, sel = ref_model.vision(t["pixel_values"][i].numpy())
            emb = ref_model.project(sel)
            sel_d = max(sel_d, float(np.abs(sel - t["vision.selected"][i].double().numpy()).max()))
            emb_d = max(emb_d, float(np.abs(emb - t["image_embeds"][i].double().numpy()).max()))
            embeds.append(emb)
        out["vision.selected"] = sel_d
        out["image_embeds"] = emb_d
    gen = t["gen_token_ids"].tolist()
    logits = ref_model.lm_logits(list(input_ids) + gen[:-1], embeds)
    n = len(gen)
    out["gen_logits_teacher_forced"] = float(np.abs(logits[-n:] - t["gen_logits"].double().numpy()).max())
    out["gen_tokens_argmax_equal"] = bool(np.array_equal(logits[-n:].argmax(-1), np.array(gen)))
    return out
