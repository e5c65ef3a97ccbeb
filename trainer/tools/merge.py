"""``python -m trainer merge``: LoRAs baked into a checkpoint, or several LoRAs made into one.

Into a checkpoint (``--model CKPT --lora A.safetensors:0.8 --lora B:0.5 -o OUT.safetensors``): each module's
ΔW times its weight is added to the checkpoint weight it patches (for OpenCLIP text encoders, its rows of
the fused q/k/v weight), in fp32, then stored back in that tensor's own dtype. Every other tensor, every key
and the header metadata stay as they were, so the WebUI and our loader read the result as the same model.

Into one LoRA (no ``--model``): by default the factors are concatenated (down stacked, up side by side with
weight·alpha/rank folded in, alpha = the new rank), which is exact: its ΔW is the weighted sum of the inputs'.
``--rank R`` instead re-factors each module's summed ΔW by SVD to rank R (kohya ``svd_merge_lora.py``).

Per-block weights (``PATH:WEIGHT:BLOCKWEIGHTS``, the LoRA Block Weight / kohya ``--lbws`` lists): 26 values
BASE, IN00–IN11, MID, OUT00–OUT11 or the usual 17 (BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID,
OUT03–OUT11) for SD1/SD2; 20 (BASE, IN00–IN08, MID, OUT00–OUT08) or 12 (BASE, IN04, IN05, IN07, IN08, MID,
OUT00–OUT05) for SDXL. A block the list does not name keeps weight 1, as in kohya's tool.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..errors import UserError
from . import lora_delta as D

_SD26 = ["BASE", *[f"IN{i:02d}" for i in range(12)], "M00", *[f"OUT{i:02d}" for i in range(12)]]
_SD17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *[f"OUT{i:02d}" for i in range(3, 12)]]
_XL20 = ["BASE", *[f"IN{i:02d}" for i in range(9)], "M00", *[f"OUT{i:02d}" for i in range(9)]]
_XL12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", *[f"OUT{i:02d}" for i in range(6)]]
BLOCK_LISTS = {"sd1": {26: _SD26, 17: _SD17}, "sd2": {26: _SD26, 17: _SD17}, "sdxl": {20: _XL20, 12: _XL12}}


@dataclass
class Source:
    path: Path
    weight: float = 1.0
    block_weights: Optional[list] = None      # the raw list as given

    def label(self) -> str:
        bw = f":{','.join(f'{x:g}' for x in self.block_weights)}" if self.block_weights else ""
        return f"{self.path.name}:{self.weight:g}{bw}"


@dataclass
class Result:
    path: Path
    lines: list = field(default_factory=list)

    @property
    def report(self) -> str:
        return "\n".join(self.lines)


def parse_source(text: str) -> Source:
    """``PATH[:WEIGHT[:W1,W2,…]]`` (a Windows drive letter is not a weight)."""
    from ..generate import parse_lora_arg
    text = str(text).strip()
    head, sep, tail = text.rpartition(":")
    blocks = None
    if sep and "," in tail:
        try:
            blocks = [float(x) for x in tail.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--lora {text}: block weights must be numbers separated by commas") from None
        text = head
    path, weight = parse_lora_arg(text)
    return Source(Path(path), weight, blocks)


def block_weight_map(family: str, values: Optional[Sequence[float]]) -> dict:
    if not values:
        return {}
    lists = BLOCK_LISTS[family]
    if len(values) not in lists:
        sizes = " or ".join(str(n) for n in lists)
        raise UserError(f"block weights: {len(values)} values given; a {family.upper()} LoRA takes {sizes}")
    return dict(zip(lists[len(values)], (float(v) for v in values)))


def _read_sources(sources: Sequence[Source]):
    if not sources:
        raise UserError("merge: give at least one --lora FILE[:WEIGHT]")
    read = []
    for s in sources:
        modules, md = D.read_lora(s.path)
        read.append((s, modules, md, D.family_of(md, modules)))
    families = {f for *_, f in read}
    if len(families) > 1:
        raise UserError("merge: the LoRAs are for different model families ("
                        + ", ".join(f"{s.path.name}: {f}" for s, _, _, f in read) + ")")
    return read


def _scaled_modules(read, layout, log) -> list:
    """Per source: [(module, weight × block weight)], checking names against the layout when block weights
    need blocks."""
    out = []
    for s, modules, md, family in read:
        bw = block_weight_map(family, s.block_weights)
        if bw:
            unknown = [n for n in modules if layout.block(n) is None]
            if unknown:
                raise UserError(f"{s.path.name}: {len(unknown)} module(s) match no block of a {family} model "
                                f"(e.g. {unknown[0]}), so block weights cannot apply")
        out.append([(m, s.weight * bw.get(layout.block(n), 1.0) if bw else s.weight) for n, m in modules.items()])
    return out


# ------------------------------------------------------------------------------------------ into a checkpoint

def merge_into_checkpoint(model, sources: Sequence[Source], output, *, overwrite: bool = False,
                          log: Callable[[str], None] = lambda m: None) -> Result:
    """Bake the LoRAs into ``model``; the output has the input's keys, dtypes and metadata."""
    from ..models.checkpoint_io import load_state_dict, read_header, save_safetensors_atomic
    from .layout import checkpoint_layout
    model = Path(model)
    output = D.output_path(output, overwrite, [model, *[s.path for s in sources]])
    layout = checkpoint_layout(model)
    read = _read_sources(sources)
    for s, modules, md, family in read:
        if family != layout.family:
            raise UserError(f"{s.path.name} is a {family} LoRA but {model.name} is an {layout.family} checkpoint")
        unknown = [n for n in modules if n not in layout.table]
        if unknown:
            raise UserError(f"{s.path.name}: {len(unknown)} module(s) match no layer of {model.name} "
                            f"(e.g. {unknown[0]}); was it trained on another model?")
    state = load_state_dict(model)
    header_md = read_header(model)[1] if model.suffix.lower() == ".safetensors" else {}
    changed: dict[str, torch.Tensor] = {}
    result = Result(output)
    for (s, modules, md, family), scaled in zip(read, _scaled_modules(read, layout, log)):
        blocks: dict = {}
        for m, w in scaled:
            target = layout.table[m.name]
            key, rows = target.checkpoint_weight()
            if key not in state:
                raise UserError(f"{model.name}: has no weight {key} for {m.name}")
            acc = changed.get(key)
            if acc is None:
                acc = changed[key] = state[key].float().clone()
            part = acc[rows[0]:rows[1]] if rows else acc
            delta = m.delta(torch.float32)
            if delta.numel() != part.numel():
                raise UserError(f"{s.path.name}: {m.name} has shape {tuple(delta.shape)}, the checkpoint weight "
                                f"{key} {tuple(part.shape)}")
            part += delta.reshape(part.shape) * w
            blocks[target.block] = blocks.get(target.block, 0) + 1
        line = (f"{s.label()}: {len(modules)} modules into {model.name} (per block: "
                + ", ".join(f"{b} {n}" for b, n in blocks.items()) + ")")
        result.lines.append(line)
        log(line)
    new_state = {k: (changed[k].to(v.dtype) if k in changed else v) for k, v in state.items()}
    md = dict(header_md)
    md["shinkansen_merge"] = json.dumps({"tool": "merge", "model": model.name,
                                         "loras": [s.label() for s in sources]})
    save_safetensors_atomic(new_state, output, md)
    if copy_model_config(model, output):
        result.lines.append(f"config: {output.with_suffix('.yaml').name} written beside it")
    tail = f"{len(changed)} of {len(state)} tensors changed; keys and dtypes as in {model.name}"
    result.lines.append(tail)
    log(tail)
    return result


