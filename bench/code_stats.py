"""What a generator's codes look like next to real images' codes, on held-out ShapeComp scenes.

- **Object codes**: a code counts as background when at least 90% of its uses on real scenes fall on
  background cells (`shapecomp.object_cells`); every other code is an object code.
- **Clusters**: of the drawn pixel codes, the share that are object codes, and the chance a cell
  holds an object code given that the cell above (or to the left) does, or that the cell above does
  not. Real objects are clusters: an object code mostly sits under another.
- **Levels**: the chance a pixel cell holds an object code when the semantic cell over it does
  (`follow_parent`) and when it does not.
- **Decoder**: which level's codes draw the objects: real scenes decoded from their own codes, and
  with one level's codes all replaced by that level's commonest background code, each scored by the
  ShapeComp scorer's agreement with the scene (the tokenizer ceiling of `eval-tokenizer`). And the
  editing ceiling: the success the `eval` editing suite gives the target images of its held-out pairs
  after a round trip through the tokenizer (what a perfect editor of codes would score).

  python bench/code_stats.py --workdir runs/illume_tiny --scenes 128 --prompts 48 --out stats.json

The generated images are drawn for the held-out GenEval-style prompts with the official sampling.
Why: the tiny generators draw object-sized clusters of colour whose outlines are blobs; these figures
separate "draws no object" from "draws objects without shapes" (README, "Given the codes above").
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import mllm_probe  # noqa: E402
from illume_jax.data import shapecomp


def background_codes(codes: np.ndarray, on_object: np.ndarray, num_codes: int, share: float = 0.9) -> np.ndarray:
    """codes / on_object [...] (a code and whether its cell shows an object) -> [num_codes] bool: the
    codes used on background cells at least `share` of the times they are used (unused codes count as
    background: a generator that draws one has drawn no object the tokenizer knows)."""
    if codes.shape != on_object.shape:
        raise ValueError(f"background_codes: codes {codes.shape} and on_object {on_object.shape} must have one shape")
    on_bg = np.bincount(codes[~on_object], minlength=num_codes)
    on_obj = np.bincount(codes[on_object], minlength=num_codes)
    return on_bg >= share * (on_bg + on_obj)


def cluster_stats(objects: np.ndarray) -> dict:
    """objects [N, h, w] bool (a cell holds an object code) -> the object share and the chance of an
    object code given the cell above / to the left holds one, and given the cell above does not."""
    if objects.ndim != 3:
        raise ValueError(f"cluster_stats: objects must be [N, h, w], got {objects.shape}")
    above, below = objects[:, :-1], objects[:, 1:]
    left, right = objects[:, :, :-1], objects[:, :, 1:]
    rate = lambda x, m: float(x[m].mean()) if m.any() else None  # noqa: E731
    return dict(object_share=float(objects.mean()), given_above_object=rate(below, above),
                given_left_object=rate(right, left), given_above_background=rate(below, ~above))


def follow_parent(semantic_objects: np.ndarray, pixel_objects: np.ndarray) -> dict:
    """[N, h1, w1] and [N, h2, w2] bool (h2, w2 multiples of h1, w1) -> the chance a pixel cell holds an
    object code when the semantic cell over it does, and when it does not."""
    (n, h1, w1), (_, h2, w2) = semantic_objects.shape, pixel_objects.shape
    if h2 % h1 or w2 % w1 or len(pixel_objects) != n:
        raise ValueError(f"follow_parent: pixel grid {pixel_objects.shape} must tile semantic grid "
                         f"{semantic_objects.shape}")
    parent = np.repeat(np.repeat(semantic_objects, h2 // h1, axis=1), w2 // w1, axis=2)
    rate = lambda m: float(pixel_objects[m].mean()) if m.any() else None  # noqa: E731
    return dict(given_parent_object=rate(parent), given_parent_background=rate(~parent))


def code_stats(model, *, scenes: int = 128, prompts: int = 48, seed: int = 0, split: str = "test",
               level: int = 1, edit_pairs: int = 48) -> dict:
    """model: an `Illume`. Real codes from `scenes` held-out scenes, generated ones for the first
    `prompts` GenEval-style prompts of those scenes (`seed`); the editing ceiling on `edit_pairs`."""
    import jax.numpy as jnp

    from illume_jax.data import images as images_lib
    from illume_jax.eval import mllm as eval_mllm
    from illume_jax.eval import recon
    from illume_jax.models import mllm
    (h1, w1), (h2, w2) = model.cfg.grids(model.resolution, model.resolution)
    v = model.cfg.vocab
    images = [shapecomp.render(shapecomp.make_scene(level, split, i)) for i in range(scenes)]
    sem, pix = [], []
    for i in range(0, scenes, 32):
        s, p = model.vision_tokenizer.encode(jnp.asarray(model._image_batch(images[i:i + 32])[:, 0]))
        sem.append(np.asarray(s).reshape(-1, h1, w1))
        pix.append(np.asarray(p).reshape(-1, h2, w2))
    sem, pix = np.concatenate(sem), np.concatenate(pix)
    obj0 = np.stack([shapecomp.object_cells(im, h1, w1).reshape(h1, w1) for im in images])
    obj1 = np.stack([shapecomp.object_cells(im, h2, w2).reshape(h2, w2) for im in images])
    bg0 = background_codes(sem, obj0, v.semantic_codes)
    bg1 = background_codes(pix, obj1, v.pixel_codes)

    # Generated codes: the image blocks the sampler returns, before decoding.
    texts = [p for p, _, _ in eval_mllm.geneval_prompts(level, scenes, split)][:prompts]
    blocks = []
    decode_blocks = model._to_images
    model._to_images = lambda tokens, *size: blocks.append(np.asarray(tokens)) or decode_blocks(tokens, *size)
    try:
        model.generate(texts, seed=seed)
    finally:
        model._to_images = decode_blocks
    grids = ((h1, w1), (h2, w2))
    parsed = [mllm.parse_block(np.concatenate([[v.soi], row]), grids, v) for b in blocks for row in b]
    gen0, gen1 = (np.stack([p[i] for p in parsed]) for i in (0, 1))

    def levels(s, p):
        return dict(pixel=cluster_stats(~bg1[p]), semantic_object_share=float((~bg0[s]).mean()),
                    follow_parent=follow_parent(~bg0[s], ~bg1[p]))

    # Which level draws the objects: decode real codes with one level blanked to its commonest background code.
    blank0 = int(np.argmax(np.bincount(sem.ravel(), minlength=v.semantic_codes) * bg0))
    blank1 = int(np.argmax(np.bincount(pix.ravel(), minlength=v.pixel_codes) * bg1))

    def agreement(s, p):
        out = np.asarray(model._decode(model.vision_tokenizer, jnp.asarray(s), jnp.asarray(p)))
        return recon.scorer_agreement(images, [images_lib.to_uint8(x) for x in out])

    def round_trip(imgs):
        s, p = model.vision_tokenizer.encode(jnp.asarray(model._image_batch(imgs)[:, 0]))
        return [images_lib.to_uint8(x) for x in np.asarray(model._decode(model.vision_tokenizer, s, p))]

    edit = recon.edit_ceiling(round_trip, levels=(level,), split=split, pairs=edit_pairs)
    return dict(
        real=levels(sem, pix), generated=levels(gen0, gen1), generated_images=len(parsed),
        object_cells=dict(semantic=float(obj0.mean()), pixel=float(obj1.mean())),
        background_codes=dict(semantic=int(bg0.sum()), pixel=int(bg1.sum())),
        decoder_agreement=dict(both=agreement(sem, pix), semantic_only=agreement(sem, np.full_like(pix, blank1)),
                               pixel_only=agreement(np.full_like(sem, blank0), pix)),
        edit_ceiling=dict(success=edit["edit_ceiling"], pairs=edit["edit_pairs"],
                          per_op={k[len("edit_ceiling_"):]: v for k, v in edit.items() if k.startswith("edit_ceiling_")}))


def main() -> None:
    p = mllm_probe.parser(__doc__)
    p.add_argument("--scenes", type=int, default=128, help="held-out scenes for the real codes and the prompts")
    p.add_argument("--prompts", type=int, default=48, help="GenEval-style prompts to draw (one image each)")
    p.add_argument("--edit_pairs", type=int, default=48, help="held-out edit pairs for the editing ceiling")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    mllm_probe.run(a, lambda model: code_stats(model, scenes=a.scenes, prompts=a.prompts, seed=a.seed,
                                               edit_pairs=a.edit_pairs),
                   scenes=a.scenes, prompts=a.prompts, seed=a.seed)


if __name__ == "__main__":
    main()
