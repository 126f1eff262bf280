"""The unified MLLM of ILLUME+ (spec §3): continuous image input, discrete image output.

Three pieces, one file because they only make sense together:

* `ImageVocab` — the token-id layout of the added vocabulary (spec §3.2): 7 structure tokens,
  height/width resolution tags, then the level-0 (semantic) and level-1 (pixel) codes, all after
  the text vocabulary. With the official sizes it reproduces the official ids exactly
  (`<start_of_image>` = 151665, level-0 codes from 151704, level-1 codes from 184472, 282776 ids).
* The image-block builder — one skeleton for both directions (spec §3.3 / §3.4):
  SOI, SOL0, h1 rows of w1 cells each followed by EOL, EOL0, SOL1, h2 rows of w2 cells + EOL,
  EOL1, EOI. Every position is a fixed structure id or a *slot*; a slot is either a continuous
  feature (understanding input: projected ViT / pixel-encoder features) or a discrete code
  (generation output: the code id is the token). `block_template` describes a block once;
  data assembly, the generation-time state machine and output parsing all use it.
* `MLLM` — the LLM (models/llm.py) + `DualVisionTower` (the tokenizer's Qwen2-VL ViT and MoVQ
  pixel encoder, features before quantisation) + `MixedProjector` (two 2-layer GELU MLPs).
  `embed(...)` splices projected features into the token embeddings at their slots; the rest is
  the plain LLM, so cached decoding (`LLM.decode`) works unchanged on the spliced embeddings.

The original ILLUME path (arXiv 2412.06673) is the same model with one level: its tokenizer is the
semantic VQ (models/semantic_vq.py), so `MLLMConfig.tokenizer` is a `SemanticVQConfig`, the vocabulary
has no pixel codes, a block is SOI, SOL0, h rows of w codes + EOL, EOL0, EOI (`block_template` with an
empty pixel grid; ILLUME's own added-token layout is unpublished, so it keeps ILLUME+'s structure ids
and tags: a documented choice), the tower is the tokenizer's CLIP-style ViT (`SemanticVisionTower`)
and the projector is one 2-layer GELU MLP, the paper's adapter (`MixedProjector` without its pixel
branch). High-resolution understanding (up to 9 slices + a global view, data/anyres.py) shows each view
as its own block.

Token arrays carry two companions of the same shape: `slots` (what each position is, SLOT_*)
and `cells` (for a slot: image index within the row x cells per image + raster cell index).
Discrete code slots hold placeholder ids until `fill_codes` writes the codes the frozen
tokenizer produced, so the data pipeline never has to run the tokenizer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from illume_jax.models import dualvitok as dvt
from illume_jax.models import movq, vit
from illume_jax.models.semantic_vq import SemanticVQConfig, clip_vit_tokens
from illume_jax.models.llm import LLM, LLMConfig
from illume_jax.modules.linear import Dense
from illume_jax.sharding import constrain

# What a sequence position holds.
SLOT_TEXT = 0        # an ordinary token id (text, structure token, resolution tag)
SLOT_SEM_IN = 1      # a projected semantic (ViT merger) feature: continuous input
SLOT_PIX_IN = 2      # a projected pixel-encoder feature: continuous input
SLOT_SEM_OUT = 3     # a level-0 (semantic) code token: discrete output
SLOT_PIX_OUT = 4     # a level-1 (pixel) code token: discrete output

# Ids of the 7 structure tokens, as offsets from `ImageVocab.first_id` (spec §3.2 order).
SOI, EOI, EOL, SOL0, EOL0, SOL1, EOL1 = range(7)


@dataclasses.dataclass(frozen=True)
class ImageVocab:
    """Ids of ILLUME+'s added tokens, appended after `first_id` text ids (spec §3.2)."""
    first_id: int = 151665          # = the text tokenizer's length (Qwen2.5: 151,665)
    semantic_codes: int = 32768
    pixel_codes: int = 98304
    tag_step: int = 64              # resolution tags <height_64> .. <height_1024>
    max_side: int = 1024

    @property
    def num_tags(self) -> int:
        return self.max_side // self.tag_step

    def structure(self, which: int) -> int:
        return self.first_id + which

    @property
    def soi(self) -> int:
        return self.first_id + SOI

    @property
    def eoi(self) -> int:
        return self.first_id + EOI

    @property
    def eol(self) -> int:
        return self.first_id + EOL

    def height_tag(self, h: int) -> int:
        return self.first_id + 6 + self._tag_index("height", h)

    def width_tag(self, w: int) -> int:
        return self.first_id + 6 + self.num_tags + self._tag_index("width", w)

    def _tag_index(self, what: str, v: int) -> int:
        if v % self.tag_step or not self.tag_step <= v <= self.max_side:
            raise ValueError(f"image {what} {v}: resolution tags exist for multiples of {self.tag_step} "
                             f"in [{self.tag_step}, {self.max_side}]")
        return v // self.tag_step

    def tag_value(self, token: int) -> tuple[str, int] | None:
        """('height' | 'width', pixels) for a resolution-tag id, else None."""
        k = token - self.first_id - 6
        if 1 <= k <= self.num_tags:
            return "height", k * self.tag_step
        if self.num_tags + 1 <= k <= 2 * self.num_tags:
            return "width", (k - self.num_tags) * self.tag_step
        return None

    @property
    def level0_start(self) -> int:
        return self.first_id + 7 + 2 * self.num_tags

    @property
    def level1_start(self) -> int:
        return self.level0_start + self.semantic_codes

    @property
    def end(self) -> int:
        """One past the last added id (the tokenizer length: 282,776 official)."""
        return self.level1_start + self.pixel_codes

    def is_image_token(self, ids):
        """Any id of the added vocabulary (structure, tag or code); numpy or jnp arrays."""
        return (ids >= self.first_id) & (ids < self.end)


@dataclasses.dataclass(frozen=True)
class BlockTemplate:
    """One image block: `ids` (structure ids; slots hold -1), `slots` (SLOT_TEXT for structure
    tokens, SLOT_SEM_* / SLOT_PIX_* for cells) and `cells` (raster cell index within its level)."""
    grids: tuple[tuple[int, int], tuple[int, int]]
    ids: np.ndarray
    slots: np.ndarray
    cells: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def block_template(grids: Sequence[Sequence[int]], vocab: ImageVocab, *, continuous: bool) -> BlockTemplate:
    """The block for semantic grid (h1, w1) and pixel grid (h2, w2) (spec §3.3/§3.4). A pixel grid of
    (0, 0) is the one-level block of the ILLUME path: SOI, SOL0, rows + EOL, EOL0, EOI."""
    (h1, w1), (h2, w2) = (tuple(int(v) for v in g) for g in grids)
    if min(h1, w1) < 1 or min(h2, w2) < 0 or (h2 == 0) != (w2 == 0):
        raise ValueError(f"image block grids {grids}: expected a semantic grid of at least 1x1 and a pixel grid "
                         f"of at least 1x1, or (0, 0) for a one-level (ILLUME) block")
    ids, slots, cells = [], [], []

    def fixed(which):
        ids.append(vocab.structure(which))
        slots.append(SLOT_TEXT)
        cells.append(0)

    def level(h, w, start, end, slot):
        fixed(start)
        for r in range(h):
            for c in range(w):
                ids.append(-1)
                slots.append(slot)
                cells.append(r * w + c)
            fixed(EOL)
        fixed(end)

    fixed(SOI)
    level(h1, w1, SOL0, EOL0, SLOT_SEM_IN if continuous else SLOT_SEM_OUT)
    if h2:
        level(h2, w2, SOL1, EOL1, SLOT_PIX_IN if continuous else SLOT_PIX_OUT)
    fixed(EOI)
    return BlockTemplate(((h1, w1), (h2, w2)), np.asarray(ids, np.int32), np.asarray(slots, np.int32),
                         np.asarray(cells, np.int32))


