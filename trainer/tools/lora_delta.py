"""A LoRA file ↔ one weight change ΔW per module: what ``resize``, ``merge`` and ``extract`` share.

A module of a kohya-layout file is ``NAME.lora_down.weight`` (r×in, or r×in×kh×kw for a conv; LoCon writes
3×3 down + 1×1 up), ``NAME.lora_up.weight`` (out×r, or out×r×1×1) and ``NAME.alpha``. Its weight change is

    ΔW = (alpha / r) · up·down        (both flattened to matrices, reshaped like the layer's weight),

which is what A1111, ComfyUI and our own network apply. Going back, a matrix M ≈ U·diag(S)·Vᵀ truncated to
k singular values is written in the same layout, as kohya's tools do: up = U·diag(S) (reshaped out×k[×1×1]),
down = Vᵀ (k×in[×kh×kw]), alpha = scale·k, so that alpha/k · up·down is the truncated M·scale. By
Eckart–Young this is the best rank-k approximation in the Frobenius norm; its error is the square root of the
sum of the dropped squared singular values.

Rank rules (kohya ``networks/resize_lora.py``, restated; σ₁ ≥ σ₂ ≥ … are the singular values of ΔW):

- fixed ``rank R``: keep R;
- ``sv_ratio X``: keep every σᵢ > σ₁ / X (the largest kept value is at most X times the smallest kept);
- ``sv_cumulative X``: keep the fewest leading σᵢ whose sum reaches the fraction X of Σσ;
- ``sv_fro X``: keep the fewest leading σᵢ whose √Σσ² reaches the fraction X of the whole ‖ΔW‖_F;

always at least 1 and at most ``max_rank`` and the number of singular values; a zero ΔW (σ₁ of up·down ≤ 1e-6)
keeps rank 1 (kohya's rule; e.g. self-attention over a single token, whose q/k never learn).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import torch

from ..errors import UserError

MIN_SV = 1e-6          # kohya's threshold below which a module's ΔW counts as zero
RULES = ("sv_ratio", "sv_cumulative", "sv_fro")
SVD_DTYPES = {"fp32": torch.float32, "float": torch.float32, "float32": torch.float32,
              "fp64": torch.float64, "double": torch.float64, "float64": torch.float64}
FAMILY_OF_VERSION = {"sd_v1": "sd1", "sd_v1_v": "sd1", "sd_v2": "sd2", "sd_v2_v": "sd2",
                     "sdxl_base_v1-0": "sdxl"}


@dataclass
class Module:
    """One LoRA/LoCon module: ΔW = alpha/rank · up·down."""
    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple:
        """Shape of ΔW: (out, in) or (out, in, kh, kw)."""
        return (self.up.shape[0], *self.down.shape[1:])

    @property
    def is_conv3x3(self) -> bool:
        return self.down.dim() == 4 and tuple(self.down.shape[2:]) != (1, 1)

    def factors(self, dtype: torch.dtype = torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale·up, down) as matrices: ΔW = left @ right, flattened to out × (in·kh·kw)."""
        up = self.up.to(device=device, dtype=dtype).reshape(self.up.shape[0], -1)
        down = self.down.to(device=device, dtype=dtype).reshape(self.rank, -1)
        return up * self.scale, down

    def delta(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        left, right = self.factors(dtype, device)
        return (left @ right).reshape(self.shape)


# ------------------------------------------------------------------------------------------ reading

def modules_from_tensors(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, Module]:
    """Kohya-layout tensors → modules. Anything that is not plain LoRA/LoCon is one clear error."""
    from ..networks.network import split_modules
    out: dict[str, Module] = {}
    other: list[str] = []
    for name, parts in split_modules(tensors).items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            other.append(name)
            continue
        if "lora_mid.weight" in parts or "dora_scale" in parts:
            raise UserError(f"{source}: module {name} is a LoCon-Tucker or DoRA module; only plain LoRA/LoCon "
                            "(lora_down/lora_up/alpha) can be resized, merged or extracted")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        if down.shape[0] != up.shape[1] or down.dim() not in (2, 4) or up.dim() != down.dim():
            raise UserError(f"{source}: module {name}: lora_down {tuple(down.shape)} and lora_up "
                            f"{tuple(up.shape)} do not fit together")
        alpha = float(parts["alpha"].float()) if "alpha" in parts else float(down.shape[0])
        out[name] = Module(name, down, up, alpha)
    if not out:
        what = "LoHa/LoKr modules" if any(k.split(".", 1)[-1].startswith(("hada_", "lokr_")) for k in tensors) \
            else "no lora_down/lora_up tensors"
        raise UserError(f"{source}: not a LoRA/LoCon file ({what}); these tools read kohya-layout LoRA/LoCon files")
    if other:
        raise UserError(f"{source}: {len(other)} module(s) are not LoRA/LoCon (e.g. {other[0]}); "
                        "LoHa/LoKr files cannot be resized or merged here")
    return out


def read_lora(path: Union[str, Path]) -> tuple[dict[str, Module], dict[str, str]]:
    """(modules, metadata) of a LoRA file; a missing file, a checkpoint or a LoHa is one :class:`UserError`."""
    from ..networks.file import load_lora
    path = Path(path)
    tensors, metadata = load_lora(path)
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.")) for k in tensors):
        raise UserError(f"{path.name}: this is a model checkpoint, not a LoRA file")
    return modules_from_tensors(tensors, path.name), metadata


def family_of(metadata: Mapping[str, str], names: Iterable[str]) -> str:
    """``sd1``/``sd2``/``sdxl`` from ``ss_base_model_version`` (else from the names: SDXL's are ldm-style)."""
    version = metadata.get("ss_base_model_version", "")
    if version in FAMILY_OF_VERSION:
        return FAMILY_OF_VERSION[version]
    if version.startswith("sdxl"):
        return "sdxl"
    names = list(names)
    if any(n.startswith(("lora_te1_", "lora_te2_")) or "input_blocks" in n or "output_blocks" in n for n in names):
        return "sdxl"
    return "sd2" if metadata.get("ss_v2") == "True" else "sd1"


# ------------------------------------------------------------------------------------------ SVD

def svd_dtype(precision: Optional[str]) -> torch.dtype:
    key = str(precision or "fp32").lower()
    if key not in SVD_DTYPES:
        raise UserError(f"--precision {precision!r}: the SVD runs in fp32 or fp64")
    return SVD_DTYPES[key]


def choose_rank(S: torch.Tensor, rank: Optional[int] = None, rule: Optional[str] = None,
                param: Optional[float] = None, max_rank: Optional[int] = None) -> int:
    """How many singular values to keep (see the module docstring for the rules)."""
    n = int(S.numel())
    if n == 0 or float(S[0]) <= MIN_SV:
        return 1
    if rule is None:
        k = int(rank)
    elif rule == "sv_ratio":
        k = int((S > S[0] / param).sum())
    elif rule == "sv_cumulative":
        k = 1 + int((torch.cumsum(S, 0) / S.sum() < param).sum())
    elif rule == "sv_fro":
        S2 = S.double() ** 2
        k = 1 + int((torch.cumsum(S2, 0) / S2.sum() < param ** 2).sum())
    else:
        raise UserError(f"--dynamic {rule!r}: use one of {', '.join(RULES)}")
    if max_rank is not None:
        k = min(k, int(max_rank))
    return max(1, min(k, n))


@dataclass
class Factored:
    """A module written back at rank ``rank``, with what it kept."""
    module: Module
    fro_kept: float        # ‖truncated‖_F / ‖ΔW‖_F
    error: float           # ‖ΔW − truncated‖_F = √Σ dropped σ² (Eckart–Young)
    max_ratio: float       # σ₁ / σ_k


def svd_of_product(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``left @ right`` (m×r times r×n) without forming it: QR of both factors, then the SVD of
    the small r×r core. Same singular values and vectors as the full SVD (whose other values are zero), at a
    fraction of the cost for a LoRA's low-rank ΔW."""
    ql, rl = torch.linalg.qr(left)
    qr, rr = torch.linalg.qr(right.T)
    uc, S, vhc = torch.linalg.svd(rl @ rr.T, full_matrices=False)
    return ql @ uc, S, vhc @ qr.T


def factorize(name: str, delta: Optional[torch.Tensor], rank: Optional[int] = None, *, scale: float = 1.0,
              rule: Optional[str] = None, param: Optional[float] = None, max_rank: Optional[int] = None,
              device=None, dtype: torch.dtype = torch.float32, clamp_quantile: Optional[float] = None,
              factors: Optional[tuple] = None, shape: Optional[tuple] = None) -> Factored:
    """ΔW (out×in or out×in×kh×kw) → the best low-rank LoRA module of it, written with ``scale`` = alpha/rank
    (resize keeps the file's scale; merge and extract use 1, alpha = rank, as kohya does).

    ``factors`` = (left, right) with ΔW = left @ right reshaped to ``shape`` replaces ``delta`` when ΔW is
    known to be low-rank (a LoRA, a concatenation of LoRAs): see :func:`svd_of_product`.
    ``clamp_quantile`` (kohya extract's option, off here unless asked): clamp up and down to ± the given
    quantile of their values, which trims outliers but makes the result no longer the optimal truncation.
    """
    if factors is not None:
        left, right = (f.to(device=device, dtype=dtype) for f in factors)
        U, S, Vh = svd_of_product(left, right)
    else:
        shape = tuple(delta.shape)
        matrix = delta.to(device=device, dtype=dtype).reshape(shape[0], -1)
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    shape = tuple(shape)
    k = choose_rank(S / scale, rank, rule, param, max_rank)   # kohya tests σ₁ of up·down, before the scale
    S2 = S.double() ** 2
    total = float(S2.sum())
    kept = float(S2[:k].sum())
    up = U[:, :k] * (S[:k] / scale)
    down = Vh[:k]
    if clamp_quantile is not None and clamp_quantile < 1.0:
        hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]).float(), clamp_quantile).to(up.dtype)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    if len(shape) == 4:
        up = up.reshape(shape[0], k, 1, 1)
        down = down.reshape(k, *shape[1:])
    module = Module(name, down.float().cpu().contiguous(), up.float().cpu().contiguous(), float(scale * k))
    return Factored(module, fro_kept=math.sqrt(kept / total) if total > 0 else 1.0,
                    error=math.sqrt(max(total - kept, 0.0)),
                    max_ratio=float(S[0] / S[k - 1]) if float(S[k - 1]) > 0 else math.inf)


