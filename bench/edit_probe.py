"""What an MLLM's edits are, beyond the editing suite's success (which reads 0 for every tiny model so far).

- **Drawn**: the editing suite on held-out pairs at a sampling (`--temperature`, `--top_p`; default the
  official 0.7 / 0.8), then per edit the foreground IoU with its target and with its source (pixels
  that differ from the canvas colour), and the share of edits that are empty canvases.
- **Teacher-forced**: the target's codes fed after the edit prompt; the mean NLL of the codes, per level,
  at cells where the target keeps the source's code ('kept') and where it does not ('changed'): what
  an editor that copies its source can gain ('kept' is small where the tokenizer rewrites untouched
  cells: `eval-tokenizer`'s edit_kept_*). 'kept_object' / 'kept_background' split the kept cells by
  whether they show an object (in the source or the target). For an MLLM with `source_copy`, also
  'copy_bonus': the copy path's mean bonus on the source's code, by the same split (a copier that knows
  what the edit changes puts a high one on kept cells and a low one on changed cells); with `copy_mixture`,
  'copy_gate': the mixture's share g instead.

- **Given the semantic level** (`--semantic_from target|source`, instead of the above): the prompt ends with
  that image's semantic codes and the model draws only the pixel codes; graded as the suite grades.

  python bench/edit_probe.py --workdir runs/illume_tiny --pairs 48 [--temperature 1 --top_p 1] [--guidance 1] --out probe.json

Why: README, "Edits drawn over their source".
"""
from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import mllm_probe  # noqa: E402
from illume_jax.data import shapecomp


