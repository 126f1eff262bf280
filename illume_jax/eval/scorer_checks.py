"""The ShapeComp scorer's self-checks as data: degradations a reading should survive,
contradicted prompts it must reject, and non-shapes it must not report (shared by
tests/eval/test_shapecomp_scorer.py and bench/scorer.py)."""
from __future__ import annotations

import copy
import io

import numpy as np

from illume_jax.data.shapecomp import world

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
DEGRADATIONS = ("none", "noise", "box_blur", "gauss_1.0", "gauss_1.5", "jpeg_75")


def degrade(img: np.ndarray, kind: str) -> np.ndarray:
    from PIL import Image, ImageFilter
    from scipy import ndimage
    if kind == "none":
        return img
    if kind == "noise":
        return np.clip(img + np.random.default_rng(0).normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    if kind == "box_blur":
        return np.asarray(Image.fromarray(img).filter(ImageFilter.BoxBlur(1)))
    if kind.startswith("gauss_"):
        s = float(kind.split("_")[1])
        return np.clip(ndimage.gaussian_filter(img.astype(np.float32), (s, s, 0)), 0, 255).round().astype(np.uint8)
    if kind == "jpeg_75":
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=75)
        return np.asarray(Image.open(buf).convert("RGB"))
    raise ValueError(f"degradation {kind!r}: expected one of {DEGRADATIONS}")


def contradict(scene, meta: dict) -> dict:
    """The same prompt with one fact made false for this scene."""
    m = copy.deepcopy(meta)
    lv = world.get_level(scene.level)
    req = m["include"][-1]
    if m["tag"] == "counting":
        req["count"] += 1
        m["exclude"][0]["count"] += 1
    elif "position" in req:
        req["position"][0] = OPPOSITE[req["position"][0]]
    elif "color" in req:
        req["color"] = next(c for c in lv.colors if c not in {o.color for o in scene.objects})
    else:
        req["class"] = next(s for s in lv.shapes if s not in {o.shape for o in scene.objects})
    return m


def non_shape_masks(res: int = 64) -> dict[str, np.ndarray]:
    """Blobs that are no ShapeComp shape, centred on a res x res canvas (sizes of a 64x64 scene)."""
    k = res / 64
    yy, xx = (np.mgrid[0:res, 0:res] + 0.5) / k
    return {
        "bar 4:1": (abs(xx - 32) <= 14) & (abs(yy - 32) <= 3.5),
        "L": ((abs(xx - 32) <= 10) & (abs(yy - 42) <= 3)) | ((abs(xx - 25) <= 3) & (abs(yy - 32) <= 12)),
        "T": ((abs(xx - 32) <= 12) & (abs(yy - 22) <= 3)) | ((abs(xx - 32) <= 3) & (abs(yy - 32) <= 12)),
        "dumbbell": (((xx - 22) ** 2 + (yy - 32) ** 2) <= 36) | (((xx - 42) ** 2 + (yy - 32) ** 2) <= 36)
                    | ((abs(yy - 32) <= 2) & (abs(xx - 32) <= 10)),
        "crescent": (((xx - 32) ** 2 + (yy - 32) ** 2) <= 100) & (((xx - 37) ** 2 + (yy - 32) ** 2) > 64),
    }
