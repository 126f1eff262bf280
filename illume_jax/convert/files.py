"""Checkpoint files in the formats the official releases use, read lazily, one tensor at a time.

`open_tensors(path)` accepts
  - a `.safetensors` file, or a folder with `model.safetensors` / `diffusion_pytorch_model.safetensors`
    or a sharded `*.safetensors.index.json` (HF `save_pretrained` with `max_shard_size`);
  - a PyTorch `.bin` / `.pt` / `.pth` file (or a folder with `pytorch_model.bin` or a sharded
    `pytorch_model.bin.index.json`), read with `torch.load(weights_only=True, mmap=True)` — never
    unrestricted pickle, so a checkpoint cannot run code.
It returns a read-only Mapping {key: np.ndarray}. Safetensors are parsed here (the format is a
JSON header plus raw little-endian bytes) and memory-mapped: `shape(key)` costs nothing and
`[key]` reads that one tensor, so a 7B checkpoint is never resident in host memory as a whole.
bfloat16 tensors come back as `ml_dtypes.bfloat16` arrays (numpy has no bf16 of its own).

`write_safetensors(folder, tensors, ...)` is the reverse: shards of at most `max_shard_bytes`,
plus the HF index file when there is more than one.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_WEIGHT_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                 "diffusion_pytorch_model.bin")


class _SafetensorsFile:
    """One .safetensors file: header parsed once, tensors memory-mapped on demand."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 * 2 ** 20:
                raise ValueError(f"{path}: not a safetensors file (header length {n} bytes)")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.offset, self.header = 8 + n, header
        for key, h in header.items():
            if h["dtype"] not in _DTYPES:
                raise ValueError(f"{path}: tensor {key!r} has dtype {h['dtype']}, expected one of {sorted(_DTYPES)}")

    def keys(self):
        return self.header.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def __getitem__(self, key: str) -> np.ndarray:
        # pread into a fresh array: no mapping stays resident, so the process holds only the
        # tensors its caller keeps (a memory map would count every page read towards RSS).
        h = self.header[key]
        start, end = h["data_offsets"]
        out = np.empty(h["shape"], np.dtype(_DTYPES[h["dtype"]]))
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset + start)
            got = f.readinto(view)
        if got != end - start:
            raise ValueError(f"{self.path}: tensor {key!r} is truncated ({got} of {end - start} bytes)")
        return out


class _TorchFile:
    """One PyTorch pickle read with weights_only=True (tensors only) and mmap."""

    def __init__(self, path: str):
        import torch  # only needed for .bin checkpoints
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - torch raises several kinds; all mean "not loadable safely"
            raise ValueError(f"{path}: cannot be read as a PyTorch state dict with weights_only=True ({e})") from e
        for k in ("ema", "model", "state_dict"):  # official DualViTok loaders accept these wrappers
            if isinstance(sd, dict) and isinstance(sd.get(k), dict):
                sd = sd[k]
                break
        if not isinstance(sd, dict):
            raise ValueError(f"{path}: expected a state dict (name -> tensor), found {type(sd).__name__}")
        self.path, self.sd = path, {k: v for k, v in sd.items() if hasattr(v, "shape")}

    def keys(self):
        return self.sd.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.sd[key].shape)

    def __getitem__(self, key: str) -> np.ndarray:
        t = self.sd[key].detach()
        if str(t.dtype) == "torch.bfloat16":
            import torch
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return t.numpy().copy()


class TensorReader(Mapping):
    """{key: np.ndarray} over one or more checkpoint files, loading a tensor only when asked."""

    def __init__(self, files: list, source: str):
        self.source, self.files = source, files
        self._where: dict[str, Any] = {}
        for f in files:
            for k in f.keys():
                if k in self._where:
                    raise ValueError(f"{source}: tensor {k!r} appears in both {self._where[k].path} and {f.path}")
                self._where[k] = f

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: f.shape(k) for k, f in self._where.items()}


