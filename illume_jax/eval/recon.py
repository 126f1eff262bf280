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


def same_reading(original: np.ndarray, reconstruction: np.ndarray, *, max_offset: float | None = None,
                 shapes: Sequence[str] | None = None) -> bool:
    """True when the scorer finds the same objects (colour, shape) in both images, matched one
    to one, with centroids at most `max_offset` pixels apart (default: 3 px at 64², scaled)."""
    kw = {} if shapes is None else {"shapes": shapes}
    det_a = scorer.detect(original, **kw)
    det_b = scorer.detect(reconstruction, **kw)
    if len(det_a) != len(det_b):
        return False
    max_offset = 3.0 * original.shape[0] / 64 if max_offset is None else max_offset
    unused = list(det_b)
    for d in det_a:
        match = None
        for e in unused:
            if e.color == d.color and e.shape == d.shape and np.hypot(e.centroid[0] - d.centroid[0],
                                                                      e.centroid[1] - d.centroid[1]) <= max_offset:
                match = e
                break
        if match is None:
            return False
        unused.remove(match)
    return True


def scorer_agreement(originals: Sequence[np.ndarray], reconstructions: Sequence[np.ndarray], **kw) -> float:
    """Fraction of (original, reconstruction) pairs the scorer reads the same way."""
    if len(originals) != len(reconstructions) or not len(originals):
        raise ValueError(f"scorer_agreement: got {len(originals)} originals and {len(reconstructions)} "
                         "reconstructions; expected the same non-zero number")
    return float(np.mean([same_reading(a, b, **kw) for a, b in zip(originals, reconstructions)]))
