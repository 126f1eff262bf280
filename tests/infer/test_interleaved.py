"""The per-row interleaved processor and the jitted MLLM decoding loop.

- masks equal an independent replay of the official processor's rules (spec §4.1), row by row,
  for a batch whose rows open their images at different steps and with different grids;
- every row's output is a well-formed image block;
- the jitted loop (prefill + while_loop over the KV cache, CFG rows) equals an eager
  step-by-step reference that recomputes the whole sequence every step;
- CFG with guidance 1 equals plain sampling; the warps' limits (top-k 1, tiny top-p) are greedy.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from configs import dualvitok as dualvitok_config
from illume_jax.infer import interleaved as il
from illume_jax.models import mllm

VOCAB = mllm.ImageVocab(first_id=40, semantic_codes=16, pixel_codes=24)
V = VOCAB.end + 3            # a few padding rows past the added vocabulary
EOS = 2


def reference_masks(history, grids, may_image, stop_at_eoi):
    """Allowed ids after `history`, replaying the official processor's flags (spec §4.1) in numpy."""
    v = np.arange(V)
    s = lambda k: VOCAB.first_id + k
    in_l0 = (v >= VOCAB.level0_start) & (v < VOCAB.level1_start)
    in_l1 = (v >= VOCAB.level1_start) & (v < VOCAB.end)
    image, level, tir, rows, last, done = False, None, 0, 0, None, False
    for t in history:
        if done:
            continue
        if not image and t == EOS:
            done = True
        elif t == s(mllm.SOI):
            image, level, tir, rows = True, None, 0, 0
        elif t in (s(mllm.SOL0), s(mllm.SOL1)):
            level, tir, rows = (0 if t == s(mllm.SOL0) else 1), 0, 0
        elif t in (s(mllm.EOL0), s(mllm.EOL1)):
            level = None
        elif t == s(mllm.EOI):
            image = False
            done = stop_at_eoi
        elif image and t == s(mllm.EOL):
            tir, rows = 0, rows + 1
        elif level == 0 and in_l0[t] or level == 1 and in_l1[t]:
            tir += 1
        last = t
    h1, w1, h2, w2 = grids
    if done:
        return None
    if not image:
        allowed = ~(in_l0 | in_l1 | ((v >= s(0)) & (v <= s(mllm.EOL1)))) & (v < VOCAB.end)
        if not may_image:
            allowed &= v < VOCAB.first_id
        allowed[s(mllm.SOI)] = may_image
        allowed[EOS] = True
        return allowed
    if level is None:
        nxt = {s(mllm.SOI): s(mllm.SOL0), s(mllm.EOL0): s(mllm.SOL1), s(mllm.EOL1): s(mllm.EOI)}[last]
        return v == nxt
    h, w, rng_mask, end = (h1, w1, in_l0, s(mllm.EOL0)) if level == 0 else (h2, w2, in_l1, s(mllm.EOL1))
    if rows == h:
        return v == end
    if tir == w:
        return v == s(mllm.EOL)
    return rng_mask


def _codes_or_structure(ids):
    return ((ids >= VOCAB.first_id) & (ids <= VOCAB.first_id + mllm.EOL1)) | (ids >= VOCAB.level0_start)


def test_per_row_masks_match_the_official_rules_with_rows_starting_images_at_different_steps():
    grids = np.array([[2, 3, 3, 4], [1, 1, 2, 2], [3, 2, 4, 3], [2, 2, 2, 2]])
    start_at = [0, 5, 11, 3]          # step at which each row opens its image
    stop = np.array([True, True, False, True])
    may_image = np.array([True, True, True, True])
    B = len(grids)
    state = il.RowState.start(grids, may_image, stop)
    rng = np.random.default_rng(0)
    sampling = il.Sampling(temperature=(1.0, 1.0, 1.0))
    step = jax.jit(lambda logits, st, key: il.next_tokens(logits, st, sampling, key, VOCAB, EOS, pad_id=0))
    mask_fn = jax.jit(lambda st: il.allowed_mask(st, VOCAB, V, EOS))
    adv = jax.jit(lambda st, tok: il.advance(st, tok, VOCAB, EOS))
    history = [[] for _ in range(B)]
    for i in range(80):
        logits = rng.normal(size=(B, V)).astype(np.float32)
        logits[:, EOS] = -30.0
        for r in range(B):
            logits[r, VOCAB.soi] = 30.0 if i == start_at[r] else -30.0
        masks = np.asarray(mask_fn(state))
        for r in range(B):
            ref = reference_masks(history[r], grids[r], may_image[r], stop[r])
            if ref is not None:
                np.testing.assert_array_equal(masks[r], ref, err_msg=f"row {r} step {i}")
        tok = np.asarray(step(jnp.asarray(logits), state, jax.random.key(i)))
        state = adv(state, jnp.asarray(tok))
        for r in range(B):
            history[r].append(int(tok[r]))
    for r in range(B):
        h = np.asarray(history[r])
        soi = int(np.nonzero(h == VOCAB.soi)[0][0])
        assert soi == start_at[r]
        assert not _codes_or_structure(h[:soi]).any()  # text ids or resolution tags only
        (h1, w1, h2, w2) = grids[r]
        sem, pix = mllm.parse_block(h[soi:], ((h1, w1), (h2, w2)), VOCAB)
        assert sem.shape == (h1, w1) and pix.shape == (h2, w2)
        end = soi + mllm.block_length(((h1, w1), (h2, w2)))
        if stop[r]:
            assert (h[end:] == 0).all(), f"row {r} kept emitting after its image"
        else:  # back in text mode: no codes or structure tokens, but text (or another SOI)
            assert not _codes_or_structure(h[end:][h[end:] != VOCAB.soi]).any()
    assert int(state.phase[2]) == il.TEXT and all(int(state.phase[r]) == il.DONE for r in (0, 1, 3))


