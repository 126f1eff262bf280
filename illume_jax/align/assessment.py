"""Self-enhancement's words, in one place: rating dimensions, the judge prompt, the assessment text
the model learns to write, its parser, and the two dialogue formats (ILLUME §3.3).

An assessment rates a generated image against its text prompt on four dimensions — the objects
named, their count, their colours, their spatial relation — each `yes`, `no` or `none` (the prompt
says nothing about it), plus a one-sentence rationale:

    object yes, count yes, color no, spatial none. the square is blue, not red. overall no

Plain lower-case words and commas only, so the tiny ShapeComp tokenizers spell it with pieces they
already have, and so `parse_assessment` can read it back from any judge (the model itself, an HTTP
endpoint) or reject it: an unparsable reply is a judge failure, never a silent score.

Dialogues (LLaVA-style records, the format of `kind='jsonl'` datasets):
  good sample  one turn:  human `<image>` + the assessment question -> gpt the assessment
  bad sample   two turns: the same, then human asks for a corrected image -> gpt `<image>`
               (the corrected image; on ShapeComp the exact render of the prompt's scene)
"""
from __future__ import annotations

import dataclasses
import re

DIMENSIONS = ("object", "count", "color", "spatial")
RATINGS = ("yes", "no", "none")

# What the MLLM is asked (assessment dialogues and the model-as-judge).
ASSESS_QUESTION = "Does the image match the description: {prompt}? Rate object, count, color and spatial."
# The second human turn of a bad sample's dialogue.
CORRECTION_REQUEST = "Generate a corrected image of {prompt}"

# What an external judge (an OpenAI-compatible chat model) is told; its reply must be one line in
# the assessment format so the same parser reads every judge.
JUDGE_SYSTEM = (
    "You grade whether an image matches a text description. Rate four dimensions: object (every "
    "object named is there), count (the numbers are right), color (the colors are right), spatial (the "
    "stated spatial relation holds). Rate each yes, no, or none when the description does not mention it. "
    "Reply with exactly one line in this format and nothing else:\n"
    "object <yes|no|none>, count <yes|no|none>, color <yes|no|none>, spatial <yes|no|none>. "
    "<one short sentence of rationale>. overall <yes|no>")
JUDGE_USER = "Description: {prompt}"


class AssessmentParseError(ValueError):
    """A judge reply that is not an assessment (the sample is retried, then skipped and counted)."""


@dataclasses.dataclass(frozen=True)
class Assessment:
    ratings: dict          # dimension -> 'yes' | 'no' | 'none'
    rationale: str = ""

    def __post_init__(self):
        if set(self.ratings) != set(DIMENSIONS):
            raise ValueError(f"assessment ratings {sorted(self.ratings)}: expected exactly {list(DIMENSIONS)}")
        bad = {k: v for k, v in self.ratings.items() if v not in RATINGS}
        if bad:
            raise ValueError(f"assessment ratings {bad}: each must be one of {RATINGS}")

    @property
    def consistent(self) -> bool:
        """The image matches: no dimension is rated 'no'."""
        return all(v != "no" for v in self.ratings.values())

    def to_json(self) -> dict:
        return {"ratings": dict(self.ratings), "rationale": self.rationale, "consistent": self.consistent}

    @classmethod
    def from_json(cls, d: dict) -> "Assessment":
        return cls(ratings=dict(d["ratings"]), rationale=d.get("rationale", ""))


def _clean(sentence: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9 ,']", " ", sentence.lower())).strip(" ,")


def format_assessment(a: Assessment) -> str:
    """The assessment as the one line the model learns (see the module docstring)."""
    head = ", ".join(f"{d} {a.ratings[d]}" for d in DIMENSIONS)
    rationale = _clean(a.rationale) or ("it matches the description" if a.consistent else "it does not match")
    return f"{head}. {rationale}. overall {'yes' if a.consistent else 'no'}"


_RATING = re.compile(r"\b(object|objects|count|colou?r|spatial|spatial relation)\s*[:=]?\s*(yes|no|none|n/?a)\b")
_OVERALL = re.compile(r"\boverall\s*[:=]?\s*(yes|no)\b")
_ALIASES = {"objects": "object", "colour": "color", "spatial relation": "spatial"}


def parse_assessment(text: str) -> Assessment:
    """Reads an assessment back from a judge's reply (case, ':' / '=' separators, 'colour', 'n/a'
    and surrounding chatter are tolerated). Raises AssessmentParseError when a dimension is missing
    or rated twice differently, or when a stated 'overall' contradicts the ratings."""
    low = text.lower()
    ratings: dict[str, str] = {}
    for name, value in _RATING.findall(low):
        dim = _ALIASES.get(name, name)
        value = "none" if value.replace("/", "") == "na" else value
        if ratings.get(dim, value) != value:
            raise AssessmentParseError(f"judge reply rates {dim!r} twice ({ratings[dim]!r} and {value!r}): {text!r}")
        ratings[dim] = value
    missing = [d for d in DIMENSIONS if d not in ratings]
    if missing:
        raise AssessmentParseError(f"judge reply has no rating for {missing}: {text!r}")
    a = Assessment(ratings=ratings, rationale=_rationale(low))
    overall = _OVERALL.findall(low)
    if overall and (overall[-1] == "yes") != a.consistent:
        raise AssessmentParseError(f"judge reply says overall {overall[-1]!r} but rates {ratings}: {text!r}")
    return a


def _rationale(low: str) -> str:
    """The text between the last rating and 'overall' (the judge's one sentence)."""
    last = max((m.end() for m in _RATING.finditer(low)), default=0)
    tail = low[last:]
    cut = _OVERALL.search(tail)
    return _clean(tail[:cut.start()] if cut else tail)


# -- dialogues -----------------------------------------------------------------------------------

def assess_question(prompt: str) -> str:
    return ASSESS_QUESTION.format(prompt=prompt)


def good_dialogue(prompt: str, image: str, a: Assessment) -> dict:
    """One-turn record: the generated image and its (consistent) assessment."""
    return {"images": [image], "conversations": [
        {"from": "human", "value": "<image>\n" + assess_question(prompt)},
        {"from": "gpt", "value": format_assessment(a)}]}


def bad_dialogue(prompt: str, image: str, a: Assessment, corrected: str) -> dict:
    """Two-turn record: the assessment of the flawed image, then the corrected image as output."""
    return {"images": [image, corrected], "conversations": [
        {"from": "human", "value": "<image>\n" + assess_question(prompt)},
        {"from": "gpt", "value": format_assessment(a)},
        {"from": "human", "value": CORRECTION_REQUEST.format(prompt=prompt)},
        {"from": "gpt", "value": "<image>"}]}
