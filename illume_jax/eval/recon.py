"""Reconstruction metrics for vision tokenizers: PSNR, SSIM and the ShapeComp "tokenizer ceiling".

The ceiling is the fraction of scenes whose reconstruction the exact scorer reads the same
way as the original: the same objects (colour and shape, matched one to one) with centres
within a small distance. A generator can at best be as correct as its tokenizer lets it be,
hence "ceiling" (shared/reference/shapecomp.md, scorer self-checks).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from illume_jax.eval import shapecomp_scorer as scorer


def psnr(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """Mean PSNR (dB) over a batch of uint8 images [B,H,W,3] (or one image)."""
    a = np.asarray(original, np.float64).reshape(-1, *np.shape(original)[-3:])
    b = np.asarray(reconstruction, np.float64).reshape(a.shape)
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(-1)
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))


def ssim(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) over
    a batch of uint8 images, per channel then averaged, as skimage/torchmetrics compute it."""
    a = np.asarray(original, np.float64).reshape(-1, *np.shape(original)[-3:])
    b = np.asarray(reconstruction, np.float64).reshape(a.shape)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(x):  # per image and channel, spatial axes only
        return ndimage.gaussian_filter(x, sigma=(0, 1.5, 1.5, 0), truncate=3.5, mode="reflect")

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


MISMATCH_REASONS = ("count", "color", "shape", "offset")


def reading_mismatch(original: np.ndarray, reconstruction: np.ndarray, *, max_offset: float | None = None,
                     **detect_kw) -> str | None:
    """Why the scorer reads a reconstruction differently from its original, or None if it reads
    them the same: the same objects (colour, shape), matched one to one, with centroids at most
    `max_offset` pixels apart (default: 3 px at 64², scaled). `detect_kw` go to the scorer's
    `detect` (e.g. `shapecomp_scorer.level_options(levels)`).

    Reasons, checked in this order: 'count' (a different number of objects), 'color' (an object's
    colour is found nowhere in the reconstruction), 'shape' (its colour is there but not with its
    shape), 'offset' (colour and shape are there, but too far away)."""
    det_a = scorer.detect(original, **detect_kw)
    det_b = scorer.detect(reconstruction, **detect_kw)
    if len(det_a) != len(det_b):
        return "count"
    max_offset = 3.0 * original.shape[0] / 64 if max_offset is None else max_offset
    unused = list(det_b)
    for d in det_a:
        same_color = [e for e in unused if e.color == d.color]
        if not same_color:
            return "color"
        same_shape = [e for e in same_color if e.shape == d.shape]
        if not same_shape:
            return "shape"
        close = [e for e in same_shape
                 if np.hypot(e.centroid[0] - d.centroid[0], e.centroid[1] - d.centroid[1]) <= max_offset]
        if not close:
            return "offset"
        unused.remove(close[0])
    return None


def same_reading(original: np.ndarray, reconstruction: np.ndarray, **kw) -> bool:
    """True when the scorer reads both images the same way (see `reading_mismatch`)."""
    return reading_mismatch(original, reconstruction, **kw) is None


def agreement_and_misses(originals: Sequence[np.ndarray], reconstructions: Sequence[np.ndarray],
                         **kw) -> tuple[float, dict]:
    """(fraction of pairs the scorer reads the same way, {reason: fraction failing for it}), with
    each pair read once."""
    reasons = [reading_mismatch(a, b, **kw) for a, b in zip(originals, reconstructions)]
    return (float(np.mean([r is None for r in reasons])),
            {r: float(np.mean([x == r for x in reasons])) for r in MISMATCH_REASONS})


def mismatch_breakdown(originals: Sequence[np.ndarray], reconstructions: Sequence[np.ndarray], **kw) -> dict:
    """Fraction of pairs failing for each reason of `reading_mismatch` (they sum to 1 - agreement)."""
    return agreement_and_misses(originals, reconstructions, **kw)[1]


