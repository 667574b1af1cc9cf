"""Fixture presets: model sizes, storage, images and golden prompts."""

HAIKU = "Write a haiku about autumn leaves."
DESCRIBE = "What is shown in this image? Describe it briefly."

PRESETS = {
    # Real Mipha-3B head geometry: LM head_dim 80 with partial_rotary_factor 0.4 (32 rotary dims),
    # SigLIP head_dim 72; MLP widths that are not multiples of 32; 3 vision layers so that
    # select_layer -2 leaves one dead layer (+ post_layernorm + head) in the checkpoint.
    "gen-hd80": {
        "sizes": {
            "lm": {"hidden": 160, "heads": 2, "layers": 2, "intermediate": 200, "partial_rotary_factor": 0.4},
            "vision": {"hidden": 144, "heads": 2, "layers": 3, "intermediate": 172, "image_size": 56,
                       "patch_size": 14, "select_layer": -2},
        },
        "storage": "f16",
        "n_shards": 3,
        "seed": 11,
        "images": {
            "photo_wide_97x61.png": (97, 61, "meadow"),   # pad to 97x97, downscale to 56
            "photo_tall_53x90.png": (53, 90, "harbour"),  # pad to 90x90 (offset 18), downscale
            "photo_small_40x23.png": (40, 23, "desert"),  # pad to 40x40, UPscale to 56
        },
        "goldens": {
            "golden_text": (HAIKU, []),
            "golden_image": (DESCRIBE, ["photo_wide_97x61.png"]),
            "golden_image_tall": ("Describe the colors in this picture.", ["photo_tall_53x90.png"]),
            "golden_two_images": ("Compare the two pictures.", ["photo_small_40x23.png", "photo_tall_53x90.png"]),
        },
    },
    "gen-f32": {
        "sizes": {
            "lm": {"hidden": 80, "heads": 1, "layers": 3, "intermediate": 96, "partial_rotary_factor": 0.4},
            "vision": {"hidden": 72, "heads": 1, "layers": 2, "intermediate": 100, "image_size": 28,
                       "patch_size": 14, "select_layer": -2},
        },
        "storage": "f32",
        "n_shards": 2,
        "seed": 101,
        "images": {
            "photo_tall_19x26.png": (19, 26, "night"),  # pad to 26x26 (offset 3), UPscale to 28
        },
        "goldens": {
            # two spaces and a tab exercise the added whitespace tokens (50257..50294)
            "golden_text": ("List three uses of a paperclip.  Be brief:\n\t- ", []),
            "golden_image": (DESCRIBE, ["photo_tall_19x26.png"]),
        },
    },
}
