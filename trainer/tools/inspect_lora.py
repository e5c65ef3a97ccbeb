"""``python -m trainer inspect LORA``: what a LoRA file holds, as JSON.

Keys, modules per block (resolved against the family's layout built on the meta device, so
no model file is needed), rank/alpha, per-module norms of the weight change, and metadata.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional

import torch

from ..errors import UserError

FAMILY_OF_VERSION = {"sd_v1": "sd15", "sd_v1_v": "sd15", "sd_v2": "sd21", "sd_v2_v": "sd21v",
                     "sdxl_base_v1-0": "sdxl"}


def _guess_family(names, metadata: dict) -> str:
    version = metadata.get("ss_base_model_version", "")
    if version in FAMILY_OF_VERSION:
        return FAMILY_OF_VERSION[version]
    if any(n.startswith(("lora_te1_", "lora_te2_")) or "input_blocks" in n for n in names):
        return "sdxl"
    return "sd15"


def _layout(family: str):
    from ..models.configs import builtin_config
    from ..models.text_encoders import build_text_encoder
    from ..models.unet import UNetModel
    from ..networks.targets import name_table
    cfg = builtin_config(family)
    with torch.device("meta"):
        unet = UNetModel(cfg.unet)
    tes = [build_text_encoder(t.role, t.config, device="meta") for t in cfg.text_encoders]
    return name_table(unet, tes, cfg.family)


def module_rank(parts: dict) -> int | str | None:
    """The module's rank from its factors' shapes: LoRA/LoCon ``lora_down`` rows, LoHa ``hada_w1_b`` rows,
    LoKr the inner size of its low-rank Kronecker factor (``lokr_w2_b``, else ``lokr_w1_b``). A LoKr whose
    two factors are both full matrices (LyCORIS' "full matrix mode" for layers too small for the rank) has
    none: ``"full"``."""
    for key in ("lora_down.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if key in parts:
            return int(parts[key].shape[0])
    return "full" if "lokr_w1" in parts or "lokr_w2" in parts else None


def _rank_counts(ranks) -> dict:
    """{rank: modules}, numeric ranks ascending, then "full"."""
    counts = Counter(r for r in ranks if r is not None)
    numeric = sorted(r for r in counts if isinstance(r, int))
    return {r: counts[r] for r in numeric + [r for r in counts if not isinstance(r, int)]}


def delta_norm(tensors: dict) -> Optional[float]:
    """Frobenius norm of up @ down × alpha/rank for LoRA/LoCon modules (None for other algorithms)."""
    up, down = tensors.get("lora_up.weight"), tensors.get("lora_down.weight")
    if up is None or down is None:
        return None
    rank = down.shape[0]
    alpha = float(tensors["alpha"]) if "alpha" in tensors else float(rank)
    delta = up.float().flatten(1) @ down.float().flatten(1)
    return float(delta.norm() * alpha / rank)


def per_block_values(details: dict) -> dict:
    """``ranks_per_block`` and ``alphas_per_block``: each block's value, or its distinct values in a list
    when its modules differ (e.g. 3x3 convs at network_conv_rank beside block_dims' rank)."""
    out: dict = {"ranks_per_block": {}, "alphas_per_block": {}}
    for key, field in (("ranks_per_block", "rank"), ("alphas_per_block", "alpha")):
        seen: dict = {}
        for d in details.values():
            if d["block"] is not None and d[field] is not None:
                seen.setdefault(d["block"], set()).add(d[field])
        out[key] = {b: (next(iter(v)) if len(v) == 1 else sorted(v, key=str)) for b, v in sorted(seen.items())}
    return out


def inspect(path: Path) -> dict:
    from ..networks import load_lora
    from ..networks.network import split_modules
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    tensors, metadata = load_lora(path)
    modules = split_modules(tensors)
    family = _guess_family(modules, metadata)
    table = _layout(family)
    per_block: Counter = Counter()
    unknown = []
    details = {}
    for name, parts in modules.items():
        target = table.get(name)
        if target is None:
            unknown.append(name)
        else:
            per_block[target.block] += 1
        details[name] = {"block": target.block if target else None, "rank": module_rank(parts),
                         "alpha": float(parts["alpha"]) if "alpha" in parts else None,
                         "delta_norm": delta_norm(parts)}
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in tensors.values())
    return {
        "file": str(path), "bytes": path.stat().st_size, "family_layout": family,
        "tensors": len(tensors), "dtypes": dict(dtypes), "modules": len(modules),
        "modules_per_block": dict(sorted(per_block.items())), "unmatched_modules": unknown,
        **per_block_values(details),
        "ranks": _rank_counts(d["rank"] for d in details.values()),
        "keys": sorted(tensors), "module_details": details, "metadata": metadata,
    }


def main(argv: list) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m trainer inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("lora")
    p.add_argument("--brief", action="store_true", help="leave out keys and per-module details")
    args = p.parse_args(argv)
    report = inspect(Path(args.lora))
    if args.brief:
        report = {k: v for k, v in report.items() if k not in ("keys", "module_details")}
    print(json.dumps(report, indent=2, default=str))
    return 0
