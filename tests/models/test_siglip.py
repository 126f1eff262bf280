"""The tiny ViT's pre-training: the SigLIP evaluation scores what it says (with image embeddings that
are exactly the embeddings of a chosen caption, val_i2t_acc and val_twin_acc read 1 or 0 as that
choice dictates), and the captioning loss is causal, reads the image and learns."""
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
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

    def evaluation_outputs(self, images, text, captions):   # SigLIP's evaluation interface
        return self.image_rows[...][: images.shape[0]], self.embed_text(text), None, None


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


def _micro_siglip(caption_weight=1.0, dense_weight=0.0):
    from configs import dualvitok as dualvitok_config
    from illume_jax import sharding
    c = dualvitok_config.get_config(f"size=tiny,caption_weight={caption_weight},dense_weight={dense_weight}")
    c.model.vit.update(depth=1, embed_dim=16, num_heads=2, hidden_size=32)
    c.vit_pretrain.update(text_dim=16, text_layers=1, text_heads=2, embed_dim=16, caption_dim=16, caption_heads=2,
                          caption_layers=1)
    vocab = CaptionVocab((1,))
    with sharding.use_mesh(sharding.make_mesh(dict(c.mesh))):
        model = siglip.SigLIP(c, len(vocab), rngs=nnx.Rngs(0))
    return c, vocab, model


def _scenes(vocab, n, length=24):
    src = ShapeCompImages((1,), "train", n, dense_captions=True)
    from illume_jax.data.images import to_model_range
    images = jnp.asarray(np.stack([to_model_range(src[i]["image"]) for i in range(n)]))
    ids = jnp.asarray(np.stack([vocab.encode(src[i]["caption"], length) for i in range(n)]))
    return images, ids


def test_caption_decoder_is_causal_and_reads_the_image():
    config, vocab, model = _micro_siglip()
    images, ids = _scenes(vocab, 4)
    tokens = siglip.image_tokens(model.vit, images, config)
    logits = np.asarray(model.captioner(tokens, ids))
    # Word t is predicted from words < t: changing words 5.. leaves positions 0..5 as they were.
    changed = ids.at[:, 5:].set(jnp.where(ids[:, 5:] > 0, 2, 0))
    again = np.asarray(model.captioner(tokens, changed))
    np.testing.assert_allclose(again[:, :6], logits[:, :6], atol=1e-6)
    assert np.abs(again[:, 6:] - logits[:, 6:]).max() > 1e-4
    # ... and from the image: other images, other logits from the first word on.
    other = np.asarray(model.captioner(tokens[::-1], ids))
    assert np.abs(other[:, 0] - logits[:, 0]).max() > 1e-6   # small at initialisation, never zero
    # The loss counts real words only.
    loss, acc = siglip.caption_loss(jnp.asarray(logits), ids)
    padded = jnp.concatenate([ids, jnp.zeros((4, 8), ids.dtype)], axis=1)
    loss2, _ = siglip.caption_loss(jnp.concatenate([jnp.asarray(logits), jnp.zeros((4, 8, logits.shape[-1]))], 1),
                                   padded)
    assert float(loss) == pytest.approx(float(loss2), rel=1e-6) and 0 <= float(acc) <= 1
    with pytest.raises(ValueError, match="caption of 30 words"):
        model.captioner(tokens, jnp.ones((4, 30), jnp.int32))


