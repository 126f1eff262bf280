"""Looking inside the model: existence questions answered from a scene described in words, the
attention of every head, and what the vision tower's features say about each object.

The POPE-style suite (`eval.mllm.pope_suite`) scores the whole MLLM from images. These probes take the
images out: the `scene_text` stage trains the LLM on each scene's description in place of the image
(`chat.render(..., text_only=True, context=dense_caption)`), and asking the same questions that way tells
a failure of the language model's lookup from one of the vision path (README, "Through stages 1-3").
`attention_maps` shows which context tokens each head reads, e.g. whether the question's shape word
finds the same word in the description.

    from illume_jax import Illume
    from illume_jax.eval import probe
    m = Illume.load("runs/illume_tiny", step=1200)
    llm, tok, template = m.model.llm, m.text_tokenizer, m.config.tokenizer.chat_template
    probe.existence_in_text(llm, tok, template, scenes=60)      # {split: accuracy, yes_ratio, auc, by_kind}
    ids = probe.render_question(tok, template, context, "Is there a red circle in the image?")
    maps = probe.attention_maps(llm, ids)                        # [layers, heads, T, T]
    probe.object_features(probe.mllm_image_features(m.model))    # {features: shape / colour accuracy}
    probe.image_lookups(m.answer_logprobs)                        # "What shape is the red object?" from the image

`object_features` asks the other half of the question: is an object's shape in the image features the LLM
reads at all, or only in the words `scene_text` gave it?
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from illume_jax.data import chat, shapecomp
from illume_jax.data.shapecomp import text as sc_text
from illume_jax.data.tokenizers import answer_first_tokens
from illume_jax.eval import mllm
from illume_jax.eval import shapecomp_scorer as scorer
from illume_jax.infer.module_jit import module_jit

_log_probs = module_jit(lambda llm, ids: jax.nn.log_softmax(llm(ids), axis=-1))


def render_question(tokenizer, template: str, context: str, question: str) -> np.ndarray:
    """The prompt of one text-only question, up to and including the last token before the answer
    (the position whose logits are the answer's first token), as the `scene_text` stage renders it."""
    conv = [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": "yes"}]
    ids, mask = chat.render(conv, tokenizer, template, text_only=True, context=context)
    return ids[:int(np.argmax(mask))]


def text_answer_logprobs(llm, tokenizer, template: str, contexts: Sequence[str], questions: Sequence[str],
                         answers: Sequence[str] = ("yes", "no"), *, batch_size: int = 64) -> np.ndarray:
    """log p(each answer's first token) after each (context, question), text only: [N, len(answers)].

    Rows are right-padded to one length per call (a multiple of 32), so a whole probe compiles once;
    causal attention keeps a row's logits independent of the padding after it."""
    if len(contexts) != len(questions):
        raise ValueError(f"text_answer_logprobs: {len(contexts)} contexts but {len(questions)} questions")
    first = answer_first_tokens(tokenizer, answers, "text_answer_logprobs")
    rows = [render_question(tokenizer, template, c, q) for c, q in zip(contexts, questions)]
    if not rows:
        return np.zeros((0, len(answers)), np.float32)
    width = -(-max(len(r) for r in rows) // 32) * 32
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids = np.zeros((batch_size, width), np.int32)  # a fixed batch: the last chunk reuses the program
        for i, r in enumerate(chunk):
            ids[i, :len(r)] = r
        lp = np.asarray(_log_probs(llm, jnp.asarray(ids)))
        out.append(np.stack([lp[i, len(r) - 1, first] for i, r in enumerate(chunk)]))
    return np.concatenate(out)


def existence_in_text(llm, tokenizer, template: str, *, level: int = 1, split: str = "test", scenes: int = 60,
                      batch_size: int = 64) -> dict:
    """POPE-style existence questions (the suite's questions and splits) with each scene given as its
    description in words: {pope_split: accuracy, yes_ratio, auc, questions, by_kind}, plus 'mean'.
    The answer is the larger of log p(yes) and log p(no) (no decoding)."""
    out = {}
    for pope_split in shapecomp.POPE_SPLITS:
        items = mllm.existence_items(level, split, scenes, pope_split)
        labels = [q["answer"] for _, _, q in items]
        lp = text_answer_logprobs(llm, tokenizer, template, [sc_text.dense_caption(scene) for _, scene, _ in items],
                                  [q["question"] for _, _, q in items], ("yes", "no"), batch_size=batch_size)
        margins = lp[:, 0] - lp[:, 1]
        said = np.where(margins > 0, "yes", "no")
        correct = said == np.asarray(labels)
        out[pope_split] = dict(accuracy=float(np.mean(correct)), yes_ratio=float(np.mean(said == "yes")),
                               auc=scorer.margin_auc(margins, labels), questions=len(labels),
                               by_kind=mllm.accuracy_by_kind(correct, [q["asks"] for _, _, q in items]))
    out["mean"] = {k: float(np.mean([out[s][k] for s in shapecomp.POPE_SPLITS])) for k in ("accuracy", "yes_ratio", "auc")}
    return out


def image_lookups(answer_logprobs, *, level: int = 1, split: str = "test", scenes: int = 150,
                  batch_size: int = 50) -> dict:
    """The two lookups of the QA records (`qa_lookups=1`) asked of the image: "What shape is the
    <colour> object?" for every object of a colour unique in its scene, "What color is the <shape>?"
    for every object of a unique shape. Whether the model reads an object's shape off the image, which
    the existence suite can hide (its answers can come from the colour alone). `answer_logprobs`:
    (images uint8 [N,H,W,3] list, questions, candidate answers) -> [N, len(answers)], e.g.
    `Illume.answer_logprobs`; the answer is the best of the level's shapes / colours.
    -> {'shape_of_color' / 'color_of_shape': {accuracy, questions, chance, by_size}}."""
    from illume_jax.data.shapecomp.qa import attribute_questions
    from illume_jax.data.shapecomp.render import render
    from illume_jax.data.shapecomp.scene import make_scene
    from illume_jax.data.shapecomp import world

    lv = world.get_level(level)
    items: dict[str, list] = {"shape_of_color": [], "color_of_shape": []}
    kinds = {"shape": "shape_of_color", "color": "color_of_shape"}
    for i in range(scenes):
        scene = make_scene(level, split, i)
        image = render(scene)
        # The training records' own wording; each answer names one object (its attribute is unique).
        for q in attribute_questions(scene, lookups=True):
            if q["kind"] in kinds:
                obj = next(o for o in scene.objects if q["answer"] == getattr(o, q["kind"]))
                items[kinds[q["kind"]]].append((image, q["question"], q["answer"], obj.size))
    out = {}
    for kind, rows in items.items():
        candidates = list(lv.shapes if kind == "shape_of_color" else lv.colors)
        said = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            lp = np.asarray(answer_logprobs([r[0] for r in chunk], [r[1] for r in chunk], candidates))
            said += [candidates[j] for j in np.argmax(lp, axis=1)]
        correct = np.array([a == r[2] for a, r in zip(said, rows)], bool)
        sizes = np.array([r[3] for r in rows])
        out[kind] = dict(accuracy=float(correct.mean()) if len(rows) else float("nan"), questions=len(rows),
                         chance=1 / len(candidates),
                         by_size={str(z): float(correct[sizes == z].mean()) for z in sorted(set(sizes))})
    return out


def attention_maps(llm, ids: np.ndarray) -> np.ndarray:
    """Attention probabilities of every layer and head for one unpadded row: [layers, heads, T, T]
    (row t: how query position t spreads over keys 0..t). Computed from each layer's own query and key
    projections (RoPE, grouped KV heads, causal mask) while running the layers, so the maps are the
    ones the forward pass uses."""
    ids = np.asarray(ids, np.int32)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"attention_maps: ids must be one non-empty row of token ids, got shape {ids.shape}")
    T = ids.shape[0]
    x = llm.embed_tokens(jnp.asarray(ids)[None])
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    segments = jnp.ones((1, T), jnp.int32)
    causal = jnp.tril(jnp.ones((T, T), bool))
    maps = []
    for layer in llm.unstacked_layers():
        q, k, _ = layer.attn.qkv(layer.input_norm(x), positions)
        k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)  # query head h reads kv head h // group
        scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) / np.sqrt(q.shape[-1])
        maps.append(np.asarray(jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1))[0])
        x = layer(x, positions, segments)
    return np.stack(maps)


