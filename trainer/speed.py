"""Opt-in fast paths of the training step (issue 17); each is tested equal to the plain path
(tests/test_speed.py), so turning one on changes the time a step takes, not what is learnt.

- ``train_fused_optimizer``: torch's AdamW/SGD update every LoRA tensor in one fused kernel (CUDA
  and CPU in torch ≥ 2.4) or, where fused is unavailable, one multi-tensor (``foreach``) pass,
  instead of a loop of small per-tensor ops — hundreds of tiny launches per step for a LoRA.
- ``train_channels_last``: the UNet's weights in channels-last layout for the run, so cuDNN /
  oneDNN convolutions skip their layout transposes (restored to contiguous afterwards).
- ``train_compile``: ``torch.compile`` of the UNet's repeated blocks (each input/middle/output
  block), traced with the LoRA hooks inside so the adapter's matmuls fuse with the base layer's;
  the first steps pay the compilation, later steps run the compiled code. Undone after the run.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch

FUSABLE = ("AdamW", "SGD")       # torch.optim classes that accept fused= / foreach=


def optimizer_extra(name: str, extra: dict, device: torch.device, enabled: bool) -> dict:
    """The optimizer's extra arguments with ``fused`` (or ``foreach``) added when asked and the user did
    not set either in ``train_optimizer_settings`` (theirs wins)."""
    if not enabled or name not in FUSABLE or "fused" in extra or "foreach" in extra:
        return extra
    cls = getattr(torch.optim, name)
    if "fused" in inspect.signature(cls).parameters and device.type in ("cuda", "cpu"):
        return {**extra, "fused": True}
    return {**extra, "foreach": True}


def blocks_of(unet) -> list[torch.nn.Module]:
    """The UNet's repeated blocks: what ``train_compile`` compiles, one graph each."""
    return [*unet.input_blocks, unet.middle_block, *unet.output_blocks]


@contextlib.contextmanager
def fast_paths(unet, channels_last: bool, compile: bool) -> Iterator[None]:
    """The UNet in channels-last layout and/or with compiled blocks for the ``with`` body; restored after."""
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    compiled = []
    if compile:
        for block in blocks_of(unet):
            block.compile(dynamic=False)
            compiled.append(block)
    try:
        yield
    finally:
        for block in compiled:
            block._compiled_call_impl = None      # nn.Module.compile's handle: back to eager
        if channels_last:
            unet.to(memory_format=torch.contiguous_format)
