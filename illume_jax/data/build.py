"""Build (once) and open the datasets a config names: `python -m illume_jax data build|inspect`."""
from __future__ import annotations

import json
import os
from typing import Any

from illume_jax.data import tfds_builders

try:  # TFDS prints a progress bar per split and shard; our own logs say what is built.
    import tensorflow_datasets as _tfds
    _tfds.disable_progress_bar()
except ImportError:  # pragma: no cover - tensorflow-datasets is a dependency
    pass


def _builder(config: Any, name: str, data_dir: str):
    datasets = config.data.datasets
    if name not in datasets:
        raise ValueError(f"dataset {name!r} is not in config.data.datasets {sorted(datasets.keys())}")
    ds = datasets[name]
    if ds.kind == "shapecomp":
        cfg = tfds_builders.shapecomp_config(ds.levels, ds.tasks, int(ds.num_examples),
                                             ds.get("qa_negatives", "mixed"), ds.get("qa_lookups", False),
                                             ds.get("qa_turns", 0))
        return tfds_builders.ShapeComp(config=cfg, data_dir=data_dir, file_format="array_record")
    if ds.kind == "jsonl":
        if not ds.get("path"):
            raise ValueError(f"config.data.datasets.{name}.path is empty: point it at a .jsonl file or folder")
        if not os.path.exists(ds.path):
            raise ValueError(f"config.data.datasets.{name}.path={ds.path!r} does not exist")
        cfg = tfds_builders.jsonl_config(name, ds.path, ds.get("image_dir", ""))
        return tfds_builders.UserJsonl(config=cfg, data_dir=data_dir, file_format="array_record")
    raise ValueError(f"config.data.datasets.{name}.kind={ds.kind!r}: expected 'shapecomp' or 'jsonl'")


def build_dataset(config: Any, name: str, data_dir: str) -> dict:
    """Prepares one dataset (a no-op when already built); returns split sizes and bad-record counts."""
    builder = _builder(config, name, data_dir)
    report_path = os.path.join(builder.data_dir, "bad_records.json")
    if not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        builder.download_and_prepare()
        bad = getattr(builder, "bad_records", [])
        with open(report_path, "w") as f:
            json.dump({"count": len(bad), "records": bad}, f, indent=1)
    sizes = {split: info.num_examples for split, info in builder.info.splits.items()}
    if not sizes or sizes.get("train", 0) == 0:
        raise ValueError(f"dataset {name!r} has no training examples (built in {builder.data_dir}; "
                         f"bad records listed in {report_path})")
    bad_count = json.load(open(report_path))["count"] if os.path.exists(report_path) else 0
    return {"splits": sizes, "bad_records": bad_count, "dir": builder.data_dir}


def build_datasets(config: Any, data_dir: str) -> dict[str, dict]:
    """Every dataset some stage's mixture uses (with a positive weight)."""
    used = sorted({n for st in config.stages for n, w in st.mixture.items() if w > 0})
    return {name: build_dataset(config, name, data_dir) for name in used}


def data_source(config: Any, name: str, data_dir: str, split: str = "train"):
    """Random-access source of one split (Grain reads it); images stay encoded bytes."""
    builder = _builder(config, name, data_dir)
    sources = builder.as_data_source()
    if split not in sources:
        raise ValueError(f"dataset {name!r} has no split {split!r} (has {sorted(sources)})")
    return sources[split]


def inspect_dataset(config: Any, data_dir: str, name: str, n: int = 3) -> str:
    info = build_dataset(config, name, data_dir)
    src = data_source(config, name, data_dir)
    lines = [f"{name}: {info}"]
    for i in range(min(n, len(src))):
        rec = src[i]
        conv = json.loads(rec["conversations"])
        lines.append(f"--- {rec['id'].decode()} [{rec['task'].decode()}], {len(rec['images'])} image(s) "
                     f"{[tuple(tfds_builders.decode_image(im).shape) for im in rec['images']]}")
        for t in conv:
            lines.append(f"  {t['from']}: {t['value']!r}")
    return "\n".join(lines)