def top_attended(maps: np.ndarray, pieces: Sequence[str], position: int, k: int = 3) -> list[list[str]]:
    """For one query position: per layer, per head, its k most attended keys as 'piece@pos:prob'."""
    if len(pieces) != maps.shape[-1]:
        raise ValueError(f"top_attended: {len(pieces)} pieces for maps over {maps.shape[-1]} positions")
    return [[", ".join(f"{pieces[t]}@{t}:{head[position, t]:.2f}" for t in np.argsort(-head[position])[:k])
             for head in layer] for layer in maps]


def object_windows(features: np.ndarray, centres: Sequence[tuple[float, float]], resolution: int,
                   window_px: float) -> np.ndarray:
    """features [g*g, C] of one image (a g x g grid over resolution² pixels) -> [len(centres), k*k*C]:
    for each object centre (cx, cy in pixels), the k x k cells around the cell holding it, in raster
    order, zero outside the image; k is window_px in cells, rounded to an odd number (at least 1)."""
    g = int(round(np.sqrt(features.shape[0])))
    if g * g != features.shape[0]:
        raise ValueError(f"object_windows: {features.shape[0]} feature rows are not a square grid")
    cell = resolution / g
    k = max(1, int(round(window_px / cell)))
    k += 1 - k % 2
    h = k // 2
    grid = np.pad(features.reshape(g, g, -1), ((h, h), (h, h), (0, 0)))
    out = []
    for cx, cy in centres:
        x, y = min(int(cx / cell), g - 1), min(int(cy / cell), g - 1)
        out.append(grid[y:y + k, x:x + k].reshape(-1))
    return np.stack(out)


