"""Deterministic synthetic "photos" (landscape-like: sky gradient, sun, hills, objects, film grain).

Only exactly-rounded float64 operations (+, -, *, /, sqrt) and integer hashing are used, so the
pixels do not depend on the platform's libm. The PNGs are committed; their sha256 is in the goldens.
"""

import numpy as np
from PIL import Image


def _smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _grain(h, w, seed):
    """Integer hash noise in [-1, 1]."""
    y, x = np.mgrid[0:h, 0:w].astype(np.uint64)
    v = (x * np.uint64(73856093)) ^ (y * np.uint64(19349663)) ^ np.uint64(seed * 83492791 + 12345)
    v = (v * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)
    v = (v ^ (v >> np.uint64(15))) & np.uint64(0xFFFF)
    return v.astype(np.float64) / 32767.5 - 1.0


SCENES = {
    # sky top, sky horizon, ground near, ground far, sun (u, v, r, rgb), objects
    "meadow": dict(
        sky_top=(40, 90, 190), sky_hor=(200, 220, 240), ground_a=(60, 130, 40), ground_b=(120, 170, 70),
        horizon=0.58, sun=(0.78, 0.22, 0.11, (255, 235, 150)),
        objects=[("ellipse", 0.25, 0.70, 0.16, 0.09, (150, 60, 40)),
                 ("rect", 0.52, 0.48, 0.06, 0.20, (90, 60, 30)),
                 ("ellipse", 0.52, 0.36, 0.14, 0.12, (30, 100, 35))],
        seed=1,
    ),
    "harbour": dict(
        sky_top=(255, 150, 80), sky_hor=(255, 215, 160), ground_a=(20, 60, 120), ground_b=(60, 110, 170),
        horizon=0.50, sun=(0.30, 0.40, 0.16, (255, 250, 210)),
        objects=[("rect", 0.70, 0.62, 0.18, 0.05, (230, 230, 225)),
                 ("rect", 0.66, 0.50, 0.015, 0.10, (80, 50, 30)),
                 ("ellipse", 0.20, 0.80, 0.12, 0.04, (200, 40, 40))],
        seed=2,
    ),
    "desert": dict(
        sky_top=(70, 120, 210), sky_hor=(235, 225, 200), ground_a=(210, 170, 100), ground_b=(230, 200, 140),
        horizon=0.62, sun=(0.15, 0.15, 0.08, (255, 255, 230)),
        objects=[("ellipse", 0.65, 0.66, 0.30, 0.10, (190, 140, 80)),
                 ("rect", 0.35, 0.55, 0.03, 0.18, (40, 110, 50)),
                 ("rect", 0.35, 0.55, 0.10, 0.025, (40, 110, 50))],
        seed=3,
    ),
    "night": dict(
        sky_top=(10, 15, 50), sky_hor=(60, 60, 110), ground_a=(25, 30, 25), ground_b=(45, 55, 40),
        horizon=0.66, sun=(0.62, 0.28, 0.10, (240, 240, 255)),
        objects=[("rect", 0.30, 0.60, 0.14, 0.16, (200, 170, 90)),
                 ("rect", 0.30, 0.46, 0.16, 0.03, (120, 40, 40)),
                 ("ellipse", 0.80, 0.80, 0.10, 0.08, (90, 90, 100))],
        seed=4,
    ),
}


def make_photo(width, height, scene):
    s = SCENES[scene]
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u = (x + 0.5) / width
    v = (y + 0.5) / height
    aa = 1.0 / max(width, height)  # ~one pixel of edge softness
    rgb = np.zeros((height, width, 3), dtype=np.float64)
    # horizon: a gentle cubic wave instead of a sine (no libm dependence)
    w = u - 0.5
    hor = s["horizon"] + 0.08 * w - 0.3 * w * w * w
    sky_t = np.clip(v / hor, 0.0, 1.0)
    ground_t = np.clip((v - hor) / (1.0 - hor + 1e-9), 0.0, 1.0)
    is_ground = _smoothstep(-aa, aa, v - hor)
    for c in range(3):
        sky = s["sky_top"][c] * (1.0 - sky_t) + s["sky_hor"][c] * sky_t
        ground = s["ground_b"][c] * (1.0 - ground_t) + s["ground_a"][c] * ground_t
        rgb[..., c] = sky * (1.0 - is_ground) + ground * is_ground
    su, sv, sr, scol = s["sun"]
    d = np.sqrt((u - su) ** 2 + (v - sv) ** 2)
    sun = (1.0 - _smoothstep(sr - 2 * aa, sr + 2 * aa, d)) * (1.0 - is_ground)
    glow = np.clip(1.0 - d / (3.0 * sr), 0.0, 1.0) ** 2 * 0.35 * (1.0 - is_ground)
    for c in range(3):
        rgb[..., c] = rgb[..., c] * (1.0 - sun) + scol[c] * sun
        rgb[..., c] = rgb[..., c] * (1.0 - glow) + scol[c] * glow
    for kind, cu, cv, ru, rv, col in s["objects"]:
        if kind == "ellipse":
            dist = np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2) - 1.0
            mask = 1.0 - _smoothstep(-aa / min(ru, rv), aa / min(ru, rv), dist)
            shade = 1.0 - 0.35 * np.clip((v - (cv - rv)) / (2 * rv), 0.0, 1.0)
        else:
            dx = np.abs(u - cu) - ru
            dy = np.abs(v - cv) - rv
            mask = (1.0 - _smoothstep(-aa, aa, dx)) * (1.0 - _smoothstep(-aa, aa, dy))
            shade = 1.0 - 0.25 * np.clip((u - (cu - ru)) / (2 * ru), 0.0, 1.0)
        for c in range(3):
            rgb[..., c] = rgb[..., c] * (1.0 - mask) + col[c] * shade * mask
    g = _grain(height, width, s["seed"])
    rgb += 7.0 * g[..., None]
    return np.clip(np.floor(rgb + 0.5), 0, 255).astype(np.uint8)


def save_photo(path, width, height, scene):
    Image.fromarray(make_photo(width, height, scene), mode="RGB").save(path, format="PNG", optimize=False)
