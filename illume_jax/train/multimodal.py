"""What MLLM training adds to the staged loop: the frozen vision tokenizer.

* `VisionTokenizer` loads the DualViTok (ILLUME+) or semantic VQ (ILLUME) checkpoint of
  `config.vision.tokenizer_workdir` (with the config it was trained with) and keeps its parameters
  replicated on the mesh. Inside the jitted train step it turns the batch's images into codes
  (`prepare`; a semantic VQ's pixel codes are empty), which are written
  into the discrete slots of both the inputs and the targets: the data pipeline only decodes
  pixels, and the codes are exactly the tokenizer's, as official training reads them from its
  codebook-inference files.
* At a fresh start the MLLM's vision tower is the tokenizer's ViT and pixel encoder (`with_tower`), as
  the official DualVisionTower takes them from a DualViTok instance; with a semantic VQ, its ViT.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from illume_jax import sharding
from illume_jax.models import mllm


class VisionTokenizer:
    @classmethod
    def abstract(cls, config: Any, mesh) -> "VisionTokenizer":
        """Shapes only, from `config.vision.tokenizer_model` (no checkpoint read): what the AOT command
        lowers the multimodal train step with. `params` are ShapeDtypeStructs, replicated as in training."""
        from illume_jax.train.tokenizer import make_model
        tok_model = config.vision.tokenizer_model
        if tok_model is None:
            raise ValueError("config.vision.tokenizer_model is None: the shape-only vision tokenizer needs the "
                             "tokenizer's model config")
        self = cls.__new__(cls)
        with sharding.use_mesh(mesh):
            model = nnx.eval_shape(lambda: make_model(tok_model, nnx.Rngs(0)))
        self.graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
        replicated = NamedSharding(mesh, P())
        self.params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                                   (params, buffers))
        self.tower = None   # nothing to copy into a model that has no values
        return self

    def __init__(self, config: Any, mesh):
        from illume_jax.train.tokenizer import load_tokenizer, saved_config
        workdir = os.path.abspath(config.vision.tokenizer_workdir)
        tok_cfg = saved_config(workdir)
        if tok_cfg is None:
            raise ValueError(f"config.vision.tokenizer_workdir={workdir!r} holds no tokenizer checkpoint: run "
                             "`python -m illume_jax train-tokenizer --config=configs/dualvitok.py:size=tiny "
                             f"--workdir={config.vision.tokenizer_workdir}` first")
        if tok_cfg.model.kind not in ("dualvitok", "semantic_vq"):
            raise ValueError(f"config.vision.tokenizer_workdir: the MLLM needs a DualViTok (ILLUME+) or semantic VQ "
                             f"(ILLUME) tokenizer, found {tok_cfg.model.kind!r}")
        model, _, _ = load_tokenizer(tok_cfg, workdir, mesh)
        self.graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
        replicated = NamedSharding(mesh, P())
        # Replicated: the tokenizer is small next to the LLM and runs data-parallel on every batch.
        self.params = jax.device_put((params, buffers), replicated)
        self.tower = mllm.tokenizer_tower(model)

    def codes(self, tok_params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B,M,S,S,3] -> (semantic [B, M*n0], pixel [B, M*n1]) int32 codes (no gradient); a semantic
        VQ's pixel codes are [B, 0]."""
        model = nnx.merge(self.graphdef, *tok_params)
        B, M = images.shape[:2]
        sem, pix = mllm.tokenizer_codes(model, jax.lax.stop_gradient(images.reshape(B * M, *images.shape[2:])))
        return sem.reshape(B, -1), pix.reshape(B, -1)

    def prepare(self, tok_params, batch: dict, vocab: mllm.ImageVocab) -> dict:
        """Fills the discrete slots of tokens and targets with the images' code ids, and adds
        `input_codes` [B,T]: the codes of the continuous cells (`mllm.input_codes`, what `source_copy`
        copies; an MLLM without it ignores them)."""
        sem, pix = self.codes(tok_params, batch["images"])
        out = dict(batch)
        out["input_codes"] = mllm.input_codes(batch["token_slots"], batch["token_cells"], sem, pix)
        out["tokens"] = mllm.fill_codes(batch["tokens"], batch["token_slots"], batch["token_cells"], sem, pix, vocab)
        out["targets"] = mllm.fill_codes(batch["targets"], batch["target_slots"], batch["target_cells"], sem, pix,
                                         vocab)
        return out

    def with_tower(self, params):
        """`params` (the MLLM's nnx.State) with the vision tower replaced by the tokenizer's encoders."""
        flat = dict(nnx.to_flat_state(params))
        for name, sub in self.tower.items():
            for path, var in nnx.to_flat_state(sub):
                key = ("vision", name) + tuple(path)
                if key not in flat:
                    raise ValueError(f"vision tower parameter {'/'.join(map(str, key))} is missing in the MLLM")
                old = flat[key]
                value = old[...]
                if value.shape != var[...].shape:
                    raise ValueError(f"vision tower parameter {'/'.join(map(str, key))}: the tokenizer has "
                                     f"{var[...].shape}, the MLLM {value.shape}")
                # A copy: the train state is donated each step, the tokenizer's arrays must survive.
                flat[key] = old.replace(jax.device_put(jnp.array(var[...], value.dtype, copy=True), value.sharding))
        return nnx.from_flat_state(list(flat.items()))
