"""ShapeComp scorer self-checks: how it reads ground truth and degraded renders, and its speed.

  python bench/scorer.py                         # levels 0-3, 60 scenes each (a few minutes on 2 cores)
  python bench/scorer.py --levels 1 --scenes 200

For each level and degradation (none; Gaussian noise sigma 8; a 3x3 box blur; Gaussian blurs of
1 and 1.5 px, about what a tokenizer's decoder does to 64x64 edges; JPEG quality 75):
  - geneval:    share of the scenes' GenEval-style prompts (every tag) graded correct;
  - contradict: the same prompts with one fact made false (should be ~0);
  - agreement:  share of scenes the scorer reads exactly as the clean render (the tokenizer-ceiling
                comparison, `eval/recon.reading_mismatch`);
  - ms/image:   `detect` time per image.
Then non-shapes (bars, L / T shapes, dumbbells, crescents), which `detect` must not report.
Writes bench/results/scorer.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from illume_jax.data import shapecomp  # noqa: E402
from illume_jax.data.shapecomp import world  # noqa: E402
from illume_jax.eval import recon  # noqa: E402
from illume_jax.eval import scorer_checks  # noqa: E402
from illume_jax.eval.scorer_checks import DEGRADATIONS, contradict, degrade  # noqa: E402
from illume_jax.eval import shapecomp_scorer as scorer  # noqa: E402


def level_rows(level: int, scenes: int) -> list[dict]:
    kw = scorer.level_options([level])
    rows = []
    for kind in DEGRADATIONS:
        right, wrong, agree, seconds, images = [], [], [], 0.0, 0
        for i in range(scenes):
            scene = shapecomp.make_scene(level, "test", i)
            clean = shapecomp.render(scene)
            img = degrade(clean, kind)
            t = time.perf_counter()
            dets = scorer.detect(img, **kw)
            seconds += time.perf_counter() - t
            images += 1
            for tag in shapecomp.available_tags(scene):
                meta = shapecomp.prompt_for(scene, tag)[1]
                right.append(scorer.grade(img, meta, dets)[0])
                wrong.append(scorer.grade(img, contradict(scene, meta), dets)[0])
            agree.append(recon.reading_mismatch(clean, img, **kw) is None)
        rows.append(dict(level=level, degradation=kind, geneval=float(np.mean(right)),
                         contradict=float(np.mean(wrong)), agreement=float(np.mean(agree)),
                         ms_per_image=1000 * seconds / images, scenes=scenes))
        print(f"level {level} {kind:10s} geneval {rows[-1]['geneval']:.3f}  contradict {rows[-1]['contradict']:.3f}  "
              f"agreement {rows[-1]['agreement']:.3f}  {rows[-1]['ms_per_image']:.0f} ms/image", flush=True)
    return rows


def non_shapes() -> dict:
    blobs = dict(scorer_checks.non_shape_masks())
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    blobs["ellipse 2:1"] = ((xx - 32) / 11.3) ** 2 + ((yy - 32) / 5.7) ** 2 <= 1   # reported, as a diamond
    out = {}
    for name, mask in blobs.items():
        img = np.full((64, 64, 3), 128, np.uint8)
        img[mask] = world.COLORS["red"]
        for kind in ("none", "gauss_1.0"):
            dets = scorer.detect(degrade(img, kind))
            out[f"{name} ({kind})"] = [f"{d.shape} (fit error {d.fit_error:.2f})" for d in dets] or "not detected"
            print(f"{name + ' (' + kind + ')':24s} {out[f'{name} ({kind})']}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="0,1,2,3")
    ap.add_argument("--scenes", type=int, default=60)
    args = ap.parse_args()
    rows = [r for lv in args.levels.split(",") for r in level_rows(int(lv), args.scenes)]
    result = dict(rows=rows, non_shapes=non_shapes())
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "scorer.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
