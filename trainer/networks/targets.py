"""Which layers a network trains, which block each belongs to, and its kohya name.

Target sets reproduce kohya-ss ``networks/lora.py`` exactly (checked against its real output in
``shared/reference/lora_keys``):

- ``transformer`` group (every network type): each ``nn.Linear``/``nn.Conv2d`` inside a
  ``SpatialTransformer`` (kohya's ``Transformer2DModel``): ``proj_in``, ``attn1.to_q/k/v/to_out.0``,
  ``attn2.*``, ``ff.net.0.proj``, ``ff.net.2``, ``proj_out``.
- ``conv`` group (c3lier, loha, lokr): each ``nn.Linear``/``nn.Conv2d`` inside a ``ResBlock``
  (``in_layers.2``, ``out_layers.3``, ``emb_layers.1``, 1×1 ``skip_connection``), ``Downsample.op`` and
  ``Upsample.conv``. ``conv_in``/``out``/``time_embed``/``label_emb`` are never targets.
- text encoders: the ``nn.Linear`` layers of each encoder layer's ``self_attn`` and ``mlp``
  (``text_projection`` is not a target). SD2: kohya builds its OpenCLIP-H with 23 layers because the
  24th never reaches the UNet (SD2 conditions on the penultimate layer), so the last layer is skipped.

Only 3×3 (k > 1) convolutions take the conv rank/alpha; Linear layers and 1×1 convs take the network
rank/alpha (kohya's rule).

Blocks: ``BASE`` = the text encoders; ``INnn``/``M00``/``OUTnn`` = ``input_blocks.nn``/``middle_block``/
``output_blocks.nn`` (SD1/SD2: IN00–IN11, M00, OUT00–OUT11; SDXL: IN00–IN08, M00, OUT00–OUT08).

Elements (``network_element``) filter **UNet** modules only: ``SelfAttention`` keeps ``attn1`` layers,
``CrossAttention`` keeps ``attn2`` layers, ``Full`` keeps all. Text-encoder layers have no attn1/attn2
(CLIP is self-attention only), so TrainTrain's substring filter silently dropped them; here, when BASE is
selected every text-encoder target is trained whatever the element.

Kohya names: SD1/SD2 UNet ``lora_unet_`` + the diffusers path (kohya's SD1/SD2 model is diffusers-
shaped), derived from our ldm path by block structure; SDXL UNet ``lora_unet_`` + the ldm path; text
encoders ``lora_te_`` (SD1/SD2) or ``lora_te1_``/``lora_te2_`` (SDXL) + the transformers path; ``.`` → ``_``.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence

from torch import nn

from ..errors import UserError
from ..models.text_encoders import ROLES, _hf_key_to_openclip
from ..models.unet import Downsample, ResBlock, SpatialTransformer, Upsample

log = logging.getLogger(__name__)

BASE = "BASE"
ELEMENTS = ("Full", "CrossAttention", "SelfAttention")
NETWORK_TYPES = ("lierla", "c3lier", "loha", "lokr")
UNET_PREFIX = "model.diffusion_model."
_TE_PREFIXES = {"sd1": "lora_te", "sd2": "lora_te", "sdxl_te1": "lora_te1", "sdxl_te2": "lora_te2"}
_RES_TO_DIFFUSERS = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
                     "skip_connection": "conv_shortcut"}


@dataclass(frozen=True)
class Target:
    """One trainable layer: its kohya name, where it lives in our model, and its block."""
    name: str                     # kohya name, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    part: str                     # "unet" | "te"
    path: str                     # module path inside the UNet or the TextEncoder
    block: str                    # BASE, IN04, M00, OUT11
    group: str                    # "transformer" | "conv" | "te"
    module: nn.Module = field(compare=False, repr=False)
    encoder: int = 0              # text-encoder index (0 for the UNet)
    role: Optional[str] = None    # text-encoder role (sd1, sd2, sdxl_te1, sdxl_te2)
    alias: Optional[str] = None   # the other naming style (ldm for SD1/2, diffusers for SDXL), read-only

    @property
    def kind(self) -> str:
        """``linear``, ``conv1x1`` or ``conv`` (k > 1: takes the conv rank/alpha)."""
        if isinstance(self.module, nn.Linear):
            return "linear"
        return "conv1x1" if tuple(self.module.kernel_size) == (1, 1) else "conv"

    @property
    def element(self) -> str:
        return "attn1" if ".attn1." in self.path else "attn2" if ".attn2." in self.path else ""

    def checkpoint_weight(self) -> tuple[str, Optional[tuple[int, int]]]:
        """Original checkpoint weight key this layer's LoRA patches, and its row slice for OpenCLIP q/k/v
        (the fused ``in_proj_weight``), i.e. what A1111 binds the kohya name to."""
        if self.part == "unet":
            return f"{UNET_PREFIX}{self.path}.weight", None
        role = ROLES[self.role]
        key = f"{self.path}.weight"
        if not role.openclip:
            return role.prefix + key, None
        name, part = _hf_key_to_openclip(key)
        if part is None:
            return role.prefix + name, None
        rows = self.module.out_features
        return role.prefix + name, (part * rows, (part + 1) * rows)


# ------------------------------------------------------------------------------------------ blocks

def unet_block_ids(unet) -> list[str]:
    """The UNet's block ids in order (IN00…, M00, OUT00…)."""
    return ([f"IN{i:02d}" for i in range(len(unet.input_blocks))] + ["M00"]
            + [f"OUT{i:02d}" for i in range(len(unet.output_blocks))])