def scorer_agreement(originals: Sequence[np.ndarray], reconstructions: Sequence[np.ndarray], **kw) -> float:
    """Fraction of (original, reconstruction) pairs the scorer reads the same way."""
    if len(originals) != len(reconstructions) or not len(originals):
        raise ValueError(f"scorer_agreement: got {len(originals)} originals and {len(reconstructions)} "
                         "reconstructions; expected the same non-zero number")
    return float(np.mean([same_reading(a, b, **kw) for a, b in zip(originals, reconstructions)]))


def edit_ceiling(round_trip, *, levels: Sequence[int] = (1,), split: str = "test", pairs: int = 48) -> dict:
    """The editing suite's success on its own targets after a tokenizer round trip: what a perfect
    editor of a tokenizer's codes would score (`eval` grades edits the same way, on the same
    held-out pairs of each level). round_trip(list of uint8 [H, W, 3]) -> the decoded images, same
    sizes. {'edit_ceiling': success over all pairs, 'edit_ceiling_<op>': per operation, 'edit_pairs'}."""
    from illume_jax.data import shapecomp
    if pairs <= 0:
        raise ValueError(f"edit_ceiling: pairs={pairs}; expected a positive number of edit pairs per level")
    per_op: dict[str, list[bool]] = {}
    for level in levels:
        edit_pairs = [shapecomp.edit_pair(int(level), split, i) for i in range(pairs)]
        targets = [shapecomp.render(p.after) for p in edit_pairs]
        decoded = round_trip(targets)
        if len(decoded) != len(targets):
            raise ValueError(f"edit_ceiling: round_trip returned {len(decoded)} images for {len(targets)}")
        rotated = shapecomp.get_level(int(level)).rotation
        for p, img in zip(edit_pairs, decoded):
            g = scorer.grade_edit(np.asarray(img), p.before, p.after, p.edited, p.untouched, rotated=rotated)
            per_op.setdefault(p.op, []).append(bool(g["instruction"]))
    every = [x for v in per_op.values() for x in v]
    return dict(edit_ceiling=float(np.mean(every)), edit_pairs=len(every),
                **{f"edit_ceiling_{op}": float(np.mean(v)) for op, v in sorted(per_op.items())})


def codes_kept(before_codes: np.ndarray, after_codes: np.ndarray, before_images: Sequence[np.ndarray],
               after_images: Sequence[np.ndarray]) -> dict:
    """How local a tokenizer's codes are under an edit: of the cells whose pixels the edit left exactly
    as they were, the share whose code is unchanged, over all such cells and over those showing part of
    an object ('all', 'object'; None where there is no such cell). Codes [N, h, w] of N source and N
    edited images [N, H, W, 3] (H, W multiples of h, w). A tokenizer whose codes are local keeps 1.0;
    one whose codes hear the whole image (normalisation statistics, attention) rewrites cells the edit
    never touched, and an editor that copies its source's codes is then wrong there."""
    from illume_jax.data import shapecomp
    before_codes, after_codes = np.asarray(before_codes), np.asarray(after_codes)
    if before_codes.shape != after_codes.shape or before_codes.ndim != 3 or len(before_codes) != len(before_images) \
            or len(after_images) != len(before_images):
        raise ValueError(f"codes_kept: got codes {before_codes.shape} / {after_codes.shape} for {len(before_images)} "
                         f"/ {len(after_images)} images; expected [N, h, w] codes for N source and N edited images")
    n, h, w = before_codes.shape
    same, on = [], []
    for b, a in zip(before_images, after_images):
        H, W = b.shape[:2]
        if H % h or W % w or a.shape != b.shape:
            raise ValueError(f"codes_kept: images {b.shape} / {a.shape} do not tile into the {h}x{w} code grid")
        diff = np.abs(b.astype(np.int32) - a.astype(np.int32)).sum(-1) == 0
        same.append(diff.reshape(h, H // h, w, W // w).all(axis=(1, 3)))
        on.append(shapecomp.object_cells(b, h, w).reshape(h, w) | shapecomp.object_cells(a, h, w).reshape(h, w))
    same, on = np.stack(same), np.stack(on)
    kept = before_codes == after_codes
    share = lambda m: float(kept[m].mean()) if m.any() else None  # noqa: E731
    return {"all": share(same), "object": share(same & on)}
