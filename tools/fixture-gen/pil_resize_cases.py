#!/usr/bin/env python3
"""Expected outputs of PIL's `Image.resize` on small RGB images, for
`models/tests/image_resize.rs` (the Rust port of Pillow's Resample.c must match
them byte for byte).

    python tools/fixture-gen/pil_resize_cases.py > models/tests/image_resize_cases.json

Each case: a deterministic random RGB image (some with only 0/255 values, so
the filters' negative lobes overshoot and clipping is exercised), optionally padded
to a square the way LLaVA's `expand2square` does, then resized. Pixels are hex
strings of row-major RGB bytes.
"""

import json
import sys

import numpy as np
import PIL
from PIL import Image

FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# (w, h, out_w, out_h, filter, pad, kind)
CASES = [
    (7, 5, 3, 4, "bicubic", None, "random"),
    (5, 7, 11, 13, "bicubic", None, "random"),
    (13, 1, 4, 3, "bicubic", None, "random"),
    (1, 1, 5, 5, "bicubic", None, "random"),
    (1, 9, 3, 2, "bicubic", None, "random"),
    (31, 17, 8, 9, "bicubic", None, "random"),
    (9, 9, 9, 4, "bicubic", None, "random"),  # vertical pass only
    (9, 9, 4, 9, "bicubic", None, "random"),  # horizontal pass only
    (50, 3, 7, 7, "bicubic", None, "random"),
    (16, 16, 40, 24, "bicubic", None, "binary"),
    (37, 23, 5, 6, "bicubic", None, "binary"),
    (45, 31, 17, 5, "bicubic", None, "random"),
    (3, 2, 23, 19, "bicubic", None, "binary"),
    (27, 16, 30, 30, "bicubic", (127, 127, 127), "random"),
    (21, 36, 10, 10, "bicubic", (127, 127, 127), "random"),
    (40, 23, 20, 20, "bicubic", (127, 127, 127), "binary"),
    (8, 3, 5, 5, "bicubic", (0, 255, 10), "random"),
    (2, 11, 6, 6, "bicubic", (255, 255, 255), "binary"),
    (12, 12, 7, 7, "bicubic", (127, 127, 127), "random"),
    (19, 26, 28, 28, "bicubic", (127, 127, 127), "random"),
    # Pillow >= 13 runs the vertical pass first when the height shrinks by more
    # than twice as many pixels as the width (python-pillow/Pillow#9549).
    (20, 45, 17, 9, "bicubic", None, "binary"),
    (9, 40, 30, 5, "bicubic", None, "random"),
    (10, 20, 5, 10, "bicubic", None, "binary"),  # 10 == 2 * 5: still horizontal first
    (10, 21, 5, 10, "bicubic", None, "binary"),  # 11 > 2 * 5: vertical first
    (23, 11, 9, 14, "bilinear", None, "binary"),
    (11, 23, 30, 7, "bilinear", None, "random"),
    (23, 11, 9, 14, "lanczos", None, "binary"),
    (11, 23, 30, 7, "lanczos", None, "random"),
    (23, 11, 9, 14, "box", None, "random"),
    (11, 23, 30, 7, "box", None, "binary"),
    (23, 11, 9, 14, "hamming", None, "binary"),
    (11, 23, 30, 7, "hamming", None, "random"),
]


def expand2square(img, color):
    # LLaVA / Mipha mm_utils.expand2square
    w, h = img.size
    if w == h:
        return img
    if w > h:
        out = Image.new(img.mode, (w, w), color)
        out.paste(img, (0, (w - h) // 2))
        return out
    out = Image.new(img.mode, (h, h), color)
    out.paste(img, ((h - w) // 2, 0))
    return out


def main():
    rng = np.random.default_rng(20240613)
    cases = []
    for w, h, ow, oh, filt, pad, kind in CASES:
        if kind == "binary":
            a = rng.integers(0, 2, size=(h, w, 3), dtype=np.uint8) * 255
        else:
            a = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        img = Image.fromarray(a, "RGB")
        src = img
        if pad is not None:
            img = expand2square(img, tuple(pad))
        out = img.resize((ow, oh), resample=FILTERS[filt])
        assert out.mode == "RGB" and out.size == (ow, oh)
        cases.append(
            {
                "w": w,
                "h": h,
                "src": np.asarray(src).tobytes().hex(),
                "out_w": ow,
                "out_h": oh,
                "filter": filt,
                "pad": list(pad) if pad is not None else None,
                "out": np.asarray(out).tobytes().hex(),
            }
        )
    # One case per line keeps the file small and its diffs readable.
    out = sys.stdout
    out.write('{"pillow": %s, "numpy": %s, "cases": [\n' % (
        json.dumps(PIL.__version__), json.dumps(np.__version__)))
    out.write(",\n".join(json.dumps(c, separators=(",", ":")) for c in cases))
    out.write("\n]}\n")

if __name__ == "__main__":
    main()
