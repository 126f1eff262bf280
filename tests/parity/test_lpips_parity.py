"""Our LPIPS-VGG16 vs a PyTorch LPIPS written here from the paper / taming's layout, random weights,
loaded through our converter from a safetensors file with taming's key names."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from illume_jax import sharding  # noqa: E402
from illume_jax.models import lpips  # noqa: E402


def _torch_vgg_features():
    layers, cin = [], 3
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    for v in cfg:
        if v == "M":
            layers.append(torch.nn.MaxPool2d(2, 2))
        else:
            layers += [torch.nn.Conv2d(cin, v, 3, padding=1), torch.nn.ReLU()]
            cin = v
    return torch.nn.Sequential(*layers)


def _torch_lpips(features, lins, x, y):
    shift = torch.tensor(lpips.SHIFT).view(1, 3, 1, 1)
    scale = torch.tensor(lpips.SCALE).view(1, 3, 1, 1)
    taps = {3, 8, 15, 22, 29}  # ReLU outputs relu1_2 .. relu5_3

    def feats(z):
        out, h = [], (z - shift) / scale
        for i, layer in enumerate(features):
            h = layer(h)
            if i in taps:
                out.append(h)
        return out

    total = 0
    for fx, fy, w in zip(feats(x), feats(y), lins):
        fx = fx / (torch.sqrt((fx ** 2).sum(1, keepdim=True)) + 1e-10)
        fy = fy / (torch.sqrt((fy ** 2).sum(1, keepdim=True)) + 1e-10)
        total = total + torch.nn.functional.conv2d((fx - fy) ** 2, w).mean((2, 3))
    return total[:, 0]


def test_lpips_matches_torch(tmp_path):
    from safetensors.numpy import save_file
    torch.manual_seed(0)
    features = _torch_vgg_features()
    lins = [torch.rand(1, c, 1, 1) for c in (64, 128, 256, 512, 512)]
    sd = {}
    slice_of = lambda idx: 1 + sum(idx > e for e in (3, 8, 15, 22))  # noqa: E731
    for name, t in features.state_dict().items():
        idx, kind = name.split(".")
        sd[f"net.slice{slice_of(int(idx))}.{idx}.{kind}"] = t.numpy()
    for k, w in enumerate(lins):
        sd[f"lin{k}.model.1.weight"] = w.numpy()
    path = str(tmp_path / "lpips.safetensors")
    save_file(sd, path)

    x = np.random.default_rng(0).uniform(-1, 1, (2, 48, 40, 3)).astype(np.float32)
    y = np.clip(x + np.random.default_rng(1).normal(0, 0.2, x.shape), -1, 1).astype(np.float32)
    with torch.no_grad():
        ref = _torch_lpips(features, lins, torch.tensor(x).permute(0, 3, 1, 2), torch.tensor(y).permute(0, 3, 1, 2))
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    with sharding.use_mesh(mesh):
        net = lpips.LPIPS(rngs=nnx.Rngs(0))
    lpips.load_weights(net, path)
    ours = net(jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-4, atol=1e-6)
    assert float(net(jnp.asarray(x), jnp.asarray(x)).max()) == 0.0


def test_missing_weights_are_named(tmp_path):
    from safetensors.numpy import save_file
    path = str(tmp_path / "bad.safetensors")
    save_file({"features.0.weight": np.zeros((64, 3, 3, 3), np.float32)}, path)
    with pytest.raises(ValueError, match="missing"):
        lpips.torch_to_params(lpips._read(path))