def block_length(grids: Sequence[Sequence[int]]) -> int:
    (h1, w1), (h2, w2) = grids
    if h2 == 0:  # one level (ILLUME)
        return 4 + h1 * (w1 + 1)
    return 6 + h1 * (w1 + 1) + h2 * (w2 + 1)


def block_ids(template: BlockTemplate, semantic_codes: np.ndarray, pixel_codes: np.ndarray,
              vocab: ImageVocab) -> np.ndarray:
    """A discrete block as plain token ids (the text form of spec §3.4)."""
    (h1, w1), (h2, w2) = template.grids
    if np.shape(semantic_codes) != (h1, w1) or np.shape(pixel_codes) != (h2, w2):
        raise ValueError(f"codes: expected semantic {h1}x{w1} and pixel {h2}x{w2} grids, got "
                         f"{np.shape(semantic_codes)} and {np.shape(pixel_codes)}")
    out = template.ids.copy()
    sem = template.slots == SLOT_SEM_OUT
    pix = template.slots == SLOT_PIX_OUT
    out[sem] = np.asarray(semantic_codes).reshape(-1)[template.cells[sem]] + vocab.level0_start
    out[pix] = np.asarray(pixel_codes).reshape(-1)[template.cells[pix]] + vocab.level1_start
    return out


def parse_block(ids: Sequence[int], grids, vocab: ImageVocab) -> tuple[np.ndarray, np.ndarray]:
    """Generated ids starting at `<start_of_image>` -> (semantic [h1,w1], pixel [h2,w2]) codes.

    Raises ValueError naming the first position that breaks the layout (the jitted sampler's
    masks make this impossible; it guards against ids from elsewhere)."""
    t = block_template(grids, vocab, continuous=False)
    ids = np.asarray(ids, np.int64)
    if len(ids) < len(t):
        raise ValueError(f"image block: {len(ids)} tokens, expected {len(t)} for grids {t.grids}")
    ids = ids[:len(t)]
    fixed = t.slots == SLOT_TEXT
    bad = np.nonzero(fixed & (ids != t.ids))[0]
    sem = t.slots == SLOT_SEM_OUT
    pix = t.slots == SLOT_PIX_OUT
    bad_sem = np.nonzero(sem & ((ids < vocab.level0_start) | (ids >= vocab.level1_start)))[0]
    bad_pix = np.nonzero(pix & ((ids < vocab.level1_start) | (ids >= vocab.end)))[0]
    for where in (bad, bad_sem, bad_pix):
        if len(where):
            i = int(where[0])
            raise ValueError(f"image block: position {i} holds id {int(ids[i])}, which breaks the layout "
                             f"(expected {'structure id ' + str(int(t.ids[i])) if fixed[i] else 'a code id'})")
    (h1, w1), (h2, w2) = t.grids
    return ((ids[sem] - vocab.level0_start).reshape(h1, w1).astype(np.int32),
            (ids[pix] - vocab.level1_start).reshape(h2, w2).astype(np.int32))


def _codes_at(codes: jax.Array, slots: jax.Array, cells: jax.Array, slot: int) -> jax.Array:
    """codes [B, M*n] gathered at the `slot` positions' cells -> [B,T] (0 elsewhere, and everywhere when
    the level has no codes: the pixel level of a one-level model)."""
    if codes.shape[1] == 0:
        return jnp.zeros(slots.shape, codes.dtype)
    idx = jnp.where(slots == slot, cells, 0)
    return jnp.take_along_axis(codes, jnp.clip(idx, 0, codes.shape[1] - 1), axis=1)


def fill_codes(tokens: jax.Array, slots: jax.Array, cells: jax.Array, semantic_codes: jax.Array,
               pixel_codes: jax.Array, vocab: ImageVocab) -> jax.Array:
    """Writes code ids into the discrete slots. tokens/slots/cells [B,T]; codes [B, M*n] (the
    row's M images flattened in order, so `cells` = image * n + cell)."""
    sem = _codes_at(semantic_codes, slots, cells, SLOT_SEM_OUT) + vocab.level0_start
    pix = _codes_at(pixel_codes, slots, cells, SLOT_PIX_OUT) + vocab.level1_start
    return jnp.where(slots == SLOT_SEM_OUT, sem, jnp.where(slots == SLOT_PIX_OUT, pix, tokens)).astype(tokens.dtype)


def input_codes(slots: jax.Array, cells: jax.Array, semantic_codes: jax.Array, pixel_codes: jax.Array) -> jax.Array:
    """The tokenizer's code of every continuous image cell: slots/cells [B,T], codes [B, M*n] as
    `fill_codes` takes them -> [B,T] int32, the code (within its level) at SLOT_SEM_IN / SLOT_PIX_IN
    positions, -1 elsewhere. What `source_copy` copies from (`source_code_targets`)."""
    return jnp.where(slots == SLOT_SEM_IN, _codes_at(semantic_codes, slots, cells, SLOT_SEM_IN),
                     jnp.where(slots == SLOT_PIX_IN, _codes_at(pixel_codes, slots, cells, SLOT_PIX_IN),
                               -1)).astype(jnp.int32)


def noisy_code_inputs(tokens: jax.Array, slots: jax.Array, vocab: ImageVocab, rate: float, rng: jax.Array
                      ) -> jax.Array:
    """tokens [B,T] with each discrete code *input* (SLOT_SEM_OUT / SLOT_PIX_OUT positions) replaced, with
    probability `rate`, by a uniformly drawn code of its level; the targets stay the true codes. Why
    (`vision.code_noise`, not official): teacher-forced, the tiny editor with `source_copy` copies a kept
    code at 0.8-0.96, yet drawn (greedy) it leaves the source's code at kept background cells in runs
    and copies no kept object ("A copy path for edits"). Trained on contexts with wrong codes, it might
    learn not to trust them (scheduled-sampling style; at 0.2 it did not: same section)."""
    k_mask, k_sem, k_pix = jax.random.split(rng, 3)
    hit = jax.random.uniform(k_mask, tokens.shape) < rate
    sem = vocab.level0_start + jax.random.randint(k_sem, tokens.shape, 0, vocab.semantic_codes)
    pix = vocab.level1_start + jax.random.randint(k_pix, tokens.shape, 0, vocab.pixel_codes)
    out = jnp.where(hit & (slots == SLOT_SEM_OUT), sem, tokens)
    return jnp.where(hit & (slots == SLOT_PIX_OUT), pix, out).astype(tokens.dtype)