def copy_model_config(model: Path, output: Path) -> bool:
    """Put the checkpoint's ``NAME.yaml`` (prediction type, head split, scale factor, text-encoder folder) beside
    the output, so the merged model loads the same way; a relative text-encoder folder is made absolute."""
    import re
    from ..networks.file import write_file_atomic
    src = Path(model).with_suffix(".yaml")
    if not src.is_file():
        return False
    text = src.read_text(encoding="utf-8")

    def absolute(m):
        folder = src.parent / m.group(2)
        return f"{m.group(1)}{folder.resolve()}" if not Path(m.group(2)).is_absolute() and folder.is_dir() \
            else m.group(0)
    text = re.sub(r"(?m)^(\s*version:\s*)([^\s#]+)\s*$", absolute, text)
    write_file_atomic(Path(output).with_suffix(".yaml"), text.encode("utf-8"))
    return True


# ------------------------------------------------------------------------------------------ into one LoRA

def merge_loras(sources: Sequence[Source], output, *, rank: Optional[int] = None, conv_rank: Optional[int] = None,
                device=None, precision: str = "fp32", save_precision: Optional[str] = None,
                overwrite: bool = False, log: Callable[[str], None] = lambda m: None) -> Result:
    """Several LoRAs → one: concatenated ranks (exact), or ``rank`` by SVD of the summed ΔW."""
    from ..models.loader import resolve_device
    for label, value in (("--rank", rank), ("--conv-rank", conv_rank)):
        if value is not None and int(value) <= 0:
            raise UserError(f"merge: {label} must be at least 1 (got {value})")
    output = D.output_path(output, overwrite, [s.path for s in sources])
    read = _read_sources(sources)
    family = read[0][3]
    need_blocks = any(s.block_weights for s in sources)
    from .layout import family_layout
    layout = family_layout(family) if need_blocks else None
    scaled = _scaled_modules(read, layout, log) if need_blocks else \
        [[(m, s.weight) for m in modules.values()] for s, modules, _, _ in read]
    per_name: dict[str, list] = {}
    for pairs in scaled:
        for m, w in pairs:
            per_name.setdefault(m.name, []).append((m, w))
    dev = resolve_device(device or "cpu")
    dtype = D.svd_dtype(precision)
    new: list = []
    result = Result(output)
    for name, parts in per_name.items():
        if rank is None:
            kernel = {tuple(m.down.shape[1:]) for m, _ in parts}
            if len(kernel) > 1:
                raise UserError(f"merge: {name} has differently shaped factors in the inputs; give --rank to merge "
                                "by SVD")
            down = torch.cat([m.down.float() for m, _ in parts], 0)
            up = torch.cat([m.up.float() * (w * m.scale) for m, w in parts], 1)
            new.append(D.Module(name, down, up, float(down.shape[0])))
            line = f"{name:<72} rank {'+'.join(str(m.rank) for m, _ in parts)} = {down.shape[0]}"
        else:
            pairs = [m.factors(dtype, dev) for m, _ in parts]
            left = torch.cat([l * w for (l, _), (_, w) in zip(pairs, parts)], 1)
            right = torch.cat([r for _, r in pairs], 0)       # Σ wᵢ ΔWᵢ = left @ right
            want = conv_rank if (parts[0][0].is_conv3x3 and conv_rank) else rank
            f = D.factorize(name, None, int(want), device=dev, dtype=dtype, factors=(left, right),
                            shape=parts[0][0].shape)
            new.append(f.module)
            line = D.report_line(f)
        result.lines.append(line)
        log(line)
    base = read[0][2]
    keep = ("ss_base_model_version", "ss_v2", "ss_sd_model_name", "modelspec.sai_model_spec",
            "modelspec.architecture", "modelspec.implementation", "modelspec.prediction_type",
            "modelspec.resolution")
    md = {k: base[k] for k in keep if k in base}
    md["modelspec.merged_from"] = ", ".join(s.path.stem for s in sources)
    how = "concatenated ranks" if rank is None else f"SVD to rank {rank}" + (f" (conv {conv_rank})" if conv_rank else "")
    tool = {"tool": "merge", "summary": f"merged {' + '.join(s.label() for s in sources)} ({how})",
            "loras": [s.label() for s in sources],
            "hashes": [m.get("sshs_model_hash") for _, _, m, _ in read], "rank": rank, "conv_rank": conv_rank}
    md = D.tool_metadata(md, new, tool, output.stem)
    out_dtype = D.dtype_of(save_precision, D.main_dtype([m.up for _, mods, _, _ in read for m in mods.values()]))
    D.save_lora_file(output, new, md, out_dtype)
    tail = f"{len(new)} modules from {len(sources)} LoRAs ({how}); ss_network_dim {md['ss_network_dim']}"
    result.lines.append(tail)
    log(tail)
    return result


