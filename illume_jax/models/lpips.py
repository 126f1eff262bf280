"""LPIPS with a VGG16 trunk (Zhang et al. 2018, v0.1 "lin" weights) — the official tokenizer's
perceptual loss (spec §1.10, taming-transformers' `LPIPS`).

distance(x, y) for images in [-1, 1]: both go through the scaling layer and VGG16's
conv1_2..conv5_3 ReLU outputs; each feature map is unit-normalised over channels, the squared
difference is weighted per channel by the learned 1x1 "lin" layer, averaged over space and
summed over the five layers.

The weights cannot be downloaded here. `load_weights` reads a file the user converts once
from the public PyTorch weights — torchvision's VGG16 (`features.N.*`) or taming's LPIPS
state dict (`net.sliceK.N.*`) plus the `linK.model.1.weight` layers — as .safetensors, .npz,
or a PyTorch file read with `torch.load(weights_only=True)` (never unrestricted pickle).
"""
from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# torchvision vgg16.features: conv indices and the max-pools between the five LPIPS slices.
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
SLICE_ENDS = (1, 3, 6, 9, 12)   # the LPIPS taps: after conv1_2, conv2_2, conv3_3, conv4_3, conv5_3 (+ReLU)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPS(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        convs, cin = [], 3
        for cout in CHANNELS:
            convs.append(nnx.Conv(cin, cout, kernel_size=(3, 3), padding=((1, 1), (1, 1)), rngs=rngs,
                                  kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                                    (None, None, None, "conv_out")),
                                  bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",))))
            cin = cout
        self.convs = nnx.List(convs)
        self.lins = nnx.List([nnx.Param(jnp.full((CHANNELS[e],), 1.0 / CHANNELS[e]), out_sharding=(None,))
                              for e in SLICE_ENDS])

    def features(self, x: jax.Array) -> list[jax.Array]:
        h = (x - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
        taps = []
        for i, conv in enumerate(self.convs):
            if i in (2, 4, 7, 10):  # a 2x2 max-pool starts slices 2..5
                h = nnx.max_pool(h, (2, 2), strides=(2, 2))
            h = jax.nn.relu(conv(h))
            if i in SLICE_ENDS:
                taps.append(h)
        return taps

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """Per-image distance [B] for x, y [B,H,W,3] in [-1, 1]."""
        total = 0.0
        for fx, fy, lin in zip(self.features(x), self.features(y), self.lins):
            fx = fx / (jnp.sqrt(jnp.sum(fx * fx, -1, keepdims=True)) + 1e-10)
            fy = fy / (jnp.sqrt(jnp.sum(fy * fy, -1, keepdims=True)) + 1e-10)
            total = total + jnp.mean(jnp.sum((fx - fy) ** 2 * lin[...], -1), axis=(1, 2))
        return total


def _read(path: str) -> dict[str, np.ndarray]:
    if not os.path.exists(path):
        raise ValueError(f"LPIPS weights {path!r} do not exist")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return dict(load_file(path))
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    import torch  # PyTorch files: tensors only, never arbitrary pickled objects
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    return {k: v.float().numpy() for k, v in sd.items() if hasattr(v, "numpy")}


def torch_to_params(sd: dict[str, np.ndarray]) -> dict:
    """{'convs': {i: {'kernel','bias'}}, 'lins': {k: weights}} from torchvision or taming names."""
    convs, lins = {}, {}
    for key, value in sd.items():
        m = re.fullmatch(r"(?:features|net\.slice\d)\.(\d+)\.(weight|bias)", key)
        if m:
            idx = int(m.group(1))
            if idx not in CONV_INDICES:
                raise ValueError(f"LPIPS weights: {key!r} is not a VGG16 conv (conv indices {CONV_INDICES})")
            i = CONV_INDICES.index(idx)
            convs.setdefault(i, {})["kernel" if m.group(2) == "weight" else "bias"] = (
                np.transpose(value, (2, 3, 1, 0)) if m.group(2) == "weight" else value)
            continue
        m = re.fullmatch(r"lin(\d)\.model\.1\.weight", key)
        if m:
            lins[int(m.group(1))] = value.reshape(-1)
    missing = [f"conv {CONV_INDICES[i]} {p}" for i in range(len(CONV_INDICES)) for p in ("kernel", "bias")
               if p not in convs.get(i, {})] + [f"lin{k}" for k in range(5) if k not in lins]
    if missing:
        raise ValueError(f"LPIPS weights are missing {missing}")
    for i, c in convs.items():
        cin = 3 if i == 0 else CHANNELS[i - 1]
        if c["kernel"].shape != (3, 3, cin, CHANNELS[i]):
            raise ValueError(f"LPIPS weights: conv {CONV_INDICES[i]} kernel has shape {c['kernel'].shape} (HWIO), "
                             f"expected {(3, 3, cin, CHANNELS[i])}")
    return {"convs": convs, "lins": lins}


def load_weights(net: LPIPS, path: str) -> None:
    params = torch_to_params(_read(path))
    for i, conv in enumerate(net.convs):
        conv.kernel[...] = jnp.asarray(params["convs"][i]["kernel"])
        conv.bias[...] = jnp.asarray(params["convs"][i]["bias"])
    for k, lin in enumerate(net.lins):
        if params["lins"][k].shape != lin[...].shape:
            raise ValueError(f"LPIPS weights: lin{k} has {params['lins'][k].shape[0]} channels, "
                             f"expected {lin[...].shape[0]}")
        lin[...] = jnp.asarray(params["lins"][k])
