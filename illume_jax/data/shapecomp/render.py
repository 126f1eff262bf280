"""Numpy rasteriser: filled shapes with no anti-aliasing, so every object pixel carries an
exact palette colour (the scorer segments by colour)."""
from __future__ import annotations

import io

import numpy as np

from illume_jax.data.shapecomp import world
from illume_jax.data.shapecomp.scene import Obj, Scene, scene_rng


def _polygon_mask(xx, yy, pts: np.ndarray) -> np.ndarray:
    """Inside test for a convex polygon (points counter-clockwise in image coordinates)."""
    inside = np.ones_like(xx, bool)
    for (x0, y0), (x1, y1) in zip(pts, np.roll(pts, -1, axis=0)):
        inside &= (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) >= 0
    return inside


def _regular(n: int, r: float, rot: float, cx: float, cy: float) -> np.ndarray:
    ang = rot + np.arange(n) * 2 * np.pi / n
    return np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], axis=1)


def object_mask(obj: Obj, res: int) -> np.ndarray:
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) + 0.5
    dx, dy = xx - obj.cx, yy - obj.cy
    c, s = np.cos(obj.rotation), np.sin(obj.rotation)
    return shape_mask(obj.shape, c * dx + s * dy, -s * dx + c * dy, obj.r)


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r) -> np.ndarray:
    """Inside test of `shape` with radius `r` at points (u, v) of the object's own frame
    (centre at 0, unrotated). Every shape scales with r, so shape_mask(s, u / r, v / r, 1) is the
    same set up to floating-point ties on the outline (the scorer fits templates that way)."""
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "ring":
        d = u * u + v * v
        return (d <= r * r) & (d >= (0.5 * r) ** 2)
    if shape == "square":
        h = r * 0.85
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= r
    if shape == "cross":
        w = r * 0.33
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    if shape == "triangle":
        return _polygon_mask(u, v, _regular(3, r, -np.pi / 2, 0, 0))
    if shape == "hexagon":
        return _polygon_mask(u, v, _regular(6, r, 0, 0, 0))
    if shape == "star":
        outer = _regular(5, r, -np.pi / 2, 0, 0)
        inner = _regular(5, r * 0.45, -np.pi / 2 + np.pi / 5, 0, 0)
        mask = _polygon_mask(u, v, inner[[0, 1, 2, 3, 4]])  # the pentagon core
        for k in range(5):  # plus five triangular points
            tri = np.stack([inner[(k - 1) % 5], outer[k], inner[k]])
            mask |= _polygon_mask(u, v, tri)
        return mask
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene) -> np.ndarray:
    """[H, W, 3] uint8."""
    res = scene.resolution
    img = np.empty((res, res, 3), np.uint8)
    img[:] = scene.background
    lv = world.get_level(scene.level)
    if lv.clutter:  # level 4: small grey distractor specks (not palette colours)
        rng = scene_rng(scene.level, scene.split, scene.index, salt="clutter")
        for _ in range(12):
            y, x = rng.integers(0, res - 2, 2)
            img[y:y + 2, x:x + 2] = (90, 90, 90)
    for obj in scene.objects:
        img[object_mask(obj, res)] = world.COLORS[obj.color]
    return img


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# -- per-cell labels (dense supervision of a ViT's token grid) ------------------------------------------

def object_cells(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """[h*w] bool, raster order: the cells of an h x w grid over `image` [H,W,3] that hold any pixel
    other than the background (a ShapeComp canvas is one flat colour: the corner pixel's)."""
    image = np.asarray(image)
    H, W = image.shape[:2]
    if image.ndim != 3 or H % h or W % w:
        raise ValueError(f"object_cells: image must be [H, W, C] with H, W multiples of the {h}x{w} grid, "
                         f"got {image.shape}")
    differs = (image != image[0, 0]).any(-1).reshape(h, H // h, w, W // w)
    return differs.any(axis=(1, 3)).reshape(-1)


def cell_owners(masks: np.ndarray, centres, grid: tuple[int, int], min_pixels: int) -> np.ndarray:
    """Which object each cell of an h x w grid over the image belongs to: masks [K,H,W] bool (one per
    object, visible pixels), centres K (x, y) pixel positions -> [h*w] int32 in raster order, the object
    index or -1 (background). A cell goes to the object covering most of its pixels if that is at least
    `min_pixels`; the cell holding an object's centre always goes to it, so small objects keep a cell."""
    masks = np.asarray(masks, bool)
    h, w = grid
    if masks.ndim != 3 or masks.shape[1] % h or masks.shape[2] % w:
        raise ValueError(f"cell_owners: masks must be [K, H, W] with H, W multiples of the {h}x{w} grid, "
                         f"got {masks.shape}")
    K, H, W = masks.shape
    owner = np.full((h, w), -1, np.int32)
    if K == 0:
        return owner.reshape(-1)
    ch, cw = H // h, W // w
    cover = masks.reshape(K, h, ch, w, cw).sum((2, 4))  # [K, h, w] pixels of each object in each cell
    held = cover.max(0) >= max(int(min_pixels), 1)
    owner[held] = cover.argmax(0)[held]
    for k, (cx, cy) in enumerate(centres):
        owner[min(max(int(cy / ch), 0), h - 1), min(max(int(cx / cw), 0), w - 1)] = k
    return owner.reshape(-1)


def cell_labels(scene: Scene, grid: tuple[int, int], min_pixels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The scene graph's answer for every cell of an h x w grid over the rendered image (`cell_owners`
    on the visible pixels, later objects drawn over earlier ones): ([h*w] index in `world.SHAPES`,
    [h*w] index in `world.COLORS`), int32, background = len(SHAPES) / len(COLORS). min_pixels
    defaults to 3/32 of a cell (6 of an 8x8 cell)."""
    res = scene.resolution
    h, w = grid
    if h < 1 or w < 1 or res % h or res % w:
        raise ValueError(f"cell_labels: a {h}x{w} grid does not tile the {res}x{res} scene")
    top = np.full((res, res), -1, np.int32)
    for k, obj in enumerate(scene.objects):
        top[object_mask(obj, res)] = k
    masks = (top[None] == np.arange(len(scene.objects))[:, None, None])   # [K, res, res] visible pixels
    if min_pixels is None:
        min_pixels = max(1, round(3 * (res // h) * (res // w) / 32))
    owner = cell_owners(masks, [(o.cx, o.cy) for o in scene.objects], grid, min_pixels)
    colours = list(world.COLORS)
    shape = np.array([world.SHAPES.index(o.shape) for o in scene.objects] + [len(world.SHAPES)], np.int32)
    colour = np.array([colours.index(o.color) for o in scene.objects] + [len(colours)], np.int32)
    return shape[owner], colour[owner]   # owner -1 picks the background entry
