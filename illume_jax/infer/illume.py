"""The user-facing API: `Illume.load(workdir)` -> `.understand()`, `.generate()`, `.edit()`.

    from illume_jax import Illume
    model = Illume.load("runs/illume_tiny")
    images = model.generate(["a red circle left of a blue square"], seed=0)   # PIL images
    answers = model.understand([image], ["Is there a red circle in the image?"])
    edited = model.edit([image], ["make the red circle green"])

Prompts follow the official wordings (spec §3.5, data/multimodal.py). Generation and editing
sample with the per-row interleaved processor and CFG rows (infer/interleaved.py) — the prompt
ends with the resolution tags and `<start_of_image>`, so every row makes exactly one image block
and stops. Images are decoded with the vision tokenizer's own pixel decoder, or by a trained
diffusion decoder (`Illume.load(..., diffusion_decoder=DIR)`, 2x resolution), or by a pixel decoder
retrained on the same codes (`Illume.load(..., pixel_decoder=TOKENIZER_RUN)`). Editing pads the
source to its nearest aspect anchor with white (official inference), generates at that anchor
and crops + resizes the result back to the source's size.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from illume_jax.data import images as images_lib
from illume_jax.data import multimodal
from illume_jax.data.tokenizers import answer_first_tokens
from illume_jax.infer import interleaved as il
from illume_jax.infer.module_jit import module_jit
from illume_jax.models import mllm
from illume_jax.modules.quantizers import Buffer


def pad_to_anchor(image: np.ndarray, anchors: Sequence[tuple[int, int]]) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Official inference-time AspectRatioCrop: the anchor (h, w) with the closest aspect ratio
    (ties: closest area), LANCZOS resize to fit inside it, white padding. Returns (padded uint8
    [h,w,3], box (top, left, height, width) of the image inside the padding)."""
    from PIL import Image
    h, w = image.shape[:2]
    ratio = w / h
    ah, aw = min(anchors, key=lambda a: (abs(a[1] / a[0] - ratio), (a[0] * a[1] - h * w) ** 2))
    scale = min(ah / h, aw / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.LANCZOS))
    out = np.full((ah, aw, 3), 255, np.uint8)
    top, left = (ah - nh) // 2, (aw - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out, (top, left, nh, nw)


def unpad_and_resize(image: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Inverse of `pad_to_anchor`: crop the box, resize to (h, w) = size."""
    from PIL import Image
    top, left, nh, nw = box
    crop = image[top:top + nh, left:left + nw]
    if crop.shape[:2] == tuple(size):
        return crop
    return np.asarray(Image.fromarray(crop).resize((size[1], size[0]), Image.LANCZOS))


# Variables a decoder-only retraining may change: everything else turns images into codes or codes
# into the decoder's input, so it decides what a generated code means.
_DECODER_ONLY = "pixel_decoder/"


def tokenizer_variables(tokenizer) -> dict[str, np.ndarray]:
    """{path: value} of a DualViTok's parameters and buffers (codebooks included)."""
    from illume_jax.train.optim import path_str
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(tokenizer, nnx.Any(nnx.Param, Buffer)))[0]
    return {path_str(p): np.asarray(v) for p, v in flat}


def check_same_codes(own: dict[str, np.ndarray], other: dict[str, np.ndarray], other_name: str,
                     own_name: str) -> None:
    """Raises ValueError unless `other` (a tokenizer's variables) equals `own` outside the pixel
    decoder, i.e. unless an image block of the model's codes decodes to the same features there."""
    for path in sorted(set(own) | set(other)):
        if path.startswith(_DECODER_ONLY):
            continue
        a, b = own.get(path), other.get(path)
        if a is None or b is None:
            what = f"missing in {other_name if b is None else own_name}"
        elif a.shape != b.shape:
            what = f"shape {b.shape} vs {a.shape}"
        elif not np.array_equal(a, b):
            what = "different values"
        else:
            continue
        raise ValueError(
            f"{other_name}: its tokenizer differs from {own_name} outside the pixel decoder, at {path!r} "
            f"({what}), so the model's codes would mean something else there. Expected a run that "
            "retrained only the pixel decoder: train-tokenizer --config.model_init.weights_from=<the "
            "model's tokenizer> \"--config.train.trainable=('pixel_decoder/.*',)\"")


