"""Multimodal sequences for the MLLM: a LLaVA-style record -> tokens + image slots (spec §3.3-§3.5, §5.3).

Rules, as the official dataset applies them:
* An `<image>` in a human turn is a *continuous* image block (projected features); an `<image>`
  in an assistant turn is `<height_H><width_W>` + a *discrete* block (the image's codes are the
  targets). In generation records (any assistant image) human images also get the tag in front.
* `{resolution_tag}` in the text becomes `<height_H><width_W>` of the image resolution; written
  tags (`<height_64>`) are turned into their ids, whatever the text tokenizer.
* Loss on assistant turns only (text, tags, every structure and code token, the end token).
* CFG condition dropout (probability `cfg_dropout`, official 0.1): a text-to-image prompt becomes
  "Generate a random image of <tags>\\n"; an edit becomes the reconstruction prompt with the
  source image as its own target.

High-resolution understanding (the original ILLUME's "patchify", `vision.anyres_max_slices` > 0): in a
record whose answers are text, a human-turn image larger than the base resolution is shown as a global
view plus up to that many slices (data/anyres.py), each its own continuous block; slices of a row are
separated by "," and rows end with "\n" (LLaVA-UHD's separators; ILLUME's are unpublished). Every view
counts as an image. Generation and editing records keep one view per image, as `Illume.edit` shows
its source (an edit's target is drawn over the source's one grid).

Images are numbered in order of appearance; slot cells are `image * cells_per_image + cell`
(see models/mllm.py), and the discrete cells are filled with codes inside the train step by the
frozen vision tokenizer, so the pipeline only decodes and resizes pixels. Rows are not packed
(one conversation per row, right-padded): image counts per row stay fixed and small. Records
longer than the sequence length are skipped and counted (a truncated image block teaches
nothing but malformed layouts).
"""
from __future__ import annotations

import json
import re
from typing import Any, Sequence

import numpy as np

from illume_jax.data import chat
from illume_jax.data import images as images_lib
from illume_jax.data.tfds_builders import decode_image
from illume_jax.models import mllm

IMAGE = "<image>"
T2I_UNCOND = "Generate a random image of {resolution_tag}\n"
EDIT_UNCOND = "{resolution_tag}<image>\nReconstruct the image according to the given image\n"
RECONSTRUCT = EDIT_UNCOND  # ILLUME's stage-1 reconstruction task uses the same wording
_SPLIT = re.compile(r"(<image>|<height_\d+>|<width_\d+>)")
TAG = "{resolution_tag}"


def t2i_prompt(prompt: str) -> str:
    """The official text-to-image user turn (spec §3.5)."""
    return f"Generate an image of {TAG}, the content of image is {prompt}\n"


def edit_prompt(instruction: str) -> str:
    return f"{TAG}<image>\nPlease edit the image according to the instruction: {instruction}\n"