def report_line(f: Factored, old_rank: Optional[int] = None) -> str:
    m = f.module
    before = f"{old_rank}→" if old_rank is not None else ""
    return f"{m.name:<72} rank {before}{m.rank:<4} fro kept {f.fro_kept:7.2%}  alpha {m.alpha:g}"


# ------------------------------------------------------------------------------------------ writing

def tensors_of(modules: Iterable[Module], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        out[f"{m.name}.lora_down.weight"] = m.down.to(dtype).contiguous()
        out[f"{m.name}.lora_up.weight"] = m.up.to(dtype).contiguous()
        out[f"{m.name}.alpha"] = torch.tensor(m.alpha, dtype=dtype)
    return out


def _uniform(values: list) -> Optional[str]:
    vals = sorted(set(values))
    if not vals:
        return None
    if len(vals) > 1:
        return "Dynamic"
    v = vals[0]
    return str(v) if isinstance(v, int) else repr(float(v))


def network_keys(modules: Iterable[Module], metadata: Mapping[str, str]) -> dict[str, str]:
    """``ss_network_dim``/``ss_network_alpha`` (``"Dynamic"`` when they vary, as kohya writes) from the
    non-3×3 modules; ``conv_dim``/``conv_alpha`` in ``ss_network_args`` from the 3×3 ones."""
    modules = list(modules)
    plain = [m for m in modules if not m.is_conv3x3] or modules
    conv = [m for m in modules if m.is_conv3x3]
    out = {"ss_network_dim": _uniform([m.rank for m in plain]),
           "ss_network_alpha": _uniform([float(m.alpha) for m in plain]),
           "ss_network_module": "networks.lora"}
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
        args = args if isinstance(args, dict) else {}
    except ValueError:
        args = {}
    args = {k: v for k, v in args.items() if k not in ("conv_dim", "conv_alpha", "algo")}
    if conv:
        args["conv_dim"] = _uniform([m.rank for m in conv])
        args["conv_alpha"] = _uniform([float(m.alpha) for m in conv])
    out["ss_network_args"] = json.dumps(args) if args else None
    return out


def tool_metadata(base: Mapping[str, str], modules: Iterable[Module], tool: Mapping, title: str) -> dict[str, str]:
    """Metadata of a tool's output: the source's keys (training facts kept), hashes dropped (recomputed on
    save), the network keys of what is written, ``shinkansen_tool`` saying how it was made."""
    md = {k: v for k, v in base.items() if not k.startswith("sshs_")}
    for k, v in network_keys(modules, base).items():
        if v is None:
            md.pop(k, None)
        else:
            md[k] = v
    md["shinkansen_tool"] = json.dumps(dict(tool))
    md["modelspec.title"] = title
    comment = md.get("ss_training_comment", "")
    note = tool.get("summary", tool.get("tool", ""))
    md["ss_training_comment"] = f"{note}; {comment}" if comment and comment != "None" else note
    return md


def save_lora_file(path: Union[str, Path], modules: Iterable[Module], metadata: Mapping[str, str],
                   dtype: torch.dtype) -> Path:
    """Write modules as a kohya-layout LoRA with kohya's hashes, atomically."""
    from ..networks.file import kohya_hashes, write_safetensors
    tensors = tensors_of(modules, dtype)
    md = dict(metadata)
    md["sshs_model_hash"], md["sshs_legacy_hash"] = kohya_hashes(tensors, md)
    return write_safetensors(tensors, path, md)


def output_path(path: Union[str, Path], overwrite: bool, inputs: Iterable[Union[str, Path]] = ()) -> Path:
    """Checked ``-o``: ``.safetensors``, folder exists, not one of the inputs, no silent overwrite."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path}: the output must be a .safetensors file")
    if not path.parent.is_dir():
        raise UserError(f"{path.parent}: output folder does not exist")
    for p in inputs:
        if Path(p).exists() and path.exists() and path.resolve() == Path(p).resolve():
            raise UserError(f"{path}: the output would overwrite an input file; choose another name")
    if path.exists() and not overwrite:
        raise UserError(f"{path}: exists (use --overwrite to replace it)")
    return path


def dtype_of(name: Optional[str], default: torch.dtype) -> torch.dtype:
    """``--save-precision`` (fp16/bf16/fp32); None = ``default`` (the input's own)."""
    if name in (None, "", "same"):
        return default
    from ..networks.file import save_dtype
    return save_dtype(name)


def main_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    from collections import Counter
    counts = Counter(t.dtype for t in tensors if t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float16
