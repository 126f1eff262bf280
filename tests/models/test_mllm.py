"""The MLLM's token layout (spec §3.2), the shared image-block skeleton (§3.3/§3.4) for every
anchor, code filling and feature splicing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from configs import dualvitok as dualvitok_config
from illume_jax.models import dualvitok, mllm
from tests.models.test_dualvitok import SPEC_TABLE, official_cfg

OFFICIAL = mllm.ImageVocab()  # Qwen2.5 text vocabulary + DualViTok codebooks


def test_official_token_ids():
    v = OFFICIAL
    assert (v.soi, v.eoi, v.eol) == (151665, 151666, 151667)
    assert [v.structure(k) for k in (mllm.SOL0, mllm.EOL0, mllm.SOL1, mllm.EOL1)] == [151668, 151669, 151670, 151671]
    assert v.height_tag(64) == 151672 and v.height_tag(1024) == 151687
    assert v.width_tag(64) == 151688 and v.width_tag(1024) == 151703
    assert v.height_tag(256) == 151671 + 256 // 64 and v.width_tag(256) == 151687 + 256 // 64
    assert (v.level0_start, v.level1_start, v.end) == (151704, 184472, 282776)
    assert v.end - v.first_id == 131111
    assert v.tag_value(151675) == ("height", 256) and v.tag_value(151691) == ("width", 256)
    assert v.tag_value(v.soi) is None and v.tag_value(v.level0_start) is None


def test_bad_resolution_tag_is_named():
    with pytest.raises(ValueError, match="height 250"):
        OFFICIAL.height_tag(250)
    with pytest.raises(ValueError, match="width 2048"):
        OFFICIAL.width_tag(2048)


@pytest.mark.parametrize("hw", sorted(SPEC_TABLE))
def test_block_template_matches_spec_table_for_every_anchor(hw):
    grids = dualvitok.token_grids(*hw, official_cfg())
    length = SPEC_TABLE[hw][2]
    for continuous in (False, True):
        t = mllm.block_template(grids, OFFICIAL, continuous=continuous)
        assert len(t) == length == mllm.block_length(grids)
    (h1, w1), (h2, w2) = grids
    out = mllm.block_template(grids, OFFICIAL, continuous=False)
    inp = mllm.block_template(grids, OFFICIAL, continuous=True)
    # One skeleton: structure ids at the same places, slots differ only in direction.
    np.testing.assert_array_equal(out.ids, inp.ids)
    assert (out.slots == mllm.SLOT_SEM_OUT).sum() == (inp.slots == mllm.SLOT_SEM_IN).sum() == h1 * w1
    assert (out.slots == mllm.SLOT_PIX_OUT).sum() == (inp.slots == mllm.SLOT_PIX_IN).sum() == h2 * w2
    structure = out.ids[out.slots == mllm.SLOT_TEXT]
    eol = OFFICIAL.eol
    assert (structure == eol).sum() == h1 + h2  # every row carries an EOL
    assert list(structure[:2]) == [OFFICIAL.soi, OFFICIAL.structure(mllm.SOL0)]
    assert list(structure[-3:]) == [eol, OFFICIAL.structure(mllm.EOL1), OFFICIAL.eoi]


def test_worked_example_256():
    """Spec §4.6: 9 rows of 9 level-0 ids + EOL, EOL0, SOL1, 16 rows of 16 level-1 ids + EOL, EOL1, EOI."""
    grids = ((9, 9), (16, 16))
    rng = np.random.default_rng(0)
    sem, pix = rng.integers(0, 32768, (9, 9)), rng.integers(0, 98304, (16, 16))
    ids = mllm.block_ids(mllm.block_template(grids, OFFICIAL, continuous=False), sem, pix, OFFICIAL)
    assert len(ids) == 368
    assert list(ids[:2]) == [151665, 151668]
    assert list(ids[2:11]) == list(sem[0] + 151704) and ids[11] == 151667
    assert ids[2 + 9 * 10] == 151669 and ids[2 + 9 * 10 + 1] == 151670
    assert list(ids[94:110]) == list(pix[0] + 184472) and ids[110] == 151667
    assert list(ids[-2:]) == [151671, 151666]
    back_sem, back_pix = mllm.parse_block(ids, grids, OFFICIAL)
    np.testing.assert_array_equal(back_sem, sem)
    np.testing.assert_array_equal(back_pix, pix)


def test_one_level_blocks_for_the_original_illume():
    """ILLUME's semantic VQ: SOI, SOL0, rows of codes + EOL, EOL0, EOI -- ILLUME+'s skeleton without level 1,
    in a vocabulary without pixel codes (its codes end where level 1 would start)."""
    vocab = mllm.ImageVocab(first_id=32000, semantic_codes=16384, pixel_codes=0)
    assert vocab.level0_start == 32000 + 7 + 32 and vocab.end == vocab.level1_start == 32000 + 39 + 16384
    grids = ((16, 16), (0, 0))
    t = mllm.block_template(grids, vocab, continuous=False)
    assert len(t) == mllm.block_length(grids) == 4 + 16 * 17 == 276
    codes = np.random.default_rng(0).integers(0, 16384, (16, 16))
    ids = mllm.block_ids(t, codes, np.zeros((0, 0), int), vocab)
    assert list(ids[:2]) == [vocab.soi, vocab.structure(mllm.SOL0)]
    assert list(ids[2:18]) == list(codes[0] + vocab.level0_start) and ids[18] == vocab.eol
    assert list(ids[-2:]) == [vocab.structure(mllm.EOL0), vocab.eoi]
    sem, pix = mllm.parse_block(ids, grids, vocab)
    np.testing.assert_array_equal(sem, codes)
    assert pix.shape == (0, 0)
    inp = mllm.block_template(grids, vocab, continuous=True)
    assert (inp.slots == mllm.SLOT_SEM_IN).sum() == 256 and not np.isin(inp.slots, [mllm.SLOT_PIX_IN,
                                                                                     mllm.SLOT_PIX_OUT]).any()
    for bad in (((16, 16), (0, 4)), ((0, 16), (0, 0))):
        with pytest.raises(ValueError, match="image block grids"):
            mllm.block_template(bad, vocab, continuous=False)
    # Codes of an empty level: fill_codes / input_codes take a [B, 0] pixel code array.
    slots = jnp.asarray(np.concatenate([inp.slots, t.slots])[None])
    cells = jnp.asarray(np.concatenate([inp.cells, t.cells])[None])
    sem_codes = jnp.asarray(codes.reshape(1, -1))
    filled = mllm.fill_codes(jnp.zeros_like(slots), slots, cells, sem_codes, jnp.zeros((1, 0), jnp.int32), vocab)
    np.testing.assert_array_equal(np.asarray(filled[0, len(t):])[t.slots == mllm.SLOT_SEM_OUT],
                                  codes.reshape(-1) + vocab.level0_start)
    got = mllm.input_codes(slots, cells, sem_codes, jnp.zeros((1, 0), jnp.int32))
    np.testing.assert_array_equal(np.asarray(got[0, :len(t)])[inp.slots == mllm.SLOT_SEM_IN], codes.reshape(-1))


def test_parse_block_names_the_broken_position():
    grids = ((2, 2), (2, 3))
    t = mllm.block_template(grids, OFFICIAL, continuous=False)
    ids = mllm.block_ids(t, np.zeros((2, 2), int), np.ones((2, 3), int), OFFICIAL)
    bad = ids.copy()
    bad[4] = OFFICIAL.eol + 5
    with pytest.raises(ValueError, match="position 4"):
        mllm.parse_block(bad, grids, OFFICIAL)
    swapped = ids.copy()
    swapped[2] = OFFICIAL.level1_start  # a pixel code where a semantic code belongs
    with pytest.raises(ValueError, match="position 2"):
        mllm.parse_block(swapped, grids, OFFICIAL)
    with pytest.raises(ValueError, match="expected 3x2|semantic 2x2"):
        mllm.block_ids(t, np.zeros((3, 2), int), np.ones((2, 3), int), OFFICIAL)


def test_fill_codes_writes_each_image_cells():
    v = mllm.ImageVocab(first_id=10, semantic_codes=5, pixel_codes=7)
    grids = ((1, 2), (2, 2))
    t = mllm.block_template(grids, v, continuous=False)
    # One row with two images: cells = image * cells_per_image + cell.
    tokens = np.concatenate([t.ids, t.ids]).clip(0)[None]
    slots = np.concatenate([t.slots, t.slots])[None]
    cells = np.concatenate([t.cells, t.cells + np.where(t.slots == mllm.SLOT_SEM_OUT, 2, 4)])[None]
    sem = np.array([[1, 2, 3, 4]])            # image 0: [1,2], image 1: [3,4]
    pix = np.array([[0, 1, 2, 3, 6, 5, 4, 3]])
    out = np.asarray(mllm.fill_codes(jnp.asarray(tokens), jnp.asarray(slots), jnp.asarray(cells),
                                     jnp.asarray(sem), jnp.asarray(pix), v))[0]
    first = mllm.block_ids(t, sem[0, :2].reshape(1, 2), pix[0, :4].reshape(2, 2), v)
    second = mllm.block_ids(t, sem[0, 2:].reshape(1, 2), pix[0, 4:].reshape(2, 2), v)
    np.testing.assert_array_equal(out, np.concatenate([first, second]))


def test_config_checks_vocabulary_rows():
    tok = dualvitok_config.model_config("tiny")
    with pytest.raises(ValueError, match="vocab_size=120 is too small"):
        mllm.MLLMConfig.create(common.llm_config(text_vocab_size=100, vocab_size=120), tok)
    added = 7 + 32 + tok.semantic_codes + tok.pixel_codes   # structure + resolution tags + both books
    cfg = mllm.MLLMConfig.create(common.llm_config(text_vocab_size=100, vocab_size=100 + added + 5), tok)
    assert cfg.vocab.end == 100 + added


@pytest.fixture(scope="module")
def tiny_model():
    tok = dualvitok_config.model_config("tiny")
    rows = 100 + 7 + 32 + tok.semantic_codes + tok.pixel_codes + 5
    cfg = mllm.MLLMConfig.create(common.llm_config(text_vocab_size=100, vocab_size=rows, d_model=32, num_heads=2,
                                                   num_kv_heads=1, mlp_dim=64), tok)
    return cfg, mllm.create_mllm(cfg)


def _cell_rows(rng):
    """Two left-padded rows: text, an input block (grids (2,3) / (4,5)), text, two output blocks
    (grids (3,2) / (2,4)). -> slots [2,T] and the expected (level, row, col) from the templates."""
    vocab = mllm.ImageVocab(first_id=40, semantic_codes=16, pixel_codes=24)
    parts = [(mllm.block_template(((2, 3), (4, 5)), vocab, continuous=True), ((2, 3), (4, 5)))] + \
        [(mllm.block_template(((3, 2), (2, 4)), vocab, continuous=False), ((3, 2), (2, 4)))] * 2
    rows = []
    for pad in (0, 5):
        slots, want = [np.zeros(pad + 2, np.int32)], [np.full((pad + 2, 3), (-1, 0, 0))]
        for t, grids in parts:
            lv = np.where(np.isin(t.slots, (mllm.SLOT_SEM_IN, mllm.SLOT_SEM_OUT)), 0,
                          np.where(np.isin(t.slots, (mllm.SLOT_PIX_IN, mllm.SLOT_PIX_OUT)), 1, -1))
            w = np.where(lv == 0, grids[0][1], grids[1][1])
            want.append(np.stack([lv, np.where(lv >= 0, t.cells // w, 0), np.where(lv >= 0, t.cells % w, 0)], 1))
            slots.append(t.slots)
            n = int(rng.integers(1, 4))
            slots.append(np.zeros(n, np.int32))
            want.append(np.full((n, 3), (-1, 0, 0)))
        rows.append((np.concatenate(slots), np.concatenate(want)))
    T = max(len(r[0]) for r in rows)
    slots = np.stack([np.pad(r[0], (0, T - len(r[0]))) for r in rows])
    want = np.stack([np.concatenate([r[1], np.tile([(-1, 0, 0)], (T - len(r[1]), 1))]) for r in rows])
    return slots, want


def test_cell_coordinates_are_each_cells_row_and_column():
    slots, want = _cell_rows(np.random.default_rng(0))
    got = np.stack([np.asarray(a) for a in mllm.cell_coordinates(jnp.asarray(slots))], -1)
    np.testing.assert_array_equal(got, want)


def test_cell_embedding_targets_are_the_cell_read_or_the_cell_drawn_next():
    slots, own = _cell_rows(np.random.default_rng(1))
    got = np.stack([np.asarray(a) for a in mllm.cell_embedding_targets(jnp.asarray(slots))], -1)
    for b in range(slots.shape[0]):
        for p in range(slots.shape[1]):
            if slots[b, p] in (mllm.SLOT_SEM_IN, mllm.SLOT_PIX_IN):
                want = own[b, p]
            elif p + 1 < slots.shape[1] and slots[b, p + 1] in (mllm.SLOT_SEM_OUT, mllm.SLOT_PIX_OUT):
                want = own[b, p + 1]    # the position that predicts a code carries that code's cell
            else:
                want = (-1, 0, 0)
            np.testing.assert_array_equal(got[b, p], want, err_msg=f"row {b} position {p}")


def test_cell_embedding_adds_row_and_column_vectors_only_where_cells_are():
    tok = dualvitok_config.model_config("tiny")
    rows = 100 + 7 + 32 + tok.semantic_codes + tok.pixel_codes + 5
    llm = common.llm_config(text_vocab_size=100, vocab_size=rows, d_model=32, num_heads=2, num_kv_heads=1,
                            mlp_dim=64)
    cfg = mllm.MLLMConfig.create(llm, tok, cell_embedding=True)
    assert cfg.cell_table_side == max(max(g) for g in cfg.grids(1024, 1024))
    model = mllm.create_mllm(cfg, seed=2)
    with pytest.raises(ValueError, match="cell_embedding"):
        mllm.MLLMConfig.create(llm, tok, cell_embedding=1)
    assert not hasattr(mllm.create_mllm(mllm.MLLMConfig.create(llm, tok)), "cell_embed")  # official: no such param
    grids = cfg.grids(32, 32)
    t_in = mllm.block_template(grids, cfg.vocab, continuous=True)
    t_out = mllm.block_template(grids, cfg.vocab, continuous=False)
    rng = np.random.default_rng(0)
    drawn = mllm.block_ids(t_out, rng.integers(0, 4, grids[0]), rng.integers(0, 4, grids[1]), cfg.vocab)
    tokens = np.concatenate([[1, 2], t_in.ids.clip(0), [3], drawn])[None]
    slots = np.concatenate([[0, 0], t_in.slots, [0], t_out.slots])[None]
    cells = np.concatenate([[0, 0], t_in.cells, [0], t_out.cells])[None]
    images = jax.random.uniform(jax.random.key(0), (1, 1, 32, 32, 3), minval=-1, maxval=1)
    x = np.asarray(model.embed(jnp.asarray(tokens), jnp.asarray(slots), jnp.asarray(cells), images))
    # The same weights with the cell vectors zeroed: the spliced features and token embeddings alone.
    saved = model.cell_embed.rows[...], model.cell_embed.cols[...]
    model.cell_embed.rows[...] = jnp.zeros_like(saved[0])
    model.cell_embed.cols[...] = jnp.zeros_like(saved[1])
    plain = np.asarray(model.embed(jnp.asarray(tokens), jnp.asarray(slots), jnp.asarray(cells), images))
    model.cell_embed.rows[...], model.cell_embed.cols[...] = saved
    rows_t, cols_t = (np.asarray(a) for a in saved)
    level, row, col = (np.asarray(a)[0] for a in mllm.cell_embedding_targets(jnp.asarray(slots)))
    assert (level >= 0).sum() == (t_in.slots > 0).sum() + (t_out.slots > 0).sum()  # each read, each drawn
    for p in range(tokens.shape[1]):
        want = rows_t[level[p], row[p]] + cols_t[level[p], col[p]] if level[p] >= 0 else 0
        np.testing.assert_allclose(x[0, p] - plain[0, p], want, atol=1e-6, err_msg=f"position {p}")


def _tiny_neighbour_cfg(**kw):
    tok = dualvitok_config.model_config("tiny")
    rows = 100 + 7 + 32 + tok.semantic_codes + tok.pixel_codes + 5
    llm = common.llm_config(text_vocab_size=100, vocab_size=rows, d_model=32, num_heads=2, num_kv_heads=1,
                            mlp_dim=64)
    return mllm.MLLMConfig.create(llm, tok, **kw)


def _option_model(flag, attr):
    """(cfg, model) of a tiny MLLM with the not-official `flag` on, once the flag has refused a non-bool
    and the official model is seen to lack the option's parameter `attr`."""
    with pytest.raises(ValueError, match=flag):
        _tiny_neighbour_cfg(**{flag: 1})
    assert not hasattr(mllm.create_mllm(_tiny_neighbour_cfg()), attr)   # official: no such param
    cfg = _tiny_neighbour_cfg(**{flag: True})
    return cfg, mllm.create_mllm(cfg, seed=2)


