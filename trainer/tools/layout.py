"""Which checkpoint weight each LoRA module name patches, and which block it sits in.

Built from the checkpoint's own header (family and widths read from its shapes, ``NAME.yaml`` beside it
for the prediction type) with the model's modules on the ``meta`` device, so no weights are read and the
names are exactly the ones our trainer writes for that model (``networks/targets.py``). Without a
checkpoint (LoRA-to-LoRA merges) the family's built-in layout gives the blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import UserError


@dataclass
class Layout:
    family: str                 # sd1 | sd2 | sdxl
    prediction_type: str
    table: dict                 # every accepted module name (both UNet styles) → Target
    unet: object                # meta-device UNet (block ids, name conversions)
    text_encoders: list

    def block(self, name: str) -> Optional[str]:
        t = self.table.get(name)
        return t.block if t is not None else None


def _build(config) -> Layout:
    from ..models.text_encoders import build_text_encoder
    from ..models.unet import UNetModel
    from ..networks.targets import name_table
    with torch.device("meta"):
        unet = UNetModel(config.unet)
    tes = [build_text_encoder(t.role, t.config, device="meta") for t in config.text_encoders]
    return Layout(config.family, config.prediction_type, name_table(unet, tes, config.family), unet, tes)


def checkpoint_layout(path) -> Layout:
    """The layout of a checkpoint file (missing or unreadable: one :class:`UserError` line)."""
    from ..models.loader import read_config
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    return _build(read_config(path))


def family_layout(family: str) -> Layout:
    from ..models.configs import builtin_config
    return _build(builtin_config({"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}[family]))