def add_args(p) -> None:
    p.add_argument("--lora", action="append", default=[], required=True, metavar="PATH[:WEIGHT[:BLOCKWEIGHTS]]",
                   help="a LoRA at a weight (default 1), optionally with per-block weights; repeatable")
    p.add_argument("--model", help="checkpoint to merge into (omit to merge the LoRAs into one LoRA)")
    p.add_argument("-o", "--output", required=True, help=".safetensors file to write")
    p.add_argument("--rank", type=int, help="LoRA merge: SVD to this rank instead of concatenating ranks")
    p.add_argument("--conv-rank", type=int, help="LoRA merge with --rank: rank of 3×3 conv modules")
    p.add_argument("--device", default="cpu", help="device for the SVD")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp64"], help="SVD precision")
    p.add_argument("--save-precision", choices=["fp16", "bf16", "fp32"], help="LoRA merge; default: the inputs'")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def main(argv: list) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m trainer merge", description=__doc__.split("\n\n")[0])
    add_args(p)
    a = p.parse_args(argv)
    sources = [parse_source(x) for x in a.lora]
    if a.model:
        if a.rank or a.conv_rank:
            raise UserError("merge: --rank applies to merging LoRAs into one LoRA, not into a checkpoint")
        r = merge_into_checkpoint(a.model, sources, a.output, overwrite=a.overwrite, log=print)
    else:
        r = merge_loras(sources, a.output, rank=a.rank, conv_rank=a.conv_rank, device=a.device,
                        precision=a.precision, save_precision=a.save_precision, overwrite=a.overwrite, log=print)
    print(f"saved: {r.path}")
    return 0
