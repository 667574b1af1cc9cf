"""One golden = one prompt (+ images) run end to end through the oracle, with its self-checks."""

import hashlib
import json
import os

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import IMAGE_TOKEN_INDEX, N_GEN, TOPK
from .preprocess import load_rgb, preprocess, transformers_pil_pixels
from .text import first_user_message, phi_prompt

ST_METADATA = {"oracle": "tools/fixture-gen", "format": "pt", "compute_dtype": "f32"}


def save_if_changed(tensors, path, metadata):
    """safetensors writes its metadata map in hash order, so two runs can differ in header bytes only.
    Leave an existing file untouched when its metadata and every tensor (dtype, shape, values) are equal,
    so that regenerating does not churn committed files. Returns True when the file was (re)written."""
    if os.path.exists(path):
        try:
            with safe_open(path, framework="pt") as f:
                same = f.metadata() == metadata and set(f.keys()) == set(tensors)
                for k in tensors if same else []:
                    old = f.get_tensor(k)
                    if old.dtype != tensors[k].dtype or not torch.equal(old, tensors[k]):
                        same = False
                        break
        except Exception:
            same = False
        if same:
            return False
    save_file(tensors, path, metadata=metadata)
    return True

IMAGE_KEYS = ("vision.hidden_states", "vision.selected", "projector.fc1_gelu", "image_embeds")
ORDER = (
    "pixel_values",
    "vision.hidden_states",
    "vision.selected",
    "projector.fc1_gelu",
    "image_embeds",
    "input_ids",
    "inputs_embeds",
    "lm.layer_outputs",
    "lm.final_hidden",
    "prompt_logits",
    "prompt_logits_last",
    "prompt_topk_ids",
    "prompt_topk_logits",
    "prompt_logsumexp",
    "gen_token_ids",
    "gen_logits",
)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def top2_margin(row):
    v = torch.topk(row, 2).values
    return float(v[0] - v[1])


def topk_stable(logits, k):
    """Top-k per row, descending, lowest id first among equal logits."""
    order = np.argsort(-logits.numpy(), axis=-1, kind="stable")[:, :k]
    ids = torch.from_numpy(order.astype(np.int64))
    return ids, torch.gather(logits, 1, ids)


def run(oracle, toks, preproc_cfg, question, image_paths, n_gen=N_GEN):
    """The whole pipeline. Returns (tensors with a leading image dim, info dict, extras)."""
    images = [load_rgb(p) for p in image_paths]
    user = first_user_message(question, len(images))
    prompt = phi_prompt(user)
    ids, tj_ids, bos = toks.image_token_ids(prompt)
    assert sum(1 for t in ids if t == IMAGE_TOKEN_INDEX) == len(images)
    t = {}
    if images:
        t["pixel_values"] = torch.from_numpy(np.stack([preprocess(im, preproc_cfg) for im in images]))
        t.update(oracle.encode_images(t["pixel_values"]))
        inputs_embeds, starts = oracle.splice(ids, t["image_embeds"])
    else:
        inputs_embeds, starts = oracle.splice(ids, None)
    t["input_ids"] = torch.tensor(ids, dtype=torch.int64)
    t["inputs_embeds"] = inputs_embeds
    pre = oracle.prefill(inputs_embeds)
    logits = pre["logits"]
    t["lm.layer_outputs"] = pre["lm.layer_outputs"]
    t["lm.final_hidden"] = pre["lm.final_hidden"]
    t["prompt_logits"] = logits
    t["prompt_logits_last"] = logits[-1]
    t["prompt_topk_ids"], t["prompt_topk_logits"] = topk_stable(logits, TOPK)
    t["prompt_logsumexp"] = torch.logsumexp(logits.double(), dim=-1).float()

    gen_ids, gen_rows, margins = [], [], []
    row, pos, cache = logits[-1], inputs_embeds.shape[0], pre["cache"]
    for i in range(n_gen):
        tok = int(torch.argmax(row))  # first maximal index = lowest id on ties
        gen_ids.append(tok)
        gen_rows.append(row)
        margins.append(top2_margin(row))
        if i + 1 < n_gen:
            row = oracle.decode_step(tok, pos, cache)
            pos += 1
    t["gen_token_ids"] = torch.tensor(gen_ids, dtype=torch.int64)
    t["gen_logits"] = torch.stack(gen_rows)
    t = {k: v.detach().clone().contiguous() for k, v in t.items()}
    info = {
        "prompt_question": question,
        "user_message": user,
        "prompt_text": prompt,
        "input_ids": ids,
        "tokenizer_json_ids": tj_ids,
        "bos_added": bos,
        "placeholders": [i for i, x in enumerate(ids) if x == IMAGE_TOKEN_INDEX],
        "starts": starts,
        "margins": margins,
        "gen_token_ids": gen_ids,
        "images": images,
    }
    return t, info