class Assembler:
    """Turns conversations into (ids, slots, cells, loss mask) with image blocks in place."""

    def __init__(self, tokenizer, template: str, cfg: mllm.MLLMConfig, resolution: int | tuple[int, int]):
        """`resolution`: the side of every image block, or its (height, width) (an aspect anchor)."""
        self.tokenizer, self.template, self.cfg = tokenizer, template, cfg
        self.size = (resolution, resolution) if isinstance(resolution, int) else tuple(int(x) for x in resolution)
        self.grids = cfg.grids(*self.size)
        self.cells = cfg.cells_per_image(*self.size)
        self.blocks = {c: mllm.block_template(self.grids, cfg.vocab, continuous=c) for c in (False, True)}
        self.tag = f"<height_{self.size[0]}><width_{self.size[1]}>"

    def _encode(self, text: str, discrete: bool, counter: list[int], tag_images: bool, views=()):
        ids, slots, cells = [], [], []
        v = self.cfg.vocab

        def text_piece(piece: str):
            got = self.tokenizer.encode(piece)
            ids.extend(got)
            slots.extend([mllm.SLOT_TEXT] * len(got))
            cells.extend([0] * len(got))

        def block():
            t = self.blocks[not discrete]
            k = counter[0]
            counter[0] += 1
            per = np.where((t.slots == mllm.SLOT_SEM_IN) | (t.slots == mllm.SLOT_SEM_OUT), self.cells[0],
                           self.cells[1])
            ids.extend(t.ids.clip(0).tolist())
            slots.extend(t.slots.tolist())
            cells.extend(np.where(t.slots == mllm.SLOT_TEXT, 0, t.cells + k * per).tolist())

        for part in _SPLIT.split(text.replace(TAG, self.tag)):
            if not part:
                continue
            if part == IMAGE:
                if tag_images or discrete:
                    ids += [v.height_tag(self.size[0]), v.width_tag(self.size[1])]
                    slots += [mllm.SLOT_TEXT] * 2
                    cells += [0, 0]
                rows, cols = views[counter[1]] if not discrete and counter[1] < len(views) else (1, 1)
                counter[1] += not discrete
                block()   # the image, or with slices its global view
                if (rows, cols) != (1, 1):
                    for r in range(rows):
                        for c in range(cols):
                            block()
                            text_piece("," if c < cols - 1 else "\n")
            elif m := re.fullmatch(r"<(height|width)_(\d+)>", part):
                ids.append(v.height_tag(int(m[2])) if m[1] == "height" else v.width_tag(int(m[2])))
                slots.append(mllm.SLOT_TEXT)
                cells.append(0)
            else:
                text_piece(part)
        return ids, slots, cells

    def render(self, turns: Sequence[dict], *, add_generation_prompt: bool = False,
               views: Sequence[tuple[int, int]] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """-> (ids, slots, cells, loss mask), all [L]. With `add_generation_prompt` the turns end
        with a human turn and the assistant's opening is appended (an inference prompt). `views`: the
        slice grid (rows, cols) of each continuous (human-turn) image in order (data/anyres.py
        `slice_grid`; (1, 1) or absent: the image alone); its views take consecutive image indices."""
        tag_images = any(t["from"] == "gpt" and IMAGE in t["value"] for t in turns)
        eos = "</s>"
        pieces = chat._pieces(self.template, list(turns), eos)
        if add_generation_prompt and pieces and pieces[-1][1]:
            raise ValueError("add_generation_prompt: the conversation must end with a human turn")
        ids = [] if self.tokenizer.bos_id is None or self.tokenizer.bos_id < 0 else [self.tokenizer.bos_id]
        slots, cells, mask = [0] * len(ids), [0] * len(ids), [0.0] * len(ids)
        counter = [0, 0]   # image indices used; continuous images seen
        for text, trained in pieces:
            if text == eos:
                i, s, c = [self.tokenizer.eos_id], [0], [0]
            else:
                i, s, c = self._encode(text, trained, counter, tag_images, views)
            ids += i
            slots += s
            cells += c
            mask += [1.0 if trained else 0.0] * len(i)
        return (np.asarray(ids, np.int32), np.asarray(slots, np.int32), np.asarray(cells, np.int32),
                np.asarray(mask, np.float32))

    def num_images(self, turns: Sequence[dict]) -> int:
        return sum(t["value"].count(IMAGE) for t in turns)


def continuous_images(turns: Sequence[dict]) -> list[bool]:
    """For each `<image>` in order of appearance: True where it is a continuous input (a human turn's)."""
    return [t["from"] != "gpt" for t in turns for _ in range(t["value"].count(IMAGE))]


def model_views(image: np.ndarray, size: int, max_slices: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A uint8 image [H,W,3] -> (views [V,size,size,3] in [-1,1], slice grid): the image alone (centre-fit to
    size x size, as every image is without slicing) when `max_slices` is 0 or the image is no larger than
    one view, else its global view + slices (data/anyres.py)."""
    from illume_jax.data import anyres
    if max_slices > 0:
        grid = anyres.slice_grid(image.shape[0], image.shape[1], size, max_slices)
        if grid != (1, 1):
            views, grid = anyres.image_views(image, size, max_slices)
            return images_lib.to_model_range(views), grid   # float [0, 255] views: the same map as uint8
    return images_lib.to_model_range(images_lib.fit_resolution(image, size))[None], (1, 1)


def cfg_dropout_turns(task: str, turns: list[dict]) -> tuple[list[dict], bool]:
    """The unconditional version of a generation record (spec §5.3); (turns, images_to_source)."""
    if task == "t2i":
        return [{"from": "human", "value": T2I_UNCOND}, turns[1]], False
    if task == "edit":
        return [{"from": "human", "value": EDIT_UNCOND}, turns[1]], True
    return turns, False


class MultimodalExample:
    """A Grain random-map: record -> one padded training row (or None when it does not fit).

    Output (T = seq_len, M = max_images):
      tokens, targets [T] int32; loss_mask [T] f32; segment_ids (1 real, 0 padding), positions [T];
      sources [T] int32 (the record's mixture `source` on real tokens: data/pipeline.tag_source);
      token_slots, token_cells, target_slots, target_cells [T] int32; images [M,S,S,3] f32 in [-1,1].
    """

    def __init__(self, tokenizer, template: str, cfg: mllm.MLLMConfig, resolution: int, seq_len: int,
                 max_images: int, cfg_dropout: float = 0.0, anyres_max_slices: int = 0):
        self.assembler = Assembler(tokenizer, template, cfg, resolution)
        self.seq_len, self.max_images, self.cfg_dropout = seq_len, max_images, cfg_dropout
        self.anyres_max_slices = anyres_max_slices   # > 0: human images larger than a view are sliced
        self.resolution = resolution
        self.skipped = {"too_long": 0, "too_many_images": 0, "bad_image": 0, "bad_record": 0}

    def __call__(self, record: dict, rng: np.random.Generator) -> dict | None:
        try:
            turns = json.loads(record["conversations"])
            task = record["task"].decode() if isinstance(record["task"], bytes) else str(record["task"])
            images = list(record["images"])
        except (KeyError, ValueError, TypeError):
            self.skipped["bad_record"] += 1
            return None
        if self.cfg_dropout > 0 and task in ("t2i", "edit") and rng.random() < self.cfg_dropout:
            turns, to_source = cfg_dropout_turns(task, turns)
            if to_source:
                images = [images[0], images[0]]
        n = self.assembler.num_images(turns)
        if n > self.max_images or n > len(images):
            self.skipped["too_many_images"] += 1
            return None
        S = self.resolution
        kinds = continuous_images(turns)
        slices = self.anyres_max_slices if all(kinds) else 0   # understanding records only (module doc)
        views, grids = [], []
        for k, continuous in enumerate(kinds):
            try:
                img = decode_image(images[k]) if isinstance(images[k], (bytes, np.bytes_)) else np.asarray(images[k])
                v, grid = model_views(img, S, slices if continuous else 0)
            except Exception:  # noqa: BLE001 - any undecodable image skips the record, counted
                self.skipped["bad_image"] += 1
                return None
            views.append(v)
            if continuous:
                grids.append(grid)
        if sum(len(v) for v in views) > self.max_images:   # slices made more views than a row holds
            self.skipped["too_many_images"] += 1
            return None
        try:
            ids, slots, cells, mask = self.assembler.render(turns, views=grids)
        except (chat.SkipRecord, ValueError):
            self.skipped["bad_record"] += 1
            return None
        if len(ids) > self.seq_len + 1:
            self.skipped["too_long"] += 1
            return None
        pix = np.zeros((self.max_images, S, S, 3), np.float32)
        if views:
            flat = np.concatenate(views)
            pix[:len(flat)] = flat
        T = self.seq_len
        L = len(ids) - 1
        pad = lambda a, dtype: np.pad(a, (0, T - len(a))).astype(dtype)
        return dict(tokens=pad(ids[:-1], np.int32), targets=pad(ids[1:], np.int32),
                    loss_mask=pad(mask[1:], np.float32), segment_ids=pad(np.ones(L), np.int32),
                    positions=pad(np.arange(L), np.int32), sources=pad(np.full(L, int(record.get("source", 0))), np.int32),
                    token_slots=pad(slots[:-1], np.int32), token_cells=pad(cells[:-1], np.int32),
                    target_slots=pad(slots[1:], np.int32), target_cells=pad(cells[1:], np.int32),
                    images=pix)


MULTIMODAL_KEYS = ("token_slots", "token_cells", "target_slots", "target_cells", "images")


def check_stage_fits_images(config: Any, stage_index: int, mcfg: mllm.MLLMConfig) -> None:
    """Raise when a stage's rows cannot hold the image blocks its tasks need. Every record that
    does not fit is skipped, so without this a too-short `seq_len` (say, a config sized for a
    16x16 tokenizer given a 32x32 one) would filter out every record and hang the iterator."""
    from illume_jax.train.state import stage_resolution
    stage = config.stages[stage_index]
    res = stage_resolution(config, stage_index)
    block = mllm.block_length(mcfg.grids(res, res))
    tasks = set()
    for name in stage.mixture:
        ds = config.data.datasets.get(name)
        if ds is not None and not ds.get("text_only", False):  # text_only rows hold no image
            tasks |= set(ds.get("tasks", ()))
    if not tasks and all(config.data.datasets.get(n, {}).get("text_only", False) for n in stage.mixture):
        return
    images = 2 if tasks & {"edit", "recon"} else 1
    if int(stage.seq_len) < images * block + 1:
        raise ValueError(
            f"stage {stage.name!r}: seq_len {stage.seq_len} cannot hold {images} image block(s) of {block} "
            f"tokens ({res}x{res} images through the tokenizer's {mcfg.grids(res, res)} code grids, tasks "
            f"{sorted(tasks) or 'unknown'}); every such record would be skipped. Raise the stage's seq_len "
            f"to at least {images * block + 1} plus the text (configs/illume_tiny.py: pixel_grid= must match "
            f"the tokenizer)")


def make_multimodal_iterator(config: Any, stage_index: int, tokenizer, data_dir: str, *, seed: int,
                             process_index: int = 0, process_count: int = 1, sources: dict | None = None):
    """Stage batches of `MultimodalExample` rows from the stage's mixture (data/pipeline.py).
    A checkpointable Grain iterator."""
    import grain

    from illume_jax.data.pipeline import _seed, mixture_dataset
    from illume_jax.train.state import model_config, stage_resolution
    stage = config.stages[stage_index]
    ds, _ = mixture_dataset(config, stage_index, data_dir, seed=seed, process_index=process_index,
                            process_count=process_count, sources=sources)
    v = config.vision
    mcfg = model_config(config)
    check_stage_fits_images(config, stage_index, mcfg)
    example = MultimodalExample(tokenizer, config.tokenizer.chat_template, mcfg,
                                stage_resolution(config, stage_index), int(stage.seq_len), int(v.max_images),
                                float(stage.get("cfg_dropout", 0.0)), int(v.get("anyres_max_slices", 0)))
    ds = ds.random_map(example, seed=_seed("cfg-dropout", seed)).filter(lambda x: x is not None)
    it = ds.to_iter_dataset().batch(stage.global_batch_size // process_count, drop_remainder=True)
    workers = int(config.data.num_workers)
    if workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(it)
