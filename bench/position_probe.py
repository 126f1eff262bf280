"""Does the MLLM know which cell of an image block it is drawing? A ridge read-out of the row and the
column of each code from the hidden state that predicts it, on teacher-forced text-to-image blocks of
held-out ShapeComp scenes (the read-out is trained on the first half of the scenes, scored on the
other half). The same read-out from that position's input embedding is the floor (the token's
embedding; with `cell_embedding` plus the cell vector, which then gives the position away). Per
level, `codes` also says how well the model predicts the true code at cells that show an object
against background cells (NLL, argmax accuracy, probability of the true code).

  python bench/position_probe.py --workdir runs/illume_tiny --step 5400 --scenes 40 --out probe.json

Why: the LLM sees an image block as a 1-D run of tokens (1-D RoPE, as the official model); the row and
column of the next code are only implicit in how many codes and EOLs came before. A model that cannot
count them draws its objects at the wrong cells, whatever its tokenizer and sampler. Chance is
1 / (grid side): 1/8 at level 0 and 1/16 at level 1 of the tiny 8x8 + 16x16 block.
"""
from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import mllm_probe  # noqa: E402
from illume_jax.data import multimodal, shapecomp
from illume_jax.eval import probe
from illume_jax.models import mllm


def code_cells(template: mllm.BlockTemplate, slot: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(block positions, rows, columns) of the codes of one level (`slot`) in a block template."""
    pos = np.nonzero(template.slots == slot)[0]
    cells = template.cells[pos]
    return pos, cells // width, cells % width


def readout(features: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> dict:
    """features [S, P, D] (scenes x codes), rows / cols [S, P] -> {'row': acc, 'col': acc}: the ridge
    read-out fitted on the first half of the scenes and scored on the rest."""
    if len(features) < 2:
        raise ValueError(f"readout needs at least 2 scenes (one to fit, one to score), got {len(features)}")
    half = len(features) // 2
    flat = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731
    out = {}
    for name, y in (("row", rows), ("col", cols)):
        ok = probe.ridge_classifier_accuracy(flat(features[:half]), flat(y[:half]).astype(str),
                                             flat(features[half:]), flat(y[half:]).astype(str))
        out[name] = float(np.mean(ok))
    return out


def code_fit(log_probs: np.ndarray, codes: np.ndarray, on_object: np.ndarray) -> dict:
    """log_probs [N, K] over a level's codes, the true codes [N] and whether each cell shows an object
    [N] -> per kind of cell: mean NLL (nats), how often the most likely code is the true one, the
    probability the model gives the true code, and how many distinct true codes there are (with the
    commonest one's share): a flat canvas the tokenizer writes with many codes is harder to predict."""
    nll = -log_probs[np.arange(len(codes)), codes]
    hit = log_probs.argmax(-1) == codes
    out = {}
    for name, m in (("object", on_object), ("background", ~on_object)):
        out[name] = dict(cells=int(m.sum()), nll=float(nll[m].mean()) if m.any() else None,
                         argmax_acc=float(hit[m].mean()) if m.any() else None,
                         p_true=float(np.exp(-nll[m]).mean()) if m.any() else None,
                         distinct_codes=int(len(np.unique(codes[m]))),
                         top_code_share=float(np.bincount(codes[m]).max() / m.sum()) if m.any() else None)
    return out


def position_probe(model, *, scenes: int = 40, level: int = 1, split: str = "test") -> dict:
    """model: an `Illume`. {'level0': {'hidden': {'row', 'col'}, 'input': {...}, 'chance': {...},
    'codes': {'object': {'cells', 'nll', 'argmax_acc', 'p_true'}, 'background': {...}}}, 'level1': ...}.
    `codes`: how well the teacher-forced model predicts the true code at cells that show an object
    against background cells (`code_fit`)."""
    grids = model.cfg.grids(model.resolution, model.resolution)
    template = mllm.block_template(grids, model.cfg.vocab, continuous=False)
    levels = {"level0": (mllm.SLOT_SEM_OUT, grids[0][1]), "level1": (mllm.SLOT_PIX_OUT, grids[1][1])}
    cells = {name: code_cells(template, slot, width) for name, (slot, width) in levels.items()}
    hidden, inputs = {k: [] for k in levels}, {k: [] for k in levels}
    vocab = model.cfg.vocab
    ranges = {"level0": (vocab.level0_start, vocab.semantic_codes, grids[0]),
              "level1": (vocab.level1_start, vocab.pixel_codes, grids[1])}
    fits = {k: ([], [], []) for k in levels}   # log-probs, true codes, on-object flags
    for k in range(scenes):
        # The scene's own render as the target, its caption as the condition (as text-to-image trains).
        scene = shapecomp.make_scene(level, split, k)
        image, prompt = shapecomp.render(scene), shapecomp.short_caption(scene)
        sem, pix = model.vision_tokenizer.encode(jnp.asarray(model._image_batch([image])[:, 0]))
        block = mllm.block_ids(template, np.asarray(sem[0]), np.asarray(pix[0]), model.cfg.vocab)
        ids, _, _ = model._prompt(multimodal.t2i_prompt(prompt), suffix=model._image_prefix())
        seq = jnp.asarray(np.concatenate([ids, block[1:]])[None])  # the prompt already ends with SOI
        # The block's slots as a training row has them (a cell embedding reads them).
        slots = jnp.asarray(np.concatenate([np.zeros(len(ids), np.int32), template.slots[1:]])[None])
        embedded = model.model.embed(seq, slots)
        h = np.asarray(model.model.llm(inputs_embeds=embedded, return_hidden=True)[0])
        e = np.asarray(embedded[0])
        start = len(ids) - 1  # where the block's SOI sits in seq
        for name, (pos, _, _) in cells.items():
            hidden[name].append(h[start + pos - 1])  # the state that predicts the code at pos
            inputs[name].append(e[start + pos - 1])
            first, n, (gh, gw) = ranges[name]
            logits = np.asarray(model.model.llm.logits(jnp.asarray(h[start + pos - 1])[None]))[0, :, first:first + n]
            fits[name][0].append(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True))
            fits[name][1].append(np.asarray(block)[pos] - first)
            fits[name][2].append(shapecomp.object_cells(image, gh, gw))
    out = {}
    for name, (pos, rows, cols) in cells.items():
        r, c = np.tile(rows, (scenes, 1)), np.tile(cols, (scenes, 1))
        out[name] = dict(hidden=readout(np.stack(hidden[name]), r, c), input=readout(np.stack(inputs[name]), r, c),
                         chance=dict(row=1 / (rows.max() + 1), col=1 / (cols.max() + 1)),
                         codes=code_fit(*(np.concatenate(a) for a in fits[name])))
    return out


def main() -> None:
    p = mllm_probe.parser(__doc__)
    p.add_argument("--scenes", type=int, default=40, help="held-out scenes (half fit the read-out, half score it)")
    a = p.parse_args()
    mllm_probe.run(a, lambda model: position_probe(model, scenes=a.scenes), scenes=a.scenes)


if __name__ == "__main__":
    main()