def greedy_min_margin(oracle, toks, preproc_cfg, question, image_paths):
    _, info = run(oracle, toks, preproc_cfg, question, image_paths)
    return min(info["margins"]), info


def shape_for_file(t, n_images):
    """Single image: image tensors without the leading image dim (tiny-a layout)."""
    out = dict(t)
    if n_images == 1:
        for k in IMAGE_KEYS:
            out[k] = out[k][0]
    return out


def kv_vs_recompute(oracle, t):
    ids = t["gen_token_ids"].tolist()
    full = torch.cat([t["inputs_embeds"], oracle.embed_ids(ids[:-1])], dim=0)
    logits = oracle.full_logits(full)
    T = t["inputs_embeds"].shape[0]
    rec = logits[T - 1 :]
    diff = float((rec - t["gen_logits"]).abs().max())
    same = bool(torch.equal(rec.argmax(-1), t["gen_logits"].argmax(-1)))
    return diff, same


def image_meta(path, preproc_cfg):
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    return {
        "file": os.path.basename(path),
        "sha256": sha256(path),
        "size_wh": [w, h],
        "aspect": "pad",
        "pad_fill_rgb": [int(m * 255) for m in preproc_cfg["image_mean"]],
        "resize_to_hw": [preproc_cfg["size"]["height"], preproc_cfg["size"]["width"]],
    }


