"""``python -m trainer resize IN.safetensors -o OUT --rank R`` (or ``--dynamic RULE --param X``): a LoRA
re-factored to a lower rank by SVD of each module's ΔW, as kohya's ``networks/resize_lora.py`` does.

Why re-factor ΔW rather than cut the factors: a trained up·down is not ordered by importance, so dropping
rows of down loses an arbitrary part; the SVD of ΔW keeps the best rank-k approximation (Eckart–Young).
The rank rules are restated in ``lora_delta``. Each module keeps its scale (alpha/rank), so a resized file
used at weight 1 means what the original did at weight 1. Linear, 1×1 and 3×3 conv modules (LoCon) are all
resized; 3×3 ones may take their own ``--conv-rank``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import UserError
from . import lora_delta as D


@dataclass
class Result:
    path: Path
    lines: list = field(default_factory=list)
    ranks: dict = field(default_factory=dict)        # module → (old rank, new rank)
    fro_kept: dict = field(default_factory=dict)     # module → fraction of ‖ΔW‖_F kept

    @property
    def report(self) -> str:
        return "\n".join(self.lines)


def check_args(rank: Optional[int], dynamic: Optional[str], param: Optional[float], max_rank: Optional[int],
               conv_rank: Optional[int]) -> None:
    if dynamic is None and rank is None:
        raise UserError("resize: give --rank R, or --dynamic RULE --param X")
    for label, value in (("--rank", rank), ("--max-rank", max_rank), ("--conv-rank", conv_rank)):
        if value is not None and int(value) <= 0:
            raise UserError(f"resize: {label} must be at least 1 (got {value})")
    if dynamic is not None:
        if dynamic not in D.RULES:
            raise UserError(f"resize: --dynamic {dynamic!r}: use one of {', '.join(D.RULES)}")
        if param is None:
            raise UserError(f"resize: --dynamic {dynamic} needs --param X")
        if dynamic == "sv_ratio" and not param >= 1:
            raise UserError(f"resize: sv_ratio --param is the largest allowed σ₁/σ_k, at least 1 (got {param})")
        if dynamic in ("sv_fro", "sv_cumulative") and not 0 < param <= 1:
            raise UserError(f"resize: {dynamic} --param is a fraction in (0, 1] (got {param})")


def resize(src, output, rank: Optional[int] = None, *, dynamic: Optional[str] = None,
           param: Optional[float] = None, max_rank: Optional[int] = None, conv_rank: Optional[int] = None,
           device=None, precision: str = "fp32", save_precision: Optional[str] = None, overwrite: bool = False,
           log: Callable[[str], None] = lambda m: None) -> Result:
    """Resize ``src`` into ``output``; returns the per-module report (also passed line by line to ``log``)."""
    from ..models.loader import resolve_device
    check_args(rank, dynamic, param, max_rank, conv_rank)
    src = Path(src)
    output = D.output_path(output, overwrite, [src])
    dev = resolve_device(device or "cpu")
    dtype = D.svd_dtype(precision)
    modules, metadata = D.read_lora(src)
    out_dtype = D.dtype_of(save_precision, D.main_dtype([m.up for m in modules.values()]))
    result = Result(output)
    new = []
    for name, m in modules.items():
        scale = m.scale if m.scale > 0 else 1.0
        if dynamic is None:
            want = conv_rank if (m.is_conv3x3 and conv_rank) else rank
            f = D.factorize(name, None, min(int(want), m.rank), scale=scale, device=dev, dtype=dtype,
                            factors=m.factors(dtype, dev), shape=m.shape)
        else:
            cap = max_rank if max_rank is not None else m.rank
            f = D.factorize(name, None, scale=scale, rule=dynamic, param=param, max_rank=min(cap, m.rank),
                            device=dev, dtype=dtype, factors=m.factors(dtype, dev), shape=m.shape)
        new.append(f.module)
        result.ranks[name] = (m.rank, f.module.rank)
        result.fro_kept[name] = f.fro_kept
        line = D.report_line(f, m.rank)
        result.lines.append(line)
        log(line)
    kept = list(result.fro_kept.values())
    old = sorted({r for r, _ in result.ranks.values()})
    how = f"rank {rank}" + (f" (conv {conv_rank})" if conv_rank else "") if dynamic is None \
        else f"{dynamic} {param:g}" + (f" max rank {max_rank}" if max_rank else "")
    summary = f"resized from rank {'/'.join(map(str, old))} by {how}"
    tool = {"tool": "resize", "summary": summary, "source": src.name,
            "source_hash": metadata.get("sshs_model_hash") or _file_hash(src),
            "rank": rank, "conv_rank": conv_rank, "dynamic": dynamic, "param": param, "max_rank": max_rank,
            "svd_precision": str(dtype).replace("torch.", ""),
            "mean_fro_kept": sum(kept) / len(kept)}
    md = D.tool_metadata(metadata, new, tool, output.stem)
    md["ss_resize"] = json.dumps({k: v for k, v in tool.items() if k not in ("tool", "summary")})
    D.save_lora_file(output, new, md, out_dtype)
    tail = (f"{len(new)} modules, mean fro kept {sum(kept) / len(kept):.2%}, min {min(kept):.2%}; "
            f"ss_network_dim {md['ss_network_dim']}")
    result.lines.append(tail)
    log(tail)
    return result


def _file_hash(path: Path) -> str:
    from ..networks.file import file_model_hash
    return file_model_hash(path)


def add_args(p) -> None:
    p.add_argument("lora", help="LoRA/LoCon .safetensors file to resize")
    p.add_argument("-o", "--output", required=True, help=".safetensors file to write")
    p.add_argument("--rank", type=int, help="new rank (with --dynamic: same as --max-rank)")
    p.add_argument("--conv-rank", type=int, help="new rank of 3×3 conv modules (default: --rank)")
    p.add_argument("--dynamic", choices=D.RULES, help="choose each module's rank by a rule on its singular values")
    p.add_argument("--param", type=float, help="the rule's target: sv_ratio σ₁/σ_k ≥ 1; sv_fro, sv_cumulative a fraction")
    p.add_argument("--max-rank", type=int, help="with --dynamic: no module above this rank")
    p.add_argument("--device", default="cpu", help="device for the SVD (cpu, cuda …)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp64"], help="SVD precision")
    p.add_argument("--save-precision", choices=["fp16", "bf16", "fp32"], help="default: the input's")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def main(argv: list) -> int:
    import argparse
    import sys
    p = argparse.ArgumentParser(prog="python -m trainer resize", description=__doc__.split("\n\n")[0])
    add_args(p)
    a = p.parse_args(argv)
    max_rank = a.max_rank if a.max_rank is not None else (a.rank if a.dynamic else None)
    r = resize(a.lora, a.output, None if a.dynamic else a.rank, dynamic=a.dynamic, param=a.param, max_rank=max_rank,
               conv_rank=a.conv_rank, device=a.device, precision=a.precision, save_precision=a.save_precision,
               overwrite=a.overwrite, log=print)
    print(f"saved: {r.path}", file=sys.stdout)
    return 0
