"""Glue to lycoris-lora: build one adapter per target, compute its effect, move weights in and out.

lycoris supplies the parameterisations (``LoConModule`` for lierla/c3lier, ``LohaModule``,
``LokrModule``; DoRA = ``weight_decompose``), their initialisation (down/A random, up/B zero, so a
fresh network changes nothing) and their on-disk tensor names (``lora_down.weight``…, ``hada_w1_a``…,
``lokr_w1``…, ``dora_scale``). We never call lycoris' ``apply_to`` (it replaces ``module.forward``):
the network adds the effect from a forward hook, see :func:`delta_output`.

The effect is defined as the consumers (A1111, Forge, ComfyUI) compute it from the file, so that
what we train is what they apply:

- ΔW = scale · rebuild(factors), scale = alpha / rank (LoKr with both factors full: 1);
- DoRA: ΔW = DoRA(W + ΔW) − W with the norm taken per **input** column (A1111's only convention,
  ``dora_scale`` of shape [1, in, …]; lycoris ``wd_on_out=False``);
- a multiplier k scales ΔW linearly (A1111/ComfyUI do so for DoRA too), so k = 0 is exactly off.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule

ALGOS = {"locon": LoConModule, "loha": LohaModule, "lokr": LokrModule}
ALGO_OF_TYPE = {"lierla": "locon", "c3lier": "locon", "loha": "loha", "lokr": "lokr"}


def algo_of(module: nn.Module) -> str:
    for name, cls in ALGOS.items():
        if isinstance(module, cls):
            return name
    raise TypeError(f"not a supported lycoris module: {type(module).__name__}")


def build(name: str, org: nn.Module, algo: str, rank: int, alpha: float, dora: bool,
          dtype: torch.dtype = torch.float32, **kwargs) -> nn.Module:
    """A fresh lycoris module for ``org``, moved to ``org``'s device (``meta`` stays ``meta``).

    Built on the CPU first: lycoris' constructors do small host computations (``.item()``) that a
    ``meta`` or GPU default device would break or slow down; the factors are small."""
    device = org.weight.device
    with torch.device("cpu"):
        module = ALGOS[algo](name, org, multiplier=1.0, lora_dim=int(rank), alpha=float(alpha),
                             weight_decompose=bool(dora), wd_on_out=False, bypass_mode=False, **kwargs)
    return module.to(device=device, dtype=dtype)


def enable_dora(module: nn.Module, dora_scale: torch.Tensor) -> None:
    """Turn weight decomposition on for a module built without it (from a file), input-axis convention."""
    module.wd = True
    module.wd_on_out = False
    module.dora_norm_dims = len(module.shape) - 1
    module.dora_scale = nn.Parameter(dora_scale.detach().clone().to(module.dtype_tensor.device, torch.float32))


def rank_of(module: nn.Module) -> int:
    return int(module.lora_dim)


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def raw_delta(module: nn.Module) -> torch.Tensor:
    """scale · rebuild(factors), shaped like the original weight (before DoRA and multiplier)."""
    algo = algo_of(module)
    if algo == "locon":
        if module.tucker:
            return module.make_weight() * module.scale
        up, down = module.lora_up.weight, module.lora_down.weight
        return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(module.shape) * module.scale
    # LoHa / LoKr: lycoris' get_weight already includes the scale once.
    return module.get_weight(module.shape) * module.scalar


def delta_weight(module: nn.Module, org: nn.Module, multiplier: float) -> torch.Tensor:
    """The full ΔW this adapter applies to ``org`` at ``multiplier`` (in the adapter's dtype)."""
    dw = raw_delta(module)
    if getattr(module, "wd", False):
        weight = org.weight.detach().to(dw.dtype)
        merged = weight + dw
        norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1))
        dw = merged * (module.dora_scale.to(dw.dtype) / norm) - weight
    return dw * multiplier


def delta_output(module: nn.Module, org: nn.Module, x: torch.Tensor, multiplier: float) -> torch.Tensor:
    """The change of ``org(x)`` this adapter makes at ``multiplier``.

    Plain LoRA/LoCon runs the low-rank path ``up(down(x))`` (cheap, as kohya trains); every other form
    applies its rebuilt ΔW with the layer's own op. Computed in the adapter's dtype.
    """
    dtype = _param_dtype(module)
    xd = x.to(dtype)
    if algo_of(module) == "locon" and not module.tucker and not getattr(module, "wd", False):
        return module.lora_up(module.lora_down(xd)) * (module.scale * multiplier)
    dw = delta_weight(module, org, multiplier)
    if isinstance(org, nn.Linear):
        return F.linear(xd, dw)
    return F.conv2d(xd, dw, None, org.stride, org.padding, org.dilation, org.groups)


# ------------------------------------------------------------------------------------------ tensors

def tensors_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """This adapter's file tensors under their kohya/LyCORIS suffixes (``lora_up.weight``, ``alpha``, …)."""
    return {k: v.detach() for k, v in module.custom_state_dict().items()}


# Factors that scale the effect linearly when multiplied (two per type: strength is split √|s| each).
_STRENGTH_FACTORS = {
    "locon": (("lora_up.weight",), ("lora_down.weight",)),
    "loha": (("hada_w1_a",), ("hada_w2_a",)),
    "lokr": (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")),
}


def bake_strength(algo: str, tensors: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    """Scale the effect by ``strength`` in the tensors themselves (the sign goes on the first factor).

    √|s| on each of two factors, as TrainTrain does for LoRA, keeps both in the same range (fp16).
    """
    if strength == 1.0:
        return tensors
    root = math.sqrt(abs(strength))
    out = dict(tensors)
    for i, names in enumerate(_STRENGTH_FACTORS[algo]):
        key = next(n for n in names if n in out)
        factor = root * (math.copysign(1.0, strength) if i == 0 else 1.0)
        out[key] = out[key] * factor
    return out


def expected_keys(module: nn.Module) -> set[str]:
    return set(module.custom_state_dict().keys())


def _fit(name: str, key: str, value: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """``value`` shaped as ``current``; a 1×1-conv factor [r, C, 1, 1] fits a Linear one [r, C] (kohya
    writes SD2's Linear proj_in/proj_out that way) and vice versa. Anything else is a ValueError."""
    if tuple(value.shape) == tuple(current.shape):
        return value
    squeeze = lambda s: tuple(d for i, d in enumerate(s) if not (i >= 2 and d == 1))  # noqa: E731
    if value.dim() != current.dim() and squeeze(value.shape) == squeeze(current.shape):
        return value.reshape(current.shape)
    raise ValueError(f"{name}.{key}: shape {tuple(value.shape)} in the file, {tuple(current.shape)} in the network")


@torch.no_grad()
def load_tensors(name: str, module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Optional[float]:
    """Copy one adapter's file tensors into it (shapes checked); returns the file's alpha (None if absent).

    A missing alpha means alpha = rank (scale 1), as kohya, A1111 and ComfyUI read it.
    """
    for key, value in tensors.items():
        if key == "alpha":
            continue
        if key == "dora_scale" and not getattr(module, "wd", False):
            raise ValueError(f"{name}: the file has dora_scale but the network is not DoRA")
        current = module.get_parameter(key)
        current.copy_(_fit(name, key, value, current).to(current.dtype))
    rank = rank_of(module)
    alpha = float(tensors["alpha"].float()) if "alpha" in tensors else None
    if algo_of(module) == "lokr" and module.use_w1 and module.use_w2:
        module.scale = 1.0
        module.alpha.fill_(rank)
    else:
        a = alpha if alpha else rank
        module.scale = a / rank
        module.alpha.fill_(a)
    return alpha