@pytest.mark.parametrize("vocab", [mllm.ImageVocab(first_id=40, semantic_codes=16, pixel_codes=0), VOCAB],
                         ids=["one_level_vocabulary", "two_level_vocabulary"])
def test_rows_with_an_empty_pixel_grid_draw_one_level_blocks(vocab):
    """ILLUME's blocks: after EOL0 the row closes the image (EOI), whatever the vocabulary; in a two-level
    vocabulary one-level and two-level rows share the batch."""
    one = vocab.pixel_codes == 0
    grids = np.array([[2, 3, 0, 0], [1, 1, 0, 0], [3, 2, 0, 0]] + ([] if one else [[2, 2, 2, 3]]))
    start_at = [0, 4, 9] + ([] if one else [2])
    B, size = len(grids), vocab.end + 3
    state = il.RowState.start(grids, True, True)
    sampling = il.Sampling(temperature=(1.0, 1.0, 1.0))
    step = jax.jit(lambda logits, st, key: il.next_tokens(logits, st, sampling, key, vocab, EOS, pad_id=0))
    adv = jax.jit(lambda st, tok: il.advance(st, tok, vocab, EOS))
    rng = np.random.default_rng(1)
    history = []
    for i in range(40):
        logits = rng.normal(size=(B, size)).astype(np.float32)
        logits[:, EOS] = -30.0
        logits[:, vocab.soi] = np.where(np.asarray(start_at) == i, 30.0, -30.0)
        tok = np.asarray(step(jnp.asarray(logits), state, jax.random.key(i)))
        state = adv(state, jnp.asarray(tok))
        history.append(tok)
    history = np.stack(history, axis=1)
    for r in range(B):
        h1, w1, h2, w2 = (int(g) for g in grids[r])
        soi = start_at[r]
        sem, pix = mllm.parse_block(history[r, soi:], ((h1, w1), (h2, w2)), vocab)
        assert sem.shape == (h1, w1) and pix.shape == (h2, w2)
        end = soi + mllm.block_length(((h1, w1), (h2, w2)))
        if h2 == 0:
            assert history[r, end - 2:end].tolist() == [vocab.structure(mllm.EOL0), vocab.eoi]
            assert vocab.structure(mllm.SOL1) not in history[r].tolist()
        assert (history[r, end:] == 0).all(), f"row {r} kept emitting after its image"
    assert (np.asarray(state.phase) == il.DONE).all()


def test_understanding_rows_never_open_an_image():
    state = il.RowState.start(np.array([[2, 2, 2, 2]]), False, True)
    mask = np.asarray(il.allowed_mask(state, VOCAB, V, EOS))[0]
    assert not mask[VOCAB.first_id:].any() and mask[EOS]