def _edit_row(grids, v, seed):
    """A training row that reads an image and draws one: text, a continuous block, text, a drawn block
    of random codes. -> (tokens, slots, where the drawn block starts, its semantic and pixel codes)."""
    rng = np.random.default_rng(seed)
    t_in = mllm.block_template(grids, v, continuous=True)
    t_out = mllm.block_template(grids, v, continuous=False)
    sem = rng.integers(0, v.semantic_codes, grids[0])
    pix = rng.integers(0, v.pixel_codes, grids[1])
    tokens = np.concatenate([[5, 6], t_in.ids.clip(0), [7], mllm.block_ids(t_out, sem, pix, v)])
    slots = np.concatenate([[0, 0], t_in.slots, [0], t_out.slots])
    return tokens, slots, 2 + len(t_in.ids) + 1, sem, pix


@pytest.mark.parametrize("grids", [((2, 3), (4, 5)), ((3, 3), (6, 6))])
def test_neighbour_code_targets_are_the_codes_drawn_above(grids):
    """At the position that predicts code (r, c) of a level: that level's codes at (r-1, c-1..c+1),
    valid only on the grid and below the first row; nothing at text, structure or continuous positions.
    Checked against the codes' own grids, after a text prefix and an image read first (an edit row)."""
    v = _tiny_neighbour_cfg().vocab
    tokens, slots, out_at, sem, pix = _edit_row(grids, v, 0)
    t_out = mllm.block_template(grids, v, continuous=False)
    level, codes, valid = (np.asarray(a)[0] for a in mllm.neighbour_code_targets(
        jnp.asarray(tokens[None]), jnp.asarray(slots[None]), v))
    drawn = 0
    for p in range(len(tokens)):
        nxt = slots[p + 1] if p + 1 < len(slots) else 0
        if nxt not in (mllm.SLOT_SEM_OUT, mllm.SLOT_PIX_OUT):
            assert level[p] == -1 and not valid[p].any(), f"position {p}"
            continue
        drawn += 1
        lv = 0 if nxt == mllm.SLOT_SEM_OUT else 1
        grid, w = (sem, pix)[lv], grids[lv][1]
        r, c = divmod(int(t_out.cells[p + 1 - out_at]), w)
        assert level[p] == lv, f"position {p}"
        for k, dc in enumerate(mllm.NEIGHBOUR_OFFSETS):
            on = r >= 1 and 0 <= c + dc < w
            assert valid[p, k] == on, f"position {p}, offset {dc}"
            if on:
                assert codes[p, k] == grid[r - 1, c + dc], f"position {p}, offset {dc}"
    assert drawn == sem.size + pix.size


