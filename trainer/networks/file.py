"""The LoRA file: kohya-format ``.safetensors`` with kohya's metadata and hashes, written atomically.

Tensors: ``NAME.lora_down.weight``, ``NAME.lora_up.weight``, ``NAME.alpha`` (0-d) and nothing else for
lierla/c3lier (LoHa ``hada_*``, LoKr ``lokr_*``, DoRA ``dora_scale``: the names A1111/Forge/ComfyUI
read), all in ``save_precision`` (alpha too, as kohya writes it).

Hashes (kohya ``train_util.precalculate_safetensors_hashes``, what A1111 shows as the LoRA hash):
the tensors are serialised in memory with the ``ss_*`` metadata only;
``sshs_model_hash`` = SHA-256 of the bytes after the header (the tensor data, so later metadata
edits don't change it) and ``sshs_legacy_hash`` = first 8 hex digits of SHA-256 of the 64 KiB at
offset 1 MiB of that serialisation.

Metadata values are strings: ``None`` → ``"None"``, booleans ``"True"``/``"False"``, dicts and lists
JSON, tuples their Python text (``ss_resolution`` is ``"(512, 512)"``), as kohya writes them.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import safetensors
import safetensors.torch
import torch

from ..atomic import atomic_path
from .. import __version__
from ..errors import UserError
from .network import LoRANetwork

log = logging.getLogger(__name__)

SAI_MODEL_SPEC = "1.0.1"
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def save_dtype(value: Union[str, torch.dtype, None]) -> torch.dtype:
    """``save_precision`` as a dtype (fp16 default)."""
    if value is None:
        return torch.float16
    if isinstance(value, torch.dtype):
        return value
    try:
        return DTYPES[str(value).lower().replace("torch.", "")]
    except KeyError:
        raise UserError(f"save_precision: unknown precision {value!r} (fp16, bf16, fp32)") from None


# ------------------------------------------------------------------------------------------ hashes

def _model_hash(b: io.BufferedIOBase) -> str:
    b.seek(0)
    header = int.from_bytes(b.read(8), "little")
    b.seek(8 + header)
    h = hashlib.sha256()
    for chunk in iter(lambda: b.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def _legacy_hash(b: io.BufferedIOBase) -> str:
    b.seek(0x100000)
    return hashlib.sha256(b.read(0x10000)).hexdigest()[:8]


def kohya_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(``sshs_model_hash``, ``sshs_legacy_hash``) exactly as kohya computes them."""
    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = io.BytesIO(safetensors.torch.save(dict(tensors), ss))
    return _model_hash(data), _legacy_hash(data)


def file_model_hash(path: Union[str, os.PathLike]) -> str:
    """SHA-256 of a ``.safetensors`` file's tensor data (= its ``sshs_model_hash``, A1111's LoRA hash)."""
    with open(path, "rb") as f:
        return _model_hash(f)


# ------------------------------------------------------------------------------------------ metadata

def to_metadata_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def base_model_version(family: str, prediction_type: str) -> str:
    """kohya's ``ss_base_model_version``: ``get_model_version_str_for_sd1_sd2(v2, v_parameterization)``
    gives ``sd_v1``, ``sd_v1_v``, ``sd_v2``, ``sd_v2_v`` (so an SD1 v-prediction model is ``sd_v1_v`` in
    kohya's files too); SDXL is ``sdxl_base_v1-0``. Loaders test only the ``sdxl_`` prefix and ``ss_v2``."""
    v = prediction_type in ("v", "v_prediction")
    return {"sd1": "sd_v1" + ("_v" if v else ""), "sd2": "sd_v2" + ("_v" if v else ""),
            "sdxl": "sdxl_base_v1-0"}[family]


def architecture(family: str, prediction_type: str) -> str:
    v = prediction_type in ("v", "v_prediction")
    return {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512",
            "sdxl": "stable-diffusion-xl-v1-base"}[family] + "/lora"


def block_args(network: LoRANetwork) -> dict[str, str]:
    """kohya's network args for per-block ranks, alphas and LR weights (absent when unused)."""
    from .blocks import kohya_lr_weight_args
    s, out = network.spec, {}
    if s.block_dims is not None:
        out["block_dims"] = ",".join(str(int(v)) for v in s.block_dims)
    if s.block_alphas is not None:
        out["block_alphas"] = ",".join(f"{float(v):g}" for v in s.block_alphas)
    if s.block_lr_weight is not None:
        out.update(kohya_lr_weight_args(s.block_lr_weight, network.family, network.unet))
    return out