def test_task_samplings_are_the_official_ones_and_overrides_keep_the_level_rule():
    t2i, edit = il.Sampling.for_task("t2i"), il.Sampling.for_task("edit")
    assert t2i == il.Sampling((1.0,) * 3, (2048, 2048, 6144), (1.0,) * 3, 2.0)
    assert edit == il.Sampling((0.7,) * 3, (512, 512, 1536), (0.8,) * 3, 1.5)
    # One knob changes; the rest stay official and level 1 still takes 3x the top-k.
    assert il.Sampling.for_task("t2i", temperature=0.5) == il.Sampling((0.5,) * 3, (2048, 2048, 6144), (1.0,) * 3, 2.0)
    assert il.Sampling.for_task("edit", top_k=16, guidance_scale=3.0) == il.Sampling(
        (0.7,) * 3, (16, 16, 48), (0.8,) * 3, 3.0)
    assert il.Sampling.for_task("t2i", top_k=0, top_p=0.9).top_k == (0, 0, 0)   # 0 = off at every level
    # The pixel codes' own temperature: only level 1 moves, whatever the level-0 one is.
    assert il.Sampling.for_task("t2i", level1_temperature=0.0).temperature == (1.0, 1.0, 0.0)
    assert il.Sampling.for_task("edit", temperature=0.9, level1_temperature=0.3) == il.Sampling(
        (0.9, 0.9, 0.3), (512, 512, 1536), (0.8,) * 3, 1.5)
    with pytest.raises(ValueError, match="greedy and takes no overrides.*level1_temperature"):
        il.Sampling.for_task("understand", level1_temperature=0.5)
    with pytest.raises(ValueError, match="temperatures and top-k must be >= 0"):
        il.Sampling.for_task("t2i", level1_temperature=-1.0)
    with pytest.raises(ValueError, match="greedy and takes no overrides.*temperature"):
        il.Sampling.for_task("understand", temperature=1.0)
    with pytest.raises(ValueError, match="top_p"):
        il.Sampling.for_task("t2i", top_p=0.0)
    with pytest.raises(ValueError, match="task 'caption'"):
        il.Sampling.for_task("caption")


def test_warps_at_their_limits_are_greedy():
    logits = jax.random.normal(jax.random.key(1), (6, V))
    level = jnp.asarray([0, 1, 2, 0, 1, 2])
    greedy = np.asarray(jnp.argmax(logits, -1))
    for sampling in (il.Sampling(top_k=(1, 1, 1)), il.Sampling(top_p=(1e-6, 1e-6, 1e-6)),
                     il.Sampling(temperature=(0.0, 0.0, 0.0))):
        for seed in range(3):
            out = il.warp_and_sample(logits, level, sampling, jax.random.key(seed))
            np.testing.assert_array_equal(np.asarray(out), greedy)
    # top-k 2 samples only from the best two ids.
    out = [int(il.warp_and_sample(logits[:1], level[:1], il.Sampling(top_k=(2, 2, 2)), jax.random.key(s))[0])
           for s in range(40)]
    assert set(out) <= set(np.argsort(-np.asarray(logits[0]))[:2].tolist()) and len(set(out)) == 2


def test_guided_scores_are_log_prob_cfg_in_image_mode_only():
    """Official CFG: g * (logp_c - logp_u) + logp_u in image mode, logp_c in text mode; ours may
    differ by a per-row constant only (the same distribution after any mask)."""
    logits = jax.random.normal(jax.random.key(2), (4, V))
    st = il.RowState.start(np.array([[1, 1, 1, 1]] * 2), True, True)
    st = st.replace(phase=jnp.asarray([il.TEXT, il.LEVEL0]))
    out = np.asarray(jax.nn.log_softmax(il.guided_scores(logits, st, 3.0), -1))
    lp = np.asarray(jax.nn.log_softmax(logits, -1))
    np.testing.assert_allclose(out[0], lp[0], rtol=1e-5, atol=1e-5)
    official = 3.0 * (lp[1] - lp[3]) + lp[3]
    np.testing.assert_allclose(out[1], official - jax.nn.logsumexp(official), rtol=1e-5, atol=1e-5)


def test_windowed_head_samples_what_the_full_vocabulary_samples(tiny):
    """next_tokens_from_hidden computes logits of one level's range (or none): same ids as the
    full-vocabulary processor for forced, level-0, level-1 and mixed batches."""
    cfg, model = tiny
    v = cfg.vocab
    hidden = jax.random.normal(jax.random.key(4), (4, cfg.llm.d_model)) * 3
    grids = np.array([[2, 3, 3, 4]] * 2)
    full = model.llm.logits(hidden[:, None])[:, 0]
    # Jitted once per sampling setting (op by op, every call re-traced the lax.switch branches).
    from_full = jax.jit(lambda st, key, s: il.next_tokens(full, st, s, key, v, EOS, 0), static_argnums=2)
    from_hidden = jax.jit(lambda st, key, s: il.next_tokens_from_hidden(model.llm, hidden, st, s, key, v, EOS, 0),
                          static_argnums=2)
    for phases, cols, rows in (([il.LEVEL0, il.LEVEL0], [0, 1], [0, 1]), ([il.LEVEL1, il.LEVEL1], [0, 2], [1, 2]),
                               ([il.LEVEL0, il.LEVEL1], [1, 0], [0, 0]), ([il.EXPECT_SOL1, il.LEVEL0], [0, 3], [0, 1]),
                               ([il.TEXT, il.LEVEL1], [0, 0], [0, 0])):
        st = il.RowState.start(grids, True, True).replace(
            phase=jnp.asarray(phases), col=jnp.asarray(cols), row=jnp.asarray(rows))
        for sampling in (il.Sampling(temperature=(1.0, 1.0, 1.0), guidance_scale=2.0),
                         il.Sampling(top_k=(5, 5, 5), top_p=(0.9, 0.9, 0.9), guidance_scale=2.0)):
            for seed in range(3):
                key = jax.random.key(seed)
                a = from_full(st, key, sampling)
                b = from_hidden(st, key, sampling)
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{phases} {sampling}")


