"""``python -m trainer extract --base A.safetensors --tuned B.safetensors --rank R -o OUT``: a LoRA that
approximates the difference of two checkpoints, by SVD of each layer's weight difference.

kohya ``networks/extract_lora_from_models.py`` semantics, restated:

- modules: the layers a kohya LoRA trains, i.e. the transformer blocks' Linear/1×1 layers; with
  ``--conv-rank`` also the ResNet blocks' and down/upsamplers' layers (a LoCon: 3×3 convs at the conv rank,
  the rest at ``--rank``); the text encoders' attention/MLP layers only when the text encoder differs, i.e.
  some weight changed by more than ``--min-diff`` (0.01) in absolute value;
- each layer's rank is min(R, out, in·kh·kw); up = U·diag(S), down = Vᵀ, alpha = rank (scale 1);
- kohya then clamps up and down to ± their 0.99 quantile by default. That trims outliers but the result is
  no longer the best rank-R approximation, so here it is off unless ``--clamp-quantile Q`` asks for it.

Both checkpoints must be the same model family and architecture (every weight the same shape).
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
    text_encoder: bool = False

    @property
    def report(self) -> str:
        return "\n".join(self.lines)


def extract(base, tuned, output, rank: int, *, conv_rank: Optional[int] = None, min_diff: float = 0.01,
            clamp_quantile: Optional[float] = None, device=None, precision: str = "fp32",
            save_precision: str = "fp16", overwrite: bool = False,
            log: Callable[[str], None] = lambda m: None) -> Result:
    from ..models.checkpoint_io import load_state_dict, shapes_of
    from ..models.loader import resolve_device
    from ..networks.file import architecture, base_model_version
    from ..networks.targets import te_targets, unet_targets
    from .layout import checkpoint_layout
    for label, value in (("--rank", rank), ("--conv-rank", conv_rank)):
        if value is not None and int(value) <= 0:
            raise UserError(f"extract: {label} must be at least 1 (got {value})")
    if clamp_quantile is not None and not 0 < clamp_quantile <= 1:
        raise UserError(f"extract: --clamp-quantile must be in (0, 1] (got {clamp_quantile})")
    base, tuned = Path(base), Path(tuned)
    output = D.output_path(output, overwrite, [base, tuned])
    layout_b, layout_t = checkpoint_layout(base), checkpoint_layout(tuned)
    if layout_b.family != layout_t.family:
        raise UserError(f"extract: {base.name} is {layout_b.family}, {tuned.name} is {layout_t.family}")
    shapes_b, shapes_t = shapes_of(base), shapes_of(tuned)
    dev = resolve_device(device or "cpu")
    dtype = D.svd_dtype(precision)
    out_dtype = D.dtype_of(save_precision, torch.float16)
    family = layout_b.family
    groups = ("transformer", "conv") if conv_rank else ("transformer",)
    targets = te_targets(layout_b.text_encoders) + unet_targets(layout_b.unet, family, groups)
    keys = {t.checkpoint_weight()[0] for t in targets}
    for k in keys:
        if k not in shapes_b or k not in shapes_t or tuple(shapes_b[k].shape) != tuple(shapes_t[k].shape):
            raise UserError(f"extract: {base.name} and {tuned.name} differ in architecture (weight {k})")
    sb, st = load_state_dict(base), load_state_dict(tuned)

    def diff(t):
        key, rows = t.checkpoint_weight()
        d = st[key].to(dtype) - sb[key].to(dtype)
        return d[rows[0]:rows[1]] if rows else d

    te = [t for t in targets if t.part == "te"]
    te_max = max((float(diff(t).abs().max()) for t in te), default=0.0)
    result = Result(output, text_encoder=te_max > min_diff)
    head = (f"text encoder differs (max |ΔW| {te_max:.3g} > {min_diff:g}): extracted" if result.text_encoder
            else f"text encoder unchanged (max |ΔW| {te_max:.3g} ≤ {min_diff:g}): UNet only")
    result.lines.append(head)
    log(head)
    new = []
    for t in targets:
        if t.part == "te" and not result.text_encoder:
            continue
        d = diff(t)
        shape = tuple(t.module.weight.shape)
        d = d.reshape(shape)
        want = conv_rank if (t.kind == "conv" and conv_rank) else rank
        f = D.factorize(t.name, d, int(want), device=dev, dtype=dtype, clamp_quantile=clamp_quantile)
        new.append(f.module)
        line = D.report_line(f)
        result.lines.append(line)
        log(line)
    pred = layout_b.prediction_type
    md = {"ss_base_model_version": base_model_version(family, pred), "ss_v2": str(family == "sd2"),
          "ss_network_module": "networks.lora", "ss_sd_model_name": base.name,
          "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": architecture(family, pred),
          "modelspec.prediction_type": "v" if pred in ("v", "v_prediction") else "epsilon"}
    how = f"rank {rank}" + (f", conv rank {conv_rank}" if conv_rank else "")
    tool = {"tool": "extract", "summary": f"extracted from {tuned.name} − {base.name} at {how}",
            "base": base.name, "tuned": tuned.name, "rank": rank, "conv_rank": conv_rank, "min_diff": min_diff,
            "clamp_quantile": clamp_quantile, "text_encoder": result.text_encoder}
    md = D.tool_metadata(md, new, tool, output.stem)
    D.save_lora_file(output, new, md, out_dtype)
    tail = f"{len(new)} modules ({how}); saved in {str(out_dtype).replace('torch.', '')}"
    result.lines.append(tail)
    log(tail)
    return result


def add_args(p) -> None:
    p.add_argument("--base", required=True, help="the original checkpoint")
    p.add_argument("--tuned", required=True, help="the fine-tuned (or merged) checkpoint")
    p.add_argument("--rank", type=int, required=True, help="rank of the extracted LoRA")
    p.add_argument("--conv-rank", type=int, help="also extract ResNet/conv layers (LoCon) at this rank for 3×3")
    p.add_argument("--min-diff", type=float, default=0.01,
                   help="the text encoder is extracted only if some weight changed by more than this")
    p.add_argument("--clamp-quantile", type=float, help="kohya's outlier clamp (e.g. 0.99); off by default")
    p.add_argument("-o", "--output", required=True, help=".safetensors file to write")
    p.add_argument("--device", default="cpu", help="device for the SVD")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp64"], help="SVD precision")
    p.add_argument("--save-precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def main(argv: list) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m trainer extract", description=__doc__.split("\n\n")[0])
    add_args(p)
    a = p.parse_args(argv)
    r = extract(a.base, a.tuned, a.output, a.rank, conv_rank=a.conv_rank, min_diff=a.min_diff,
                clamp_quantile=a.clamp_quantile, device=a.device, precision=a.precision,
                save_precision=a.save_precision, overwrite=a.overwrite, log=print)
    print(f"saved: {r.path}")
    return 0
