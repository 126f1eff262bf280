"""Does the MLLM's vision tower see each object's shape? `eval.probe.object_features` on a trained
MLLM's tower: a ridge read-out of every ShapeComp object's shape and colour from the features around it
(semantic ViT grid, pixel-encoder grid, both after the projector, raw pixels as the yardstick).

  python bench/tower_probe.py --workdir runs/pope_slow_text --step 4500                    # the tower as trained
  python bench/tower_probe.py --workdir W --step 3000 --vit_from T                         # another ViT in its place
  python bench/tower_probe.py --workdir W --step 3000 --shape_steps 600                    # after a supervised check

`--vit_from T`: the ViT that `train-tokenizer`'s SigLIP phase saved in workdir T, put in the tower's
place (e.g. a longer SigLIP run than the tokenizer's: `pretrain_steps=`). `--shape_steps N`: first
trains the ViT N steps (Adam 1e-3, batch 64, 2,000 level-1 training scenes) on a supervised
shape-presence head (6 sigmoids over its mean- and max-pooled features): not part of any recipe, a check of whether this ViT's architecture can hold
shape where its objective does not ask for it. Prints the probe and writes it to --out (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from illume_jax.data.shapecomp import world
from illume_jax.data.shapecomp.render import render
from illume_jax.data.shapecomp.scene import make_scene
from illume_jax.eval import probe
from illume_jax.train.tokenizer import load_pretrained_vit


def train_shape_head(tower, steps: int, scenes: int = 2000, batch: int = 64, lr: float = 1e-3, seed: int = 0) -> list:
    """Trains the tower's ViT (and a linear head) to say which of the level's shapes are in a scene."""
    shapes = list(world.get_level(1).shapes)
    train = [make_scene(1, "train", i) for i in range(scenes)]
    images = np.stack([render(sc) for sc in train]).astype(np.float32) / 127.5 - 1
    labels = np.array([[float(any(o.shape == s for o in sc.objects)) for s in shapes] for sc in train], np.float32)
    # The ViT's parameters train; everything else of the tower (the pixel encoder) stays as it is.
    graph, params, rest = nnx.split(tower, nnx.All(nnx.Param, nnx.PathContains("vit")), ...)
    head = dict(w=jnp.zeros((2 * tower.cfg.vit.hidden_size, len(shapes))), b=jnp.zeros((len(shapes),)))
    tx = optax.adam(lr)
    opt = tx.init((params, head))

    def semantic(p, x):
        return nnx.merge(graph, p, rest).semantic_features(x)

    @jax.jit
    def step(p, h, o, x, y):
        def loss_fn(ph):
            f = semantic(ph[0], x)
            logits = jnp.concatenate([f.mean(1), f.max(1)], -1) @ ph[1]["w"] + ph[1]["b"]
            return optax.sigmoid_binary_cross_entropy(logits, y).mean(), ((logits > 0) == (y > 0.5)).mean()
        (loss, acc), g = jax.value_and_grad(loss_fn, has_aux=True)((p, h))
        updates, o = tx.update(g, o, (p, h))
        p, h = optax.apply_updates((p, h), updates)
        return p, h, o, loss, acc

    rng = np.random.default_rng(seed)
    log, t0 = [], time.time()
    for s in range(steps):
        idx = rng.integers(0, scenes, batch)
        params, head, opt, loss, acc = step(params, head, opt, jnp.asarray(images[idx]), jnp.asarray(labels[idx]))
        if s % 100 == 0 or s == steps - 1:
            log.append(dict(step=s + 1, loss=float(loss), presence_accuracy=float(acc)))
            print(f"shape head step {s + 1}: loss {float(loss):.3f}, presence accuracy {float(acc):.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    nnx.update(tower, params)
    return log


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a `train` workdir of an MLLM (configs/illume_tiny.py)")
    p.add_argument("--step", type=int, default=None, help="its checkpoint (default: the latest)")
    p.add_argument("--vit_from", default="", help="a train-tokenizer workdir whose SigLIP-phase ViT takes the tower's place")
    p.add_argument("--shape_steps", type=int, default=0, help="supervised shape-presence steps first (a check)")
    p.add_argument("--train_scenes", type=int, default=1200)
    p.add_argument("--test_scenes", type=int, default=300)
    p.add_argument("--window_px", type=float, default=20.0,
                   help="pixels of grid around each object's centre read out (1: only the cell holding the centre, "
                        "what one image token carries)")
    p.add_argument("--out", default="", help="JSON output (default: bench/results/tower_probe.json)")
    a = p.parse_args()
    from illume_jax import Illume
    m = Illume.load(a.workdir, step=a.step)
    tower = m.model.vision
    if a.vit_from:
        load_pretrained_vit(tower.vit, a.vit_from)
    log = train_shape_head(tower, a.shape_steps) if a.shape_steps > 0 else []
    # The projector was trained on the original ViT; with another one only the tower's own grids mean anything.
    features = probe.tower_image_features(tower) if (a.vit_from or a.shape_steps) else probe.mllm_image_features(m.model)
    out = probe.object_features(features, train_scenes=a.train_scenes, test_scenes=a.test_scenes,
                                 window_px=a.window_px)
    for name, v in out.items():
        if name in ("objects", "chance"):
            print(name, v)
        else:
            print(f"{name:22s} shape {v['shape']:.3f} (" + ", ".join(f"{k} {x:.2f}" for k, x in v["shape_by_size"].items())
                  + f")  colour {v['color']:.3f}  both {v['both']:.3f}  [{v['dims']} dims]")
    path = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tower_probe.json")
    record = dict(workdir=a.workdir, step=a.step, vit_from=a.vit_from, shape_steps=a.shape_steps, window_px=a.window_px,
                  shape_head_log=log, probe=out)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
