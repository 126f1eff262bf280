"""High-resolution image understanding by "patchify": an image becomes a global view plus slices.

The original ILLUME (arXiv 2412.06673) reads high-resolution images by cutting them into up to
9 slices of the vision tower's base resolution plus one global view (the whole image resized to
base x base); every view goes through the vision tower on its own and gives one image block of
tokens. ILLUME does not publish its grid rule, so the grid follows LLaVA-UHD (Xu et al. 2024,
arXiv 2403.11703, "image modularization"):
  n = ceil(H * W / base**2), clipped to [1, max_slices];
  n == 1: no slices, grid (1, 1) = the global view alone;
  else: grids (rows, cols) with rows * cols in {n - 1, n, n + 1} and 2 <= rows * cols <= max_slices,
        the one minimising |log(W / H) - log(cols / rows)|; ties -> larger rows * cols, then fewer
        rows, so the choice is deterministic.
Views are resized with the same PIL bicubic call `images.fit_resolution` uses (without its square
crop: the slices must cover the whole image), so slices and single-view inputs see the same filter.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

MAX_SLICES = 9


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r}: expected an int >= 1")
    return int(value)


def slice_grid(height: int, width: int, base: int, max_slices: int = MAX_SLICES) -> tuple[int, int]:
    """(rows, cols) of slices; (1, 1) = no slices, the global view alone."""
    height, width = _positive_int("height", height), _positive_int("width", width)
    base, max_slices = _positive_int("base", base), _positive_int("max_slices", max_slices)
    n = min(max(math.ceil(height * width / base ** 2), 1), max_slices)
    if n == 1:
        return (1, 1)

    def error(grid: tuple[int, int]) -> Fraction:
        # |log(W/H) - log(cols/rows)| = log(max(x, 1/x)) with x = W*rows / (H*cols); comparing x
        # as an exact fraction keeps ties exact (float logs could break them by rounding).
        rows, cols = grid
        x = Fraction(width * rows, height * cols)
        return max(x, 1 / x)

    candidates = [(rows, m // rows) for m in (n - 1, n, n + 1) if 2 <= m <= max_slices
                  for rows in range(1, m + 1) if m % rows == 0]
    return min(candidates, key=lambda g: (error(g), -g[0] * g[1], g[0]))


def num_views(grid: tuple[int, int]) -> int:
    """1 for (1, 1), else 1 + rows * cols."""
    if len(grid) != 2:
        raise ValueError(f"grid={grid!r}: expected (rows, cols)")
    rows, cols = _positive_int("grid rows", grid[0]), _positive_int("grid cols", grid[1])
    return 1 if (rows, cols) == (1, 1) else 1 + rows * cols


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, 3] uint8 or float -> [height, width, 3] float32, PIL bicubic (as `fit_resolution`).

    uint8 goes through PIL's RGB mode, exactly the call `fit_resolution` makes (so its rounding
    too); float goes channel by channel through PIL's float mode, then is clipped to the input's
    own [min, max] since bicubic overshoot would otherwise leave the input's value range.
    """
    from PIL import Image
    if image.shape[:2] == (height, width):
        return image.astype(np.float32)
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC), np.float32)
    x = image.astype(np.float32)
    out = np.stack([np.asarray(Image.fromarray(x[..., c]).resize((width, height), Image.BICUBIC))
                    for c in range(x.shape[-1])], axis=-1)
    return np.clip(out, x.min(), x.max())


def image_views(image: np.ndarray, base: int, max_slices: int = MAX_SLICES) -> tuple[np.ndarray, tuple[int, int]]:
    """image [H, W, 3] (uint8 or float) -> (views [1 + rows*cols (or 1 when the grid is (1,1)), base,
    base, 3] float32 in the same value range as the input, (rows, cols)). views[0] is the global view
    (the whole image resized to base x base); then the slices in raster order: the image resized to
    (rows*base, cols*base) and cut into base x base tiles."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"image shape {image.shape}: expected [H, W, 3] with H, W >= 1")
    if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"image dtype {image.dtype}: expected uint8 or a float type")
    if image.dtype != np.uint8 and not np.isfinite(image).all():
        raise ValueError("image has non-finite values: expected finite floats")
    base = _positive_int("base", base)
    rows, cols = slice_grid(image.shape[0], image.shape[1], base, max_slices)
    views = [resize(image, base, base)[None]]
    if (rows, cols) != (1, 1):
        big = resize(image, rows * base, cols * base)
        # [rows*base, cols*base, 3] -> [rows, cols, base, base, 3] -> raster-ordered tiles
        views.append(big.reshape(rows, base, cols, base, 3).transpose(0, 2, 1, 3, 4).reshape(-1, base, base, 3))
    return np.concatenate(views), (rows, cols)
