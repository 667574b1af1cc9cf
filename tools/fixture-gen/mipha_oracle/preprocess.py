"""Image preprocessing as Mipha runs it (image_aspect_ratio 'pad' + SiglipImageProcessor of 4.37.1).

1. expand2square on a background of int(mean*255) = (127,127,127), image pasted centred
   (offset (w-h)//2 or (h-w)//2);
2. PIL bicubic resize (resample=3) of the uint8 image to S x S;
3. uint8 * rescale_factor in float64, then cast to float32;
4. (x - mean) / std in float32; HWC -> CHW.
"""

import numpy as np
from PIL import Image


def load_rgb(path):
    with Image.open(path) as im:
        return im.convert("RGB")


def expand2square(img, background):
    w, h = img.size
    if w == h:
        return img
    if w > h:
        out = Image.new(img.mode, (w, w), background)
        out.paste(img, (0, (w - h) // 2))
        return out
    out = Image.new(img.mode, (h, h), background)
    out.paste(img, ((h - w) // 2, 0))
    return out


def preprocess(img, preproc_cfg):
    """PIL RGB image -> float32 [3,S,S]."""
    mean = preproc_cfg["image_mean"]
    std = preproc_cfg["image_std"]
    size = preproc_cfg["size"]
    background = tuple(int(m * 255) for m in mean)
    sq = expand2square(img, background)
    resized = sq.resize((size["width"], size["height"]), resample=preproc_cfg["resample"])
    x = np.asarray(resized).astype(np.float64) * preproc_cfg["rescale_factor"]
    x = x.astype(np.float32)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def transformers_pil_pixels(img, preproc_cfg):
    """The same via transformers' SiglipImageProcessor (PIL backend) on the padded image, for the check.

    Returns None where no PIL backend exists (the transformers 5 default SigLIP processor uses
    torchvision resizing, which is not PIL bicubic)."""
    try:
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil as Proc
    except ImportError:  # transformers 4.x: the plain processor is the PIL one
        try:
            from transformers import SiglipImageProcessor as Proc
        except ImportError:
            return None
    proc = Proc(
        do_resize=True,
        size=preproc_cfg["size"],
        resample=preproc_cfg["resample"],
        do_rescale=True,
        rescale_factor=preproc_cfg["rescale_factor"],
        do_normalize=True,
        image_mean=preproc_cfg["image_mean"],
        image_std=preproc_cfg["image_std"],
    )
    background = tuple(int(m * 255) for m in preproc_cfg["image_mean"])
    out = proc(images=expand2square(img, background), return_tensors="np")
    return np.asarray(out["pixel_values"][0], dtype=np.float32)