def _drawn_row(cfg, seed):
    """[1,T] tokens / slots / cells of a text-to-image row: two text ids, then a drawn 32x32 block of
    random codes (from the first 9 of each codebook, so codes repeat)."""
    grids = cfg.grids(32, 32)
    t = mllm.block_template(grids, cfg.vocab, continuous=False)
    rng = np.random.default_rng(seed)
    block = mllm.block_ids(t, rng.integers(0, 9, grids[0]), rng.integers(0, 9, grids[1]), cfg.vocab)
    return (np.concatenate([[1, 2], block])[None], np.concatenate([[0, 0], t.slots])[None],
            np.concatenate([[0, 0], t.cells])[None])


def test_neighbour_code_embedding_adds_the_vectors_of_the_codes_above():
    cfg, model = _option_model("neighbour_codes", "neighbour_embed")
    assert not np.asarray(model.neighbour_embed.level1[...]).any()   # zero at first: a fork starts unchanged
    k = jax.random.split(jax.random.key(1))
    model.neighbour_embed.level0[...] = jax.random.normal(k[0], model.neighbour_embed.level0.shape)
    model.neighbour_embed.level1[...] = jax.random.normal(k[1], model.neighbour_embed.level1.shape)
    tokens, slots, cells = _drawn_row(cfg, 3)
    x = np.asarray(model.embed(jnp.asarray(tokens), jnp.asarray(slots), jnp.asarray(cells)))
    plain = np.asarray(model.llm.embed_tokens(jnp.asarray(tokens)))
    tables = [np.asarray(model.neighbour_embed.level0[...]), np.asarray(model.neighbour_embed.level1[...])]
    level, codes, valid = (np.asarray(a)[0] for a in mllm.neighbour_code_targets(
        jnp.asarray(tokens), jnp.asarray(slots), cfg.vocab))
    assert valid.sum() > 0
    for p in range(tokens.shape[1]):
        want = sum((tables[level[p]][k, codes[p, k]] for k in range(3) if valid[p, k]), np.zeros(32))
        np.testing.assert_allclose(x[0, p] - plain[0, p], want, atol=1e-5, err_msg=f"position {p}")