def test_guidance_on_hidden_states_equals_guidance_on_logits(tiny):
    """The loop combines the CFG branches before the head (`guided_hidden`): the logits equal
    `guided_scores` of both branches' logits up to rounding, and are exactly the conditional
    logits at guidance 1 and in text mode."""
    cfg, model = tiny
    hidden = jax.random.normal(jax.random.key(6), (4, cfg.llm.d_model)) * 3
    st = il.RowState.start(np.array([[2, 3, 3, 4]] * 2), True, True).replace(phase=jnp.asarray([il.TEXT, il.LEVEL1]))
    full = model.llm.logits(hidden[:, None])[:, 0]
    ref = np.asarray(il.guided_scores(full, st, 2.5))
    ours = np.asarray(model.llm.head(il.guided_hidden(model.llm, hidden, st, 2.5)[:, None])[:, 0])
    np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max(), rtol=1e-5)
    np.testing.assert_array_equal(ours[0], np.asarray(full[0]))                  # text mode: cond only
    at_one = model.llm.head(il.guided_hidden(model.llm, hidden, st, 1.0)[:, None])[:, 0]
    np.testing.assert_array_equal(np.asarray(at_one), np.asarray(full[:2]))


# -- the jitted loop on a tiny MLLM ---------------------------------------------------------------

def _tiny_mllm_cfg(**options) -> mllm.MLLMConfig:
    """The `tiny` tokenizer's MLLM config on a 32-wide LLM, with the not-official `options` on."""
    tok = dualvitok_config.model_config("tiny")
    rows = 40 + 7 + 32 + tok.semantic_codes + tok.pixel_codes + 3   # text + added ids + padding
    return mllm.MLLMConfig.create(common.llm_config(text_vocab_size=40, vocab_size=rows, d_model=32, num_heads=2,
                                                    num_kv_heads=1, mlp_dim=64), tok, **options)


@pytest.fixture(scope="module")
def tiny():
    cfg = _tiny_mllm_cfg()
    return cfg, mllm.create_mllm(cfg, seed=3)


def _edit_like_prompts(cfg, n_rows, rng):
    """Rows: text, a continuous 32x32 image block, text, then <start_of_image> (left-padded to one length)."""
    t = mllm.block_template(cfg.grids(32, 32), cfg.vocab, continuous=True)
    rows = []
    for r in range(n_rows):
        head = rng.integers(3, 40, size=2 + r % 3)
        ids = np.concatenate([head, t.ids.clip(0), rng.integers(3, 40, size=3), [cfg.vocab.soi]])
        slots = np.concatenate([np.zeros(len(head)), t.slots, np.zeros(4)])
        cells = np.concatenate([np.zeros(len(head)), t.cells, np.zeros(4)])
        rows.append((ids, slots, cells))
    P = max(len(r[0]) for r in rows)
    pad = lambda a: np.concatenate([np.zeros(P - len(a)), a]).astype(np.int32)
    tokens = np.stack([pad(r[0]) for r in rows])
    mask = np.stack([pad(np.ones(len(r[0]))) for r in rows])
    images = rng.uniform(-1, 1, size=(n_rows, 1, 32, 32, 3)).astype(np.float32)
    slots, cells = (jnp.asarray(np.stack([pad(r[i]) for r in rows])) for i in (1, 2))
    codes = None
    if cfg.source_copy:   # random tokenizer codes of the images (what the copy path copies)
        n0, n1 = cfg.cells_per_image(32, 32)
        codes = mllm.input_codes(slots, cells, jnp.asarray(rng.integers(0, cfg.vocab.semantic_codes, (n_rows, n0))),
                                 jnp.asarray(rng.integers(0, cfg.vocab.pixel_codes, (n_rows, n1))))
    return il.Prompts(jnp.asarray(tokens), jnp.asarray(mask), slots, cells, jnp.asarray(images), codes)


