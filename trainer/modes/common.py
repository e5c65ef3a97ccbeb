"""What several modes share: the network from settings, the training switches, image pairs, text."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError
from ..networks import NetworkSpec, create_network, resume_network
from ..networks.blocks import parse_values
from ..speed import fast_paths

BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "grey": (128, 128, 128)}


def background_rgb(value: str) -> tuple:
    rgb = BACKGROUNDS.get(str(value).lower())
    if rgb is None:
        try:
            rgb = tuple(int(v) for v in str(value).split(","))
        except ValueError:
            rgb = ()
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise UserError(f"image_alpha_background: {value!r} is not white, black, gray or R,G,B")
    return rgb


def network_spec(s, seed: int) -> NetworkSpec:
    return NetworkSpec(network_type=s.network_type, rank=s.network_rank, alpha=s.network_alpha,
                       conv_rank=s.network_conv_rank, conv_alpha=s.network_conv_alpha, dora=s.network_dora,
                       blocks=list(s.network_blocks), element=s.network_element, seed=seed,
                       block_dims=parse_values(s.block_dims, "block_dims", integer=True),
                       block_alphas=parse_values(s.block_alphas, "block_alphas"),
                       block_lr_weight=parse_values(s.block_lr_weight, "block_lr_weight"))


def without_text_encoder(run, s):
    """Settings without BASE: with prompts encoded once, a text-encoder LoRA would never get a gradient."""
    if "BASE" not in s.network_blocks:
        return s
    run.message(f"{s.mode} trains the UNet only; BASE (text encoder) is left out")
    return s.with_overrides(network_blocks=[b for b in s.network_blocks if b != "BASE"])


def new_network(run, s, seed_offset: int = 0, resume: bool = True):
    """A fresh network from settings ``s``, resumed from ``network_resume`` if set, applied to the bundle."""
    network = create_network(run.bundle, network_spec(s, run.seed + seed_offset),
                              dtype=run.precision("train_lora_precision", s))
    if resume and s.network_resume:
        resume_network(network, s.network_resume)
    return network.apply_to(run.bundle)


@contextlib.contextmanager
def training(run, s, train_te: bool) -> Iterator[None]:
    """UNet (and text encoders when trained) in train mode with the requested checkpointing; restored after."""
    bundle = run.bundle
    modules = [bundle.unet, *bundle.text_encoders]
    before = [m.training for m in modules]
    bundle.unet.set_gradient_checkpointing(s.use_gradient_checkpointing)
    bundle.unet.train()
    for te in bundle.text_encoders:
        te.set_gradient_checkpointing(s.use_gradient_checkpointing and train_te)
        te.train(train_te)
    try:
        with fast_paths(bundle.unet, s.train_channels_last, s.train_compile):
            yield
    finally:
        bundle.unet.set_gradient_checkpointing(False)
        for te in bundle.text_encoders:
            te.set_gradient_checkpointing(False)
        for m, was in zip(modules, before):
            m.train(was)


def repeat_cond(cond: dict, batch: int) -> dict:
    return {k: v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in cond.items()}


def _open_rgb(path: Path, background: tuple) -> Image.Image:
    if not path.is_file():
        raise UserError(f"{path}: image not found")
    try:
        im = ImageOps.exif_transpose(Image.open(path))
        im.load()
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__})") from None
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        base = Image.new("RGB", im.size, background)
        base.paste(im.convert("RGB"), mask=im.getchannel("A"))
        return base
    return im.convert("RGB")


def load_image_pair(original: str, target: str, background: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images as [1, 3, H, W] in [-1, 1]: same size required, centre-cropped to multiples of 8."""
    a, b = _open_rgb(Path(original), background), _open_rgb(Path(target), background)
    if a.size != b.size:
        raise UserError(f"target_image: {Path(target).name} is {b.size[0]}x{b.size[1]} but the original is "
                        f"{a.size[0]}x{a.size[1]}; the two images must have the same size")
    w, h = (a.size[0] // 8) * 8, (a.size[1] // 8) * 8
    if w < 8 or h < 8:
        raise UserError(f"original_image: {Path(original).name} is smaller than 8x8 pixels")
    box = ((a.size[0] - w) // 2, (a.size[1] - h) // 2, (a.size[0] - w) // 2 + w, (a.size[1] - h) // 2 + h)

    def tensor(im: Image.Image) -> torch.Tensor:
        arr = np.asarray(im.crop(box), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
        return torch.from_numpy(np.ascontiguousarray(arr))[None]
    return tensor(a), tensor(b)


@torch.no_grad()
def encode_pixels(run, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled posterior mean on the training device (pairs use the mean: identical treatment of both)."""
    return run.bundle.encode_images(pixels, sample=False).to(run.device, torch.float32)