def write_golden(
    out_dir,
    name,
    oracle,
    toks,
    preproc_cfg,
    question,
    image_files,
    storage_dtypes,
    prompt_logits_max_bytes,
    checkpoint_rel="checkpoint",
    second_oracle=None,
    sdpa_oracle=None,
    numpy_ref=None,
    extra_meta=None,
):
    """Compute and write <out_dir>/<name>.safetensors + .json. Returns the json dict."""
    paths = [os.path.join(out_dir, f) for f in image_files]
    n_img = len(paths)
    t, info = run(oracle, toks, preproc_cfg, question, paths)
    T, V = t["prompt_logits"].shape
    store_all = T * V * 4 <= prompt_logits_max_bytes
    if not store_all:
        del t["prompt_logits"]
    ft = shape_for_file(t, n_img)
    ft = {k: ft[k] for k in ORDER if k in ft}

    checks = {}
    if n_img:
        diffs = []
        for p, px in zip(paths, t["pixel_values"]):
            ref = transformers_pil_pixels(load_rgb(p), preproc_cfg)
            diffs.append(None if ref is None else float(np.abs(ref - px.numpy()).max()))
        checks["pixels_vs_transformers_pil_processor_max_abs"] = (
            None if any(d is None for d in diffs) else max(diffs)
        )
        # hidden_states[0] is the patch conv + position embedding (no pre-LN)
        emb = oracle.vision.embeddings
        with torch.no_grad():
            conv = torch.nn.functional.conv2d(
                t["pixel_values"], emb.patch_embedding.weight, emb.patch_embedding.bias, stride=emb.patch_size
            )
            manual = conv.flatten(2).transpose(1, 2) + emb.position_embedding.weight[None]
        checks["vision_hidden_states0_vs_manual_patch_plus_pos_max_abs"] = float(
            (manual - t["vision.hidden_states"][:, 0]).abs().max()
        )
    kv_diff, kv_same = kv_vs_recompute(oracle, t)
    checks["kv_cache_vs_full_recompute_max_abs_logit_diff"] = kv_diff
    checks["kv_cache_vs_full_recompute_same_argmax"] = kv_same
    if second_oracle is not None:
        t2, _ = run(second_oracle, toks, preproc_cfg, question, paths)
        checks["second_run_same_tokens"] = bool(torch.equal(t2["gen_token_ids"], t["gen_token_ids"]))
        checks["second_run_max_abs_logit_diff"] = float((t2["gen_logits"] - t["gen_logits"]).abs().max())
    checks["tokenizer_json_same_ids"] = (
        None if info["tokenizer_json_ids"] is None else info["tokenizer_json_ids"] == info["input_ids"]
    )
    checks["tokenizer_added_bos"] = info["bos_added"]
    if sdpa_oracle is not None:
        # same weights, SDPA attention kernel, teacher-forced on the golden tokens: summation-order noise
        ids = t["gen_token_ids"].tolist()
        e2, _ = sdpa_oracle.splice(info["input_ids"], t["image_embeds"] if n_img else None)
        full = torch.cat([e2, sdpa_oracle.embed_ids(ids[:-1])], dim=0)
        lg = sdpa_oracle.full_logits(full)
        checks["sdpa_vs_eager_teacher_forced_max_abs_logit_diff"] = float(
            (lg[T - 1 :] - t["gen_logits"]).abs().max()
        )

    if numpy_ref is not None:
        from .numpy_ref import compare

        checks["numpy_f64_reference_max_abs_diff"] = compare(numpy_ref, t, info["input_ids"])

    meta = {}
    if n_img == 1:
        meta["image"] = image_meta(paths[0], preproc_cfg)
    meta.update(
        {
            "checkpoint": checkpoint_rel,
            "compute_dtype": "f32",
            "storage_dtypes": storage_dtypes,
            "prompt_question": question,
            "prompt_text": info["prompt_text"],
            "input_ids": info["input_ids"],
            "image_token_index": IMAGE_TOKEN_INDEX,
            "image_placeholder_index_in_input_ids": info["placeholders"][0] if n_img else None,
            "image_embeds_start_in_sequence": info["starts"][0] if n_img else None,
            "n_image_tokens": int(t["image_embeds"].shape[1]) if n_img else 0,
            "sequence_length": T,
            "vision_select_layer": oracle.select_layer,
            "gen_token_ids": info["gen_token_ids"],
            "gen_text": toks.decode(info["gen_token_ids"]),
            "greedy_margin_top1_minus_top2": info["margins"],
            "prompt_logits_mode": "all" if store_all else "last",
            "shapes": {k: list(v.shape) for k, v in ft.items()},
            "dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in ft.items()},
            "self_checks": checks,
            # ---- fields added for the generated fixtures (tiny-a has the ones above)
            "n_images": n_img,
            "images": [image_meta(p, preproc_cfg) for p in paths],
            "image_placeholder_indices_in_input_ids": info["placeholders"],
            "image_embeds_starts_in_sequence": info["starts"],
            "user_message": info["user_message"],
            "min_greedy_margin": min(info["margins"]),
        }
    )
    if extra_meta:
        meta.update(extra_meta)

    st_path = os.path.join(out_dir, name + ".safetensors")
    save_if_changed(ft, st_path, ST_METADATA)
    if n_img:
        # re-feed the saved image embeddings (read back from the file) -> identical prompt logits
        saved = load_file(st_path)
        emb = saved["image_embeds"]
        if n_img == 1:
            emb = emb[None]
        e3, _ = oracle.splice(saved["input_ids"].tolist(), emb)
        lg = oracle.full_logits(e3)
        meta["self_checks"] = dict(
            {"refeed_image_embeds_max_abs_logit_diff": float((lg[-1] - saved["prompt_logits_last"]).abs().max())},
            **meta["self_checks"],
        )
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return meta