def block_of(path: str) -> str:
    """Block id of a UNet module path (``input_blocks.4.1.…`` → ``IN04``)."""
    head = path.split(".")
    if head[0] == "input_blocks":
        return f"IN{int(head[1]):02d}"
    if head[0] == "middle_block":
        return "M00"
    if head[0] == "output_blocks":
        return f"OUT{int(head[1]):02d}"
    raise ValueError(f"{path}: not inside a UNet block")


_BLOCK_RE = re.compile(r"^(BASE|IN\d{1,2}|M\d{1,2}|MID|OUT\d{1,2})$")


def normalize_blocks(blocks: Optional[Iterable[str]], unet) -> tuple[str, ...]:
    """Validated block ids in canonical form; ``None`` = every block and BASE.

    Ids of the right form that this model lacks (IN09–IN11 on SDXL, from a preset shared across
    families) are dropped with a warning; anything else is a :class:`UserError`.
    """
    valid = unet_block_ids(unet)
    if blocks is None:
        return (BASE, *valid)
    if isinstance(blocks, str):
        blocks = [b for b in re.split(r"[,\s]+", blocks) if b]
    out: list[str] = []
    absent: list[str] = []
    for raw in blocks:
        b = str(raw).strip().upper()
        if not _BLOCK_RE.match(b):
            raise UserError(f"network_blocks: unknown block {raw!r} (use BASE, IN00…, M00, OUT00…)")
        if b == "MID":
            b = "M00"
        elif b != BASE:
            b = re.sub(r"\d+$", lambda m: f"{int(m.group()):02d}", b)
        if b != BASE and b not in valid:
            absent.append(b)
            continue
        if b not in out:
            out.append(b)
    if absent:
        log.warning("network_blocks: this model has no block(s) %s; ignored", ", ".join(absent))
    return tuple(out)


def normalize_element(element: Optional[str]) -> str:
    if element is None or element == "":
        return "Full"
    for e in ELEMENTS:
        if str(element).strip().lower() == e.lower():
            return e
    raise UserError(f"network_element: unknown value {element!r} (use {', '.join(ELEMENTS)})")


# ------------------------------------------------------------------------------------------ naming

def diffusers_path(unet, path: str) -> str:
    """Our ldm path → the diffusers path kohya's SD1/SD2 UNet uses (e.g. ``input_blocks.4.1.proj_in`` →
    ``down_blocks.1.attentions.0.proj_in``). Works from the module types, for any level/res-block count."""
    parts = path.split(".")
    nrb = unet.config.num_res_blocks
    if parts[0] in ("input_blocks", "output_blocks"):
        n, k, rest = int(parts[1]), int(parts[2]), parts[3:]
        block = getattr(unet, parts[0])[n]
        layer = block[k]
        if parts[0] == "input_blocks":
            if n == 0:
                raise ValueError(f"{path}: conv_in has no LoRA name")
            level, j = divmod(n - 1, nrb + 1)
            head = f"down_blocks.{level}"
        else:
            level, j = divmod(n, nrb + 1)
            head = f"up_blocks.{level}"
        same = j
    elif parts[0] == "middle_block":
        k, rest = int(parts[1]), parts[2:]
        block = unet.middle_block
        layer = block[k]
        head = "mid_block"
        same = sum(isinstance(m, type(layer)) for m in list(block)[:k])  # n-th ResBlock / transformer
    else:
        raise ValueError(f"{path}: not inside a UNet block")
    tail = ".".join(rest)
    if isinstance(layer, ResBlock):
        return f"{head}.resnets.{same}.{_RES_TO_DIFFUSERS.get(tail, tail)}"
    if isinstance(layer, SpatialTransformer):
        return f"{head}.attentions.{same}.{tail}"
    if isinstance(layer, Downsample):
        return f"{head}.downsamplers.0.{'conv' if tail == 'op' else tail}"
    if isinstance(layer, Upsample):
        return f"{head}.upsamplers.0.{tail}"
    raise ValueError(f"{path}: no diffusers name for {type(layer).__name__}")


