"""LLaVA-style conversation records (the official data format, spec §5.3) for ShapeComp.

Each record: {'id', 'task', 'level', 'images': [png bytes], 'conversations':
[{'from': 'human'|'gpt', 'value': str}, ...], 'context': str}. Human turns hold `<image>`
placeholders; `context` is the dense scene description, which a text-only stage puts in
place of the image. QA records are multi-turn: one conversation per scene, every question a
turn (so the image is encoded once, as in LLaVA's multi-question samples), unless `qa_turns`
cuts it into several.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from illume_jax.data.shapecomp import qa, text, world
from illume_jax.data.shapecomp.edit import edit_pair
from illume_jax.data.shapecomp.render import png_bytes, render
from illume_jax.data.shapecomp.scene import make_scene, scene_rng

TASKS = ("caption", "qa", "t2i", "edit", "recon")
# ILLUME's stage-1 image reconstruction: the model regenerates the tokens of the image it is shown,
# in the official unconditional-editing wording (spec §3.5).
RECONSTRUCT = "{resolution_tag}<image>\nReconstruct the image according to the given image\n"
DESCRIBE = ("Describe the image.", "What is in the picture?", "Give a short description of the image.")


def _turns(*pairs: tuple[str, str]) -> list[dict]:
    out = []
    for human, gpt in pairs:
        out += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return out


def check_qa_turns(qa_turns) -> int:
    """qa_turns as an int >= 0, or a ValueError that names it (records and the dataset builder share it)."""
    if isinstance(qa_turns, bool) or not isinstance(qa_turns, (int, np.integer)) or qa_turns < 0:
        raise ValueError(f"qa_turns={qa_turns!r}: expected an int >= 0 (0: one QA record per scene)")
    return int(qa_turns)


def conversation_records(level: int, split: str, index: int, tasks: Iterable[str] = TASKS,
                         qa_negatives: str = "mixed", qa_lookups: bool = False, qa_turns: int = 0) -> list[dict]:
    """qa_negatives: how the QA record's existence negatives are drawn; qa_lookups: whether it asks
    every object's colour by its shape and shape by its colour (`qa.questions`).

    qa_turns: 0 puts all of a scene's questions in one QA record; k > 0 cuts the same shuffled questions
    into records of at most k (ids `...-qa-0`, `-qa-1`, ...), each with the image. In one long
    conversation the earlier answers give the later ones away: "Is there a red circle? yes" answers
    "What shape is the red object?" from the text, so the image never has to be read for it; with
    qa_turns=1 every answer comes from the image alone, as in POPE."""
    tasks = tuple(tasks)
    qa_turns = check_qa_turns(qa_turns)
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"tasks: {t!r} is not one of {TASKS}")
    scene = make_scene(level, split, index)
    image = png_bytes(render(scene))
    dense = text.dense_caption(scene)
    rng = scene_rng(level, split, index, salt="records")
    base = f"shapecomp-L{level}-{split}-{index}"
    out = []
    if "caption" in tasks:
        ask = DESCRIBE[int(rng.integers(len(DESCRIBE)))]
        caption = dense if rng.random() < 0.5 else text.short_caption(scene)
        out.append(dict(id=f"{base}-caption-0", task="caption", level=level, images=[image],
                        conversations=_turns((f"<image>\n{ask}", caption)), context=dense))
    if "qa" in tasks:
        # Shuffled: `qa.questions` lists present objects before absent ones (and a true relation
        # before a false one), so in that order the first answer was always "yes", and a model
        # asked one question (POPE-style) learned to answer "yes" without looking at the image.
        items = qa.questions(scene, qa_negatives, qa_lookups)
        order = scene_rng(level, split, index, salt="qa-order").permutation(len(items))
        items = [items[i] for i in order]
        per_record = qa_turns or len(items)
        for j, start in enumerate(range(0, len(items), per_record)):
            turns = _turns(*[(q["question"], q["answer"]) for q in items[start:start + per_record]])
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
            out.append(dict(id=f"{base}-qa-{j}", task="qa", level=level, images=[image], conversations=turns,
                            context=dense))
    if "t2i" in tasks:
        prompt = text.short_caption(scene)
        out.append(dict(id=f"{base}-t2i-0", task="t2i", level=level, images=[image],
                        conversations=_turns((f"Generate an image of {{resolution_tag}}, the content of image is "
                                              f"{prompt}\n", "<image>")), context=dense))
    if "edit" in tasks:
        pair = edit_pair(level, split, index)
        out.append(dict(id=f"{base}-edit-0", task="edit", level=level,
                        images=[image, png_bytes(render(pair.after))],
                        conversations=_turns((f"<image>\nPlease edit the image according to the instruction: "
                                              f"{pair.instruction}\n", "<image>")), context=dense))
    if "recon" in tasks:
        out.append(dict(id=f"{base}-recon-0", task="recon", level=level, images=[image, image],
                        conversations=_turns((RECONSTRUCT, "<image>")), context=dense))
    return out


def text_corpus(levels: Iterable[int], split: str, n: int,
                tasks: Iterable[str] = ("caption", "qa", "edit"), qa_lookups: bool = False) -> Iterator[str]:
    """Every piece of text of n scenes per level (for training a tokenizer); qa_lookups adds the lookup
    questions' wording (`qa.attribute_questions`)."""
    for level in levels:
        for i in range(n):
            for rec in conversation_records(level, split, i, tasks=tasks, qa_lookups=qa_lookups):
                yield f"Scene: {rec['context']}"  # how text-only stages present the image
                for turn in rec["conversations"]:
                    yield turn["value"].replace("<image>\n", "").replace("<image>", "").replace("{resolution_tag}", "")
        if "t2i" in tasks:  # the unconditional (CFG) prompt
            yield "Generate a random image of\n"


WORDS = tuple(sorted(set(world.SHAPES) | set(world.COLORS) | set(world.SIZES) | set(world.COUNT_WORDS.values())
                     | {w for r in world.RELATIONS for w in r.split()}))
