"""`python -m illume_jax encode-dataset`: pre-tokenize a dataset's images into codes (ArrayRecord).

The equivalent of the official codebook-inference step: MLLM training reads the codes instead
of running the vision tokenizer every step. One record per image, JSON-encoded bytes:
  {"id", "height", "width", "codes": {"semantic": [[...]], "pixel": [[...]]}}
(code grids as nested lists; records are small, and JSON keeps them readable from any language).
Images that cannot be decoded or are smaller than `min_size` are skipped and counted; the
summary (`<out>/<split>.summary.json`) lists them, and a JSONL preview of the first records sits
next to the ArrayRecord file. Writing goes to a temporary name renamed at the end, so a killed
run leaves no half-written file behind (re-running starts that split again).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np

from illume_jax.data import images as images_lib


def encode_dataset(config: Any, workdir: str, *, split: str = "train", limit: int = 0, batch_size: int = 64,
                   min_size: int = 16, out_dir: str | None = None) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    from illume_jax.train.tokenizer import load_tokenizer
    out_dir = out_dir or os.path.join(workdir, "codes")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{split}.array_record")
    model, trainer, state = load_tokenizer(config, workdir)
    src = images_lib.image_source(config.data, split, config.data.get("data_dir", ""))
    n = min(limit, len(src)) if limit else len(src)
    res = int(config.data.resolution)
    skipped: list[dict] = []
    written = 0
    t0 = time.perf_counter()
    tmp = path + ".tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    preview = open(os.path.join(out_dir, f"{split}.preview.jsonl"), "w")
    batch_imgs, batch_meta = [], []

    def flush():
        nonlocal written
        if not batch_imgs:
            return
        x = np.stack(batch_imgs)
        real = len(x)
        if real < batch_size:  # one compiled shape for every batch
            x = np.concatenate([x, np.repeat(x[-1:], batch_size - real, 0)])
        _, codes = trainer.reconstruct(state, x)
        codes = {k: np.asarray(jax.device_get(v))[:real] for k, v in codes.items()}
        for i, meta in enumerate(batch_meta):
            rec = dict(meta, codes={k: v[i].tolist() for k, v in codes.items()})
            data = json.dumps(rec, separators=(",", ":")).encode()
            writer.write(data)
            if written < 20:
                preview.write(json.dumps(rec) + "\n")
            written += 1
        batch_imgs.clear()
        batch_meta.clear()

    for i in range(n):
        rec = src[i]
        img = rec["image"]
        if img is None:
            skipped.append({"id": rec["id"], "reason": rec.get("error", "undecodable")})
            continue
        if min(img.shape[:2]) < min_size:
            skipped.append({"id": rec["id"], "reason": f"too small ({img.shape[0]}x{img.shape[1]} < {min_size})"})
            continue
        batch_imgs.append(images_lib.to_model_range(images_lib.fit_resolution(img, res)))
        batch_meta.append({"id": rec["id"], "height": res, "width": res})
        if len(batch_imgs) == batch_size:
            flush()
    flush()
    writer.close()
    preview.close()
    os.replace(tmp, path)
    summary = {"split": split, "records": written, "skipped": len(skipped), "skipped_examples": skipped[:100],
               "seconds": round(time.perf_counter() - t0, 2), "path": path,
               "codebooks": dict(trainer.codebook_sizes)}
    with open(os.path.join(out_dir, f"{split}.summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def read_codes(path: str):
    """A random-access source over an encoded split: source[i] -> dict with numpy code grids."""
    import grain

    class _Source:
        def __init__(self):
            self.inner = grain.sources.ArrayRecordDataSource([path])

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            rec = json.loads(self.inner[i])
            rec["codes"] = {k: np.asarray(v, np.int32) for k, v in rec["codes"].items()}
            return rec

    return _Source()
