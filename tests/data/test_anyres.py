"""Any-resolution views (`anyres`): LLaVA-UHD grid choice, global view + raster-ordered slices."""
import numpy as np
import pytest
from PIL import Image

from illume_jax.data import anyres

B = 8  # tiny base resolution: the rule only depends on H, W relative to it


def _pil_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Independent reference: the PIL bicubic call `images.fit_resolution` makes."""
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC), np.float32)


@pytest.mark.parametrize("hw, max_slices, grid", [
    ((B, B), 9, (1, 1)),                # n = 1: the global view alone
    ((B // 2, 3), 9, (1, 1)),
    ((2 * B, 2 * B), 9, (2, 2)),        # n = 4, square
    ((B, 3 * B), 9, (1, 3)),            # wide 1:3
    ((3 * B, B), 9, (3, 1)),            # tall 3:1
    ((2 * B, B), 9, (2, 1)),
    ((100 * B, 100 * B), 9, (3, 3)),    # n clipped to 9
    ((100 * B, 100 * B), 4, (2, 2)),    # n clipped to max_slices
    ((100 * B, 100 * B), 1, (1, 1)),
    ((B + 1, B + 1), 9, (1, 2)),        # n = 2, (1,2) and (2,1) tie: fewer rows wins
])
def test_slice_grid(hw, max_slices, grid):
    assert anyres.slice_grid(*hw, B, max_slices) == grid


def test_slice_grid_bounds_and_orientation():
    for h, w in [(1000, 1000), (5000, 300), (300, 5000), (4096, 4095)]:
        rows, cols = anyres.slice_grid(h, w, B)
        assert rows * cols <= anyres.MAX_SLICES
    rows, cols = anyres.slice_grid(5 * B, 2 * B, B)
    assert rows > cols
    rows, cols = anyres.slice_grid(2 * B, 5 * B, B)
    assert cols > rows


def test_num_views():
    assert anyres.num_views((1, 1)) == 1
    assert anyres.num_views((1, 3)) == 4
    assert anyres.num_views((3, 3)) == 10


@pytest.mark.parametrize("hw", [(2 * B + 3, 2 * B - 1), (B, 3 * B), (3 * B + 5, B + 2), (B - 3, B + 1)])
def test_image_views_tile_the_resized_image(hw):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    views, (rows, cols) = anyres.image_views(image, B)
    assert (rows, cols) == anyres.slice_grid(*hw, B)
    assert views.shape == (anyres.num_views((rows, cols)), B, B, 3) and views.dtype == np.float32
    np.testing.assert_array_equal(views[0], _pil_resize(image, B, B))
    if (rows, cols) != (1, 1):
        tiles = views[1:].reshape(rows, cols, B, B, 3)
        whole = np.concatenate([np.concatenate(list(row), axis=1) for row in tiles], axis=0)
        np.testing.assert_array_equal(whole, _pil_resize(image, rows * B, cols * B))


def test_slices_are_in_raster_order():
    # a 1x3-grid image whose thirds are constant 0, 100, 200: slice i must be the i-th third
    image = np.repeat(np.array([0, 100, 200], np.uint8), B)[None, :, None].repeat(B, 0).repeat(3, 2)
    views, grid = anyres.image_views(image, B)
    assert grid == (1, 3)
    # columns away from the seams are untouched by the bicubic filter
    assert [float(v[:, 2:-2].mean()) for v in views[1:]] == [0.0, 100.0, 200.0]


def test_value_range_preserved():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(3 * B, 2 * B, 3), dtype=np.uint8)
    image[0, 0], image[1, 1] = 0, 255
    views, _ = anyres.image_views(image, B)
    assert views.dtype == np.float32 and views.min() >= 0 and views.max() <= 255 and views.max() > 1
    # float in [-1, 1] (the model range): upscaling a step edge makes bicubic overshoot, which must
    # be clipped back into the input's range
    sharp = np.full((B + 3, B + 3, 3), -1.0)
    sharp[:, (B + 3) // 2:] = 1.0
    fviews, grid = anyres.image_views(sharp, B)
    assert grid != (1, 1)
    assert fviews.dtype == np.float32 and fviews.shape[0] == anyres.num_views(grid)
    assert fviews.min() >= -1 and fviews.max() <= 1 and fviews.min() < 0 < fviews.max()


def test_uint8_and_float_inputs_agree():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(2 * B, 2 * B, 3), dtype=np.uint8)
    u, _ = anyres.image_views(image, B)
    f, _ = anyres.image_views(image.astype(np.float32), B)
    assert np.abs(u - f).max() <= 1.0  # uint8 path only adds PIL's rounding


@pytest.mark.parametrize("image, base, max_slices, word", [
    (np.zeros((B, B), np.uint8), B, 9, "image shape"),
    (np.zeros((B, B, 4), np.uint8), B, 9, "image shape"),
    (np.zeros((0, B, 3), np.uint8), B, 9, "image shape"),
    (np.zeros((B, B, 3), np.int32), B, 9, "image dtype"),
    (np.full((B, B, 3), np.nan, np.float32), B, 9, "non-finite"),
    (np.zeros((B, B, 3), np.uint8), 0, 9, "base"),
    (np.zeros((B, B, 3), np.uint8), B, 0, "max_slices"),
])
def test_image_views_bad_inputs(image, base, max_slices, word):
    with pytest.raises(ValueError, match=word):
        anyres.image_views(image, base, max_slices)


@pytest.mark.parametrize("args, word", [
    ((0, B, B), "height"), ((B, -1, B), "width"), ((B, B, 0), "base"), ((B, B, B, 0), "max_slices"),
    ((B, B, 2.5), "base"),
])
def test_slice_grid_bad_inputs(args, word):
    with pytest.raises(ValueError, match=word):
        anyres.slice_grid(*args)


def test_num_views_bad_inputs():
    with pytest.raises(ValueError, match="grid"):
        anyres.num_views((0, 2))
    with pytest.raises(ValueError, match="grid"):
        anyres.num_views((1, 2, 3))