# -- model ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MLLMConfig:
    llm: LLMConfig
    # The tower reuses its encoders and the grids come from it: DualViTok (ILLUME+, two levels) or the
    # semantic VQ (ILLUME, one level).
    tokenizer: dvt.DualViTokConfig | SemanticVQConfig
    vocab: ImageVocab
    # ViT blocks below this index get no gradient (official stage 3: tune_vit_from_layer=16).
    vit_trainable_from: int = 0
    # Cells per side each image token's projector reads (`neighbourhoods`); 1 is the official projector.
    projector_window: int = 1
    # Not official: a learned (level, row, column) embedding added where the model reads or draws an
    # image cell (`CellEmbedding`); False is the official model (no such parameter).
    cell_embedding: bool = False
    # Not official: where the model draws a code, learned vectors of the codes already drawn above it
    # (above-left, above, above-right in its level) are added (`NeighbourCodeEmbedding`); False is the
    # official model (no such parameter).
    neighbour_codes: bool = False
    # Not official: where the model draws a pixel (level-1) code, a learned vector of the semantic code
    # it drew over that cell is added (`ParentCodeEmbedding`); False is the official model.
    parent_codes: bool = False
    # Not official: where the model draws a code of cell (level, r, c) after a continuous image of the same
    # conversation (an edit's source, a reconstruction's input), a learned projection of that image's
    # cell (level, r, c) is added (`SourceCellProjection`); False is the official model.
    source_cells: bool = False
    # Not official: where the model draws the code of cell (level, r, c) after a continuous image of the
    # same conversation, the logit of that image's own code at (level, r, c) gets a learned, hidden-state
    # dependent bonus (`SourceCodeCopy`, a pointer-generator style copy); False is the official model.
    source_copy: bool = False
    # Not official, with source_copy: the copy is a mixture (the source's code gets at least a learned
    # share g of the probability, `add_copy_mixture`), not a bonus on its logit.
    copy_mixture: bool = False

    def __post_init__(self):
        for name in ("cell_embedding", "neighbour_codes", "parent_codes", "source_cells", "source_copy",
                     "copy_mixture"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config.vision.{name}={getattr(self, name)!r}: expected True or False")
        if self.parent_codes and self.levels == 1:
            raise ValueError("config.vision.parent_codes=True needs a two-level tokenizer (DualViTok): a semantic VQ "
                             "model draws no pixel codes to give a parent")
        if self.copy_mixture and not self.source_copy:
            raise ValueError("config.vision.copy_mixture=True needs config.vision.source_copy=True (it says how "
                             "the copy path combines with the head)")
        if isinstance(self.projector_window, bool) or not isinstance(self.projector_window, int) \
                or self.projector_window < 1 or self.projector_window % 2 == 0:
            raise ValueError(f"config.vision.projector_window={self.projector_window!r}: expected an odd int >= 1 "
                             f"(cells per side around each image token)")
        if self.vocab.first_id != self.llm.text_vocab_size:
            raise ValueError(f"the image vocabulary starts at {self.vocab.first_id} but config.model.text_vocab_size "
                             f"is {self.llm.text_vocab_size}; they must be equal")
        if self.vocab.end > self.llm.vocab_size:
            raise ValueError(f"config.model.vocab_size={self.llm.vocab_size} is too small for the image vocabulary "
                             f"(needs >= {self.vocab.end} = {self.llm.text_vocab_size} text + "
                             f"{self.vocab.end - self.vocab.first_id} added ids)")
        if (self.vocab.semantic_codes, self.vocab.pixel_codes) != self.codebook_sizes:
            raise ValueError(f"image vocabulary codes ({self.vocab.semantic_codes}, {self.vocab.pixel_codes}) differ "
                             f"from the tokenizer's codebooks {self.codebook_sizes}")

    @property
    def levels(self) -> int:
        """Code levels per image block: 2 for ILLUME+ (DualViTok), 1 for ILLUME (semantic VQ)."""
        return 1 if isinstance(self.tokenizer, SemanticVQConfig) else 2

    @property
    def codebook_sizes(self) -> tuple[int, int]:
        """(semantic, pixel) codes of the tokenizer; pixel 0 for a one-level one."""
        if self.levels == 1:
            return self.tokenizer.num_codes, 0
        return self.tokenizer.semantic_codes, self.tokenizer.pixel_codes

    @classmethod
    def create(cls, llm_config: Any, tokenizer_config: Any, *, vit_trainable_from: int = 0,
               projector_window: int = 1, cell_embedding: bool = False, neighbour_codes: bool = False,
               parent_codes: bool = False, source_cells: bool = False, source_copy: bool = False,
               copy_mixture: bool = False, tag_step: int = 64, max_side: int = 1024) -> "MLLMConfig":
        llm = llm_config if isinstance(llm_config, LLMConfig) else LLMConfig.from_config(llm_config)
        tok = tokenizer_config
        if not isinstance(tok, (dvt.DualViTokConfig, SemanticVQConfig)):
            kind = dict(tok).get("kind", "dualvitok")
            if kind not in ("dualvitok", "semantic_vq"):
                raise ValueError(f"the MLLM's tokenizer config has kind={kind!r}: expected 'dualvitok' (ILLUME+) or "
                                 f"'semantic_vq' (ILLUME)")
            tok = (SemanticVQConfig if kind == "semantic_vq" else dvt.DualViTokConfig).from_config(tok)
        sem, pix = (tok.num_codes, 0) if isinstance(tok, SemanticVQConfig) else (tok.semantic_codes, tok.pixel_codes)
        vocab = ImageVocab(first_id=llm.text_vocab_size, semantic_codes=sem, pixel_codes=pix, tag_step=tag_step,
                           max_side=max_side)
        return cls(llm=llm, tokenizer=tok, vocab=vocab, vit_trainable_from=vit_trainable_from,
                   projector_window=projector_window, cell_embedding=cell_embedding,
                   neighbour_codes=neighbour_codes, parent_codes=parent_codes, source_cells=source_cells,
                   source_copy=source_copy, copy_mixture=copy_mixture)

    def grids(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(semantic, pixel) code grids of an h x w image; the pixel grid is (0, 0) with one level (the
        semantic VQ resizes every image to its ViT's input: one grid whatever h and w)."""
        if self.levels == 1:
            return (self.tokenizer.grid, self.tokenizer.grid), (0, 0)
        return dvt.token_grids(h, w, self.tokenizer)

    def cells_per_image(self, h: int, w: int) -> tuple[int, int]:
        (h1, w1), (h2, w2) = self.grids(h, w)
        return h1 * w1, h2 * w2

    @property
    def cell_table_side(self) -> int:
        """Rows / columns the cell embedding covers: the longest grid side of the largest image."""
        return max(max(g) for g in self.grids(self.vocab.max_side, self.vocab.max_side))


class MLP2(nnx.Module):
    """Linear -> GELU (erf, torch's default) -> Linear: one branch of the official MixedProjector."""

    def __init__(self, d_in: int, d_out: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.fc1 = Dense((d_in,), (d_out,), axes=(None, "mlp"), use_bias=True, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Dense((d_out,), (d_out,), axes=("mlp", "embed"), use_bias=True, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class DualVisionTower(nnx.Module):
    """The tokenizer's encoders before quantisation (spec §3.3): Qwen2-VL ViT merger features
    (hidden_size wide) and MoVQ encoder z (z_channels wide, before `pixel_quant_conv`)."""

    def __init__(self, cfg: dvt.DualViTokConfig, *, trainable_from: int = 0, rngs: nnx.Rngs):
        self.cfg = cfg
        self.trainable_from = trainable_from
        self.vit = vit.Qwen2VisionTransformer(cfg.vit, rngs=rngs)
        self.pixel_encoder = movq.MoVQEncoder(cfg.pixel_encoder, rngs=rngs)

    def semantic_features(self, images: jax.Array) -> jax.Array:
        """images [N,H,W,3] in [-1,1] -> the ViT merger's features [N,h1*w1,hidden]."""
        c = self.cfg.vit
        size = dvt.semantic_input_size(images.shape[1], images.shape[2], c.patch_size * c.spatial_merge_size)
        x = dvt.scale_for_vit(images, size)
        patches, positions, _ = vit.patchify_qwen2(x, c.patch_size, c.temporal_patch_size, c.spatial_merge_size)
        return self.vit(patches.astype(jnp.dtype(c.dtype)), positions, trainable_from=self.trainable_from)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [N,H,W,3] in [-1,1] -> (semantic [N,h1*w1,hidden], pixel [N,h2*w2,z])."""
        pix = self.pixel_encoder(images)
        return self.semantic_features(images), pix.reshape(pix.shape[0], -1, pix.shape[-1])


class SemanticVisionTower(nnx.Module):
    """ILLUME's tower: the semantic VQ's CLIP-style ViT, its patch-token features before the tokenizer's
    normalisation and quantiser ([N, g*g, hidden], g = the VQ's grid). Same interface as
    `DualVisionTower`, with no pixel features."""

    def __init__(self, cfg: SemanticVQConfig, *, trainable_from: int = 0, rngs: nnx.Rngs):
        self.cfg = cfg
        self.trainable_from = trainable_from
        self.vit = vit.ClipVisionTransformer(cfg.vit, rngs=rngs)

    def semantic_features(self, images: jax.Array) -> jax.Array:
        """images [N,H,W,3] in [-1,1] -> [N, g*g, hidden] (resized to the ViT's input size)."""
        return clip_vit_tokens(self.vit, images, self.cfg.image_size, trainable_from=self.trainable_from)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, None]:
        return self.semantic_features(images), None


def neighbourhoods(x: jax.Array, h: int, w: int, k: int) -> jax.Array:
    """x [N, h*w, C] (a raster grid of cells) -> [N, h*w, k*k*C]: each cell's k x k neighbours (k odd), in
    raster order, zeros outside the grid. k=1 returns x.

    Why: a ShapeComp object's shape is a pattern over several cells; one cell of the tiny towers names it
    at about chance while naming its colour at ~0.9 (README, "Shape is in no single image token"). The
    LLM finds an object by colour in one token, so it reads shape only if that token carries it. A
    locality-preserving projector (Honeybee's C-Abstractor is the convolutional version) puts it there."""
    if k == 1:
        return x
    n, c = x.shape[0], x.shape[-1]
    r = k // 2
    grid = jnp.pad(x.reshape(n, h, w, c), ((0, 0), (r, r), (r, r), (0, 0)))
    parts = [grid[:, dy:dy + h, dx:dx + w] for dy in range(k) for dx in range(k)]
    return jnp.concatenate(parts, axis=-1).reshape(n, h * w, k * k * c)


class MixedProjector(nnx.Module):
    """The official two-branch projector (a GELU MLP per branch). window > 1 (not official) feeds each branch
    the window x window cells around every token (`neighbourhoods`): fc1 is then window² times wider.
    pixel_dim 0: no pixel branch -- ILLUME's adapter, one GELU MLP on the ViT features."""

    def __init__(self, semantic_dim: int, pixel_dim: int, d_model: int, *, dtype, param_dtype, rngs: nnx.Rngs,
                 window: int = 1):
        self.semantic = MLP2(semantic_dim * window ** 2, d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pixel = (MLP2(pixel_dim * window ** 2, d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                      if pixel_dim else None)


def cell_coordinates(slots: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """slots [B,T] -> (level, row, col) [B,T] int32 of every image-cell position: level 0 semantic,
    1 pixel, -1 for anything else (row and col are then 0). Read from the slots alone: a cell's
    column is how many cells of its row precede it (rows are runs of cells, broken by EOL), its row how
    many runs of its level precede it in its image; a level begins where the cells' level changes."""
    B, T = slots.shape
    level = jnp.where((slots == SLOT_SEM_IN) | (slots == SLOT_SEM_OUT), 0,
                      jnp.where((slots == SLOT_PIX_IN) | (slots == SLOT_PIX_OUT), 1, -1)).astype(jnp.int32)
    is_cell = level >= 0
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    shift = lambda a, fill: jnp.concatenate([jnp.full_like(a[:, :1], fill), a[:, :-1]], axis=1)  # noqa: E731
    col = idx - jax.lax.cummax(jnp.where(is_cell, -1, idx), axis=1) - 1
    run_start = is_cell & ~shift(is_cell, False)
    last_cell = shift(jax.lax.cummax(jnp.where(is_cell, idx, -1), axis=1), -1)  # the cell before, if any
    prev_level = jnp.where(last_cell >= 0, jnp.take_along_axis(level, jnp.maximum(last_cell, 0), axis=1), -1)
    runs = jnp.cumsum(run_start, axis=1, dtype=jnp.int32)
    first_run = jax.lax.cummax(jnp.where(run_start & (level != prev_level), runs, 0), axis=1)
    row = runs - first_run
    return level, jnp.where(is_cell, row, 0), jnp.where(is_cell, col, 0)


def _ahead(a: jax.Array, fill) -> jax.Array:
    """[B,T] -> each position's next value along T (`fill` past the end)."""
    return jnp.concatenate([a[:, 1:], jnp.full_like(a[:, :1], fill)], axis=1)


def _take(a: jax.Array, i: jax.Array) -> jax.Array:
    """a[b, i[b, t]] with the indices clipped into [0, T)."""
    return jnp.take_along_axis(a, jnp.clip(i, 0, a.shape[1] - 1), axis=1)


def cell_embedding_targets(slots: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """slots [B,T] -> (level, row, col) [B,T] that `CellEmbedding` adds at each position: a continuous
    input cell's own coordinates, and at the position that predicts a discrete code, the coordinates
    of that code (the cell the model is about to draw). Elsewhere level is -1. Generation adds the
    same from its per-row counters (infer/interleaved.py `next_cell`). One table for both, so a cell
    being drawn and the same cell of an edit's source image carry the same vector."""
    level, row, col = cell_coordinates(slots)
    nxt = _ahead(slots, SLOT_TEXT)
    draws = (nxt == SLOT_SEM_OUT) | (nxt == SLOT_PIX_OUT)
    reads = (slots == SLOT_SEM_IN) | (slots == SLOT_PIX_IN)
    pick = lambda own, fill: jnp.where(reads, own, jnp.where(draws, _ahead(own, fill), fill))  # noqa: E731
    return pick(level, -1), pick(row, 0), pick(col, 0)


class CellEmbedding(nnx.Module):
    """Learned row and column vectors per level (not in the official model). Why: with 1-D RoPE a
    small model has to work out a code's column as (offset mod row length); the tiny model's hidden
    states name it at 0.28 against a chance of 0.06 (README, "What holds GenEval-style and editing
    down"). Here the cell is given, not inferred. (Measured: the model then knows it at 0.92 and draws
    no better; README, "Told where it draws".)"""

    def __init__(self, side: int, d_model: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = nnx.with_partitioning(nnx.initializers.normal(0.02), (None, None, "embed"))
        self.rows = nnx.Param(init(rngs.params(), (2, side, d_model), param_dtype))
        self.cols = nnx.Param(init(rngs.params(), (2, side, d_model), param_dtype))
        self.dtype = dtype

    def __call__(self, level: jax.Array, row: jax.Array, col: jax.Array) -> jax.Array:
        """level/row/col [...] int -> [..., D]; zero where level < 0."""
        side = self.rows.shape[1]
        lv = jnp.clip(level, 0, 1)
        e = (self.rows[...][lv, jnp.clip(row, 0, side - 1)] + self.cols[...][lv, jnp.clip(col, 0, side - 1)])
        return jnp.where((level >= 0)[..., None], e, 0).astype(self.dtype)


# Columns of the row above whose codes `NeighbourCodeEmbedding` adds: above-left, above, above-right.
NEIGHBOUR_OFFSETS = (-1, 0, 1)


def neighbour_code_targets(tokens: jax.Array, slots: jax.Array, vocab: ImageVocab
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """tokens/slots [B,T] (discrete slots holding their code ids) -> (level [B,T], codes [B,T,3],
    valid [B,T,3]): at each position that predicts a discrete code of cell (r, c), that code's level
    and the codes of its level already drawn at (r-1, c-1), (r-1, c), (r-1, c+1); valid is False off
    the grid, on the first row and wherever no code is predicted (level -1 there). Generation reads
    the same from its per-row code buffer (infer/interleaved.py `next_neighbour_codes`).

    Layout facts used: a level is rows of w codes each followed by an EOL, so the cell above (r, c)
    sits w + 1 positions before it, and the row above ends 2 + c positions before it."""
    B, T = slots.shape
    level, row, col = cell_coordinates(slots)
    nxt = _ahead(slots, SLOT_TEXT)
    draws = (nxt == SLOT_SEM_OUT) | (nxt == SLOT_PIX_OUT)
    lv, r, c = _ahead(level, -1), _ahead(row, 0), _ahead(col, 0)
    q = jnp.arange(T, dtype=jnp.int32)[None, :] + 1            # the position of the code drawn next
    last_above = q - c - 2                                      # the last cell of the row above
    w = _take(col, last_above) + 1
    row_ok = draws & (r >= 1) & (last_above >= 0) & (_take(slots, last_above) == nxt)
    offsets = jnp.asarray(NEIGHBOUR_OFFSETS, jnp.int32)
    pos = (q - 1 - w)[..., None] + offsets                      # [B,T,3]
    cc = c[..., None] + offsets
    valid = row_ok[..., None] & (cc >= 0) & (cc < w[..., None])
    flat = lambda a: a.reshape(B, -1)  # noqa: E731
    ids = _take(tokens, flat(pos)).reshape(pos.shape)
    start = jnp.where(lv == 0, vocab.level0_start, vocab.level1_start)
    codes = jnp.where(valid, ids - start[..., None], 0)
    return jnp.where(draws, lv, -1), codes.astype(jnp.int32), valid


class NeighbourCodeEmbedding(nnx.Module):
    """A learned vector per (offset, code) of each level (not in the official model), added where the
    model draws a code for the codes already drawn above it (`NEIGHBOUR_OFFSETS`). Why: the tiny
    generator's pixel codes form object-sized clusters but of blob shape; a shape's outline is a
    pattern between a cell and the cells above it, 17 tokens back in the 1-D sequence, and the tiny
    LLM finds that cell poorly (README, "Told where it draws"). Here the causal neighbourhood is given
    at the input, as a PixelCNN's is. Zero-initialised: a model forked into it starts unchanged."""

    def __init__(self, semantic_codes: int, pixel_codes: int, d_model: int, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        init = nnx.with_partitioning(nnx.initializers.zeros, (None, None, "embed"))
        n = len(NEIGHBOUR_OFFSETS)
        self.level0 = nnx.Param(init(rngs.params(), (n, semantic_codes, d_model), param_dtype))
        self.level1 = nnx.Param(init(rngs.params(), (n, pixel_codes, d_model), param_dtype))
        self.dtype = dtype

    def __call__(self, level: jax.Array, codes: jax.Array, valid: jax.Array) -> jax.Array:
        """level [...], codes / valid [..., 3] -> [..., D]: the sum over valid neighbours; zero where
        level < 0."""
        k = jnp.arange(len(NEIGHBOUR_OFFSETS))
        e0 = self.level0[...][k, jnp.clip(codes, 0, self.level0.shape[1] - 1)]
        e1 = self.level1[...][k, jnp.clip(codes, 0, self.level1.shape[1] - 1)]
        e = jnp.where((level == 0)[..., None, None], e0, e1)
        keep = valid & (level >= 0)[..., None]
        return jnp.where(keep[..., None], e, 0).sum(axis=-2).astype(self.dtype)


def parent_cell(row, col, h1, w1, pixel_stride: int, semantic_stride: int):
    """The semantic (level-0) cell over pixel (level-1) cell (row, col): the one covering its image
    pixels, clipped to the h1 x w1 grid (the semantic grid may round). Strides in image pixels."""
    return (jnp.minimum(row * pixel_stride // semantic_stride, h1 - 1),
            jnp.minimum(col * pixel_stride // semantic_stride, w1 - 1))


def parent_code_targets(tokens: jax.Array, slots: jax.Array, vocab: ImageVocab, pixel_stride: int,
                        semantic_stride: int) -> tuple[jax.Array, jax.Array]:
    """tokens/slots [B,T] (discrete slots holding their code ids) -> (code [B,T], valid [B,T]): at each
    position that predicts a pixel (level-1) code, the semantic code the same block drew at the
    `parent_cell`; valid nowhere else. Generation reads it from its code buffer (infer/interleaved.py
    `next_parent_code`). Layout facts used: a block's level 0 (rows of w1 codes, each followed by an
    EOL) is complete before its level 1 begins."""
    B, T = slots.shape
    level, row, col = cell_coordinates(slots)
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    is0 = slots == SLOT_SEM_OUT
    first0 = jax.lax.cummax(jnp.where(is0 & (row == 0) & (col == 0), idx, -1), axis=1)  # this block's (0, 0)
    last0 = jax.lax.cummax(jnp.where(is0, idx, -1), axis=1)                             # its last semantic cell
    h1, w1 = _take(row, last0) + 1, _take(col, last0) + 1
    pr, pc = parent_cell(_ahead(row, 0), _ahead(col, 0), h1, w1, pixel_stride, semantic_stride)
    at = first0 + pr * (w1 + 1) + pc
    valid = (_ahead(slots, SLOT_TEXT) == SLOT_PIX_OUT) & (first0 >= 0) & (_take(slots, at) == SLOT_SEM_OUT)
    return jnp.where(valid, _take(tokens, at) - vocab.level0_start, 0).astype(jnp.int32), valid


class ParentCodeEmbedding(nnx.Module):
    """A learned vector per semantic code (not in the official model), added where the model draws a
    pixel code, for the semantic code it drew over that cell. Why: in real scenes a pixel cell under a
    semantic object cell holds an object code 5-6x as often as one under background; the tiny
    generator's pixel codes ignore its semantic codes (README, "Given the codes above"). Zero-initialised:
    a model forked into it starts unchanged."""

    def __init__(self, semantic_codes: int, d_model: int, *, pixel_stride: int, semantic_stride: int, dtype,
                 param_dtype, rngs: nnx.Rngs):
        init = nnx.with_partitioning(nnx.initializers.zeros, (None, "embed"))
        self.table = nnx.Param(init(rngs.params(), (semantic_codes, d_model), param_dtype))
        self.pixel_stride, self.semantic_stride = int(pixel_stride), int(semantic_stride)
        self.dtype = dtype

    def __call__(self, code: jax.Array, valid: jax.Array) -> jax.Array:
        """code / valid [...] -> [..., D], zero where not valid."""
        e = self.table[...][jnp.clip(code, 0, self.table.shape[0] - 1)]
        return jnp.where(valid[..., None], e, 0).astype(self.dtype)


def latest_source_blocks(slots: jax.Array) -> tuple[tuple[jax.Array, jax.Array, jax.Array], ...]:
    """slots [B,T] -> per level (0 semantic, 1 pixel) the running (first, h, w) [B,T] of the latest
    continuous image block of the row up to each position: the position of its cell (0, 0) and its grid
    (-1, 0, 0 before any). Only meaningful where that block is complete (after it)."""
    B, T = slots.shape
    _, row, col = cell_coordinates(slots)
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    out = []
    for slot in (SLOT_SEM_IN, SLOT_PIX_IN):
        first = jax.lax.cummax(jnp.where((slots == slot) & (row == 0) & (col == 0), idx, -1), axis=1)
        last = jax.lax.cummax(jnp.where(slots == slot, idx, -1), axis=1)
        seen = last >= 0
        out.append((first, jnp.where(seen, _take(row, last) + 1, 0), jnp.where(seen, _take(col, last) + 1, 0)))
    return tuple(out)


def source_cell_targets(slots: jax.Array, segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """slots [B,T] -> (src [B,T], valid [B,T]): at each position that predicts a discrete code of cell
    (level, r, c), the position of cell (level, r, c) of the latest continuous image before it in the
    same conversation (`segment_ids`, when rows are packed); valid only there and where that image's
    grid holds the cell. Generation keeps the same cells from its prompt (infer/interleaved.py
    `source_cells_from_prompt`, read by `next_source_cell`)."""
    level, row, col = cell_coordinates(slots)
    (f0, h0, w0), (f1, h1, w1) = latest_source_blocks(slots)
    nxt = _ahead(slots, SLOT_TEXT)
    draws = (nxt == SLOT_SEM_OUT) | (nxt == SLOT_PIX_OUT)
    lv, r, c = _ahead(level, -1), _ahead(row, 0), _ahead(col, 0)
    first, h, w = (jnp.where(lv == 0, a, b) for a, b in ((f0, f1), (h0, h1), (w0, w1)))
    src = first + r * (w + 1) + c
    valid = draws & (first >= 0) & (r < h) & (c < w)
    if segment_ids is not None:
        valid = valid & (_take(segment_ids, src) == segment_ids)
    return jnp.where(valid, src, 0), valid


class SourceCellProjection(nnx.Module):
    """A learned D x D map (not in the official model) of the embedding of the source image's cell
    (level, r, c), added where the model draws the code of cell (level, r, c) (`source_cell_targets`).
    Why: an edit keeps most of its source, but the tiny LLM must find each source cell among ~350 (1-D
    RoPE, the instruction's length between them) and does not: its edits are empty canvases at the
    official sampling (README, "Edits drawn over their source"). Here the cell is handed over in place,
    as an image editor conditioned by channel concatenation (InstructPix2Pix) sees it. Zero-initialised:
    a model forked into it starts unchanged."""

    def __init__(self, d_model: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.proj = Dense((d_model,), (d_model,), axes=(None, "embed"), dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs, init=nnx.initializers.zeros)

    def __call__(self, source: jax.Array, valid: jax.Array) -> jax.Array:
        """source [..., D] (embeddings of the source cells), valid [...] -> [..., D], zero where not valid."""
        return jnp.where(valid[..., None], self.proj(source), 0).astype(self.proj.dtype)


def source_code_targets(slots: jax.Array, codes: jax.Array, segment_ids: jax.Array | None = None
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """slots [B,T], codes [B,T] (`input_codes`) -> (level, code, valid) [B,T]: at each position that
    predicts a code of cell (level, r, c), the code (within the level) of the same cell of the latest
    continuous image before it in the same conversation (`source_cell_targets`). Generation reads the
    same from its prompt (infer/interleaved.py `source_cells_from_prompt` on the codes, `next_source_code`)."""
    src, valid = source_cell_targets(slots, segment_ids)
    level = _ahead(cell_coordinates(slots)[0], -1)
    code = _take(codes, src)
    valid = valid & (code >= 0)
    return jnp.where(valid, level, -1), jnp.where(valid, code, 0), valid


class SourceCodeCopy(nnx.Module):
    """A copy path (not in the official model): where the model draws cell (level, r, c) of an image
    after a continuous one (an edit's source), the logit of the source's own code of that cell gets
    `bonus` = w_level . x + 10 b_level, x the final-normed hidden state: the model learns where to copy
    (a kept cell) and where not (the edited object), not the map from a cell's latent to its code.
    Why: with a local tokenizer 77% of an edit's target codes are the source's, and the tiny editor
    still pays 2.0 nats for each kept object code with the source's cell handed over as a vector
    (`source_cells`; README, "A local pixel encoder"). A pointer-generator's copy, as for summaries.
    Linear in x, so CFG may guide the normed states before it (`infer/interleaved.py`). Zero-initialised:
    a model forked into it starts unchanged. The bias is scaled by 10 because Adam moves a parameter about
    one learning rate per step: at the stages' 3e-3 a plain bias would take ~1,000 steps to a few nats.
    With `mixture` (`copy_mixture`) the same w . x + 10 b is a gate's logit instead (`add_copy_mixture`)."""

    BIAS_SCALE = 10.0
    # With `mixture`, the bias starts here: a gate of sigmoid(-5) = 0.7%, so a fork starts almost unchanged.
    MIXTURE_START_BIAS = -0.5

    def __init__(self, d_model: int, *, param_dtype, rngs: nnx.Rngs, mixture: bool = False):
        del rngs   # zero-initialised
        self.mixture = mixture
        self.gate = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, ("embed", None))(
            jax.random.key(0), (d_model, 2), param_dtype))
        start = nnx.initializers.constant(self.MIXTURE_START_BIAS) if mixture else nnx.initializers.zeros
        self.bias = nnx.Param(nnx.with_partitioning(start, (None,))(jax.random.key(0), (2,), param_dtype))

    def __call__(self, x: jax.Array, level: jax.Array) -> jax.Array:
        """x [..., D] final-normed hidden states, level [...] (0/1; clipped) -> bonus [...] fp32 (with
        `mixture`: the gate's logit)."""
        lv = jnp.clip(level, 0, 1)
        w = self.gate[...].astype(jnp.float32)
        per_level = jnp.matmul(x.astype(jnp.float32), w) + self.BIAS_SCALE * self.bias[...].astype(jnp.float32)
        return jnp.take_along_axis(per_level, lv[..., None], axis=-1)[..., 0]

    def apply(self, logits: jax.Array, x: jax.Array, level: jax.Array, code: jax.Array, valid: jax.Array,
              vocab: "ImageVocab", start: jax.Array | int = 0) -> jax.Array:
        """logits [..., N] of ids [start, start + N) from the final-normed states x [..., D] -> the copy's
        logits: the bonus added at the source's code (`add_copy_bonus`), or with `mixture` the log-probs of
        the mixture (`add_copy_mixture`, this module's output as the gate's logit)."""
        out = self(x, level)
        combine = add_copy_mixture if self.mixture else add_copy_bonus
        return combine(logits, out, level, code, valid, vocab, start)


def _source_code_hit(logits, level, code, vocab, start):
    col = jnp.where(level == 0, vocab.level0_start, vocab.level1_start) + code - start
    return jnp.arange(logits.shape[-1], dtype=jnp.int32) == col[..., None]


def add_copy_mixture(logits: jax.Array, gate_logit: jax.Array, level: jax.Array, code: jax.Array,
                     valid: jax.Array, vocab: "ImageVocab", start: jax.Array | int = 0) -> jax.Array:
    """A pointer-generator's mixture: where `valid`, logits [..., N] of ids [start, start + N) become the
    log-probs of g * onehot(code) + (1 - g) * softmax(logits), g = sigmoid(`gate_logit`) [...]; elsewhere
    they are returned as they are. Why not a bonus (`add_copy_bonus`): a bonus is added to the head's logit,
    so the copy loses wherever the head, reading a drawn context that has departed from the source, favours
    another code; the mixture gives the source's code at least g whatever the head says (README, "A copy
    path for edits")."""
    logits = logits.astype(jnp.float32)
    g = gate_logit.astype(jnp.float32)[..., None]
    head = jax.nn.log_softmax(logits, axis=-1) + jax.nn.log_sigmoid(-g)
    mixed = jnp.where(_source_code_hit(logits, level, code, vocab, start),
                      jnp.logaddexp(head, jax.nn.log_sigmoid(g)), head)
    return jnp.where(valid[..., None], mixed, logits)


def add_copy_bonus(logits: jax.Array, bonus: jax.Array, level: jax.Array, code: jax.Array, valid: jax.Array,
                   vocab: "ImageVocab", start: jax.Array | int = 0) -> jax.Array:
    """logits [..., N] of ids [start, start + N) + `bonus` [...] at the id of `code` [...] of `level`
    [...] where `valid` [...] (ids outside the window get nothing). An iota compare, no scatter."""
    hit = _source_code_hit(logits, level, code, vocab, start)
    return logits + jnp.where(hit & valid[..., None], bonus[..., None], 0).astype(logits.dtype)


class MLLM(nnx.Module):
    """LLM + vision tower + projector. Parameter paths: `llm/...` (as models/llm.py),
    `vision/vit/...`, `vision/pixel_encoder/...`, `projector/{semantic,pixel}/fc{1,2}/...` (one level: no
    `vision/pixel_encoder`, no `projector/pixel`; `vision/vit` is then the CLIP-style ViT), and with
    `cell_embedding` `cell_embed/{rows,cols}`, with `neighbour_codes` `neighbour_embed/{level0,level1}`,
    with `parent_codes` `parent_embed/table`, with `source_cells` `source_embed/proj/kernel`, with
    `source_copy` `source_copy/{gate,bias}`."""

    def __init__(self, cfg: MLLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.llm = LLM(cfg.llm, rngs=rngs)
        if cfg.levels == 1:
            self.vision = SemanticVisionTower(cfg.tokenizer, trainable_from=cfg.vit_trainable_from, rngs=rngs)
            pixel_dim = 0
        else:
            self.vision = DualVisionTower(cfg.tokenizer, trainable_from=cfg.vit_trainable_from, rngs=rngs)
            pixel_dim = cfg.tokenizer.pixel_encoder.z_channels
        self.projector = MixedProjector(cfg.tokenizer.vit.hidden_size, pixel_dim, cfg.llm.d_model,
                                        dtype=cfg.llm.compute_dtype, param_dtype=cfg.llm.weight_dtype, rngs=rngs,
                                        window=cfg.projector_window)
        if cfg.cell_embedding:
            self.cell_embed = CellEmbedding(cfg.cell_table_side, cfg.llm.d_model, dtype=cfg.llm.compute_dtype,
                                            param_dtype=cfg.llm.weight_dtype, rngs=rngs)
        if cfg.neighbour_codes:
            self.neighbour_embed = NeighbourCodeEmbedding(cfg.vocab.semantic_codes, max(cfg.vocab.pixel_codes, 1),
                                                          cfg.llm.d_model, dtype=cfg.llm.compute_dtype,
                                                          param_dtype=cfg.llm.weight_dtype, rngs=rngs)
        if cfg.parent_codes:
            self.parent_embed = ParentCodeEmbedding(cfg.vocab.semantic_codes, cfg.llm.d_model,
                                                    pixel_stride=cfg.tokenizer.downsample,
                                                    semantic_stride=cfg.tokenizer.semantic_factor,
                                                    dtype=cfg.llm.compute_dtype, param_dtype=cfg.llm.weight_dtype,
                                                    rngs=rngs)
        if cfg.source_cells:
            self.source_embed = SourceCellProjection(cfg.llm.d_model, dtype=cfg.llm.compute_dtype,
                                                     param_dtype=cfg.llm.weight_dtype, rngs=rngs)
        if cfg.source_copy:
            self.source_copy = SourceCodeCopy(cfg.llm.d_model, param_dtype=cfg.llm.weight_dtype, rngs=rngs,
                                              mixture=cfg.copy_mixture)

    def image_features(self, images: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """images [B,M,H,W,3] -> projected (semantic [B, M*n0, D], pixel [B, M*n1, D] or None with one level)."""
        B, M = images.shape[:2]
        sem, pix = self.vision(images.reshape(B * M, *images.shape[2:]))
        sem, pix = self.project(sem, pix, images.shape[2], images.shape[3])
        return sem.reshape(B, -1, sem.shape[-1]), None if pix is None else pix.reshape(B, -1, pix.shape[-1])

    def project(self, sem: jax.Array, pix: jax.Array | None, height: int, width: int
                ) -> tuple[jax.Array, jax.Array | None]:
        """The tower's grids of height x width images (semantic [N,h1*w1,hidden], pixel [N,h2*w2,z] or None)
        -> the LLM's width, each token from its `projector_window` neighbourhood."""
        (h1, w1), (h2, w2) = self.cfg.grids(height, width)
        k, dtype = self.cfg.projector_window, self.cfg.llm.compute_dtype
        sem = self.projector.semantic(neighbourhoods(sem.astype(dtype), h1, w1, k))
        if pix is None:
            return sem, None
        return sem, self.projector.pixel(neighbourhoods(pix.astype(dtype), h2, w2, k))

    def embed(self, tokens: jax.Array, slots: jax.Array | None = None, cells: jax.Array | None = None,
              images: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
        """Token embeddings with projected image features spliced in at the continuous slots.
        tokens/slots/cells [B,T]; images [B,M,H,W,3] (M images per row, in slot order) or None;
        segment_ids [B,T] (packed rows) keep `source_cells` inside each conversation."""
        x = self.llm.embed_tokens(jnp.where(tokens < 0, 0, tokens))
        if images is not None and images.shape[1] > 0:
            sem, pix = self.image_features(images)

            def take(feats, slot):
                idx = jnp.clip(jnp.where(slots == slot, cells, 0), 0, feats.shape[1] - 1)
                return jnp.take_along_axis(feats, idx[..., None], axis=1)
            x = jnp.where((slots == SLOT_SEM_IN)[..., None], take(sem, SLOT_SEM_IN).astype(x.dtype), x)
            if pix is not None:
                x = jnp.where((slots == SLOT_PIX_IN)[..., None], take(pix, SLOT_PIX_IN).astype(x.dtype), x)
        if self.cfg.cell_embedding and slots is not None:
            x = x + self.cell_embed(*cell_embedding_targets(slots))
        if self.cfg.neighbour_codes and slots is not None:
            x = x + self.neighbour_embed(*neighbour_code_targets(tokens, slots, self.cfg.vocab))
        if self.cfg.parent_codes and slots is not None:
            pe = self.parent_embed
            x = x + pe(*parent_code_targets(tokens, slots, self.cfg.vocab, pe.pixel_stride, pe.semantic_stride))
        if self.cfg.source_cells and slots is not None:
            # Read from the embeddings above: no source cell is itself a position that draws a code.
            src, valid = source_cell_targets(slots, segment_ids)
            x = x + self.source_embed(jnp.take_along_axis(x, src[..., None], axis=1), valid)
        return constrain(x, "batch", "act_seq", "act_embed")

    def __call__(self, tokens: jax.Array, *, slots: jax.Array | None = None, cells: jax.Array | None = None,
                 images: jax.Array | None = None, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, codes: jax.Array | None = None) -> jax.Array:
        """-> logits [B,T,V] fp32 (discrete slots must already hold code ids: `fill_codes`). codes [B,T]:
        the tokenizer's codes of the continuous cells (`input_codes`), needed with `source_copy` when images
        are shown."""
        return self.logits_and_normed(tokens, slots=slots, cells=cells, images=images, positions=positions,
                                      segment_ids=segment_ids, codes=codes)[0]

    def logits_and_normed(self, tokens: jax.Array, *, slots=None, cells=None, images=None, positions=None,
                          segment_ids=None, codes=None) -> tuple[jax.Array, jax.Array]:
        """`__call__`'s logits and the final-normed hidden states [B,T,D] they come from (what
        `SourceCodeCopy` reads; probes need both from one forward)."""
        x = self.embed(tokens, slots, cells, images, segment_ids)
        normed = self.llm.final_norm(self.llm(inputs_embeds=x, positions=positions, segment_ids=segment_ids,
                                              return_hidden=True))
        logits = self.llm.head(normed)
        if not (self.cfg.source_copy and slots is not None) or (codes is None and images is None):
            return logits, normed   # nothing to copy
        if codes is None:
            raise ValueError("this MLLM has source_copy: pass codes= (mllm.input_codes of the images' tokenizer "
                             "codes) so it can copy the source's code of each cell it draws")
        level, code, valid = source_code_targets(slots, codes, segment_ids)
        return self.source_copy.apply(logits, normed, level, code, valid, self.cfg.vocab), normed


def tokenizer_codes(tokenizer, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images [N,H,W,3] -> (semantic [N,h1,w1], pixel [N,h2,w2]) codes of either tokenizer; a semantic VQ's
    pixel codes are [N, 0] (one level), so callers fill and copy codes the same way for both."""
    if isinstance(tokenizer.cfg, SemanticVQConfig):
        return tokenizer.encode(images), jnp.zeros((images.shape[0], 0), jnp.int32)
    return tokenizer.encode(images)


def tokenizer_tower(tokenizer) -> dict[str, nnx.State]:
    """The MLLM tower's parameters taken from a tokenizer, by submodule of `MLLM.vision`: DualViTok's ViT
    and pixel encoder (as the official DualVisionTower takes them from a DualViTok instance), or the
    semantic VQ's CLIP-style ViT."""
    if isinstance(tokenizer.cfg, SemanticVQConfig):
        return {"vit": nnx.state(tokenizer.vit, nnx.Param)}
    return {"vit": nnx.state(tokenizer.semantic_encoder.vit, nnx.Param),
            "pixel_encoder": nnx.state(tokenizer.pixel_encoder, nnx.Param)}



def create_mllm(cfg: MLLMConfig, mesh: jax.sharding.Mesh | None = None, seed: int = 0) -> MLLM:
    """The model with every parameter created sharded (init inside jit under the mesh)."""
    return vit.create_sharded(lambda: MLLM(cfg, rngs=nnx.Rngs(seed)), mesh)