@pytest.mark.parametrize("grids,strides", [(((2, 3), (4, 5)), (4, 8)), (((2, 2), (8, 8)), (2, 8))])
def test_parent_code_targets_are_the_semantic_code_over_the_cell(grids, strides):
    """At the position that predicts pixel code (r, c): the semantic code the block drew at
    (r * pixel_stride // semantic_stride, c * ...), clipped to its grid; nothing anywhere else (semantic
    codes, text, an edit's continuous source)."""
    v = _tiny_neighbour_cfg().vocab
    tokens, slots, out_at, sem, pix = _edit_row(grids, v, 1)
    t_out = mllm.block_template(grids, v, continuous=False)
    code, valid = (np.asarray(a)[0] for a in mllm.parent_code_targets(
        jnp.asarray(tokens[None]), jnp.asarray(slots[None]), v, *strides))
    ps, ss = strides
    for p in range(len(tokens)):
        if p + 1 < len(slots) and slots[p + 1] == mllm.SLOT_PIX_OUT:
            r, c = divmod(int(t_out.cells[p + 1 - out_at]), grids[1][1])
            want = sem[min(r * ps // ss, grids[0][0] - 1), min(c * ps // ss, grids[0][1] - 1)]
            assert valid[p] and code[p] == want, f"position {p}"
        else:
            assert not valid[p], f"position {p}"
    assert valid.sum() == pix.size


def test_parent_code_embedding_adds_the_vector_of_the_semantic_code_over_the_cell():
    cfg, model = _option_model("parent_codes", "parent_embed")
    pe = model.parent_embed
    assert not np.asarray(pe.table[...]).any()     # zero at first: a fork starts unchanged
    assert (pe.pixel_stride, pe.semantic_stride) == (cfg.tokenizer.downsample, cfg.tokenizer.semantic_factor)
    pe.table[...] = jax.random.normal(jax.random.key(4), pe.table.shape)
    grids = cfg.grids(32, 32)
    tokens, slots, _ = _drawn_row(cfg, 5)
    x = np.asarray(model.embed(jnp.asarray(tokens), jnp.asarray(slots)))
    plain = np.asarray(model.llm.embed_tokens(jnp.asarray(tokens)))
    code, valid = (np.asarray(a)[0] for a in mllm.parent_code_targets(
        jnp.asarray(tokens), jnp.asarray(slots), cfg.vocab, pe.pixel_stride, pe.semantic_stride))
    table = np.asarray(pe.table[...])
    assert valid.sum() == grids[1][0] * grids[1][1]
    for p in range(tokens.shape[1]):
        want = table[code[p]] if valid[p] else np.zeros(32)
        np.testing.assert_allclose(x[0, p] - plain[0, p], want, atol=1e-5, err_msg=f"position {p}")


@pytest.mark.parametrize("grids", [((2, 3), (4, 5)), ((3, 3), (6, 6))])
def test_source_cell_targets_point_at_the_same_cell_of_the_image_read_before(grids):
    """At the position that predicts code (level, r, c): the position of the continuous block's cell
    (level, r, c); nothing at text, structure or continuous positions, nothing in a conversation packed
    after the one that showed the image, nothing where the source's grid lacks the cell."""
    v = _tiny_neighbour_cfg().vocab
    tokens, slots, out_at, _, _ = _edit_row(grids, v, 2)
    t_in = mllm.block_template(grids, v, continuous=True)
    t_out = mllm.block_template(grids, v, continuous=False)
    src, valid = (np.asarray(a)[0] for a in mllm.source_cell_targets(jnp.asarray(slots[None])))
    for p in range(len(tokens)):
        nxt = slots[p + 1] if p + 1 < len(slots) else 0
        if nxt not in (mllm.SLOT_SEM_OUT, mllm.SLOT_PIX_OUT):
            assert not valid[p], f"position {p}"
            continue
        want_slot = mllm.SLOT_SEM_IN if nxt == mllm.SLOT_SEM_OUT else mllm.SLOT_PIX_IN
        cell = t_out.cells[p + 1 - out_at]
        (at,) = np.nonzero((t_in.slots == want_slot) & (t_in.cells == cell))[0]
        assert valid[p] and src[p] == 2 + at, f"position {p}"
    assert valid.sum() == sum(h * w for h, w in grids)
    # Packed behind another conversation: the drawn block of the second one has no source of its own.
    packed = np.concatenate([slots, [0], t_out.slots])
    seg = np.concatenate([np.ones(len(slots)), [2], np.full(len(t_out.slots), 2)]).astype(np.int32)
    _, ok = (np.asarray(a)[0] for a in mllm.source_cell_targets(jnp.asarray(packed[None]), jnp.asarray(seg[None])))
    assert ok[:len(slots)].sum() == valid.sum() and not ok[len(slots):].any()
    # A smaller source image: only the cells it has.
    small = mllm.block_template(((1, 2), (2, 2)), v, continuous=True)
    mixed = np.concatenate([[0], small.slots, [0], t_out.slots])
    _, ok = (np.asarray(a)[0] for a in mllm.source_cell_targets(jnp.asarray(mixed[None])))
    assert ok.sum() == min(grids[0][1], 2) * 1 + 2 * 2


def test_source_cell_projection_adds_the_projected_source_cell():
    cfg, model = _option_model("source_cells", "source_embed")
    assert not np.asarray(model.source_embed.proj.kernel[...]).any()   # zero at first: a fork starts unchanged
    grids = cfg.grids(32, 32)
    tokens, slots, _, _, _ = _edit_row(grids, cfg.vocab, 3)
    cells = np.concatenate([[0, 0], mllm.block_template(grids, cfg.vocab, continuous=True).cells,
                            np.zeros(len(tokens) - 2 - mllm.block_length(grids), np.int64)])
    images = jax.random.uniform(jax.random.key(5), (1, 1, 32, 32, 3), minval=-1, maxval=1)
    args = (jnp.asarray(tokens[None]), jnp.asarray(slots[None]), jnp.asarray(cells[None]), images)
    before = np.asarray(model.embed(*args))
    model.source_embed.proj.kernel[...] = jax.random.normal(jax.random.key(6), model.source_embed.proj.kernel.shape)
    x = np.asarray(model.embed(*args))
    src, valid = (np.asarray(a)[0] for a in mllm.source_cell_targets(jnp.asarray(slots[None])))
    kernel = np.asarray(model.source_embed.proj.kernel[...])
    assert valid.sum() == sum(h * w for h, w in grids)
    for p in range(len(tokens)):
        want = before[0, src[p]] @ kernel if valid[p] else np.zeros(32)
        np.testing.assert_allclose(x[0, p] - before[0, p], want, atol=1e-4, err_msg=f"position {p}")


def test_input_codes_are_the_codes_of_the_continuous_cells():
    """`input_codes` puts image m's code of cell k at the continuous slot with cells = m * n + k of its
    level, -1 at every other position (text, structure, drawn codes)."""
    v = _tiny_neighbour_cfg().vocab
    grids = ((2, 3), (4, 5))
    t_in = mllm.block_template(grids, v, continuous=True)
    n0, n1 = 6, 20
    slots = np.concatenate([[0], t_in.slots, [0], t_in.slots, mllm.block_template(grids, v, continuous=False).slots])
    cells = np.concatenate([[0], t_in.cells, [0], t_in.cells + np.where(t_in.slots == mllm.SLOT_SEM_IN, n0, n1),
                            np.zeros(mllm.block_length(grids), np.int64)])
    rng = np.random.default_rng(0)
    sem, pix = rng.integers(0, v.semantic_codes, (1, 2 * n0)), rng.integers(0, v.pixel_codes, (1, 2 * n1))
    got = np.asarray(mllm.input_codes(jnp.asarray(slots[None]), jnp.asarray(cells[None]), jnp.asarray(sem),
                                      jnp.asarray(pix)))[0]
    want = np.where(slots == mllm.SLOT_SEM_IN, sem[0][np.clip(cells, 0, 2 * n0 - 1)],
                    np.where(slots == mllm.SLOT_PIX_IN, pix[0][np.clip(cells, 0, 2 * n1 - 1)], -1))
    np.testing.assert_array_equal(got, want)
    assert (got >= 0).sum() == 2 * (n0 + n1)


def _copy_row(cfg):
    """An edit row (`_edit_row`) with the cells of its source, a random source image and random tokenizer
    codes of that image -> (tokens, slots, cells, where the drawn block starts, images, sem [1,n0],
    pix [1,n1], input_codes [1,T])."""
    grids = cfg.grids(32, 32)
    tokens, slots, out_at, _, _ = _edit_row(grids, cfg.vocab, 4)
    t_in = mllm.block_template(grids, cfg.vocab, continuous=True)
    cells = np.concatenate([[0, 0], t_in.cells, np.zeros(len(tokens) - 2 - len(t_in.cells), np.int64)])
    images = jax.random.uniform(jax.random.key(5), (1, 1, 32, 32, 3), minval=-1, maxval=1)
    rng = np.random.default_rng(1)
    n0, n1 = cfg.cells_per_image(32, 32)
    sem, pix = rng.integers(0, cfg.vocab.semantic_codes, (1, n0)), rng.integers(0, cfg.vocab.pixel_codes, (1, n1))
    codes = mllm.input_codes(jnp.asarray(slots[None]), jnp.asarray(cells[None]), jnp.asarray(sem), jnp.asarray(pix))
    return tokens, slots, cells, out_at, images, sem, pix, codes


def test_source_copy_adds_its_bonus_to_the_source_code_of_the_cell_drawn():
    """With `source_copy`, the logits differ from the plain head's only at positions that draw a cell of
    the source's grid, and there only at the id of the source's own code of that cell, by the module's
    bonus. Zero at first (a fork starts unchanged); codes are required."""
    cfg, model = _option_model("source_copy", "source_copy")
    grids = cfg.grids(32, 32)
    tokens, slots, cells, out_at, images, sem, pix, codes = _copy_row(cfg)
    args = (jnp.asarray(tokens[None]),)
    kw = dict(slots=jnp.asarray(slots[None]), cells=jnp.asarray(cells[None]), images=images)
    plain = np.asarray(model.llm(inputs_embeds=model.embed(args[0], kw["slots"], kw["cells"], images)))[0]
    np.testing.assert_allclose(np.asarray(model(*args, **kw, codes=codes))[0], plain, atol=1e-5)
    with pytest.raises(ValueError, match="source_copy"):
        model(*args, **kw)
    model.source_copy.gate[...] = jax.random.normal(jax.random.key(2), model.source_copy.gate.shape)
    model.source_copy.bias[...] = jnp.asarray([0.3, -0.2])
    got = np.asarray(model(*args, **kw, codes=codes))[0]
    normed = np.asarray(model.llm.final_norm(model.llm(inputs_embeds=model.embed(args[0], kw["slots"], kw["cells"],
                                                                                  images), return_hidden=True)))[0]
    both = model.logits_and_normed(*args, **kw, codes=codes)      # one forward for probes: the same values
    np.testing.assert_allclose(np.asarray(both[0])[0], got, atol=1e-5)
    np.testing.assert_allclose(np.asarray(both[1])[0], normed, atol=1e-5)
    gate, bias = np.asarray(model.source_copy.gate[...]), np.asarray(model.source_copy.bias[...])
    v = cfg.vocab
    drawn = 0
    for p in range(len(tokens) - 1):
        nxt = slots[p + 1]
        diff = got[p] - plain[p]
        if nxt not in (mllm.SLOT_SEM_OUT, mllm.SLOT_PIX_OUT):
            np.testing.assert_allclose(diff, 0, atol=1e-5, err_msg=f"position {p}")
            continue
        lv = 0 if nxt == mllm.SLOT_SEM_OUT else 1
        cell = mllm.block_template(grids, v, continuous=False).cells[p + 1 - out_at]
        code = (sem if lv == 0 else pix)[0, cell]
        col = (v.level0_start if lv == 0 else v.level1_start) + code
        want = np.zeros_like(diff)
        want[col] = normed[p] @ gate[:, lv] + mllm.SourceCodeCopy.BIAS_SCALE * bias[lv]
        np.testing.assert_allclose(diff, want, atol=1e-4, err_msg=f"position {p}")
        drawn += 1
    assert drawn == sum(h * w for h, w in grids)


def test_copy_mixture_gives_the_source_code_at_least_its_gate_share():
    """With `copy_mixture`, at a position that draws a source cell the model's distribution is
    g * onehot(source code) + (1 - g) * softmax(head), g = sigmoid of the copy module's output, so the source
    code gets at least g whatever the head says; every other position keeps the head's logits. A fork starts
    with g = sigmoid(-5); the option needs source_copy."""
    with pytest.raises(ValueError, match="copy_mixture.*source_copy"):
        _tiny_neighbour_cfg(copy_mixture=True)
    cfg = _tiny_neighbour_cfg(source_copy=True, copy_mixture=True)
    model = mllm.create_mllm(cfg, seed=2)
    assert model.source_copy.mixture and not mllm.create_mllm(_tiny_neighbour_cfg(source_copy=True)).source_copy.mixture
    grids = cfg.grids(32, 32)
    tokens, slots, cells, out_at, images, sem, pix, codes = _copy_row(cfg)
    kw = dict(slots=jnp.asarray(slots[None]), cells=jnp.asarray(cells[None]), images=images, codes=codes)
    model.source_copy.gate[...] = jax.random.normal(jax.random.key(2), model.source_copy.gate.shape)
    logits, normed = (np.asarray(a)[0] for a in model.logits_and_normed(jnp.asarray(tokens[None]), **kw))
    head = np.asarray(model.llm.head(jnp.asarray(normed[None])))[0]
    gate, bias = np.asarray(model.source_copy.gate[...]), np.asarray(model.source_copy.bias[...])
    np.testing.assert_allclose(bias, mllm.SourceCodeCopy.MIXTURE_START_BIAS)
    v, t_out = cfg.vocab, mllm.block_template(grids, cfg.vocab, continuous=False)
    softmax = lambda a: np.exp(a - a.max()) / np.exp(a - a.max()).sum()  # noqa: E731
    drawn = 0
    for p in range(len(tokens) - 1):
        nxt = slots[p + 1]
        if nxt not in (mllm.SLOT_SEM_OUT, mllm.SLOT_PIX_OUT):
            np.testing.assert_allclose(logits[p], head[p], atol=1e-5, err_msg=f"position {p}")
            continue
        lv = 0 if nxt == mllm.SLOT_SEM_OUT else 1
        code = (sem if lv == 0 else pix)[0, t_out.cells[p + 1 - out_at]]
        g = 1 / (1 + np.exp(-(normed[p] @ gate[:, lv] + mllm.SourceCodeCopy.BIAS_SCALE * bias[lv])))
        want = (1 - g) * softmax(head[p].astype(np.float64))
        want[(v.level0_start if lv == 0 else v.level1_start) + code] += g
        np.testing.assert_allclose(np.exp(logits[p]), want, atol=1e-6, err_msg=f"position {p}")
        assert np.exp(logits[p]).sum() == pytest.approx(1, abs=1e-5)
        drawn += 1
    assert drawn == sum(h * w for h, w in grids)


def test_embed_splices_projected_features_at_the_slots(tiny_model):
    cfg, model = tiny_model
    grids = cfg.grids(32, 32)
    t = mllm.block_template(grids, cfg.vocab, continuous=True)
    n0, n1 = cfg.cells_per_image(32, 32)
    tokens = np.concatenate([[1, 2, 3], t.ids.clip(0)])[None]
    slots = np.concatenate([[0, 0, 0], t.slots])[None]
    cells = np.concatenate([[0, 0, 0], t.cells])[None]
    images = jax.random.uniform(jax.random.key(0), (1, 1, 32, 32, 3), minval=-1, maxval=1)
    x = np.asarray(model.embed(jnp.asarray(tokens), jnp.asarray(slots), jnp.asarray(cells), images))
    sem, pix = (np.asarray(a) for a in model.image_features(images))
    assert sem.shape == (1, n0, cfg.llm.d_model) and pix.shape == (1, n1, cfg.llm.d_model)
    at = lambda slot: np.nonzero(slots[0] == slot)[0]
    np.testing.assert_allclose(x[0, at(mllm.SLOT_SEM_IN)], sem[0], rtol=1e-6)
    np.testing.assert_allclose(x[0, at(mllm.SLOT_PIX_IN)], pix[0], rtol=1e-6)
    plain = np.asarray(model.llm.embed_tokens(jnp.asarray(tokens.clip(0))))
    text = slots[0] == mllm.SLOT_TEXT
    np.testing.assert_array_equal(x[0, text], plain[0, text])
    # The logits are the LLM's on the spliced embeddings.
    logits = model(jnp.asarray(tokens), slots=jnp.asarray(slots), cells=jnp.asarray(cells), images=images)
    ref = model.llm(inputs_embeds=jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_illume_model_reads_its_vq_vit_through_an_adapter():
    """The original ILLUME's path: the tower is the semantic VQ's CLIP-style ViT (patch tokens, no class
    token), the projector one GELU MLP (no pixel branch), spliced at SLOT_SEM_IN; `vit_trainable_from`
    stops the gradient below that block, embeddings included."""
    from configs import semantic_vq_illume
    from flax import nnx
    from illume_jax.models.semantic_vq import clip_vit_tokens
    tok = semantic_vq_illume.model_config("tiny")
    tok.vit.update(num_layers=2, hidden_size=16, num_heads=2, mlp_dim=32)
    tok.update(num_codes=64)
    llm = common.llm_config(text_vocab_size=100, vocab_size=100 + 39 + 64 + 5, d_model=32, num_heads=2,
                            num_kv_heads=1, mlp_dim=64)
    with pytest.raises(ValueError, match="parent_codes=True needs a two-level tokenizer"):
        mllm.MLLMConfig.create(llm, tok, parent_codes=True)
    cfg = mllm.MLLMConfig.create(llm, tok, vit_trainable_from=1)
    assert cfg.levels == 1 and cfg.vocab.pixel_codes == 0 and cfg.grids(64, 64) == ((16, 16), (0, 0))
    model = mllm.create_mllm(cfg)
    assert model.projector.pixel is None and not hasattr(model.vision, "pixel_encoder")
    images = jax.random.uniform(jax.random.key(0), (1, 1, 64, 64, 3), minval=-1, maxval=1)
    sem, pix = model.image_features(images)
    assert pix is None and sem.shape == (1, 256, 32)
    feats = clip_vit_tokens(model.vision.vit, images[:, 0], 64)
    p = model.projector.semantic
    want = p.fc2(jax.nn.gelu(p.fc1(feats), approximate=False))
    np.testing.assert_allclose(np.asarray(sem), np.asarray(want), rtol=1e-5, atol=1e-6)
    t = mllm.block_template(cfg.grids(64, 64), cfg.vocab, continuous=True)
    tokens, slots, cells = (jnp.asarray(np.concatenate([[1, 2], a])[None]) for a in (t.ids.clip(0), t.slots, t.cells))
    x = np.asarray(model.embed(tokens, slots, cells, images))
    np.testing.assert_allclose(x[0, 2:][t.slots == mllm.SLOT_SEM_IN], np.asarray(sem[0]), rtol=1e-6)
    logits = model(tokens, slots=slots, cells=cells, images=images)
    assert logits.shape == (1, len(t) + 2, cfg.llm.vocab_size) and np.isfinite(np.asarray(logits)).all()

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest).image_features(images)[0] ** 2))(params)
    vit_grads = grads["vision"]["vit"]
    blocks = jax.tree.leaves(vit_grads["blocks"])
    assert all(float(jnp.abs(g[0]).max()) == 0 for g in blocks) and any(float(jnp.abs(g[1]).max()) > 0 for g in blocks)
    assert float(jnp.abs(vit_grads["patch_embed"]["kernel"][...]).max()) == 0


