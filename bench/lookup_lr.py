"""Can the tiny ShapeComp LLM learn the in-context lookups that POPE's adversarial split needs, and at
which learning rate? A pure synthetic task, no ShapeComp data: each row describes two objects the way
ShapeComp's descriptions do (size, colour, shape, position; colour right before shape), then asks
either the colour of one of the two shapes or the shape of one of the two colours. Both objects
differ in colour and shape, so an answer read from the attributes alone is right half the time.

  python bench/lookup_lr.py --lr 3e-3 3e-4 --steps 3000 [--seed N --tag seedN] [--optimizer stages]   # the README's figures (~4 min per LR)
Prints held-out accuracy per lookup every --every steps and writes bench/results/lookup_lr.json
(one entry per learning rate: {step: [loss, colour_of_shape, shape_of_colour]}; --tag adds a suffix).

The model is `configs/illume_tiny.py`'s LLM shape (size=tiny: 4 layers, 128 wide) over a 64-token
vocabulary; only the answer token is trained. The learning rate follows a stage's schedule
(`train.optim.schedule`: a 20-step warmup, then a cosine to 0.1x). The optimizer is, by default, plain
AdamW with optax's defaults (b2 0.999, no weight decay, no clipping), as the README's first figures were
measured; `--optimizer stages` uses the stages' own (`train.optim.make_optimizer` over
`configs/common.py:optim_config`: b2 0.95, norm-1 clipping).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from flax import nnx

# Run as a script from anywhere: `configs` is a top-level folder, not part of the installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common
from configs.illume_tiny import LLM_SIZES
from illume_jax.models.llm import LLMConfig, create_llm
from illume_jax.sharding import make_mesh, use_mesh
from illume_jax.train import optim

# Token ids: structure words, then 6 colours, 6 shapes, 2 sizes and 6 positions (level 1's counts).
A, AT, COMMA, DOT, ASK_COLOR, ASK_SHAPE, QMARK = range(1, 8)
COLORS, SHAPES, SIZES, POSITIONS = list(range(10, 16)), list(range(20, 26)), [30, 31], list(range(40, 46))
ROW = 24


def make_batch(rng: np.random.Generator, n: int):
    """Rows 'a SIZE COLOR SHAPE at POS , a SIZE COLOR SHAPE at POS . ASK KEY ? ANSWER': ids [n, ROW],
    the position whose logits predict the answer, the answer, and which lookup (0 colour-of-shape)."""
    ids = np.zeros((n, ROW), np.int32)
    where, answer, kind = np.zeros(n, np.int32), np.zeros(n, np.int32), rng.integers(2, size=n)
    for i in range(n):
        colors, shapes = rng.choice(COLORS, 2, replace=False), rng.choice(SHAPES, 2, replace=False)
        row = []
        for j in range(2):
            row += [A, rng.choice(SIZES), colors[j], shapes[j], AT, rng.choice(POSITIONS), COMMA if j == 0 else DOT]
        k = rng.integers(2)
        row += [ASK_COLOR, shapes[k], QMARK] if kind[i] == 0 else [ASK_SHAPE, colors[k], QMARK]
        answer[i] = colors[k] if kind[i] == 0 else shapes[k]
        where[i] = len(row) - 1
        ids[i, :len(row) + 1] = row + [answer[i]]
    return ids, where, answer, kind


def make_tx(kind: str, lr: float, steps: int, params) -> optax.GradientTransformation:
    """'adamw': optax's AdamW defaults (b2 0.999, no clipping), the README's first figures; 'stages':
    `train.optim.make_optimizer` with `configs/common.py:optim_config()` (b2 0.95, global-norm clip 1.0),
    exactly what a training stage of that LR and length would use."""
    stage = common.stage_config("lookup", steps=steps, lr=lr, warmup_steps=20)
    if kind == "adamw":
        return optax.adamw(optim.schedule(stage), weight_decay=0.0)
    config = mlc.ConfigDict(dict(stages=[stage], optim=common.optim_config(), model=dict(text_vocab_size=64)))
    return optim.make_optimizer(config, 0, params)


def train(lr: float, steps: int, batch: int, every: int, seed: int, optimizer: str = "adamw") -> dict:
    cfg = LLMConfig(**LLM_SIZES["tiny"], vocab_size=64, text_vocab_size=64, remat="none", scan_layers=False)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    model = create_llm(cfg, mesh, seed=seed)
    with use_mesh(mesh):
        opt = nnx.Optimizer(model, make_tx(optimizer, lr, steps, nnx.state(model, nnx.Param)), wrt=nnx.Param)

        def loss_fn(m, ids, where, answer):
            rows = jnp.arange(ids.shape[0])
            logp = jax.nn.log_softmax(m(ids)[rows, where], axis=-1)
            return -jnp.mean(logp[rows, answer])

        @nnx.jit
        def step(m, o, ids, where, answer):
            loss, grads = nnx.value_and_grad(loss_fn)(m, ids, where, answer)
            o.update(m, grads)
            return loss

        @nnx.jit
        def predict(m, ids, where):
            return jnp.argmax(m(ids)[jnp.arange(ids.shape[0]), where], axis=-1)

        rng = np.random.default_rng(seed)
        test_ids, test_where, test_answer, test_kind = make_batch(np.random.default_rng(10_000 + seed), 512)
        curve, t0 = {}, time.time()
        for i in range(1, steps + 1):
            ids, where, answer, _ = make_batch(rng, batch)
            loss = float(step(model, opt, jnp.asarray(ids), jnp.asarray(where), jnp.asarray(answer)))
            if i % every == 0 or i == steps:
                right = np.asarray(predict(model, jnp.asarray(test_ids), jnp.asarray(test_where))) == test_answer
                by_kind = [float(right[test_kind == k].mean()) for k in (0, 1)]
                curve[i] = [loss, *by_kind]
                print(f"lr {lr:g} step {i}: loss {loss:.3f}  colour-of-shape {by_kind[0]:.2f}  "
                      f"shape-of-colour {by_kind[1]:.2f}  ({time.time() - t0:.0f} s)", flush=True)
    return curve


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lr", type=float, nargs="+", default=[3e-3, 3e-4])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer", choices=("adamw", "stages"), default="adamw",
                   help="adamw: optax defaults (b2 0.999, no clipping); stages: the training stages' optimizer")
    p.add_argument("--tag", default="", help="results file suffix: bench/results/lookup_lr[_TAG].json")
    a = p.parse_args()
    if a.steps < 1 or a.batch < 1 or a.every < 1 or min(a.lr) <= 0:
        p.error("--steps, --batch, --every must be >= 1 and every --lr > 0")
    results = {f"{lr:g}": train(lr, a.steps, a.batch, a.every, a.seed, a.optimizer) for lr in a.lr}
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"lookup_lr{'_' + a.tag if a.tag else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(steps=a.steps, batch=a.batch, seed=a.seed, optimizer=a.optimizer, curves=results), f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
