"""TFDS builders (ArrayRecord files, no TensorFlow) for ShapeComp and for user JSONL data.

Both produce the same record features, the official LLaVA-style layout (spec §5.3):
  id, task, conversations (JSON text), images (PNG/JPEG bytes, decoded on read), context.
Read them with `tfds.data_source` / `builder.as_data_source()` (random access, Grain-ready).

TFDS without TensorFlow cannot encode image arrays, so images are stored as encoded PNG
bytes (ShapeComp renders; user files re-encoded after checking that PIL can decode them)
and decoded with `decode_image` only where pixels are needed — text-only stages never pay.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from illume_jax.data import shapecomp


class _QuietCustomConfigWarning(logging.Filter):
    """TFDS warns 'Using custom data configuration' for every builder made from a config; ours always
    are (the config names the levels, tasks and sizes), so it is noise. Installed here, not in
    data/build.py: spawned Grain workers re-create the builders and import only this module."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Using custom data configuration" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietCustomConfigWarning())

_FEATURES = dict(
    id=tfds.features.Text(),
    task=tfds.features.Text(),
    conversations=tfds.features.Text(),  # JSON list of {'from', 'value'}
    # Encoded PNG bytes, decoded only by the stages that look at pixels (`decode_image`).
    images=tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
    context=tfds.features.Text(),
)


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> [H, W, 3] uint8."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


@dataclasses.dataclass
class ShapeCompConfig(tfds.core.BuilderConfig):
    levels: tuple[int, ...] = (0,)
    tasks: tuple[str, ...] = ("caption", "qa")
    num_train: int = 1000   # scenes per level in 'train'; validation/test get a tenth
    qa_negatives: str = "mixed"  # how QA existence negatives are drawn (shapecomp.questions)
    qa_lookups: bool = False     # QA asks every colour-of-a-shape and shape-of-a-colour lookup
    qa_turns: int = 0            # questions per QA record (0: all of a scene's in one)


def shapecomp_config(levels, tasks, num_train: int, qa_negatives: str = "mixed",
                     qa_lookups: bool = False, qa_turns: int = 0) -> ShapeCompConfig:
    levels, tasks = tuple(int(l) for l in levels), tuple(tasks)
    for level in levels:
        shapecomp.get_level(level)
    if qa_negatives not in shapecomp.QA_NEGATIVES:
        raise ValueError(f"shapecomp dataset qa_negatives={qa_negatives!r}: expected one of {shapecomp.QA_NEGATIVES}")
    name = f"levels{''.join(map(str, levels))}_{'-'.join(tasks)}_{num_train}"
    if qa_negatives != "mixed" and "qa" in tasks:  # the other tasks' records do not depend on it
        name += f"_{qa_negatives}neg"
    if qa_lookups and "qa" in tasks:
        name += "_lookups"
    qa_turns = shapecomp.check_qa_turns(qa_turns)
    if qa_turns and "qa" in tasks:
        name += f"_turns{qa_turns}"
    return ShapeCompConfig(name=name, levels=levels, tasks=tasks, num_train=num_train, qa_negatives=qa_negatives,
                           qa_lookups=bool(qa_lookups), qa_turns=qa_turns)


class ShapeComp(tfds.core.GeneratorBasedBuilder):
    """Procedural ShapeComp records; splits train / validation / test (+ compositional at level >= 3)."""

    # A change to the records bumps the version, so data already built in a workdir is not reused.
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.1.0": "QA existence negatives drawn the three POPE ways (one per scene); 1.0.0 drew them at random "
                 "(qa_negatives='random' rebuilds those records).",
    }
    BUILDER_CONFIGS = [shapecomp_config((0, 1), ("caption", "qa"), 1000)]

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(_FEATURES))

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        n_eval = max(c.num_train // 10, 1)
        splits = {"train": c.num_train, "validation": n_eval, "test": n_eval}
        if max(c.levels) >= 3:
            splits["compositional"] = n_eval
        return {name: self._generate_examples(name, n) for name, n in splits.items()}

    def _generate_examples(self, split: str, n: int):
        c = self.builder_config
        for level in c.levels:
            for i in range(n):
                for rec in shapecomp.conversation_records(level, split, i, tasks=c.tasks,
                                                           qa_negatives=c.qa_negatives,
                                                           qa_lookups=c.qa_lookups, qa_turns=c.qa_turns):
                    yield rec["id"], dict(id=rec["id"], task=rec["task"], images=rec["images"],
                                          conversations=json.dumps(rec["conversations"]), context=rec["context"])


@dataclasses.dataclass
class JsonlConfig(tfds.core.BuilderConfig):
    path: str = ""        # one .jsonl file, or a directory of them
    image_dir: str = ""   # image paths in records are relative to it


def jsonl_config(name: str, path: str, image_dir: str) -> JsonlConfig:
    return JsonlConfig(name=name, path=os.path.abspath(path), image_dir=os.path.abspath(image_dir or "."))


def _task_of(conversations: list) -> str:
    gpt = " ".join(t.get("value", "") for t in conversations if t.get("from") == "gpt")
    human = " ".join(t.get("value", "") for t in conversations if t.get("from") == "human")
    if "<image>" in gpt:
        return "edit" if "<image>" in human else "t2i"
    return "understanding"


class UserJsonl(tfds.core.GeneratorBasedBuilder):
    """User data in the official LLaVA-style JSONL ({"images": [...], "conversations": [...]}).

    Bad records are skipped and counted (malformed JSON, a missing field, an unreadable
    image); `bad_records` lists file:line and reason, and `build.build_datasets` writes it
    next to the dataset.
    """

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [JsonlConfig(name="default")]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_records: list[str] = []

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(_FEATURES))

    def _files(self) -> list[str]:
        p = self.builder_config.path
        if os.path.isdir(p):
            files = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".jsonl"))
        else:
            files = [p] if os.path.exists(p) else []
        if not files:
            raise ValueError(f"jsonl dataset: no .jsonl file at {p!r}")
        return files

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(self._files())}

    def _read_image(self, rel: str) -> bytes:
        from PIL import Image
        path = rel if os.path.isabs(rel) else os.path.join(self.builder_config.image_dir, rel)
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            buf = io.BytesIO()
            im.save(buf, format="PNG")  # one encoding on disk, whatever the user's format was
        return buf.getvalue()

    def _generate_examples(self, files: list[str]):
        for path in files:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{path}:{lineno}"
                    try:
                        rec = json.loads(line)
                        if not isinstance(rec, dict):
                            raise ValueError("not a JSON object")
                        conv = rec["conversations"]
                        if not isinstance(conv, list) or not conv:
                            raise ValueError("'conversations' must be a non-empty list")
                        images = [self._read_image(p) for p in rec.get("images", [])]
                        n_placeholders = sum(t.get("value", "").count("<image>") for t in conv)
                        if n_placeholders != len(images):
                            raise ValueError(f"{n_placeholders} <image> placeholders but {len(images)} images")
                    except KeyError as e:
                        self.bad_records.append(f"{where}: missing field {e}")
                        continue
                    except (ValueError, OSError) as e:
                        self.bad_records.append(f"{where}: {type(e).__name__}: {e}")
                        continue
                    key = rec.get("id", f"{os.path.basename(path)}:{lineno}")
                    yield f"{os.path.basename(path)}:{lineno}", dict(
                        id=str(key), task=_task_of(conv), conversations=json.dumps(conv), images=images,
                        context=str(rec.get("context", "")))
        if self.bad_records:
            logging.warning("jsonl dataset %s: skipped %d bad records, e.g. %s", self.builder_config.path,
                            len(self.bad_records), self.bad_records[:3])