def _windows_reference(x, h, w, k):
    """[N, h*w, C] -> [N, h*w, k*k*C] by loops: each cell's k x k neighbours in raster order, zero outside."""
    n, _, c = x.shape
    grid = x.reshape(n, h, w, c)
    out = np.zeros((n, h * w, k * k * c), x.dtype)
    for y in range(h):
        for xx in range(w):
            parts = []
            for dy in range(-(k // 2), k // 2 + 1):
                for dx in range(-(k // 2), k // 2 + 1):
                    inside = 0 <= y + dy < h and 0 <= xx + dx < w
                    parts.append(grid[:, y + dy, xx + dx] if inside else np.zeros((n, c), x.dtype))
            out[:, y * w + xx] = np.concatenate(parts, axis=-1)
    return out


def test_neighbourhoods_gather_each_cells_window():
    x = np.random.default_rng(0).normal(size=(2, 3 * 5, 4)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(mllm.neighbourhoods(jnp.asarray(x), 3, 5, 1)), x)
    for k in (3, 5):
        np.testing.assert_array_equal(np.asarray(mllm.neighbourhoods(jnp.asarray(x), 3, 5, k)),
                                      _windows_reference(x, 3, 5, k))


def test_projector_window_feeds_each_token_its_neighbourhood(tiny_model):
    """projector_window=3: fc1 is 9x wider and each projected token is the MLP of its 3x3 cells (zeros past
    the edge), for both branches; an even or zero window is a named error."""
    import dataclasses
    cfg, _ = tiny_model
    cfg3 = dataclasses.replace(cfg, projector_window=3)
    model = mllm.create_mllm(cfg3)
    images = jax.random.uniform(jax.random.key(1), (1, 1, 32, 32, 3), minval=-1, maxval=1)
    sem, pix = (np.asarray(a) for a in model.image_features(images))
    raw_sem, raw_pix = (np.asarray(a) for a in model.vision(images[:, 0]))
    (h1, w1), (h2, w2) = cfg3.grids(32, 32)
    gelu = lambda v: np.asarray(jax.nn.gelu(jnp.asarray(v), approximate=False))  # noqa: E731
    for got, raw, (h, w), branch in ((sem, raw_sem, (h1, w1), model.projector.semantic),
                                     (pix, raw_pix, (h2, w2), model.projector.pixel)):
        k1, b1 = np.asarray(branch.fc1.kernel[...]), np.asarray(branch.fc1.bias[...])
        k2, b2 = np.asarray(branch.fc2.kernel[...]), np.asarray(branch.fc2.bias[...])
        assert k1.shape[0] == 9 * raw.shape[-1]
        want = gelu(_windows_reference(raw, h, w, 3) @ k1 + b1) @ k2 + b2
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    for bad in (0, 2):
        with pytest.raises(ValueError, match="projector_window"):
            dataclasses.replace(cfg, projector_window=bad)


def test_noisy_code_inputs_replace_only_fed_back_codes_within_their_level():
    """At rate r about r of the discrete code inputs become another code of the same level; text,
    structure and continuous positions never change; rate 0 changes nothing; same key, same noise."""
    v = _tiny_neighbour_cfg().vocab
    grids = ((6, 6), (12, 12))
    tokens, slots, _, _, _ = _edit_row(grids, v, 7)
    toks, sl = jnp.asarray(np.tile(tokens, (8, 1))), jnp.asarray(np.tile(slots, (8, 1)))
    key = jax.random.key(3)
    np.testing.assert_array_equal(np.asarray(mllm.noisy_code_inputs(toks, sl, v, 0.0, key)), np.asarray(toks))
    got = np.asarray(mllm.noisy_code_inputs(toks, sl, v, 0.3, key))
    np.testing.assert_array_equal(got, np.asarray(mllm.noisy_code_inputs(toks, sl, v, 0.3, key)))
    codes = np.isin(np.asarray(sl), (mllm.SLOT_SEM_OUT, mllm.SLOT_PIX_OUT))
    np.testing.assert_array_equal(got[~codes], np.asarray(toks)[~codes])
    changed = (got != np.asarray(toks))[codes].mean()
    assert 0.2 < changed < 0.3     # 0.3 drawn, minus the draws that hit the true code
    sem, pix = np.asarray(sl) == mllm.SLOT_SEM_OUT, np.asarray(sl) == mllm.SLOT_PIX_OUT
    assert ((got[sem] >= v.level0_start) & (got[sem] < v.level0_start + v.semantic_codes)).all()
    assert ((got[pix] >= v.level1_start) & (got[pix] < v.level1_start + v.pixel_codes)).all()