def _open_file(path: str):
    if path.endswith(".safetensors"):
        return _SafetensorsFile(path)
    if path.endswith((".bin", ".pt", ".pth")):
        return _TorchFile(path)
    raise ValueError(f"{path}: unknown checkpoint file type (expected .safetensors, .bin, .pt or .pth)")


def weight_files(path: str) -> list[str]:
    """The weight file(s) of a checkpoint path (file, folder, or sharded folder with an index)."""
    if os.path.isfile(path):
        if path.endswith(".index.json"):
            with open(path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(os.path.dirname(path), s) for s in shards]
        return [path]
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r}: no such file or folder")
    names = os.listdir(path)
    for index in sorted(n for n in names if n.endswith(".safetensors.index.json")) + \
            sorted(n for n in names if n.endswith(".bin.index.json")):
        return weight_files(os.path.join(path, index))
    for name in _WEIGHT_NAMES:
        if name in names:
            return [os.path.join(path, name)]
    found = sorted(n for n in names if n.endswith((".safetensors", ".bin")))
    if len(found) == 1:  # e.g. a diffusers variant, diffusion_pytorch_model.fp16.safetensors
        return [os.path.join(path, found[0])]
    if found:
        raise ValueError(f"checkpoint folder {path!r} holds several weight files {found}: pass the one to read")
    raise ValueError(f"checkpoint folder {path!r}: expected one of {_WEIGHT_NAMES} or a *.index.json; "
                     f"found {sorted(names)[:12]}")


def open_tensors(path: str) -> TensorReader:
    files = weight_files(path)
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise ValueError(f"checkpoint {path!r}: its index names shard files that do not exist: {missing}")
    return TensorReader([_open_file(f) for f in files], path)


def read_json(path: str, what: str) -> dict:
    if not os.path.exists(path):
        raise ValueError(f"{what}: {path} does not exist")
    with open(path) as f:
        return json.load(f)


# -- writing ---------------------------------------------------------------------------------------

def _write_one(path: str, tensors: list[tuple[str, np.ndarray]]) -> None:
    header, offset = {}, 0
    for key, a in tensors:
        if a.dtype not in _NAMES:
            raise ValueError(f"tensor {key!r}: dtype {a.dtype} cannot be stored in safetensors")
        header[key] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte aligned data, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, a in tensors:
            f.write(np.ascontiguousarray(a).tobytes())


def write_safetensors(folder: str, tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray], *,
                      name: str = "model", max_shard_bytes: int = 5 * 2 ** 30) -> list[str]:
    """Writes `{name}.safetensors`, or `{name}-0000i-of-0000n.safetensors` shards plus
    `{name}.safetensors.index.json` when the tensors exceed `max_shard_bytes`. Consumes `tensors`
    shard by shard (an iterator is never held whole). Returns the files written."""
    os.makedirs(folder, exist_ok=True)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    shards, current, size = [], [], 0
    tmp_names = []
    for key, a in items:
        a = np.asarray(a)
        if current and size + a.nbytes > max_shard_bytes:
            tmp_names.append(_flush(folder, name, len(shards), current, shards))
            current, size = [], 0
        current.append((key, a))
        size += a.nbytes
    if current or not shards:
        tmp_names.append(_flush(folder, name, len(shards), current, shards))
    if len(shards) == 1:
        final = os.path.join(folder, f"{name}.safetensors")
        os.replace(tmp_names[0], final)
        return [final]
    n = len(shards)
    weight_map, written = {}, []
    for i, (tmp, keys) in enumerate(zip(tmp_names, shards)):
        fname = f"{name}-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(tmp, os.path.join(folder, fname))
        written.append(os.path.join(folder, fname))
        weight_map.update({k: fname for k in keys})
    index = os.path.join(folder, f"{name}.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    return written + [index]


def _flush(folder: str, name: str, i: int, tensors: list, shards: list) -> str:
    tmp = os.path.join(folder, f".{name}-{i}.safetensors.tmp")
    _write_one(tmp, tensors)
    shards.append([k for k, _ in tensors])
    return tmp