def network_metadata(network: LoRANetwork, strength: float = 1.0) -> dict[str, str]:
    """What the network itself knows: kohya's ``ss_network_*``, model version keys, ``modelspec`` facts.

    lierla/c3lier are kohya ``networks.lora`` (c3lier with ``conv_dim``/``conv_alpha`` args); LoHa, LoKr
    and DoRA are LyCORIS's ``lycoris.kohya`` with its ``algo`` (and ``dora_wd``) args.
    """
    s = network.spec
    args: dict[str, Any] = {}
    has_conv = any(t.kind == "conv" for t in network.targets.values())
    if has_conv:
        args["conv_dim"] = str(int(s.conv_rank or s.rank))
        args["conv_alpha"] = _num(s.conv_alpha or s.alpha or s.conv_rank or s.rank)
    lycoris = s.network_type in ("loha", "lokr") or s.dora
    if lycoris:
        args = {"algo": {"lierla": "lora", "c3lier": "locon"}.get(s.network_type, s.network_type), **args}
        if s.dora:
            args["dora_wd"] = "True"
    args.update(block_args(network))
    pred = network.prediction_type
    md = {
        "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
        "ss_network_dim": str(int(s.rank)),
        "ss_network_alpha": repr(float(s.alpha or s.rank)),
        "ss_base_model_version": base_model_version(network.family, pred),
        "ss_v2": str(network.family == "sd2"),
        "modelspec.sai_model_spec": SAI_MODEL_SPEC,
        "modelspec.architecture": architecture(network.family, pred),
        "modelspec.implementation": SGM_IMPLEMENTATION if network.family == "sdxl" else "diffusers",
        "modelspec.implementation_version": f"shinkansen/{__version__}",
        "modelspec.prediction_type": "v" if pred in ("v", "v_prediction") else "epsilon",
        "shinkansen_network": json.dumps({**s.to_dict(), "strength": strength, "modules": network.counts}),
    }
    if args:
        md["ss_network_args"] = json.dumps(args)
    return md


def build_metadata(network: LoRANetwork, info: Optional[Mapping[str, Any]] = None,
                   strength: float = 1.0) -> dict[str, str]:
    """All metadata strings: the engine's ``info`` (``ss_*``, ``modelspec.*``, ``shinkansen_*``; any value
    type) plus what the network knows (which wins for its own keys). ``modelspec.title`` defaults to
    ``ss_output_name``, ``modelspec.date`` to now. Hash keys are added by :func:`save_lora`."""
    md = {k: to_metadata_value(v) for k, v in (info or {}).items() if not k.startswith("sshs_")}
    md.update(network_metadata(network, strength))
    if "modelspec.title" not in md and "ss_output_name" in md:
        md["modelspec.title"] = md["ss_output_name"]
    md.setdefault("modelspec.date", _dt.datetime.now().replace(microsecond=0).isoformat())
    return md


# ------------------------------------------------------------------------------------------ files

def write_file_atomic(path: Union[str, os.PathLike], data: bytes) -> Path:
    """Write ``data`` via a temporary file in the same folder and an atomic rename: a crash never leaves a
    half-written file under ``path``. Python's own writes, so a full disk is an ``OSError`` with its errno
    (safetensors' and torch's writers report it as their own exception types, without one)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        f.write(data)
    return path


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Union[str, os.PathLike],
                      metadata: Mapping[str, str]) -> Path:
    """``tensors`` as a ``.safetensors`` file, atomically (:func:`write_file_atomic`)."""
    return write_file_atomic(path, safetensors.torch.save(dict(tensors), metadata=dict(metadata)))


def lora_file_bytes(network: LoRANetwork, metadata: Optional[Mapping[str, Any]] = None,
                    dtype: Union[str, torch.dtype, None] = torch.float16, strength: float = 1.0) -> bytes:
    """The kohya-format file of ``network`` in memory (``strength`` baked in, ``dtype`` = save_precision);
    kept as bytes so a failed write can put the very same file elsewhere."""
    tensors = network.kohya_state_dict(save_dtype(dtype), strength=strength)
    md = build_metadata(network, metadata, strength)
    md["sshs_model_hash"], md["sshs_legacy_hash"] = kohya_hashes(tensors, md)
    return safetensors.torch.save(tensors, metadata=md)


def save_lora(network: LoRANetwork, path: Union[str, os.PathLike], metadata: Optional[Mapping[str, Any]] = None,
              dtype: Union[str, torch.dtype, None] = torch.float16, strength: float = 1.0) -> Path:
    """Save ``network`` as a kohya-format LoRA (``strength`` baked in, ``dtype`` = save_precision)."""
    out = write_file_atomic(path, lora_file_bytes(network, metadata, dtype, strength))
    log.info("saved %s (%s)", out, str(save_dtype(dtype)).replace("torch.", ""))
    return out


def read_metadata(path: Union[str, os.PathLike]) -> dict[str, str]:
    with safetensors.safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_lora(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a LoRA file; unreadable or missing files are a :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file not found: {path}")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path.name}: only .safetensors LoRA files are supported")
    try:
        tensors = safetensors.torch.load_file(str(path), device=str(device))
        metadata = read_metadata(path)
    except (OSError, safetensors.SafetensorError, ValueError) as e:
        raise UserError(f"{path.name}: not a readable safetensors file ({e})") from None
    return tensors, metadata


def resume_network(network: LoRANetwork, path: Union[str, os.PathLike], strict: bool = True) -> dict[str, str]:
    """``network_resume``: load a LoRA file's weights into ``network`` (names/shapes checked); returns its metadata."""
    tensors, metadata = load_lora(path)
    network.load_kohya_state_dict(tensors, strict=strict, source=Path(path).name)
    return metadata
