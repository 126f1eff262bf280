"""Understanding images at their own aspect (`images.native_size`, ILLUME+'s pre-processing): the sizes match
transformers' Qwen2-VL `smart_resize` (the rule the official processor uses) with ILLUME+'s factor and bounds."""
import numpy as np
import pytest

from illume_jax.data import images


def test_native_size_matches_the_qwen2_vl_rule():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 3000, size=(400, 2)) if max(h, w) / min(h, w) <= 200]
    sizes += [(512, 512), (384, 768), (31, 33), (8, 1000), (769, 767), (24, 24)]
    for bounds in ((32 * 32, 768 * 768), (256 * 256, 256 * 256), (0, 512 * 512)):
        for h, w in sizes:
            assert images.native_size(h, w, 16, *bounds) == smart_resize(h, w, 16, *bounds), (h, w, bounds)
    assert images.native_size(1000, 2000, 16, 32 * 32, 768 * 768) == (528, 1072)   # by hand: beta = 1.84
    assert images.native_size(20, 10, 16, 32 * 32, 768 * 768) == (48, 32)          # scaled up to 1,024 pixels


def test_native_size_names_bad_inputs():
    with pytest.raises(ValueError, match="an image of 1x300 pixels"):
        images.native_size(1, 300, 16, 0, 768 * 768)
    with pytest.raises(ValueError, match="pixel bounds"):
        images.native_size(64, 64, 16, 10_000, 100)
