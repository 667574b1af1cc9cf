"""Reading and writing checkpoints in the exact file layout of zhumj34/Mipha-3B.

Layout: config.json, preprocessor_config.json, generation_config.json, tokenizer files
(vocab.json, merges.txt, added_tokens.json, tokenizer_config.json, special_tokens_map.json; no
tokenizer.json) and either one `model.safetensors` or shards `model-0000k-of-0000n.safetensors` +
`model.safetensors.index.json`.
"""

import json
import os
import shutil
import zlib

import torch
from safetensors import safe_open

from . import paths
from .golden import save_if_changed

TOKENIZER_FILES = [
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
]

STORAGE_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
TORCH_DTYPE_NAME = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def build_config(sizes, name_or_path, storage):
    """config.json: the tiny-a / Mipha-3B key set with our sizes (template in templates/)."""
    with open(os.path.join(paths.TOOL_DIR, "templates", "mipha_config_template.json")) as f:
        cfg = json.load(f)
    lm, vt = sizes["lm"], sizes["vision"]
    cfg["_name_or_path"] = name_or_path
    cfg["hidden_size"] = lm["hidden"]
    cfg["intermediate_size"] = lm["intermediate"]
    cfg["num_hidden_layers"] = lm["layers"]
    cfg["num_attention_heads"] = lm["heads"]
    cfg["num_key_value_heads"] = lm["heads"]
    cfg["partial_rotary_factor"] = lm["partial_rotary_factor"]
    cfg["torch_dtype"] = TORCH_DTYPE_NAME[storage]
    proj = cfg["vision_config"]["mm_projector"]
    proj["hidden_size"] = lm["hidden"]
    proj["mm_hidden_size"] = vt["hidden"]
    tower = cfg["vision_config"]["vision_tower"]
    tower["hidden_size"] = vt["hidden"]
    tower["intermediate_size"] = vt["intermediate"]
    tower["num_hidden_layers"] = vt["layers"]
    tower["num_attention_heads"] = vt["heads"]
    tower["image_size"] = vt["image_size"]
    tower["patch_size"] = vt["patch_size"]
    tower["mm_vision_select_layer"] = vt.get("select_layer", -2)
    return cfg


def build_preprocessor_config(image_size):
    return {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor",
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "SiglipProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": image_size, "width": image_size},
    }


def _dump_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def assign_shards(state_dict, n_shards):
    """Deterministic, deliberately scattered shard assignment (a loader must use the index).

    The two big matrices (embed_tokens, lm_head) go to different shards; every other tensor goes to
    shard crc32(name) % n, so a layer's tensors are spread over several files, as in tiny-a.
    """
    if n_shards == 1:
        return {k: 0 for k in state_dict}
    out = {}
    for k in state_dict:
        if k == "model.embed_tokens.weight":
            out[k] = 0
        elif k == "lm_head.weight":
            out[k] = n_shards - 1
        else:
            out[k] = zlib.crc32(k.encode()) % n_shards
    for s in range(n_shards):
        assert s in out.values(), f"shard {s} would be empty"
    return out


def save_checkpoint(out_dir, state_dict_f32, storage, n_shards, config, preproc, tokenizer_src):
    """Write the checkpoint. Returns the state dict as stored (storage dtype)."""
    os.makedirs(out_dir, exist_ok=True)
    dtype = STORAGE_DTYPES[storage]
    stored = {k: v.detach().to(dtype).contiguous() for k, v in sorted(state_dict_f32.items())}
    _dump_json(config, os.path.join(out_dir, "config.json"))
    _dump_json(preproc, os.path.join(out_dir, "preprocessor_config.json"))
    for fn in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(tokenizer_src, fn), os.path.join(out_dir, fn))
    meta = {"format": "pt"}
    keep = {"model.safetensors"} if n_shards == 1 else {
        f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors" for s in range(n_shards)
    } | {"model.safetensors.index.json"}
    for fn in os.listdir(out_dir):  # stale weight files of an earlier layout
        if fn.startswith("model") and fn not in keep:
            os.remove(os.path.join(out_dir, fn))
    if n_shards == 1:
        save_if_changed(stored, os.path.join(out_dir, "model.safetensors"), meta)
        return stored
    assign = assign_shards(stored, n_shards)
    weight_map = {}
    total = 0
    for s in range(n_shards):
        fn = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: v for k, v in stored.items() if assign[k] == s}
        save_if_changed(part, os.path.join(out_dir, fn), meta)
        for k, v in part.items():
            weight_map[k] = fn
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _dump_json(index, os.path.join(out_dir, "model.safetensors.index.json"))
    return stored


def load_checkpoint(ckpt_dir):
    """name -> tensor in its STORED dtype, from the index (or the single file)."""
    index_path = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = ["model.safetensors"]
    out = {}
    for fn in files:
        with safe_open(os.path.join(ckpt_dir, fn), framework="pt") as f:
            for k in f.keys():
                if weight_map is not None:
                    assert weight_map[k] == fn, f"{k} found in {fn}, index says {weight_map[k]}"
                out[k] = f.get_tensor(k)
    if weight_map is not None:
        assert set(out) == set(weight_map), "index and shards disagree"
    return out


def stored_dtypes(state_dict):
    return sorted({str(v.dtype) for v in state_dict.values()})


def load_config(ckpt_dir):
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        return json.load(f)


def load_preprocessor_config(ckpt_dir):
    with open(os.path.join(ckpt_dir, "preprocessor_config.json")) as f:
        return json.load(f)

