"""ShapeComp scorer: grades images and answers without any learned model.

Detection (the stand-in for GenEval's Mask2Former + CLIP colour classifier): each pixel
takes the nearest palette colour if it lies within `tol` (RGB distance), connected
components per colour (`scipy.ndimage.label`) above a minimum area become objects, and the
shape comes from rotation-invariant geometry — holes (ring), solidity = area / convex-hull
area (cross, star), area / circumscribed-circle area (circle > hexagon > square/diamond >
triangle) and box fill (square vs diamond).

Grading follows GenEval (djghosh13/geneval `evaluation/evaluate_images.py`): includes are
AND-ed "at least `count` of class" clauses with optional colour (checked on the largest
`count` detections, GenEval's most-confident) and position (GenEval's relative-position
rule against the objects of a previous clause); excludes fail when `count` or more are
found, so counting means exactly N. Understanding answers are parsed as POPE does; edits
are graded on instruction following (the after scene is found) and preservation (each
untouched object found again with mask IoU >= 0.8 and its colour).
"""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from illume_jax.data.shapecomp import world
from illume_jax.data.shapecomp.render import object_mask
from illume_jax.data.shapecomp.scene import Scene, relations_between

PALETTE_NAMES = tuple(world.COLORS)
PALETTE = np.asarray([world.COLORS[c] for c in PALETTE_NAMES], np.float32)
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclasses.dataclass
class Detection:
    color: str
    shape: str
    area: int
    box: tuple[float, float, float, float]   # x0, y0, x1, y1 (pixel edges)
    centroid: tuple[float, float]           # x, y
    mask: np.ndarray

    @property
    def extent(self) -> tuple[float, float]:
        return self.box[2] - self.box[0], self.box[3] - self.box[1]

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected a [H, W, 3] uint8 array, got shape {image.shape} dtype {image.dtype}")
    return image


# Shape prototypes in a rotation-invariant feature space, measured on ground-truth renders
# of levels 0-3 (midpoints of each feature's range): solidity = area / convex-hull area,
# circularity = area / circumscribed-circle area, box fill = area / bounding-box area, and
# out/in = circumscribed / inscribed radius. Rings are recognised first by their hole.
_FEATURES = ("solidity", "circularity", "box_fill", "out_in")
_SCALE = np.asarray([0.06, 0.05, 0.08, 0.15])
_PROTOTYPES = {
    "triangle": (0.865, 0.45, 0.54, 1.87), "square": (0.95, 0.64, 0.815, 1.36), "circle": (0.935, 0.89, 0.775, 1.12),
    "diamond": (0.905, 0.63, 0.55, 1.45), "star": (0.635, 0.455, 0.485, 1.97), "cross": (0.715, 0.64, 0.56, 2.12),
    "hexagon": (0.93, 0.775, 0.755, 1.2),
}


