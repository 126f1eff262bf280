"""The shape oracle: an MLLM whose image tokens are each told the shape of the object under them.

A diagnostic, not a recipe. POPE's adversarial split needs the lookup "find the red object's tokens,
read its shape", and the tiny MLLM never learned it from the tower's tokens (README: "Shape is in no
single image token"). This asks the other half of the question: if every image token did carry its
object's shape, cleanly, would the LLM learn the lookup? It wraps any `python -m illume_jax` command
(train, eval, ...) with `MLLM.image_features` patched: after the projector, each token whose cell an
object covers gets `strength` x (the batch's mean token norm) x a fixed random unit vector for that
object's shape (one per shape of the level; background cells get nothing). The shapes come from the
ShapeComp scorer's detection on the image itself (`eval/shapecomp_scorer.detect`, exact on renders),
on the host through `jax.pure_callback`, so the oracle works inside the jitted train step and in
every evaluation that runs the model, with no change to the data or the checkpoints.

  python bench/shape_oracle.py --strength 1 -- train --config=configs/illume_tiny.py:... --workdir=W --stop_after_stage=base
  python bench/shape_oracle.py --strength 1 -- eval --workdir=W

Train and evaluate with the same --strength: a model trained with the oracle reads images through it.
A cell belongs to the object covering most of it if that covers at least a quarter of the cell; the
cell holding an object's centre always belongs to that object (small objects cover no cell whole).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from illume_jax.data.shapecomp import world  # noqa: E402
from illume_jax.data.shapecomp.render import cell_owners  # noqa: E402
from illume_jax.eval import shapecomp_scorer  # noqa: E402
from illume_jax.models import mllm  # noqa: E402


def cell_labels(images: np.ndarray, grids, level: int = 1) -> tuple[np.ndarray, ...]:
    """images [N,H,W,3] uint8 of a ShapeComp level; grids ((h, w), ...) token grids over the image -> one
    [N, h*w] int32 per grid, raster order: the index in the level's shapes of the object under each cell,
    len(shapes) for background."""
    options = shapecomp_scorer.level_options([level])
    shapes = list(world.get_level(level).shapes)
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"cell_labels: images must be [N, H, W, 3] uint8, got {images.shape} {images.dtype}")
    H, W = images.shape[1:3]
    for h, w in grids:
        if H % h or W % w:
            raise ValueError(f"cell_labels: a {h}x{w} grid does not tile {H}x{W} images")
    background = len(shapes)
    outs = [np.full((len(images), h * w), background, np.int32) for h, w in grids]
    for n, image in enumerate(images):
        dets = shapecomp_scorer.detect(image, **options)  # only the level's shapes
        if not dets:
            continue
        masks = np.stack([d.mask for d in dets])
        label = np.array([shapes.index(d.shape) for d in dets] + [background], np.int32)
        for (h, w), out in zip(grids, outs):  # a cell is an object's if it covers a quarter of it
            out[n] = label[cell_owners(masks, [d.centroid for d in dets], (h, w), (H // h) * (W // w) // 4)]
    return tuple(outs)


def shape_vectors(width: int, count: int, seed: int = 1234) -> jax.Array:
    """[count + 1, width]: a fixed random unit vector for each of a level's `count` shapes, then zeros
    for background. Drawn for all of ShapeComp's shapes at once, so the vectors do not depend on count."""
    if not 0 < count <= len(world.SHAPES):
        raise ValueError(f"shape_vectors: count must be 1..{len(world.SHAPES)}, got {count}")
    v = jax.random.normal(jax.random.key(seed), (len(world.SHAPES), width), jnp.float32)[:count]
    return jnp.concatenate([v / jnp.linalg.norm(v, axis=-1, keepdims=True), jnp.zeros((1, width))])


def install(strength: float, level: int = 1) -> None:
    """Patches `mllm.MLLM.image_features` (every caller: training, `Illume`, the evaluations)."""
    shapes = list(world.get_level(level).shapes)
    original = mllm.MLLM.image_features

    def image_features(self, images):
        sem, pix = original(self, images)
        B, M, H, W = images.shape[:4]
        grids = self.cfg.grids(H, W)
        flat = jnp.clip(jnp.round((images.reshape(B * M, H, W, 3).astype(jnp.float32) + 1) * 127.5), 0, 255)
        labels = jax.pure_callback(
            lambda x: cell_labels(np.asarray(x, np.uint8), grids, level),
            tuple(jax.ShapeDtypeStruct((B * M, h * w), jnp.int32) for h, w in grids), flat.astype(jnp.uint8))
        out = []
        for f, lab in zip((sem, pix), labels):
            scale = strength * jax.lax.stop_gradient(jnp.linalg.norm(f.astype(jnp.float32), axis=-1).mean())
            add = shape_vectors(f.shape[-1], len(shapes))[lab.reshape(B, -1)]
            out.append(f + (scale * add).astype(f.dtype))
        return out[0], out[1]

    mllm.MLLM.image_features = image_features


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit("usage: python bench/shape_oracle.py [--strength S] [--level L] -- <illume_jax command and flags>")
    cut = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strength", type=float, default=1.0, help="the shape vector's norm, in mean token norms")
    p.add_argument("--level", type=int, default=1, help="the ShapeComp level whose shapes are named")
    a = p.parse_args(argv[:cut])
    install(a.strength, a.level)
    from illume_jax import cli
    sys.argv = [sys.argv[0]] + argv[cut + 1:]
    cli.run()


if __name__ == "__main__":
    main()
