"""Chat templates: a LLaVA conversation -> token ids + a loss mask (assistant turns only).

'qwen2' is the official ILLUME+ template (spec §3.5), 'vicuna' the LLaVA-v1 one the
original ILLUME used, 'plain' a compact one for tiny models. In text-only mode an `<image>`
in a human turn becomes the record's scene description; records whose assistant turn is an
image (text-to-image, editing) cannot be learned without a vision tokenizer and are skipped.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from illume_jax.data.tokenizers import TextTokenizer

TEMPLATES = ("plain", "qwen2", "vicuna")
QWEN_SYSTEM = "You are a helpful assistant."
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")


class SkipRecord(Exception):
    """The record cannot be used in this mode (reason in the message)."""


def _pieces(template: str, turns: Sequence[dict], eos: str) -> list[tuple[str, bool]]:
    """(text, trained) pieces in order."""
    out: list[tuple[str, bool]] = []
    if template == "qwen2":
        out.append((f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n", False))
    elif template == "vicuna":
        out.append((VICUNA_SYSTEM + " ", False))
    for turn in turns:
        role, value = turn["from"], turn["value"]
        if role == "human":
            prompt = {"qwen2": f"<|im_start|>user\n{value}<|im_end|>\n<|im_start|>assistant\n",
                      "vicuna": f"USER: {value} ASSISTANT:",
                      "plain": f"<|user|>{value}<|assistant|>"}[template]
            out.append((prompt, False))
        elif role == "gpt":
            if template == "qwen2":
                out += [(f"{value}<|im_end|>", True), ("\n", False)]
            elif template == "vicuna":
                out += [(f" {value}", True), (eos, True)]
            else:
                out += [(value, True), (eos, True)]
        else:
            raise SkipRecord(f"unknown role {role!r} (expected human or gpt)")
    return out


def render(conversations: Sequence[dict], tokenizer: TextTokenizer, template: str, *, text_only: bool,
           context: str = "") -> tuple[np.ndarray, np.ndarray]:
    """-> (ids int32 [L], loss mask float32 [L]) with a leading BOS when the vocabulary has one."""
    if template not in TEMPLATES:
        raise ValueError(f"chat template {template!r}: expected one of {TEMPLATES}")
    if not conversations or conversations[0].get("from") != "human":
        raise SkipRecord("conversations must start with a human turn")
    turns = []
    for t in conversations:
        if "from" not in t or "value" not in t:
            raise SkipRecord("a turn lacks 'from' or 'value'")
        value = t["value"]
        if text_only and "<image>" in value:
            if t["from"] == "gpt":
                raise SkipRecord("the assistant answers with an image (needs the vision tokenizer)")
            value = value.replace("<image>", f"Scene: {context}")
        turns.append({"from": t["from"], "value": value})
    eos_piece = "</s>"
    ids: list[int] = [] if tokenizer.bos_id is None or tokenizer.bos_id < 0 else [tokenizer.bos_id]
    mask: list[float] = [0.0] * len(ids)
    for text, trained in _pieces(template, turns, eos_piece):
        piece_ids = [tokenizer.eos_id] if text == eos_piece else tokenizer.encode(text)
        ids += piece_ids
        mask += [1.0 if trained else 0.0] * len(piece_ids)
    return np.asarray(ids, np.int32), np.asarray(mask, np.float32)
