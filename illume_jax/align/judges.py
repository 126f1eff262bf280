"""Judges for self-enhancement step 2: rate each generated image against its prompt (ILLUME §3.3).

Every judge has `name` and `judge_many(images, prompts, metadata) -> list[Verdict]`; a Verdict holds
an `Assessment` (see `assessment.py`) or, when the judge failed, the reason, never a guessed score.

ExactJudge (the offline default) runs `shapecomp_scorer.detect` once per image and derives each
dimension from the GenEval-style metadata; `consistent` equals `shapecomp_scorer.grade(...)[0]`
for every image (tests check it), because each rule reads the same detections the same way:
  object   yes iff every included class (count >= 1) is detected at least once.
  count    rated only when the metadata constrains a number beyond 'one of each' (an include with
           count > 1, or any exclude): yes iff each such class is detected at least its (largest)
           include count and fewer than its exclude count times (counting: exactly N). Else 'none'.
  color    rated only when an include names a colour: yes iff, per such clause, the `count` largest
           detections of the class all have that colour. Like `grade` (GenEval's most confident
           detections), not "any `count` of them": a large blue square next to a small red speck
           read as a square fails "a red square" in `grade`, so it must fail here too. A missing
           object cannot have the asked colour, so its colour is 'no' as well. Otherwise 'none'.
  spatial  rated only when an include has 'position' [rel, target]: yes iff every one of the
           clause's `count` largest detections stands in `rel` to every one of the target clause's
           (`scene.relations_between` on box centres and extents, exactly `grade`'s test); a
           missing object or a target that is not an earlier clause is 'no'. Otherwise 'none'.
  grade also drops a position whose target clause failed on colour; that image already has colour
  'no', so the verdicts agree without copying the rule. The rationale is one short sentence about
  the first failing dimension (object, count, color, spatial order), in words `format_assessment`
  keeps unchanged: 'there is no circle', 'there are 2 stars, not 3', 'the square is blue, not red',
  'the circle is not left of the square'; 'it matches the description' when nothing failed.

ModelJudge asks the MLLM itself `assess_question(prompt)` per image and parses the reply with
`parse_assessment`; a reply that does not parse is a failed Verdict naming the reply. It decodes
greedily (`Illume.understand`'s default), so asking again would return the same reply: one attempt.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Sequence

import numpy as np

from illume_jax.align.assessment import (DIMENSIONS, Assessment, AssessmentParseError, assess_question,
                                         parse_assessment)
from illume_jax.data.shapecomp import world as shapecomp_world
from illume_jax.data.shapecomp.scene import relations_between
from illume_jax.data.shapecomp.text import plural
from illume_jax.eval import shapecomp_scorer as scorer

MATCHES = "it matches the description"


@dataclasses.dataclass(frozen=True)
class Verdict:
    assessment: Assessment | None
    error: str | None = None     # why the judge failed ('unparsable reply: ...'); None when ok
    attempts: int = 1
    raw: str = ""                # the judge's reply as written ('' for the exact judge)

    @property
    def ok(self) -> bool:
        return self.assessment is not None and self.error is None


def _check_lengths(images, prompts, metadata):
    if not len(images) == len(prompts) == len(metadata):
        raise ValueError(f"judge_many: {len(images)} images, {len(prompts)} prompts, {len(metadata)} metadata")


def _there(n: int, cls: str) -> str:
    return f"there is {n} {cls}" if n == 1 else f"there are {n} {plural(cls)}"


class ExactJudge:
    """The ShapeComp judge: detections + metadata, no learned model (rules in the module docstring)."""
    name = "exact"

    def __init__(self, level: int | None = None):
        # Rotation is searched only where the level rotates objects (`detect` is ~6x cheaper without).
        self.detect_kw = {} if level is None else dict(rotated=shapecomp_world.get_level(int(level)).rotation)

    def judge_many(self, images: Sequence[np.ndarray], prompts: Sequence[str],
                   metadata: Sequence[dict]) -> list[Verdict]:
        _check_lengths(images, prompts, metadata)
        return [Verdict(self.assess(img, meta), attempts=1, raw="") for img, meta in zip(images, metadata)]

    def assess(self, image: np.ndarray, meta: dict) -> Assessment:
        by_class: dict[str, list] = defaultdict(list)
        for d in scorer.detect(image, **self.detect_kw):   # largest first, as in grade
            by_class[d.shape].append(d)
        include, exclude = meta.get("include", []), meta.get("exclude", [])
        fails: dict[str, list[str]] = {d: [] for d in DIMENSIONS}
        rated = {"object"}
        for req in include:                       # object
            if req["count"] >= 1 and not by_class.get(req["class"]):
                fails["object"].append(f"there is no {req['class']}")
        counted = {r["class"] for r in include if r["count"] > 1} | {r["class"] for r in exclude}
        for cls in sorted(counted):               # count: at least lo, at most hi
            lo = max([r["count"] for r in include if r["class"] == cls], default=0)
            hi = min([r["count"] - 1 for r in exclude if r["class"] == cls], default=None)
            rated.add("count")
            n = len(by_class.get(cls, []))
            if lo == hi and n != lo:
                fails["count"].append(f"{_there(n, cls)}, not {lo}")
            elif n < lo:
                fails["count"].append(f"{_there(n, cls)}, not at least {lo}")
            elif hi is not None and n > hi:
                fails["count"].append(f"{_there(n, cls)}, not at most {hi}")
        found = [by_class.get(req["class"], [])[:req["count"]] for req in include]
        for req, f in zip(include, found):        # color
            if "color" not in req:
                continue
            rated.add("color")
            cls, want = req["class"], req["color"]
            if len(f) < req["count"]:
                fails["color"].append(f"there is no {want} {cls}")
            elif any(d.color != want for d in f):
                seen = " and ".join(sorted({d.color for d in f if d.color != want}))
                fails["color"].append(f"the {cls} is {seen}, not {want}" if req["count"] == 1
                                      else f"some {plural(cls)} are {seen}, not {want}")
        for k, (req, f) in enumerate(zip(include, found)):   # spatial
            if "position" not in req:
                continue
            rated.add("spatial")
            rel, target = req["position"]
            if not -k <= target < k:              # grade's groups[target]: earlier clauses only
                fails["spatial"].append(f"the position of the {req['class']} cannot be checked")
                continue
            tgt, tf = include[:k][target], found[:k][target]
            if len(f) < req["count"] or len(tf) < tgt["count"] or not all(
                    rel in relations_between(d.center, d.extent, t.center, t.extent) for d in f for t in tf):
                fails["spatial"].append(f"the {req['class']} is not {rel} the {tgt['class']}")
        ratings = {d: ("no" if fails[d] else "yes") if d in rated else "none" for d in DIMENSIONS}
        first = next((fails[d][0] for d in DIMENSIONS if fails[d]), MATCHES)
        return Assessment(ratings=ratings, rationale=first)


class ModelJudge:
    """The MLLM as its own judge. `illume`: anything with `.understand(images, questions,
    max_new_tokens=...) -> list[str]` (an `infer.illume.Illume`, or a fake in tests)."""
    name = "model"

    def __init__(self, illume, max_new_tokens: int = 48, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected >= 1")
        self.illume, self.max_new_tokens, self.batch_size = illume, max_new_tokens, batch_size

    def judge_many(self, images: Sequence[np.ndarray], prompts: Sequence[str],
                   metadata: Sequence[dict]) -> list[Verdict]:
        _check_lengths(images, prompts, metadata)
        out = []
        for s in range(0, len(images), self.batch_size):
            chunk = list(prompts[s:s + self.batch_size])
            replies = self.illume.understand(list(images[s:s + self.batch_size]),
                                             [assess_question(p) for p in chunk],
                                             max_new_tokens=self.max_new_tokens)
            if len(replies) != len(chunk):
                raise ValueError(f"understand returned {len(replies)} replies for {len(chunk)} questions")
            out += [self._verdict(r) for r in replies]
        return out

    @staticmethod
    def _verdict(reply: str) -> Verdict:
        try:
            return Verdict(parse_assessment(reply), attempts=1, raw=reply)
        except AssessmentParseError as e:
            return Verdict(None, error=f"unparsable reply: {e}", attempts=1, raw=reply)


def _rate(hits: int, n: int):
    return hits / n if n else None


def agreement(a: Sequence[Verdict], b: Sequence[Verdict]) -> dict:
    """How judge b agrees with judge a, over the samples both judged (ok). `consistent`: rate of
    equal overall verdicts, with the 2x2 table ('yes_no' = a says consistent, b not). Per
    dimension: rate of equal ratings where both rate it (neither 'none'), and `none_mismatch`:
    samples where exactly one of them says 'none'. `skipped`: samples where either judge failed."""
    if len(a) != len(b):
        raise ValueError(f"agreement: {len(a)} verdicts vs {len(b)}")
    pairs = [(x.assessment, y.assessment) for x, y in zip(a, b) if x.ok and y.ok]
    table = {f"{p}_{q}": 0 for p in ("yes", "no") for q in ("yes", "no")}
    for x, y in pairs:
        table[f"{'yes' if x.consistent else 'no'}_{'yes' if y.consistent else 'no'}"] += 1
    dims = {}
    for d in DIMENSIONS:
        both = [(x.ratings[d], y.ratings[d]) for x, y in pairs if "none" not in (x.ratings[d], y.ratings[d])]
        dims[d] = {"compared": len(both), "agreement": _rate(sum(p == q for p, q in both), len(both)),
                   "none_mismatch": sum((x.ratings[d] == "none") != (y.ratings[d] == "none") for x, y in pairs)}
    return {"compared": len(pairs), "skipped": len(a) - len(pairs),
            "consistent": _rate(table["yes_yes"] + table["no_no"], len(pairs)), "table": table,
            "dimensions": dims}