class Illume:
    """A trained MLLM (any stage's checkpoint) with its text and vision tokenizers."""

    def __init__(self, config, model: mllm.MLLM, text_tokenizer, vision_tokenizer, mesh, decoder=None,
                 pixel_decoder_dir: str | None = None):
        self.config, self.model, self.text_tokenizer = config, model, text_tokenizer
        self.vision_tokenizer, self.mesh = vision_tokenizer, mesh
        self.cfg: mllm.MLLMConfig = model.cfg
        self.resolution = int(config.vision.resolution)
        self.assembler = multimodal.Assembler(text_tokenizer, config.tokenizer.chat_template, self.cfg,
                                              self.resolution)
        self._assemblers = {self.assembler.size: self.assembler}
        # Editing pads its source to the nearest of these (h, w); generation draws at any of them (`size=`).
        self.anchors = [tuple(int(x) for x in a) for a in config.vision.get("anchors", ())] or \
            [(self.resolution, self.resolution)]
        self.anyres_max_slices = int(config.vision.get("anyres_max_slices", 0))
        # (min, max) pixels: understanding images keep their aspect (ILLUME+'s stage 3: 32²..768²); () square.
        self.understand_pixels = tuple(int(x) for x in config.vision.get("understand_pixels", ()))
        self.eos_id = int(text_tokenizer.eos_id)
        if self.cfg.levels == 1:  # a semantic VQ (ILLUME): codes of one level, no pixel codes
            self._decode = module_jit(lambda m, s, p: m.decode(s))
            self._code_map = module_jit(lambda m, s, p: m.reconstruct_features(s))
        else:
            self._decode = module_jit(lambda m, s, p: m.decode(s, p))
            self._code_map = module_jit(lambda m, s, p: m.code_map(s, p))
        self._encode = module_jit(mllm.tokenizer_codes)
        self.decoder = decoder  # (DecoderTrainer, DecoderState) of a trained diffusion decoder, or None
        self.pixel_decoder_dir = pixel_decoder_dir  # the tokenizer run whose pixel decoder replaced the model's

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, workdir: str, *, step: int | None = None, diffusion_decoder: str | None = None,
             pixel_decoder: str | None = None) -> "Illume":
        """From a `train` workdir (latest checkpoint unless `step`) or a converted MLLM folder
        (`python -m illume_jax convert --kind=mllm`). `diffusion_decoder`: a `train-decoder` workdir
        or a converted SDXL decoder; generated and edited images are then decoded by it (2x the
        token resolution, spec §2) instead of the tokenizer's pixel decoder. `pixel_decoder`: a
        `train-tokenizer` workdir that retrained only the pixel decoder of the model's own tokenizer
        (`train.trainable=('pixel_decoder/.*',)` from `model_init.weights_from`); its decoder then
        draws the images. The model's codes mean the same there: every other tokenizer variable
        must be equal (`check_same_codes`), so no retraining of the MLLM is needed."""
        from illume_jax import sharding
        from illume_jax.data.tokenizers import load_or_train_tokenizer
        from illume_jax.train import checkpoint as ckpt_lib
        from illume_jax.train import state as state_lib
        from illume_jax.train.tokenizer import load_tokenizer, saved_config
        from illume_jax.convert import weights
        workdir = os.path.abspath(workdir)
        mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
        if weights.is_converted(workdir):  # official weights converted by `python -m illume_jax convert`
            kind = weights.info(workdir)["kind"]
            if kind != "mllm":
                raise ValueError(f"{workdir} holds converted {kind!r} weights, not an MLLM")
            config = weights.read_config(workdir)
            graphdef, _, abs_state = state_lib.abstract_state(config, len(config.stages) - 1, mesh)
            params = state_lib.load_converted_params(workdir, abs_state.params, True)
            model = nnx.merge(graphdef, params)
        else:
            if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # (the Checkpointer would create it)
                raise ValueError(f"no checkpoint in {workdir}/checkpoints: train the model first")
            ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
            step = ckpt.latest_step() if step is None else step
            if step is None:
                ckpt.close()
                raise ValueError(f"no checkpoint in {workdir}/checkpoints: train the model first")
            meta = ckpt.restore_meta(step)
            config = state_lib.config_from_meta(meta)
            if "vision" not in config:
                ckpt.close()
                raise ValueError(f"{workdir} holds a text-only model (its config has no vision block)")
            graphdef, _, abs_state = state_lib.abstract_state(config, meta["stage_index"], mesh)
            state = ckpt.restore_fields(step, abs_state, ("step", "params"))  # no optimizer state
            ckpt.close()
            model = nnx.merge(graphdef, state.params)
        text_tok = load_or_train_tokenizer(config, workdir)
        tok_dir = config.vision.tokenizer_workdir
        vision, _, _ = load_tokenizer(saved_config(tok_dir), tok_dir, mesh)
        if pixel_decoder:
            pixel_decoder = os.path.abspath(pixel_decoder)
            other_config = saved_config(pixel_decoder)
            if other_config is None:
                raise ValueError(f"pixel_decoder={pixel_decoder!r}: no tokenizer checkpoint there (expected a "
                                 "train-tokenizer workdir that retrained the pixel decoder of the model's tokenizer)")
            other, _, _ = load_tokenizer(other_config, pixel_decoder, mesh)
            check_same_codes(tokenizer_variables(vision), tokenizer_variables(other),
                             f"pixel_decoder={pixel_decoder!r}", f"the model's tokenizer {tok_dir!r}")
            vision = other
        decoder = None
        if diffusion_decoder:
            from illume_jax.train.decoder import load_decoder
            decoder = load_decoder(diffusion_decoder, mesh)
        return cls(config, model, text_tok, vision, mesh, decoder, pixel_decoder_dir=pixel_decoder or None)

    # -- prompt building -----------------------------------------------------------------------
    def _prompt(self, user: str, *, suffix: Sequence[int] = (), views: Sequence[tuple[int, int]] = (),
                size: tuple[int, int] | None = None):
        """A user turn's prompt row; `size` (h, w): its images' blocks and `{resolution_tag}` at that anchor."""
        size = self.assembler.size if size is None else tuple(size)
        if size not in self._assemblers:   # one per anchor / understanding shape met (block templates inside)
            self._assemblers[size] = multimodal.Assembler(self.text_tokenizer, self.config.tokenizer.chat_template,
                                                          self.cfg, size)
        ids, slots, cells, _ = self._assemblers[size].render([{"from": "human", "value": user}], views=views)
        if suffix:
            ids = np.concatenate([ids, np.asarray(suffix, np.int32)])
            slots = np.concatenate([slots, np.zeros(len(suffix), np.int32)])
            cells = np.concatenate([cells, np.zeros(len(suffix), np.int32)])
        return ids, slots, cells

    def _batch(self, rows, images: np.ndarray | None) -> il.Prompts:
        """Left-padded prompt rows (ids, slots, cells) and their images [R,M,H,W,3] -> `Prompts`; with
        `source_copy` also the images' tokenizer codes at their cells (what the model copies)."""
        P = max(len(r[0]) for r in rows)
        pad = lambda a: np.concatenate([np.zeros(P - len(a), np.int32), a.astype(np.int32)])  # noqa: E731
        slots = jnp.asarray(np.stack([pad(r[1]) for r in rows]))
        cells = jnp.asarray(np.stack([pad(r[2]) for r in rows]))
        codes = None
        if images is not None and self.cfg.source_copy:
            R, M = images.shape[:2]
            sem, pix = self._encode(self.vision_tokenizer, jnp.asarray(images).reshape(R * M, *images.shape[2:]))
            codes = mllm.input_codes(slots, cells, sem.reshape(R, -1), pix.reshape(R, -1))
        return il.Prompts(tokens=jnp.asarray(np.stack([pad(r[0]) for r in rows])),
                          mask=jnp.asarray(np.stack([pad(np.ones(len(r[0]), np.int32)) for r in rows])),
                          slots=slots, cells=cells, images=None if images is None else jnp.asarray(images),
                          codes=codes)

    def _image_batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Checked uint8 images -> [N, 1, S, S, 3] in the model's range (one image per row)."""
        S = self.resolution
        return np.stack([images_lib.to_model_range(images_lib.fit_resolution(im, S)) for im in images])[:, None]

    def _understand_size(self, image: np.ndarray) -> tuple[int, int] | None:
        """The (h, w) an understanding image is shown at with `vision.understand_pixels`, else None (square)."""
        if not self.understand_pixels:
            return None
        size = images_lib.native_size(*image.shape[:2], NATIVE_FACTOR, *self.understand_pixels)
        if 0 in (d for grid in self.cfg.grids(*size) for d in grid):
            raise ValueError(f"understand: an image of {image.shape[0]}x{image.shape[1]} pixels is too thin for the "
                             f"tower at its own aspect ({size[0]}x{size[1]} gives code grids {self.cfg.grids(*size)})")
        return size

    def _question_groups(self, images: Sequence[np.ndarray], questions: Sequence[str]):
        """[(indices, prompt rows, images)]: the questions' rows grouped by the shape their image is shown at
        (one group unless `vision.understand_pixels` keeps each image's aspect)."""
        sizes = [self._understand_size(im) for im in images]
        groups = []
        for size in dict.fromkeys(sizes):
            idx = [i for i, s in enumerate(sizes) if s == size]
            groups.append((idx, *self._question_rows([images[i] for i in idx], [questions[i] for i in idx], size)))
        return groups

    def _question_rows(self, images: Sequence[np.ndarray], questions: Sequence[str],
                       size: tuple[int, int] | None = None):
        """(prompt rows, images [N, V, S, S, 3]) of understanding questions, one image each. With
        `vision.anyres_max_slices` > 0 an image larger than one view is shown as its global view + slices
        (data/anyres.py); rows with fewer views are padded with blank ones, which no slot reads. `size`
        (h, w): every image resized to it, one view each (`vision.understand_pixels`)."""
        if size is not None:
            rows = [self._prompt(f"<image>\n{q}", size=size) for q in questions]
            return rows, np.stack([images_lib.to_model_range(images_lib.resize(im, size)) for im in images])[:, None]
        S = self.resolution
        views = [multimodal.model_views(im, S, self.anyres_max_slices) for im in images]
        rows = [self._prompt(f"<image>\n{q}", views=[grid]) for (_, grid), q in zip(views, questions)]
        V = max(len(v) for v, _ in views)
        pix = np.zeros((len(views), V, S, S, 3), np.float32)
        for i, (v, _) in enumerate(views):
            pix[i, :len(v)] = v
        return rows, pix

    def _image_prefix(self, size: tuple[int, int] | None = None) -> list[int]:
        """The drawn block's opening: its resolution tags and SOI (`size` (h, w): the square resolution if None)."""
        size = size or (self.resolution, self.resolution)
        v = self.cfg.vocab
        return [v.height_tag(size[0]), v.width_tag(size[1]), v.soi]

    def _row_state(self, n: int, size: tuple[int, int] | None = None) -> il.RowState:
        (h1, w1), (h2, w2) = self.cfg.grids(*(size or (self.resolution, self.resolution)))
        return il.RowState.start(np.tile([h1, w1, h2, w2], (n, 1)), True, True, phase=il.EXPECT_SOL0)

    def check_size(self, size, what: str = "size") -> tuple[int, int]:
        """(h, w) of an image to draw: multiples of vision.tag_step up to vision.max_side (it needs its tags)."""
        step, top = self.cfg.vocab.tag_step, self.cfg.vocab.max_side
        if size is None:
            return self.resolution, self.resolution
        try:
            h, w = (int(x) for x in size)
        except (TypeError, ValueError):
            raise ValueError(f"{what}={size!r}: expected (height, width)") from None
        if h % step or w % step or not (step <= h <= top and step <= w <= top):
            raise ValueError(f"{what}={size!r}: expected a height and width that are multiples of {step} from {step} "
                             f"to {top} (the resolution tags); this model's anchors are {self.anchors}")
        return h, w

    def _to_images(self, tokens: np.ndarray, size: tuple[int, int] | None = None) -> list[np.ndarray]:
        size = size or (self.resolution, self.resolution)
        grids = self.cfg.grids(*size)
        sem, pix = zip(*[mllm.parse_block(np.concatenate([[self.cfg.vocab.soi], row]), grids, self.cfg.vocab)
                         for row in tokens])
        sem, pix = jnp.asarray(np.stack(sem)), jnp.asarray(np.stack(pix))
        if self.decoder is not None:
            trainer, state = self.decoder
            feats = self._code_map(self.vision_tokenizer, sem, pix)
            return list(trainer.decode_features(state, feats, size))
        out = self._decode(self.vision_tokenizer, sem, pix)
        return [images_lib.to_uint8(x) for x in np.asarray(out)]

    def _sample_images(self, cond_rows, uncond_rows, images, sampling: il.Sampling, seed: int,
                       size: tuple[int, int]) -> list[np.ndarray]:
        n = len(cond_rows)
        use_cfg = sampling.guidance_scale != 1.0
        rows = cond_rows + (uncond_rows if use_cfg else [])
        if images is not None and use_cfg:
            images = np.concatenate([images, images])
        block = mllm.block_length(self.cfg.grids(*size))
        tokens, _ = il.generate(self.model, self._batch(rows, images), self._row_state(n, size), jax.random.key(seed),
                                vocab=self.cfg.vocab, sampling=sampling, max_new_tokens=block - 1,
                                eos_id=self.eos_id, pad_id=0)
        return self._to_images(np.asarray(tokens), size)

    # -- tasks -----------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], *, seed: int = 0, sampling: il.Sampling | None = None,
                 batch_size: int = 8, progress: bool = False, size: tuple[int, int] | None = None) -> list[np.ndarray]:
        """Text-to-image -> uint8 [H,W,3] images, one per prompt. `size` (h, w): the model's square resolution by
        default; ILLUME+ draws at its 11 aspect anchors (`self.anchors`), the official evaluation's sizes."""
        sampling = sampling or il.Sampling.for_task("t2i")
        size = self.check_size(size, "generate: size")
        uncond = self._prompt(multimodal.T2I_UNCOND, suffix=self._image_prefix(size), size=size)
        out = []
        for start in _progress(range(0, len(prompts), batch_size), progress, len(prompts), batch_size, "generate"):
            chunk = prompts[start:start + batch_size]
            cond = [self._prompt(multimodal.t2i_prompt(p), suffix=self._image_prefix(size), size=size) for p in chunk]
            out += self._sample_images(cond, [uncond] * len(chunk), None, sampling, seed + start, size)
        return out

    def edit(self, images: Sequence[np.ndarray], instructions: Sequence[str], *, seed: int = 0,
             sampling: il.Sampling | None = None, batch_size: int = 8, progress: bool = False) -> list[np.ndarray]:
        """Edits each image by its instruction; results have the input's size (uint8 [H,W,3])."""
        if len(images) != len(instructions):
            raise ValueError(f"edit: {len(images)} images but {len(instructions)} instructions")
        sampling = sampling or il.Sampling.for_task("edit")
        out = []
        for start in _progress(range(0, len(images), batch_size), progress, len(images), batch_size, "edit"):
            chunk = [_check_image(im, f"images[{start + i}]") for i, im in enumerate(images[start:start + batch_size])]
            padded, boxes = zip(*[pad_to_anchor(im, self.anchors) for im in chunk])
            texts = instructions[start:start + batch_size]
            results = [None] * len(chunk)
            # One sampling call per anchor among the chunk's sources (a call's images share one shape).
            for size in dict.fromkeys(p.shape[:2] for p in padded):
                idx = [i for i, p in enumerate(padded) if p.shape[:2] == size]
                pix = np.stack([images_lib.to_model_range(padded[i]) for i in idx])[:, None]
                cond = [self._prompt(multimodal.edit_prompt(texts[i]), suffix=self._image_prefix(size), size=size)
                        for i in idx]
                uncond = [self._prompt(multimodal.EDIT_UNCOND, suffix=self._image_prefix(size), size=size)] * len(idx)
                for i, r in zip(idx, self._sample_images(cond, uncond, pix, sampling, seed + start, size)):
                    results[i] = r
            for r, p, box, im in zip(results, padded, boxes, chunk):
                f = r.shape[0] // p.shape[0]   # 2 when a diffusion decoder super-resolves
                out.append(unpad_and_resize(r, tuple(v * f for v in box), im.shape[:2]))
        return out

    def understand(self, images: Sequence[np.ndarray], questions: Sequence[str], *, max_new_tokens: int = 32,
                   sampling: il.Sampling | None = None, seed: int = 0, batch_size: int = 16,
                   progress: bool = False) -> list[str]:
        """Answers one question per image (greedy by default); image tokens are masked out."""
        if len(images) != len(questions):
            raise ValueError(f"understand: {len(images)} images but {len(questions)} questions")
        sampling = sampling or il.Sampling.for_task("understand")
        S = self.resolution
        grids = self.cfg.grids(S, S)   # no image is drawn: the row state's grids are never read
        known = getattr(self.text_tokenizer, "vocab_size", self.cfg.vocab.first_id)
        answers = [""] * len(images)
        for start in _progress(range(0, len(images), batch_size), progress, len(images), batch_size, "understand"):
            chunk = [_check_image(im, f"images[{start + i}]") for i, im in enumerate(images[start:start + batch_size])]
            for idx, rows, pix in self._question_groups(chunk, questions[start:start + batch_size]):
                state = il.RowState.start(np.tile([*grids[0], *grids[1]], (len(rows), 1)), False, True)
                tokens, _ = il.generate(self.model, self._batch(rows, pix), state, jax.random.key(seed + start),
                                        vocab=self.cfg.vocab, sampling=sampling, max_new_tokens=max_new_tokens,
                                        eos_id=self.eos_id, pad_id=0)
                for i, row in zip(idx, np.asarray(tokens)):
                    ids = row.tolist()
                    if self.eos_id in ids:
                        ids = ids[:ids.index(self.eos_id)]
                    answers[start + i] = self.text_tokenizer.decode([t for t in ids if 0 < t < known]).strip()
        return answers

    def answer_logprobs(self, images: Sequence[np.ndarray], questions: Sequence[str], answers: Sequence[str], *,
                        batch_size: int = 16, progress: bool = False) -> np.ndarray:
        """log p(each candidate answer's first token) as the reply to each (image, question):
        [N, len(answers)]. Scores what `understand` would say without decoding it, e.g. the yes/no
        margin of an existence question (an AUC above 0.5 means the model reads the question even
        when its greedy answer is one constant)."""
        if len(images) != len(questions):
            raise ValueError(f"answer_logprobs: {len(images)} images but {len(questions)} questions")
        first = answer_first_tokens(self.text_tokenizer, answers, "answer_logprobs")
        out = np.zeros((len(images), len(answers)), np.float32)
        for start in _progress(range(0, len(images), batch_size), progress, len(images), batch_size, "score"):
            chunk = [_check_image(im, f"images[{start + i}]") for i, im in enumerate(images[start:start + batch_size])]
            for idx, rows, pix in self._question_groups(chunk, questions[start:start + batch_size]):
                lp = il.next_text_logprobs(self.model, self._batch(rows, pix), text_size=self.cfg.vocab.first_id)
                out[[start + i for i in idx]] = np.asarray(lp)[:, first]
        return out


# Sides of an understanding image kept at its own aspect are multiples of this: the pixel encoder's
# downsampling (the official processor's smart-resize factor, spec §5.2).
NATIVE_FACTOR = 16


def _check_image(image, name: str) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8:
        raise ValueError(f"{name}: expected a uint8 RGB image [H, W, 3] (np.asarray(pil_image.convert('RGB'))), "
                         f"got {a.dtype} {a.shape}")
    return a


def _progress(it, enabled: bool, total: int, step: int, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm
    return tqdm(it, total=-(-total // step), desc=desc, unit="batch")
