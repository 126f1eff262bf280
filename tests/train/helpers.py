"""Small configs and synthetic batches for the training tests."""
import ml_collections as mlc
import numpy as np

from configs import common


def tiny_config(stages=None, **optim) -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.seed = 0
    c.mesh = common.mesh_config()
    c.model = common.llm_config(text_vocab_size=48, vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=8, mlp_dim=64, tie_embeddings=False)
    c.tokenizer = mlc.ConfigDict(dict(kind="sentencepiece", path="", vocab_size=48, chat_template="plain"))
    c.data = mlc.ConfigDict(dict(datasets={"synthetic": dict(kind="shapecomp", levels=(0,), tasks=("qa",),
                                                             num_examples=10)},
                                 text_only=True, num_workers=0, shuffle_seed=0, data_dir=""))
    c.stages = stages or [common.stage_config("s0", steps=20, seq_len=16, global_batch_size=8, lr=1e-2,
                                              warmup_steps=0, mixture={"synthetic": 1.0})]
    c.optim = common.optim_config(**optim)
    c.checkpoint = common.checkpoint_config(every_steps=5, max_to_keep=3)
    c.log_every = 1
    return c


def synthetic_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int, image_from: int | None = None):
    """A learnable batch: each row counts up modulo `vocab` from a random start."""
    start = rng.integers(0, vocab, (batch, 1))
    toks = (start + np.arange(seq + 1)[None]) % vocab
    b = dict(tokens=toks[:, :-1].astype(np.int32), targets=toks[:, 1:].astype(np.int32),
             loss_mask=np.ones((batch, seq), np.float32), segment_ids=np.ones((batch, seq), np.int32),
             positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
             sources=np.ones((batch, seq), np.int32))
    return b


def synthetic_iterator_factory(config, vocab: int):
    """stage_index -> a Grain iterator of learnable batches (checkpointable state)."""
    import grain

    def make(stage_index):
        st = config.stages[stage_index]
        ds = (grain.MapDataset.range(1_000_000)
              .map(lambda i: synthetic_batch(np.random.default_rng(i), st.global_batch_size, st.seq_len, vocab))
              .to_iter_dataset())
        return iter(ds)
    return make