def ridge_classifier_accuracy(train_x: np.ndarray, train_y: Sequence[str], test_x: np.ndarray,
                              test_y: Sequence[str], ridge: float = 1e-2) -> np.ndarray:
    """Per test row, whether a one-vs-rest ridge regression on standardised features (closed form: no
    training loop, no seed) names its class. A linear read-out: what it cannot find, a linear layer on
    these features (the projector's first) does not get for free either."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a = np.c_[(train_x - mu) / sd, np.ones(len(train_x))]
    b = np.c_[(test_x - mu) / sd, np.ones(len(test_x))]
    classes = np.array(sorted(set(train_y)))
    targets = np.where(np.asarray(train_y)[:, None] == classes[None], 1.0, -1.0)
    w = np.linalg.solve(a.T @ a + ridge * len(a) * np.eye(a.shape[1]), a.T @ targets)
    return classes[np.argmax(b @ w, axis=1)] == np.asarray(test_y)


def _mllm_grids(model, images):
    sem, pix = model.vision(images)
    sem_p, pix_p = model.project(sem, pix, images.shape[1], images.shape[2])
    return {"semantic": sem, "pixel": pix, "semantic, projected": sem_p, "pixel, projected": pix_p}


def _tower_grids(tower, images):
    sem, pix = tower(images)
    return {"semantic": sem, "pixel": pix}


# The parameters go in as arguments (module_jit), not as constants folded into the program.
_mllm_features, _tower_features = module_jit(_mllm_grids), module_jit(_tower_grids)


def mllm_image_features(model):
    """The MLLM's image features by name, for `object_features`: the tower's semantic (ViT merger) and
    pixel (encoder) grids, each also after its projector (what the LLM reads)."""
    return functools.partial(_mllm_features, model)


def tower_image_features(tower):
    """A `models.mllm.DualVisionTower`'s semantic and pixel grids by name, for `object_features` (e.g.
    a tokenizer's freshly pre-trained ViT, before any MLLM exists)."""
    return functools.partial(_tower_features, tower)


def object_features(features, *, level: int = 1, train_scenes: int = 1200, test_scenes: int = 300,
                    window_px: float = 20.0, batch_size: int = 50) -> dict:
    """How well a linear read-out of image features names each object's shape and colour. `features`:
    images [N,H,W,3] in [-1,1] -> {name: [N, g*g, C]} (`mllm_image_features`, `tower_image_features`).
    Per object of ShapeComp `level` scenes: the cells around its centre (`object_windows`, about
    window_px wide) of each named grid, and of the raw pixels as the yardstick; ridge classifiers fit on
    the train split's objects and scored on the test split's.
    -> {name: {shape, color, both, shape_by_size, dims}}, plus the objects counted and the chance levels."""
    from illume_jax.data.shapecomp.render import render
    from illume_jax.data.shapecomp.scene import make_scene
    from illume_jax.data.shapecomp import world

    res = world.get_level(level).resolution

    def collect(split, n):
        rows: dict[str, list] = {}
        shapes, colors, sizes = [], [], []
        for start in range(0, n, batch_size):
            scenes = [make_scene(level, split, i) for i in range(start, min(n, start + batch_size))]
            images = np.stack([render(s) for s in scenes]).astype(np.float32) / 127.5 - 1
            named = {k: np.asarray(f, np.float32) for k, f in features(jnp.asarray(images)).items()}
            named["raw pixels"] = images.reshape(len(scenes), res * res, 3)
            for b, scene in enumerate(scenes):
                centres = [(o.cx, o.cy) for o in scene.objects]
                for name, f in named.items():
                    rows.setdefault(name, []).append(object_windows(f[b], centres, res, window_px))
                shapes += [o.shape for o in scene.objects]
                colors += [o.color for o in scene.objects]
                sizes += [o.size for o in scene.objects]
        return {k: np.concatenate(v) for k, v in rows.items()}, np.array(shapes), np.array(colors), np.array(sizes)

    (xa, sa, ca, _), (xb, sb, cb, zb) = collect("train", train_scenes), collect("test", test_scenes)
    out = dict(objects=dict(train=len(sa), test=len(sb)),
               chance=dict(shape=1 / len(set(sa)), color=1 / len(set(ca))))
    for name in xa:
        shape_ok = ridge_classifier_accuracy(xa[name], sa, xb[name], sb)
        color_ok = ridge_classifier_accuracy(xa[name], ca, xb[name], cb)
        out[name] = dict(shape=float(shape_ok.mean()), color=float(color_ok.mean()),
                         both=float((shape_ok & color_ok).mean()), dims=int(xa[name].shape[1]),
                         shape_by_size={str(z): float(shape_ok[zb == z].mean()) for z in sorted(set(zb))})
    return out
