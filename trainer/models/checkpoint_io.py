"""Reading checkpoint files: safetensors headers, zero-copy mmap loading, safe pickles.

Why not ``safetensors.torch.load_file``: it reads every tensor into fresh memory. Here a
safetensors file is mapped copy-on-write and each tensor is a view into the mapping, so
a multi-GB checkpoint costs no RAM until pages are touched, and assigning the views into
meta-initialised modules gives a model with no second copy.

``.ckpt``/``.pt`` files are pickles that can run code when loaded; they only go through
PyTorch's restricted ``weights_only`` unpickler (tensors and plain containers).
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Iterable, Union

import torch

from ..atomic import atomic_path
from ..errors import UserError

PathLike = Union[str, os.PathLike]

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(UserError, ValueError):
    """A model file that cannot be used; the message is one line and names the file."""


class TensorInfo(tuple):
    """(dtype name, shape) of a tensor as read from a header, without reading the tensor."""
    __slots__ = ()

    def __new__(cls, dtype: str, shape: Iterable[int]):
        return super().__new__(cls, (dtype, tuple(int(s) for s in shape)))

    @property
    def dtype(self) -> str:
        return self[0]

    @property
    def shape(self) -> tuple:
        return self[1]


def _header(path: Path) -> tuple[int, dict]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if n <= 1 or n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file or truncated (header length {n}, file {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a table)")
    data_len = size - 8 - n
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: malformed safetensors entry for {key!r}") from None
        if end > data_len or start > end:
            raise CheckpointError(f"{path}: truncated or corrupt (tensor {key!r} ends at byte {end} "
                                  f"of {data_len} data bytes)")
    return n, header


def read_header(path: PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Keys, dtypes and shapes of a ``.safetensors`` file, reading only its header."""
    path = Path(path)
    _, header = _header(path)
    meta = header.pop("__metadata__", None) or {}
    return {k: TensorInfo(v["dtype"], v["shape"]) for k, v in header.items()}, meta


def load_safetensors(path: PathLike, keys: Iterable[str] | None = None,
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file as copy-on-write views of one mmap (no read, no copy).

    With ``dtype``, floating tensors stored in another dtype are read one by one into a small buffer
    and converted: a touched mmap page stays resident until the whole mapping is released, so
    upcasting from views would hold the file *and* the converted copy (the load-time RSS peak)."""
    path = Path(path)
    n, header = _header(path)
    header.pop("__metadata__", None)
    wanted = set(keys) if keys is not None else None
    convert = dtype
    out: dict[str, torch.Tensor] = {}
    if path.stat().st_size == 8 + n:
        return out
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = 8 + n
    for key, entry in header.items():
        if wanted is not None and key not in wanted:
            continue
        dtype_name = entry["dtype"]
        if dtype_name in FP8_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} is stored in fp8 ({dtype_name}); "
                                  "fp8 weight storage cannot be trained on, use an fp16/fp32 file")
        if dtype_name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype_name}")
        dtype = SAFETENSORS_DTYPES[dtype_name]
        start, end = entry["data_offsets"]
        shape = entry["shape"]
        if end == start:
            out[key] = torch.empty(shape, dtype=dtype)
            continue
        if convert is not None and dtype.is_floating_point and dtype != convert:
            out[key] = _read_converted(path, base + start, end - start, dtype, shape, convert)
            continue
        itemsize = torch.empty((), dtype=dtype).element_size()
        flat = torch.frombuffer(mm, dtype=dtype, count=(end - start) // itemsize, offset=base + start)
        out[key] = flat.reshape(shape)
    return out


def _read_converted(path: Path, offset: int, length: int, stored: torch.dtype, shape, dtype: torch.dtype):
    """One tensor read from the file (not the mapping) and converted to ``dtype``."""
    buf = bytearray(length)
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(buf) != length:
            raise CheckpointError(f"{path}: truncated while reading a tensor")
    return torch.frombuffer(buf, dtype=stored).reshape(shape).to(dtype)


def load_pickle_checkpoint(path: PathLike) -> dict[str, torch.Tensor]:
    """A ``.ckpt``/``.pt``/``.bin`` through PyTorch's restricted unpickler only."""
    path = Path(path)
    import pickle
    errors = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, ImportError, TypeError)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused to unpickle: the file holds objects other than tensors and "
                              f"plain containers ({first[:160]}); convert it to .safetensors") from None
    except errors as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else 'no detail'})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors


def load_state_dict(path: PathLike, keys: Iterable[str] | None = None,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Any supported checkpoint file into a ``{key: tensor}`` dict (views where possible); ``keys`` and
    ``dtype`` (see :func:`load_safetensors`) apply to safetensors files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix.lower() == ".safetensors":
        return load_safetensors(path, keys, dtype)
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        return load_pickle_checkpoint(path)
    raise CheckpointError(f"{path}: unknown checkpoint extension {path.suffix!r} "
                          "(expected .safetensors, .ckpt, .pt, .pth or .bin)")


def shapes_of(path: PathLike) -> dict[str, TensorInfo]:
    """Key → (dtype, shape); header only for safetensors, a restricted load otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix.lower() == ".safetensors":
        return read_header(path)[0]
    sd = load_state_dict(path)
    return {k: TensorInfo(str(v.dtype).replace("torch.", ""), v.shape) for k, v in sd.items()}


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    """Write through a temporary file in the same folder and rename, so no half file is ever visible."""
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
