"""Grain training pipeline: TFDS sources -> mixture -> shuffle -> per-process shard ->
chat-template tokenisation -> first-fit packing -> batches.

Every batch is a dict of numpy arrays [b, T], b = global_batch_size / process_count:
  tokens       int32   inputs
  targets      int32   next token within the same packed conversation
  loss_mask    float32 1 where the target is trained (assistant turns)
  segment_ids  int32   1..n per packed conversation, 0 = padding
  positions    int32   restart at 0 in every conversation
  sources      int32   1 + the mixture position of the token's dataset (`mixture_names`), 0 = padding
The iterator is deterministic for a config and seed, and `get_state()` / `set_state()`
restore it exactly (also with worker processes, given the same worker count).
"""
from __future__ import annotations

import functools
import json
import zlib
from typing import Any

import grain
import numpy as np
from absl import flags, logging

from illume_jax.data import build, chat
from illume_jax.modules.attention import CUDNN_MAX_SEGMENTS

# grain reads absl flags; they must count as parsed even outside an absl program.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class Tokenize:
    """Record -> {tokens, targets, loss_mask, sources} of one conversation (None = skipped)."""

    def __init__(self, tokenizer, template: str, text_only: bool, seq_len: int):
        self.tokenizer, self.template, self.text_only, self.seq_len = tokenizer, template, text_only, seq_len
        self.skipped = 0
        self.truncated = 0

    def __call__(self, record: dict) -> dict | None:
        try:
            conv = json.loads(record["conversations"])
            context = record["context"].decode() if isinstance(record["context"], bytes) else record["context"]
            ids, mask = chat.render(conv, self.tokenizer, self.template, text_only=self.text_only, context=context)
        except chat.SkipRecord:
            self.skipped += 1
            return None
        if len(ids) > self.seq_len + 1:
            self.truncated += 1
            ids, mask = ids[:self.seq_len + 1], mask[:self.seq_len + 1]
        # Next-token pairs are formed before packing, so targets never cross conversations.
        return {"tokens": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:],
                "sources": np.full(len(ids) - 1, int(record.get("source", 0)), np.int32)}


def _finalise(packed: dict) -> dict:
    return {"tokens": packed["tokens"].astype(np.int32), "targets": packed["targets"].astype(np.int32),
            "loss_mask": packed["loss_mask"].astype(np.float32),
            "segment_ids": packed["tokens_segment_ids"].astype(np.int32),
            "positions": packed["tokens_positions"].astype(np.int32), "sources": packed["sources"].astype(np.int32)}


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def scene_as_text(record: dict) -> dict:
    """A record's images replaced by its scene description: every `<image>` of a human turn becomes
    "Scene: <context>" (as a text-only config renders it) and the record keeps no images. For a
    multimodal config's `text_only` datasets: the language model learns to look things up in a
    described scene before it has to in an image. An image in an assistant turn cannot be
    described away: such a record loses its images and so is skipped downstream (`too_many_images`)."""
    turns = json.loads(record["conversations"])
    if any(t.get("from") == "gpt" and "<image>" in t.get("value", "") for t in turns):
        return {**record, "images": []}
    context = record["context"].decode() if isinstance(record["context"], bytes) else str(record["context"])
    for t in turns:
        if t.get("from") == "human":
            t["value"] = t.get("value", "").replace("<image>", f"Scene: {context}")
    return {**record, "conversations": json.dumps(turns), "images": []}


def mixture_names(stage: Any) -> list[str]:
    """The datasets a stage draws from (positive mixture weight), in the mixture's iteration order
    (a ConfigDict's is sorted by name): record `source` i + 1 is names[i], for the pipelines and
    the train step's `loss/<name>` metrics alike."""
    return [n for n, w in stage.mixture.items() if w > 0]


def tag_source(source: int, record: dict) -> dict:
    """Marks a record with the (1-based) mixture position of its dataset; every token of its
    training row carries it (`sources`), so the loss can be split by dataset (0 = padding or an
    untagged record)."""
    return {**record, "source": source}


def mixture_dataset(config: Any, stage_index: int, data_dir: str, *, seed: int, process_index: int = 0,
                    process_count: int = 1, sources: dict | None = None):
    """The stage's weighted, per-epoch-shuffled, endless mixture of records, this process's
    share of it (a grain MapDataset). Shared by the text and the multimodal pipelines."""
    stage = config.stages[stage_index]
    if stage.global_batch_size % process_count:
        raise ValueError(f"stage {stage.name!r}: global_batch_size={stage.global_batch_size} is not divisible by "
                         f"{process_count} processes")
    for n in stage.mixture:
        if n not in config.data.datasets:
            raise ValueError(f"stage {stage.name!r}: mixture names {n!r}, not in config.data.datasets")
    names = mixture_names(stage)
    if not names:
        raise ValueError(f"stage {stage.name!r}: the mixture has no dataset with a positive weight")
    datasets = []
    for index, name in enumerate(names):
        src = sources[name] if sources is not None else build.data_source(config, name, data_dir)
        if len(src) == 0:
            raise ValueError(f"dataset {name!r} is empty")
        # Each epoch gets its own permutation (grain's shuffle re-seeds per epoch).
        ds = grain.MapDataset.source(src).shuffle(seed=_seed(config.data.shuffle_seed, seed, name)).repeat()
        if config.data.datasets[name].get("text_only", False):
            ds = ds.map(scene_as_text)
        datasets.append(ds.map(functools.partial(tag_source, index + 1)))
    weights = [float(stage.mixture[n]) for n in names]
    ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
    return ds[process_index::process_count], dict(zip(names, weights))   # disjoint per JAX process


def make_train_iterator(config: Any, stage_index: int, tokenizer, data_dir: str, *, process_index: int = 0,
                        process_count: int = 1, seed: int | None = None, sources: dict | None = None):
    """The stage's batch iterator (a grain DatasetIterator). `sources` (name -> random-access
    source) overrides reading the TFDS datasets (tests)."""
    stage = config.stages[stage_index]
    seed = config.seed if seed is None else seed
    ds, mixture = mixture_dataset(config, stage_index, data_dir, seed=seed, process_index=process_index,
                                  process_count=process_count, sources=sources)
    tok = Tokenize(tokenizer, config.tokenizer.chat_template, config.data.text_only, stage.seq_len)
    ds = ds.map(tok).filter(lambda x: x is not None)
    local_batch = stage.global_batch_size // process_count
    T = stage.seq_len
    it = ds.to_iter_dataset()
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={"tokens": T, "targets": T, "loss_mask": T, "sources": T}, num_packing_bins=max(2 * local_batch, 8),
        seed=_seed("pack", seed), shuffle_bins=True, max_sequences_per_bin=CUDNN_MAX_SEGMENTS)
    it = it.map(_finalise).batch(local_batch, drop_remainder=True)
    workers = int(config.data.num_workers)
    if workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    logging.info("stage %s: mixture %s, %d rows/batch of %d tokens, %d workers", stage.name, mixture,
                 local_batch, T, workers)
    return iter(it)
