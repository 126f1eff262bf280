"""Looking inside the language model: existence questions answered from a scene described in words,
and the attention of every head.

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
"""
from __future__ import annotations

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
