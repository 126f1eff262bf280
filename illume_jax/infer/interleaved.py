"""Interleaved text/image decoding for the MLLM: one jitted loop, per-row state, CFG as rows.

The official InterleavedLogitsProcessor (spec §4.1) tracks one state for the whole batch (it reads
`input_ids[0, -1]`), so rows that start an image at different steps become malformed. Here the
state is an array per row, updated from that row's own last token, and every rule is array
arithmetic over the vocabulary iota (no host round-trip, no per-row Python):

  phase  TEXT -> (SOI) -> EXPECT_SOL0 -> LEVEL0 -> (EOL0) -> EXPECT_SOL1 -> LEVEL1 -> (EOL1)
         -> EXPECT_EOI -> (EOI) -> TEXT (or DONE when the row stops at the image's end);
         a row whose pixel grid is 0 x 0 (ILLUME's one-level blocks) goes from EOL0 to EXPECT_EOI
  col, row  cells emitted in the current row / rows completed in the current level.

Masks (allowed ids): in a level, `EOL` once `col == w`, the level's end once `row == h`, else
that level's codes; between levels the one structure token that must come next; in text, all
but codes and structure tokens (SOI and resolution tags only where the row may start an image). Each row has its
own grids (h1, w1, h2, w2), so one batch can mix anchors.

CFG (spec §4.1 step 2): the batch holds 2B rows: B conditional, then B unconditional prompts,
each with its own KV-cache rows. Both rows of a pair are fed the conditional row's sampled token,
so the unconditional branch sees the same image prefix; in image mode the scores are
`g * (logp_cond - logp_uncond) + logp_uncond` in log-prob space, in text mode `logp_cond`
(computed without the log-softmax, which only shifts each row: see `guided_scores`).

Only the logits a step needs are computed (`next_tokens_from_hidden`): none for forced
structure tokens, the level's code range when every row is inside one level, all otherwise,
and for B rows, not 2B: the guidance is applied to the normed hidden states before the (linear)
head (`guided_hidden`). At ILLUME's 283k-row vocabulary the head dominates a small model's step.
(Difference from the official code, which appends the generated tags + SOI to the unconditional
prompt only when the image starts: here the unconditional rows also see any text the row
generated before its image. For the official prompts — the image starts at the first generated
token — the two are the same.)

Sampling (spec §4.1 step 4): per-row (temperature, top-k, top-p) chosen by the row's level
(text / level 0 / level 1), applied once each (the official script's double temperature and
nested HF warpers are a transformers-4.44 side effect; spec §4.1 "Important"); temperature 0 is
greedy. The step's random key is `fold_in(rng, step)`, so a run is reproducible from its seed.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct

from illume_jax.infer.module_jit import module_jit
from illume_jax.models.mllm import EOL, EOL0, EOL1, EOI, SOI, SOL0, SOL1, ImageVocab

TEXT, EXPECT_SOL0, LEVEL0, EXPECT_SOL1, LEVEL1, EXPECT_EOI, DONE = range(7)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """(text, level-0, level-1) sampling parameters. top_k 0 = off; temperature 0 = greedy.

    Official defaults (spec §4.1/§4.2): level 0 takes the text values, level 1 the level-0
    temperature / top-p and 3x its top-k."""
    temperature: tuple[float, float, float] = (1.0, 1.0, 1.0)
    top_k: tuple[int, int, int] = (0, 0, 0)
    top_p: tuple[float, float, float] = (1.0, 1.0, 1.0)
    guidance_scale: float = 1.0

    @classmethod
    def official(cls, temperature: float, top_k: int, top_p: float, guidance_scale: float) -> "Sampling":
        return cls(temperature=(temperature,) * 3, top_k=(top_k, top_k, 3 * top_k), top_p=(top_p,) * 3,
                   guidance_scale=guidance_scale)

    @classmethod
    def for_task(cls, task: str, *, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, guidance_scale: float | None = None,
                 level1_temperature: float | None = None) -> "Sampling":
        """The recommended settings of spec §4.2. For 't2i' and 'edit', a value given here replaces
        the official one and the official level rule still applies (level 1 gets 3x the top-k): a
        sampling sweep changes one knob of the recommended settings, not the rule between levels.
        `level1_temperature` is the one knob outside that rule (not an official setting): the
        pixel codes' temperature apart from the semantic codes', so an object can be placed at
        temperature 1 and its detail drawn sharper."""
        given = dict(temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance_scale,
                     level1_temperature=level1_temperature)
        if task == "understand":
            if any(v is not None for v in given.values()):
                raise ValueError(f"Sampling.for_task('understand') is greedy and takes no overrides, got "
                                 f"{ {k: v for k, v in given.items() if v is not None} }")
            return cls(temperature=(0.0, 0.0, 0.0))
        if task not in _OFFICIAL:
            raise ValueError(f"task {task!r}: expected 't2i', 'edit' or 'understand'")
        level1 = given.pop("level1_temperature")
        values = dict(_OFFICIAL[task], **{k: v for k, v in given.items() if v is not None})
        sampling = cls.official(values["temperature"], values["top_k"], values["top_p"], values["guidance_scale"])
        if level1 is None:
            return sampling
        return dataclasses.replace(sampling, temperature=sampling.temperature[:2] + (float(level1),))

    def __post_init__(self):
        for name in ("temperature", "top_k", "top_p"):
            v = getattr(self, name)
            if len(v) != 3:
                raise ValueError(f"Sampling.{name}={v!r}: expected (text, level0, level1)")
        if any(t < 0 for t in self.temperature) or any(k < 0 for k in self.top_k):
            raise ValueError(f"Sampling: temperatures and top-k must be >= 0, got {self.temperature}, {self.top_k}")
        if any(not 0 < p <= 1 for p in self.top_p):
            raise ValueError(f"Sampling.top_p={self.top_p}: expected values in (0, 1]")


# The recommended text-to-image and editing settings (spec §4.2), as Sampling.official's arguments.
_OFFICIAL = {"t2i": dict(temperature=1.0, top_k=2048, top_p=1.0, guidance_scale=2.0),
             "edit": dict(temperature=0.7, top_k=512, top_p=0.8, guidance_scale=1.5)}


@struct.dataclass
class RowState:
    """Per-row decoding state ([B] int32 / bool arrays)."""
    phase: jax.Array
    col: jax.Array
    row: jax.Array
    grids: jax.Array          # [B,4]: h1, w1, h2, w2
    may_image: jax.Array      # bool: the row may open an image (False for understanding)
    stop_at_eoi: jax.Array    # bool: the row is finished once its image is closed
    # [B, 2, S] int32 or None: the codes each row has drawn, by level and raster cell (row * w + col),
    # for `next_neighbour_codes` / `next_parent_code`; `generate` adds it for a model with `neighbour_codes`
    # or `parent_codes`.
    codes: jax.Array | None = None

    @classmethod
    def start(cls, grids, may_image, stop_at_eoi, phase=TEXT) -> "RowState":
        """grids [B,4]; phase EXPECT_SOL0 when the prompt already ends with `<start_of_image>`
        (forcing the image to start rather than waiting for the model to open it)."""
        grids = jnp.asarray(grids, jnp.int32)
        B = grids.shape[0]
        zeros = jnp.zeros((B,), jnp.int32)
        return cls(phase=jnp.broadcast_to(jnp.asarray(phase, jnp.int32), (B,)), col=zeros, row=zeros, grids=grids,
                   may_image=jnp.broadcast_to(jnp.asarray(may_image, bool), (B,)),
                   stop_at_eoi=jnp.broadcast_to(jnp.asarray(stop_at_eoi, bool), (B,)))

    @property
    def in_image(self):
        return (self.phase >= EXPECT_SOL0) & (self.phase <= EXPECT_EOI)

    @property
    def level(self):
        """0 text, 1 semantic level, 2 pixel level (selects the sampling parameters)."""
        return jnp.where(self.phase == LEVEL0, 1, jnp.where(self.phase == LEVEL1, 2, 0))


def allowed_mask(state: RowState, vocab: ImageVocab, vocab_size: int, eos_id: int, start: jax.Array | int = 0
                 ) -> jax.Array:
    """[B,size] bool: which of the ids [start, start + vocab_size) each row may emit next."""
    v = start + jnp.arange(vocab_size, dtype=jnp.int32)[None, :]
    s = lambda which: vocab.first_id + which
    in_l0 = (v >= vocab.level0_start) & (v < vocab.level1_start)
    in_l1 = (v >= vocab.level1_start) & (v < vocab.end)
    structure = (v >= vocab.first_id) & (v <= vocab.first_id + EOL1)
    ph = state.phase[:, None]
    col, row = state.col[:, None], state.row[:, None]
    h1, w1, h2, w2 = (state.grids[:, i:i + 1] for i in range(4))

    def level_mask(in_level, h, w, end):
        return jnp.where(row >= h, v == s(end), jnp.where(col >= w, v == s(EOL), in_level))

    # Text mode: text ids, and resolution tags where the row may make an image (rows past
    # `vocab.end` are padding); understanding rows see no added id at all.
    may = state.may_image[:, None]
    text = (~(in_l0 | in_l1 | structure) & (v < vocab.end) & (may | (v < vocab.first_id))) | ((v == s(SOI)) & may)
    mask = jnp.select(
        [ph == TEXT, ph == EXPECT_SOL0, ph == LEVEL0, ph == EXPECT_SOL1, ph == LEVEL1, ph == EXPECT_EOI],
        [text, v == s(SOL0), level_mask(in_l0, h1, w1, EOL0), v == s(SOL1), level_mask(in_l1, h2, w2, EOL1),
         v == s(EOI)],
        default=v == eos_id)  # DONE rows: anything fixed (their tokens are replaced by padding)
    if eos_id >= 0:
        mask = mask | ((ph == TEXT) & (v == eos_id))
    # Never leave a row with nothing to emit (official: fall back to <|im_end|>). On a window
    # this only matters for rows whose token is forced anyway (see `forced_tokens`).
    return jnp.where(jnp.any(mask, axis=-1, keepdims=True), mask, v == max(eos_id, 0))


def forced_tokens(state: RowState, vocab: ImageVocab, pad_id: int) -> tuple[jax.Array, jax.Array]:
    """(forced [B] bool, token [B]): rows whose next id is the only one the layout allows
    (structure tokens, row / level ends, padding once DONE) need no logits at all."""
    s = lambda which: vocab.first_id + which
    ph, col, row = state.phase, state.col, state.row
    h1, w1, h2, w2 = (state.grids[:, i] for i in range(4))
    level_end = ((ph == LEVEL0) & (row >= h1)) | ((ph == LEVEL1) & (row >= h2))
    row_end = ~level_end & (((ph == LEVEL0) & (col >= w1)) | ((ph == LEVEL1) & (col >= w2)))
    token = jnp.select(
        [ph == DONE, ph == EXPECT_SOL0, ph == EXPECT_SOL1, ph == EXPECT_EOI, level_end & (ph == LEVEL0),
         level_end & (ph == LEVEL1), row_end],
        [pad_id, s(SOL0), s(SOL1), s(EOI), s(EOL0), s(EOL1), s(EOL)], default=-1)
    return token >= 0, token.astype(jnp.int32)


def advance(state: RowState, tok: jax.Array, vocab: ImageVocab, eos_id: int) -> RowState:
    """The state after each row emitted `tok` [B]."""
    s = lambda which: vocab.first_id + which
    ph, col, row = state.phase, state.col, state.row
    in_level = (ph == LEVEL0) | (ph == LEVEL1)
    is_eol = tok == s(EOL)
    new_phase = jnp.select(
        [ph == DONE,
         (ph == TEXT) & (tok == eos_id),
         (ph == TEXT) & (tok == s(SOI)),
         (ph == EXPECT_SOL0) & (tok == s(SOL0)),
         (ph == LEVEL0) & (tok == s(EOL0)),
         (ph == EXPECT_SOL1) & (tok == s(SOL1)),
         (ph == LEVEL1) & (tok == s(EOL1)),
         (ph == EXPECT_EOI) & (tok == s(EOI))],
        [DONE, DONE, EXPECT_SOL0, LEVEL0, jnp.where(state.grids[:, 2] > 0, EXPECT_SOL1, EXPECT_EOI), LEVEL1,
         EXPECT_EOI,
         jnp.where(state.stop_at_eoi, DONE, TEXT)],
        default=ph)
    entered = new_phase != ph
    new_col = jnp.where(entered, 0, jnp.where(in_level & is_eol, 0, jnp.where(in_level, col + 1, col)))
    new_row = jnp.where(entered, 0, jnp.where(in_level & is_eol, row + 1, row))
    codes = state.codes
    if codes is not None:  # record a drawn code at its level's raster cell
        w = jnp.where(ph == LEVEL0, state.grids[:, 1], state.grids[:, 3])
        h = jnp.where(ph == LEVEL0, state.grids[:, 0], state.grids[:, 2])
        start = jnp.where(ph == LEVEL0, vocab.level0_start, vocab.level1_start)
        size = jnp.where(ph == LEVEL0, vocab.semantic_codes, vocab.pixel_codes)
        code = tok - start
        write = in_level & (code >= 0) & (code < size) & (row < h) & (col < w)
        at = jnp.where(write, row * w + col, -1)
        lv = jnp.where(ph == LEVEL0, 0, 1)
        hit = ((jnp.arange(2)[None, :, None] == lv[:, None, None])
               & (jnp.arange(codes.shape[2])[None, None, :] == at[:, None, None]))
        codes = jnp.where(hit, code[:, None, None], codes)
    return state.replace(phase=new_phase, col=new_col, row=new_row, codes=codes)


def guided_scores(logits: jax.Array, state: RowState, guidance_scale: jax.Array) -> jax.Array:
    """logits [2B,N] (cond rows, then uncond rows) or [B,N] (no CFG) -> scores [B,N].

    The official rule is `g * (logp_c - logp_u) + logp_u` on log-softmaxed logits in image mode,
    `logp_c` in text mode. Log-softmax only subtracts a per-row constant, which no mask, warp or
    sample can see, so the scores here are `c + (g - 1) * (c - u)` on the raw logits: the same
    distribution, computable on a window of the vocabulary (`LLM.logits_window`), and exactly
    the conditional logits when g = 1."""
    B = state.phase.shape[0]
    cond = logits[:B].astype(jnp.float32)
    if logits.shape[0] == B:
        return cond
    uncond = logits[B:].astype(jnp.float32)
    g = jnp.asarray(guidance_scale, jnp.float32)
    return jnp.where(state.in_image[:, None], cond + (g - 1.0) * (cond - uncond), cond)


def warp_and_sample(scores: jax.Array, level: jax.Array, sampling: Sampling, rng: jax.Array) -> jax.Array:
    """Masked scores [B,V] -> sampled ids [B]: per-row temperature / top-k / top-p by level.

    Sampling draws from the top-k candidates only (a categorical over k values), or, without
    top-k, by inverse CDF over the vocabulary: Gumbel noise for 283k ids per row costs more than
    a small model's whole step on CPU (77 ms vs a few for 8 rows)."""
    V = scores.shape[-1]
    temp = jnp.asarray(sampling.temperature, jnp.float32)[level]
    top_p = jnp.asarray(sampling.top_p, jnp.float32)[level]
    ks = [k if 0 < k < V else V for k in sampling.top_k]
    k_row = jnp.asarray(ks, jnp.int32)[level]
    greedy = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    x = scores / jnp.maximum(temp, 1e-6)[:, None]
    k_max = max(ks)
    if k_max < V or any(p < 1.0 for p in sampling.top_p):
        vals, idx = jax.lax.top_k(x, k_max)                     # sorted, descending
        in_k = jnp.arange(k_max)[None, :] < k_row[:, None]
        # top-p over the top-k survivors: keep the smallest prefix whose mass reaches p
        # (the first candidate always stays).
        probs = jax.nn.softmax(jnp.where(in_k, vals, -jnp.inf), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        keep = in_k & (before < top_p[:, None])
        choice = jax.random.categorical(rng, jnp.where(keep, vals, -jnp.inf), axis=-1)
        sampled = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    else:
        probs = jax.nn.softmax(x, axis=-1)
        cdf = jnp.cumsum(probs, axis=-1)
        u = jax.random.uniform(rng, (x.shape[0], 1)) * cdf[:, -1:]
        # First id whose cumulative mass exceeds u: never a masked id (its mass is 0).
        sampled = jnp.argmax(cdf > u, axis=-1).astype(jnp.int32)
    return jnp.where(temp > 0, sampled, greedy)


def guided_hidden(llm, hidden: jax.Array, state: RowState, guidance_scale: jax.Array) -> jax.Array:
    """Final-normed hidden states [R,D] -> [B,D] whose head logits are `guided_scores` of the R
    rows' logits. The head is linear (no bias), so `c + (g - 1) * (c - u)` may be taken on the
    normed states instead of the logits: the head then runs on B rows, not 2B. At batch 1 that
    is a matrix-vector product, which XLA:CPU streams at memory speed (6.8 ms for the 98k-row
    level-1 window of `bench/generate.py`'s small model against 11.3 ms for two rows). Combined
    in fp32; the same up to rounding, exactly the conditional row when g = 1."""
    B = state.phase.shape[0]
    x = llm.final_norm(hidden)
    if hidden.shape[0] == B:
        return x
    cond, uncond = x[:B].astype(jnp.float32), x[B:].astype(jnp.float32)
    g = jnp.asarray(guidance_scale, jnp.float32)
    return jnp.where(state.in_image[:, None], cond + (g - 1.0) * (cond - uncond), cond).astype(x.dtype)


def _sample_scores(scores: jax.Array, state: RowState, sampling: Sampling, rng: jax.Array, vocab: ImageVocab,
                   eos_id: int, start: jax.Array | int = 0) -> jax.Array:
    """Guided scores [B,N] of ids [start, start + N) -> sampled ids (hard masks, warps)."""
    mask = allowed_mask(state, vocab, scores.shape[-1], eos_id, start)
    scores = jnp.where(mask, scores, -jnp.inf)
    return start + warp_and_sample(scores, state.level, sampling, rng)


def _sample_from(logits: jax.Array, state: RowState, sampling: Sampling, rng: jax.Array, vocab: ImageVocab,
                 eos_id: int, start: jax.Array | int = 0) -> jax.Array:
    """Logits [R,N] of ids [start, start + N) -> sampled ids (CFG, hard masks, warps)."""
    scores = guided_scores(logits, state, sampling.guidance_scale)
    return _sample_scores(scores, state, sampling, rng, vocab, eos_id, start)


def next_tokens(logits: jax.Array, state: RowState, sampling: Sampling, rng: jax.Array, vocab: ImageVocab,
                eos_id: int, pad_id: int) -> jax.Array:
    """One processor step on full logits [R,V]: CFG, hard masks, warps, sampling; forced rows
    take their forced id and DONE rows emit `pad_id`."""
    forced, token = forced_tokens(state, vocab, pad_id)
    return jnp.where(forced, token, _sample_from(logits, state, sampling, rng, vocab, eos_id))


def next_cell(state: RowState) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(level, row, col) [B] of the code each row draws next (level -1 when the next token is not a
    code): what `CellEmbedding` adds to the token just fed, as `cell_embedding_targets` does in training."""
    h1, w1, h2, w2 = (state.grids[:, i] for i in range(4))
    inside = lambda h, w: (state.row < h) & (state.col < w)  # noqa: E731
    level = jnp.where((state.phase == LEVEL0) & inside(h1, w1), 0,
                      jnp.where((state.phase == LEVEL1) & inside(h2, w2), 1, -1))
    return level, state.row, state.col


def next_neighbour_codes(state: RowState) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(level [B], codes [B,3], valid [B,3]) of the code each row draws next: the codes it drew above
    that cell (`mllm.NEIGHBOUR_OFFSETS` of the row above, from `state.codes`), as
    `mllm.neighbour_code_targets` reads them off a training sequence."""
    from illume_jax.models.mllm import NEIGHBOUR_OFFSETS
    if state.codes is None:
        raise ValueError("next_neighbour_codes: the row state has no code buffer (RowState.codes); "
                         "`generate` adds one for a model with neighbour_codes")
    level, row, col = next_cell(state)
    w = jnp.where(level == 0, state.grids[:, 1], state.grids[:, 3])
    cc = col[:, None] + jnp.asarray(NEIGHBOUR_OFFSETS, jnp.int32)
    valid = (level >= 0)[:, None] & (row >= 1)[:, None] & (cc >= 0) & (cc < w[:, None])
    S = state.codes.shape[2]
    at = jnp.clip((row - 1)[:, None] * w[:, None] + cc, 0, S - 1)
    mine = jnp.take_along_axis(state.codes, jnp.clip(level, 0, 1)[:, None, None], axis=1)[:, 0]  # [B,S]
    valid = valid & ((row - 1)[:, None] * w[:, None] + cc < S)
    codes = jnp.where(valid, jnp.take_along_axis(mine, at, axis=1), 0)
    return level, codes, valid


def next_parent_code(state: RowState, pixel_stride: int, semantic_stride: int) -> tuple[jax.Array, jax.Array]:
    """(code [B], valid [B]): for rows whose next code is a pixel code, the semantic code they drew over
    that cell (`mllm.parent_cell`, from `state.codes`), as `mllm.parent_code_targets` reads it off a
    training sequence."""
    from illume_jax.models.mllm import parent_cell
    if state.codes is None:
        raise ValueError("next_parent_code: the row state has no code buffer (RowState.codes); "
                         "`generate` adds one for a model with parent_codes")
    level, row, col = next_cell(state)
    h1, w1 = state.grids[:, 0], state.grids[:, 1]
    pr, pc = parent_cell(row, col, h1, w1, pixel_stride, semantic_stride)
    S = state.codes.shape[2]
    at = pr * w1 + pc
    valid = (level == 1) & (at < S)
    code = jnp.take_along_axis(state.codes[:, 0], jnp.clip(at, 0, S - 1)[:, None], axis=1)[:, 0]
    return jnp.where(valid, code, 0), valid


@struct.dataclass
class SourceCells:
    """What `SourceCellProjection` adds while a row draws, per prompt row (R: CFG rows have their own):
    `feats` [R, 2, S, D] the projected embeddings of the cells of the latest continuous image in the
    prompt, by level and raster cell (row * w + col), and `grids` [R, 4] its (h1, w1, h2, w2), zeros
    for a prompt without one."""
    feats: jax.Array
    grids: jax.Array


def source_cells_from_prompt(embeds: jax.Array, slots: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """Prompt embeddings [R,P,D] and slots [R,P] -> (the latest continuous image's cell embeddings
    [R, 2, size, D], zero past its cells; its grids [R, 4]): the cells `mllm.source_cell_targets`
    points at for every code drawn after the prompt."""
    from illume_jax.models.mllm import latest_source_blocks
    feats, grids = [], []
    k = jnp.arange(size, dtype=jnp.int32)[None, :]
    for first, h, w in latest_source_blocks(slots):
        first, h, w = first[:, -1:], h[:, -1:], w[:, -1:]
        wide = jnp.maximum(w, 1)
        at = first + (k // wide) * (w + 1) + k % wide
        valid = (first >= 0) & (k < h * w)
        got = jnp.take_along_axis(embeds, jnp.clip(at, 0, embeds.shape[1] - 1)[..., None], axis=1)
        feats.append(jnp.where(valid[..., None], got, 0))
        grids += [h[:, 0], w[:, 0]]
    return jnp.stack(feats, axis=1), jnp.stack(grids, axis=1)


def next_source_cell(level: jax.Array, row: jax.Array, col: jax.Array, source: SourceCells) -> jax.Array:
    """level/row/col [R] of the code each row draws next (`next_cell`, CFG rows copied) -> [R, D]: that
    cell's entry of `source.feats`, zero where the row draws no code or its source image lacks the cell."""
    return _source_lookup(level, row, col, source)[0]


def next_source_code(level: jax.Array, row: jax.Array, col: jax.Array, source: SourceCells
                     ) -> tuple[jax.Array, jax.Array]:
    """`next_source_cell` on a `SourceCells` of codes (`feats` [R, 2, S, 1] int, from the prompt's
    `codes`) -> (code [R], valid [R]): what `mllm.source_code_targets` gives in training."""
    code, valid = _source_lookup(level, row, col, source)
    valid = valid & (code[:, 0] >= 0)
    return jnp.where(valid, code[:, 0], 0), valid


def _source_lookup(level, row, col, source: SourceCells) -> tuple[jax.Array, jax.Array]:
    S = source.feats.shape[2]
    lv = jnp.clip(level, 0, 1)
    h = jnp.take_along_axis(source.grids, (2 * lv)[:, None], axis=1)[:, 0]
    w = jnp.take_along_axis(source.grids, (2 * lv + 1)[:, None], axis=1)[:, 0]
    at = row * w + col
    valid = (level >= 0) & (row < h) & (col < w) & (at < S)
    mine = jnp.take_along_axis(source.feats, lv[:, None, None, None], axis=1)[:, 0]   # [R,S,D]
    got = jnp.take_along_axis(mine, jnp.clip(at, 0, S - 1)[:, None, None], axis=1)[:, 0]
    return jnp.where(valid[:, None], got, 0), valid


def code_heads(llm, vocab: ImageVocab) -> tuple[jax.Array, jax.Array]:
    """The head rows of the level-0 and level-1 code ranges, sliced once per generation call
    (slicing inside each step copies the table: more than the whole head's matmul on CPU); None for a
    level without codes (one-level ILLUME vocabularies)."""
    return (llm.head_rows(vocab.level0_start, vocab.semantic_codes),
            llm.head_rows(vocab.level1_start, vocab.pixel_codes) if vocab.pixel_codes else None)


def next_tokens_from_hidden(llm, hidden: jax.Array, state: RowState, sampling: Sampling, rng: jax.Array,
                            vocab: ImageVocab, eos_id: int, pad_id: int, heads=None, copy=None) -> jax.Array:
    """`next_tokens` from the last hidden states [R,D], computing only the logits it needs:
    none when every row is forced, the level's code range when every free row is inside one
    level, the whole vocabulary otherwise (text, mixed phases). copy: (the MLLM's `SourceCodeCopy`,
    code [B], valid [B]) -- the source's code of the cell each row draws now gets its bonus (or its
    mixture share), taken on the guided normed state (the bonus is linear in it, as the head is)."""
    forced, token = forced_tokens(state, vocab, pad_id)
    free = ~forced
    in0 = ~free | (state.phase == LEVEL0)
    in1 = ~free | (state.phase == LEVEL1)
    branch = jnp.where(~jnp.any(free), 0, jnp.where(jnp.all(in0), 1, jnp.where(jnp.all(in1), 2, 3)))

    heads = heads if heads is not None else code_heads(llm, vocab)
    x = guided_hidden(llm, hidden, state, sampling.guidance_scale)
    if copy is not None:
        copier, code, valid = copy
        level = next_cell(state)[0]
        valid = valid & (level >= 0)
        with_copy = lambda s, start: copier.apply(s, x, level, code, valid, vocab, start)  # noqa: E731
    else:
        with_copy = lambda s, start: s  # noqa: E731

    def window(start, rows):
        return lambda: _sample_scores(with_copy(llm.logits_from_rows(x, rows, normed=True), start), state,
                                      sampling, rng, vocab, eos_id, start)

    def full():
        return _sample_scores(with_copy(llm.head(x[:, None])[:, 0], 0), state, sampling, rng, vocab, eos_id)

    sampled = jax.lax.switch(branch, [
        lambda: token,
        window(vocab.level0_start, heads[0]),
        window(vocab.level1_start, heads[1]) if vocab.pixel_codes else full,  # one level: never taken
        full,
    ])
    return jnp.where(forced, token, sampled)


def decode_step(llm, hidden: jax.Array, state: RowState, positions: jax.Array, cache, rng: jax.Array, *,
                vocab: ImageVocab, sampling: Sampling, eos_id: int, pad_id: int = 0, heads=None, layers=None,
                cell_embed=None, neighbour_embed=None, parent_embed=None, source: SourceCells | None = None,
                copy_from=None):
    """One token for every row: sample from the last hidden states [R,D] (R = B or 2B with CFG),
    advance the row states, feed the token to all R rows (each CFG pair gets the conditional
    row's token) and run the model one step. -> (tokens [B], state, hidden [R,D], cache).
    `cache` is a `KVCache` (scanned layers) or, with `layers` from `llm.unstacked_layers()`, a
    `LayerKVCache`. `cell_embed`: the MLLM's `CellEmbedding` when it has one (the fed token then
    carries the cell its row draws next). `neighbour_embed`: its `NeighbourCodeEmbedding` (the fed
    token then carries the codes drawn above that cell; `state.codes` must be set). `parent_embed`: its
    `ParentCodeEmbedding` (a token before a pixel code carries the semantic code over it). `source`: the
    projected cells of each prompt's source image (`SourceCells`, for an MLLM with `source_cells`: a token
    before a code carries the source's same cell). `copy_from`: (the MLLM's `SourceCodeCopy`, a `SourceCells`
    of each prompt's source codes) for an MLLM with `source_copy`. The body of
    `generate`'s loop; `aot` compiles it for TPU topologies."""
    R, B = hidden.shape[0], state.phase.shape[0]
    copy = None
    if copy_from is not None:   # the cell drawn now, read from the conditional rows' source codes
        copier, codes = copy_from
        copy = (copier, *next_source_code(*next_cell(state), SourceCells(feats=codes.feats[:B], grids=codes.grids[:B])))
    tok = next_tokens_from_hidden(llm, hidden, state, sampling, rng, vocab, eos_id, pad_id, heads, copy)
    state = advance(state, tok, vocab, eos_id)
    fed, embeds = jnp.tile(tok, R // B)[:, None], None
    rows = lambda a: jnp.concatenate([a] * (R // B), axis=0)[:, None]  # noqa: E731  (CFG rows copy theirs)
    extra = []
    if cell_embed is not None:
        extra.append(cell_embed(*(rows(a) for a in next_cell(state))))
    if neighbour_embed is not None:
        extra.append(neighbour_embed(*(rows(a) for a in next_neighbour_codes(state))))
    if parent_embed is not None:
        parent = next_parent_code(state, parent_embed.pixel_stride, parent_embed.semantic_stride)
        extra.append(parent_embed(*(rows(a) for a in parent)))
    if source is not None:
        extra.append(next_source_cell(*(rows(a)[:, 0] for a in next_cell(state)), source)[:, None])
    if extra:
        embeds, fed = llm.embed_tokens(fed) + sum(extra), None
    out, cache = llm.decode(fed, cache, positions=positions[:, None], inputs_embeds=embeds,
                            segment_ids=jnp.ones((R, 1), jnp.int32), return_hidden=True, layers=layers)
    return tok, state, out[:, 0], cache


@struct.dataclass
class Prompts:
    """A batch of left-padded prompts. With CFG, rows [0,B) are conditional and [B,2B) their
    unconditional counterparts. tokens/slots/cells/mask [R,P]; images [R,M,H,W,3] or None; codes [R,P]
    the tokenizer's codes of the images' continuous cells (`mllm.input_codes`; an MLLM with
    `source_copy` needs them to draw after an image) or None."""
    tokens: jax.Array
    mask: jax.Array
    slots: jax.Array
    cells: jax.Array
    images: jax.Array | None = None
    codes: jax.Array | None = None


def _prefill(model, prompts: Prompts, cache_len: int):
    """The prompts through the model into a fresh cache of `cache_len` slots: (pre-norm hidden
    states [R,P,D], cache, RoPE positions [R,P]; left padding gets no position of its own, input
    embeddings [R,P,D])."""
    R = prompts.tokens.shape[0]
    seg = prompts.mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
    embeds = model.embed(prompts.tokens, prompts.slots, prompts.cells, prompts.images)
    cache = model.llm.init_cache(R, cache_len)
    hidden, cache = model.llm.decode(None, cache, positions=positions, segment_ids=seg, inputs_embeds=embeds,
                                     return_hidden=True)
    return hidden, cache, positions, embeds


@functools.partial(module_jit, static_argnames=("text_size",))
def next_text_logprobs(model, prompts: Prompts, *, text_size: int) -> jax.Array:
    """log p(next token) over the text ids [0, text_size) after each prompt: [R, text_size] fp32.
    The distribution greedy understanding decodes its first answer token from (image ids are
    masked out there too), for threshold-free scores such as a yes/no margin's AUC."""
    hidden = _prefill(model, prompts, prompts.tokens.shape[1])[0]
    return jax.nn.log_softmax(model.llm.logits_window(hidden[:, -1], 0, text_size), axis=-1)


@functools.partial(module_jit, static_argnames=("vocab", "sampling", "max_new_tokens", "eos_id", "pad_id",
                                               "unstack_layers"))
def generate(model, prompts: Prompts, state: RowState, rng: jax.Array, *, vocab: ImageVocab, sampling: Sampling,
             max_new_tokens: int, eos_id: int, pad_id: int = 0, unstack_layers: bool | None = None
             ) -> tuple[jax.Array, RowState]:
    """Prefill + `lax.while_loop` decode. Returns (tokens [B, max_new_tokens], final state).

    `model` is an `MLLM`. The loop ends when every conditional row is DONE or after
    max_new_tokens; finished rows emit `pad_id`. unstack_layers: run the steps on per-layer
    weight copies and cache buffers (`LLM.loop_cache`; default: on CPU only); the tokens are the same."""
    R, P = prompts.tokens.shape
    B = state.phase.shape[0]
    if R not in (B, 2 * B):
        raise ValueError(f"prompts: {R} rows for {B} outputs; expected {B} (no CFG) or {2 * B} (CFG)")
    if (model.cfg.neighbour_codes or model.cfg.parent_codes) and state.codes is None:  # room for every code drawn
        state = state.replace(codes=jnp.zeros((B, 2, max_new_tokens), jnp.int32))
    hidden, cache, positions, embeds = _prefill(model, prompts, P + max_new_tokens)
    source = None
    if model.cfg.source_cells:  # the prompt's source image, each cell projected once
        feats, grids = source_cells_from_prompt(embeds, prompts.slots, max_new_tokens)
        source = SourceCells(feats=model.source_embed(feats, jnp.ones(feats.shape[:-1], bool)), grids=grids)
    copy_from = None
    if model.cfg.source_copy and prompts.codes is not None:
        codes, grids = source_cells_from_prompt(prompts.codes[..., None], prompts.slots, max_new_tokens)
        copy_from = (model.source_copy, SourceCells(feats=codes, grids=grids))
    elif model.cfg.source_copy and prompts.images is not None:
        raise ValueError("prompts.codes is None but the MLLM has source_copy and the prompts show images: pass "
                         "their tokenizer codes (mllm.input_codes) so it can copy the source's codes")
    next_pos = positions[:, -1] + 1
    heads = code_heads(model.llm, vocab)
    cache, layers = model.llm.loop_cache(cache, unstack_layers)

    def cond(carry):
        i, _, _, _, _, st = carry
        return (i < max_new_tokens) & ~jnp.all(st.phase == DONE)

    def body(carry):
        i, last, pos, out, cache, st = carry
        tok, st, step_hidden, cache = decode_step(model.llm, last, st, pos, cache, jax.random.fold_in(rng, i),
                                                  vocab=vocab, sampling=sampling, eos_id=eos_id, pad_id=pad_id,
                                                  heads=heads, layers=layers,
                                                  cell_embed=model.cell_embed if model.cfg.cell_embedding else None,
                                                  neighbour_embed=(model.neighbour_embed if model.cfg.neighbour_codes
                                                                   else None),
                                                  parent_embed=model.parent_embed if model.cfg.parent_codes else None,
                                                  source=source, copy_from=copy_from)
        out = out.at[:, i].set(tok)
        return i + 1, step_hidden, pos + 1, out, cache, st

    init = (jnp.zeros((), jnp.int32), hidden[:, -1], next_pos,
            jnp.full((B, max_new_tokens), pad_id, jnp.int32), cache, state)
    _, _, _, out, _, state = jax.lax.while_loop(cond, body, init)
    return out, state