def shape_features(mask: np.ndarray) -> np.ndarray:
    area = float(mask.sum())
    ys, xs = np.nonzero(mask)
    # Pixel corners, so the hull covers the pixels' full extent.
    pts = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)]).astype(np.float64)
    try:
        hull_area = ConvexHull(pts).volume
    except QhullError:  # degenerate (a line of pixels)
        hull_area = area
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    outer = np.sqrt(((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2).max()) + 0.5
    inner = max(float(ndimage.distance_transform_edt(np.pad(mask, 1)).max()), 0.5)
    box_fill = area / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    return np.asarray([area / hull_area, area / (np.pi * outer ** 2), box_fill, outer / inner])


def classify_shape(mask: np.ndarray, shapes: Sequence[str] = world.SHAPES) -> str:
    """Shape name from a binary component mask: ring if it has a hole, else the nearest
    prototype among `shapes` (restricting to a level's shapes removes impossible answers)."""
    filled = ndimage.binary_fill_holes(mask)
    if filled.sum() - mask.sum() > 0.12 * filled.sum():
        return "ring"
    f = shape_features(mask)
    candidates = [s for s in shapes if s in _PROTOTYPES] or list(_PROTOTYPES)
    dist = [float((((f - np.asarray(_PROTOTYPES[s])) / _SCALE) ** 2).sum()) for s in candidates]
    best = candidates[int(np.argmin(dist))]
    # Two pairs the prototypes cannot separate at a few pixels' size or under rotation:
    if best in ("cross", "star") and {"cross", "star"} <= set(candidates):
        # a cross maps onto itself under a quarter turn, a five-pointed star does not
        best = "cross" if _quarter_turn_iou(mask) > 0.71 else "star"
    elif best in ("square", "diamond") and {"square", "diamond"} <= set(candidates):
        # same polygon: a diamond is a square turned by ~45 degrees (scenes rotate by <= 20)
        best = "diamond" if 25 <= _min_box_angle(mask) <= 65 else "square"
    return best


def _quarter_turn_iou(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    px, py = xs + 0.5, ys + 0.5  # pixel centres, so half-pixel centroids rotate exactly
    cx, cy = px.mean(), py.mean()
    rx, ry = np.floor(cx - (py - cy)).astype(int), np.floor(cy + (px - cx)).astype(int)
    inside = (rx >= 0) & (ry >= 0) & (rx < mask.shape[1]) & (ry < mask.shape[0])
    hit = np.zeros_like(mask)
    hit[ry[inside], rx[inside]] = True
    return float((hit & mask).sum() / (hit | mask).sum())


def _min_box_angle(mask: np.ndarray) -> float:
    """Angle in [0, 90) degrees of the minimum-area bounding rectangle."""
    ys, xs = np.nonzero(mask)
    pts = np.stack([xs - xs.mean(), ys - ys.mean()], 1)
    angles = np.deg2rad(np.arange(0, 90))
    c, s = np.cos(angles)[:, None], np.sin(angles)[:, None]
    u, v = pts[:, 0] * c + pts[:, 1] * s, -pts[:, 0] * s + pts[:, 1] * c
    areas = (u.max(1) - u.min(1) + 1) * (v.max(1) - v.min(1) + 1)
    return float(np.argmin(areas))


def background_color(image: np.ndarray) -> np.ndarray:
    """The scene background: the per-channel median of the border pixels (objects keep a gap
    to the border, and a median ignores noise and the odd object pixel)."""
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def palette_labels(image: np.ndarray, *, tol: float = 60.0) -> np.ndarray:
    """Per pixel, the palette index of the object it belongs to, or -1 for background.

    An object's edge pixels are mixtures of its colour c and the background b (blur, JPEG,
    a decoder's soft edges), so each pixel x is modelled as a point on a segment b -> c:
    coverage t = (x-b).(c-b) / |c-b|^2 and residual = distance from x to that segment. A
    pixel belongs to the colour with the smallest residual among those it covers by at least
    half (t >= 0.5: the 50% iso-contour keeps a blurred shape's outline where it was) and only
    if that residual is within `tol`. A nearest-palette-colour rule instead shrinks objects
    by their mixed edge pixels, which at 64x64 turns stars into squares."""
    x = image.astype(np.float32)
    b = background_color(image)
    d = PALETTE - b                                                     # [K, 3]
    v = x - b                                                           # [H, W, 3]
    t = np.clip(np.einsum("hwc,kc->hwk", v, d) / (d * d).sum(-1), 0.0, 1.0)
    resid = np.linalg.norm(v[:, :, None, :] - t[..., None] * d, axis=-1)  # [H, W, K]
    resid = np.where(t >= 0.5, resid, np.inf)
    best = resid.argmin(-1)
    return np.where(resid.min(-1) <= tol, best, -1)


def detect(image: np.ndarray, *, tol: float = 60.0, min_area: int | None = None,
           shapes: Sequence[str] = world.SHAPES) -> list[Detection]:
    """Objects in an image, largest first. `shapes`: the shape names that can occur (a level's);
    `tol`: how far (RGB) a pixel may lie off its background-to-colour mixing line."""
    image = _check_image(image)
    res = image.shape[0]
    min_area = max(6, round(6 * (res / 64) ** 2)) if min_area is None else min_area
    labels_all = palette_labels(image, tol=tol)
    out = []
    for ci, name in enumerate(PALETTE_NAMES):
        m = labels_all == ci
        if not m.any():
            continue
        # A 3x3 opening-free labelling: 8-connectivity keeps thin star tips attached.
        labels, n = ndimage.label(m, structure=np.ones((3, 3)))
        for k in range(1, n + 1):
            comp = labels == k
            area = int(comp.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(comp)
            out.append(Detection(color=name, shape=classify_shape(comp, shapes), area=area,
                                 box=(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)),
                                 centroid=(float(xs.mean() + 0.5), float(ys.mean() + 0.5)), mask=comp))
    return sorted(out, key=lambda d: -d.area)


# -- GenEval-style generation grading ------------------------------------------------------

def grade(image: np.ndarray, metadata: dict, detections: list[Detection] | None = None) -> tuple[bool, list[str]]:
    """(correct, reasons) for one image against GenEval-style metadata."""
    dets = detect(image) if detections is None else detections
    by_class: dict[str, list[Detection]] = defaultdict(list)
    for d in dets:
        by_class[d.shape].append(d)
    correct, reasons, groups = True, [], []
    for req in metadata.get("include", []):
        found = by_class.get(req["class"], [])[:req["count"]]
        matched = True
        if len(found) < req["count"]:
            correct = matched = False
            reasons.append(f"expected {req['class']}>={req['count']}, found {len(found)}")
        else:
            if "color" in req and sum(d.color == req["color"] for d in found) < req["count"]:
                correct = matched = False
                reasons.append(f"expected {req['color']} {req['class']}, found {[d.color for d in found]}")
            if "position" in req and matched:
                rel, target = req["position"]
                if target >= len(groups) or groups[target] is None:
                    correct = matched = False
                    reasons.append(f"no target group {target} for position")
                else:
                    for d in found:
                        for t in groups[target]:
                            if rel not in relations_between(d.center, d.extent, t.center, t.extent):
                                correct = matched = False
                    if not matched:
                        reasons.append(f"expected {req['class']} {rel} target")
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        if len(by_class.get(req["class"], [])) >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {len(by_class[req['class']])}")
    return correct, reasons


def geneval_scores(images: Sequence[np.ndarray], metadata: Sequence[dict],
                   prompt_ids: Sequence[int] | None = None) -> dict:
    """Per-tag accuracy, overall (mean of tags present), % correct images / prompts (any-of-n)."""
    if len(images) != len(metadata):
        raise ValueError(f"images ({len(images)}) and metadata ({len(metadata)}) differ in length")
    prompt_ids = list(range(len(images))) if prompt_ids is None else list(prompt_ids)
    per_tag: dict[str, list[bool]] = defaultdict(list)
    per_prompt: dict[int, list[bool]] = defaultdict(list)
    for img, meta, pid in zip(images, metadata, prompt_ids):
        ok, _ = grade(img, meta)
        per_tag[meta["tag"]].append(ok)
        per_prompt[pid].append(ok)
    tags = {t: float(np.mean(v)) for t, v in per_tag.items()}
    return {"tags": tags, "overall": float(np.mean(list(tags.values()))),
            "correct_images": float(np.mean([x for v in per_tag.values() for x in v])),
            "correct_prompts": float(np.mean([any(v) for v in per_prompt.values()]))}


# -- POPE-style understanding grading ------------------------------------------------------

def parse_yes_no(answer: str) -> str:
    """POPE's rule: first sentence; 'no' / 'not' / 'No' among its words means no."""
    first = answer.split(".")[0]
    words = re.findall(r"[A-Za-z']+", first)
    return "no" if any(w in ("no", "not", "No") for w in words) else "yes"


def pope_metrics(answers: Iterable[str], labels: Iterable[str]) -> dict:
    pred = np.asarray([parse_yes_no(a) == "yes" for a in answers])
    gold = np.asarray([l == "yes" for l in labels])
    if pred.shape != gold.shape or pred.size == 0:
        raise ValueError(f"answers ({pred.size}) and labels ({gold.size}) must be non-empty and equally long")
    tp, fp = int((pred & gold).sum()), int((pred & ~gold).sum())
    fn, tn = int((~pred & gold).sum()), int((~pred & ~gold).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / pred.size, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": float(pred.mean())}


# -- editing grading -----------------------------------------------------------------------

def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def grade_edit(image: np.ndarray, before: Scene, after: Scene, edited: int | None,
               untouched: Sequence[int]) -> dict:
    """instruction: every object of the target scene is found (same shape and colour, mask IoU
    >= 0.5) and nothing else; preservation: untouched objects found with IoU >= 0.8 and their
    colour; l1_outside: mean |image - target render| outside the edited object's box."""
    from illume_jax.data.shapecomp.render import render
    image = _check_image(image)
    res = after.resolution
    if image.shape[:2] != (res, res):
        raise ValueError(f"image: expected {res}x{res} for this pair, got {image.shape[:2]}")
    dets = detect(image)
    used = set()

    def find(obj, iou_min):
        m = object_mask(obj, res)
        best, best_iou = None, 0.0
        for i, d in enumerate(dets):
            if i in used or d.color != obj.color:
                continue
            v = _iou(m, d.mask)
            if v > best_iou:
                best, best_iou = i, v
        return (best, best_iou) if best_iou >= iou_min else (None, best_iou)

    preserved = []
    for k in untouched:
        i, _ = find(after.objects[k], 0.8)
        preserved.append(i is not None)
        if i is not None:
            used.add(i)
    follows = True
    for k, obj in enumerate(after.objects):
        if k in untouched:
            continue
        i, _ = find(obj, 0.5)
        if i is None or dets[i].shape != obj.shape:
            follows = False
        else:
            used.add(i)
    follows = follows and all(preserved) and len(dets) == len(after.objects)
    target = render(after).astype(np.float32)
    outside = np.ones((res, res), bool)
    changed = [b for b in before.objects if b not in after.objects]
    if edited is not None:
        changed.append(after.objects[edited])
    if changed:
        for obj in changed:
            y0, y1 = int(max(obj.cy - obj.r - 2, 0)), int(min(obj.cy + obj.r + 2, res))
            x0, x1 = int(max(obj.cx - obj.r - 2, 0)), int(min(obj.cx + obj.r + 2, res))
            outside[y0:y1, x0:x1] = False
    l1 = float(np.abs(image.astype(np.float32) - target)[outside].mean() / 255.0) if outside.any() else 0.0
    return {"instruction": bool(follows), "preservation": float(np.mean(preserved)) if preserved else 1.0,
            "l1_outside": l1}
