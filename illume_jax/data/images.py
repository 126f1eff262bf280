"""Image pipelines for the vision-tokenizer trainers and `encode-dataset`.

Sources are random-access (`len`, `__getitem__`) so Grain can shuffle, shard over processes
and checkpoint the iterator position:
  ShapeCompImages   renders (level, split, index) scenes on the fly, with their captions
                    (the SigLIP pre-training of the tiny semantic ViT needs the text);
  DatasetImages     the first image of every record of a built TFDS dataset
                    (`config.data.datasets`: ShapeComp or user JSONL), decoded on read.
Images leave the pipeline as float32 [-1, 1] NHWC (the official tokenizer's input range,
spec §0) at one fixed training resolution.
"""
from __future__ import annotations

import io
import math
import re
import zlib
from typing import Any, Sequence

import grain
import numpy as np

from illume_jax.data import shapecomp


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


class ShapeCompImages:
    """Scenes `index` of each level in `levels`, rendered on access (a pure function of the index)."""

    def __init__(self, levels: Sequence[int], split: str, num_per_level: int, target_scale: int = 1,
                 shape_twins: int = 0, dense_captions: bool = False, cell_grid: tuple[int, int] | None = None):
        """target_scale > 1 adds 'target': the same scene rendered exactly at that many times the
        resolution (the super-resolution target of the diffusion decoder). shape_twins = k > 0 adds
        'twin_image' [k,S,S,3] / 'twin_caption' (k strings): k versions of the scene with one
        object's shape changed (`shapecomp.shape_twins`); all captions are then the dense ones, so
        each twin differs from the scene in exactly one word (a short caption might not name the
        changed object). dense_captions: every caption the dense one (else every other one is a
        short GenEval-style caption). cell_grid = (h, w) adds 'cell_shape' / 'cell_color' [h*w] int32:
        the shape and colour of the object under each cell of that grid over the image, from the scene
        graph (`shapecomp.cell_labels`; background = len(SHAPES) / len(COLORS))."""
        self.levels = tuple(int(l) for l in levels)
        self.target_scale = int(target_scale)
        if not isinstance(shape_twins, (int, np.integer)) or isinstance(shape_twins, bool) or shape_twins < 0:
            raise ValueError(f"shape_twins={shape_twins!r}: expected an int >= 0 (twins per scene)")
        self.shape_twins = int(shape_twins)
        self.dense_captions = bool(dense_captions)
        if cell_grid is not None and (len(cell_grid) != 2 or min(cell_grid) < 1):
            raise ValueError(f"cell_grid={cell_grid!r}: expected (rows, columns) >= 1 or None")
        self.cell_grid = None if cell_grid is None else (int(cell_grid[0]), int(cell_grid[1]))
        for level in self.levels:
            shapecomp.get_level(level)
        shapecomp.world.check_split(split)
        if num_per_level < 1:
            raise ValueError(f"num_per_level={num_per_level}: expected >= 1")
        self.split, self.num = split, int(num_per_level)

    def __len__(self) -> int:
        return self.num * len(self.levels)

    def __getitem__(self, i: int) -> dict:
        level, index = self.levels[i // self.num], i % self.num
        scene = shapecomp.make_scene(level, self.split, index)
        dense = index % 2 == 0 or self.shape_twins or self.dense_captions
        caption = shapecomp.dense_caption(scene) if dense else shapecomp.short_caption(scene)
        rec = {"image": shapecomp.render(scene), "caption": caption, "id": f"shapecomp-L{level}-{self.split}-{index}"}
        if self.shape_twins:
            twins = shapecomp.shape_twins(scene, self.shape_twins)
            rec["twin_image"] = np.stack([shapecomp.render(t) for t in twins])
            rec["twin_caption"] = [shapecomp.dense_caption(t) for t in twins]
        if self.target_scale > 1:
            rec["target"] = shapecomp.render(shapecomp.scaled(scene, self.target_scale))
        if self.cell_grid is not None:
            rec["cell_shape"], rec["cell_color"] = shapecomp.cell_labels(scene, self.cell_grid)
        return rec

    def scene(self, i: int):
        return shapecomp.make_scene(self.levels[i // self.num], self.split, i % self.num)


class DatasetImages:
    """The first image of each record of a TFDS data source; undecodable images come back as
    None (callers skip and count them)."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        rec = self.source[i]
        images = rec["images"]
        rid = rec["id"].decode() if isinstance(rec["id"], bytes) else str(rec["id"])
        if len(images) == 0:
            return {"image": None, "caption": "", "id": rid, "error": "no image"}
        try:
            from PIL import Image
            with Image.open(io.BytesIO(images[0])) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - any decoder failure means "bad image"
            return {"image": None, "caption": "", "id": rid, "error": f"undecodable: {type(e).__name__}"}
        return {"image": arr, "caption": "", "id": rid}


def fit_resolution(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to `size` (PIL bicubic) and centre-crop to size x size."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    from PIL import Image
    h, w = image.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    im = Image.fromarray(image).resize((nw, nh), Image.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(im)[top:top + size, left:left + size]


def native_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(h, w) an image keeps at its own aspect: each side a multiple of `factor` (the nearest one), scaled
    down into `max_pixels` or up to `min_pixels` when outside them (the official understanding pre-processing,
    Qwen2-VL's "smart resize" rule with the tower's pixel bounds; spec §5.2: 32²..768², factor 16)."""
    if height < 1 or width < 1 or max(height, width) / min(height, width) > 200:
        raise ValueError(f"native_size: an image of {height}x{width} pixels (expected sides >= 1 and an aspect "
                         f"ratio up to 200)")
    if min_pixels > max_pixels or max_pixels < factor * factor:
        raise ValueError(f"native_size: pixel bounds ({min_pixels}, {max_pixels}) with factor {factor}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H,W,3] -> [h,w,3] (PIL bicubic, as the official image processor), aspect not kept."""
    if image.shape[:2] == tuple(size):
        return image
    from PIL import Image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC))


def to_model_range(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return image.astype(np.float32) / 127.5 - 1.0


def to_uint8(image) -> np.ndarray:
    """float [-1, 1] -> uint8, rounding as the official `127.5 * x + 128` clamp does."""
    return np.clip(np.asarray(image, np.float32) * 127.5 + 128.0, 0, 255).astype(np.uint8)


# -- word-level caption tokens (for the tiny SigLIP text tower) ---------------------------------

class CaptionVocab:
    """Word-level vocabulary of ShapeComp captions: 0 = padding, 1 = unknown word.

    The world's text is ~60 words, so a word vocabulary is exact; it is built from the
    captions of the first scenes of the configured levels, a deterministic function of them.
    """

    def __init__(self, levels: Sequence[int], num_scenes: int = 400):
        words = set()
        for level in levels:
            for i in range(num_scenes):
                scene = shapecomp.make_scene(int(level), "train", i)
                for text in (shapecomp.dense_caption(scene), shapecomp.short_caption(scene)):
                    words.update(self.split(text))
        self.words = ("<pad>", "<unk>") + tuple(sorted(words))
        self.index = {w: i for i, w in enumerate(self.words)}

    @staticmethod
    def split(text: str) -> list[str]:
        return re.findall(r"[a-z]+|[0-9]+", text.lower())

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str, length: int) -> np.ndarray:
        ids = [self.index.get(w, 1) for w in self.split(text)][:length]
        return np.asarray(ids + [0] * (length - len(ids)), np.int32)


class _Prepare:
    """Record -> {'image': float32 [S,S,3] in [-1,1] (+ 'text' ids, + 'twin_image' [k,S,S,3] /
    'twin_text' [k,L] for a record with k shape twins, + 'cell_shape' / 'cell_color' as they come)}; a
    picklable class so Grain worker processes can run it."""

    def __init__(self, resolution: int, vocab: CaptionVocab | None, text_len: int, target_scale: int = 1):
        self.resolution, self.vocab, self.text_len = resolution, vocab, text_len
        self.target_scale = target_scale

    def __call__(self, rec: dict) -> dict | None:
        if rec["image"] is None or min(rec["image"].shape[:2]) < 16:
            return None
        out = {"image": to_model_range(fit_resolution(rec["image"], self.resolution))}
        if self.target_scale > 1:  # 'target': the image at target_scale x the resolution
            big = self.resolution * self.target_scale
            target = rec.get("target")
            out["target"] = to_model_range(target if target is not None and target.shape[:2] == (big, big)
                                           else fit_resolution(rec["image"], big))
        if self.vocab is not None:
            out["text"] = self.vocab.encode(rec["caption"], self.text_len)
        if "twin_image" in rec:  # shape twins (ShapeCompImages(shape_twins=k)): [k,S,S,3], k captions
            out["twin_image"] = np.stack([to_model_range(fit_resolution(t, self.resolution))
                                          for t in rec["twin_image"]])
            if self.vocab is not None:
                out["twin_text"] = np.stack([self.vocab.encode(t, self.text_len) for t in rec["twin_caption"]])
        for key in ("cell_shape", "cell_color"):  # per-cell labels: cells of the grid, whatever the image size
            if key in rec:
                out[key] = rec[key]
        return out


def image_source(data: Any, split: str = "train", data_dir: str = "", target_scale: int = 1):
    """The random-access image source a tokenizer or decoder config's `data` block names."""
    if data.source == "shapecomp":
        return ShapeCompImages(data.levels, split, int(data.num_examples if split == "train" else data.num_eval),
                               target_scale=target_scale)
    if data.source == "dataset":
        from illume_jax.data import build
        return DatasetImages(build.data_source(data.dataset_config, data.dataset, data_dir, split))
    raise ValueError(f"data.source={data.source!r}: expected 'shapecomp' or 'dataset'")


def make_image_iterator(source, *, batch_size: int, resolution: int, seed: int, process_index: int = 0,
                        process_count: int = 1, vocab: CaptionVocab | None = None, text_len: int = 24,
                        num_workers: int = 0, target_scale: int = 1):
    """Endless shuffled batches {'image': [b,S,S,3] (+ 'text': [b,L]; + 'target': [b,kS,kS,3]
    for target_scale k > 1)}, b = batch_size / processes.

    A checkpointable Grain iterator: its state goes into the training checkpoint, so a resumed
    run sees exactly the batches it would have seen.
    """
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by {process_count} processes")
    if len(source) == 0:
        raise ValueError("the image source is empty")
    ds = grain.MapDataset.source(source).shuffle(seed=_seed("images", seed)).repeat()
    ds = ds[process_index::process_count]
    ds = ds.map(_Prepare(resolution, vocab, text_len, target_scale)).filter(lambda x: x is not None)
    it = ds.to_iter_dataset().batch(batch_size // process_count, drop_remainder=True)
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it)