def test_captioning_loss_learns_captions_and_the_weights_are_checked():
    """A few Adam steps on 8 scenes: the captioning loss falls well below its start (the decoder and
    the ViT learn), and the combined loss is the weighted sum."""
    import optax
    config, vocab, model = _micro_siglip()
    images, ids = _scenes(vocab, 8)
    params = nnx.state(model, nnx.Param)
    graphdef = nnx.graphdef(model)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        (loss, metrics), grads = jax.value_and_grad(lambda p: nnx.merge(graphdef, p).loss(images, ids),
                                                    has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss, metrics

    first = None
    for _ in range(60):
        params, opt, loss, metrics = step(params, opt)
        first = first or float(metrics["caption_loss"])
        assert float(loss) == pytest.approx(float(metrics["siglip_loss"] + metrics["caption_loss"]), rel=1e-5)
    assert float(metrics["caption_loss"]) < 0.5 * first and float(metrics["caption_acc"]) > 0.5
    config.vit_pretrain.update(siglip_weight=0.0, caption_weight=0.0)
    with pytest.raises(ValueError, match="not all 0"):
        siglip.SigLIP(config, len(vocab), rngs=nnx.Rngs(0))


def test_dense_loss_teaches_every_token_its_objects_shape():
    """dense_weight > 0: linear heads on each token name the shape and colour under its cell. A few Adam
    steps on 8 scenes take object cells' shape accuracy from chance to most (the dense loss alone, the
    contrastive one weighted 0), object cells weigh dense_object_weight x background ones, and labels
    must fit the token grid."""
    import optax
    config, vocab, model = _micro_siglip(caption_weight=0.0, dense_weight=2.0)
    model.siglip_weight = 0.0
    grid = siglip.token_grid(config)
    assert grid == (8, 8)
    images, ids = _scenes(vocab, 8)
    labels = [shapecomp.cell_labels(shapecomp.make_scene(1, "train", i), grid) for i in range(8)]
    cell_shape = jnp.asarray(np.stack([a for a, _ in labels]))
    cell_color = jnp.asarray(np.stack([b for _, b in labels]))
    params, graphdef = nnx.state(model, nnx.Param), nnx.graphdef(model)
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: nnx.merge(graphdef, p).loss(images, ids, cell_shape, cell_color), has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss, metrics

    first = None
    for _ in range(80):
        params, opt, loss, metrics = step(params, opt)
        first = first or metrics
        assert float(loss) == pytest.approx(2.0 * float(metrics["dense_loss"]), rel=1e-5)
    assert float(first["dense_shape_acc"]) < 0.4
    assert float(metrics["dense_shape_acc"]) > 0.8 and float(metrics["dense_color_acc"]) > 0.9
    assert float(metrics["dense_loss"]) < 0.3 * float(first["dense_loss"])

    # The weighting: with every object cell's logits wrong and background right, a larger object
    # weight raises the loss by exactly the ratio it predicts.
    model = nnx.merge(graphdef, params)
    tokens = siglip.image_tokens(model.vit, images, config)
    loss4, _ = model.dense_loss(tokens, cell_shape, cell_color)
    model.dense_object_weight = 1.0
    loss1, _ = model.dense_loss(tokens, cell_shape, cell_color)
    s, c = model.dense_logits(tokens)
    ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(s, cell_shape)
                    + optax.softmax_cross_entropy_with_integer_labels(c, cell_color))
    obj = np.asarray(cell_shape) < len(shapecomp.world.SHAPES)
    assert float(loss1) == pytest.approx(ce.mean(), rel=1e-5)
    assert float(loss4) == pytest.approx((4 * ce[obj].sum() + ce[~obj].sum()) / (4 * obj.sum() + (~obj).sum()),
                                         rel=1e-5)
    # Twins join a batch after the scenes: labels for the first n images supervise those alone.
    both = jnp.concatenate([images, images[::-1]])
    _, m2 = model.loss(both, jnp.concatenate([ids, ids[::-1]]), cell_shape, cell_color)
    assert float(m2["dense_loss"]) == pytest.approx(float(loss1), rel=1e-5)
    with pytest.raises(ValueError, match="token grid"):
        model.dense_loss(tokens, cell_shape[:, :16], cell_color[:, :16])
    with pytest.raises(ValueError, match="needs per-cell labels"):
        model.loss(images, ids)
    # The evaluation reports the heads' object-cell shape accuracy on validation scenes.
    out = siglip.retrieval_accuracy(model, config, vocab, n=16)
    assert 0.0 <= out["val_dense_shape_acc"] <= 1.0