def unet_lora_names(unet, path: str, family: str) -> tuple[str, str]:
    """(kohya name, alias in the other style) of a UNet module path."""
    ldm = "lora_unet_" + path.replace(".", "_")
    diffusers = "lora_unet_" + diffusers_path(unet, path).replace(".", "_")
    return (ldm, diffusers) if family == "sdxl" else (diffusers, ldm)


def te_lora_name(role: str, path: str) -> str:
    return f"{_TE_PREFIXES[role]}_{path.replace('.', '_')}"


# ------------------------------------------------------------------------------------------ discovery

def _linear_or_conv(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_modules():
        if name and isinstance(child, (nn.Linear, nn.Conv2d)):
            yield name, child


def unet_targets(unet, family: str, groups: Sequence[str] = ("transformer", "conv")) -> list[Target]:
    """Every candidate UNet target of the given groups, in module order."""
    out: list[Target] = []
    for path, sub in unet.named_modules():
        if isinstance(sub, SpatialTransformer):
            group = "transformer"
        elif isinstance(sub, (ResBlock, Downsample, Upsample)):
            group = "conv"
        else:
            continue
        if group not in groups:
            continue
        for child_path, child in _linear_or_conv(sub):
            full = f"{path}.{child_path}"
            name, alias = unet_lora_names(unet, full, family)
            out.append(Target(name, "unet", full, block_of(full), group, child, alias=alias))
    return out


def te_targets(text_encoders: Sequence[Any], all_layers: bool = False) -> list[Target]:
    """Every text-encoder target (attention and MLP Linear layers of each encoder layer).

    SD2's last layer is skipped unless ``all_layers`` (to read files of tools that keep it).
    """
    out: list[Target] = []
    for index, te in enumerate(text_encoders):
        role = te.role.name
        layers = te.text_model.encoder.layers
        count = len(layers) - (1 if role == "sd2" and not all_layers else 0)
        for li in range(count):
            for child_path, child in _linear_or_conv(layers[li]):
                if isinstance(child, nn.Linear) and child_path.split(".")[0] in ("self_attn", "mlp"):
                    path = f"text_model.encoder.layers.{li}.{child_path}"
                    out.append(Target(te_lora_name(role, path), "te", path, BASE, "te", child, encoder=index,
                                      role=role))
    return out


def groups_for(network_type: str) -> tuple[str, ...]:
    if network_type not in NETWORK_TYPES:
        raise UserError(f"network_type: unknown type {network_type!r} (use {', '.join(NETWORK_TYPES)})")
    return ("transformer",) if network_type == "lierla" else ("transformer", "conv")


def select_targets(unet, text_encoders: Sequence[Any], family: str, network_type: str,
                   blocks: Optional[Iterable[str]] = None, element: Optional[str] = None) -> list[Target]:
    """The targets a network of ``network_type`` trains for ``blocks`` and ``element`` (text encoders first,
    as kohya orders them). Zero UNet targets is a :class:`UserError`."""
    blocks_ = normalize_blocks(blocks, unet)
    element_ = normalize_element(element)
    chosen = [t for t in unet_targets(unet, family, groups_for(network_type)) if t.block in blocks_]
    if element_ == "SelfAttention":
        chosen = [t for t in chosen if t.element == "attn1"]
    elif element_ == "CrossAttention":
        chosen = [t for t in chosen if t.element == "attn2"]
    if not chosen:
        raise UserError(
            f"network_blocks/network_element select no UNet layer (blocks: {', '.join(blocks_) or 'none'}; "
            f"element: {element_}). IN00 holds only conv_in, which is never trained; "
            f"{'choose c3lier for ResNet-only blocks or ' if network_type == 'lierla' else ''}"
            "add blocks with attention layers")
    te = te_targets(text_encoders) if BASE in blocks_ else []
    return te + chosen


def name_table(unet, text_encoders: Sequence[Any], family: str, all_layers: bool = True) -> dict[str, Target]:
    """Every name a LoRA file may use for this model (c3lier set, both UNet naming styles) → target.

    For reading files of other tools and for cross-tool tests; writing always uses ``Target.name``.
    """
    table: dict[str, Target] = {}
    for t in te_targets(text_encoders, all_layers=all_layers) + unet_targets(unet, family):
        table[t.name] = t
        if t.alias:
            table.setdefault(t.alias, t)
    return table


def block_counts(targets: Iterable[Target], unet) -> dict[str, int]:
    """Module count per block, in block order (blocks with none omitted)."""
    counts: dict[str, int] = {}
    for t in targets:
        counts[t.block] = counts.get(t.block, 0) + 1
    order = [BASE, *unet_block_ids(unet)]
    return {b: counts[b] for b in order if b in counts}