def foreground(image: np.ndarray, tolerance: int = 30) -> np.ndarray:
    """[H, W] bool: pixels whose summed |RGB difference| from the top-left pixel (ShapeComp's flat
    canvas) exceeds `tolerance`."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"foreground: expected an [H, W, 3] image, got shape {image.shape}")
    return np.abs(image.astype(np.int32) - image[0, 0].astype(np.int32)).sum(-1) > tolerance


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two masks (1.0 when both are empty)."""
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def cell_mask(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[H, W] bool pixels -> [h * w] bool cells (raster order): a cell is set if any of its pixels is."""
    (H, W), (h, w) = mask.shape, grid
    if H % h or W % w:
        raise ValueError(f"cell_mask: a {H}x{W} mask does not split into a {h}x{w} grid")
    return mask.reshape(h, H // h, w, W // w).any(axis=(1, 3)).reshape(-1)


def kept_changed_nll(nll: np.ndarray, source_codes: np.ndarray, target_codes: np.ndarray,
                     on_object: np.ndarray | None = None, value: str = "nll") -> dict:
    """nll [N] of the target codes [N] -> {'kept': (cells, mean NLL), 'changed': ...}, split by whether the
    target's code at a cell is the source's (None for a kind with no cell). With `on_object` [N] (cells
    that show an object in the source or the target) also 'kept_object' / 'kept_background': a copying
    editor has to get the kept object cells right, where the background alone is easy. `value`: the name
    the means go under (the same split serves other per-cell values, e.g. a copy bonus)."""
    nll, kept = np.asarray(nll), np.asarray(source_codes) == np.asarray(target_codes)
    if not nll.shape == kept.shape:
        raise ValueError(f"kept_changed_nll: {nll.shape} NLLs for {kept.shape} codes")
    masks = [("kept", kept), ("changed", ~kept)]
    if on_object is not None:
        obj = np.asarray(on_object, bool)
        if obj.shape != kept.shape:
            raise ValueError(f"kept_changed_nll: on_object has shape {obj.shape}, the codes {kept.shape}")
        masks += [("kept_object", kept & obj), ("kept_background", kept & ~obj)]
    return {name: {"cells": int(m.sum()), value: float(nll[m].mean()) if m.any() else None} for name, m in masks}


def edit_probe(model, *, pairs: int = 48, sampling=None, seed: int = 0, forced_pairs: int = 16,
               level: int = 1, split: str = "test") -> dict:
    """model: an `Illume`. The drawn and teacher-forced figures of the module docstring."""
    import jax.numpy as jnp

    from illume_jax.data import multimodal
    from illume_jax.eval import mllm as eval_mllm
    from illume_jax.models import mllm
    result, rows = eval_mllm.edit_suite(model, level=level, split=split, pairs=pairs, seed=seed, sampling=sampling)
    drawn = dict(success=result["success"], per_op=result["per_op"],
                 fg_iou_target=float(np.mean([iou(foreground(r["edited"]), foreground(r["target"])) for r in rows])),
                 fg_iou_source=float(np.mean([iou(foreground(r["edited"]), foreground(r["before"])) for r in rows])),
                 empty=float(np.mean([not foreground(r["edited"]).any() for r in rows])))

    grids = model.cfg.grids(model.resolution, model.resolution)
    v = model.cfg.vocab
    t = mllm.block_template(grids, v, continuous=False)
    levels = (("semantic", mllm.SLOT_SEM_OUT, v.level0_start, v.semantic_codes, 0),
              ("pixel", mllm.SLOT_PIX_OUT, v.level1_start, v.pixel_codes, 1))
    nlls = {name: ([], [], [], []) for name, *_ in levels}
    bonuses = {name: [] for name, *_ in levels}
    for i in range(forced_pairs):
        pair = shapecomp.edit_pair(level, split, i)
        source_image, target_image = shapecomp.render(pair.before), shapecomp.render(pair.after)
        shown = foreground(source_image) | foreground(target_image)
        before = model._image_batch([source_image])
        source = [np.asarray(c[0]) for c in model.vision_tokenizer.encode(jnp.asarray(before[:, 0]))]
        target = [np.asarray(c[0]) for c in model.vision_tokenizer.encode(
            jnp.asarray(model._image_batch([target_image])[:, 0]))]
        block = mllm.block_ids(t, target[0], target[1], v)
        ids, slots, cells = model._prompt(multimodal.edit_prompt(pair.instruction), suffix=model._image_prefix())
        seq = np.concatenate([ids, block[1:]])[None]        # the prompt already ends with <start_of_image>
        seq_slots = np.concatenate([slots, t.slots[1:]])[None]
        seq_cells = np.concatenate([cells, np.zeros(len(block) - 1, np.int32)])[None]
        # The model's own forward (with `source_copy`, its copy bonus reads the source's codes).
        codes = mllm.input_codes(jnp.asarray(seq_slots), jnp.asarray(seq_cells), jnp.asarray(source[0].reshape(1, -1)),
                                 jnp.asarray(source[1].reshape(1, -1)))
        all_logits, normed = model.model.logits_and_normed(
            jnp.asarray(seq), slots=jnp.asarray(seq_slots), cells=jnp.asarray(seq_cells),
            images=jnp.asarray(before[None, :, 0]), codes=codes)
        all_logits, normed = np.asarray(all_logits[0]), normed[0]
        start = len(ids) - 1                                 # where the block's <start_of_image> sits
        for name, slot, first, n, k in levels:
            pos = np.nonzero(t.slots == slot)[0]
            logits = all_logits[start + pos - 1, first:first + n]
            logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
            true = block[pos] - first
            nlls[name][0].append(-logp[np.arange(len(pos)), true])
            nlls[name][1].append(source[k].reshape(-1)[t.cells[pos]])
            nlls[name][2].append(true)
            nlls[name][3].append(cell_mask(shown, grids[k])[t.cells[pos]])
            if model.cfg.source_copy:   # the copy path's bonus on the source's code at each cell (or its gate)
                out = np.asarray(model.model.source_copy(normed[start + pos - 1], jnp.full(len(pos), k)))
                bonuses[name].append(1 / (1 + np.exp(-out)) if model.cfg.copy_mixture else out)
    forced = {name: kept_changed_nll(*(np.concatenate(a) for a in parts)) for name, parts in nlls.items()}
    if model.cfg.source_copy:   # where it learned to copy: a high bonus (gate) at kept cells, a low one at changed
        kind = "gate" if model.cfg.copy_mixture else "bonus"
        forced[f"copy_{kind}"] = {name: kept_changed_nll(np.concatenate(bonuses[name]),
                                                         *(np.concatenate(a) for a in nlls[name][1:]), value=kind)
                                  for name in bonuses}
    return dict(drawn=drawn, teacher_forced=forced, forced_pairs=forced_pairs)


def forced_semantic_edits(model, *, which: str, pairs: int = 48, sampling=None, seed: int = 0, level: int = 1,
                          split: str = "test", batch_size: int = 8) -> dict:
    """Edits whose semantic level is given, not drawn: the prompt ends with the semantic half of the block
    (the `which` = 'target' or 'source' image's own semantic codes, up to <start_of_level1>) and the model
    draws only the pixel codes (CFG rows get the same half). Graded as the editing suite grades. Tells
    whether a wrong semantic layout is what spoils the drawn edits: with the target's, a pixel level that
    copies kept cells and follows the layout would score."""
    import jax
    import jax.numpy as jnp

    from illume_jax.data import multimodal
    from illume_jax.eval import shapecomp_scorer as scorer
    from illume_jax.infer import interleaved as il
    from illume_jax.models import mllm
    if which not in ("target", "source"):
        raise ValueError(f"which={which!r}: expected 'target' or 'source'")
    sampling = sampling or il.Sampling.for_task("edit")
    grids = model.cfg.grids(model.resolution, model.resolution)
    v = model.cfg.vocab
    t = mllm.block_template(grids, v, continuous=False)
    first_pix = int(np.nonzero(t.slots == mllm.SLOT_PIX_OUT)[0][0])   # the half ends with <start_of_level1>
    per_op, preservation, rows = {}, [], []
    edit_pairs = [shapecomp.edit_pair(level, split, i) for i in range(pairs)]
    for start in range(0, pairs, batch_size):
        chunk = edit_pairs[start:start + batch_size]
        befores = [shapecomp.render(p.before) for p in chunk]
        shown = model._image_batch([shapecomp.render(p.after if which == "target" else p.before) for p in chunk])
        sem = np.asarray(model.vision_tokenizer.encode(jnp.asarray(shown[:, 0]))[0])
        halves = [mllm.block_ids(t, s, np.zeros(grids[1], np.int64), v)[1:first_pix] for s in sem]
        def row(text, half):
            ids, slots, cells = model._prompt(text, suffix=model._image_prefix())
            return (np.concatenate([ids, half]), np.concatenate([slots, t.slots[1:first_pix]]),
                    np.concatenate([cells, np.zeros(len(half), np.int32)]))
        cond = [row(multimodal.edit_prompt(p.instruction), h) for p, h in zip(chunk, halves)]
        uncond = [row(multimodal.EDIT_UNCOND, h) for h in halves]
        use_cfg = sampling.guidance_scale != 1.0
        images = model._image_batch(befores)
        prompts = model._batch(cond + (uncond if use_cfg else []),
                               np.concatenate([images, images]) if use_cfg else images)
        state = il.RowState.start(np.tile([*grids[0], *grids[1]], (len(chunk), 1)), True, True, phase=il.LEVEL1)
        max_new = len(t.ids) - first_pix
        if model.cfg.neighbour_codes or model.cfg.parent_codes:
            # The row's code buffer (by level and raster cell) starts with the given semantic codes, as if drawn.
            drawn_codes = np.zeros((len(chunk), 2, max(max_new, sem[0].size)), np.int32)
            drawn_codes[:, 0, :sem[0].size] = sem.reshape(len(chunk), -1)
            state = state.replace(codes=jnp.asarray(drawn_codes))
        out, _ = il.generate(model.model, prompts, state, jax.random.key(seed + start), vocab=v, sampling=sampling,
                             max_new_tokens=max_new, eos_id=model.eos_id, pad_id=0)
        drawn = model._to_images(np.concatenate([np.stack(halves), np.asarray(out)], axis=1))
        for pair, img, before in zip(chunk, drawn, befores):
            g = scorer.grade_edit(img, pair.before, pair.after, pair.edited, pair.untouched,
                                  rotated=shapecomp.get_level(level).rotation)
            per_op.setdefault(pair.op, []).append(bool(g["instruction"]))
            preservation.append(float(g["preservation"]))
            target = shapecomp.render(pair.after)
            rows.append((iou(foreground(img), foreground(target)), iou(foreground(img), foreground(before)),
                         not foreground(img).any()))
    return dict(semantic_from=which, success=float(np.mean([x for v_ in per_op.values() for x in v_])),
                per_op={op: float(np.mean(x)) for op, x in sorted(per_op.items())},
                preservation=float(np.mean(preservation)), fg_iou_target=float(np.mean([r[0] for r in rows])),
                fg_iou_source=float(np.mean([r[1] for r in rows])), empty=float(np.mean([r[2] for r in rows])))


def main() -> None:
    p = mllm_probe.parser(__doc__)
    p.add_argument("--pairs", type=int, default=48, help="held-out edit pairs to draw")
    p.add_argument("--forced_pairs", type=int, default=16, help="held-out edit pairs to teacher-force")
    p.add_argument("--temperature", type=float, default=None, help="default: the official editing 0.7")
    p.add_argument("--top_p", type=float, default=None, help="default: the official editing 0.8")
    p.add_argument("--guidance", type=float, default=None, help="default: the official editing CFG scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--semantic_from", choices=("target", "source"), default=None,
                   help="instead: edits whose semantic level is that image's own codes, only the pixel level drawn")
    a = p.parse_args()
    from illume_jax.infer import interleaved as il
    sampling = il.Sampling.for_task("edit", temperature=a.temperature, top_p=a.top_p, guidance_scale=a.guidance)
    if a.semantic_from:
        probe = lambda model: forced_semantic_edits(model, which=a.semantic_from, pairs=a.pairs,  # noqa: E731
                                                    sampling=sampling, seed=a.seed)
    else:
        probe = lambda model: edit_probe(model, pairs=a.pairs, sampling=sampling, seed=a.seed,  # noqa: E731
                                         forced_pairs=a.forced_pairs)
    mllm_probe.run(a, probe,
                   pairs=a.pairs, seed=a.seed, sampling=dataclasses.asdict(sampling))


if __name__ == "__main__":
    main()
