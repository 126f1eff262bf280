"""ShapeComp scorer: grades images and answers without any learned model.

Detection (the stand-in for GenEval's Mask2Former + CLIP colour classifier): each pixel
takes the nearest palette colour if it lies within `tol` (RGB distance), connected
components per colour (`scipy.ndimage.label`) above a minimum area are candidates, and the
shape is the best fit of the world's own shape templates, blurred, to the component's soft
coverage (`fit_shape`); a candidate no template fits is dropped. Fitting rather than
thresholded geometry keeps a decoder's 1-2 px blur from turning 10-px stars into circles.

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
import functools
import re
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from illume_jax.data.shapecomp import world
from illume_jax.data.shapecomp.render import object_mask, shape_mask
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
    fit_error: float = 0.0                  # the shape template's error (lower = more certain)

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


# -- shape by template fitting -------------------------------------------------------------
# A component's soft coverage map (how much of each pixel its colour covers, see
# `colour_coverage`) is compared with every candidate shape rendered by the world's own
# rasteriser (`render.shape_mask`) at a grid of sub-pixel centres, radii and rotations, each
# blurred by a Gaussian of several widths; the shape of the best fit wins. Fitting the blur
# is what makes a 10-px star that a decoder has softened by a pixel still read as a star:
# thresholded geometry (fill ratio, solidity) loses corners and concavities first. A
# component that no shape fits (`max_fit_error`, error per unit of covered area) is not an
# object -- GenEval's detector likewise drops low-confidence detections -- so bars, L-shapes,
# irregular blobs and colour fringes around other objects are not counted as shapes.
_SIGMAS_64 = (0.0, 0.6, 1.0, 1.5, 2.2)     # blur widths tried, in pixels at 64x64 (scaled)
_RADIUS_FACTORS = (0.88, 0.94, 1.0, 1.06, 1.12)  # around the radius implied by the covered area
_SHIFTS = (-0.33, 0.0, 0.33)               # sub-pixel centre offsets around the soft centroid
_ROTATIONS = np.linspace(-0.35, 0.35, 8)   # the world's rotation range (levels >= 3)
MAX_FIT_ERROR = 0.3                        # measured: renders <= 0.11, blurred <= 0.03, JPEG-75 <= 0.26


@functools.lru_cache(maxsize=None)
def _unit_area(shape: str) -> float:
    """Area of `shape` at radius 1 (numerically, on a 1/100 grid)."""
    g = (np.arange(400) + 0.5) / 100 - 2
    u, v = np.meshgrid(g, g)
    return float(shape_mask(shape, u, v, 1.0).sum()) / 100 ** 2


@functools.lru_cache(maxsize=64)
def _blur_matrices(n: int, sigmas: tuple[float, ...]) -> np.ndarray:
    """[S, n, n] Gaussian blur matrices (identity for sigma 0): B = G_y @ T @ G_x^T."""
    a = np.arange(n, dtype=np.float32)
    out = []
    for s in sigmas:
        g = np.eye(n, dtype=np.float32) if s == 0 else \
            np.exp(-0.5 * ((a[:, None] - a[None]) / s) ** 2) / (np.sqrt(2 * np.pi) * s)
        out.append(g)
    return np.stack(out).astype(np.float32)


def _best_template(shape, cov, cx, cy, shifts, radii, rotations, gy, gx, blur_penalty) -> tuple[float, float]:
    """(smallest error, its rotation) of `shape` templates against the coverage window `cov`;
    `blur_penalty` [S] multiplies the error of each blur width."""
    h, w = cov.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    sh = np.asarray(shifts, np.float32)
    dx, dy = np.broadcast_arrays(xs - (cx + sh)[:, None, None, None], ys - (cy + sh)[None, :, None, None])
    area, cc = float(cov.sum()), float((cov * cov).sum())
    best, best_rot = np.inf, 0.0
    for rot in rotations:
        c, s = np.cos(rot), np.sin(rot)
        u, v = c * dx + s * dy, -s * dx + c * dy
        for r in radii:
            t = shape_mask(shape, u / r, v / r, 1.0).astype(np.float32).reshape(-1, h, w)
            b = np.matmul(np.matmul(gy[:, None], t[None]), np.swapaxes(gx, 1, 2)[:, None])  # [S, N, h, w]
            bb, bc = (b * b).sum((-1, -2)), (b * cov).sum((-1, -2))
            # A free gain within +-25%: decoders shift colours a little, which scales the coverage.
            gain = np.clip(bc / np.maximum(bb, 1e-6), 0.8, 1.25)
            err = float(((gain * gain * bb - 2 * gain * bc + cc) / area * blur_penalty[:, None]).min())
            if err < best:
                best, best_rot = err, float(rot)
    return best, best_rot


def fit_shape(coverage: np.ndarray, shapes: Sequence[str] = world.SHAPES, *, rotated: bool = True,
              blur_scale: float = 1.0) -> tuple[str, float]:
    """(shape, error) of the best template fit to one object's soft coverage window [h, w]
    (values in [0, 1], zero outside the object's neighbourhood). The error is the squared
    difference per unit of covered area, times (1 + 2 sigma / blur_scale) for the fitted blur
    width sigma: blur hides differences between shapes as well as within one, so a blurred fit
    has to be closer to count as equally good. Coarse pass (centroid, three radii, coarse
    rotations) over every candidate, then a fine pass over the three best."""
    cov = np.asarray(coverage, np.float32)
    h, w = cov.shape
    area = float(cov.sum())
    if area <= 0:
        raise ValueError("fit_shape: coverage is empty")
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    cx, cy = float((cov * xs).sum() / area), float((cov * ys).sum() / area)
    sigmas = tuple(s * blur_scale for s in _SIGMAS_64)
    penalty = 1 + 2 * np.asarray(_SIGMAS_64, np.float32)
    gy, gx = _blur_matrices(h, sigmas), _blur_matrices(w, sigmas)
    symmetric = ("circle", "ring")
    coarse = {}
    for s in shapes:
        r0 = np.sqrt(area / _unit_area(s))
        rots = _ROTATIONS if rotated and s not in symmetric else (0.0,)
        coarse[s] = _best_template(s, cov, cx, cy, (0.0,), (r0 * 0.94, r0, r0 * 1.06), rots, gy, gx, penalty)
    lowest = min(e for e, _ in coarse.values())
    finalists = sorted((s for s in shapes if coarse[s][0] <= 1.5 * lowest + 0.03), key=lambda s: coarse[s][0])[:3]
    fine = {}
    for s in finalists:
        r0 = np.sqrt(area / _unit_area(s))
        rot = coarse[s][1]
        rots = (rot - 0.05, rot, rot + 0.05) if rotated and s not in symmetric else (0.0,)
        fine[s] = _best_template(s, cov, cx, cy, _SHIFTS, [r0 * f for f in _RADIUS_FACTORS], rots, gy, gx, penalty)[0]
    best = min(fine, key=fine.get)
    return best, fine[best]


def background_color(image: np.ndarray) -> np.ndarray:
    """The scene background: the per-channel median of the border pixels (objects keep a gap
    to the border, and a median ignores noise and the odd object pixel)."""
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def colour_coverage(image: np.ndarray, *, tol: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """(coverage [H, W, K], labels [H, W]): per pixel and palette colour, the fraction of the
    pixel the colour covers, and the palette index of the object the pixel belongs to (-1 for
    background).

    An object's edge pixels are mixtures of its colour c and the background b (blur, JPEG,
    a decoder's soft edges), so each pixel x is modelled as a point on a segment b -> c:
    coverage t = (x-b).(c-b) / |c-b|^2 and residual = distance from x to that segment
    (coverage counts only where the residual is within `tol`). A pixel belongs to the colour
    with the smallest residual among those it covers by at least half (t >= 0.5: the 50%
    iso-contour keeps a blurred shape's outline where it was). A nearest-palette-colour rule
    instead shrinks objects by their mixed edge pixels, which at 64x64 turns stars into squares."""
    x = image.astype(np.float32)
    b = background_color(image)
    d = PALETTE - b                                                     # [K, 3]
    v = x - b                                                           # [H, W, 3]
    t = np.clip(np.einsum("hwc,kc->hwk", v, d) / (d * d).sum(-1), 0.0, 1.0)
    resid = np.linalg.norm(v[:, :, None, :] - t[..., None] * d, axis=-1)  # [H, W, K]
    coverage = np.where(resid <= tol, t, 0.0).astype(np.float32)
    resid = np.where(t >= 0.5, resid, np.inf)
    best = resid.argmin(-1)
    return coverage, np.where(resid.min(-1) <= tol, best, -1)


def detect(image: np.ndarray, *, tol: float = 60.0, min_area: int | None = None,
           shapes: Sequence[str] = world.SHAPES, rotated: bool = True,
           max_fit_error: float = MAX_FIT_ERROR) -> list[Detection]:
    """Objects in an image, largest first. `shapes`: the shape names that can occur (a level's);
    `rotated`: whether objects may be turned (levels >= 3; False makes fitting ~6x cheaper);
    `tol`: how far (RGB) a pixel may lie off its background-to-colour mixing line;
    `max_fit_error`: components no shape template fits this well are dropped (not objects)."""
    image = _check_image(image)
    res = image.shape[0]
    scale = res / 64
    min_area = max(6, round(6 * scale ** 2)) if min_area is None else min_area
    coverage, labels_all = colour_coverage(image, tol=tol)
    margin = 5 * max(scale, 1.0)   # the neighbourhood that holds a component's blurred edge
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
            # The component's soft edge, cut where another same-coloured component is nearer.
            near = ndimage.distance_transform_edt(~comp)
            others = (labels > 0) & ~comp
            region = near <= margin
            if others.any():
                region &= near < ndimage.distance_transform_edt(~others)
            ry, rx = np.nonzero(region)
            y0, y1, x0, x1 = ry.min(), ry.max() + 1, rx.min(), rx.max() + 1
            window = np.where(region, coverage[..., ci], 0.0)[y0:y1, x0:x1]
            shape, err = fit_shape(window, shapes, rotated=rotated, blur_scale=max(scale, 1.0))
            if err > max_fit_error:
                continue
            ys, xs = np.nonzero(comp)
            out.append(Detection(color=name, shape=shape, area=area, fit_error=err,
                                 box=(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)),
                                 centroid=(float(xs.mean() + 0.5), float(ys.mean() + 0.5)), mask=comp))
    return sorted(out, key=lambda d: -d.area)


def level_options(levels: Iterable[int]) -> dict:
    """`detect` keywords for images of these ShapeComp levels: their shapes, and rotation
    only where a level rotates objects."""
    lvs = [world.get_level(int(l)) for l in levels]
    return dict(shapes=tuple(sorted({s for lv in lvs for s in lv.shapes})), rotated=any(lv.rotation for lv in lvs))


# -- GenEval-style generation grading ------------------------------------------------------

def grade(image: np.ndarray, metadata: dict, detections: list[Detection] | None = None,
          **detect_kw) -> tuple[bool, list[str]]:
    """(correct, reasons) for one image against GenEval-style metadata (`detect_kw` go to `detect`)."""
    dets = detect(image, **detect_kw) if detections is None else detections
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
                   prompt_ids: Sequence[int] | None = None, **detect_kw) -> dict:
    """Per-tag accuracy, overall (mean of tags present), % correct images / prompts (any-of-n)."""
    if len(images) != len(metadata):
        raise ValueError(f"images ({len(images)}) and metadata ({len(metadata)}) differ in length")
    prompt_ids = list(range(len(images))) if prompt_ids is None else list(prompt_ids)
    per_tag: dict[str, list[bool]] = defaultdict(list)
    per_prompt: dict[int, list[bool]] = defaultdict(list)
    for img, meta, pid in zip(images, metadata, prompt_ids):
        ok, _ = grade(img, meta, **detect_kw)
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


def margin_auc(margins: Iterable[float], labels: Iterable[str]) -> float:
    """The ROC AUC of a yes-minus-no score against yes/no labels: the chance that a 'yes' question
    scores above a 'no' one (ties count half). 0.5 = the score ignores what is asked, whatever the
    accuracy; it stays defined when the greedy answer is one constant, where accuracy reads 0.5."""
    m = np.asarray(list(margins), np.float64)
    gold = np.asarray([l == "yes" for l in labels])
    if m.shape != gold.shape or not gold.any() or gold.all():
        raise ValueError(f"margins ({m.size}) and labels ({gold.size}) must be equally long with both answers present")
    pos, neg = m[gold], m[~gold]
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


# -- editing grading -----------------------------------------------------------------------

def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def grade_edit(image: np.ndarray, before: Scene, after: Scene, edited: int | None,
               untouched: Sequence[int], **detect_kw) -> dict:
    """instruction: every object of the target scene is found (same shape and colour, mask IoU
    >= 0.5) and nothing else; preservation: untouched objects found with IoU >= 0.8 and their
    colour; l1_outside: mean |image - target render| outside the edited object's box."""
    from illume_jax.data.shapecomp.render import render
    image = _check_image(image)
    res = after.resolution
    if image.shape[:2] != (res, res):
        raise ValueError(f"image: expected {res}x{res} for this pair, got {image.shape[:2]}")
    dets = detect(image, **detect_kw)
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