def _eager_reference(model, prompts, state, rng, vocab, sampling, n_new, new_slots=()):
    """Recomputes the whole sequence every step (no cache), one token at a time. (The sampling
    step is the loop's own; its windowed head is checked against full logits separately.)
    new_slots: the slots of the tokens to come, from the block layout, as a training row has them
    (a cell embedding reads the slot of the code each position predicts)."""
    R = prompts.tokens.shape[0]
    B = state.phase.shape[0]
    tokens, mask = np.asarray(prompts.tokens), np.asarray(prompts.mask)
    slots, cells = np.asarray(prompts.slots), np.asarray(prompts.cells)
    L = tokens.shape[1] + n_new
    buf = np.zeros((R, L), np.int32)
    buf[:, :tokens.shape[1]] = tokens
    seg = np.zeros((R, L), np.int32)
    seg[:, :tokens.shape[1]] = mask
    slot_buf = np.zeros((R, L), np.int32)
    slot_buf[:, :tokens.shape[1]] = slots
    slot_buf[:, tokens.shape[1]:tokens.shape[1] + len(new_slots)] = new_slots
    cell_buf = np.zeros((R, L), np.int32)
    cell_buf[:, :tokens.shape[1]] = cells
    forward = jax.jit(lambda b, s, c, p, sg: model.llm(inputs_embeds=model.embed(b, s, c, prompts.images),
                                                       positions=p, segment_ids=sg, return_hidden=True))
    # The per-step sampling is jitted too (once): run op by op it re-traced its lax.switch
    # branches every step (~2.5 min of the suite on 2 cores).
    sample = jax.jit(lambda h, st, k, cp: il.next_tokens_from_hidden(model.llm, h, st, sampling, k, vocab, EOS, 0,
                                                                     copy=None if cp is None
                                                                     else (model.source_copy, *cp)))
    code_buf = None
    if model.cfg.source_copy:   # the source's codes as training reads them off the whole sequence
        code_buf = np.full((R, L), -1, np.int32)
        code_buf[:, :tokens.shape[1]] = np.asarray(prompts.codes)
        copy_targets = jax.jit(lambda s, c: mllm.source_code_targets(s, c)[1:])
    advance = jax.jit(lambda st, t: il.advance(st, t, vocab, EOS))
    out = []
    for i in range(n_new):
        P = tokens.shape[1] + i
        pos = np.maximum(np.cumsum(seg, 1) - 1, 0)
        hidden = forward(buf, slot_buf, cell_buf, pos, seg)[:, P - 1]
        cp = None
        if code_buf is not None:
            code, valid = copy_targets(slot_buf[:B], code_buf[:B])
            cp = (code[:, P - 1], valid[:, P - 1])
        tok = np.asarray(sample(hidden, state, jax.random.fold_in(rng, i), cp))
        state = advance(state, jnp.asarray(tok))
        out.append(tok)
        buf[:, P] = np.tile(tok, R // B)
        seg[:, P] = 1

    return np.stack(out, 1), state


@pytest.fixture(scope="module")
def tiny_cells():
    """`tiny` with a cell embedding (not official): generation adds it from the rows' counters, the
    eager reference from the slots of the whole sequence, as training does."""
    cfg = _tiny_mllm_cfg(cell_embedding=True)
    model = mllm.create_mllm(cfg, seed=3)
    # Large cell vectors, so a cell given wrongly anywhere changes the samples.
    model.cell_embed.rows[...] = model.cell_embed.rows[...] * 50
    model.cell_embed.cols[...] = model.cell_embed.cols[...] * 50
    return cfg, model


@pytest.fixture(scope="module")
def tiny_neighbours():
    """`tiny` with the not-official embeddings: the cell's vectors, the codes drawn above it, the
    semantic code over it and the prompt's image's same cell, and the copy bonus on that cell's code.
    Generation reads the codes from its per-row buffer and the source cells and codes from its prompt, the
    eager reference from the whole sequence (`neighbour_code_targets`, `parent_code_targets`,
    `source_cell_targets`, `source_code_targets`), as training does."""
    cfg = _tiny_mllm_cfg(cell_embedding=True, neighbour_codes=True, parent_codes=True, source_cells=True,
                         source_copy=True)
    model = mllm.create_mllm(cfg, seed=3)
    model.cell_embed.rows[...] = model.cell_embed.rows[...] * 50
    model.cell_embed.cols[...] = model.cell_embed.cols[...] * 50
    # Zero at initialisation; large random vectors, so a code read wrongly anywhere changes the samples.
    k = jax.random.split(jax.random.key(0), 3)
    model.neighbour_embed.level0[...] = 3 * jax.random.normal(k[0], model.neighbour_embed.level0.shape)
    model.neighbour_embed.level1[...] = 3 * jax.random.normal(k[1], model.neighbour_embed.level1.shape)
    model.parent_embed.table[...] = 3 * jax.random.normal(k[2], model.parent_embed.table.shape)
    kernel = model.source_embed.proj.kernel
    kernel[...] = 3 * jax.random.normal(jax.random.key(9), kernel.shape)   # and a source cell read wrongly
    model.source_copy.gate[...] = jax.random.normal(jax.random.key(10), model.source_copy.gate.shape)
    model.source_copy.bias[...] = jnp.asarray([0.4, 0.4])                  # and a source code copied wrongly
    return cfg, model


def test_generation_reads_the_codes_above_and_over_as_training_does():
    """Feeding a drawn block token by token through `advance` (with a code buffer), the codes
    `next_neighbour_codes` and `next_parent_code` give at each step are those `neighbour_code_targets`
    and `parent_code_targets` read off the same block at the position just fed; without a buffer they
    say what is missing."""
    vocab = mllm.ImageVocab(first_id=40, semantic_codes=16, pixel_codes=24)
    rng = np.random.default_rng(2)
    for grids, strides in ((((2, 3), (4, 5)), (4, 8)), (((3, 2), (5, 4)), (4, 8)), (((2, 2), (8, 8)), (2, 8))):
        t = mllm.block_template(grids, vocab, continuous=False)
        block = mllm.block_ids(t, rng.integers(0, 16, grids[0]), rng.integers(0, 24, grids[1]), vocab)
        level, codes, valid = (np.asarray(a)[0] for a in mllm.neighbour_code_targets(
            jnp.asarray(block[None]), jnp.asarray(t.slots[None]), vocab))
        parent, parent_ok = (np.asarray(a)[0] for a in mllm.parent_code_targets(
            jnp.asarray(block[None]), jnp.asarray(t.slots[None]), vocab, *strides))
        st = il.RowState.start([[*grids[0], *grids[1]]], True, True, phase=il.EXPECT_SOL0)
        with pytest.raises(ValueError, match="no code buffer"):
            il.next_neighbour_codes(st)
        with pytest.raises(ValueError, match="no code buffer"):
            il.next_parent_code(st, *strides)
        st = st.replace(codes=jnp.zeros((1, 2, 64), jnp.int32))   # room for the largest level (8 x 8)
        for p in range(1, len(block) - 1):    # block[0] is the prompt's <start_of_image>
            st = il.advance(st, jnp.asarray(block[p:p + 1]), vocab, EOS)
            lv, c, ok = (np.asarray(a)[0] for a in il.next_neighbour_codes(st))
            assert lv == level[p], f"{grids} position {p}"
            np.testing.assert_array_equal(ok, valid[p], err_msg=f"{grids} position {p}")
            np.testing.assert_array_equal(np.where(ok, c, 0), codes[p], err_msg=f"{grids} position {p}")
            pc, pok = (np.asarray(a)[0] for a in il.next_parent_code(st, *strides))
            assert pok == parent_ok[p] and pc == parent[p], f"{grids} position {p}"


def test_generation_reads_the_source_cells_as_training_does():
    """The cell `next_source_cell` reads from the prompt's image (`source_cells_from_prompt`) at each step
    of a drawn block is the one `source_cell_targets` points at in the whole sequence, for left-padded
    prompts whose images have the output's grid, a smaller one, or none."""
    vocab = mllm.ImageVocab(first_id=40, semantic_codes=16, pixel_codes=24)
    grids = ((2, 3), (4, 5))
    t_out = mllm.block_template(grids, vocab, continuous=False)
    block = mllm.block_ids(t_out, np.zeros(grids[0], int), np.zeros(grids[1], int), vocab)
    for src_grids in (grids, ((1, 2), (3, 3)), None):
        t_in = mllm.block_template(src_grids, vocab, continuous=True) if src_grids else None
        prompt = np.concatenate([[0, 0, 0, 5], t_in.slots if t_in else [], [0, 0]]).astype(np.int32)
        P = len(prompt)
        seq = np.concatenate([prompt, t_out.slots[1:]])   # the prompt ends with <start_of_image>
        src, valid = (np.asarray(a)[0] for a in mllm.source_cell_targets(jnp.asarray(seq[None])))
        embeds = jax.random.normal(jax.random.key(1), (1, P, 4))
        feats, sgrids = il.source_cells_from_prompt(embeds, jnp.asarray(prompt[None]), 32)
        source = il.SourceCells(feats=feats, grids=sgrids)
        assert np.asarray(sgrids)[0].tolist() == ([*src_grids[0], *src_grids[1]] if src_grids else [0] * 4)
        st = il.RowState.start([[*grids[0], *grids[1]]], True, True, phase=il.EXPECT_SOL0)
        for p in range(1, len(block) - 1):    # block[0] is the prompt's <start_of_image>
            st = il.advance(st, jnp.asarray(block[p:p + 1]), vocab, EOS)
            got = np.asarray(il.next_source_cell(*il.next_cell(st), source))[0]
            q = P - 1 + p                     # the position just fed, in the whole sequence
            want = np.asarray(embeds)[0, src[q]] if valid[q] else np.zeros(4)
            np.testing.assert_allclose(got, want, err_msg=f"{src_grids} position {q}")
        assert valid.sum() == (sum(min(a, c) * min(b, d) for (a, b), (c, d) in zip(grids, src_grids))
                               if src_grids else 0)


def test_generation_reads_the_source_codes_as_training_does():
    """The code `next_source_code` reads from the prompt's codes at each step of a drawn block is the one
    `source_code_targets` gives in the whole sequence, for source images of the output's grid, a smaller
    one, or none."""
    vocab = mllm.ImageVocab(first_id=40, semantic_codes=16, pixel_codes=24)
    grids = ((2, 3), (4, 5))
    t_out = mllm.block_template(grids, vocab, continuous=False)
    block = mllm.block_ids(t_out, np.zeros(grids[0], int), np.zeros(grids[1], int), vocab)
    rng = np.random.default_rng(3)
    for src_grids in (grids, ((1, 2), (3, 3)), None):
        t_in = mllm.block_template(src_grids, vocab, continuous=True) if src_grids else None
        prompt = np.concatenate([[0, 0, 0, 5], t_in.slots if t_in else [], [0, 0]]).astype(np.int32)
        P = len(prompt)
        codes = np.where((prompt == mllm.SLOT_SEM_IN) | (prompt == mllm.SLOT_PIX_IN), rng.integers(0, 16, P), -1)
        seq = np.concatenate([prompt, t_out.slots[1:]])
        seq_codes = np.concatenate([codes, np.full(len(seq) - P, -1)])
        _, want_code, want_ok = (np.asarray(a)[0] for a in mllm.source_code_targets(
            jnp.asarray(seq[None]), jnp.asarray(seq_codes[None])))
        feats, sgrids = il.source_cells_from_prompt(jnp.asarray(codes[None, :, None]), jnp.asarray(prompt[None]), 32)
        source = il.SourceCells(feats=feats, grids=sgrids)
        st = il.RowState.start([[*grids[0], *grids[1]]], True, True, phase=il.EXPECT_SOL0)
        for p in range(1, len(block) - 1):
            st = il.advance(st, jnp.asarray(block[p:p + 1]), vocab, EOS)
            code, ok = (np.asarray(a)[0] for a in il.next_source_code(*il.next_cell(st), source))
            q = P - 1 + p
            assert ok == want_ok[q] and code == want_code[q], f"{src_grids} position {q}"
        assert want_ok.sum() == (sum(min(a, c) * min(b, d) for (a, b), (c, d) in zip(grids, src_grids))
                                 if src_grids else 0)


@pytest.mark.parametrize("mixture", [False, True])
def test_a_strong_copy_path_draws_the_source_codes_under_cfg(mixture):
    """A copy bonus of 50 nats (or a mixture gate of sigmoid(50)): every code drawn (sampled, guidance 2) is
    the conditional row's source code of its cell; the prompts' images without their codes are refused."""
    cfg = _tiny_mllm_cfg(source_copy=True, copy_mixture=mixture)
    model = mllm.create_mllm(cfg, seed=3)
    model.source_copy.bias[...] = jnp.asarray([5.0, 5.0])
    B = 2
    prompts = _edit_like_prompts(cfg, 2 * B, np.random.default_rng(5))
    grids = cfg.grids(32, 32)
    state = il.RowState.start([[*grids[0], *grids[1]]] * B, True, True, phase=il.EXPECT_SOL0)
    kw = dict(vocab=cfg.vocab, sampling=il.Sampling(temperature=(1.0, 1.0, 1.0), top_k=(0, 0, 0),
                                                    top_p=(1.0, 1.0, 1.0), guidance_scale=2.0),
              max_new_tokens=mllm.block_length(grids) - 1, eos_id=EOS)
    out, _ = il.generate(model, prompts, state, jax.random.key(1), **kw)
    slots, codes = np.asarray(prompts.slots), np.asarray(prompts.codes)
    for r in range(B):
        sem, pix = mllm.parse_block(np.concatenate([[cfg.vocab.soi], np.asarray(out)[r]]), grids, cfg.vocab)
        for got, slot in ((sem, mllm.SLOT_SEM_IN), (pix, mllm.SLOT_PIX_IN)):
            np.testing.assert_array_equal(got.reshape(-1), codes[r][slots[r] == slot], err_msg=f"row {r}")
    with pytest.raises(ValueError, match="prompts.codes"):
        il.generate(model, prompts.replace(codes=None), state, jax.random.key(1), **kw)


@pytest.fixture(scope="module")
def tiny_mixture():
    """`tiny` with the copy as a mixture (`copy_mixture`, not official) and a random gate of mean 0.5:
    generation reads the source's codes from its prompt, the eager reference off the whole sequence."""
    cfg = _tiny_mllm_cfg(source_copy=True, copy_mixture=True)
    model = mllm.create_mllm(cfg, seed=3)
    model.source_copy.gate[...] = 0.3 * jax.random.normal(jax.random.key(10), model.source_copy.gate.shape)
    model.source_copy.bias[...] = jnp.asarray([0.0, 0.0])
    return cfg, model


@pytest.mark.parametrize("which", ["tiny", "tiny_cells", "tiny_neighbours", "tiny_mixture"])
def test_jitted_generation_equals_the_eager_reference_with_cfg(which, request):
    cfg, model = request.getfixturevalue(which)
    rng = np.random.default_rng(0)
    B = 2
    prompts = _edit_like_prompts(cfg, 2 * B, rng)   # rows 0-1 conditional, 2-3 unconditional
    grids = cfg.grids(32, 32)
    state = il.RowState.start([[*grids[0], *grids[1]]] * B, True, True, phase=il.EXPECT_SOL0)
    sampling = il.Sampling(temperature=(1.0, 1.0, 1.5), top_k=(0, 8, 20), top_p=(1.0, 0.9, 0.95),
                           guidance_scale=2.0)
    n_new = mllm.block_length(grids) - 1 + 2       # the rest of the block + 2 steps after it
    key = jax.random.key(7)
    out, final = il.generate(model, prompts, state, key, vocab=cfg.vocab, sampling=sampling,
                             max_new_tokens=n_new, eos_id=EOS)
    block = mllm.block_template(grids, cfg.vocab, continuous=False)
    ref, _ = _eager_reference(model, prompts, state, key, cfg.vocab, sampling, n_new, block.slots[1:])
    np.testing.assert_array_equal(np.asarray(out), ref)
    copied = []
    for r in range(B):
        seq = np.concatenate([[cfg.vocab.soi], np.asarray(out)[r]])
        sem, pix = mllm.parse_block(seq, grids, cfg.vocab)
        if which == "tiny_mixture":   # the mixture is at work: about half the codes are the source's
            slots, codes = np.asarray(prompts.slots)[r], np.asarray(prompts.codes)[r]
            copied += [sem.reshape(-1) == codes[slots == mllm.SLOT_SEM_IN],
                       pix.reshape(-1) == codes[slots == mllm.SLOT_PIX_IN]]
    if copied:
        assert 0.25 < np.concatenate(copied).mean() < 0.9
    assert (np.asarray(final.phase) == il.DONE).all()
    assert (np.asarray(out)[:, -2:] == 0).all()  # finished rows emit padding


def test_scanned_and_unstacked_loops_sample_the_same_tokens(tiny):
    """The accelerator path (scan over the stacked layers and cache) and the CPU default (per-layer
    weights and cache buffers) are the same sampler: same seed, same tokens. (The CPU default is
    the one checked against the eager reference above.)"""
    cfg, model = tiny
    B = 2
    prompts = _edit_like_prompts(cfg, 2 * B, np.random.default_rng(4))
    grids = cfg.grids(32, 32)
    state = il.RowState.start([[*grids[0], *grids[1]]] * B, True, True, phase=il.EXPECT_SOL0)
    kw = dict(vocab=cfg.vocab, sampling=il.Sampling(temperature=(1.0, 1.0, 1.0), top_k=(0, 8, 20),
                                                    guidance_scale=2.0),
              max_new_tokens=mllm.block_length(grids) - 1, eos_id=EOS)
    scanned, _ = il.generate(model, prompts, state, jax.random.key(5), unstack_layers=False, **kw)
    unstacked, _ = il.generate(model, prompts, state, jax.random.key(5), unstack_layers=True, **kw)
    np.testing.assert_array_equal(np.asarray(unstacked), np.asarray(scanned))


def test_cfg_with_guidance_one_equals_plain_sampling(tiny):
    cfg, model = tiny
    rng = np.random.default_rng(1)
    B = 2
    prompts = _edit_like_prompts(cfg, 2 * B, rng)
    cond_only = il.Prompts(prompts.tokens[:B], prompts.mask[:B], prompts.slots[:B], prompts.cells[:B],
                           prompts.images[:B])
    grids = cfg.grids(32, 32)
    state = il.RowState.start([[*grids[0], *grids[1]]] * B, True, True, phase=il.EXPECT_SOL0)
    n_new = mllm.block_length(grids) - 1
    kw = dict(vocab=cfg.vocab, max_new_tokens=n_new, eos_id=EOS)
    sampling = il.Sampling(temperature=(1.0, 1.0, 1.0), guidance_scale=1.0)
    with_cfg, _ = il.generate(model, prompts, state, jax.random.key(3), sampling=sampling, **kw)
    plain, _ = il.generate(model, cond_only, state, jax.random.key(3), sampling=sampling, **kw)
    np.testing.assert_array_equal(np.asarray(with_cfg), np.asarray(plain))
    guided, _ = il.generate(model, prompts, state, jax.random.key(3),
                            sampling=il.Sampling(temperature=(1.0, 1.0, 1.0), guidance_scale=300.0), **kw)
    # (A random tiny model's cond / uncond log-probs differ by ~1e-3: a large scale makes it visible.)
    assert (np.asarray(guided) != np.asarray(plain)).any()
