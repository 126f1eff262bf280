"""The SigLIP evaluation scores what it says: with image embeddings that are exactly the embeddings
of a chosen caption, val_i2t_acc and val_twin_acc read 1 or 0 as that choice dictates."""
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx

from illume_jax.data import shapecomp
from illume_jax.data.images import CaptionVocab, ShapeCompImages
from illume_jax.models import siglip


class BagOfWords(nnx.Module):
    """Text -> normalised word counts; images -> the rows of `image_rows` in order (the test
    knows which validation scenes come, so it chooses which caption each image 'is')."""

    def __init__(self, vocab_size: int, image_rows: np.ndarray):
        self.vocab_size = vocab_size
        self.image_rows = nnx.Variable(jnp.asarray(image_rows))

    def embed_text(self, ids):
        counts = jnp.zeros((ids.shape[0], self.vocab_size)).at[jnp.arange(ids.shape[0])[:, None], ids].add(1.0)
        counts = counts.at[:, 0].set(0.0)   # padding
        return counts / jnp.linalg.norm(counts, axis=-1, keepdims=True)

    def embed_images(self, images):
        return self.image_rows[...][: images.shape[0]]


def test_retrieval_and_twin_accuracy_score_the_right_pairs():
    config = mlc.ConfigDict(dict(data=dict(levels=(1,)), vit_pretrain=dict(text_len=24)))
    vocab = CaptionVocab((1,))
    n = 32
    src = ShapeCompImages((1,), "validation", n)
    scenes = [src.scene(i) for i in range(n)]
    captions = [src[i]["caption"] for i in range(n)]
    text = lambda texts: np.asarray(BagOfWords(len(vocab), np.zeros((1, 1))).embed_text(  # noqa: E731
        jnp.asarray(np.stack([vocab.encode(t, 24) for t in texts]))))

    # Each image 'is' its dense caption: the twin always loses; i2t is right where the record's
    # caption is the dense one (even indices) or its short caption happens to score best anyway.
    own = siglip.retrieval_accuracy(BagOfWords(len(vocab), text([shapecomp.dense_caption(s) for s in scenes])),
                                    config, vocab, n=n)
    assert own["val_twin_acc"] == 1.0 and own["val_i2t_acc"] >= 0.5
    # Each image 'is' its twin's caption: the twin always wins.
    twin = siglip.retrieval_accuracy(
        BagOfWords(len(vocab), text([shapecomp.dense_caption(shapecomp.shape_twin(s)) for s in scenes])),
        config, vocab, n=n)
    assert twin["val_twin_acc"] == 0.0
    # Each image 'is' its own record's caption: retrieval is perfect; each 'is' the next scene's: it is not.
    assert siglip.retrieval_accuracy(BagOfWords(len(vocab), text(captions)), config, vocab, n=n)["val_i2t_acc"] == 1.0
    shifted = siglip.retrieval_accuracy(BagOfWords(len(vocab), text(captions[1:] + captions[:1])), config, vocab, n=n)
    assert shifted["val_i2t_acc"] < 0.2
